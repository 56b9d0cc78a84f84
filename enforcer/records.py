"""What the enforcer knows of a process beyond the probes: its interposer's page, or the daemon's own record
of having stopped it, and what the scheduler did to it. build_view folds these into the view."""
from __future__ import annotations

from dataclasses import dataclass


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
    """One process's record: from its page when interposed, else from the ledger and the quotas."""
    pid: int
    interposed: bool
    state: str
    priority: str | None = None
    mem_limit: int | None = None  # the quota the process started with (GPUWATCH_MEM_LIMIT), or its quota
                                  # group's (`gpuwatch quota set`), per GPU
    devices: tuple[DeviceEnforcement, ...] = ()
    swap_out_bytes_total: int = 0
    swap_in_bytes_total: int = 0
    pinned_bytes: int = 0         # pinned host memory its interposer holds for swapping
    waiting_threads: int = 0
    wanted_bytes: int = 0         # device memory its allocations wait for (the device was full)
    launches: int | None = None   # exact counts from the page (None: not known)
    graph_launches: int | None = None
    quota_pauses: int = 0         # times the daemon stopped it at its quota
    slice_seconds: float = 0.0
    wait_seconds: float = 0.0
    preemptions: int = 0
