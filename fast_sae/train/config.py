"""Run configuration: the shared training settings and the grid of SAEs to train in one pass.

Why dataclasses and a flat grid: every SAE of a run shares the data stream and the optimiser
schedule (that is what lets one pass over the cache feed them all), so only the things that make
SAEs differ (layer, architecture, width, sparsity setting) live in ``SAESpec``; everything else is
one ``TrainConfig``. Both are JSON-serialisable and written to the run folder, which is how a
rerun knows it is resuming the same run.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

ARCHITECTURES = ("standard", "jumprelu", "topk", "batchtopk")
ORDERS = ("mixing", "sequential", "random")
NORMALIZATIONS = ("content", "all", "none")
B_DEC_INITS = ("geometric_median", "mean", "zeros")
DECODER_PATHS = ("auto", "sparse", "dense")

# Paper defaults (fast-paper.md §3.3): L1 5 for standard, L0 0.01 for JumpReLU. TopK values follow
# common practice (Gao et al. use k=32 at these widths).
DEFAULT_SPARSITY = {"standard": [5.0], "jumprelu": [0.01], "topk": [32], "batchtopk": [32]}


class ConfigError(Exception):
    """A run configuration that cannot be trained; the message is one line."""


@dataclass
class TrainConfig:
    """Settings shared by every SAE in the run. Defaults follow fast-paper.md §3.3 where it has one."""

    tokens: int = 40_960_000  # training tokens per SAE (every SAE sees the same stream)
    batch_size: int = 4096  # the paper uses 128; larger batches are far faster here (record what you use)
    lr: float = 7e-5
    lr_end: float = 7e-6
    warmup_frac: float = 0.05  # 16k of 320k steps in the paper
    decay_frac: float = 0.2  # final linear decay to 0: 64k of 320k steps in the paper
    sparsity_warmup_frac: float = 1 / 32  # 10k of 320k steps in the paper
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    grad_clip: float = 1.0
    seed: int = 42
    order: str = "mixing"
    buffer_tokens: int = 1 << 17  # mixing buffer size; half of it is served per refill
    eval_sequences: int = 0  # the last N sequences of the cache are held out (never trained on)
    eval_max_tokens: int = 65536  # cap on held-out tokens scored at the end of the run
    normalize: str = "content"  # scale so that E||x||^2 = d_model over content tokens / all tokens / not at all
    b_dec_init: str = "geometric_median"
    init_encoder_as_decoder_transpose: bool = True
    l1_decoder_norm: bool = False  # standard SAE: weight L1 by decoder norms (Anthropic Apr 2024), no renorm
    jumprelu_bandwidth: float = 0.001
    jumprelu_init_threshold: float = 0.001
    aux_k: int = 0  # TopK/BatchTopK AuxK latents; 0 = d_in // 2 (Gao et al.)
    aux_k_coefficient: float = 1 / 32
    batchtopk_threshold_lr: float = 0.01  # EMA rate of BatchTopK's inference threshold
    dead_window_steps: int = 1000  # a feature is dead if it has not fired in this many steps
    # TopK/BatchTopK step: "sparse" decodes and takes gradients at the kept entries only, "dense" with
    # full matrices (same maths); "auto" picks sparse when k / d_sae is small (saes/sparse.py)
    decoder_path: str = "auto"
    log_every: int = 100
    checkpoint_every: int = 1000
    device: str = "cpu"
    max_memory_gb: float | None = None  # override the detected memory budget (for the grid-fits check)

    def steps(self) -> int:
        return max(1, self.tokens // self.batch_size)

    def validate(self) -> None:
        if self.order not in ORDERS:
            raise ConfigError(f"order {self.order!r}: expected one of {', '.join(ORDERS)}")
        if self.normalize not in NORMALIZATIONS:
            raise ConfigError(f"normalize {self.normalize!r}: expected one of {', '.join(NORMALIZATIONS)}")
        if self.b_dec_init not in B_DEC_INITS:
            raise ConfigError(f"b_dec_init {self.b_dec_init!r}: expected one of {', '.join(B_DEC_INITS)}")
        if self.decoder_path not in DECODER_PATHS:
            raise ConfigError(f"decoder_path {self.decoder_path!r}: expected one of {', '.join(DECODER_PATHS)}")
        for name in ("tokens", "batch_size", "buffer_tokens", "log_every", "checkpoint_every", "dead_window_steps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.tokens < self.batch_size:
            raise ConfigError(f"tokens ({self.tokens}) is smaller than one batch ({self.batch_size})")
        if self.eval_sequences < 0:
            raise ConfigError(f"eval_sequences must be >= 0, got {self.eval_sequences}")
        if self.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ConfigError(f"device {self.device!r} requested but CUDA is not available here; use --device cpu")
        elif self.device != "cpu":
            raise ConfigError(f"device {self.device!r}: expected cpu, cuda or cuda:N")


@dataclass(frozen=True)
class SAESpec:
    """One SAE of the grid. ``sparsity`` is the L1 coefficient (standard), the L0 coefficient
    (jumprelu) or k (topk, batchtopk)."""

    layer: int
    architecture: str
    expansion_factor: int
    sparsity: float

    @property
    def name(self) -> str:
        s = self.sparsity
        if self.architecture in ("topk", "batchtopk"):
            tag = f"k{int(s)}"
        else:
            tag = ("l1_" if self.architecture == "standard" else "l0_") + f"{s:g}"
        return f"L{self.layer}_{self.architecture}_x{self.expansion_factor}_{tag}"

    def d_sae(self, d_in: int) -> int:
        return d_in * self.expansion_factor

    @property
    def k(self) -> int | None:
        return int(self.sparsity) if self.architecture in ("topk", "batchtopk") else None


@dataclass
class GridConfig:
    layers: list[int]
    architectures: list[str]
    expansion_factors: list[int]
    sparsity: dict[str, list[float]] = field(default_factory=lambda: {k: list(v) for k, v in DEFAULT_SPARSITY.items()})

    def specs(self) -> list[SAESpec]:
        """Every SAE of the grid, in a fixed order (layer, architecture, width, sparsity)."""
        out = []
        for arch in self.architectures:
            if arch not in ARCHITECTURES:
                raise ConfigError(f"architecture {arch!r}: expected one of {', '.join(ARCHITECTURES)}")
        for layer in sorted(set(self.layers)):
            for arch in self.architectures:
                values = self.sparsity.get(arch) or DEFAULT_SPARSITY[arch]
                for ef in sorted(set(self.expansion_factors)):
                    if ef <= 0:
                        raise ConfigError(f"expansion factor must be positive, got {ef}")
                    for s in values:
                        if arch in ("topk", "batchtopk") and (int(s) != s or s <= 0):
                            raise ConfigError(f"k must be a positive integer, got {s}")
                        if s < 0:
                            raise ConfigError(f"sparsity coefficient must be >= 0, got {s}")
                        out.append(SAESpec(layer, arch, int(ef), float(s)))
        if not out:
            raise ConfigError("the grid is empty: give at least one layer, architecture and expansion factor")
        names = [s.name for s in out]
        if len(set(names)) != len(names):
            raise ConfigError("the grid has duplicate SAEs")
        return out


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML or YAML run file: ``[train]`` (TrainConfig fields) and ``[grid]`` sections."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            doc = yaml.safe_load(text) or {}
        elif path.suffix == ".json":
            doc = json.loads(text)
        else:
            doc = tomllib.loads(text)
    except Exception as exc:  # tomllib/yaml/json each raise their own type
        raise ConfigError(f"{path}: cannot parse ({str(exc).splitlines()[0]})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping with [train] and [grid] sections")
    unknown = set(doc) - {"train", "grid"}
    if unknown:
        raise ConfigError(f"{path}: unknown section {sorted(unknown)[0]!r} (expected train, grid)")
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for key in doc.get("train") or {}:
        if key not in train_fields:
            raise ConfigError(f"{path}: unknown [train] field {key!r}")
    for key in doc.get("grid") or {}:
        if key not in ("layers", "architectures", "expansion_factors", "sparsity"):
            raise ConfigError(f"{path}: unknown [grid] field {key!r}")
    return doc


def build_config(file_doc: dict[str, Any], train_overrides: dict[str, Any],
                 grid_overrides: dict[str, Any], cache_layers: list[int]) -> tuple[TrainConfig, GridConfig]:
    """Merge the config file with command-line values (the command line wins)."""
    train_values = dict(file_doc.get("train") or {})
    train_values.update({k: v for k, v in train_overrides.items() if v is not None})
    cfg = TrainConfig(**train_values)
    cfg.validate()
    g = dict(file_doc.get("grid") or {})
    sparsity = {k: list(v) for k, v in DEFAULT_SPARSITY.items()}
    for arch, values in (g.get("sparsity") or {}).items():
        if arch not in ARCHITECTURES:
            raise ConfigError(f"[grid.sparsity]: unknown architecture {arch!r}")
        sparsity[arch] = [float(v) for v in (values if isinstance(values, list) else [values])]
    for arch, values in (grid_overrides.get("sparsity") or {}).items():
        if values:
            sparsity[arch] = [float(v) for v in values]
    layers = grid_overrides.get("layers") or g.get("layers") or cache_layers
    archs = grid_overrides.get("architectures") or g.get("architectures") or ["standard"]
    efs = grid_overrides.get("expansion_factors") or g.get("expansion_factors") or [8]
    grid = GridConfig(layers=[int(x) for x in layers], architectures=[str(a) for a in archs],
                      expansion_factors=[int(e) for e in efs], sparsity=sparsity)
    return cfg, grid
