"""The one error type of the checkpoint format."""
from __future__ import annotations


class CheckpointError(Exception):
    """A checkpoint that cannot be written or read; one line naming the file (or spec) and the field."""
