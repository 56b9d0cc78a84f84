"""The enforcer's loop: for every GPU, ask the scheduler who runs, then make it so.

Processes under the interposer are paused, swapped out and resumed through their libraries; others are
locked, checkpointed and restored by the driver where it can (enforcer/plainplan.py), else stopped and
continued with signals (the ledger records it). Everything it reads comes from the one view and the pages
that view was built from; what it decides shows up in the next view (states, waits, preemptions)."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial

from ..core import threads
from ..core.protocol import ControlError
from ..core.view import HostMemory, ProcessGpu, SchedulerSummary, Snapshot
from ..core.vocabulary import CHECKPOINTED, PRIORITY_NAMES, STOPPED, WAITING_FOR_HOST_MEMORY, Priority
from .hostmemory import HostBudget, new_pinned_bytes
from .interposed import InterposedRegistry
from .failures import Failures
from .ledger import ROOM, SCHEDULER
from .pause import Pauser
from .requests import Aside
from .placement import Placement
from .plainplan import PlainPlanner
from .roomstops import RoomStops
from .roomwaits import RoomWaits
from .records import Enforcement
from .scheduler import Client, Decision, Scheduler, SwitchCost, Verdict, default_quantum
from .settings import WAIT_BUCKETS, SchedulerSettings, SchedulingStats, account
from .view import SchedulingFigures

log = logging.getLogger(__name__)
# A process whose interposer disconnected is almost always exiting, its driver freeing its memory: for this
# long it is not scheduled (never stopped, nobody swapped out for it), its memory only counts as taken.
LEAVING_S = 30.0


class Enforcer:
    def __init__(self, view: Callable[[], tuple[Snapshot, Mapping[int, Enforcement]]], interposed: InterposedRegistry,
                 pauser: Pauser, settings: SchedulerSettings = SchedulerSettings(),
                 priority_of: Callable[[int], Priority | None] = lambda pid: None,
                 exclusive: Callable[[int], bool] = lambda pid: False, host: HostBudget | None = None,
                 room: RoomStops | None = None) -> None:
        """view: the one view and the interposers' pages it was built from; host: the host memory budget
        (None: swap-outs are not held to one); room: allocations of processes without the interposer that wait
        for room (None: never stopped for room)."""
        self.view, self.interposed, self.pauser, self.settings, self.host = view, interposed, pauser, settings, host
        self.plain, self.placement = PlainPlanner(pauser, host, room), Placement()
        self.priority_of, self.exclusive = priority_of, exclusive
        self.stats: dict[int, SchedulingStats] = {}
        self._waits = SchedulingStats()         # every wait of every process, for the histogram
        self._schedulers: dict[int, Scheduler] = {}
        self._bounded: set[int] = set()        # told to bound their launch queues
        self.room_waits = RoomWaits()
        self.reasons: dict[int, str] = {}      # why each process the scheduler holds back does not run
        self._short_of_host: set[int] = set()  # waited last tick for room the host budget refused
        self._left_alone: set[int] = set()     # waiting for room that cannot come: sent nothing this tick
        self._warned: dict[int, float] = {}    # when each "not swapped out" was last logged
        self._dropping: set[int] = set()        # asked to give back kept pinned memory; the answer is pending
        self.switch_cost = SwitchCost()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="gpuwatch-enforce")
        self._failed = Failures(lambda pid: self.interposed.get(pid) is None and
                                pid in self.interposed.detached_within(LEAVING_S))
        self._aside = Aside(self._failed)  # requests no tick waits for: no_room, bound, drop_host
        self._thread = threading.Thread(target=threads.supervised("gpuwatch-scheduler", self._loop, self._stop),
                                        name="gpuwatch-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._aside.close()

    def summary(self) -> SchedulerSummary:  # the wait buckets are cumulative already (SchedulingStats.waited)
        return SchedulerSummary(tuple(zip(WAIT_BUCKETS, self._waits.wait_buckets)), self._waits.wait_count,
                                self._waits.wait_seconds)

    def scheduling(self) -> dict[int, SchedulingFigures]:
        """What the scheduler did to each process, for the view."""
        return {pid: SchedulingFigures(s.slice_seconds, s.wait_seconds, s.preemptions)
                for pid, s in list(self.stats.items())}

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.tick_s if self.interposed.pids() or self._stopping_anyone() or
                                  self.plain.room_on() else 1.0):
            try:
                self.tick(time.monotonic())
            except Exception:  # one bad tick must not end scheduling
                log.exception("scheduling tick failed")

    # one decision round

    def _stopping_anyone(self) -> bool:
        return any(by & {SCHEDULER, ROOM} for by in self.pauser.ledger.stopped().values())

    def tick(self, now: float) -> dict[int, Decision]:
        began, (snap, pages) = time.monotonic(), self.view()
        self.plain.begin(snap, now, {pid for pid, page in pages.items() if page.wanted_bytes})
        self._failed.keep({r.pid for r in snap.processes} | set(self.plain.wanted))
        decisions: dict[int, list[Decision]] = {}
        leaving = self.interposed.detached_within(LEAVING_S) - set(pages)
        # paused by hand or stopped at a quota: planned around, never resumed or stopped by the scheduler
        held = {pid for pid, by in self.pauser.ledger.stopped().items() if by - {SCHEDULER, ROOM}}
        unplaceable: set[int] = set()
        hopeless: set[int] = set()  # cannot fit even alone
        self._host_bound: dict[int, int] = {}  # what a process could move but for the host budget
        short_of_host: set[int] = set()
        # the view read the host with these same pages: one reading serves the whole tick
        host = snap.host if snap.host is not None or self.host is None else self.host.reading(pages)
        for gpu in snap.gpus:
            capacity = self._capacity(gpu.memory_total)
            clients = self._clients(snap, gpu.index, pages, leaving, held, host)
            if capacity is None or not clients:
                self._schedulers.pop(gpu.index, None)
                continue
            scheduler = self._schedulers.setdefault(gpu.index, Scheduler(capacity))
            usable = max(capacity - self._fixed_bytes(snap, gpu.index, pages, leaving, held), 0)
            excess = sum(c.need_bytes for c in clients) - usable
            fast = min(excess, sum(c.movable_bytes for c in clients if c.interposed))  # the rest: checkpoints
            switch = self.switch_cost.switch_seconds(fast) + \
                self.pauser.checkpointer.cost.switch_seconds(excess - max(fast, 0))
            scheduler.capacity, scheduler.idle, scheduler.switch_cost = usable, self.settings.idle_s, switch
            scheduler.quantum, scheduler.slack = self.settings.quantum_s or default_quantum(switch), capacity // 50
            self.placement.planned(gpu.index, scheduler, clients, scheduler.decide(clients, now), decisions, now)
            for c in clients:
                if not (pages.get(c.pid) and pages[c.pid].wanted_bytes) and c.pid not in self.plain.wanted:
                    continue
                if c.need_bytes > capacity:
                    self._deny(c.pid)  # it cannot fit even alone: its allocation fails as the driver said
                    hopeless.add(c.pid)
                elif not scheduler.placeable(c, clients):
                    unplaceable.add(c.pid)  # what cannot move holds the room: it waits, bounded
                    unbounded = [replace(o, movable_bytes=self._host_bound[o.pid],
                                         fixed_bytes=o.fixed - (self._host_bound[o.pid] - o.movable_bytes))
                                 if o.pid in self._host_bound else o for o in clients]
                    if scheduler.placeable(c, unbounded):
                        short_of_host.add(c.pid)  # it would fit if the host could take what others hold
        self._bound_queues(snap, pages)
        combined = self.placement.combine(decisions)
        # Waiting for room that cannot come: nobody moves for it and it is sent nothing (no swap-out of its own
        # memory, no resume that would only make its allocation fail again): it waits, then gets out-of-memory.
        self._left_alone = (unplaceable | self._short_of_host) & {pid for pid, p in pages.items() if p.wanted_bytes}
        for pid in self.room_waits.due(combined, pages, now, self._left_alone, self.settings.room_wait_s):
            self._deny(pid)
        for pid, page in pages.items():
            if page.wanted_bytes and pid not in combined and pid not in held:
                self._deny(pid)  # on no GPU the scheduler can plan (no NVML): nobody will make room
        self.reasons = {pid: d.reason for pid, d in combined.items() if d.verdict is not Verdict.RUN and d.reason}
        self.reasons.update(dict.fromkeys(short_of_host, WAITING_FOR_HOST_MEMORY))
        combined = self.placement.relocate(self._within_host_budget(combined, pages, host), snap, self.settings, now)
        account(self.stats, self._waits, combined, any(s.contended for s in self._schedulers.values()),
                self.settings.tick_s, now)
        for pid, d in combined.items():  # the allocations that waited run now: their room is taken
            if d.verdict is Verdict.RUN and (waited := pages.get(pid)) and waited.wanted_bytes and \
                    pid not in held | self._left_alone:
                self.plain.room_given(pid, waited.wanted_bytes, snap, now)
        self._apply(combined, pages)
        for scheduler in self._schedulers.values():
            scheduler.started(time.monotonic())
        self._give_back_pinned(snap, pages, combined)
        self.plain.room_stops(self.view, snap, pages, now + time.monotonic() - began, unplaceable, hopeless,
                              self.settings, set(self.interposed.pids()))
        return combined

    def _within_host_budget(self, decisions: dict[int, Decision], pages: Mapping[int, Enforcement],
                            host: HostMemory | None) -> dict[int, Decision]:
        """Swap-outs whose new pinned memory the host cannot spare are not carried out, first giving back
        buffers that hold nothing: those processes run on, and the processes that waited for that room wait
        on and, after room_wait_ms, get out-of-memory. Nobody's memory moves for them."""
        if self.host is None or host is None:
            return decisions
        wanted = {pid: new_pinned_bytes(pages[pid], d.swap_bytes) for pid, d in decisions.items()
                  if d.verdict is Verdict.SWAP and pid in pages}
        if sum(wanted.values()) > host.spare_bytes:
            self._drop_kept_buffers(pages, exclude=set(wanted))
            host = self.host.reading(self.interposed.enforcement())
        out, spare, refused = dict(decisions), host.spare_bytes, []
        for pid, new in sorted(wanted.items(), key=lambda item: item[1]):
            why = self.host.room_for(pid, new, replace(host, spare_bytes=spare))
            if why is None:
                spare -= new
                continue
            refused.append(pid)
            if time.monotonic() - self._warned.get(pid, float("-inf")) >= 30:
                self._warned[pid] = time.monotonic()
                log.warning("pid %d is not swapped out: %s", pid, why)
            out[pid] = Decision(Verdict.RUN)
            self.reasons.pop(pid, None)
        self._short_of_host = set()
        if refused:
            for pid, d in decisions.items():
                page = pages.get(pid)
                if d.verdict is Verdict.RUN and page is not None and page.wanted_bytes:
                    self.reasons[pid] = WAITING_FOR_HOST_MEMORY
                    self._short_of_host.add(pid)
                    self._left_alone.add(pid)
        for pid in [pid for pid in self._warned if pid not in pages]:
            del self._warned[pid]
        return out

    def _drop_kept_buffers(self, pages: Mapping[int, Enforcement], exclude: set[int]) -> None:
        """Pinned buffers kept by processes with nothing swapped out go back to the host, largest first."""
        idle = [pid for pid, p in pages.items() if pid not in exclude and p.pinned_bytes
                and not any(d.swapped_bytes for d in p.devices)]
        for future in [self._pool.submit(self._drop, pid) for pid in idle]:
            future.result()

    def _give_back_pinned(self, snap: Snapshot, pages: Mapping[int, Enforcement],
                          decisions: dict[int, Decision]) -> None:
        """A process whose memory is all back on a GPU nobody contends keeps no pinned buffers: they are kept
        only while switches may come again."""
        contended = {gpu for gpu, s in self._schedulers.items() if s.contended}
        for pid, page in pages.items():
            gpus = {row.gpu for row in snap.processes if row.pid == pid}
            if (page.pinned_bytes and page.state == "running" and not any(d.swapped_bytes for d in page.devices)
                    and not gpus & contended
                    and decisions.get(pid, Decision(Verdict.RUN)).verdict is Verdict.RUN and pid not in self._dropping):
                self._dropping.add(pid)
                self._aside.submit(self._drop, pid)

    def _drop(self, pid: int) -> None:
        process = self.interposed.get(pid)
        try:
            if process is not None:
                freed = process.requests.drop_host().moved_bytes
                log.info("pid %d gave back %s bytes of pinned host memory", pid, freed)
        except ControlError as exc:
            self._failed(pid, "could not give back pinned memory", exc)
        finally:
            self._dropping.discard(pid)

    def _context(self, row: ProcessGpu) -> int:
        """The memory a process holds beyond what it allocated: its context, as NVML sees it."""
        return row.untracked_bytes if row.nvml_bytes is not None else self.settings.context_bytes

    def _bound_queues(self, snap: Snapshot, pages: Mapping[int, Enforcement]) -> None:
        """A process that shares a GPU with a higher priority keeps its launch queue short, so that pausing
        it for the higher one drains quickly."""
        top: dict[int, Priority] = {}
        for row in snap.processes:
            if row.gpu is not None:
                top[row.gpu] = max(top.get(row.gpu, Priority.LOW), self._priority(row.pid, pages.get(row.pid)))
        for row in snap.processes:
            page = pages.get(row.pid)
            if page is None or row.gpu is None:
                continue
            want = self._priority(row.pid, page) < top[row.gpu]
            if want != (row.pid in self._bounded) and (process := self.interposed.get(row.pid)) is not None:
                self._aside.ask("bound", row.pid, partial(process.requests.bound_queue, want),
                                partial(self._bounded.add if want else self._bounded.discard, row.pid))
        self._bounded &= set(pages)

    def _priority(self, pid: int, page: Enforcement | None) -> Priority:
        """A rule's or `gpuwatch priority`'s (policy), else what the process asked for at `gpuwatch exec`."""
        chosen = self.priority_of(pid)
        if chosen is not None:
            return chosen
        return Priority.parse(page.priority) if page and page.priority in PRIORITY_NAMES else Priority.NORMAL

    def _deny(self, pid: int) -> None:
        if (process := self.interposed.get(pid)) is not None:  # asked aside: the tick never waits for the answer
            self._aside.ask("no_room", pid, process.requests.deny_room)

    def _capacity(self, total: int | None) -> int | None:
        return None if total is None else max(total - self.settings.reserve_bytes, 0)

    def _fixed_bytes(self, snap: Snapshot, gpu: int, pages: Mapping[int, Enforcement], leaving: set[int],
                     held: set[int]) -> int:
        """Device memory the plan cannot touch: processes on their way out, and those held by hand or at their
        quota (what they have resident)."""
        total = 0
        for row in snap.processes:
            if row.gpu != gpu:
                continue
            if row.pid in leaving:
                total += row.nvml_bytes if row.nvml_bytes is not None else row.device_bytes
            elif row.pid in held:
                page = pages.get(row.pid)
                if row.state == CHECKPOINTED and page is None:
                    continue  # all it had is in host memory until someone resumes it
                if page is not None:
                    total += _swappable(page, row) - row.swapped_bytes + row.unswappable_bytes + self._context(row)
                else:
                    total += row.nvml_bytes if row.nvml_bytes is not None else \
                        row.device_bytes + self.settings.context_bytes
        return total

    def _clients(self, snap: Snapshot, gpu: int, pages: Mapping[int, Enforcement], leaving: set[int],
                 held: set[int], host: HostMemory | None = None) -> list[Client]:
        """Processes on the GPU as the scheduler sees them. What an interposed process can move is bounded by
        what the host (and its memory cgroup) can take: memory that cannot go anywhere is not movable."""
        clients = []
        for row in snap.processes:
            if row.gpu != gpu or (row.pid in leaving and row.pid not in pages) or row.pid in held:
                continue
            page = pages.get(row.pid)
            priority = self._priority(row.pid, page)
            if page is not None:
                given = self.plain.wanted.get(row.pid, {}).get(gpu, 0)  # let retry, not yet seen held
                need = _swappable(page, row) + row.unswappable_bytes + page.wanted_bytes + given + self._context(row)
                movable = _swappable(page, row)
                if host is not None and self.host is not None:
                    bounded = min(movable, self.host.movable(row.pid, page, host))
                    if bounded < movable:
                        self._host_bound[row.pid] = movable
                    movable = bounded
                clients.append(Client(row.pid, need, movable, page.launches or row.launches, priority,
                                      interposed=True, exclusive=self.exclusive(row.pid),
                                      waiting=page.waiting_threads > 0,
                                      fixed_bytes=need - movable - page.wanted_bytes - given))
            elif row.state != STOPPED or self.pauser.held(row.pid, SCHEDULER) or self.pauser.held(row.pid, ROOM):
                clients.append(self.plain.client(row, priority, self.exclusive(row.pid), host, self.settings,
                                                 self._host_bound))
        return clients + self.plain.newcomers(gpu, {c.pid for c in clients}, self.settings,
                                              lambda pid: self._priority(pid, None), self.exclusive)

    def _apply(self, decisions: dict[int, Decision], pages: Mapping[int, Enforcement]) -> None:
        """Make room (pause, swap out, stop), then resume: memory must be free before it is taken. Swap-ins
        start with the swap-outs: a process coming back maps each piece as soon as one going out has released
        its memory, so both directions of the link carry data at once."""
        start = time.monotonic()
        decisions = {pid: d for pid, d in decisions.items() if pid not in self._left_alone}
        room = [self._pool.submit(self._make_room, pid, d, pages.get(pid)) for pid, d in decisions.items()
                if d.verdict is not Verdict.RUN]
        back = {pid for pid, d in decisions.items() if d.verdict is Verdict.RUN and _swapped_out(pages.get(pid))}
        early = [self._pool.submit(self._run, pid, pages.get(pid)) for pid in back]
        moved = sum(f.result() for f in room)
        runs = [self._pool.submit(self._run, pid, pages.get(pid)) for pid, d in decisions.items()
                if d.verdict is Verdict.RUN and pid not in back]
        moved += sum([f.result() for f in early + runs])
        if moved:
            seconds = time.monotonic() - start
            self.switch_cost.observe(moved, seconds)
            log.info("moved %.1f GiB between the device and host memory in %.2f s", moved / (1 << 30), seconds)

    def _make_room(self, pid: int, d: Decision, page: Enforcement | None) -> int:
        """Pauses, swaps out or stops one process; returns the bytes it moved to host memory."""
        try:
            if page is None:
                if pid in self.plain.wanted:  # stopped at an allocation: the probes hold it until it fits
                    return 0
                if d.verdict is Verdict.SWAP and self.pauser.checkpointer.movable(pid) and \
                        self.pauser.ledger.moved(pid)[0] != CHECKPOINTED:
                    self.pauser.pause(pid, swap=True, by=SCHEDULER)
                elif d.verdict in (Verdict.STOP, Verdict.SWAP) and not self.pauser.held(pid):
                    self.pauser.pause(pid, by=SCHEDULER)
                return 0
            process = self.interposed.get(pid)
            if process is None:
                return 0
            swapped = sum(dev.swapped_bytes for dev in page.devices)
            if d.verdict is Verdict.SWAP and swapped < d.swap_bytes:
                reply = process.requests.swap_out(d.swap_bytes - swapped)
                log.info("pid %d paused, %s bytes swapped out to make room", pid, reply.moved_bytes)
                return reply.moved_bytes or 0
            if page.state == "running":
                process.requests.pause()
                log.info("pid %d paused", pid)
            return 0
        except (ControlError, TypeError, ValueError) as exc:
            self._failed(pid, "could not make room", exc)
            return 0

    def _run(self, pid: int, page: Enforcement | None) -> int:
        """Continues or resumes one process; returns the bytes its resume brings back to the device."""
        try:
            if page is None:
                if self.pauser.held(pid, SCHEDULER):
                    self.pauser.resume(pid, by=SCHEDULER)
                return 0
            process = self.interposed.get(pid)
            if process is None or (page.state == "running" and not page.wanted_bytes):
                return 0
            back = sum(dev.swapped_bytes for dev in page.devices)
            process.requests.resume(swapped=back > 0)  # also: retry the allocations that wait
            log.info("pid %d runs%s", pid, " (memory it waited for is free)" if page.wanted_bytes else "")
            return back
        except ControlError as exc:
            self._failed(pid, "could not resume", exc)
            return 0


def _swapped_out(page: Enforcement | None) -> bool:
    return page is not None and any(d.swapped_bytes for d in page.devices)


def _swappable(page: Enforcement, row: ProcessGpu) -> int:
    return sum(d.swappable_bytes for d in page.devices if d.in_use) if row.gpu is not None else 0


