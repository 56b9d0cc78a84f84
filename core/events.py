"""Events the probes emit as they happen, as `gpuwatch trace` streams them: the daemon produces them, any
client reads them."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import IntEnum
from typing import Any


class Kind(IntEnum):
    DEVICE = 0
    PITCH = 1
    ASYNC = 2
    MANAGED = 3
    HOST = 4
    VMM = 5


class EventType(IntEnum):
    ALLOC = 1
    FREE = 2
    ALLOC_FAIL = 3
    EXIT = 4
    LIB_OPEN = 5
    QUOTA_STOP = 6   # stopped (SIGSTOP) before an allocation that would cross its quota group's limit
    ROOM_STOP = 7    # stopped (SIGSTOP) before an allocation its GPU has no room for, while room is made


@dataclass(frozen=True)
class Event:
    ts_ns: int
    type: EventType
    kind: Kind
    pid: int
    tid: int
    comm: str
    gpu: int | None
    addr: int
    size: int
    result: int

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["type"], d["kind"] = self.type.name.lower(), self.kind.name.lower()
        return d

    def line(self) -> str:
        gpu = "-" if self.gpu is None else str(self.gpu)
        what = self.type.name.lower()
        detail = ""
        if self.type in (EventType.ALLOC, EventType.FREE, EventType.ALLOC_FAIL, EventType.QUOTA_STOP,
                         EventType.ROOM_STOP):
            detail = f"{self.kind.name.lower():8s} {self.size:>14d} 0x{self.addr:x}"
            if self.type == EventType.ALLOC_FAIL:
                detail += f" error={self.result}"
        return f"{self.ts_ns / 1e9:14.6f} {self.pid:>7d} {self.tid:>7d} {self.comm:16s} {gpu:>3s} {what:10s} {detail}"

    @staticmethod
    def header() -> str:
        return (f"{'TIME(s)':>14s} {'PID':>7s} {'TID':>7s} {'COMM':16s} {'GPU':>3s} {'EVENT':10s} "
                f"KIND{'BYTES':>19s} ADDR")
