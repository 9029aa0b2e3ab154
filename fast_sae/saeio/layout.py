"""cfg.json <-> CheckpointConfig: the only code that knows the file's field names.

Written in SAELens 6's layout, so ``sae_lens.SAE.load_from_disk`` loads a checkpoint unchanged:
the inference architecture's fields at the top level, everything else under ``metadata``, with a
``sae_lens_version`` of at least 6.0 (an older or missing version makes SAELens reformat the file
as pre-6.0 and keep only a few fields). That field says which SAELens wrote the SAE, so a SAELens
checkpoint saved again here keeps its writer's version; a checkpoint no SAELens wrote carries the
layout version there. The layout version has a field of its own either way
(``metadata.fast_sae.sae_lens_layout_version``). What this project records beyond SAELens' fields
lives in ``metadata.fast_sae``; SAELens keeps unknown metadata verbatim, so a checkpoint re-saved
by SAELens keeps it too.

Read: that layout (SAELens 6 files included), and the flat pre-6.0 layout that SAELens 5 and this
project up to version 0.2 wrote. Which SAEs can be scored is checked here too: a residual-stream
output hook (``blocks.L.hook_resid_post``, what caches hold), one of our architectures, inputs used
as they are (``normalize_activations: none``).
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from .architectures import from_sae_lens, get_architecture
from .errors import CheckpointError
from .schema import (
    CheckpointConfig,
    Normalization,
    TrainingData,
    TrainingRun,
    from_plain,
    layer_of_hook,
    to_plain,
)

SAE_LENS_LAYOUT_VERSION = "6.0.0"  # the SAELens config layout this file follows (SAELens reads >= 6.0.0-rc.0 as 6.x)
SCHEMA_VERSION = 1  # of metadata.fast_sae
OWN = "fast_sae"  # the metadata key holding this project's fields

# metadata fields the schema models; everything else under metadata is kept verbatim
_MODELLED_METADATA = {"hook_name", "hook_head_index", "model_name", "context_size", "dataset_path", "prepend_bos",
                      "training_architecture", OWN, "sae_lens_version"}
# SAELens' metadata fields of a pre-6.0 (flat) file that the schema does not model (kept verbatim)
_FLAT_SAE_LENS_METADATA = ("model_class_name", "model_from_pretrained_kwargs", "exclude_special_tokens",
                           "neuronpedia_id", "seqpos_slice", "sae_lens_training_version")


# ---------------------------------------------------------------------- write
def to_cfg_json(cfg: CheckpointConfig, where: str = "cfg") -> dict[str, Any]:
    """The cfg.json document for ``cfg`` (SAELens 6 layout); ``where`` names it in errors."""
    check(cfg, where)
    if cfg.rescale_acts_by_decoder_norm:
        raise CheckpointError(f"{where}: rescale_acts_by_decoder_norm is set; fold the decoder norms into the "
                              f"weights first (loading does that)")
    arch = get_architecture(cfg.architecture)
    own: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "sae_lens_layout_version": SAE_LENS_LAYOUT_VERSION,
                           "model_revision": cfg.model_revision,
                           "weights_folded": cfg.weights_folded,
                           "normalization": to_plain(cfg.normalization), "training": to_plain(cfg.training),
                           "run": to_plain(cfg.run)}
    # sae_lens_training_version null: not trained by SAELens (absent, SAELens would claim its own version)
    metadata: dict[str, Any] = {"sae_lens_training_version": None, **cfg.sae_lens_metadata}
    version = cfg.sae_lens_version if _reads_as_6(cfg.sae_lens_version) else SAE_LENS_LAYOUT_VERSION
    metadata.update(sae_lens_version=version, hook_name=cfg.hook_name, hook_head_index=None,
                    model_name=cfg.model_name, context_size=cfg.context_size, dataset_path=cfg.dataset_path,
                    prepend_bos=cfg.prepend_bos, training_architecture=cfg.architecture)
    details = {**(metadata.get("training_architecture_details") or {}), **arch.sae_lens_details(cfg)}
    if details:
        metadata["training_architecture_details"] = details
    metadata[OWN] = own
    return {"architecture": arch.sae_lens_name, "d_in": cfg.d_in, "d_sae": cfg.d_sae, "dtype": "float32",
            "device": "cpu", "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
            "normalize_activations": "none", "reshape_activations": "none", **arch.sae_lens_fields(cfg),
            "metadata": metadata}


def _reads_as_6(version: str | None) -> bool:
    """Whether SAELens reads a file with this ``sae_lens_version`` in its 6.x layout (major version >= 6)."""
    m = re.match(r"([0-9]+)\.", version or "")
    return m is not None and int(m.group(1)) >= 6


# ---------------------------------------------------------------------- read
def from_cfg_json(doc: Mapping[str, Any], where: str) -> CheckpointConfig:
    """Read a cfg.json document in either layout; ``where`` (the file) starts every error message."""
    if not isinstance(doc, Mapping):
        raise CheckpointError(f"{where}: expected a JSON object")
    doc = dict(doc)
    _dtype_device(doc, where)
    meta = doc.get("metadata")
    cfg = _from_sae_lens_6(doc, meta, where) if isinstance(meta, dict) else _from_flat(doc, where)
    check(cfg, where)
    return cfg


def check(cfg: CheckpointConfig, where: str) -> None:
    """What every checkpoint this project reads or writes must satisfy."""
    arch = get_architecture(cfg.architecture, where)
    for name in ("d_in", "d_sae"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise CheckpointError(f"{where}: field {name!r} = {value!r}, expected a positive integer")
    if layer_of_hook(cfg.hook_name) is None:
        raise CheckpointError(f"{where}: hook_name {cfg.hook_name!r} cannot be scored on activation caches, which "
                              f"hold the residual stream after a block (blocks.L.hook_resid_post)")
    if arch.needs_k and (not isinstance(cfg.k, int) or cfg.k <= 0):
        raise CheckpointError(f"{where}: {cfg.architecture} checkpoint without a positive integer field 'k'")
    if cfg.k is not None and not arch.records_k:
        raise CheckpointError(f"{where}: field 'k' = {cfg.k!r}, but a {cfg.architecture} SAE has no k")
    if cfg.k is not None and not 0 < cfg.k <= cfg.d_sae:
        raise CheckpointError(f"{where}: field 'k' = {cfg.k!r}, expected 1..d_sae ({cfg.d_sae}): an SAE cannot keep "
                              f"more latents than it has")


# Values of the SAELens fields ``dtype`` and ``device`` this reader accepts. Weights are always read as
# float32 and placed on the device the caller asks for; the recorded values only say how the writer held
# them, so they are checked (a typo or a crafted value is refused) but never acted on.
_DTYPES = {"float32", "float16", "bfloat16", "float64"}
_DEVICE = re.compile(r"(cpu|cuda|mps|xpu|meta)(:(0|[1-9][0-9]{0,2}))?")


def _dtype_device(doc: Mapping[str, Any], where: str) -> None:
    dtype, device = doc.get("dtype"), doc.get("device")
    if dtype is not None and (not isinstance(dtype, str) or dtype.removeprefix("torch.") not in _DTYPES):
        raise CheckpointError(f"{where}: field 'dtype' = {dtype!r}, expected one of {sorted(_DTYPES)}")
    if device is not None and (not isinstance(device, str) or not _DEVICE.fullmatch(device)):
        raise CheckpointError(f"{where}: field 'device' = {device!r}, expected cpu, cuda, cuda:N, mps or xpu "
                              f"(it is not used: weights load on the device asked for)")


def _need(doc: Mapping[str, Any], key: str, where: str, prefix: str = "", kind: type = object) -> Any:
    if doc.get(key) is None:
        raise CheckpointError(f"{where}: missing field {prefix + key!r}")
    if not isinstance(doc[key], kind):
        raise CheckpointError(f"{where}: field {prefix + key!r} = {doc[key]!r}, expected {kind.__name__}")
    return doc[key]


def _int_k(value: Any, where: str, field: str) -> int | None:
    """k as an int; SAELens stores BatchTopK's k as a float (an average over the batch)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise CheckpointError(f"{where}: field {field!r} = {value!r}, expected a whole number")
    return int(value)


