"""The exception types the CLI reports as a single line (file and problem) with a non-zero exit.

Exit codes: 2 for a bad input, argument or output folder (:class:`InputError`, any :class:`SparsesegError`),
74 for a file that could not be written (:class:`WriteError`, ``EX_IOERR`` of ``sysexits.h``), 128 + the signal
number for a run stopped by SIGTERM (143) or SIGINT (130) (:class:`Interrupted`).
"""

from __future__ import annotations

import errno as errno_codes
import signal
from pathlib import Path


class SparsesegError(Exception):
    """A user-facing error: bad input file, bad checkpoint, bad argument. The message is one line."""

    exit_code = 2
    label = "error"  # the CLI prints ``sparseseg COMMAND: LABEL: MESSAGE``

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = None if path is None else str(path)
        super().__init__(f"{path}: {message}" if path is not None else message)


class InputError(SparsesegError, ValueError):
    """An input file (image, label, dataset.json, checkpoint) is missing, unreadable or inconsistent."""


DISK_FULL = (errno_codes.ENOSPC, errno_codes.EDQUOT)


class WriteError(SparsesegError):
    """A file could not be written (disk full, quota, read-only file system, permission). Raised by
    :func:`sparseseg.data.io.atomic_write` after it removed its temporary, so the previous file (if any) is
    intact. ``errno`` is the operating system's code; ``needed`` and ``free`` are bytes where known (else None);
    ``previous_kept`` says whether ``path`` existed before (and still holds its previous content).

    Examples:
        >>> err = WriteError("run/last.pt", 28, "no space left on device", needed=4_000_000, free=1_000_000)
        >>> str(err)
        'run/last.pt: cannot write: no space left on device (needs about 4.0 MB, 1.0 MB free); nothing was written'
        >>> err.disk_full, err.exit_code
        (True, 74)
    """

    exit_code = 74

    def __init__(self, path: str | Path, errno: int | None, reason: str, *, needed: int | None = None,
                 free: int | None = None, previous_kept: bool = False, hint: str = ""):
        self.errno, self.needed, self.free, self.previous_kept = errno, needed, free, previous_kept
        sizes = [f"needs about {format_size(needed)}" if needed is not None else "",
                 f"{format_size(free)} free" if free is not None else ""]
        detail = ", ".join(s for s in sizes if s)
        kept = "the previous file is intact" if previous_kept else "nothing was written"
        message = f"cannot write: {reason}{f' ({detail})' if detail else ''}; {kept}{f'; {hint}' if hint else ''}"
        self.reason, self.hint = reason, hint
        super().__init__(message, path)

    @property
    def disk_full(self) -> bool:
        """No space left on the device (or the user's quota): later writes to the same disk fail as well."""
        return self.errno in DISK_FULL

    def with_hint(self, hint: str) -> WriteError:
        """The same error with ``hint`` (what the user can do next) appended to the message."""
        return WriteError(self.path, self.errno, self.reason, needed=self.needed, free=self.free,
                          previous_kept=self.previous_kept, hint=hint)


class Interrupted(SparsesegError):
    """A run stopped on request (SIGTERM from a scheduler, SIGINT from Ctrl-C) after saving what it can; the
    message says what was kept and how to continue. Exits with 128 + the signal number, as a shell reports a
    process ended by that signal."""

    label = "stopped"

    def __init__(self, message: str, signum: int, path: str | Path | None = None):
        self.signum = int(signum)
        self.exit_code = 128 + self.signum
        super().__init__(message, path)

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


def format_size(size: int) -> str:
    """``9_000_000`` -> ``'9.0 MB'`` (decimal units, as ``df -H`` shows)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"
