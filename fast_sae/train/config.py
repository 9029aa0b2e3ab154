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
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

from fast_sae.options import build, setting
from fast_sae.saeio import ARCHITECTURE_NAMES, get_architecture

ARCHITECTURES = ARCHITECTURE_NAMES  # the checkpoint format's registry is the one list of architectures
ORDERS = ("mixing", "sequential", "random")
NORMALIZATIONS = ("content", "all", "none")
B_DEC_INITS = ("geometric_median", "mean", "zeros")
DECODER_PATHS = ("auto", "sparse", "dense")
WANDB_MODES = ("online", "offline", "disabled")

# The grid field holding each architecture's sparsity settings (L1 coefficient, L0 coefficient or k).
SPARSITY_FIELD = {"standard": "l1_coefficients", "jumprelu": "l0_coefficients", "topk": "k", "batchtopk": "k"}


# TrainConfig fields that only one architecture reads.
ARCH_FIELDS = {"jumprelu": ("jumprelu_bandwidth", "jumprelu_init_threshold", "jumprelu_threshold_lr_scale"),
               "topk": ("aux_k", "aux_k_coefficient", "decoder_path", "dead_window_tokens", "dead_window_frac",
                        "dead_window_steps"),
               "batchtopk": ("batchtopk_threshold_lr",),
               "standard": ("l1_decoder_norm",)}


class ConfigError(Exception):
    """A run configuration that cannot be trained; the message is one line."""