def _inputs_as_they_are(normalize: Any, reshape: Any, head: Any, where: str, prefix: str) -> None:
    if normalize not in (None, "none", False):
        raise CheckpointError(
            f"{where}: field 'normalize_activations' is {normalize!r}: this SAE expects its inputs rescaled at "
            f"run time; fold the factor into the weights (SAELens: fold_activation_norm_scaling_factor) and save "
            f"again, then it can be scored")
    if reshape not in (None, "none"):
        raise CheckpointError(f"{where}: field 'reshape_activations' is {reshape!r}; only 'none' (residual "
                              f"stream SAEs) can be scored on activation caches")
    if head is not None:
        raise CheckpointError(f"{where}: field {prefix + 'hook_head_index'!r} is {head!r}; per-head SAEs cannot be "
                              f"scored on activation caches")


def _from_sae_lens_6(doc: dict[str, Any], meta: dict[str, Any], where: str) -> CheckpointConfig:
    arch = from_sae_lens(doc.get("architecture"), meta.get("training_architecture"), where)
    _inputs_as_they_are(doc.get("normalize_activations"), doc.get("reshape_activations"),
                        meta.get("hook_head_index"), where, "metadata.")
    details = meta.get("training_architecture_details") or {}
    own = meta.get(OWN) or {}
    if not isinstance(own, dict):
        raise CheckpointError(f"{where}: field 'metadata.{OWN}' must be an object")
    if not isinstance(meta.get("sae_lens_version", ""), str):
        raise CheckpointError(f"{where}: field 'metadata.sae_lens_version' = {meta['sae_lens_version']!r}, expected "
                              f"a version string")
    k_field = "k" if doc.get("k") is not None else "metadata.training_architecture_details.k"
    raw = {"architecture": arch.name, "d_in": _need(doc, "d_in", where), "d_sae": _need(doc, "d_sae", where),
           "hook_name": _need(meta, "hook_name", where, "metadata.", str),
           "k": _int_k(doc.get("k") if doc.get("k") is not None else
                       (details.get("k") if isinstance(details, dict) else None), where, k_field),
           "apply_b_dec_to_input": doc.get("apply_b_dec_to_input", True),
           "rescale_acts_by_decoder_norm": bool(doc.get("rescale_acts_by_decoder_norm", False)),
           "model_name": meta.get("model_name"), "context_size": meta.get("context_size"),
           "dataset_path": meta.get("dataset_path"), "prepend_bos": meta.get("prepend_bos", True),
           "model_revision": own.get("model_revision"), "weights_folded": own.get("weights_folded", True),
           "sae_lens_version": meta.get("sae_lens_version")}
    cfg = from_plain(CheckpointConfig, raw, where, "")
    # Written here without a SAELens writer: the version field holds the layout version (files written
    # here before the layout field existed all follow 6.0.0).
    layout = own.get("sae_lens_layout_version", SAE_LENS_LAYOUT_VERSION if OWN in meta else None)
    if cfg.sae_lens_version == layout:
        cfg.sae_lens_version = None
    for name, cls in (("normalization", Normalization), ("training", TrainingData), ("run", TrainingRun)):
        if own.get(name) is not None:
            setattr(cfg, name, from_plain(cls, own[name], where, f"metadata.{OWN}.{name}"))
    cfg.sae_lens_metadata = {k: v for k, v in meta.items() if k not in _MODELLED_METADATA
                             and (k, v) != ("sae_lens_training_version", None)}
    if isinstance(details, dict):  # what the writer derives from the schema is not kept twice
        rest = {k: v for k, v in details.items() if k not in arch.sae_lens_details(cfg)}
        cfg.sae_lens_metadata.pop("training_architecture_details", None)
        if rest:
            cfg.sae_lens_metadata["training_architecture_details"] = rest
    return cfg


