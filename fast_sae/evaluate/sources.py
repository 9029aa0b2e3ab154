"""Which SAEs to evaluate, checked against which cache, on which sequences.

Why this is its own module: the paper's main comparison evaluates SAEs trained under different
regimes (FAST, BT(F), BT(P)) on the *same* held-out chat tokens. Picking those tokens is where
evaluations silently go wrong (scoring an SAE on its own training data, or each SAE on different
tokens), so the rule lives in one place:

- An SAE's cfg.json may record the held-out sequences of its training cache (written by the train
  stage). When the evaluation cache is (or may be) that training cache, only held-out sequences
  may be used; with several such SAEs the *intersection* of their held-out sets is used, so every
  SAE is scored on the same tokens and none on its training data.
- Whether a cache is an SAE's training cache is decided from the cache identity the cfg records
  (path, dataset fingerprint, token count) when present; without it, a cache whose regime matches
  the SAE's is assumed to be its training cache (holding out too much is safe, too little is not).
- Otherwise (e.g. BT(P) SAEs on a FAST chat cache) every sequence of the cache may be used.
Then at most ``max_tokens`` tokens are taken, whole sequences in stream order.

An SAE is scored only on a cache of the model it was trained on (``model_name``), compared without
the hub organisation and case. Two ids that name the same weights can be declared so
(``--model-alias SAE_MODEL=CACHE_MODEL``, either way round); the embedded model and its hub id
``HuggingFaceTB/SmolLM2-135M-Instruct`` are one built in. Either is a warning naming both ids, never
silent: the embedded model is the hub model de-quantised from Q4_1, close but not identical.

``--sae`` values: checkpoint folders (this project's or SAELens', 6.x or pre-6.0 layout), run folders
holding them, or ``sae_lens:RELEASE:SAE_ID``, a pretrained SAE loaded with SAELens' own
``SAE.from_pretrained`` (needs sae-lens and the hub) and kept as a checkpoint folder under
``$FAST_SAE_HOME/sae_lens/`` so every later step can reopen it like any other.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fast_sae.actcache import ActivationCache
from fast_sae.saeio import SAE_CFG, CheckpointConfig, LoadedSAE, load_sae, save_sae
from fast_sae.saeio.sae_lens import is_spec, load_pretrained, parse_spec

from .errors import EvalError


@dataclass
class SAEEntry:
    """One checkpoint to evaluate, loaded, with the cfg facts the report groups by."""

    name: str
    path: Path  # the checkpoint folder (for a sae_lens: spec, the converted copy)
    sae: LoadedSAE
    source: str = ""  # what --sae named, when not the folder itself (a sae_lens: spec)

    @property
    def cfg(self) -> CheckpointConfig:
        return self.sae.cfg

    @property
    def cfg_file(self) -> str:
        """Where the cfg came from, for error messages."""
        return self.source or str(self.path / SAE_CFG)

    @property
    def layer(self) -> int:
        return self.cfg.layer

    @property
    def architecture(self) -> str:
        return self.cfg.architecture

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def regime(self) -> str:
        """The regime the SAE was trained under (fast, bt-f, bt-p), or 'unknown'."""
        return self.cfg.regime

    @property
    def model_name(self) -> str | None:
        return self.cfg.model_name

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.source or str(self.path), "architecture": self.architecture,
                "d_in": self.d_in, "d_sae": self.d_sae, "expansion": self.d_sae / self.d_in, "layer": self.layer,
                "hook_name": self.cfg.hook_name, "regime": self.regime, "model_name": self.model_name,
                "k": self.cfg.k}


def _is_checkpoint(folder: Path) -> bool:
    return (folder / SAE_CFG).is_file() and ".tmp-" not in folder.name and ".old-" not in folder.name


def discover_sae_folders(paths: list[str | Path]) -> list[Path]:
    """Checkpoint folders named directly, or the direct subfolders of a run folder that hold cfg.json."""
    found: list[Path] = []
    for raw in paths:
        if is_spec(str(raw)):
            continue  # loaded by load_entries, not found on disk
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


def sae_lens_store() -> Path:
    """Where pretrained SAELens SAEs are kept as checkpoint folders ($FAST_SAE_HOME/sae_lens)."""
    from fast_sae.lm import home

    return home() / "sae_lens"


def load_sae_lens_spec(spec: str, device: str = "cpu", store: Path | None = None) -> SAEEntry:
    """``sae_lens:RELEASE:SAE_ID`` through SAELens, saved as a checkpoint folder under ``store``."""
    release, sae_id = parse_spec(spec)
    sae = load_pretrained(spec)
    folder = (store or sae_lens_store()) / _safe_name(release) / _safe_name(sae_id)
    save_sae(folder, sae.weights(), sae.cfg)
    return SAEEntry(name=f"{release}:{sae_id}", path=folder, sae=sae.to(device), source=spec)


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text).strip(".") or "_"


def load_entries(paths: list[str | Path], device: str = "cpu", sae_lens_dir: Path | None = None) -> list[SAEEntry]:
    """Load every checkpoint found under ``paths`` (and every sae_lens: spec); errors pass through as one line."""
    folders = discover_sae_folders(paths)
    names = dict(zip(folders, _unique_names(folders)))
    entries: list[SAEEntry] = []
    for raw in paths:  # in the order given
        if is_spec(str(raw)):
            entries.append(load_sae_lens_spec(str(raw), device, sae_lens_dir))
            continue
        for folder in discover_sae_folders([raw]):
            folder = next(f for f in folders if f.resolve() == folder.resolve())
            if folder in names:
                entries.append(SAEEntry(name=names.pop(folder), path=folder, sae=load_sae(folder, device=device)))
    return entries


def _model_key(name: str) -> str:
    """SAELens releases name models without the hub organisation (``gemma-2-2b`` for ``google/gemma-2-2b``)."""
    return name.rsplit("/", 1)[-1].lower()


def parse_aliases(text: str) -> list[tuple[str, str]]:
    """'SAE_MODEL=CACHE_MODEL,...' -> [(SAE_MODEL, CACHE_MODEL), ...], for the --model-alias option."""
    pairs = []
    for part in (p.strip() for p in text.split(",")):
        if not part:  # empty items are skipped, as in every list option
            continue
        a, sep, b = part.partition("=")
        if not sep or not a.strip() or not b.strip():
            raise EvalError(f"--model-alias {text!r}: expected SAE_MODEL=CACHE_MODEL (comma-separated for several), "
                            f"e.g. HuggingFaceTB/SmolLM2-135M-Instruct=my-org/smollm2-copy")
        pairs.append((a.strip(), b.strip()))
    return pairs


def model_alias(sae_model: str, cache_model: str, aliases: Sequence[tuple[str, str]] = ()) -> str | None:
    """Why two different model ids are the same weights (the built-in alias, or a --model-alias pair
    either way round), or None when nothing says so."""
    from fast_sae.lm.embedded import EMBEDDED_HUB_ID, EMBEDDED_MODEL

    pair = {_model_key(sae_model), _model_key(cache_model)}
    if pair == {_model_key(EMBEDDED_HUB_ID), _model_key(EMBEDDED_MODEL)}:
        return (f"{EMBEDDED_MODEL!r} is {EMBEDDED_HUB_ID!r} de-quantised from GGUF Q4_1 (a built-in alias): the same "
                f"model up to 4-bit rounding of its weights, so activations and scores differ slightly from the hub "
                f"model's")
    for a, b in aliases:
        if {_model_key(a), _model_key(b)} == pair:
            return f"the same weights by --model-alias {a}={b}"
    return None


def check_against_cache(entry: SAEEntry, cache: ActivationCache, model_id: str | None = None,
                        aliases: Sequence[tuple[str, str]] = ()) -> str | None:
    """Refuse an SAE whose layer, width or model does not fit the cache (one line naming both); an SAE
    of another model id declared the same weights gets a warning line back (None otherwise)."""
    where = entry.cfg_file
    if entry.layer not in cache.layers:
        raise EvalError(f"{where}: hook_layer {entry.layer} not in cache {cache.path} (layers {cache.layers}; the "
                        f"layer of field 'hook_name' {entry.cfg.hook_name!r})")
    if entry.d_in != cache.d_model:
        raise EvalError(f"{where}: field 'd_in' {entry.d_in} does not match d_model {cache.d_model} of cache "
                        f"{cache.path}")
    expected = model_id or cache.meta.model_id
    if entry.model_name and expected and _model_key(entry.model_name) != _model_key(expected):
        why = model_alias(entry.model_name, expected, aliases)
        if why is None:
            raise EvalError(f"{where}: trained on model {entry.model_name!r} (field 'model_name') but cache "
                            f"{cache.path} holds {expected!r}; if they are the same weights, say so with "
                            f"--model-alias {entry.model_name}={expected}")
        return f"SAEs trained on model {entry.model_name!r} scored on cache {cache.path} of model {expected!r}: {why}"
    return None


def trained_on(entry: SAEEntry, cache: ActivationCache) -> bool:
    """Whether ``cache`` is (or must be assumed to be) the cache the SAE was trained on.

    A recorded cache path equal to this cache decides yes. Otherwise a recorded dataset fingerprint
    decides, together with the regime and token count: FAST and BT(F) caches of the same chat data
    share a dataset fingerprint but not their sequences. Without either, a matching regime means yes.
    """
    training = entry.cfg.training
    recorded = training.cache if training else None
    if recorded is not None and recorded.path:
        try:
            if Path(recorded.path).resolve() == cache.path.resolve():
                return True
        except OSError:
            pass
    if recorded is not None and recorded.dataset_fingerprint and cache.meta.dataset_fingerprint:
        n_tokens = recorded.n_tokens if recorded.n_tokens is not None else cache.n_tokens
        return (recorded.dataset_fingerprint == cache.meta.dataset_fingerprint
                and entry.regime in ("unknown", cache.meta.regime) and n_tokens == cache.n_tokens)
    if recorded is not None and recorded.path:
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

    def token_index(self) -> np.ndarray:
        """The cache indices of the selected tokens, in stream order."""
        runs = self.token_runs()
        return np.concatenate([np.arange(a, b) for a, b in runs]) if runs else np.zeros(0, np.int64)

    def describe(self) -> dict[str, Any]:
        return {"n_sequences": int(len(self.sequences)), "n_tokens": self.n_tokens, "note": self.note,
                "first_sequence": int(self.sequences[0]), "last_sequence": int(self.sequences[-1]),
                "warnings": list(self.warnings)}


def parse_range(text: str) -> tuple[int, ...]:
    """'START:STOP' or 'START:STOP:STEP' -> (START, STOP[, STEP]), for the --eval-range option (a step
    spreads the sequences over the cache, e.g. a sample of a training cache sorted by topic)."""
    try:
        parts = tuple(int(p) for p in text.split(":"))
    except ValueError:
        parts = ()
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] < 1):
        raise EvalError(f"--eval-range {text!r}: expected START:STOP or START:STOP:STEP (sequence indices, "
                        f"STEP >= 1)")
    return parts


def choose_eval_sequences(entries: list[SAEEntry], cache: ActivationCache, *,
                          explicit: tuple[int, ...] | None = None, max_tokens: int | None = None) -> EvalSelection:
    """The common eval sequences of ``cache`` for ``entries`` (see the module docstring for the rule)."""
    starts = cache.seq_starts()
    n_seq = len(starts) - 1
    mask = np.ones(n_seq, dtype=bool)
    warnings: list[str] = []
    if explicit is not None:
        a, b, step = (*explicit, 1)[:3]
        if not 0 <= a < b <= n_seq:
            raise EvalError(f"--eval-range {a}:{b} outside the cache's {n_seq} sequences")
        mask[:] = False
        mask[a:b:step] = True
        note = f"sequences {a}:{b}" + (f":{step}" if step > 1 else "") + " as given"
    else:
        held = []
        for e in entries:
            if not trained_on(e, cache):
                continue
            ranges = [(a, b) for a, b in e.cfg.eval_sequence_ranges or [] if b > a]
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
