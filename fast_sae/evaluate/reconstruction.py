"""Model-free reconstruction metrics, streamed from the activation cache.

Definitions (all on raw, un-normalised activations, float64 accumulation):
- ``mse``: the paper's eq. 7, MSE = 1/(N·H) Σ_i 1/L_i Σ_j ‖y_ij − ŷ_ij‖² — per-token squared error
  summed over the H = d_model dims, averaged inside each sequence, then averaged over the N
  sequences (a *macro* average: a short conversation weighs as much as a long one), divided by H.
  For a token subset (e.g. special tokens, the paper's MSE_st) L_i counts only the subset's tokens
  of sequence i and sequences without such tokens are left out of N. ``log2_mse`` is what the
  paper's tables print.
- ``mse_token``: the micro average Σ‖y−ŷ‖² / (n·H), for comparison with tools that report it.
- ``nmse``: Σ‖y−ŷ‖² / Σ‖y‖², reconstruction error relative to the activations' energy.
- ``explained_variance``: 1 − Σ‖y−ŷ‖² / Σ‖y−μ‖², μ the per-dimension mean over the subset's eval
  tokens (not per batch, not zero: pitfalls.md). Σ‖y−μ‖² = Σ‖y‖² − n‖μ‖², exact in float64.
- ``l0``: mean number of active features (f > 0) per token.
- feature frequencies over all eval tokens: a feature is *dead* if it fires on at most
  ``dead_threshold`` of the tokens (default 0: never), *dense* if on more than ``dense_threshold``
  (default 0.1, i.e. >10% of tokens).
Subsets: all tokens, special (BOS/template special/template/separator — the paper's special-token
positions as cache_layout.md defines them), its halves special_tokens (tokenizer special tokens)
and template (role names, newlines, default system prompt), content, and each content role. Several SAEs of one layer share a single pass over
the cache, read in batches so memory stays flat whatever the cache size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from fast_sae.actcache import CONTENT_ROLES, SPECIAL_ROLES, ActivationCache, Role
from fast_sae.options import setting
from fast_sae.saeio import LoadedSAE

from .sources import EvalSelection

SUBSETS: dict[str, tuple[int, ...] | None] = {
    "all": None,
    "special": tuple(int(r) for r in SPECIAL_ROLES),
    # the two halves of "special": tokenizer special tokens (BOS, <|im_start|>, <|im_end|>, separators) and
    # plain template tokens (role names, newlines, and the template's default system prompt, which the
    # paper's Table-11 token list does not include)
    "special_tokens": (int(Role.BOS), int(Role.SPECIAL), int(Role.SEPARATOR)),
    "template": (int(Role.TEMPLATE),),
    "content": tuple(int(r) for r in CONTENT_ROLES),
    "system": (int(Role.SYSTEM),),
    "user": (int(Role.USER),),
    "assistant": (int(Role.ASSISTANT),),
    "text": (int(Role.TEXT),),
}


@dataclass
class ReconstructionConfig:
    """How the pass reads the cache and where feature-frequency thresholds lie."""

    batch_tokens: int = setting(4096, help="Tokens per SAE forward; bounds memory (batch x d_sae floats per SAE).")
    dead_threshold: float = setting(0.0, help="A feature is dead if it fires on at most this share of eval tokens.")
    dense_threshold: float = setting(0.1, help="A feature is dense if it fires on more than this share of eval "
                                               "tokens.")
    device: str = setting("cpu", cli=False, help="Set from the evaluation's --device.")
    progress: bool = setting(True, cli=False, help="Set from the evaluation's --progress.")


@dataclass
class _SubsetSums:
    """Running float64 sums for one token subset of one SAE."""

    seq_err: np.ndarray  # (n_selected_sequences,) Σ_j ‖y−ŷ‖² per sequence
    seq_count: np.ndarray  # (n_selected_sequences,) tokens per sequence
    sum_x: np.ndarray  # (d_model,)
    sum_sq: float = 0.0
    sum_err: float = 0.0
    l0_sum: float = 0.0
    n: int = 0

    def result(self, d_model: int) -> dict[str, Any]:
        if self.n == 0:
            return {"n_tokens": 0, "n_sequences": 0}
        has = self.seq_count > 0
        mse = float(np.mean(self.seq_err[has] / self.seq_count[has]) / d_model)
        mean = self.sum_x / self.n
        centered = self.sum_sq - self.n * float(mean @ mean)
        return {
            "n_tokens": self.n,
            "n_sequences": int(has.sum()),
            "mse": mse,
            "log2_mse": log2_mse(mse),
            "mse_token": self.sum_err / (self.n * d_model),
            "nmse": self.sum_err / self.sum_sq if self.sum_sq > 0 else float("nan"),
            "explained_variance": 1.0 - self.sum_err / centered if centered > 0 else float("nan"),
            "l0": self.l0_sum / self.n,
            "mean_sq_norm": self.sum_sq / self.n,
        }


def log2_mse(mse: float) -> float:
    """log2 of an MSE; a non-finite MSE stays non-finite (NaN stays NaN: never −inf, which would read
    as a perfect score). Only an MSE of exactly 0 gives −inf."""
    if not math.isfinite(mse):
        return mse
    return math.log2(mse) if mse > 0 else float("-inf")


def non_finite_warnings(label: str, result: ReconstructionResult) -> list[str]:
    """One line per problem that makes this result's numbers meaningless (NaN/Inf in the activations,
    the SAE's weights or its output), for report.json/report.md and stderr."""
    nf = result.extra.get("non_finite", {})
    out = []
    if nf.get("weights"):
        out.append(f"{label}: the SAE has non-finite weights ({', '.join(nf['weights'])}); its metrics are not "
                   f"meaningful")
    if nf.get("activation_tokens"):
        out.append(f"{label}: {nf['activation_tokens']} eval token(s) have NaN/Inf activations in the cache; "
                   f"metrics over them are non-finite (re-harvest or check the cache)")
    if nf.get("output_tokens"):
        out.append(f"{label}: the SAE's reconstruction or features are NaN/Inf on {nf['output_tokens']} token(s)")
    bad = [k for k, v in result.subsets.items() if "mse" in v and not math.isfinite(v["mse"])]
    if bad:
        out.append(f"{label}: MSE is non-finite on subset(s) {', '.join(bad)}; log2 MSE is reported as "
                   f"{result.subsets[bad[0]]['log2_mse']}, not a score")
    return out


