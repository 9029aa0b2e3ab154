"""Resume state without pickle: every tensor in a safetensors file, everything else in JSON.

Why not ``torch.load``: a checkpoint is a file in a run folder, and unpickling runs whatever the
file says (a crafted ``rank0.pt`` ran code on resume). safetensors holds only raw tensor bytes, and
JSON only data; decoding accepts a fixed set of forms, so nothing in either file is executed.
The encoding keeps what a state dict needs for a bit-exact resume: tensors with their dtype and
shape, dicts with str or int keys (optimizer state is keyed by parameter index), tuples (Adam's
betas), lists and JSON scalars (floats round-trip exactly through their repr).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

FORMAT = "fast-sae-state/1"


class StateFormatError(Exception):
    """A state file that is not in this format; one line naming the file."""


def _encode(obj: Any, tensors: dict[str, torch.Tensor], storages: set[int]) -> Any:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else -1
        if ptr in storages:  # safetensors refuses tensors that share memory
            t = t.clone()
        storages.add(ptr)
        key = f"t{len(tensors)}"
        tensors[key] = t
        return {"tensor": key}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"tuple": [_encode(v, tensors, storages) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors, storages) for v in obj]
    if isinstance(obj, dict):
        for k in obj:
            if isinstance(k, bool) or not isinstance(k, (str, int)):
                raise TypeError(f"state dict key {k!r}: only str and int keys can be saved")
        return {"dict": [[k, _encode(v, tensors, storages)] for k, v in obj.items()]}
    raise TypeError(f"cannot save a {type(obj).__name__} in resume state")


def _decode(obj: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, list):
        return [_decode(v, tensors, where) for v in obj]
    if isinstance(obj, dict) and len(obj) == 1:
        (kind, value), = obj.items()
        if kind == "tensor" and isinstance(value, str):
            if value not in tensors:
                raise StateFormatError(f"{where}: refers to tensor {value!r}, which the tensor file lacks")
            return tensors[value]
        if kind == "tuple" and isinstance(value, list):
            return tuple(_decode(v, tensors, where) for v in value)
        if kind == "dict" and isinstance(value, list):
            out = {}
            for pair in value:
                if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], (str, int))):
                    raise StateFormatError(f"{where}: malformed dict entry {str(pair)[:60]}")
                out[pair[0]] = _decode(pair[1], tensors, where)
            return out
    raise StateFormatError(f"{where}: unexpected value {str(obj)[:60]}")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not keep the partial file
        raise


def save_state(stem: Path, state: Any) -> None:
    """Write ``stem.safetensors`` then ``stem.json`` (the JSON is written last: it names the tensors)."""
    tensors: dict[str, torch.Tensor] = {}
    doc = _encode(state, tensors, set())
    _write_atomic(stem.with_name(stem.name + ".safetensors"), save_tensors(tensors))
    _write_atomic(stem.with_name(stem.name + ".json"), json.dumps({"format": FORMAT, "state": doc}).encode())


def load_state(stem: Path) -> Any:
    tfile, jfile = stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")
    for f in (tfile, jfile):
        if not f.is_file():
            raise StateFormatError(f"{f}: missing from the checkpoint")
    try:
        doc = json.loads(jfile.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise StateFormatError(f"{jfile}: not JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or "state" not in doc:
        raise StateFormatError(f"{jfile}: not a fast-sae resume state (field 'format' must be 'fast-sae-state/1')")
    try:
        tensors = load_tensors(tfile.read_bytes())
    except Exception as exc:  # safetensors raises its own error types for bad headers and sizes
        raise StateFormatError(f"{tfile}: unreadable safetensors ({str(exc).splitlines()[0]})") from None
    return _decode(doc["state"], tensors, str(jfile))
