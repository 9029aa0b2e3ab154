"""The model layer shared by the stages: loading a model and its tokenizer (any hub id, local folder or
the embedded default) and reading or rewriting decoder-block outputs. Harvest and evaluate both use
it; it knows nothing of caches or SAEs."""
from .blocks import block_hidden, decoder_layers, map_block_output, model_info
from .embedded import EMBEDDED_HUB_ID, EMBEDDED_MODEL, embedded_model_dir, home
from .errors import ModelLoadError
from .loading import DTYPES, load_model, load_tokenizer, resolve
from .truncate import local_checkpoint, truncated_checkpoint

__all__ = ["DTYPES", "EMBEDDED_HUB_ID", "EMBEDDED_MODEL", "ModelLoadError", "block_hidden", "decoder_layers",
           "embedded_model_dir", "home", "load_model", "load_tokenizer", "local_checkpoint", "map_block_output",
           "model_info", "resolve", "truncated_checkpoint"]
