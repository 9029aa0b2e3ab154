"""The training run: one pass over the cache feeding every SAE of the grid.

Flow: open and check the cache -> split off held-out sequences -> this process's share of the
grid (distributed.py) -> memory check -> normalisation factors and b_dec init -> stacks of
same-shape SAEs (saes/) with one Adam each -> for every batch (read once per layer, buffer.py),
a step of every stack -> metrics, checkpoints -> held-out evaluation -> folded SAELens-style
checkpoints (export.py) and an end-of-run table.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fast_sae.actcache import ActivationCache, CacheError

from .buffer import BatchOrder, mixing_half
from .checkpoint import Checkpointer
from .config import GridConfig, SAESpec, TrainConfig
from .distributed import Dist, init_distributed, partition
from .evaluation import evaluate_groups
from .export import save_group
from .loader import DataSplit, Prefetcher, TokenStream, readers_for
from .memory import estimate
from .normalize import initial_b_dec, normalization_method_used, scale_factor
from .report import format_table
from .saes import GROUP_CLASSES, SAEGroup
from .saes.sparse import spec_decoder_path
from .schedule import lr_at, sparsity_scale_at

RUN_CONFIG = "run_config.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
B_DEC_SAMPLE_TOKENS = 16384


class RunError(Exception):
    """A run that cannot start or continue; the message is one line."""


@dataclass
class RunResult:
    status: str  # "finished" | "stopped" | "already finished"
    run_dir: Path
    step: int
    rows: list[dict[str, Any]] = field(default_factory=list)


def group_key(spec: SAESpec, d_in: int, decoder_path: str) -> str:
    """SAEs stacked together: same layer, architecture, width and decoder path. The path is chosen
    per SAE (by its own k), so an SAE trains the same way whatever else is in the grid."""
    key = f"L{spec.layer}_{spec.architecture}_x{spec.expansion_factor}"
    return key + "_sparse" if spec_decoder_path(spec, d_in, decoder_path) == "sparse" else key


def _cache_identity(cache: ActivationCache) -> dict[str, Any]:
    m = cache.meta
    return {"model_id": m.model_id, "d_model": m.d_model, "n_tokens": m.n_tokens, "n_sequences": m.n_sequences,
            "regime": m.regime, "dataset_fingerprint": m.dataset_fingerprint, "dtype": m.dtype}


def _comparable(run_cfg: dict[str, Any]) -> dict[str, Any]:
    train = {k: v for k, v in run_cfg["train"].items() if k not in ("device", "max_memory_gb", "checkpoint_every")}
    return {"train": train, "grid": run_cfg["grid"], "cache": run_cfg["cache"], "world_size": run_cfg["world_size"]}


def check_run_folder(run_dir: Path, run_cfg: dict[str, Any]) -> None:
    """A run folder belongs to one configuration: refuse to resume it with another."""
    f = run_dir / RUN_CONFIG
    if not f.is_file():
        return
    try:
        old = json.loads(f.read_text())
    except ValueError:
        raise RunError(f"{f}: corrupt run configuration; use another --out") from None
    old_c, new_c = _comparable(old), _comparable(run_cfg)
    if old_c == new_c:
        return
    oc, nc = old_c["cache"], new_c["cache"]
    if oc.get("d_model") != nc.get("d_model"):
        raise RunError(f"d_model mismatch: {run_dir} was trained on a cache with d_model {oc.get('d_model')}, "
                       f"this cache has d_model {nc.get('d_model')}; use another --out")
    for section in ("cache", "train", "grid"):
        for key in sorted(set(old_c[section]) | set(new_c[section])):
            if old_c[section].get(key) != new_c[section].get(key):
                raise RunError(f"{run_dir} holds a run with {section} {key} = {old_c[section].get(key)!r}, "
                               f"now {new_c[section].get(key)!r}; rerun the same command or use another --out")
    raise RunError(f"{run_dir} was started with {old_c['world_size']} processes, now {new_c['world_size']}; "
                   f"resume with the same number")


class Trainer:
    def __init__(self, cache_path: str | Path, run_dir: str | Path, cfg: TrainConfig, grid: GridConfig,
                 echo: Callable[[str], None] = print, progress: bool = True) -> None:
        self.cfg = cfg
        self.grid = grid
        self.run_dir = Path(run_dir)
        self.echo = echo
        self.progress = progress
        cfg.validate()
        self.cache = ActivationCache.open(cache_path)
        self.specs = grid.specs()
        for layer in sorted({s.layer for s in self.specs}):
            if layer not in self.cache.meta.layers:
                raise CacheError(f"{self.cache.path}: layer {layer} not in cache (layers: {self.cache.meta.layers})")
        self.d_in = self.cache.meta.d_model
        self.split = DataSplit.from_cache(self.cache, cfg.eval_sequences)
        if self.split.train_tokens < cfg.batch_size:
            raise RunError(f"only {self.split.train_tokens} training tokens, fewer than one batch ({cfg.batch_size})")
        self.total_steps = cfg.steps()
        self.dist: Dist = Dist()

    # ------------------------------------------------------------------ setup
    def _run_config(self) -> dict[str, Any]:
        return {"train": dataclasses.asdict(self.cfg), "grid": dataclasses.asdict(self.grid),
                "cache": _cache_identity(self.cache), "cache_path": str(self.cache.path.resolve()),
                "world_size": self.dist.world, "split": self.split.to_json(),
                "saes": [s.name for s in self.specs]}

    def _build_groups(self, specs: list[SAESpec], scales: dict[int, float], stream: TokenStream,
                      resuming: bool) -> dict[str, SAEGroup]:
        b_dec: dict[int, torch.Tensor] = {}
        half = mixing_half(self.cfg.buffer_tokens, self.cfg.batch_size)
        n_sample = min(half, self.split.train_tokens, B_DEC_SAMPLE_TOKENS)
        for layer in sorted({s.layer for s in specs}):
            if resuming:  # overwritten by the checkpoint
                b_dec[layer] = torch.zeros(self.d_in)
                continue
            sample = stream.readers[layer].read(0, n_sample) if self.cfg.b_dec_init == "geometric_median" else \
                np.zeros((1, self.d_in), np.float32)
            b_dec[layer] = initial_b_dec(self.cfg.b_dec_init, sample, self.cache.layer_stats(layer).mean,
                                         scales[layer])
        groups: dict[str, list[SAESpec]] = {}
        for s in specs:
            groups.setdefault(group_key(s, self.d_in, self.cfg.decoder_path), []).append(s)
        out = {}
        for key, members in groups.items():
            cls = GROUP_CLASSES[members[0].architecture]
            out[key] = cls(members, self.d_in, self.cfg, b_dec[members[0].layer]).to(self.cfg.device)
        return out

    def _optimizers(self, groups: dict[str, SAEGroup]) -> dict[str, torch.optim.Optimizer]:
        return {k: torch.optim.Adam(g.parameters(), lr=self.cfg.lr, betas=(self.cfg.adam_beta1, self.cfg.adam_beta2))
                for k, g in groups.items()}

    # ------------------------------------------------------------------ run
    def run(self, stop_after_steps: int | None = None) -> RunResult:
        self.dist = d = init_distributed(self.cfg.device)
        run_cfg = self._run_config()
        error = None
        if d.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            try:
                check_run_folder(self.run_dir, run_cfg)
            except RunError as exc:
                error = str(exc)
        error = d.broadcast(error)
        if error is not None:
            raise RunError(error)
        summary_file = self.run_dir / SUMMARY
        if summary_file.is_file():
            rows = json.loads(summary_file.read_text()).get("saes", [])
            if d.main:
                self.echo(f"{self.run_dir}: run already finished")
                self.echo(format_table(rows))
            return RunResult("already finished", self.run_dir, self.total_steps, rows)

        mine = partition(self.specs, self.d_in, d.world)[d.rank]
        my_layers = sorted({s.layer for s in mine})
        est = estimate(mine, self.d_in, len(my_layers), self.cfg)
        prefix = f"[rank {d.rank}] " if d.active else ""
        self.echo(f"{prefix}{len(mine)} SAEs on layers {my_layers}; {est.line()}")
        fits = est.fits(same_device=not self.cfg.device.startswith("cuda"))
        verdicts = d.gather((fits, est.device_total + est.data, est.host_available))
        bad = None
        if d.main and verdicts:
            bad = next(([i, need, have] for i, (ok, need, have) in enumerate(verdicts) if not ok), None)
        bad = d.broadcast(bad)
        if bad is not None:
            where = f" on process {bad[0]}" if d.active else ""
            raise RunError(f"grid does not fit in memory{where}: estimated {bad[1] / 2**30:.2f} GiB, "
                           f"{bad[2] / 2**30:.2f} GiB available; train fewer or narrower SAEs, lower "
                           f"--batch-size/--buffer-tokens, or spread the grid over more processes")
        if d.main:
            tmp = self.run_dir / f"{RUN_CONFIG}.tmp-{os.getpid()}"
            tmp.write_text(json.dumps(run_cfg, indent=2))
            os.replace(tmp, self.run_dir / RUN_CONFIG)

        scales = {layer: scale_factor(self.cache, layer, self.cfg.normalize) for layer in my_layers}
        stream = TokenStream(readers_for(self.cache, my_layers, scales), self.split.train_tokens)
        ckpt = Checkpointer(self.run_dir, d)
        try:
            state = ckpt.load()
        except RuntimeError as exc:
            raise RunError(str(exc)) from None
        groups = self._build_groups(mine, scales, stream, resuming=state is not None)
        optims = self._optimizers(groups)
        start = 0
        if state is not None:
            start = int(state["step"])
            for k, g in groups.items():
                g.load_state_dict(state["groups"][k])
                optims[k].load_state_dict(state["optims"][k])
            torch.set_rng_state(state["torch_rng"])
            if d.main:
                self.echo(f"resuming {self.run_dir} at step {start} of {self.total_steps}")
        if d.main:
            self._truncate_metrics(start)

        step = self._loop(groups, optims, stream, scales, start, ckpt, stop_after_steps)
        if step < self.total_steps:
            return RunResult("stopped", self.run_dir, step)
        return self._finish(groups, scales, mine, ckpt)

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric lines past the checkpoint so a resumed run's file equals an uninterrupted one's."""
        f = self.run_dir / METRICS
        if not f.is_file():
            return
        keep = [line for line in f.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step and json.loads(line).get("split") == "train"]
        tmp = f.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, f)

    def _save_checkpoint(self, ckpt: Checkpointer, step: int, groups: dict[str, SAEGroup],
                         optims: dict[str, torch.optim.Optimizer]) -> None:
        ckpt.save(step, {"step": step, "groups": {k: g.state_dict() for k, g in groups.items()},
                         "optims": {k: o.state_dict() for k, o in optims.items()},
                         "torch_rng": torch.get_rng_state()})

    def _loop(self, groups: dict[str, SAEGroup], optims: dict[str, torch.optim.Optimizer], stream: TokenStream,
              scales: dict[int, float], start: int, ckpt: Checkpointer, stop_after: int | None) -> int:
        cfg, d, total = self.cfg, self.dist, self.total_steps
        b = cfg.batch_size
        by_layer: dict[int, list[str]] = {}
        for k, g in groups.items():
            by_layer.setdefault(g.specs[0].layer, []).append(k)
        order = BatchOrder(cfg.order, stream, b, cfg.buffer_tokens, cfg.seed)
        bar = None
        if self.progress and d.main:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=start, unit="step", desc="train", file=sys.stderr, dynamic_ncols=True)
        step = start
        prefetch = Prefetcher(lambda: order.blocks(start, total), depth=1 if cfg.order == "mixing" else 2)
        try:
            for block in prefetch:
                acts = {layer: t.to(cfg.device, non_blocking=True) for layer, t in block.acts.items()}
                for i in range(block.n_steps):
                    step = block.first_step + i
                    lr = lr_at(step, cfg, total)
                    sparsity = sparsity_scale_at(step, cfg, total)
                    for layer, keys in by_layer.items():
                        x = acts[layer][i * b:(i + 1) * b]
                        for k in keys:
                            self._step(groups[k], optims[k], x, lr, sparsity)
                    done = step + 1
                    if bar is not None:
                        bar.update(1)
                    if done % cfg.log_every == 0 or done == total:
                        self._log(groups, scales, done, lr, sparsity)
                    if stop_after is not None and done >= stop_after and done < total:
                        self._save_checkpoint(ckpt, done, groups, optims)
                        return done
                    if done % cfg.checkpoint_every == 0 and done < total:
                        self._save_checkpoint(ckpt, done, groups, optims)
        finally:
            prefetch.close()
            if bar is not None:
                bar.close()
        return total if total > start else start

    @staticmethod
    def _step(group: SAEGroup, opt: torch.optim.Optimizer, x: torch.Tensor, lr: float, sparsity: float) -> None:
        for pg in opt.param_groups:
            pg["lr"] = lr
        opt.zero_grad(set_to_none=True)
        out = group.forward_loss(x, sparsity)
        out.loss.backward()
        group.clip_grad_norm_(group.cfg.grad_clip)
        opt.step()
        group.after_step(out, x)

    def _log(self, groups: dict[str, SAEGroup], scales: dict[int, float], done: int, lr: float,
             sparsity: float) -> None:
        lines = []
        for g in groups.values():
            for spec, m in zip(g.specs, g.take_window_metrics()):
                s2 = scales[spec.layer] ** 2
                coef = None if spec.architecture in ("topk", "batchtopk") else spec.sparsity * sparsity
                lines.append({"step": done, "tokens": done * self.cfg.batch_size, "split": "train", "sae": spec.name,
                              "layer": spec.layer, "architecture": spec.architecture,
                              "mse": m["mse_normalized"] / s2, "mse_normalized": m["mse_normalized"],
                              "explained_variance": m["explained_variance"], "l0": m["l0"],
                              "dead_fraction": m["dead_fraction"], "lr": lr, "sparsity_coefficient": coef})
        gathered = self.dist.gather(lines)
        if self.dist.main and gathered:
            order = {s.name: i for i, s in enumerate(self.specs)}
            every = sorted((line for part in gathered for line in part), key=lambda r: order[r["sae"]])
            with open(self.run_dir / METRICS, "a") as fh:
                for line in every:
                    fh.write(json.dumps(line) + "\n")

    def _finish(self, groups: dict[str, SAEGroup], scales: dict[int, float], mine: list[SAESpec],
                ckpt: Checkpointer) -> RunResult:
        d = self.dist
        rows = evaluate_groups(self.cache, self.split, groups, scales, self.cfg)
        last_train = self._last_train_metrics() if d.main else {}
        for g in groups.values():
            for i, spec in enumerate(g.specs):
                cfg_json = self.sae_cfg(spec, g, scales[spec.layer])
                save_group(self.run_dir / spec.name, g, i, scales[spec.layer], cfg_json)
        gathered = d.gather(rows)
        result_rows: list[dict[str, Any]] = []
        if d.main and gathered:
            order = {s.name: i for i, s in enumerate(self.specs)}
            result_rows = sorted((r for part in gathered for r in part), key=lambda r: order[r["sae"]])
            with open(self.run_dir / METRICS, "a") as fh:
                for r in result_rows:
                    fh.write(json.dumps({"step": self.total_steps, "split": "eval", **r}) + "\n")
            for r in result_rows:
                r.setdefault("train_explained_variance", last_train.get(r["sae"], {}).get("explained_variance"))
            tmp = self.run_dir / f"{SUMMARY}.tmp-{os.getpid()}"
            tmp.write_text(json.dumps({"status": "finished", "steps": self.total_steps,
                                       "tokens": self.total_steps * self.cfg.batch_size, "saes": result_rows},
                                      indent=2))
            os.replace(tmp, self.run_dir / SUMMARY)
            self.echo(format_table(result_rows))
        ckpt.remove()
        return RunResult("finished", self.run_dir, self.total_steps, result_rows)

    def _last_train_metrics(self) -> dict[str, dict[str, Any]]:
        f = self.run_dir / METRICS
        out: dict[str, dict[str, Any]] = {}
        if f.is_file():
            for line in f.read_text().splitlines():
                if line.strip():
                    r = json.loads(line)
                    if r.get("split") == "train":
                        out[r["sae"]] = r
        return out

    def sae_cfg(self, spec: SAESpec, group: SAEGroup, scale: float) -> dict[str, Any]:
        """cfg.json in SAELens field names, plus what this project records about the run."""
        m, cfg = self.cache.meta, self.cfg
        out: dict[str, Any] = {
            "architecture": spec.architecture, "d_in": self.d_in, "d_sae": spec.d_sae(self.d_in),
            "hook_name": f"blocks.{spec.layer}.hook_resid_post", "hook_layer": spec.layer, "hook_head_index": None,
            "model_name": m.model_id, "model_revision": m.model_revision, "context_size": m.context_size,
            "dataset_path": m.dataset, "dataset_fingerprint": m.dataset_fingerprint, "prepend_bos": False,
            "dtype": "float32", "device": "cpu",
            "apply_b_dec_to_input": group.apply_b_dec_to_input,
            # Weights are folded (act on raw activations), so SAELens must not rescale inputs again:
            "normalize_activations": "none",
            "activation_normalization_factor": scale,
            "training_normalization": normalization_method_used(self.cache, spec.layer, cfg.normalize),
            "weights_folded": True,
            "regime": m.regime, "training_regime": m.regime, "training_tokens": self.total_steps * cfg.batch_size,
            "train_batch_size_tokens": cfg.batch_size, "lr": cfg.lr, "lr_end": cfg.lr_end,
            "lr_warm_up_steps": int(cfg.warmup_frac * self.total_steps),
            "lr_decay_steps": int(cfg.decay_frac * self.total_steps),
            "sparsity_warm_up_steps": int(cfg.sparsity_warmup_frac * self.total_steps),
            "adam_beta1": cfg.adam_beta1, "adam_beta2": cfg.adam_beta2, "grad_clip": cfg.grad_clip, "seed": cfg.seed,
            "expansion_factor": spec.expansion_factor, "data_order": cfg.order, "buffer_tokens": cfg.buffer_tokens,
            "b_dec_init": cfg.b_dec_init, "init_encoder_as_decoder_transpose": cfg.init_encoder_as_decoder_transpose,
            "dead_feature_window": cfg.dead_window_steps, "cache_path": str(self.cache.path.resolve()),
            "cache_n_tokens": m.n_tokens,
            "train_token_range": [0, self.split.train_tokens],
            "eval_token_range": list(self.split.eval_range),
            "eval_sequence_range": [self.split.eval_first_sequence, self.split.n_sequences],
            "buffer_tokens_effective": 2 * min(mixing_half(cfg.buffer_tokens, cfg.batch_size),
                                               mixing_half(self.split.train_tokens, cfg.batch_size)),
            "sae_name": spec.name, "trainer": "fast-sae train",
            # Further SAELens 5.x config fields, so its loaders find what they expect.
            "finetuning_scaling_factor": False, "dataset_trust_remote_code": False,
            "model_from_pretrained_kwargs": {}, "sae_lens_training_version": None, "neuronpedia_id": None,
        }
        out["activation_fn_str"] = "topk" if spec.architecture == "topk" else "relu"
        if spec.architecture == "standard":
            out.update(activation_fn="relu", l1_coefficient=spec.sparsity,
                       scale_sparsity_penalty_by_decoder_norm=cfg.l1_decoder_norm,
                       normalize_sae_decoder=not cfg.l1_decoder_norm)
        elif spec.architecture == "jumprelu":
            out.update(activation_fn="relu", l0_coefficient=spec.sparsity, l1_coefficient=spec.sparsity,
                       jumprelu_bandwidth=cfg.jumprelu_bandwidth, jumprelu_init_threshold=cfg.jumprelu_init_threshold,
                       normalize_sae_decoder=True)
        else:
            out.update(activation_fn="topk", activation_fn_kwargs={"k": spec.k}, k=spec.k,
                       aux_k=cfg.aux_k or self.d_in // 2, aux_k_coefficient=cfg.aux_k_coefficient,
                       normalize_sae_decoder=True)
            if spec.architecture == "batchtopk":
                out.update(activation_fn="relu", activation_fn_kwargs={},
                           batchtopk_threshold_lr=cfg.batchtopk_threshold_lr)
        return out
