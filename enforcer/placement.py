"""Several GPUs: each GPU is planned on its own (enforcer/scheduler.py); here a round's per-GPU verdicts become one
per process (it runs only where every GPU lets it), the per-GPU plans are kept for the view, and, where
`[scheduler] move_idle` is on, an idle process not under the interposer leaves an oversubscribed GPU for
another with room instead of being checkpointed to host memory (enforcer/mover.py)."""
from __future__ import annotations

import logging
from dataclasses import replace

from ..core.protocol import ControlError
from ..core.view import Snapshot
from .mover import Mover
from .roomstops import free_bytes
from .scheduler import Client, Decision, Scheduler, Verdict, strictest
from .settings import SchedulerSettings

log = logging.getLogger(__name__)
MOVE_AGAIN_AFTER_S = 60.0  # a process moved (or found unmovable) is left where it is this long: no ping-pong


class Placement:
    def __init__(self) -> None:
        self.mover: Mover | None = None  # None: nothing is moved between GPUs (no driver API, or tests)
        self.plans: dict[tuple[int, int], str] = {}  # (pid, GPU) -> its verdict there at the last round
        self._round: float | None = None
        self._verdicts: dict[tuple[int, int], str] = {}
        self._plain: dict[int, dict[int, int]] = {}  # not under the interposer: pid -> GPU -> what it needs there
        self._idle: dict[int, set[int]] = {}          # pid -> GPUs whose scheduler sees it idle
        self._contended: set[int] = set()
        self._tried: dict[int, float] = {}            # pid -> when the scheduler last moved it (or tried to)

    def planned(self, gpu: int, scheduler: Scheduler, clients: list[Client], decided: dict[int, Decision],
                decisions: dict[int, list[Decision]], now: float) -> None:
        """One GPU's verdicts of this round (`now`), added to `decisions` (pid -> a verdict per GPU)."""
        if now != self._round:
            self._round, self._verdicts, self._plain, self._idle, self._contended = now, {}, {}, {}, set()
        for pid, d in decided.items():
            decisions.setdefault(pid, []).append(d)
            self._verdicts[(pid, gpu)] = d.verdict.value
        for c in clients:
            if not c.interposed:
                self._plain.setdefault(c.pid, {})[gpu] = c.need_bytes
                if not scheduler.busy(c, now):
                    self._idle.setdefault(c.pid, set()).add(gpu)
        if scheduler.contended:
            self._contended.add(gpu)

    def combine(self, decisions: dict[int, list[Decision]]) -> dict[int, Decision]:
        """One verdict per process. A checkpoint moves a process not under the interposer as a whole: what it
        holds on every GPU counts as moved."""
        self.plans = dict(self._verdicts) if decisions else {}  # none: no GPU was planned this round
        out = {}
        for pid, ds in decisions.items():
            whole = pid in self._plain
            d = strictest(ds, whole)
            out[pid] = replace(d, swap_bytes=sum(self._plain[pid].values())) if whole and \
                d.verdict is Verdict.SWAP else d
        return out

    def relocate(self, decisions: dict[int, Decision], snap: Snapshot, settings: SchedulerSettings,
                 now: float) -> dict[int, Decision]:
        """move_idle: one idle process on one oversubscribed GPU moves to a GPU that nobody contends and that
        has room for it; it then runs there (its verdict here becomes RUN). At most one move a round."""
        if not settings.move_idle or self.mover is None or not self._contended:
            return decisions
        free = free_bytes(snap, settings.reserve_bytes, settings.context_bytes)
        for pid, on in sorted(self._plain.items()):
            if len(on) != 1 or now - self._tried.get(pid, float("-inf")) < MOVE_AGAIN_AFTER_S:
                continue
            ((gpu, need),) = on.items()
            verdict = decisions.get(pid, Decision(Verdict.STOP)).verdict
            if gpu not in self._contended or gpu not in self._idle.get(pid, set()) or \
                    verdict not in (Verdict.RUN, Verdict.SWAP) or self.mover.pauser.ledger.moved(pid)[0]:
                continue
            target = next((g for g, room in sorted(free.items(), key=lambda item: -item[1])
                           if g != gpu and g not in self._contended and room >= need), None)
            if target is None:
                continue
            self._tried[pid] = now
            try:
                self.mover.move(pid, target)
            except ControlError as exc:
                log.info("pid %d idles on oversubscribed GPU %d and was not moved to GPU %d: %s", pid, gpu, target,
                         exc)
                continue
            log.info("pid %d idled on oversubscribed GPU %d: moved to GPU %d ([scheduler] move_idle)", pid, gpu,
                     target)
            self._tried = {p: t for p, t in self._tried.items() if now - t < MOVE_AGAIN_AFTER_S}
            return {**decisions, pid: Decision(Verdict.RUN)}
        return decisions
