"""The one model of traced processes that the probes produce and every other part reads."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from enum import IntEnum


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


COPY_DIRECTIONS = ("h2d", "d2h", "d2d", "any")


@dataclass
class Gpu:
    index: int
    uuid: str | None = None
    name: str | None = None
    memory_total: int | None = None
    memory_used: int | None = None
    utilization: int | None = None


@dataclass
class ProcessGpu:
    """What one process holds and submits on one GPU (gpu None: not known which)."""
    pid: int
    comm: str
    gpu: int | None
    gpu_uuid: str | None = None
    user: str = "?"
    container_id: str = ""   # empty on the host
    pod_uid: str = ""        # empty outside Kubernetes
    device_bytes: int = 0
    managed_bytes: int = 0
    host_pinned_bytes: int = 0
    nvml_bytes: int | None = None
    untracked_bytes: int = 0
    allocs: int = 0
    frees: int = 0
    failed_allocs: int = 0
    launches: int = 0
    graph_launches: int = 0
    launches_estimated: bool = False
    copy_bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COPY_DIRECTIONS, 0))

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class TracerHealth:
    launch_mode: str
    attach: str = "uprobe_multi"   # or "perf_event": one uprobe per function, kernels before 6.6
    libraries: list[str] = field(default_factory=list)
    probes_attached: int = 0
    events_lost: int = 0
    events_seen: int = 0
    waiting_for_driver: bool = True
    nvml: bool = False


@dataclass
class Snapshot:
    processes: list[ProcessGpu]
    gpus: list[Gpu]
    health: TracerHealth
    taken_at: float = field(default_factory=time.time)

    def to_json(self) -> dict:
        return asdict(self)


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

    def to_json(self) -> dict:
        d = asdict(self)
        d["type"], d["kind"] = self.type.name.lower(), self.kind.name.lower()
        return d

    def line(self) -> str:
        gpu = "-" if self.gpu is None else str(self.gpu)
        what = self.type.name.lower()
        detail = ""
        if self.type in (EventType.ALLOC, EventType.FREE, EventType.ALLOC_FAIL):
            detail = f"{self.kind.name.lower():8s} {self.size:>14d} 0x{self.addr:x}"
            if self.type == EventType.ALLOC_FAIL:
                detail += f" error={self.result}"
        return f"{self.ts_ns / 1e9:14.6f} {self.pid:>7d} {self.tid:>7d} {self.comm:16s} {gpu:>3s} {what:10s} {detail}"

    @staticmethod
    def header() -> str:
        return f"{'TIME(s)':>14s} {'PID':>7s} {'TID':>7s} {'COMM':16s} {'GPU':>3s} {'EVENT':10s} KIND{'BYTES':>19s} ADDR"
