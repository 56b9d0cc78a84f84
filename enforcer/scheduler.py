"""Time slices and oversubscription for one GPU: a pure decision function over what the processes need.

The enforcer feeds it the processes on a GPU and the time; it answers which may run now and how the
others make room. It keeps no clock of its own, so tests drive it with a simulated one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from ..core.vocabulary import Priority


class Verdict(str, Enum):
    RUN = "run"        # running, or resumed
    PAUSE = "pause"    # gate closed, memory stays on the device (interposed)
    SWAP = "swap"      # gate closed and `swap_bytes` moved to host memory (interposed); not under the interposer:
                       # locked and checkpointed, all it holds moved (the driver's checkpoint API)
    STOP = "stop"      # not under the interposer: locked (the driver's API) or SIGSTOP, its memory stays


@dataclass(frozen=True)
class Client:
    """One process on one GPU, as the scheduler sees it."""
    pid: int
    need_bytes: int          # device memory it must have to run: its allocations and its context
    movable_bytes: int = 0   # of that, what its interposer (or the driver's checkpoint, all of it) can move
    launches: int = 0        # cumulative launches: progress tells busy from idle
    priority: Priority = Priority.NORMAL
    interposed: bool = True
    exclusive: bool = False  # a rule asks for the GPU to itself
    waiting: bool = True     # held at the gate wanting to run (unknown without an interposer: assumed)
    fixed_bytes: int | None = None  # what stays on the device whatever happens to it (None: need - movable); an
                                    # interposed process's allocations still waiting will be movable once made

    @property
    def fixed(self) -> int:
        return self.need_bytes - self.movable_bytes if self.fixed_bytes is None else self.fixed_bytes


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    swap_bytes: int = 0
    reason: str | None = field(default=None, compare=False)  # why it does not run, in words (`ps` shows it)


@dataclass
class _History:
    launches: int = -1
    busy_at: float = float("-inf")   # when its launch count last moved
    running_since: float | None = None
    last_ran: float = float("-inf")  # when it last stopped running


@dataclass
class Scheduler:
    capacity: int                 # device bytes the processes may have between them
    quantum: float = 30.0         # seconds a holder keeps the GPU while others wait
    idle: float = 0.5             # a holder without launches this long gives up the rest of its slice
    switch_cost: float = 0.0      # seconds a switch that swaps takes: while sliced, idling shorter than this
                                  # is not worth giving the GPU away for
    slack: int = 0                # bytes moved beyond the running set's need, so that it can grow a little
                                  # (a training's first steps) without waiting for room again
    _seen: dict[int, _History] = field(default_factory=dict)
    _fresh: set[int] = field(default_factory=set)  # started running at the last decision
    contended: bool = False

    def decide(self, clients: list[Client], now: float) -> dict[int, Decision]:
        for gone in set(self._seen) - {c.pid for c in clients}:
            del self._seen[gone]
        for c in clients:
            h = self._seen.setdefault(c.pid, _History())
            if c.launches != h.launches:
                if h.launches >= 0:
                    h.busy_at = now
                h.launches = c.launches
        run = self._choose(clients, now)
        self._account(clients, run, now)
        return self._verdicts(clients, run, now)

    def busy(self, c: Client, now: float) -> bool:
        patience = max(self.idle, self.switch_cost) if self.contended else self.idle
        return now - self._seen[c.pid].busy_at < patience

    def wants(self, c: Client, now: float) -> bool:
        """A holder wants the GPU while it launches (a fresh slice counts as busy); a waiter while it waits."""
        return self.busy(c, now) if self._seen[c.pid].running_since is not None else c.waiting

    def _choose(self, clients: list[Client], now: float) -> set[int]:
        top = max((c.priority for c in clients if self.wants(c, now)), default=None)
        fits = sum(c.need_bytes for c in clients) <= self.capacity and not any(c.exclusive for c in clients)
        self.contended = not fits
        if fits:  # no contention for memory: all run, but a busy higher class pushes lower ones aside
            return {c.pid for c in clients if top is None or c.priority >= top or self._stopped_long_enough(c, now)}
        run: set[int] = set()
        for c in sorted(clients, key=lambda c: self._rank(c, top, now)):
            if self._feasible(clients, run | {c.pid}):
                run.add(c.pid)
        # A process without the interposer is never stopped to make memory room: its memory stays on the
        # device, so stopping it helps nobody. Only an exclusive rule keeps it out.
        for c in clients:
            if not c.interposed and not c.movable_bytes and c.pid not in run and \
                    self._feasible(clients, run | {c.pid}, memory=False):
                run.add(c.pid)
        return run

    def _stopped_long_enough(self, c: Client, now: float) -> bool:
        """A process without the interposer is stopped for a priority at most one quantum at a time, then runs
        for at least `idle`: stopping is never open-ended."""
        if c.interposed:
            return False
        h = self._seen[c.pid]
        if h.running_since is not None:
            return now - h.running_since < self.idle
        return now - h.last_ran >= self.quantum if h.last_ran > float("-inf") else False

    def _rank(self, c: Client, top: Priority | None, now: float) -> tuple:
        h = self._seen[c.pid]
        running = h.running_since is not None
        holding = h.running_since is not None and now - h.running_since < self.quantum
        # Least recently run first; a holder past its quantum counts as running now, so waiters go before it.
        recency = now if running else h.last_ran
        outranked = top is not None and c.priority < top
        return (outranked, not self.wants(c, now), -c.priority, not holding, recency, c.pid)

    def _feasible(self, clients: list[Client], run: set[int], memory: bool = True) -> bool:
        if len(run) > 1 and any(c.exclusive for c in clients if c.pid in run):
            return False
        resident = sum(c.need_bytes if c.pid in run else c.fixed for c in clients)
        return not memory or resident <= self.capacity

    def placeable(self, c: Client, clients: list[Client]) -> bool:
        """Whether it could run at all beside what cannot move (processes without the interposer, memory
        that cannot be swapped): if not, it waits for others to exit or free memory, not for a turn."""
        fixed = sum(o.fixed for o in clients if o.pid != c.pid)
        return fixed + c.need_bytes <= self.capacity

    def started(self, at: float) -> None:
        """The moves that let the last decision's newcomers run ended at `at`: their slices start then, not
        when the decision was made (a checkpoint of 60 GiB takes 30 s, which is no part of anyone's slice)."""
        for pid in self._fresh:
            h = self._seen.get(pid)
            if h is not None and h.running_since is not None:
                h.running_since = max(h.running_since, at)
                h.busy_at = max(h.busy_at, at)
        self._fresh = set()

    def _account(self, clients: list[Client], run: set[int], now: float) -> None:
        self._fresh = set()
        for c in clients:
            h = self._seen[c.pid]
            if c.pid in run and h.running_since is None:
                self._fresh.add(c.pid)
                h.running_since = now
                h.busy_at = max(h.busy_at, now)  # a fresh slice starts busy: the gate just opened
            elif c.pid not in run and h.running_since is not None:
                h.running_since = None
                h.last_ran = now

    def _verdicts(self, clients: list[Client], run: set[int], now: float) -> dict[int, Decision]:
        # Room is made only for a running set: with nobody able to run (memory still being freed), nothing moves.
        excess = sum(c.need_bytes for c in clients) - self.capacity if run else 0
        excess += self.slack if excess > 0 else 0
        out: dict[int, Decision] = {}
        # Make room from those that ran least recently first, and only as much as the running set needs: first
        # from interposed processes (fast), then idle processes without the interposer, then busy ones (a
        # checkpoint moves all they hold, about 25 times slower).
        for c in sorted(clients, key=lambda c: (not c.interposed, not c.interposed and self.busy(c, now),
                                                self._seen[c.pid].last_ran)):
            if c.pid in run:
                out[c.pid] = Decision(Verdict.RUN)
                continue
            reason = self._reason(c, clients, run, now)
            if not c.interposed:
                moves = excess > 0 and c.movable_bytes > 0
                excess -= c.movable_bytes if moves else 0
                out[c.pid] = Decision(Verdict.SWAP, c.movable_bytes, reason) if moves else \
                    Decision(Verdict.STOP, reason=reason)
            elif excess > 0 and c.movable_bytes > 0:
                moved = min(excess, c.movable_bytes)
                excess -= moved
                out[c.pid] = Decision(Verdict.SWAP, moved, reason)
            else:
                out[c.pid] = Decision(Verdict.PAUSE, reason=reason)
        return out

    def _reason(self, c: Client, clients: list[Client], run: set[int], now: float) -> str:
        running = [o for o in clients if o.pid in run]
        exclusive = next((o for o in running if o.exclusive), None)
        if exclusive is not None or (c.exclusive and running):
            return f"exclusive use by pid {(exclusive or running[0]).pid}"
        higher = [o for o in running if o.priority > c.priority and self.wants(o, now)]
        if higher:
            return f"preempted by pid {higher[0].pid}"
        if not self.placeable(c, clients):
            return "waiting for device memory"
        holders = [o for o in running if o.interposed] or running
        return f"slice of pid {holders[0].pid}" if holders else "waiting for device memory"


@dataclass
class SwitchCost:
    """What moving memory between the device and host memory costs, learnt from the switches the enforcer
    makes: a switch moves the excess out and back in, so it costs twice the excess at the swap rate.

    Only moves of at least `min_sample` bytes teach it: a small move is all fixed cost, and taking it for a
    rate would make a large switch look cheap and the quantum short."""
    bytes_per_s: float = 20e9      # until measured: the first swap-out also pins host memory (docs/benchmarks.md)
    latency: float = 0.05          # gate, drain and synchronize, per switch
    min_sample: int = 2 << 30
    measured: bool = False

    def observe(self, moved_bytes: int, seconds: float) -> None:
        if moved_bytes < self.min_sample or seconds <= 0:
            return
        rate = moved_bytes / seconds
        self.bytes_per_s = rate if not self.measured else (self.bytes_per_s + rate) / 2
        self.measured = True

    def switch_seconds(self, excess_bytes: int) -> float:
        """A switch that makes room for `excess_bytes`: out, then the same back in for the other side."""
        return self.latency + 2 * excess_bytes / self.bytes_per_s if excess_bytes > 0 else 0.0


def default_quantum(switch_seconds: float, overhead: float = 0.05, floor: float = 1.0) -> float:
    """A slice long enough that switching (swap-out plus swap-in) costs at most `overhead` of the time."""
    return max(floor, switch_seconds / overhead)


def strictest(decisions: list[Decision], whole: bool = False) -> Decision:
    """A process on several GPUs runs only if every GPU lets it; its swap is the largest asked for. `whole`: the
    process moves as a whole (not under the interposer: a checkpoint): a checkpoint asked for by one GPU wins
    over a stop asked for by another, since it frees the process's memory on every GPU and a stop frees none
    (it does not run either way)."""
    order = [Verdict.RUN, Verdict.PAUSE, Verdict.STOP, Verdict.SWAP] if whole else \
        [Verdict.RUN, Verdict.PAUSE, Verdict.SWAP, Verdict.STOP]
    worst = max(decisions, key=lambda d: order.index(d.verdict))
    return Decision(worst.verdict, max(d.swap_bytes for d in decisions), worst.reason)
