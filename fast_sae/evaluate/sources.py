"""Which SAEs to evaluate, checked against which cache, on which sequences.

Why this is its own module: the paper's main comparison evaluates SAEs trained under different
regimes (FAST, BT(F), BT(P)) on the *same* held-out chat tokens. Picking those tokens is where
evaluations silently go wrong (scoring an SAE on its own training data, or each SAE on different
tokens), so the rule lives in one place:

- An SAE's cfg may carry the held-out sequences of its training cache (``eval_sequences``, written
  by the train stage). When the evaluation cache is (or may be) that training cache, only held-out
  sequences may be used; with several such SAEs the *intersection* of their held-out sets is used,
  so every SAE is scored on the same tokens and none on its training data.
- Whether a cache is an SAE's training cache is decided from identity fields in the cfg (a cache
  fingerprint or path) when present; without them, a cache whose regime and model match the SAE's
  is assumed to be its training cache (holding out too much is safe, too little is not).
- Otherwise (e.g. BT(P) SAEs on a FAST chat cache) every sequence of the cache may be used.
Then at most ``max_tokens`` tokens are taken, whole sequences in stream order.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fast_sae.actcache import ActivationCache
from fast_sae.saeio import SAE_CFG, LoadedSAE, load_sae

from .errors import EvalError

# cfg fields the train stage may use; the first present wins.
HELD_OUT_KEYS = ("eval_sequence_range", "eval_sequences", "held_out_sequences")  # train writes the first
REGIME_KEYS = ("regime", "training_regime", "cache_regime")
FINGERPRINT_KEYS = ("cache_fingerprint", "dataset_fingerprint")
CACHE_PATH_KEYS = ("cache_path", "cache", "activation_cache", "train_cache")


@dataclass
class SAEEntry:
    """One checkpoint to evaluate, loaded, with the cfg facts the report groups by."""

    name: str
    path: Path
    sae: LoadedSAE
    cfg: dict[str, Any]

    @property
    def layer(self) -> int:
        return int(self.cfg["hook_layer"])

    @property
    def architecture(self) -> str:
        return str(self.cfg["architecture"])

    @property
    def d_in(self) -> int:
        return int(self.cfg["d_in"])

    @property
    def d_sae(self) -> int:
        return int(self.cfg["d_sae"])

    @property
    def regime(self) -> str:
        """The regime the SAE was trained under (fast, bt-f, bt-p), or 'unknown'."""
        for key in REGIME_KEYS:
            if self.cfg.get(key):
                return str(self.cfg[key])
        return "unknown"

    @property
    def model_name(self) -> str | None:
        return self.cfg.get("model_name")

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "architecture": self.architecture, "d_in": self.d_in,
                "d_sae": self.d_sae, "expansion": self.d_sae / self.d_in, "layer": self.layer,
                "hook_name": self.cfg.get("hook_name"), "regime": self.regime, "model_name": self.model_name,
                "k": self.cfg.get("k")}


def _is_checkpoint(folder: Path) -> bool:
    return (folder / SAE_CFG).is_file() and ".tmp-" not in folder.name and ".old-" not in folder.name


def discover_sae_folders(paths: list[str | Path]) -> list[Path]:
    """Checkpoint folders named directly, or the direct subfolders of a run folder that hold cfg.json."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise EvalError(f"{path}: no such SAE checkpoint or run folder")
        if not path.is_dir():
            raise EvalError(f"{path}: not a folder; pass an SAE checkpoint folder or a run folder")
        if _is_checkpoint(path):
            found.append(path)
            continue
        subs = sorted(p for p in path.iterdir() if p.is_dir() and _is_checkpoint(p))
        if not subs:
            raise EvalError(f"{path}: neither an SAE checkpoint ({SAE_CFG} missing) nor a run folder with "
                            f"checkpoint subfolders")
        found.extend(subs)
    unique: list[Path] = []
    for p in found:
        if p.resolve() not in {u.resolve() for u in unique}:
            unique.append(p)
    return unique


