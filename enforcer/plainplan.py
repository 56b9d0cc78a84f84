"""How the enforcer plans with processes that do not run under the interposer: each is movable as a whole
where the driver's checkpoint API can move it and the host can take all it holds; an allocation the probes
stopped for want of room is what it asks for on top; and every tick the probes learn what each GPU can still
give (enforcer/roomstops.py)."""
from __future__ import annotations

from collections.abc import Callable, Mapping

from ..core.procfs import stopped
from ..core.view import HostMemory, ProcessGpu, Snapshot
from ..core.vocabulary import CHECKPOINTED, Priority
from .checkpointer import HOST_FACTOR
from .hostmemory import HostBudget
from .pause import Pauser
from .records import Enforcement
from .roomstops import RoomStops, free_bytes, resident_bytes
from .scheduler import Client
from .settings import SchedulerSettings


class PlainPlanner:
    def __init__(self, pauser: Pauser, host: HostBudget | None, room: RoomStops | None) -> None:
        self.pauser, self.host, self.room = pauser, host, room
        self.wanted: dict[int, dict[int, int]] = {}  # pid -> what its stopped allocations ask, per GPU
        self._stopped: set[int] = set()

    def room_on(self) -> bool:
        """Whether allocations of processes without the interposer are held to the room their GPU has."""
        return self.room is not None and self.pauser.checkpointer.usable()

    def begin(self, snap: Snapshot, now: float, waiting: set[int]) -> None:
        """waiting: interposed processes whose allocations wait for room now."""
        if self.room is not None:
            self.room.settle(now, _held(snap))
            self.room.waiting_again(waiting)
        self.wanted = self.room.wanted() if self.room is not None else {}
        # a stopped process cannot answer the driver's lock (on the H200 the lock waited for it past 70 s)
        self._stopped = {r.pid for r in snap.processes if stopped(r.pid)} | set(self.wanted)

    def client(self, row: ProcessGpu, priority: Priority, exclusive: bool, host: HostMemory | None,
               settings: SchedulerSettings, host_bound: dict[int, int]) -> Client:
        """The process as the scheduler sees it (host_bound: gets what it could move but for the host)."""
        ledger = self.pauser.ledger
        moved, moved_bytes, _ = ledger.moved(row.pid)
        if moved == CHECKPOINTED:  # what it took from this GPU (a checkpoint takes from every GPU it is on)
            parts = ledger.moved_on(row.pid)
            need = parts.get(row.gpu, 0) if parts and row.gpu is not None else moved_bytes
        else:
            need = resident_bytes(row, settings.context_bytes)
        # stopped at an allocation (SIGSTOP): it cannot be locked now, and it needs what it asks for
        movable = need if self.pauser.checkpointer.movable(row.pid) and row.pid not in self._stopped else 0
        if movable and moved != CHECKPOINTED and host is not None and self.host is not None and \
                self.host.room_for(row.pid, int(need * HOST_FACTOR), host) is not None:
            host_bound[row.pid], movable = need, 0
        need += self.wanted.get(row.pid, {}).get(row.gpu if row.gpu is not None else -1, 0)
        return Client(row.pid, need, movable, row.launches, priority, interposed=False, exclusive=exclusive)

    def room_given(self, pid: int, nbytes: int, snap: Snapshot, now: float) -> None:
        """An interposed process told to retry the allocations that waited for `nbytes`: taken on each of its
        GPUs (its page does not say which) until the probes see them held."""
        gpus = {r.gpu for r in snap.processes if r.pid == pid and r.gpu is not None}
        if self.room is not None and gpus:
            self.room.grant(pid, {gpu: nbytes for gpu in gpus}, _held(snap), now)

    def newcomers(self, gpu: int, seen: set[int], settings: SchedulerSettings, priority: Callable[[int], Priority],
                  exclusive: Callable[[int], bool]) -> list[Client]:
        """Processes stopped at their first allocation on the GPU: no row there yet, only what they ask for."""
        return [Client(pid, wanted[gpu] + settings.context_bytes, 0, 0, priority(pid), interposed=False,
                       exclusive=exclusive(pid))
                for pid, wanted in self.wanted.items() if gpu in wanted and pid not in seen]

    def room_stops(self, view: Callable[[], tuple[Snapshot, Mapping[int, Enforcement]]], snap: Snapshot,
                   pages: Mapping[int, Enforcement], now: float, unplaceable: set[int], hopeless: set[int],
                   settings: SchedulerSettings, interposed: set[int]) -> None:
        """Continue the allocations that fit now (or waited long enough), then tell the probes what each GPU can
        still give and whom to leave alone (interposed processes wait at their own gate; the driver's are held).
        now: after this tick's moves."""
        if self.room is None:
            return
        if self.wanted:
            snap = view()[0]  # after this tick's moves
        free = free_bytes(snap, settings.reserve_bytes, settings.context_bytes)
        self.room.reconcile(now, free, settings.room_wait_s, unplaceable, hopeless, _held(snap))
        ledger = self.pauser.ledger
        moved = {pid for pid in ledger.stopped() if ledger.moved(pid)[0]}
        self.room.publish(free if self.room_on() else None, set(pages) | interposed | moved, now)


def _held(snap: Snapshot) -> dict[tuple[int, int], int]:
    """(pid, GPU) -> the bytes the probes see the process hold there."""
    return {(r.pid, r.gpu): r.device_bytes for r in snap.processes if r.gpu is not None}
