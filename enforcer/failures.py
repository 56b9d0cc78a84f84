"""What the enforcer says when a request to a process fails: once per process and failure, not every tick."""
from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable

from ..core.procfs import alive
from .checkpointer import NotMoved

log = logging.getLogger("gpuwatch.enforcer.enforcer")


class Failures:
    def __init__(self, leaving: Callable[[int], bool]) -> None:
        """leaving: whether a process's interposer just disconnected (it is exiting)."""
        self.leaving = leaving
        self._said: dict[int, str] = {}  # each process's last failure, its figures left out

    def __call__(self, pid: int, what: str, exc: Exception) -> None:
        """A request that failed because the process just went away is no news; anything else is, once."""
        said = f"{what}: {exc}"
        shape = re.sub(r"\d+", "#", said)  # the same failure with other figures (host memory left) is the same
        if self._said.get(pid) == shape:
            log.debug("pid %d: %s (again)", pid, said)
            return
        self._said[pid] = shape
        if isinstance(exc, NotMoved):  # it runs on; the checkpointer counts timeouts and marks refusals
            log.info("%s", exc)
        elif not alive(pid) or self.leaving(pid):
            log.debug("pid %d: %s: it detached meanwhile (%s)", pid, what, exc)
        else:
            log.warning("pid %d: %s: %s", pid, what, exc)

    def keep(self, pids: Iterable[int]) -> None:
        """Forget the processes not among `pids` (gone)."""
        for pid in self._said.keys() - set(pids):
            del self._said[pid]
