"""The SAE checkpoint format: the contract between train and evaluate (and SAELens users).

A checkpoint is a folder with ``sae_weights.safetensors`` (W_enc [d_in, d_sae], W_dec [d_sae, d_in],
b_enc [d_sae], b_dec [d_in], and ``threshold`` [d_sae] for jumprelu/batchtopk) and ``cfg.json`` in
SAELens' field names. Weights are stored *folded*: they act on raw (un-normalised) residual
activations, the training normalisation factor being recorded in cfg.json for reference.
"""
from .format import SAE_CFG, SAE_WEIGHTS, CheckpointError, LoadedSAE, load_sae, save_sae

__all__ = ["CheckpointError", "LoadedSAE", "SAE_CFG", "SAE_WEIGHTS", "load_sae", "save_sae"]
