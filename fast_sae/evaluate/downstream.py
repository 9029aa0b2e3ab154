"""Downstream loss: the language model's cross-entropy with an SAE's reconstruction spliced in.

Why: a low MSE can still destroy what the model needs (errors along directions the next layers
read). Splicing x̂ in place of the residual stream after decoder block L (the layer the cache
stores, ``decoder_layers(model)[L]``'s output) and measuring next-token cross-entropy on the
cache's own token sequences answers that directly. Reported per SAE, over every predicted token
of the evaluated sequences (token-weighted means):
- ``clean_loss`` (no intervention), ``spliced_loss`` (x → SAE(x) at every position), ``zero_loss``
  (residual stream zeroed at the layer: the reference for "everything lost");
- ``delta_loss_pct`` = (spliced − clean) / clean · 100 (our reading of the ICML version's "Delta loss");
- ``loss_recovered`` = (zero − spliced) / (zero − clean) (1 = as good as clean, 0 = as bad as zeroing);
- ``kl_spliced`` = mean per token of KL(p_clean ‖ p_spliced), ``kl_zero`` likewise for ablation.
Each sequence is run alone (no padding, no packing), so the model sees exactly what the cache saw.
The same figures are also given per token filter (``filters``, see reconstruction.py): for
``no_pos0`` / ``no_prefix`` the SAE (or zero) replaces the residual only at the kept positions
(the sink / shared prefix keep their clean activation) and the losses average the predictions
made at kept positions; the loss an SAE costs on the tokens it is scored on, not on a sink's
reconstruction that every later token reads.
As a check on layer indexing (docs/method.md §4), the clean pass also captures the layer's output and
compares it to the cached activations of the same tokens (``cache_match_rel_err``).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from fast_sae.actcache import ActivationCache
from fast_sae.lm import block_hidden, decoder_layers, map_block_output
from fast_sae.options import setting
from fast_sae.saeio import LoadedSAE

from .errors import EvalError
from .sources import EvalSelection
from .token_filters import TokenFilters

Replace = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class DownstreamConfig:
    """Whether and on how much chat data the (slow, model-bound) downstream pass runs."""

    enabled: bool = setting(True, flag="downstream", help="Splice each SAE into the model and measure LM loss "
                                                          "(needs the model).")
    max_sequences: int = setting(16, flag="downstream-sequences", help="Sequences of the downstream loss.")
    max_tokens: int = setting(2048, flag="downstream-tokens", help="Token budget of the downstream loss (whole "
                                                                   "sequences; at least one).")
    max_seq_len: int | None = setting(None, flag="downstream-max-len", help="Truncate downstream sequences to this "
                                                                            "length.")
    token_filters: bool = setting(True, flag="downstream-token-filters",
                                  help="Also measure the loss without position 0 and without the shared prefix "
                                       "(3x the forward passes).")
    device: str = setting("cpu", cli=False, help="Set from the evaluation's --device.")
    progress: bool = setting(True, cli=False, help="Set from the evaluation's --progress.")


@contextmanager
def splice(model: Any, layer: int, fn: Replace) -> Iterator[None]:
    """Replace the output of decoder block ``layer`` by ``fn(output)`` while the context is open."""
    handle = decoder_layers(model)[layer].register_forward_hook(lambda _m, _i, out: map_block_output(out, fn))
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def capture(model: Any, layers: list[int], into: dict[int, torch.Tensor]) -> Iterator[None]:
    """Record (not change) the outputs of decoder blocks ``layers`` into ``into``."""
    blocks = decoder_layers(model)
    handles = [blocks[layer].register_forward_hook(
        lambda _m, _i, out, layer=layer: into.__setitem__(layer, block_hidden(out).detach())) for layer in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def sae_replacement(sae: LoadedSAE) -> Replace:
    return lambda h: sae(h.to(sae.W_enc.dtype)).to(h.dtype)


def zero_replacement(h: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(h)


def _log_probs(model: Any, ids: torch.Tensor) -> torch.Tensor:
    """log p(next token) at every position but the last: (L-1, vocab), float32."""
    logits = model(input_ids=ids[None], use_cache=False).logits[0, :-1]
    return F.log_softmax(logits.float(), dim=-1)


@dataclass
class _Sums:
    ce: float = 0.0
    kl: float = 0.0

    def add(self, logp: torch.Tensor, targets: torch.Tensor, clean: torch.Tensor | None,
            rows: torch.Tensor | None = None) -> None:
        """Add the predictions at ``rows`` (a bool mask over positions; all when None)."""
        if rows is not None:
            logp, targets = logp[rows], targets[rows]
            clean = clean[rows] if clean is not None else None
        self.ce += float(-logp.gather(1, targets[:, None]).sum())
        if clean is not None:
            self.kl += float((clean.exp() * (clean - logp)).sum())


@dataclass
class DownstreamResult:
    clean_loss: float
    spliced_loss: float
    zero_loss: float
    kl_spliced: float
    kl_zero: float
    n_tokens: int
    n_sequences: int
    layer: int
    extra: dict[str, Any] = field(default_factory=dict)
    filters: dict[str, DownstreamResult] = field(default_factory=dict)  # no_pos0 / no_prefix

    @property
    def delta_loss_pct(self) -> float:
        return (self.spliced_loss - self.clean_loss) / self.clean_loss * 100.0 if self.clean_loss else float("nan")

    @property
    def loss_recovered(self) -> float:
        gap = self.zero_loss - self.clean_loss
        return (self.zero_loss - self.spliced_loss) / gap if gap != 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {"clean_loss": self.clean_loss, "spliced_loss": self.spliced_loss, "zero_loss": self.zero_loss,
                "delta_loss_pct": self.delta_loss_pct, "loss_recovered": self.loss_recovered,
                "kl_spliced": self.kl_spliced, "kl_zero": self.kl_zero, "n_tokens": self.n_tokens,
                "n_sequences": self.n_sequences, "layer": self.layer, **self.extra,
                **({"filters": {k: v.to_dict() for k, v in self.filters.items()}} if self.filters else {})}


def downstream_sequences(selection: EvalSelection, cfg: DownstreamConfig) -> list[tuple[int, int]]:
    """Token ranges [start, stop) of the sequences the downstream pass runs (a prefix of the selection)."""
    out: list[tuple[int, int]] = []
    total = 0
    for s in selection.sequences[: cfg.max_sequences]:
        a, b = int(selection.seq_starts[s]), int(selection.seq_starts[s + 1])
        if cfg.max_seq_len is not None:
            b = min(b, a + cfg.max_seq_len)
        if b - a < 2:
            continue  # nothing to predict
        if out and total + (b - a) > cfg.max_tokens:
            break
        out.append((a, b))
        total += b - a
    return out


def _masked(fn: Replace, keep: torch.Tensor) -> Replace:
    """``fn`` at the kept positions of a (1, L, d) block output, the clean output elsewhere."""
    return lambda h: torch.where(keep.to(h.device)[None, :, None], fn(h), h)


@dataclass
class _FilterSums:
    """Loss sums of one token filter: clean, zero-ablated per layer, spliced per SAE."""

    clean: _Sums = field(default_factory=_Sums)
    zero: dict[int, _Sums] = field(default_factory=dict)
    spliced: dict[str, _Sums] = field(default_factory=dict)
    n_pred: int = 0
    n_sequences: int = 0


def _filter_masks(a: int, b: int, filters: TokenFilters | None) -> dict[str, torch.Tensor]:
    """The token filters' masks over the sequence [a, b) (token_filters.py); without ``filters`` only
    position 0 is removed."""
    if filters is None:
        pos = torch.arange(b - a)
        return {"all_tokens": torch.ones(b - a, dtype=torch.bool), "no_pos0": pos >= 1, "no_prefix": pos >= 1}
    return {k: torch.from_numpy(v) for k, v in filters.keep_range(a, b).items()}


@torch.no_grad()
def evaluate_downstream(model: Any, saes: dict[str, tuple[LoadedSAE, int]], cache: ActivationCache,
                        selection: EvalSelection, cfg: DownstreamConfig | None = None,
                        filters: TokenFilters | None = None) -> dict[str, DownstreamResult]:
    """Clean, spliced and zero-ablated LM loss of every SAE (``name -> (sae, layer)``) on the cache's tokens,
    on every token filter (``filters``: token_filters.TokenFilters of the eval selection)."""
    cfg = cfg or DownstreamConfig()
    ranges = downstream_sequences(selection, cfg)
    if not ranges:
        raise EvalError(f"{cache.path}: no eval sequence has two tokens; nothing to predict for the downstream loss")
    ids_all = cache.token_ids()
    layers = sorted({layer for _, layer in saes.values()})
    sums = {f: _FilterSums(zero={layer: _Sums() for layer in layers}, spliced={name: _Sums() for name in saes})
            for f in ("all_tokens", "no_pos0", "no_prefix")}
    match_err = {layer: 0.0 for layer in layers}
    bar = tqdm(ranges, unit="seq", desc=f"downstream loss ({len(saes)} SAEs)", disable=not cfg.progress, leave=False)
    for a, b in bar:
        ids = torch.as_tensor(ids_all[a:b].astype(np.int64), device=cfg.device)
        targets = ids[1:]
        captured: dict[int, torch.Tensor] = {}
        with capture(model, layers, captured):
            logp_clean = _log_probs(model, ids)
        for layer in layers:
            cached = torch.from_numpy(np.asarray(cache.read(layer, a, b), dtype=np.float32))
            got = captured[layer][0].float().cpu()
            rel = float((got - cached).norm(dim=-1).max() / cached.norm(dim=-1).max().clamp_min(1e-12))
            match_err[layer] = max(match_err[layer], rel)
        for filt, keep in _filter_masks(a, b, filters).items():
            if filt != "all_tokens" and not cfg.token_filters:
                continue
            rows = keep[:-1].to(logp_clean.device)  # predictions made at kept positions
            if not rows.any():
                continue
            fs = sums[filt]
            full = filt == "all_tokens"  # unmasked hooks: the exact figures of a plain splice
            fs.clean.add(logp_clean, targets, None, rows)
            for layer in layers:
                with splice(model, layer, zero_replacement if full else _masked(zero_replacement, keep)):
                    fs.zero[layer].add(_log_probs(model, ids), targets, logp_clean, rows)
            for name, (sae, layer) in saes.items():
                fn = sae_replacement(sae)
                with splice(model, layer, fn if full else _masked(fn, keep)):
                    fs.spliced[name].add(_log_probs(model, ids), targets, logp_clean, rows)
            fs.n_pred += int(rows.sum())
            fs.n_sequences += 1

    def result(fs: _FilterSums, name: str, layer: int) -> DownstreamResult:
        n = max(fs.n_pred, 1)
        return DownstreamResult(clean_loss=fs.clean.ce / n, spliced_loss=fs.spliced[name].ce / n,
                                zero_loss=fs.zero[layer].ce / n, kl_spliced=fs.spliced[name].kl / n,
                                kl_zero=fs.zero[layer].kl / n, n_tokens=fs.n_pred, n_sequences=fs.n_sequences,
                                layer=layer)

    out = {}
    for name, (_sae, layer) in saes.items():
        res = result(sums["all_tokens"], name, layer)
        res.extra["cache_match_rel_err"] = match_err[layer]
        res.filters = {f: result(sums[f], name, layer) for f in ("no_pos0", "no_prefix") if sums[f].n_pred}
        out[name] = res
    return out
