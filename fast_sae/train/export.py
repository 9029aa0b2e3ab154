"""Writing one SAE of a stack as a checkpoint (saeio format), folded to raw units, and the records
of the run that go into its cfg.json."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from fast_sae.actcache import ActivationCache
from fast_sae.saeio import CacheIdentity, CheckpointConfig, CheckpointError, TrainingRun, save_sae

from .buffer import mixing_half
from .config import SAESpec, TrainConfig
from .runfiles import remove_stale_temps
from .saes import SAEGroup


def save_group(folder: Path, group: SAEGroup, index: int, scale: float, cfg: CheckpointConfig) -> Path:
    """Save SAE ``index`` of ``group``; weights act on raw activations (see SAEGroup.folded_weights).

    save_sae writes ``<sae>.tmp-<pid>/`` then renames it: those of killed runs are removed first, and
    this run's own is removed when the write fails (a full disk must not stay full of it)."""
    remove_stale_temps(folder.parent, prefix=folder.name + ".")
    try:
        return save_sae(folder, group.folded_weights(index, scale), cfg)
    except OSError as exc:
        shutil.rmtree(folder.with_name(f"{folder.name}.tmp-{os.getpid()}"), ignore_errors=True)
        raise CheckpointError(f"{folder}: cannot write the SAE ({exc.strerror or exc}); free space and rerun "
                              f"(the run resumes from its last checkpoint)") from None


def cache_record(cache: ActivationCache) -> CacheIdentity:
    """What identifies the training cache (evaluation uses it to recognise the cache again)."""
    m = cache.meta
    return CacheIdentity(path=str(cache.path.resolve()), model=m.model_id, regime=m.regime, n_tokens=m.n_tokens,
                         n_sequences=m.n_sequences, context_size=m.context_size, dataset=m.dataset,
                         dataset_fingerprint=m.dataset_fingerprint, chat_template_hash=m.chat_template_hash,
                         **m.document_set())


def run_record(spec: SAESpec, cfg: TrainConfig, total_steps: int, d_in: int, train_tokens: int) -> TrainingRun:
    """The hyper-parameters of one SAE of the run, in SAELens' names where it has one."""
    run = TrainingRun(
        trainer="fast-sae train", sae_name=spec.name, training_tokens=total_steps * cfg.batch_tokens,
        train_batch_size_tokens=cfg.batch_tokens, lr=cfg.lr, lr_end=cfg.lr_end,
        lr_warm_up_steps=int(cfg.warmup_frac * total_steps), lr_decay_steps=int(cfg.decay_frac * total_steps),
        sparsity_warm_up_steps=int(cfg.sparsity_warmup_frac * total_steps),
        adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, grad_clip=cfg.grad_clip, seed=cfg.seed,
        expansion_factor=spec.expansion_factor, data_order=cfg.order, buffer_tokens=cfg.buffer_tokens,
        buffer_tokens_effective=2 * min(mixing_half(cfg.buffer_tokens, cfg.batch_tokens),
                                        mixing_half(train_tokens, cfg.batch_tokens)),
        b_dec_init=cfg.b_dec_init, init_encoder_as_decoder_transpose=cfg.init_encoder_as_decoder_transpose,
        dead_feature_window=cfg.dead_window(), normalize_sae_decoder=True)
    if spec.architecture == "standard":
        run.l1_coefficient = spec.sparsity
        run.scale_sparsity_penalty_by_decoder_norm = cfg.l1_decoder_norm
        run.normalize_sae_decoder = not cfg.l1_decoder_norm
    elif spec.architecture == "jumprelu":
        run.l0_coefficient = spec.sparsity
        run.jumprelu_bandwidth, run.jumprelu_init_threshold = cfg.jumprelu_bandwidth, cfg.jumprelu_init_threshold
    else:  # topk, batchtopk: the sparsity is k
        run.aux_k, run.aux_k_coefficient = cfg.aux_k or d_in // 2, cfg.aux_k_coefficient
        if spec.architecture == "batchtopk":
            run.batchtopk_threshold_lr = cfg.batchtopk_threshold_lr
    return run
