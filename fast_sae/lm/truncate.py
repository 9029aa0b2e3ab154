"""A copy of a checkpoint that keeps only decoder blocks 0..n-1, so an engine computes nothing above them.

Why a copy on disk: a harvest needs the residual stream up to its deepest requested block, and
engines that cannot stop a forward early (vLLM runs whole models) would compute every block above
it for nothing. Overriding the layer count at load time is not enough for vLLM 0.32: its weight
loader rejects the checkpoint's tensors of the dropped blocks. A checkpoint whose config says n
blocks and whose files hold only those blocks loads everywhere, and each kept block computes
exactly what it computes in the full model (a block only sees the blocks below it).

The copy lives under ``$FAST_SAE_HOME/truncated/``, keyed by model id, revision, the source files'
sizes and modification times and the block count; it is written into a temporary folder and
renamed into place, so a folder that exists is complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from .embedded import home
from .errors import ModelLoadError
from .loading import resolve

# A parameter of decoder block i: "model.layers.i.", "transformer.h.i.", "...blocks.i." (any prefix).
_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")
_WEIGHTS_INDEX = "model.safetensors.index.json"


def local_checkpoint(model_id: str, revision: str | None = None) -> Path:
    """The local folder of a model: the embedded folder, a local folder, or the hub snapshot."""
    source = resolve(model_id)
    if Path(source).is_dir():
        return Path(source)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, revision=revision))
    except Exception as exc:  # hub errors have many types; all mean the same thing here
        raise ModelLoadError(f"model {model_id!r}: cannot fetch its files ({str(exc).splitlines()[0]})") from None


def _block_of(name: str) -> int | None:
    m = _BLOCK.search(name)
    return int(m.group(1)) if m else None


def _truncate_config(cfg: dict[str, Any], n_blocks: int, where: Path) -> dict[str, Any]:
    cfg = dict(cfg)
    targets = [cfg]
    if isinstance(cfg.get("text_config"), dict):
        cfg["text_config"] = dict(cfg["text_config"])
        targets.append(cfg["text_config"])
    found = False
    for c in targets:
        if "num_hidden_layers" in c:
            found = True
            if n_blocks > int(c["num_hidden_layers"]):
                raise ModelLoadError(f"{where}: num_hidden_layers is {c['num_hidden_layers']}, cannot keep {n_blocks}")
            c["num_hidden_layers"] = n_blocks
            if isinstance(c.get("layer_types"), list):  # per-layer attention kinds (Qwen3, Gemma)
                c["layer_types"] = c["layer_types"][:n_blocks]
    if not found:
        raise ModelLoadError(f"{where}: config.json has no num_hidden_layers")
    return cfg


def _source_key(model_id: str, revision: str | None, src: Path, n_blocks: int) -> str:
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in src.iterdir() if p.is_file())
    blob = json.dumps([model_id, revision, str(src.resolve()), files, n_blocks])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def truncated_checkpoint(model_id: str, revision: str | None, n_blocks: int) -> Path:
    """A safetensors checkpoint folder with decoder blocks 0..n_blocks-1 only (created once, atomically)."""
    src = local_checkpoint(model_id, revision)
    if not (src / "config.json").is_file():
        raise ModelLoadError(f"{src}: no config.json")
    weights = sorted(src.glob("*.safetensors"))
    if not weights:
        raise ModelLoadError(f"{src}: no .safetensors weights (a truncated copy needs safetensors files)")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model_id).strip("_")[-60:]
    target = home() / "truncated" / f"{slug}-{_source_key(model_id, revision, src, n_blocks)}-blocks{n_blocks}"
    if target.is_dir():
        return target
    from safetensors import safe_open
    from safetensors.torch import save_file

    cfg = _truncate_config(json.loads((src / "config.json").read_text()), n_blocks, src / "config.json")
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for p in src.iterdir():  # tokenizer, generation config, chat template...
            if p.is_file() and not p.name.endswith(".safetensors") and p.name not in ("config.json", _WEIGHTS_INDEX):
                shutil.copy2(p, tmp / p.name)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        weight_map: dict[str, str] = {}
        for w in weights:
            with safe_open(str(w), framework="pt") as f:
                keep = {k: f.get_tensor(k) for k in f.keys() if (_block_of(k) or 0) < n_blocks}
                metadata = f.metadata()
            if keep:
                save_file(keep, str(tmp / w.name), metadata=metadata or {"format": "pt"})
                weight_map.update(dict.fromkeys(keep, w.name))
        if (src / _WEIGHTS_INDEX).is_file():
            total = sum((tmp / n).stat().st_size for n in set(weight_map.values()))
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / _WEIGHTS_INDEX).write_text(json.dumps(index, indent=2))
        (tmp / "fast_sae_truncated.json").write_text(json.dumps(
            {"source_model": model_id, "revision": revision, "source_dir": str(src), "blocks": n_blocks}, indent=2))
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished the same copy first
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
