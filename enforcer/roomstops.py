"""Room for allocations of processes not under the interposer. Each tick the probes learn what every GPU can
still give (room_free); an allocation that does not fit stops its process at the call's entry (probes/bpf/
room.h). The scheduler then plans with what it asks for, makes room by checkpointing or swapping others out,
and the process continues as soon as its allocation fits, or after room_wait_ms, to fail as the driver says.
A program that asks again at once after that failure (PyTorch frees its cache and retries) gets its answer at
once: nobody made room for it a moment ago.

Room given is room taken before anything shows it: an allocation let through counts as taken until the probes
see the process hold it (or GRANT_S passed, counted from the end of the tick that let it through: a tick that
checkpoints takes 30 s and more), and a restore counts from before it is asked for until it is done.
On the H200 a restore asked for in the moment between a continued allocation and that allocation failed for
lack of memory, held device memory the other then missed (its next allocation failed), and the restored
process could never be restored after (docs/validation.md)."""
from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

from ..core.procfs import send_signal
from ..core.view import ProcessGpu, Snapshot
from ..core.vocabulary import CHECKPOINTED
from ..probes.quotamaps import QuotaStop, by_process
from .ledger import ROOM, Ledger

log = logging.getLogger(__name__)
RETRY_S = 5.0  # a stop this soon after a refusal, with still no room, is refused at once
GRANT_S = 10.0  # an allocation let through counts as taken until the probes see it, at most this long


class RoomMaps(Protocol):  # probes.roommaps.RoomMaps
    def set_free(self, free: dict[int, int]) -> None: ...
    def set_exempt(self, pids: set[int]) -> None: ...
    def stops(self) -> list[QuotaStop]: ...
    def clear_stop(self, pid: int, tid: int) -> None: ...


def resident_bytes(row: ProcessGpu, context_bytes: int) -> int:
    """Device memory a process holds on the GPU now: NVML's figure (its context included) where NVML gives
    one, else what the probes counted less what is in host memory, and a context. NVML is read every 0.25 s on
    its own thread: an allocation the probes saw since counts at once."""
    if row.state == CHECKPOINTED and not row.interposed:
        return 0
    traced = max(row.device_bytes - row.swapped_bytes, 0)
    return max(row.nvml_bytes, traced) if row.nvml_bytes is not None else traced + context_bytes


def free_bytes(snap: Snapshot, reserve_bytes: int, context_bytes: int) -> dict[int, int]:
    """What each GPU with a known size can still give beside what every process holds and the reserve."""
    return {gpu.index: gpu.memory_total - reserve_bytes -
            sum(resident_bytes(r, context_bytes) for r in snap.processes if r.gpu == gpu.index)
            for gpu in snap.gpus if gpu.memory_total is not None}


