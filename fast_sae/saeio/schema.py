"""The typed checkpoint configuration: every fact ``cfg.json`` records, as dataclasses.

Why typed and in saeio: train writes these facts and evaluate (and any user) reads them. With a
hand-built dict on one side and string look-ups on the other, names drift and readers grow alias
lists. Here the trainer fills ``CheckpointConfig``, ``layout.py`` is the only code that turns it
into JSON and back, and every reader gets attributes. Facts a checkpoint may not know (an SAE
trained elsewhere) are ``None``, never guessed.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np

from .errors import CheckpointError

Range = tuple[int, int]  # [start, stop)

NORMALIZATION_METHODS = ("content", "all", "none")
_RESID_POST = re.compile(r"blocks\.(0|[1-9][0-9]*)\.hook_resid_post")  # ASCII digits only: no "blocks.٣."


def resid_post_hook(layer: int) -> str:
    """The TransformerLens/SAELens hook name of the output of decoder block ``layer``.

    Activation caches hold exactly these activations (0-indexed blocks), so every checkpoint this
    project can score names one of them.
    """
    return f"blocks.{layer}.hook_resid_post"


def layer_of_hook(hook_name: str) -> int | None:
    """The block index of a ``blocks.L.hook_resid_post`` hook name, or None for any other hook."""
    m = _RESID_POST.fullmatch(hook_name)
    return int(m.group(1)) if m else None


def id_ranges(ids: Any) -> list[Range]:
    """The distinct values of an integer array as sorted, disjoint [start, stop) ranges.

    Why ranges: a run trains on millions of tokens from thousands of documents whose ids are
    mostly consecutive; a few ranges record exactly which documents were seen, in little space.
    """
    u = np.unique(np.asarray(ids, dtype=np.int64))
    if not len(u):
        return []
    breaks = np.flatnonzero(np.diff(u) != 1) + 1
    starts = u[np.concatenate([[0], breaks])]
    stops = u[np.concatenate([breaks - 1, [len(u) - 1]])] + 1
    return [(int(a), int(b)) for a, b in zip(starts.tolist(), stops.tolist())]


@dataclass
class CacheIdentity:
    """Which activation cache: enough to recognise it again (or to tell that another one is not it)."""

    path: str | None = None  # absolute path when the run read it
    model: str | None = None
    regime: str | None = None  # fast | bt-f | bt-p
    n_tokens: int | None = None
    n_sequences: int | None = None
    context_size: int | None = None
    dataset: str | None = None
    dataset_fingerprint: str | None = None  # sha256 of the samples used, in order
    chat_template_hash: str | None = None  # sha256 of the chat template text, where one was used
    # Which documents of the dataset: doc ids are dataset sample indices, so caches of the same
    # dataset (name, split, config) share them, and a held-out set can be checked against any of them.
    dataset_split: str | None = None
    dataset_config: str | None = None
    docs: str | None = None  # all | train | holdout (a seeded random share of the documents held out)
    holdout_fraction: float | None = None
    holdout_seed: int | None = None


@dataclass
class Normalization:
    """How training inputs were scaled: x_train = factor * x_raw, and where the factor came from.

    The factor is folded into the saved weights (``CheckpointConfig.weights_folded``), so it is
    provenance: nothing needs to apply it at inference.
    """

    method: str  # content | all | none: what was applied
    factor: float
    requested: str | None = None  # what the run asked for ('content' falls back to 'all' without content tokens)
    statistic: str | None = None  # the statistic, in words (None for method none)
    layer: int | None = None  # the layer whose statistic was used
    source: CacheIdentity | None = None  # the cache the statistic was read from
    source_token_range: Range | None = None  # its tokens [start, stop) the sample was drawn from
    mean_sq_norm: float | None = None  # the statistic itself, raw units
    n_sampled: int | None = None  # tokens in the seeded sample
    n_used: int | None = None  # of those, the tokens the statistic kept
    excluded_position0: int | None = None  # sinks: position 0 of a sequence
    excluded_outliers: int | None = None  # norm > 10x the sample's median norm
    excluded_roles: int | None = None  # template tokens (method content)


@dataclass
class TrainingData:
    """The tokens an SAE was trained on and the ones held out, in terms of its training cache."""

    cache: CacheIdentity
    train_token_range: Range | None = None  # the training pool: cache tokens [start, stop)
    eval_token_range: Range | None = None  # held-out cache tokens [start, stop)
    eval_sequence_ranges: list[Range] = field(default_factory=list)  # held-out sequences [start, stop)
    # Documents (cache doc ids, i.e. dataset sample indices) as sorted [start, stop) ranges. train_doc_ids
    # covers every token of the training pool: a superset of what a run that used fewer tokens saw.
    train_doc_ids: list[Range] | None = None
    eval_doc_ids: list[Range] | None = None

    @property
    def regime(self) -> str | None:
        return self.cache.regime


@dataclass
class TrainingRun:
    """Hyper-parameters of the run that produced the SAE (None where they do not apply)."""

    trainer: str | None = None
    sae_name: str | None = None
    training_tokens: int | None = None
    train_batch_size_tokens: int | None = None
    lr: float | None = None
    lr_end: float | None = None
    lr_warm_up_steps: int | None = None
    lr_decay_steps: int | None = None
    sparsity_warm_up_steps: int | None = None
    adam_beta1: float | None = None
    adam_beta2: float | None = None
    grad_clip: float | None = None
    seed: int | None = None
    expansion_factor: int | None = None
    data_order: str | None = None
    buffer_tokens: int | None = None
    buffer_tokens_effective: int | None = None
    b_dec_init: str | None = None
    init_encoder_as_decoder_transpose: bool | None = None
    dead_feature_window: int | None = None
    l1_coefficient: float | None = None
    l0_coefficient: float | None = None
    scale_sparsity_penalty_by_decoder_norm: bool | None = None
    normalize_sae_decoder: bool | None = None
    jumprelu_bandwidth: float | None = None
    jumprelu_init_threshold: float | None = None
    aux_k: int | None = None
    aux_k_coefficient: float | None = None
    batchtopk_threshold_lr: float | None = None


@dataclass
class CheckpointConfig:
    """Everything ``cfg.json`` says about one SAE (see checkpoint_format.md for the file layout).

    ``architecture`` is this project's name (``batchtopk`` stays ``batchtopk`` here even though
    the file calls it ``jumprelu`` for SAELens). ``sae_lens_metadata`` keeps SAELens metadata
    fields this schema does not model, verbatim, so a loaded-and-saved checkpoint loses nothing.
    """

    architecture: str
    d_in: int
    d_sae: int
    hook_name: str
    k: int | None = None
    apply_b_dec_to_input: bool = False
    rescale_acts_by_decoder_norm: bool = False  # SAELens TopK option; folded into the weights on load
    model_name: str | None = None
    model_revision: str | None = None
    context_size: int | None = None
    dataset_path: str | None = None
    prepend_bos: bool = False
    weights_folded: bool = True  # the weights act on raw activations (any normalisation folded in)
    normalization: Normalization | None = None
    training: TrainingData | None = None
    run: TrainingRun | None = None
    # The SAELens version that wrote the checkpoint (its metadata.sae_lens_version), kept when it is saved
    # again here; None when no SAELens wrote it (the file then carries the layout version there).
    sae_lens_version: str | None = None
    sae_lens_metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def layer(self) -> int:
        """The cache layer this SAE reads (validated on read and write, so always defined)."""
        layer = layer_of_hook(self.hook_name)
        if layer is None:
            raise CheckpointError(f"hook_name {self.hook_name!r} is not blocks.L.hook_resid_post")
        return layer

    @property
    def regime(self) -> str:
        """The regime of the training cache (fast, bt-f, bt-p), or 'unknown'."""
        return (self.training.regime if self.training else None) or "unknown"

    @property
    def eval_sequence_ranges(self) -> list[Range] | None:
        """Held-out sequences of the training cache, or None when the checkpoint records none."""
        return list(self.training.eval_sequence_ranges) if self.training else None


# ---------------------------------------------------------------------- JSON <-> dataclass
def to_plain(obj: Any) -> Any:
    """A dataclass as JSON-ready dicts and lists (tuples become lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    return obj


def from_plain(cls: type[Any], data: Any, where: str, path: str) -> Any:
    """Build dataclass ``cls`` from JSON data, checking every field's type.

    Unknown keys are ignored (a newer writer may add fields); a wrong type is a CheckpointError
    naming ``where`` and the dotted field ``path``.
    """
    if not isinstance(data, dict):
        raise CheckpointError(f"{where}: field {path!r} must be an object, got {data!r}")
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        sub = f"{path}.{f.name}" if path else f.name
        if f.name in data:
            kwargs[f.name] = _typed(hints[f.name], data[f.name], where, sub)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise CheckpointError(f"{where}: missing field {sub!r}")
    return cls(**kwargs)


def _typed(tp: Any, value: Any, where: str, path: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _typed(inner, value, where, path)
    if tp is Any:
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return from_plain(tp, value, where, path)
    ok = {bool: isinstance(value, bool), str: isinstance(value, str),
          int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool)}
    if tp in ok:
        if not ok[tp]:
            raise CheckpointError(f"{where}: field {path!r} = {value!r}, expected {tp.__name__}")
        return float(value) if tp is float else value
    if origin is tuple:  # Range
        if not (isinstance(value, (list, tuple)) and len(value) == len(args)):
            raise CheckpointError(f"{where}: field {path!r} = {value!r}, expected [start, stop]")
        out = tuple(_typed(a, v, where, path) for a, v in zip(args, value))
        if out[0] > out[1]:
            raise CheckpointError(f"{where}: field {path!r} = {value!r}: start after stop")
        return out
    if origin is list:
        if not isinstance(value, list):
            raise CheckpointError(f"{where}: field {path!r} = {value!r}, expected a list")
        return [_typed(args[0], v, where, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise CheckpointError(f"{where}: field {path!r} = {value!r}, expected an object")
        return dict(value)
    raise TypeError(f"schema type {tp!r} has no JSON reader")  # a programming error, not bad input
