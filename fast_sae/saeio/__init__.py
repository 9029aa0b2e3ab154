"""The SAE checkpoint format: the contract between train and evaluate (and SAELens users).

A checkpoint is a folder with ``sae_weights.safetensors`` (W_enc [d_in, d_sae], W_dec [d_sae, d_in],
b_enc [d_sae], b_dec [d_in], and ``threshold`` [d_sae] for jumprelu/batchtopk) and ``cfg.json`` in
SAELens 6's layout, with this project's records under ``metadata.fast_sae`` (checkpoint_format.md).
Weights are stored *folded*: they act on raw (un-normalised) residual activations, the training
normalisation factor being recorded for reference. ``schema.CheckpointConfig`` is the typed content
of cfg.json; ``layout`` reads and writes it; ``architectures`` holds each architecture's inference.
"""
from .architectures import ARCHITECTURE_NAMES, ARCHITECTURES, Architecture, get_architecture
from .errors import CheckpointError
from .format import SAE_CFG, SAE_WEIGHTS, LoadedSAE, load_sae, sae_from_parts, save_sae
from .layout import from_cfg_json, to_cfg_json
from .schema import (
    CacheIdentity,
    CheckpointConfig,
    Normalization,
    TrainingData,
    TrainingRun,
    id_ranges,
    layer_of_hook,
    resid_post_hook,
    to_plain,
)

__all__ = ["ARCHITECTURES", "ARCHITECTURE_NAMES", "Architecture", "CacheIdentity", "CheckpointConfig",
           "CheckpointError", "LoadedSAE", "Normalization", "SAE_CFG", "SAE_WEIGHTS", "TrainingData", "TrainingRun",
           "from_cfg_json", "get_architecture", "id_ranges", "layer_of_hook", "load_sae", "resid_post_hook",
           "sae_from_parts", "save_sae", "to_cfg_json", "to_plain"]
