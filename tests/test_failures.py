"""A request to a process that keeps failing is said once (on the H200 the same "could not make room" filled 2,100
log lines in two minutes), not again for other figures, again when the failure changes or the process comes back."""
from __future__ import annotations

import logging
import os

from gpuwatch.core.protocol import ControlError
from gpuwatch.enforcer.failures import Failures


def test_a_failure_is_said_once_per_process_and_kind(caplog) -> None:
    failed = Failures(lambda pid: False)
    me = os.getpid()  # alive: its failures are news
    with caplog.at_level(logging.INFO, logger="gpuwatch"):
        for spare in (100, 100, 99, 98):
            failed(me, "could not make room", ControlError(f"{spare} MiB spare"))
        failed(me, "could not make room", ControlError("the driver refused"))
        failed(me, "could not resume", ControlError("the driver refused"))
        failed.keep(set())  # it left the view
        failed(me, "could not resume", ControlError("the driver refused"))
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert said == [f"pid {me}: could not make room: 100 MiB spare",
                    f"pid {me}: could not make room: the driver refused",
                    f"pid {me}: could not resume: the driver refused",
                    f"pid {me}: could not resume: the driver refused"]
