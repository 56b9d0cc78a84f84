"""What the probes produce: events as they happen (core/events.py: clients read them too), and per process
and device what the BPF maps counted."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..core.vocabulary import COPY_DIRECTIONS
from ..core.events import Event, EventType, Kind
from ..core.view import Gpu, TracerHealth

__all__ = ["Event", "EventType", "Kind", "ProbeFacts", "ProbeRow"]


@dataclass
class ProbeRow:
    """What the probes counted for one process on one of its CUDA device ordinals (-1: not known which)."""
    pid: int
    ordinal: int
    device_bytes: int = 0          # with seeded_bytes
    seeded_bytes: int = 0          # held before the probes saw the process (probes/seeds.py)
    device_bytes_estimated: bool = False  # the seed is an estimate (NVML's figure less a context)
    managed_bytes: int = 0
    host_pinned_bytes: int = 0
    allocs: int = 0
    frees: int = 0
    failed_allocs: int = 0
    launches: int = 0
    graph_launches: int = 0
    copy_bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COPY_DIRECTIONS, 0))


@dataclass
class ProbeFacts:
    """One reading of the BPF maps."""
    rows: list[ProbeRow]
    uuids: dict[tuple[int, int], str]   # (pid, ordinal) -> the GPU UUID the process's context reported
    launches_estimated: bool            # launch counts are scaled samples
    exact_launches: bool                # every launch is probed (launch mode all)
    health: TracerHealth
    nvml_gpus: list[Gpu] = field(default_factory=list)
    nvml_bytes: dict[tuple[int, int], int] = field(default_factory=dict)  # (pid, GPU index) -> bytes
