"""Stop requests: SIGTERM (a cluster scheduler preempting the job) and SIGINT (Ctrl-C) turned into a flag that a
long loop checks between its units of work (a training step, a predicted case), so that it can save what it has and
end cleanly instead of dying half-way.

SLURM and Kubernetes send SIGTERM, wait a grace period (30 s by default; ``torchrun --shutdown-timeout``, SLURM's
``KillWait``, a pod's ``terminationGracePeriodSeconds``), then SIGKILL. ``torchrun`` forwards the signals it receives
to every worker process.

Examples:
    >>> with StopRequest() as stop:  # doctest: +SKIP
    ...     for case in cases:
    ...         if stop.requested:
    ...             raise Interrupted(f"stopped by {stop.signal_name} after {done} case(s)", stop.signum)
    ...         predict_one(case)
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

HANDLED = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """While entered, SIGTERM and SIGINT set :attr:`requested` (and :attr:`signum`, the first signal received)
    instead of ending the process; leaving restores the previous handlers.

    ``escalate``: a second SIGINT while a stop is pending raises :class:`KeyboardInterrupt` at once (Ctrl-C twice
    abandons the work; an atomic write under way leaves the previous file). Keep it off where one interrupt
    arrives twice by design: ``torchrun`` forwards the terminal's Ctrl-C to workers that already got it.

    Handlers can only be installed from the main thread; elsewhere the object stays inert (``requested`` is never
    set) and the process reacts to signals as before.
    """

    def __init__(self, escalate: bool = True):
        self.escalate = escalate
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Only set a flag here: logging or I/O inside a signal handler can deadlock on a lock the interrupted
        # code holds.
        if self.signum is not None and self.escalate and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is None:
            self.signum = signum

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in HANDLED:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
