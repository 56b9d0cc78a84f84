"""Pause and resume a process: through its interposer when it runs under `gpuwatch exec` (the gate closes,
memory may move to host memory); otherwise with the driver's lock (and checkpoint) where the driver has the
checkpoint API and the process is movable, else with SIGSTOP and SIGCONT. The ledger records whom and why."""
from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from typing import Any

from ..core.procfs import PF_KTHREAD, ProcStat, proc_stat
from ..core.protocol import ControlError
from ..core.checkpoint import CHECKPOINTED, RUNNING, CheckpointError
from ..core.vocabulary import PAUSED, STOPPED, pid_problem
from .checkpointer import Checkpointer, NotMoved
from .interposed import InterposedRegistry
from .ledger import HAND, QUOTA, SCHEDULER, Ledger

Room = Callable[[int, list[int]], bool]  # whether a GPU has room for a restore of so many bytes (gpus: where it was)

log = logging.getLogger(__name__)


def pid_argument(request: dict[str, Any]) -> int:
    pid = request.get("pid")
    if (problem := pid_problem(pid)) is not None:
        raise ControlError(f"{request['cmd']}: pid {problem}")
    assert type(pid) is int
    return pid


class Pauser:
    def __init__(self, interposed: InterposedRegistry, ledger: Ledger, checkpointer: Checkpointer | None = None,
                 room: Room = lambda nbytes, gpus: False, describe: Callable[[int], tuple[int, dict[int, int]]] =
                 lambda pid: (0, {})) -> None:
        """room: whether a restore fits now; describe: a plain process's device bytes, and those of each GPU it
        is on, from the view."""
        self.interposed, self.ledger = interposed, ledger
        self.checkpointer = checkpointer or Checkpointer(None, ledger, why_not="no driver")
        self.room, self.describe = room, describe

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
        stat = self._stoppable(pid)
        # a process stopped already (at an allocation, or by anyone) cannot answer the driver's lock: it is held
        # stopped instead
        if (self.checkpointer.movable(pid) and stat.state != "T") or self.ledger.moved(pid)[0]:
            nbytes, on_gpus = self.describe(pid)
            try:
                state = self.checkpointer.pause(pid, stat.start_time, by, swap, nbytes, sorted(on_gpus), on_gpus)
                return {"pid": pid, "interposed": False, "state": CHECKPOINTED if state == CHECKPOINTED else PAUSED,
                        **({"bytes": nbytes} if swap else {})}
            except NotMoved as exc:
                if swap or by != HAND or exc.retry or self.ledger.moved(pid)[0]:
                    raise
                # the driver refused (not a timeout): a pause by hand stops it with SIGSTOP instead
        if swap and stat.state == "T" and self.checkpointer.movable(pid):
            raise ControlError(f"pid {pid} is stopped (SIGSTOP) and cannot answer the driver's lock; continue it "
                               f"(kill -CONT {pid}) and ask again")
        if swap:
            why = self.checkpointer.unmovable(pid) or self.checkpointer.status()["why_not"]
            raise ControlError(f"pid {pid} does not run under the interposer and cannot be checkpointed ({why}), "
                               "so its memory cannot be swapped out (start it with `gpuwatch exec`); pause without "
                               "--swap stops it with SIGSTOP")
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
        if self.ledger.moved(pid)[0]:
            return self._resume_moved(pid, holders)
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

    def _resume_moved(self, pid: int, holders: set[str]) -> dict[str, Any]:
        """The driver holds it: restore (if the device has room) and unlock once the last holder lets go. A
        process that cannot come back yet is handed to the scheduler, which restores it when there is room."""
        if self.ledger.holders(pid) - holders:
            for holder in holders:
                self.ledger.release(pid, holder)
            return {"pid": pid, "interposed": False, "state": self.ledger.moved(pid)[0]}
        try:
            state = self.checkpointer.resume(pid, self.room)
        except CheckpointError as exc:
            raise ControlError(f"pid {pid} could not be unlocked: {exc}") from None
        if state == RUNNING:
            for holder in holders:
                self.ledger.release(pid, holder)
            log.info("pid %d continued (restored and unlocked)", pid)
            return {"pid": pid, "interposed": False, "state": RUNNING, "moved": True}
        stat = proc_stat(pid)
        if stat is not None:
            self.ledger.hold(pid, stat.start_time, SCHEDULER, signalled=False)
        for holder in holders - {SCHEDULER}:
            self.ledger.release(pid, holder)
        return {"pid": pid, "interposed": False, "state": CHECKPOINTED,
                "waiting": "the device has no room for it yet: the scheduler restores it as soon as there is"}

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
