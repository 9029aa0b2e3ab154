"""Each SAE architecture's inference step and its cfg.json facts, one small class each.

Why a registry: the architecture name is the key under which everything architecture-specific
is found (which tensors a checkpoint holds, whether it records k, how features are computed
from the pre-activations, how SAELens names it). Adding an architecture means adding one class
here (and its test); the trainer validates its grid against ``ARCHITECTURE_NAMES``.

Every architecture shares the affine part, computed by ``LoadedSAE.encode``:
pre = (x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc; ``activate`` maps pre to features.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch

from .errors import CheckpointError
from .schema import CheckpointConfig

COMMON_TENSORS = ("W_enc", "W_dec", "b_enc", "b_dec")


class Architecture:
    """One architecture; subclasses set the class variables and ``activate``."""

    name: ClassVar[str]
    sae_lens_name: ClassVar[str]  # the architecture SAELens 6 loads it as (its inference class)
    tensors: ClassVar[tuple[str, ...]] = ()  # beyond COMMON_TENSORS, each [d_sae]
    records_k: ClassVar[bool] = False  # k is part of its identity (grid names, reports)
    needs_k: ClassVar[bool] = False  # inference cannot run without k

    def activate(self, pre: torch.Tensor, threshold: torch.Tensor | None, k: int | None) -> torch.Tensor:
        raise NotImplementedError

    def prepare(self, weights: dict[str, torch.Tensor], cfg: CheckpointConfig) -> CheckpointConfig:
        """Bring weights written by another tool to this project's form, in place; returns the cfg
        describing the result. Default: nothing to do."""
        return cfg

    def sae_lens_fields(self, cfg: CheckpointConfig) -> dict[str, Any]:
        """Top-level cfg.json fields of SAELens's inference config for this architecture."""
        return {}

    def sae_lens_details(self, cfg: CheckpointConfig) -> dict[str, Any]:
        """``metadata.training_architecture_details`` SAELens keeps for a training architecture."""
        return {}


ARCHITECTURES: dict[str, Architecture] = {}


def register(cls: type[Architecture]) -> type[Architecture]:
    ARCHITECTURES[cls.name] = cls()
    return cls


@register
class Standard(Architecture):
    """ReLU SAE (Bricken et al. 2023): f = relu(pre)."""

    name = sae_lens_name = "standard"

    def activate(self, pre: torch.Tensor, threshold: torch.Tensor | None, k: int | None) -> torch.Tensor:
        return torch.relu(pre)


@register
class JumpReLU(Architecture):
    """JumpReLU SAE (Rajamanoharan et al. 2024): f = relu(pre) where pre > threshold, else 0."""

    name = sae_lens_name = "jumprelu"
    tensors = ("threshold",)

    def activate(self, pre: torch.Tensor, threshold: torch.Tensor | None, k: int | None) -> torch.Tensor:
        assert threshold is not None  # checked on load
        return torch.relu(pre) * (pre > threshold)

    def prepare(self, weights: dict[str, torch.Tensor], cfg: CheckpointConfig) -> CheckpointConfig:
        if "log_threshold" in weights and "threshold" not in weights:  # SAELens training checkpoints
            weights["threshold"] = weights.pop("log_threshold").exp()
        return cfg


@register
class TopK(Architecture):
    """TopK SAE (Gao et al. 2024): the k largest pre-activations per token, ReLU'd; the rest 0."""

    name = sae_lens_name = "topk"
    records_k = needs_k = True

    def activate(self, pre: torch.Tensor, threshold: torch.Tensor | None, k: int | None) -> torch.Tensor:
        assert k is not None  # checked on load
        values, indices = torch.topk(pre, int(k), dim=-1)
        return torch.zeros_like(pre).scatter_(-1, indices, torch.relu(values))

    def prepare(self, weights: dict[str, torch.Tensor], cfg: CheckpointConfig) -> CheckpointConfig:
        """SAELens' ``rescale_acts_by_decoder_norm`` ranks pre * ||W_dec row|| and decodes f / ||row||:
        the same as plain TopK with those norms folded into W_enc, b_enc and W_dec."""
        if not cfg.rescale_acts_by_decoder_norm:
            return cfg
        norms = weights["W_dec"].norm(dim=-1)
        weights["W_enc"] = weights["W_enc"] * norms
        weights["b_enc"] = weights["b_enc"] * norms
        weights["W_dec"] = weights["W_dec"] / norms.unsqueeze(1)
        cfg.rescale_acts_by_decoder_norm = False
        return cfg

    def sae_lens_fields(self, cfg: CheckpointConfig) -> dict[str, Any]:
        return {"k": cfg.k, "rescale_acts_by_decoder_norm": False}


@register
class BatchTopK(Architecture):
    """BatchTopK SAE (Bussmann et al. 2024): trained keeping the top k * batch pre-activations of a
    batch; at inference a learned global threshold replaces the batch, i.e. a JumpReLU with one
    threshold for every feature. SAELens saves it as ``jumprelu`` with that threshold and the
    training architecture in its metadata; so does this project."""

    name = "batchtopk"
    sae_lens_name = "jumprelu"
    tensors = ("threshold",)
    records_k = True

    def activate(self, pre: torch.Tensor, threshold: torch.Tensor | None, k: int | None) -> torch.Tensor:
        assert threshold is not None  # checked on load
        return torch.relu(pre) * (pre > threshold)

    def sae_lens_details(self, cfg: CheckpointConfig) -> dict[str, Any]:
        return {"k": cfg.k} if cfg.k is not None else {}


ARCHITECTURE_NAMES: tuple[str, ...] = tuple(ARCHITECTURES)


def get_architecture(name: str, where: str = "cfg") -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise CheckpointError(f"{where}: architecture {name!r} is not supported here; expected one of "
                              f"{', '.join(ARCHITECTURE_NAMES)}") from None


def from_sae_lens(name: Any, training_architecture: Any, where: str) -> Architecture:
    """Our architecture for a SAELens 6 checkpoint: its training architecture when we have that one and
    SAELens saves it under ``name`` (BatchTopK -> jumprelu), else the inference architecture itself."""
    trained = ARCHITECTURES.get(training_architecture) if isinstance(training_architecture, str) else None
    if trained is not None and trained.sae_lens_name == name:
        return trained
    if isinstance(name, str):
        for arch in ARCHITECTURES.values():
            if arch.name == name and arch.sae_lens_name == name:
                return arch
    if name == "batchtopk":  # what SAELens's save_model writes for a BatchTopKTrainingSAE
        raise CheckpointError(f"{where}: field 'architecture' is 'batchtopk': a SAELens BatchTopK training checkpoint "
                              f"(BatchTopKTrainingSAE.save_model); save it with SAELens's save_inference_model "
                              f"instead (a JumpReLU SAE with the learned threshold, as its trainer does), which "
                              f"loads here as batchtopk")
    raise CheckpointError(f"{where}: field 'architecture' is {name!r}; SAELens architectures scored here: "
                          f"{', '.join(sorted({a.sae_lens_name for a in ARCHITECTURES.values()}))}")
