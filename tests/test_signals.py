"""Stop requests: a handler records SIGUSR1 / SIGTERM, the previous handlers come back afterwards."""

from __future__ import annotations

import os
import signal

from hyperloop_dist.train.nonfinite import all_finite
from hyperloop_dist.train.signals import REQUEUE_EXIT, StopRequest


def test_stop_request_records_and_restores() -> None:
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    stop = StopRequest().install()
    try:
        assert all_finite(0.0, stop) and not stop.everywhere
        os.kill(os.getpid(), signal.SIGTERM)  # recorded, not fatal
        os.kill(os.getpid(), signal.SIGUSR1)
        assert all_finite(0.0, stop) and stop.everywhere  # settled in the step's finite-loss collective
        assert stop.name == "SIGTERM"  # the first signal names the stop
    finally:
        stop.uninstall()
    assert {sig: signal.getsignal(sig) for sig in before} == before
    assert REQUEUE_EXIT == 75
