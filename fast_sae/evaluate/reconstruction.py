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
  tokens (not per batch, not zero: docs/method.md §5). Σ‖y−μ‖² = Σ‖y‖² − n‖μ‖², exact in float64.
- ``l0``: mean number of active features (f > 0) per token.
- feature frequencies over all eval tokens: a feature is *dead* if it fires on at most
  ``dead_threshold`` of the tokens (default 0: never), *dense* if on more than ``dense_threshold``
  (default 0.1, i.e. >10% of tokens).
Subsets: all tokens, special (BOS/template special/template/separator — the paper's special-token
positions as cache_layout.md defines them), its halves special_tokens (tokenizer special tokens)
and template (role names, newlines, default system prompt), content, and each content role.
Several SAEs of one layer share a single pass over the cache, read in batches so memory stays flat
whatever the cache size.

Token filters (docs/metrics.md): every subset is also scored without outlier tokens, because on
chat models one token can carry ~all of Σ‖x‖² (the attention sink at position 0: ‖x‖ ~ 25,000
against a median of ~175 on the embedded model) and the tokens every eval sequence shares (the
template's default system prompt) have the same activation in every sequence:
- ``all_tokens`` (``subsets``): as is;
- ``no_pos0`` (``subsets_no_pos0``): without position 0 of each sequence;
- ``no_prefix`` (``subsets_no_prefix``, the headline ★): without the longest token prefix common to
  the eval documents, at each document start (token_filters.py: in FAST the prefix every eval
  sequence shares, in BT(F) blocks the template prefix of each conversation inside them), and
  always without position 0 (a sink whether or not its token is shared).
Per subset, ``n_norm_outliers`` counts tokens with ‖x‖ > 10× the median norm of all eval tokens.
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
from .token_filters import TOKEN_FILTERS, TokenFilters

FILTER_KEYS = {"all_tokens": "subsets", "no_pos0": "subsets_no_pos0", "no_prefix": "subsets_no_prefix"}
OUTLIER_FACTOR = 10.0

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
    the SAE's weights or its output) or unusual (an MSE of exactly 0, whose log2 is −inf), for
    report.json/report.md and stderr."""
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
    exact = [k for k, v in result.subsets.items() if v.get("mse") == 0.0]
    if exact:
        out.append(f"{label}: MSE is exactly 0 on subset(s) {', '.join(exact)} (an exact reconstruction, e.g. an "
                   f"SAE that can copy its input); log2 MSE is reported as -inf there, which is not a number to "
                   f"average or compare on a frontier")
    return out


@dataclass
class ReconstructionResult:
    """Metrics of one SAE on one eval selection; ``feature_frequency`` is kept for plots and files."""

    subsets: dict[str, dict[str, Any]]  # all tokens
    feature_frequency: np.ndarray  # (d_sae,) share of eval tokens on which each feature fires
    dead_fraction: float
    dense_fraction: float
    dead_threshold: float
    dense_threshold: float
    n_tokens: int
    filtered: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # no_pos0 / no_prefix -> subsets
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        freq = self.feature_frequency
        logf = np.log10(np.clip(freq[freq > 0], 1e-12, None))
        hist, edges = np.histogram(logf, bins=30, range=(-8.0, 0.0)) if len(logf) else \
            (np.zeros(30, int), np.linspace(-8, 0, 31))
        return {
            "subsets": self.subsets,
            **{FILTER_KEYS[name]: subsets for name, subsets in self.filtered.items()},
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
class TokenView:
    """The selected eval tokens, in pass order: sequence, role and which token filters keep each one."""

    seq_local: np.ndarray  # (n,) index of each token's sequence among the selected ones
    roles: np.ndarray  # (n,)
    keep: dict[str, np.ndarray]  # token filter -> (n,) bool
    filters: TokenFilters  # the rule (token_filters.py)

    @property
    def prefix_length(self) -> int:
        return self.filters.prefix_length

    @classmethod
    def of(cls, cache: ActivationCache, selection: EvalSelection) -> TokenView:
        index = selection.token_index()
        starts = selection.seq_starts
        local_of = np.full(len(starts) - 1, -1, dtype=np.int64)
        local_of[selection.sequences] = np.arange(len(selection.sequences))
        seq_global = np.searchsorted(starts, index, side="right") - 1
        filters = TokenFilters.of(cache, selection)
        return cls(seq_local=local_of[seq_global], roles=cache.roles()[index], keep=filters.keep(index),
                   filters=filters)

    def describe(self) -> dict[str, Any]:
        return self.filters.describe({name: int((~m).sum()) for name, m in self.keep.items()})


@dataclass
class BatchView:
    """What every SAE of a pass shares about one batch: subset masks and the activations' own sums,
    keyed by (token filter, subset)."""

    x: torch.Tensor  # (b, d_model) float32, on the compute device
    seq_local: np.ndarray  # (b,) index of each token's sequence among the selected ones
    masks: dict[tuple[str, str], np.ndarray]  # only subsets present in the batch
    sum_x: dict[tuple[str, str], np.ndarray]  # (d_model,) float64
    sum_sq: dict[tuple[str, str], float]  # Σ‖x‖²
    sq_norm: np.ndarray  # (b,) ‖x‖² per token

    @classmethod
    def of(cls, x: torch.Tensor, seq_local: np.ndarray, roles: np.ndarray,
           keep: dict[str, np.ndarray] | None = None) -> BatchView:
        xd = x.double()
        sq = (xd ** 2).sum(-1).cpu().numpy()
        x_np = xd.cpu().numpy()
        keep = keep if keep is not None else {"all_tokens": np.ones(len(sq), bool)}
        masks, sum_x, sum_sq = {}, {}, {}
        for name, codes in SUBSETS.items():
            role_mask = np.ones(len(sq), dtype=bool) if codes is None else np.isin(roles, codes)
            for filt, kept in keep.items():
                m = role_mask & kept
                if m.any():
                    key = (filt, name)
                    masks[key], sum_x[key], sum_sq[key] = m, x_np[m].sum(0), float(sq[m].sum())
        return cls(x=x, seq_local=seq_local, masks=masks, sum_x=sum_x, sum_sq=sum_sq, sq_norm=sq)


class ReconstructionAccumulator:
    """Streams batches of (activations, reconstruction, features) into the metric sums of one SAE."""

    def __init__(self, d_model: int, d_sae: int, n_sequences: int,
                 filters: tuple[str, ...] = ("all_tokens",)) -> None:
        self.d_model = d_model
        self.n_sequences = n_sequences
        self.filters = filters
        self.sums = {(filt, name): _SubsetSums(np.zeros(n_sequences), np.zeros(n_sequences, dtype=np.int64),
                                               np.zeros(d_model)) for filt in filters for name in SUBSETS}
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
        for key, m in batch.masks.items():
            s = self.sums.get(key)
            if s is None:  # a filter this accumulator does not track
                continue
            s.seq_err += np.bincount(batch.seq_local[m], weights=err[m], minlength=self.n_sequences)
            s.seq_count += np.bincount(batch.seq_local[m], minlength=self.n_sequences)
            s.sum_x += batch.sum_x[key]
            s.sum_sq += batch.sum_sq[key]
            s.sum_err += float(err[m].sum())
            s.l0_sum += float(l0[m].sum())
            s.n += int(m.sum())

    def result(self, cfg: ReconstructionConfig) -> ReconstructionResult:
        freq = self.fire_count / max(self.n_tokens, 1)
        by_filter = {filt: {name: self.sums[(filt, name)].result(self.d_model) for name in SUBSETS}
                     for filt in self.filters}
        return ReconstructionResult(
            subsets=by_filter["all_tokens"], filtered={f: v for f, v in by_filter.items() if f != "all_tokens"},
            feature_frequency=freq,
            dead_fraction=float((freq <= cfg.dead_threshold).mean()),
            dense_fraction=float((freq > cfg.dense_threshold).mean()),
            dead_threshold=cfg.dead_threshold, dense_threshold=cfg.dense_threshold, n_tokens=self.n_tokens)


def norm_outliers(sq_norm: np.ndarray, view: TokenView) -> tuple[dict[str, Any], dict[tuple[str, str], int]]:
    """Tokens with ‖x‖ > 10× the median norm of all eval tokens, counted per (filter, subset)."""
    norms = np.sqrt(sq_norm)
    median = float(np.median(norms)) if len(norms) else 0.0
    outlier = norms > OUTLIER_FACTOR * median
    counts = {}
    for name, codes in SUBSETS.items():
        role_mask = np.ones(len(norms), dtype=bool) if codes is None else np.isin(view.roles, codes)
        for filt, kept in view.keep.items():
            counts[(filt, name)] = int((outlier & role_mask & kept).sum())
    info = {"median_norm": median, "threshold_norm": OUTLIER_FACTOR * median, "factor": OUTLIER_FACTOR,
            "max_norm": float(norms.max()) if len(norms) else 0.0}
    return info, counts


@torch.no_grad()
def evaluate_reconstruction(saes: dict[str, LoadedSAE], cache: ActivationCache, layer: int,
                            selection: EvalSelection, cfg: ReconstructionConfig | None = None
                            ) -> dict[str, ReconstructionResult]:
    """One streamed pass over ``selection`` of ``layer``, scoring every SAE in ``saes`` on it, on every
    token filter (module docstring)."""
    cfg = cfg or ReconstructionConfig()
    view = TokenView.of(cache, selection)
    accs = {name: ReconstructionAccumulator(cache.d_model, sae.d_sae, len(selection.sequences), TOKEN_FILTERS)
            for name, sae in saes.items()}
    sq_norm = np.zeros(len(view.roles))
    bar = tqdm(total=selection.n_tokens, unit="tok", desc=f"reconstruction layer {layer} ({len(saes)} SAEs)",
               disable=not cfg.progress, leave=False)
    done = 0
    bad_x = 0
    for a, b in selection.token_runs():
        for lo in range(a, b, cfg.batch_tokens):
            hi = min(lo + cfg.batch_tokens, b)
            x = torch.from_numpy(np.asarray(cache.read(layer, lo, hi), dtype=np.float32)).to(cfg.device)
            bad_x += int((~torch.isfinite(x).all(-1)).sum())
            at = slice(done, done + hi - lo)
            batch = BatchView.of(x, view.seq_local[at], view.roles[at], {f: m[at] for f, m in view.keep.items()})
            sq_norm[at] = batch.sq_norm
            for name, sae in saes.items():
                f = sae.encode(x)
                accs[name].update(batch, sae.decode(f), f)
            done += hi - lo
            bar.update(hi - lo)
    bar.close()
    info, counts = norm_outliers(sq_norm, view)
    results = {name: acc.result(cfg) for name, acc in accs.items()}
    for name, res in results.items():
        for filt in TOKEN_FILTERS:
            subsets = res.subsets if filt == "all_tokens" else res.filtered[filt]
            for sub, metrics in subsets.items():
                metrics["n_norm_outliers"] = counts[(filt, sub)]
        res.extra["token_filters"] = view.describe() | {"norm_outliers": info}
        weights = [k for k, p in saes[name].named_parameters() if not bool(torch.isfinite(p).all())]
        res.extra["non_finite"] = {"weights": weights, "activation_tokens": bad_x,
                                   "output_tokens": accs[name].non_finite_outputs}
    return results
