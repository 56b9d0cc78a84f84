"""Pause and resume a process: through its interposer when it runs under `gpuwatch exec` (the gate closes,
memory may move to host memory), with SIGSTOP and SIGCONT otherwise (the ledger records whom and why)."""
from __future__ import annotations

import logging
import os
import signal
from typing import Any

from ..core.procfs import PF_KTHREAD, ProcStat, proc_stat
from ..core.protocol import ControlError
from ..core.vocabulary import STOPPED, pid_problem
from .interposed import InterposedRegistry
from .ledger import HAND, QUOTA, Ledger

log = logging.getLogger(__name__)


def pid_argument(request: dict[str, Any]) -> int:
    pid = request.get("pid")
    if (problem := pid_problem(pid)) is not None:
        raise ControlError(f"{request['cmd']}: pid {problem}")
    assert type(pid) is int
    return pid


class Pauser:
    def __init__(self, interposed: InterposedRegistry, ledger: Ledger) -> None:
        self.interposed, self.ledger = interposed, ledger

    def pause(self, pid: int, swap: bool = False, nbytes: int = 0, by: str = HAND) -> dict[str, Any]:
        process = self.interposed.get(pid)
        if process is not None:
            stat = proc_stat(pid)
            if by == HAND and stat is not None:  # held until `gpuwatch resume` or exit: the scheduler plans around it
                self.ledger.hold(pid, stat.start_time, HAND, signalled=False)
            try:
                reply = process.requests.swap_out(nbytes) if swap else process.requests.pause()
            except ControlError:
                if by == HAND:
                    self.ledger.release(pid, HAND)
                raise
            result: dict[str, Any] = {"pid": pid, "interposed": True, "state": reply.state}
            if swap:
                result["bytes"] = reply.moved_bytes
            return result
        if swap:
            raise ControlError(f"pid {pid} does not run under the interposer, so its memory cannot be swapped out "
                               "(start it with `gpuwatch exec`); pause without --swap stops it with SIGSTOP")
        stat = self._stoppable(pid)
        self.ledger.hold(pid, stat.start_time, by)
        try:
            os.kill(pid, signal.SIGSTOP)
        except ProcessLookupError:
            self.ledger.forget(pid)
            raise ControlError(f"no process with pid {pid}") from None
        log.info("pid %d stopped (SIGSTOP)", pid)
        return {"pid": pid, "interposed": False, "state": STOPPED}

    def resume(self, pid: int, by: str | None = None) -> dict[str, Any]:
        """By hand (`by` None): undo a pause, by hand or by the scheduler; a quota stop stays. Else what `by`
        stopped."""
        process = self.interposed.get(pid)
        if process is not None:
            if by is None:
                self.ledger.release(pid, HAND)
            return {"pid": pid, "interposed": True, "state": process.requests.resume().state}
        holders = self.ledger.holders(pid) - {QUOTA}
        if by is not None:
            holders &= {by}
        if not holders:
            if proc_stat(pid) is None:
                raise ControlError(f"no process with pid {pid}")
            raise ControlError(f"pid {pid} was not paused by gpuwatch")
        free = False
        for holder in holders:
            free = self.ledger.release(pid, holder)
        try:
            if free:
                os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            raise ControlError(f"no process with pid {pid}") from None
        log.info("pid %d continued (SIGCONT)", pid)
        return {"pid": pid, "interposed": False, "state": "running"}

    def held(self, pid: int, by: str | None = None) -> bool:
        """Whether the daemon holds the process stopped (for `by`, or for anyone)."""
        return self.ledger.holds(pid, by)

    @staticmethod
    def _stoppable(pid: int) -> ProcStat:
        stat = proc_stat(pid)
        if stat is None:
            raise ControlError(f"no process with pid {pid}")
        if pid == 1 or pid == os.getpid():
            raise ControlError(f"will not stop pid {pid}: it is {'init' if pid == 1 else 'the gpuwatch daemon'}")
        if stat.flags & PF_KTHREAD:
            raise ControlError(f"will not stop pid {pid}: it is a kernel thread")
        return stat