@dataclass
class ReconstructionResult:
    """Metrics of one SAE on one eval selection; ``feature_frequency`` is kept for plots and files."""

    subsets: dict[str, dict[str, Any]]
    feature_frequency: np.ndarray  # (d_sae,) share of eval tokens on which each feature fires
    dead_fraction: float
    dense_fraction: float
    dead_threshold: float
    dense_threshold: float
    n_tokens: int
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        freq = self.feature_frequency
        logf = np.log10(np.clip(freq[freq > 0], 1e-12, None))
        hist, edges = np.histogram(logf, bins=30, range=(-8.0, 0.0)) if len(logf) else (np.zeros(30, int), np.linspace(-8, 0, 31))
        return {
            "subsets": self.subsets,
            "n_tokens": self.n_tokens,
            "dead_fraction": self.dead_fraction,
            "dense_fraction": self.dense_fraction,
            "dead_threshold": self.dead_threshold,
            "dense_threshold": self.dense_threshold,
            "n_dead": int((freq <= self.dead_threshold).sum()),
            "n_dense": int((freq > self.dense_threshold).sum()),
            "density_histogram": {"log10_frequency_edges": [float(e) for e in edges],
                                  "counts": [int(c) for c in hist], "n_never_fired": int((freq == 0).sum())},
            **self.extra,
        }


@dataclass
class BatchView:
    """What every SAE of a pass shares about one batch: subset masks and the activations' own sums."""

    x: torch.Tensor  # (b, d_model) float32, on the compute device
    seq_local: np.ndarray  # (b,) index of each token's sequence among the selected ones
    masks: dict[str, np.ndarray]  # subset -> (b,) bool, only subsets present in the batch
    sum_x: dict[str, np.ndarray]  # subset -> (d_model,) float64
    sum_sq: dict[str, float]  # subset -> Σ‖x‖²

    @classmethod
    def of(cls, x: torch.Tensor, seq_local: np.ndarray, roles: np.ndarray) -> BatchView:
        xd = x.double()
        sq = (xd ** 2).sum(-1).cpu().numpy()
        x_np = xd.cpu().numpy()
        masks, sum_x, sum_sq = {}, {}, {}
        for name, codes in SUBSETS.items():
            m = np.ones(len(sq), dtype=bool) if codes is None else np.isin(roles, codes)
            if m.any():
                masks[name], sum_x[name], sum_sq[name] = m, x_np[m].sum(0), float(sq[m].sum())
        return cls(x=x, seq_local=seq_local, masks=masks, sum_x=sum_x, sum_sq=sum_sq)