@dataclass
class TrainConfig:
    """Settings shared by every SAE in the run; every field is also a `pipeline.py train` option and a
    ``[train]`` key of a run file. Defaults follow the FAST paper's training setup where it has one
    (Adam 7e-5 -> 7e-6, warm-up/decay/sparsity warm-up 5% / 20% / 1/32 of the run)."""

    tokens: int = setting(40_960_000, help="Training tokens per SAE; every SAE sees the same stream "
                                           "(paper: 40,960,000).")
    batch_tokens: int = setting(4096, help="Tokens per optimiser step (the paper uses 128; larger batches are far "
                                           "faster here).")
    lr: float = setting(7e-5, help="Adam learning rate (paper: 7e-5).")
    lr_end: float = setting(7e-6, help="Learning rate at the end of the cosine phase (paper: 7e-6).")
    warmup_frac: float = setting(0.05, help="Linear lr warm-up, as a fraction of the run (paper: 16k of 320k steps).")
    decay_frac: float = setting(0.2, help="Final linear decay to 0, as a fraction of the run (paper: 64k of 320k).")
    sparsity_warmup_frac: float = setting(1 / 32, help="Sparsity-coefficient warm-up, fraction of the run "
                                                       "(paper: 10k of 320k).")
    adam_beta1: float = setting(0.9, help="Adam beta1.")
    adam_beta2: float = setting(0.999, help="Adam beta2.")
    grad_clip: float = setting(1.0, help="Gradient-norm clipping per SAE.")
    seed: int = setting(42, help="Seed for init and data order (paper: 42).")
    order: str = setting("mixing", choices=ORDERS, help="Data order: mixing (FAST's mixing buffer), sequential, or "
                                                        "random.")
    buffer_tokens: int = setting(1 << 17, help="Mixing buffer size in tokens; half of it is served per refill.")
    eval_sequences: int = setting(0, help="Hold out the cache's last N sequences (never trained on) for evaluation.")
    eval_max_tokens: int = setting(65536, help="Cap on held-out tokens scored at the end of the run.")
    normalize: str = setting("content", choices=NORMALIZATIONS,
                             help="Scale activations so E||x||^2 = d_model over content tokens, or all tokens, or "
                                  "not at all, leaving out position 0 and norm outliers, on training tokens only "
                                  "(weights are saved folded either way).")
    normalize_from: str | None = setting(None, metavar="CACHE",
                                         help="Take the normalisation constant from this (training) cache instead "
                                              "of the run's own: one shared constant for a comparison of regimes.")
    b_dec_init: str = setting("geometric_median", choices=B_DEC_INITS, help="Decoder bias init (paper: geometric "
                                                                            "median).")
    init_encoder_as_decoder_transpose: bool = setting(True, help="Initialise W_enc as W_dec transposed.")
    l1_decoder_norm: bool = setting(False, help="Standard SAE: decoder-norm-weighted L1 (Anthropic, Apr 2024) "
                                                "instead of a unit-norm decoder.")
    jumprelu_bandwidth: float = setting(0.05, help="JumpReLU straight-through bandwidth, in normalised units "
                                                   "(SAELens 6: 0.05; the paper's 0.001 is for E||x||^2 = 1).")
    jumprelu_init_threshold: float = setting(0.01, help="JumpReLU initial threshold (SAELens 6: 0.01; paper: 0.001).")
    jumprelu_threshold_lr_scale: float = setting(10.0, help="JumpReLU: the thresholds' learning rate as a multiple "
                                                            "of --lr (they must travel to the pre-activations' "
                                                            "scale, ~1, within the run).")
    aux_k: int = setting(0, help="TopK/BatchTopK AuxK latents; 0 = d_in / 2 (Gao et al.).")
    aux_k_coefficient: float = setting(1 / 32, help="AuxK loss coefficient (Gao et al.: 1/32).")
    batchtopk_threshold_lr: float = setting(0.01, help="EMA rate of BatchTopK's inference threshold.")
    dead_window_tokens: int = setting(10_000_000, help="A feature is dead if it has not fired in this many "
                                                       "training tokens (Gao et al.: 10M), capped by "
                                                       "--dead-window-frac of the run.")
    dead_window_frac: float = setting(0.1, help="Cap of the dead window as a fraction of the run, so AuxK acts "
                                                "in short runs as in long ones.")
    dead_window_steps: int | None = setting(None, help="Dead window in steps, overriding the two above.")
    decoder_path: str = setting("auto", choices=DECODER_PATHS,
                                help="TopK/BatchTopK step: sparse decodes and takes gradients at the kept entries "
                                     "only, dense with full matrices (same maths); auto picks sparse when k / d_sae "
                                     "is small.")
    log_every: int = setting(100, help="Steps between metrics.jsonl lines.")
    checkpoint_every: int = setting(1000, help="Steps between resumable checkpoints.")
    device: str = setting("auto", help="auto, cpu or cuda (under torchrun each process uses cuda:LOCAL_RANK).")
    max_memory_gb: float | None = setting(None, help="Memory budget for the grid-fits check [default: what is free].")
    # Experiment tracking (tracking.py). It never changes what is trained, so a resume may add or drop it.
    wandb_project: str | None = setting(None, metavar="PROJECT",
                                        help="Log the curves, the configuration and the end-of-run table to this "
                                             "Weights & Biases project, one W&B run per train run (needs wandb: "
                                             "pip install 'fast-sae[tracking]').")
    wandb_entity: str | None = setting(None, metavar="ENTITY", help="W&B user or team [default: your default].")
    wandb_run_name: str | None = setting(None, metavar="NAME", help="W&B run name [default: the --out folder's "
                                                                    "name].")
    wandb_mode: str | None = setting(None, choices=WANDB_MODES,
                                     help="online, offline (no network; upload later with `wandb sync`) or disabled "
                                          "[default: $WANDB_MODE, else online].")

    def steps(self) -> int:
        return max(1, self.tokens // self.batch_tokens)

    @staticmethod
    def fields_for(architectures: list[str]) -> set[str]:
        """The settings that cannot change what a grid of these architectures trains: a run folder
        is resumed whatever they say (a new JumpReLU option must not orphan a TopK run)."""
        unused = set()
        if "jumprelu" not in architectures:
            unused |= set(ARCH_FIELDS["jumprelu"])
        if not {"topk", "batchtopk"} & set(architectures):
            unused |= set(ARCH_FIELDS["topk"])
        if "batchtopk" not in architectures:
            unused |= set(ARCH_FIELDS["batchtopk"])
        if "standard" not in architectures:
            unused |= set(ARCH_FIELDS["standard"])
        return unused

    def dead_window(self) -> int:
        """Steps without firing after which a feature counts as dead (and AuxK trains it).

        Why relative: a fixed 1,000-step window never triggers in a run of 390 steps, so AuxK
        would act in long runs only and short-run comparisons would test a different loss. The
        window is Gao et al.'s 10M tokens, but at most ``dead_window_frac`` of the run.
        """
        if self.dead_window_steps is not None:
            return self.dead_window_steps
        by_tokens = -(-self.dead_window_tokens // self.batch_tokens)
        return max(1, min(by_tokens, math.ceil(self.dead_window_frac * self.steps())))

    def validate(self) -> None:
        if self.order not in ORDERS:
            raise ConfigError(f"order {self.order!r}: expected one of {', '.join(ORDERS)}")
        if self.normalize not in NORMALIZATIONS:
            raise ConfigError(f"normalize {self.normalize!r}: expected one of {', '.join(NORMALIZATIONS)}")
        if self.b_dec_init not in B_DEC_INITS:
            raise ConfigError(f"b_dec_init {self.b_dec_init!r}: expected one of {', '.join(B_DEC_INITS)}")
        if self.decoder_path not in DECODER_PATHS:
            raise ConfigError(f"decoder_path {self.decoder_path!r}: expected one of {', '.join(DECODER_PATHS)}")
        if self.wandb_mode is not None and self.wandb_mode not in WANDB_MODES:
            raise ConfigError(f"wandb_mode {self.wandb_mode!r}: expected one of {', '.join(WANDB_MODES)}")
        for name in ("tokens", "batch_tokens", "buffer_tokens", "log_every", "checkpoint_every", "dead_window_tokens"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.dead_window_steps is not None and self.dead_window_steps <= 0:
            raise ConfigError(f"dead_window_steps must be positive, got {self.dead_window_steps}")
        if not 0 < self.dead_window_frac <= 1:
            raise ConfigError(f"dead_window_frac must be in (0, 1], got {self.dead_window_frac}")
        if self.tokens < self.batch_tokens:
            raise ConfigError(f"tokens ({self.tokens}) is smaller than one batch ({self.batch_tokens})")
        if self.eval_sequences < 0:
            raise ConfigError(f"eval_sequences must be >= 0, got {self.eval_sequences}")
        import torch

        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise ConfigError(f"device {self.device!r} requested but CUDA is not available here; use --device cpu")
        elif self.device != "cpu":
            raise ConfigError(f"device {self.device!r}: expected auto, cpu, cuda or cuda:N")


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
        if self.k is not None:
            tag = f"k{int(s)}"
        else:
            tag = ("l1_" if self.architecture == "standard" else "l0_") + f"{s:g}"
        return f"L{self.layer}_{self.architecture}_x{self.expansion_factor}_{tag}"

    def d_sae(self, d_in: int) -> int:
        return d_in * self.expansion_factor

    @property
    def k(self) -> int | None:
        return int(self.sparsity) if get_architecture(self.architecture).records_k else None


@dataclass
class GridConfig:
    """The SAEs of a run: every layer x architecture x width x sparsity setting; every field is also a
    `pipeline.py train` option and a ``[grid]`` key of a run file."""

    layers: list[int] = setting(default_factory=list, help="Cached layers to train on [default: every cached layer].")
    architectures: list[str] = setting(default_factory=lambda: ["standard"],
                                       help=f"SAE architectures, from {', '.join(ARCHITECTURES)}.")
    expansion_factors: list[int] = setting(default_factory=lambda: [8], help="Widths as d_sae / d_model.")
    l1_coefficients: list[float] = setting(default_factory=lambda: [5.0], help="Standard SAE L1 coefficients "
                                                                              "(paper: 5).")
    l0_coefficients: list[float] = setting(default_factory=lambda: [0.01], help="JumpReLU L0 coefficients "
                                                                               "(paper: 0.01).")
    k: list[int] = setting(default_factory=lambda: [32], help="k of TopK and BatchTopK SAEs (Gao et al.: 32).")

    def sparsity(self, architecture: str) -> list[float]:
        """The sparsity settings of an architecture: L1 or L0 coefficients, or k."""
        return [float(v) for v in getattr(self, SPARSITY_FIELD[architecture])]

    def specs(self) -> list[SAESpec]:
        """Every SAE of the grid, in a fixed order (layer, architecture, width, sparsity)."""
        out = []
        for arch in self.architectures:
            if arch not in ARCHITECTURES:
                raise ConfigError(f"architecture {arch!r}: expected one of {', '.join(ARCHITECTURES)}")
        for layer in sorted(set(self.layers)):
            for arch in self.architectures:
                values = self.sparsity(arch)
                for ef in sorted(set(self.expansion_factors)):
                    if ef <= 0:
                        raise ConfigError(f"expansion factor must be positive, got {ef}")
                    for s in values:
                        if get_architecture(arch).records_k and (int(s) != s or s <= 0):
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


def check_widths(specs: list[SAESpec], d_in: int) -> None:
    """Settings that depend on the cache's d_model: a TopK/BatchTopK k must fit in d_sae."""
    for s in specs:
        if s.k is not None and s.k > s.d_sae(d_in):
            raise ConfigError(f"k {s.k} of {s.name} is larger than its d_sae {s.d_sae(d_in)} (d_model {d_in} x "
                              f"expansion factor {s.expansion_factor}); use a smaller k or a wider SAE")


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
    grid_fields = {f.name for f in dataclasses.fields(GridConfig)}
    for key in doc.get("grid") or {}:
        if key == "sparsity":
            raise ConfigError(f"{path}: [grid.sparsity] is now three [grid] lists: l1_coefficients (standard), "
                              f"l0_coefficients (jumprelu), k (topk, batchtopk)")
        if key not in grid_fields:
            raise ConfigError(f"{path}: unknown [grid] field {key!r}")
    return doc


def build_config(file_doc: dict[str, Any], train_overrides: dict[str, Any],
                 grid_overrides: dict[str, Any], cache_layers: list[int],
                 where: str = "config") -> tuple[TrainConfig, GridConfig]:
    """Merge a run file's sections with command-line values (the command line wins); an empty layer
    list means every cached layer."""
    try:
        cfg = build(TrainConfig, {**(file_doc.get("train") or {}), **train_overrides}, where=f"{where} [train]")
        grid = build(GridConfig, {**(file_doc.get("grid") or {}), **grid_overrides}, where=f"{where} [grid]")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    cfg.validate()
    if not grid.layers:
        grid.layers = list(cache_layers)
    return cfg, grid
