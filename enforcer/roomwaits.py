"""Waiting for device memory, bounded: which processes' allocations have waited long enough for room that is
not their turn, and get the driver's out-of-memory answer now."""
from __future__ import annotations

import logging
from collections.abc import Mapping

from .records import Enforcement
from .scheduler import Decision, Verdict

log = logging.getLogger(__name__)


class RoomWaits:
    def __init__(self) -> None:
        self._since: dict[int, float] = {}   # since when a process waits for room that is not its turn
        self._denied: dict[int, float] = {}  # when a process waiting for room that cannot come was refused

    def due(self, decisions: Mapping[int, Decision], pages: Mapping[int, Enforcement], now: float,
            unplaceable: set[int], patience: float) -> list[int]:
        """The processes to refuse now. A process waits for room at most `patience` seconds where waiting is
        not a turn: the plan says it may run yet its allocation still finds the device full (memory the plan
        cannot see, fragmentation), or what cannot move (processes without the interposer, unswappable
        memory, memory the host cannot take) leaves it no room. When its program asks again at once after a
        refusal (PyTorch retries once) while nothing changed, it is refused at once."""
        def waits(pid: int) -> bool:
            page = pages.get(pid)
            run = decisions.get(pid, Decision(Verdict.PAUSE)).verdict is Verdict.RUN
            return page is not None and bool(page.wanted_bytes) and (run or pid in unplaceable)

        for pid in [pid for pid in self._since if not waits(pid)]:
            del self._since[pid]
        for pid in [pid for pid, at in self._denied.items() if now - at >= patience]:
            del self._denied[pid]
        refuse = []
        for pid in decisions:
            if not waits(pid):
                continue
            since = self._since.setdefault(pid, now)
            if pid in unplaceable and pid in self._denied:
                refuse.append(pid)
                del self._since[pid]
            elif now - since >= patience:
                why = "what cannot move holds the device" if pid in unplaceable else "it could run"
                log.warning("pid %d: %d bytes found no room for %.0f s (%s): its allocation fails",
                            pid, pages[pid].wanted_bytes, now - since, why)
                refuse.append(pid)
                del self._since[pid]
                if pid in unplaceable:
                    self._denied[pid] = now
        return refuse