def _from_flat(doc: dict[str, Any], where: str) -> CheckpointConfig:
    """The pre-6.0 layout: SAELens <= 5 (``hook_point``, ``activation_fn_str``, ...) and fast-sae <= 0.2."""
    hook = _need(doc, "hook_point" if "hook_name" not in doc and "hook_point" in doc else "hook_name", where,
                 kind=str)
    _inputs_as_they_are(doc.get("normalize_activations"), doc.get("reshape_activations"),
                        doc.get("hook_head_index", doc.get("hook_point_head_index")), where, "")
    activation = doc.get("activation_fn", doc.get("activation_fn_str", "relu"))
    fn_kwargs = doc.get("activation_fn_kwargs")
    kwargs: dict[str, Any] = fn_kwargs if isinstance(fn_kwargs, dict) else {}
    architecture = doc.get("architecture") or "standard"
    if activation == "topk" and kwargs.get("k") is not None:  # as SAELens reads these files
        architecture = "topk"
    elif architecture == "standard" and activation not in ("relu", None):
        raise CheckpointError(f"{where}: field 'activation_fn' is {activation!r}; only relu and topk are scored here")
    if "hook_layer" in doc and doc["hook_layer"] != layer_of_hook(str(hook)):
        raise CheckpointError(f"{where}: field 'hook_layer' {doc['hook_layer']!r} disagrees with hook_name {hook!r}")
    raw: dict[str, Any] = {
           "architecture": architecture, "d_in": _need(doc, "d_in", where), "d_sae": _need(doc, "d_sae", where),
           "hook_name": hook, "k": _int_k(doc.get("k", kwargs.get("k")), where, "k"),
           "apply_b_dec_to_input": doc.get("apply_b_dec_to_input", True), "prepend_bos": doc.get("prepend_bos", True),
           **{k: doc[k] for k in ("model_name", "model_revision", "context_size", "dataset_path", "weights_folded")
              if k in doc}}
    cfg = from_plain(CheckpointConfig, raw, where, "")
    cfg.sae_lens_metadata = {k: doc[k] for k in _FLAT_SAE_LENS_METADATA if k in doc
                             and (k, doc[k]) != ("sae_lens_training_version", None)}
    _read_flat_provenance(cfg, doc, where)
    return cfg


