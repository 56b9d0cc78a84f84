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
    QUOTA_STOP = 6   # stopped (SIGSTOP) before an allocation that would cross its quota group's limit


COPY_DIRECTIONS = ("h2d", "d2h", "d2d", "any")
# What a process is doing as the enforcer sees it: the interposer's states (docs/interposer.md), then
# "stopped" for a process the daemon paused with SIGSTOP because it does not run under the interposer.
STATES = ("running", "paused", "swapping_out", "swapped", "swapping_in", "stopped")


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
    # from the enforcer: the interposer's shared page, or the daemon's own record of a SIGSTOP
    interposed: bool = False
    priority: str | None = None   # low, normal or high under the interposer
    quota_bytes: int | None = None
    state: str = "running"        # one of STATES ("unknown" for a page value this version does not know)
    swapped_bytes: int = 0        # device memory now held in host memory
    swappable_bytes: int = 0      # device memory the interposer can move to host memory
    unswappable_bytes: int = 0
    # process-wide figures: on the row of the process's first GPU only, so that sums over rows stay right
    swap_out_bytes_total: int = 0
    swap_in_bytes_total: int = 0
    waiting_threads: int = 0      # threads held at the interposer's closed gate: the process wants to run
    quota_pauses: int = 0         # times it was stopped at its quota (`gpuwatch quota set`)
    slice_seconds: float = 0.0    # time it ran while the scheduler sliced its GPU
    wait_seconds: float = 0.0     # time it waited for its turn
    preemptions: int = 0          # times the scheduler paused, swapped out or stopped it

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class DeviceEnforcement:
    """One device record of an interposed process's page."""
    ordinal: int                  # the process's CUDA device ordinal
    quota_bytes: int | None
    swapped_bytes: int
    swappable_bytes: int
    unswappable_bytes: int
    in_use: bool                  # holds or has swapped out memory: the process has a row for this GPU


@dataclass(frozen=True)
class Enforcement:
    """What the enforcer knows of one process beyond the probes; the tracer folds it into the snapshot."""
    pid: int
    interposed: bool
    state: str
    priority: str | None = None
    mem_limit: int | None = None  # the quota the process started with (GPUWATCH_MEM_LIMIT), or its quota
                                  # group's (`gpuwatch quota set`), per GPU
    devices: tuple[DeviceEnforcement, ...] = ()
    swap_out_bytes_total: int = 0
    swap_in_bytes_total: int = 0
    waiting_threads: int = 0
    wanted_bytes: int = 0         # device memory its allocations wait for (the device was full)
    launches: int | None = None   # exact counts from the page (None: not known)
    graph_launches: int | None = None
    quota_pauses: int = 0         # times the daemon stopped it at its quota
    slice_seconds: float = 0.0
    wait_seconds: float = 0.0
    preemptions: int = 0


@dataclass(frozen=True)
class QuotaStop:
    """An allocation a thread was stopped before (quota_stops): it runs when the process is continued."""
    pid: int
    tid: int
    size: int
    gpu: int                      # the process's device ordinal; -1 unknown
    kind: int
    group_used: int               # what the quota group held at the stop
    limit: int


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


@dataclass(frozen=True)
class SchedulerSummary:
    """How long processes waited for their turn, over the daemon's life: a histogram."""
    wait_buckets: tuple[tuple[float, int], ...]  # (upper bound in seconds, waits at most that long), cumulative
    wait_count: int
    wait_sum: float


@dataclass
class Snapshot:
    processes: list[ProcessGpu]
    gpus: list[Gpu]
    health: TracerHealth
    scheduler: SchedulerSummary | None = None
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
        if self.type in (EventType.ALLOC, EventType.FREE, EventType.ALLOC_FAIL, EventType.QUOTA_STOP):
            detail = f"{self.kind.name.lower():8s} {self.size:>14d} 0x{self.addr:x}"
            if self.type == EventType.ALLOC_FAIL:
                detail += f" error={self.result}"
        return f"{self.ts_ns / 1e9:14.6f} {self.pid:>7d} {self.tid:>7d} {self.comm:16s} {gpu:>3s} {what:10s} {detail}"

    @staticmethod
    def header() -> str:
        return f"{'TIME(s)':>14s} {'PID':>7s} {'TID':>7s} {'COMM':16s} {'GPU':>3s} {'EVENT':10s} KIND{'BYTES':>19s} ADDR"
