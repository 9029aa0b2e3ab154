"""The one exception evaluation raises for bad inputs; the CLI turns it into a one-line ``Error: ...``."""
from __future__ import annotations


class EvalError(Exception):
    """An input evaluation cannot use (bad SAE folder, cache/layer/d_model mismatch...); one line."""
