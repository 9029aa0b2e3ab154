"""The one error the model layer raises."""
from __future__ import annotations


class ModelLoadError(Exception):
    """The model or tokenizer cannot be loaded; one line saying what to do."""
