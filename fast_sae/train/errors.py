"""The train stage's user-facing error, in its own module so that the checkpoint and run-folder
helpers can raise it without importing the trainer."""
from __future__ import annotations


class RunError(Exception):
    """A run that cannot start or continue; the message is one line."""
