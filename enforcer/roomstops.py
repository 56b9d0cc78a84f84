"""Room for allocations of processes not under the interposer. Each tick the probes learn what every GPU can
still give (room_free); an allocation that does not fit stops its process at the call's entry (probes/bpf/
room.h). The scheduler then plans with what it asks for, makes room by checkpointing or swapping others out,
and the process continues as soon as its allocation fits, or after room_wait_ms, to fail as the driver says.
A program that asks again at once after that failure (PyTorch frees its cache and retries) gets its answer at
once: nobody made room for it a moment ago."""
from __future__ import annotations

import logging
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from ..core.procfs import send_signal
from ..core.view import ProcessGpu, Snapshot
from ..core.vocabulary import CHECKPOINTED
from ..probes.quotamaps import QuotaStop, by_process
from .ledger import ROOM, Ledger

log = logging.getLogger(__name__)
RETRY_S = 5.0  # a stop this soon after a refusal, with still no room, is refused at once


class RoomMaps(Protocol):  # probes.roommaps.RoomMaps
    def set_free(self, free: dict[int, int]) -> None: ...
    def set_exempt(self, pids: set[int]) -> None: ...
    def stops(self) -> list[QuotaStop]: ...
    def clear_stop(self, pid: int, tid: int) -> None: ...


def resident_bytes(row: ProcessGpu, context_bytes: int) -> int:
    """Device memory a process holds on the GPU now: NVML's figure (its context included) where NVML gives
    one, else what the probes counted less what is in host memory, and a context."""
    if row.state == CHECKPOINTED and not row.interposed:
        return 0
    if row.nvml_bytes is not None:
        return row.nvml_bytes
    return max(row.device_bytes - row.swapped_bytes, 0) + context_bytes


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


class RoomStops:
    def __init__(self, maps: RoomMaps, ledger: Ledger) -> None:
        self.maps, self.ledger = maps, ledger
        self._waiting: dict[int, _Waiting] = {}
        self._refused: dict[int, float] = {}  # pid -> when its wait last ended without room

    def publish(self, free: dict[int, int] | None, exempt: set[int]) -> None:
        """What each GPU can give now (None: the check is off), and whom the check leaves alone."""
        self.maps.set_exempt(exempt)
        self.maps.set_free(free or {})

    def wanted(self) -> dict[int, dict[int, int]]:
        """pid -> bytes its stopped allocations ask for, per GPU ordinal."""
        return {pid: w.wanted() for pid, w in self._waiting.items()}

    def reconcile(self, now: float, free: Mapping[int, int], room_wait_s: float, unplaceable: set[int],
                  hopeless: set[int]) -> None:
        """Take up new stops; continue each process whose allocations fit (`free`: per GPU, now), or that cannot
        fit even alone (`hopeless`), or that cannot be placed beside what cannot move (`unplaceable`) and waited
        room_wait_s or was refused a moment ago. A process that waits for its turn waits for it."""
        by_pid = by_process(self.maps.stops(), self.maps.clear_stop)
        for pid, (stat, stops) in by_pid.items():
            w = self._waiting.get(pid)
            if w is None or w.start_time != stat.start_time:
                w = self._waiting[pid] = _Waiting(stat.start_time, now)
                self.ledger.hold(pid, stat.start_time, ROOM)
                log.info("pid %d stopped (SIGSTOP) before allocating %d bytes on device %d: no room there yet",
                         pid, stops[0].size, stops[0].gpu)
            w.stops = stops
        for pid in [pid for pid in self._waiting if pid not in by_pid]:
            del self._waiting[pid]  # it exited (the exit probe dropped its stops)
            self.ledger.release(pid, ROOM)
        left = dict(free)
        for pid, w in sorted(self._waiting.items(), key=lambda item: item[1].since):
            wanted = w.wanted()
            if all(left.get(gpu, 0) >= n for gpu, n in wanted.items()):
                for gpu, n in wanted.items():
                    left[gpu] = left.get(gpu, 0) - n
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