class ReconstructionAccumulator:
    """Streams batches of (activations, reconstruction, features) into the metric sums of one SAE."""

    def __init__(self, d_model: int, d_sae: int, n_sequences: int) -> None:
        self.d_model = d_model
        self.n_sequences = n_sequences
        self.sums = {name: _SubsetSums(np.zeros(n_sequences), np.zeros(n_sequences, dtype=np.int64),
                                       np.zeros(d_model)) for name in SUBSETS}
        self.fire_count = np.zeros(d_sae, dtype=np.int64)
        self.n_tokens = 0
        self.non_finite_outputs = 0  # tokens whose reconstruction or features are NaN/Inf

    def update(self, batch: BatchView, x_hat: torch.Tensor, f: torch.Tensor) -> None:
        """Add one batch scored by this SAE (``x_hat`` its reconstruction, ``f`` its feature activations)."""
        err = ((batch.x.double() - x_hat.double()) ** 2).sum(-1).cpu().numpy()
        self.non_finite_outputs += int((~(torch.isfinite(x_hat).all(-1) & torch.isfinite(f).all(-1))).sum())
        active = f > 0
        l0 = active.sum(-1).cpu().numpy()
        self.fire_count += active.sum(0).cpu().numpy().astype(np.int64)
        self.n_tokens += len(err)
        for name, m in batch.masks.items():
            s = self.sums[name]
            s.seq_err += np.bincount(batch.seq_local[m], weights=err[m], minlength=self.n_sequences)
            s.seq_count += np.bincount(batch.seq_local[m], minlength=self.n_sequences)
            s.sum_x += batch.sum_x[name]
            s.sum_sq += batch.sum_sq[name]
            s.sum_err += float(err[m].sum())
            s.l0_sum += float(l0[m].sum())
            s.n += int(m.sum())

    def result(self, cfg: ReconstructionConfig) -> ReconstructionResult:
        freq = self.fire_count / max(self.n_tokens, 1)
        return ReconstructionResult(
            subsets={name: s.result(self.d_model) for name, s in self.sums.items()},
            feature_frequency=freq,
            dead_fraction=float((freq <= cfg.dead_threshold).mean()),
            dense_fraction=float((freq > cfg.dense_threshold).mean()),
            dead_threshold=cfg.dead_threshold, dense_threshold=cfg.dense_threshold, n_tokens=self.n_tokens)


@torch.no_grad()
def evaluate_reconstruction(saes: dict[str, LoadedSAE], cache: ActivationCache, layer: int,
                            selection: EvalSelection, cfg: ReconstructionConfig | None = None
                            ) -> dict[str, ReconstructionResult]:
    """One streamed pass over ``selection`` of ``layer``, scoring every SAE in ``saes`` on it."""
    cfg = cfg or ReconstructionConfig()
    starts = selection.seq_starts
    local_of = np.full(len(starts) - 1, -1, dtype=np.int64)
    local_of[selection.sequences] = np.arange(len(selection.sequences))
    roles_all = cache.roles()
    accs = {name: ReconstructionAccumulator(cache.d_model, sae.d_sae, len(selection.sequences))
            for name, sae in saes.items()}
    bar = tqdm(total=selection.n_tokens, unit="tok", desc=f"reconstruction layer {layer} ({len(saes)} SAEs)",
               disable=not cfg.progress, leave=False)
    bad_x = 0
    for a, b in selection.token_runs():
        for lo in range(a, b, cfg.batch_tokens):
            hi = min(lo + cfg.batch_tokens, b)
            x = torch.from_numpy(np.asarray(cache.read(layer, lo, hi), dtype=np.float32)).to(cfg.device)
            bad_x += int((~torch.isfinite(x).all(-1)).sum())
            seq_local = local_of[np.searchsorted(starts, np.arange(lo, hi), side="right") - 1]
            batch = BatchView.of(x, seq_local, roles_all[lo:hi])
            for name, sae in saes.items():
                f = sae.encode(x)
                accs[name].update(batch, sae.decode(f), f)
            bar.update(hi - lo)
    bar.close()
    results = {name: acc.result(cfg) for name, acc in accs.items()}
    for name, res in results.items():
        weights = [k for k, p in saes[name].named_parameters() if not bool(torch.isfinite(p).all())]
        res.extra["non_finite"] = {"weights": weights, "activation_tokens": bad_x,
                                   "output_tokens": accs[name].non_finite_outputs}
    return results