def _read_flat_provenance(cfg: CheckpointConfig, doc: dict[str, Any], where: str) -> None:
    """What fast-sae <= 0.2 recorded beside SAELens' fields, in its flat names."""
    if doc.get("activation_normalization_factor") is not None:
        cfg.normalization = from_plain(Normalization, {
            "method": doc.get("training_normalization") or "content",
            "factor": doc["activation_normalization_factor"]}, where, "")
    cache = {"path": doc.get("cache_path"), "model": doc.get("model_name"),
             "regime": doc.get("regime", doc.get("training_regime")), "n_tokens": doc.get("cache_n_tokens"),
             "context_size": doc.get("context_size"), "dataset": doc.get("dataset_path"),
             "dataset_fingerprint": doc.get("dataset_fingerprint")}
    ranges = {k: doc[k] for k in ("train_token_range", "eval_token_range") if doc.get(k) is not None}
    if doc.get("eval_sequence_range") is not None:
        ranges["eval_sequence_ranges"] = [doc["eval_sequence_range"]]
    if any(cache[k] is not None for k in ("path", "regime", "n_tokens", "dataset_fingerprint")) or ranges:
        cfg.training = from_plain(TrainingData, {"cache": cache, **ranges}, where, "")
    if doc.get("trainer") == "fast-sae train":  # a SAELens 5 runner config's fields are not ours to type-check
        names = {f.name for f in dataclasses.fields(TrainingRun)}
        cfg.run = from_plain(TrainingRun, {k: v for k, v in doc.items() if k in names}, where, "")