def _unique_names(folders: list[Path]) -> list[str]:
    names = [f.name for f in folders]
    if len(set(names)) == len(names):
        return names
    return [f"{f.parent.name}/{f.name}" if names.count(f.name) > 1 else f.name for f in folders]


def load_entries(paths: list[str | Path], device: str = "cpu") -> list[SAEEntry]:
    """Load every checkpoint found under ``paths``; checkpoint errors pass through as one line."""
    folders = discover_sae_folders(paths)
    entries = []
    for name, folder in zip(_unique_names(folders), folders):
        sae = load_sae(folder, device=device)
        entries.append(SAEEntry(name=name, path=folder, sae=sae, cfg=sae.cfg))
    return entries


def check_against_cache(entry: SAEEntry, cache: ActivationCache, model_id: str | None = None) -> None:
    """Refuse an SAE whose layer, width or model does not fit the cache (one line naming both)."""
    if entry.layer not in cache.layers:
        raise EvalError(f"{entry.path}: hook_layer {entry.layer} not in cache {cache.path} (layers {cache.layers})")
    if entry.d_in != cache.d_model:
        raise EvalError(f"{entry.path}: d_in {entry.d_in} does not match d_model {cache.d_model} of cache {cache.path}")
    expected = model_id or cache.meta.model_id
    if entry.model_name and expected and entry.model_name != expected:
        raise EvalError(f"{entry.path}: trained on model {entry.model_name!r} but cache {cache.path} holds "
                        f"{expected!r}")


def held_out_ranges(cfg: dict[str, Any]) -> list[tuple[int, int]] | None:
    """The held-out sequence ranges [start, stop) recorded in a cfg, or None.

    Accepted shapes: [start, stop]; {"start": a, "stop": b}; a list of either. The first field of
    ``HELD_OUT_KEYS`` present wins (train writes ``eval_sequence_range``); a bare count under
    another name (train's ``eval_sequences`` option) is not a range and is skipped.
    """
    key = next((k for k in HELD_OUT_KEYS if cfg.get(k) is not None and not isinstance(cfg[k], (int, float))), None)
    if key is None:
        return None
    value = cfg[key]

    def is_pair(v: Any) -> bool:
        return isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, int) for x in v)

    def one(v: Any) -> tuple[int, int]:
        if isinstance(v, dict) and "start" in v and "stop" in v:
            return int(v["start"]), int(v["stop"])
        if is_pair(v):
            return int(v[0]), int(v[1])
        raise EvalError(f"cfg field {key}: cannot read {v!r} as a [start, stop) sequence range")

    if isinstance(value, dict) or is_pair(value):
        return [one(value)]
    if isinstance(value, (list, tuple)):
        return [one(v) for v in value]
    raise EvalError(f"cfg field {key}: cannot read {value!r} as sequence ranges")


def trained_on(entry: SAEEntry, cache: ActivationCache) -> bool:
    """Whether ``cache`` is (or must be assumed to be) the cache the SAE was trained on.

    A recorded cache path equal to this cache decides yes. Otherwise a recorded dataset fingerprint
    decides, together with the regime and token count: FAST and BT(F) caches of the same chat data
    share a dataset fingerprint but not their sequences. Without either, a matching regime means yes.
    """
    cfg = entry.cfg
    for key in CACHE_PATH_KEYS:
        if isinstance(cfg.get(key), str) and cfg[key]:
            try:
                if Path(cfg[key]).resolve() == cache.path.resolve():
                    return True
            except OSError:
                pass
    fingerprint = next((cfg[k] for k in FINGERPRINT_KEYS if cfg.get(k)), None)
    if fingerprint and cache.meta.dataset_fingerprint:
        return (fingerprint == cache.meta.dataset_fingerprint and entry.regime in ("unknown", cache.meta.regime)
                and int(cfg.get("cache_n_tokens", cache.n_tokens)) == cache.n_tokens)
    if any(isinstance(cfg.get(key), str) and cfg[key] for key in CACHE_PATH_KEYS):
        return False  # trained on a cache at another path, and nothing says it is this one
    return entry.regime in ("unknown", cache.meta.regime)


