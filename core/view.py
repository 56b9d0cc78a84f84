"""The one view of processes and GPUs: built each time by gpuwatch.enforcer.view.build_view from what the
probes counted, NVML, the interposers' pages, the ledger, the quotas, the policy and the scheduler; read by
`ps`, `status`, the metrics, `top` and the enforcer alike."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from .vocabulary import COPY_DIRECTIONS


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
    namespace: str = ""      # its pod's namespace, the pod's name and the container's: empty outside Kubernetes
    pod: str = ""
    container: str = ""
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
    device_bytes_estimated: bool = False  # device_bytes holds an estimate of what it held before the probes saw it
    copy_bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COPY_DIRECTIONS, 0))
    # from the enforcer: the interposer's shared page, or the daemon's own record of a SIGSTOP
    interposed: bool = False
    priority: str | None = None   # low, normal or high: the priority the scheduler uses
    quota_bytes: int | None = None
    state: str = "running"        # one of vocabulary.STATES ("unknown" for a page value this version does not know)
    reason: str | None = None     # why it does not run now: "paused by hand", "slice of pid 12", ...
    swapped_bytes: int = 0        # device memory now held in host memory
    unmovable: str | None = None  # not under the interposer: why the driver's checkpoint API cannot move it
    swappable_bytes: int = 0      # device memory the interposer can move to host memory
    unswappable_bytes: int = 0
    # process-wide figures: on the row of the process's first GPU only, so that sums over rows stay right
    swap_out_bytes_total: int = 0
    swap_in_bytes_total: int = 0
    swap_pinned_bytes: int = 0    # pinned host memory its interposer holds for swapping (data and kept buffers)
    waiting_threads: int = 0      # threads held at the interposer's closed gate: the process wants to run
    quota_pauses: int = 0         # times it was stopped at its quota (`gpuwatch quota set`)
    slice_seconds: float = 0.0    # time it ran while the scheduler sliced its GPU
    wait_seconds: float = 0.0     # time it waited for its turn
    preemptions: int = 0          # times the scheduler paused, swapped out or stopped it
    plan: str | None = None       # the scheduler's verdict for it on this GPU at its last round (run, pause, swap,
                                  # stop); None where it did not plan it

    def to_json(self) -> dict[str, Any]:
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
    thread_restarts: dict[str, int] = field(default_factory=dict)  # the daemon's threads (core/threads.py)


@dataclass(frozen=True)
class SchedulerSummary:
    """How long processes waited for their turn, over the daemon's life: a histogram."""
    wait_buckets: tuple[tuple[float, int], ...]  # (upper bound in seconds, waits at most that long), cumulative
    wait_count: int
    wait_sum: float


@dataclass(frozen=True)
class HostMemory:
    """Host memory for swapped-out memory (pinned: the kernel cannot reclaim it)."""
    total_bytes: int
    available_bytes: int          # MemAvailable
    reserve_bytes: int            # never used for swapped-out memory
    limit_bytes: int | None       # the configured cap
    pinned_bytes: int             # held by interposed processes for swapping (data and kept buffers)
    swapped_bytes: int            # of that, device memory swapped out now
    spare_bytes: int              # what more may be pinned: the budget left


@dataclass
class Snapshot:
    processes: list[ProcessGpu]
    gpus: list[Gpu]
    health: TracerHealth
    scheduler: SchedulerSummary | None = None
    host: HostMemory | None = None
    taken_at: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
