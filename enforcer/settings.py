"""The scheduler's settings and what it did to each process (slices, waits, preemptions), for the view, the
metrics and `top`."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..core.vocabulary import MiB

CONTEXT_BYTES = 768 * MiB  # a CUDA context's own memory where NVML cannot tell: PyTorch's on the H200 was 610 MiB
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0)


@dataclass
class SchedulingStats:
    """Per process, what the scheduler did to it: read by the snapshot, the metrics and top."""
    slice_seconds: float = 0.0
    wait_seconds: float = 0.0
    wait_count: int = 0
    wait_buckets: list[int] = field(default_factory=lambda: [0] * len(WAIT_BUCKETS))
    preemptions: int = 0
    waiting_since: float | None = None
    running: bool = True

    def waited(self, seconds: float) -> None:
        self.wait_seconds += seconds
        self.wait_count += 1
        for i, bound in enumerate(WAIT_BUCKETS):
            if seconds <= bound:
                self.wait_buckets[i] += 1


@dataclass(frozen=True)
class SchedulerSettings:
    quantum_s: float | None = None  # None: derived from the measured cost of a switch
    idle_s: float = 0.5
    reserve_bytes: int = 1 << 30     # device memory kept free of every process's needs
    context_bytes: int = CONTEXT_BYTES
    tick_s: float = 0.05
    room_wait_s: float = 30.0
    move_idle: bool = False          # an idle process not under the interposer leaves an oversubscribed GPU

    @classmethod
    def from_config(cls, section: Any) -> SchedulerSettings:  # daemon.config.SchedulerSection
        return cls(section.quantum_ms / 1000 or None, section.idle_ms / 1000, section.reserve_mib * MiB,
                   section.context_mib * MiB, section.tick_ms / 1000, section.room_wait_ms / 1000,
                   section.move_idle)


def account(stats: dict[int, SchedulingStats], waits: SchedulingStats, runs: Mapping[int, Any], contended: bool,
            tick_s: float, now: float) -> None:
    """One tick's decisions (pid -> a Decision, or anything with a `verdict`) into each process's figures and
    the histogram of every wait (`waits`)."""
    for pid in set(stats) - set(runs):
        del stats[pid]
    for pid, d in runs.items():
        s = stats.setdefault(pid, SchedulingStats())
        running = d.verdict.value == "run"
        if running and not s.running and s.waiting_since is not None:
            s.waited(now - s.waiting_since)
            waits.waited(now - s.waiting_since)
            s.waiting_since = None
        elif not running and s.running:
            s.preemptions += 1
            s.waiting_since = now
        if running and contended:
            s.slice_seconds += tick_s
        s.running = running