@dataclass
class EvalSelection:
    """The sequences of one cache that an evaluation reads, and why."""

    sequences: np.ndarray  # sorted sequence indices
    seq_starts: np.ndarray  # the cache's sequence offsets (S+1,)
    note: str
    warnings: list[str] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return int((self.seq_starts[self.sequences + 1] - self.seq_starts[self.sequences]).sum())

    def token_runs(self) -> list[tuple[int, int]]:
        """Contiguous [start, stop) token ranges covering the selected sequences, in stream order."""
        runs: list[tuple[int, int]] = []
        for s in self.sequences:
            a, b = int(self.seq_starts[s]), int(self.seq_starts[s + 1])
            if runs and runs[-1][1] == a:
                runs[-1] = (runs[-1][0], b)
            else:
                runs.append((a, b))
        return runs

    def describe(self) -> dict[str, Any]:
        return {"n_sequences": int(len(self.sequences)), "n_tokens": self.n_tokens, "note": self.note,
                "first_sequence": int(self.sequences[0]), "last_sequence": int(self.sequences[-1]),
                "warnings": list(self.warnings)}


def parse_range(text: str) -> tuple[int, int]:
    """'START:STOP' -> (START, STOP), for the --eval-range option."""
    try:
        a, b = text.split(":")
        return int(a), int(b)
    except ValueError:
        raise EvalError(f"--eval-range {text!r}: expected START:STOP (sequence indices)") from None


def choose_eval_sequences(entries: list[SAEEntry], cache: ActivationCache, *,
                          explicit: tuple[int, int] | None = None, max_tokens: int | None = None) -> EvalSelection:
    """The common eval sequences of ``cache`` for ``entries`` (see the module docstring for the rule)."""
    starts = cache.seq_starts()
    n_seq = len(starts) - 1
    mask = np.ones(n_seq, dtype=bool)
    warnings: list[str] = []
    if explicit is not None:
        a, b = explicit
        if not 0 <= a < b <= n_seq:
            raise EvalError(f"--eval-range {a}:{b} outside the cache's {n_seq} sequences")
        mask[:] = False
        mask[a:b] = True
        note = f"sequences {a}:{b} as given"
    else:
        held = []
        for e in entries:
            if not trained_on(e, cache):
                continue
            ranges = [(a, b) for a, b in held_out_ranges(e.cfg) or [] if b > a]
            if not ranges:
                warnings.append(f"{e.name}: may have been trained on {cache.path} and holds out no sequences "
                                f"of it; its metrics may include training tokens")
                continue
            m = np.zeros(n_seq, dtype=bool)
            for a, b in ranges:
                if not 0 <= a < b <= n_seq:
                    raise EvalError(f"{e.path}: held-out sequences {a}:{b} outside the {n_seq} sequences of "
                                    f"{cache.path}; is this the cache it was trained on?")
                m[a:b] = True
            held.append((e.name, m))
        if held:
            for _, m in held:
                mask &= m
            if not mask.any():
                raise EvalError(f"{cache.path}: the held-out sequences of {', '.join(n for n, _ in held)} do not "
                                f"overlap; evaluate them separately or pass --eval-range")
            note = f"held-out sequences common to {len(held)} SAE(s) trained on this cache"
        else:
            note = "all sequences of the cache (no SAE records held-out sequences of it)"
    chosen = np.flatnonzero(mask)
    if max_tokens is not None:
        lengths = starts[chosen + 1] - starts[chosen]
        keep = int(np.searchsorted(np.cumsum(lengths), max_tokens, side="right"))
        chosen = chosen[:max(keep, 1)]
        note += f", capped at {max_tokens} tokens"
    return EvalSelection(sequences=chosen, seq_starts=starts, note=note, warnings=warnings)
