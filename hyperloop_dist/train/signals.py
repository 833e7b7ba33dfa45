"""Stop requests from the scheduler: SIGUSR1 (time limit or preemption near) and SIGTERM.

A handler only records the signal. Every step then settles whether *any* rank got one (ranks receive
signals at slightly different moments, and a checkpoint needs every rank), in the all-reduce that already
agrees on a finite loss (:func:`hyperloop_dist.train.nonfinite.all_finite`); the loop then saves and leaves
with ``REQUEUE_EXIT``, the status the sbatch template treats as "requeue me".
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

REQUEUE_EXIT = 75  # EX_TEMPFAIL: stopped early on request after a checkpoint; run the same command again
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequest:
    """Records SIGUSR1 / SIGTERM while installed; restores the previous handlers on ``uninstall``."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.everywhere = False  # set once every rank knows that some rank was signalled
        self._previous: dict[int, object] = {}

    def install(self) -> StopRequest:
        if threading.current_thread() is not threading.main_thread():
            return self  # Python delivers signals to the main thread only; nothing to record here
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._record)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "a signal on another rank"
