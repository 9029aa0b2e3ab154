"""Small builders shared by the evaluate tests: real caches and real checkpoints with known weights."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from fast_sae.actcache.from_arrays import write_cache_from_arrays
from fast_sae.saeio import CacheIdentity, CheckpointConfig, Normalization, TrainingData, from_cfg_json, save_sae


def sae_cfg(d_in: int, d_sae: int, layer: int, architecture: str = "standard",
            **extra: Any) -> dict[str, Any] | CheckpointConfig:
    """A flat (fast-sae 0.2 style) cfg; typed ``training`` / ``normalization`` records make it a CheckpointConfig."""
    typed = {k: extra.pop(k) for k in ("training", "normalization") if k in extra}
    doc = {"architecture": architecture, "d_in": d_in, "d_sae": d_sae, "hook_name": f"blocks.{layer}.hook_resid_post",
           "hook_layer": layer, "apply_b_dec_to_input": False, **extra}
    if not typed:
        return doc
    cfg = from_cfg_json(doc, "test cfg")
    for key, value in typed.items():
        setattr(cfg, key, value)
    return cfg


def provenance(regime: str, dataset: str, train_doc_ids: list[tuple[int, int]] | None = None,
               factor: float | None = None, source: str | None = None) -> dict[str, Any]:
    """Typed training/normalisation records for ``sae_cfg``: the regime and dataset of the training
    cache, its training documents, and a normalisation constant with its source cache."""
    out: dict[str, Any] = {"training": TrainingData(cache=CacheIdentity(regime=regime, dataset=dataset),
                                                    train_doc_ids=train_doc_ids)}
    if factor is not None:
        out["normalization"] = Normalization(method="content", factor=factor, source=CacheIdentity(path=source))
    return out


def save_identity_sae(folder: Path, d: int, layer: int, **extra: Any) -> Path:
    """x -> relu(x) - relu(-x) = x exactly: d_sae = 2d, W_enc = [I, -I], W_dec = [I; -I]."""
    eye = torch.eye(d)
    weights = {"W_enc": torch.cat([eye, -eye], dim=1), "W_dec": torch.cat([eye, -eye], dim=0),
               "b_enc": torch.zeros(2 * d), "b_dec": torch.zeros(d)}
    return save_sae(folder, weights, sae_cfg(d, 2 * d, layer, **extra))


def save_constant_sae(folder: Path, d: int, layer: int, value: np.ndarray | float = 0.0, d_sae: int = 4,
                      **extra: Any) -> Path:
    """Reconstructs every input as the constant b_dec (no feature ever fires)."""
    weights = {"W_enc": torch.zeros(d, d_sae), "W_dec": torch.zeros(d_sae, d), "b_enc": torch.full((d_sae,), -1.0),
               "b_dec": torch.as_tensor(np.broadcast_to(value, (d,)).copy(), dtype=torch.float32)}
    return save_sae(folder, weights, sae_cfg(d, d_sae, layer, **extra))


def save_random_sae(folder: Path, d: int, d_sae: int, layer: int, seed: int = 0, **extra: Any) -> Path:
    g = torch.Generator().manual_seed(seed)
    weights = {"W_enc": torch.randn(d, d_sae, generator=g) / d ** 0.5,
               "W_dec": torch.randn(d_sae, d, generator=g) / d_sae ** 0.5,
               "b_enc": torch.randn(d_sae, generator=g) * 0.1, "b_dec": torch.randn(d, generator=g) * 0.1}
    return save_sae(folder, weights, sae_cfg(d, d_sae, layer, **extra))


def make_cache(path: Path, acts: dict[int, np.ndarray], seq_lengths: list[int], roles: np.ndarray | None = None,
               chunk_tokens: int = 8, **kw: Any) -> Path:
    seq_starts = np.concatenate([[0], np.cumsum(seq_lengths)]).astype(np.int64)
    return write_cache_from_arrays(path, acts, seq_starts=seq_starts, roles=roles, chunk_tokens=chunk_tokens, **kw)


def save_pca_sae(folder: Path, acts: np.ndarray, layer: int, k: int, **extra: Any) -> Path:
    """A 'trained' SAE without training: x̂ = μ + V Vᵀ (x − μ), V the top-k principal directions of ``acts``.

    Encoded exactly with ReLUs: f = relu([(x−μ)V, −(x−μ)V]), d_sae = 2k; the reconstruction quality
    depends on which activations it was fitted on, like a real SAE's.
    """
    x = np.asarray(acts, dtype=np.float64)
    mu = x.mean(0)
    _, _, vt = np.linalg.svd(x - mu, full_matrices=False)
    v = vt[:k].T  # (d, k)
    w_enc = np.concatenate([v, -v], axis=1)
    weights = {"W_enc": torch.tensor(w_enc, dtype=torch.float32), "W_dec": torch.tensor(w_enc.T, dtype=torch.float32),
               "b_enc": torch.tensor(-mu @ w_enc, dtype=torch.float32), "b_dec": torch.tensor(mu, dtype=torch.float32)}
    return save_sae(folder, weights, sae_cfg(x.shape[1], 2 * k, layer, **extra))


# token ids of the synthetic chat template (chat_stream)
IM_START, IM_END, NEWLINE, USER_ID, ASSISTANT_ID, SYSTEM_ID = 1, 2, 198, 3, 4, 5
DEFAULT_SYSTEM = [100, 101, 102, 103, 104]


def chat_stream(n_docs: int, seed: int = 0, turns: int = 2, vocab: int = 40) -> dict[str, np.ndarray]:
    """A synthetic FAST token stream laid out as SmolLM2's template lays out conversations: every
    conversation starts with the same system block (the template's default system prompt), then
    ``turns`` user/assistant exchanges whose content draws on one shared vocabulary.
    Returns ids, roles, doc_ids (one per conversation) and starts (one sequence per conversation)."""
    from fast_sae.actcache import Role

    rng = np.random.default_rng(seed)
    sp, tp = int(Role.SPECIAL), int(Role.TEMPLATE)
    ids: list[int] = []
    roles: list[int] = []
    docs: list[int] = []
    starts = [0]

    def put(tokens: list[int], role: int, doc: int) -> None:
        ids.extend(tokens)
        roles.extend([role] * len(tokens))
        docs.extend([doc] * len(tokens))

    for doc in range(n_docs):
        put([IM_START], sp, doc)
        put([SYSTEM_ID, NEWLINE], tp, doc)
        put(DEFAULT_SYSTEM, int(Role.DEFAULT_SYSTEM), doc)
        put([IM_END], sp, doc)
        put([NEWLINE], tp, doc)
        for _ in range(turns):
            for who, role, length in ((USER_ID, Role.USER, rng.integers(4, 12)),
                                      (ASSISTANT_ID, Role.ASSISTANT, rng.integers(6, 20))):
                put([IM_START], sp, doc)
                put([who, NEWLINE], tp, doc)
                put((1000 + rng.integers(0, vocab, size=length)).tolist(), int(role), doc)
                put([IM_END], sp, doc)
                put([NEWLINE], tp, doc)
        starts.append(len(ids))
    return {"ids": np.array(ids, np.int64), "roles": np.array(roles, np.uint8), "doc_ids": np.array(docs, np.int64),
            "starts": np.array(starts, np.int64)}
