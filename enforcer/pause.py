"""Pause and resume a process: through its interposer when it runs under `gpuwatch exec` (the gate closes,
memory may move to host memory), with SIGSTOP and SIGCONT otherwise (the daemon records whom it stopped)."""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..probes.model import STATES, Enforcement
from ..probes.procinfo import PF_KTHREAD, ProcStat, proc_stat
from .control import ControlError
from .interposed import InterposedRegistry, printable

log = logging.getLogger(__name__)
def pid_argument(request: dict[str, Any]) -> int:
    pid = request.get("pid")
    if type(pid) is not int or pid <= 0:
        raise ControlError(f"{request['cmd']}: pid must be a positive integer")
    return pid


class Pauser:
    def __init__(self, interposed: InterposedRegistry, held: Callable[[int], bool] = lambda pid: False,
                 state_file: Path | None = None) -> None:
        self.interposed = interposed
        self.held = held  # stopped at its quota too: a SIGCONT would let the crossing allocation through
        self._stopped: dict[int, int] = {}  # pid -> start time of the processes this daemon stopped
        self._lock = threading.Lock()
        self.state_file = state_file  # survives a crash: the next daemon continues what this one stopped

    def recover(self) -> None:
        """At start: continue what a previous daemon stopped and could not continue (it was killed)."""
        try:
            entries = json.loads(self.state_file.read_text()) if self.state_file else {}
        except (OSError, ValueError):
            entries = {}
        for pid, start in (entries.items() if isinstance(entries, dict) else []):
            stat = proc_stat(int(pid)) if str(pid).isdigit() else None
            if stat is not None and stat.start_time == start and stat.state == "T" and not self.held(int(pid)):
                os.kill(int(pid), signal.SIGCONT)
                log.info("pid %s continued (SIGCONT): a previous daemon stopped it", pid)
        self._save()

    def _save(self) -> None:
        if not self.state_file:
            return
        with self._lock:
            data = json.dumps({str(pid): start for pid, start in self._stopped.items()})
        try:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.state_file.with_name(self.state_file.name + ".tmp")
            tmp.write_text(data)
            os.replace(tmp, self.state_file)
        except OSError as exc:
            log.warning("cannot write %s: %s", self.state_file, exc)

    def pause(self, pid: int, swap: bool = False, nbytes: int = 0) -> dict[str, Any]:
        process = self.interposed.get(pid)
        if process is not None:
            timeout = self.interposed.request_timeout
            reply = process.request("swap_out", timeout, bytes=nbytes) if swap else process.request("pause", timeout)
            result: dict[str, Any] = {"pid": pid, "interposed": True, "state": _state(reply, "swapped" if swap
                                                                                      else "paused")}
            if swap:
                moved = reply.get("bytes")
                result["bytes"] = moved if type(moved) is int and moved >= 0 else None
            return result
        if swap:
            raise ControlError(f"pid {pid} does not run under the interposer, so its memory cannot be swapped out "
                               "(start it with `gpuwatch exec`); pause without --swap stops it with SIGSTOP")
        stat = self._stoppable(pid)
        try:
            os.kill(pid, signal.SIGSTOP)
        except ProcessLookupError:
            raise ControlError(f"no process with pid {pid}") from None
        with self._lock:
            self._stopped[pid] = stat.start_time
        self._save()
        log.info("pid %d stopped (SIGSTOP)", pid)
        return {"pid": pid, "interposed": False, "state": "stopped"}

    def resume(self, pid: int) -> dict[str, Any]:
        process = self.interposed.get(pid)
        if process is not None:
            reply = process.request("resume", self.interposed.request_timeout)
            return {"pid": pid, "interposed": True, "state": _state(reply, "running")}
        if not self._stopped_by_us(pid):
            if proc_stat(pid) is None:
                raise ControlError(f"no process with pid {pid}")
            raise ControlError(f"pid {pid} was not paused by gpuwatch")
        with self._lock:
            self._stopped.pop(pid, None)
        self._save()
        try:
            if not self.held(pid):
                os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            raise ControlError(f"no process with pid {pid}") from None
        log.info("pid %d continued (SIGCONT)", pid)
        return {"pid": pid, "interposed": False, "state": "running"}

    def _stoppable(self, pid: int) -> ProcStat:
        stat = proc_stat(pid)
        if stat is None:
            raise ControlError(f"no process with pid {pid}")
        if pid == 1 or pid == os.getpid():
            raise ControlError(f"will not stop pid {pid}: it is {'init' if pid == 1 else 'the gpuwatch daemon'}")
        if stat.flags & PF_KTHREAD:
            raise ControlError(f"will not stop pid {pid}: it is a kernel thread")
        return stat

    def stopped(self, pid: int) -> bool:
        """Whether this daemon stopped `pid` (and it is still that process)."""
        return self._stopped_by_us(pid)

    def _stopped_by_us(self, pid: int) -> bool:
        with self._lock:
            start = self._stopped.get(pid)
        stat = proc_stat(pid)
        if start is not None and (stat is None or stat.start_time != start):
            with self._lock:
                self._stopped.pop(pid, None)  # it exited; the pid may be another process's now
            return False
        return start is not None

    def enforcement(self) -> dict[int, Enforcement]:
        with self._lock:
            pids = list(self._stopped)
        return {pid: Enforcement(pid=pid, interposed=False, state="stopped") for pid in pids
                if self._stopped_by_us(pid)}

    def continue_all(self) -> None:
        """The daemon is stopping: nothing it stopped stays stopped."""
        with self._lock:
            stopped, self._stopped = self._stopped, {}
        for pid, start in stopped.items():
            stat = proc_stat(pid)
            if stat is not None and stat.start_time == start:
                try:
                    if not self.held(pid):
                        os.kill(pid, signal.SIGCONT)
                    log.info("pid %d continued (SIGCONT): the daemon is stopping", pid)
                except ProcessLookupError:
                    pass
        self._save()


def _state(reply: dict[str, Any], expected: str) -> str:
    state = reply.get("state", expected)
    return state if state in STATES else printable(state, 20)