@dataclass
class _Waiting:
    start_time: int
    since: float
    stops: list[QuotaStop] = field(default_factory=list)

    def wanted(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for s in self.stops:
            out[s.gpu] = out.get(s.gpu, 0) + s.size
        return out


@dataclass
class _Grant:
    wanted: dict[int, int]  # per GPU
    held: dict[int, int]    # what the process held there when let through
    until: float
    published: bool = False  # until then, `until` is moved to GRANT_S after the publishing


def _add(into: dict[int, int], parts: Mapping[int, int], sign: int = 1) -> dict[int, int]:
    for gpu, n in parts.items():
        into[gpu] = into.get(gpu, 0) + sign * n
    return into


class RoomStops:
    def __init__(self, maps: RoomMaps, ledger: Ledger) -> None:
        self.maps, self.ledger = maps, ledger
        self._waiting: dict[int, _Waiting] = {}
        self._refused: dict[int, float] = {}  # pid -> when its wait last ended without room
        self._granted: dict[int, _Grant] = {}
        self._claims: dict[int, dict[int, int]] = {}  # restores under way: pid -> bytes per GPU
        self._free: dict[int, int] | None = None     # as last published, before what is in flight
        self._guard = threading.Lock()

    def publish(self, free: dict[int, int] | None, exempt: set[int], now: float | None = None) -> None:
        """What each GPU can give now (None: the check is off), less what is in flight, and whom the check
        leaves alone. now: the end of the tick; the grants it made count GRANT_S from then."""
        self.maps.set_exempt(exempt)
        if now is not None:
            for g in [g for g in list(self._granted.values()) if not g.published]:
                g.until, g.published = max(g.until, now + GRANT_S), True
        with self._guard:
            self._free = dict(free) if free is not None else None
            self._publish()

    def _publish(self) -> None:
        self.maps.set_free(_add(dict(self._free), self.in_flight(), -1) if self._free is not None else {})

    def wanted(self) -> dict[int, dict[int, int]]:
        """pid -> bytes its stopped allocations ask for, and its allocations let through but not yet seen, per
        GPU ordinal."""
        out = {pid: w.wanted() for pid, w in self._waiting.items()}
        for pid, g in self._granted.items():
            _add(out.setdefault(pid, {}), g.wanted)
        return out

    def in_flight(self) -> dict[int, int]:
        """Per GPU: allocations let through that the probes have not seen yet, and restores under way."""
        out: dict[int, int] = {}
        for parts in [g.wanted for g in list(self._granted.values())] + list(self._claims.values()):
            _add(out, parts)
        return out

    def grant(self, pid: int, parts: Mapping[int, int], held: Mapping[tuple[int, int], int], now: float) -> None:
        """Room given to `pid` for `parts` (bytes per GPU), taken from now until the probes see it held ((pid,
        GPU) -> bytes) or GRANT_S passed."""
        self._granted[pid] = _Grant(dict(parts), {gpu: held.get((pid, gpu), 0) for gpu in parts}, now + GRANT_S)

    def waiting_again(self, pids: set[int]) -> None:
        """These wait for room again: what they wait for is what they ask, not what they were given."""
        for pid in pids & self._granted.keys():
            del self._granted[pid]

    @contextmanager
    def claim(self, pid: int, parts: Mapping[int, int]) -> Iterator[None]:
        """While a restore of `parts` (bytes per GPU) is under way: taken, for the probes' check too."""
        with self._guard:
            self._claims[pid] = dict(parts)
            self._publish()
        try:
            yield
        finally:
            with self._guard:
                self._claims.pop(pid, None)
                self._publish()

    def settle(self, now: float, held: Mapping[tuple[int, int], int]) -> None:
        """Forget the grants the probes now see held ((pid, GPU) -> bytes), or that are too old."""
        for pid, g in list(self._granted.items()):
            if now >= g.until or all(held.get((pid, gpu), 0) >= g.held.get(gpu, 0) + n for gpu, n in g.wanted.items()):
                del self._granted[pid]

    def reconcile(self, now: float, free: Mapping[int, int], room_wait_s: float, unplaceable: set[int],
                  hopeless: set[int], held: Mapping[tuple[int, int], int] | None = None) -> None:
        """Take up new stops; continue each process whose allocations fit (`free`: per GPU, now), or that cannot
        fit even alone (`hopeless`), or that cannot be placed beside what cannot move (`unplaceable`) and waited
        room_wait_s or was refused a moment ago. A process that waits for its turn waits for it. held: (pid,
        GPU) -> bytes the probes see each process hold."""
        by_pid = by_process(self.maps.stops(), self.maps.clear_stop)
        for pid, (stat, stops) in by_pid.items():
            w = self._waiting.get(pid)
            if w is None or w.start_time != stat.start_time:
                w = self._waiting[pid] = _Waiting(stat.start_time, now)
                self.ledger.hold(pid, stat.start_time, ROOM)
                log.info("pid %d stopped (SIGSTOP) before allocating %d bytes on device %d: no room there yet",
                         pid, stops[0].size, stops[0].gpu)
            w.stops = stops
            self._granted.pop(pid, None)  # stopped again: what it waits for now is what it asks
        for pid in [pid for pid in self._waiting if pid not in by_pid]:
            del self._waiting[pid]  # it exited (the exit probe dropped its stops)
            self.ledger.release(pid, ROOM)
        left = _add(dict(free), self.in_flight(), -1)
        for pid, w in sorted(self._waiting.items(), key=lambda item: item[1].since):
            wanted = w.wanted()
            if all(left.get(gpu, 0) >= n for gpu, n in wanted.items()):
                _add(left, wanted, -1)
                self.grant(pid, wanted, held or {}, now)
                self._continue(pid, w, "its allocation fits")
            elif pid in unplaceable and now - w.since >= room_wait_s:
                self._refused[pid] = now
                self._continue(pid, w, f"no room after {room_wait_s:.0f} s: its allocation fails as the driver says")
            elif pid in hopeless:
                self._continue(pid, w, "it cannot fit the GPU even alone: its allocation fails as the driver says")
            elif pid in unplaceable and now - self._refused.get(pid, float("-inf")) < RETRY_S:
                self._refused[pid] = now
                self._continue(pid, w, "still no room since its last refusal: it fails at once")
        for pid in [pid for pid, t in self._refused.items() if now - t > RETRY_S]:
            del self._refused[pid]

    def _continue(self, pid: int, w: _Waiting, why: str) -> None:
        for s in w.stops:
            self.maps.clear_stop(pid, s.tid)
        del self._waiting[pid]
        if self.ledger.release(pid, ROOM) and send_signal(pid, signal.SIGCONT):
            log.info("pid %d continued (SIGCONT): %s", pid, why)
