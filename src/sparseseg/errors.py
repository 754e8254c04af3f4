"""The one exception type the CLI reports as a single line (file and problem) with a non-zero exit."""

from __future__ import annotations

from pathlib import Path


class SparsesegError(Exception):
    """A user-facing error: bad input file, bad checkpoint, bad argument. The message is one line."""

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = None if path is None else str(path)
        super().__init__(f"{path}: {message}" if path is not None else message)


class InputError(SparsesegError, ValueError):
    """An input file (image, label, dataset.json, checkpoint) is missing, unreadable or inconsistent."""
