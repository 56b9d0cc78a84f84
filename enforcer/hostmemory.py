"""Host memory as a scheduled resource: what swapped-out memory may take of the host.

Swapped-out memory lives in pinned host memory, which the kernel can neither swap nor reclaim, and which is
charged to the memory cgroup of the process that pins it. A swap-out is carried out only if its new pinned
memory fits: what the host can spare (MemAvailable) less the reserve, under the configured cap, and inside
the process's own cgroup limit. Otherwise nobody's memory moves and the process that needed the room waits,
then gets the driver's out-of-memory answer."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ..core import procfs
from ..core.view import HostMemory
from ..core.vocabulary import MiB
from .records import Enforcement

RESERVE_FLOOR = 4096 * MiB
RESERVE_SHARE = 0.05
CGROUP_MARGIN = 64 * MiB  # left free inside a memory cgroup's limit, for the process's own needs
PIECE_BYTES = 1 << 30  # the interposer moves whole pieces of at most this (interposer/backing.c)


@dataclass(frozen=True)
class HostSettings:
    reserve_bytes: int | None = None   # None: the larger of 4096 MiB and 5 % of RAM
    limit_bytes: int | None = None     # None: no cap

    @classmethod
    def from_config(cls, section: object) -> HostSettings:  # daemon.config.SchedulerSection
        reserve, limit = getattr(section, "host_reserve_mib", -1), getattr(section, "host_limit_mib", 0)
        return cls(None if reserve < 0 else reserve * MiB, limit * MiB or None)


class HostBudget:
    def __init__(self, settings: HostSettings = HostSettings(),
                 meminfo: Callable[[], dict[str, int]] = procfs.meminfo,
                 headroom: Callable[[int], tuple[int, int] | None] = procfs.cgroup_memory_headroom,
                 checkpointed: Callable[[], int] = lambda: 0) -> None:
        """checkpointed: what the driver holds in host memory for processes it checkpointed."""
        self.settings, self._meminfo, self._headroom = settings, meminfo, headroom
        self.checkpointed = checkpointed

    def reading(self, pages: Mapping[int, Enforcement]) -> HostMemory:
        info = self._meminfo()
        total, available = info.get("MemTotal", 0), info.get("MemAvailable", 0)
        reserve = self.settings.reserve_bytes
        if reserve is None:
            reserve = max(RESERVE_FLOOR, int(total * RESERVE_SHARE))
        checkpointed = self.checkpointed()
        pinned = sum(p.pinned_bytes for p in pages.values()) + checkpointed
        swapped = sum(d.swapped_bytes for p in pages.values() for d in p.devices) + checkpointed
        spare = max(available - reserve, 0)
        if self.settings.limit_bytes is not None:
            spare = min(spare, max(self.settings.limit_bytes - pinned, 0))
        return HostMemory(total_bytes=total, available_bytes=available, reserve_bytes=reserve,
                          limit_bytes=self.settings.limit_bytes, pinned_bytes=pinned, swapped_bytes=swapped,
                          spare_bytes=spare)

    def movable(self, pid: int, page: Enforcement, host: HostMemory) -> int:
        """How much of the process's device memory could be in host memory now: what is out already, what its
        kept buffers hold, and what the host and its memory cgroup can still give (whole pieces)."""
        swapped = sum(d.swapped_bytes for d in page.devices)
        allowance = host.spare_bytes
        cgroup = self._headroom(pid)
        if cgroup is not None:
            allowance = min(allowance, max(cgroup[0] - CGROUP_MARGIN, 0))
        return swapped + max(page.pinned_bytes - swapped, 0) + allowance // PIECE_BYTES * PIECE_BYTES

    def room_for(self, pid: int, new_bytes: int, host: HostMemory) -> str | None:
        """None when `new_bytes` more pinned host memory for `pid` fits; else why not, in words."""
        if new_bytes <= 0:
            return None
        if new_bytes > host.spare_bytes:
            return (f"{new_bytes >> 20} MiB more pinned host memory does not fit: {host.spare_bytes >> 20} MiB "
                    f"spare (available {host.available_bytes >> 20} MiB, reserve {host.reserve_bytes >> 20} MiB"
                    + (f", cap {host.limit_bytes >> 20} MiB" if host.limit_bytes is not None else "") + ")")
        cgroup = self._headroom(pid)
        if cgroup is not None and new_bytes > cgroup[0] - CGROUP_MARGIN:
            return (f"{new_bytes >> 20} MiB more pinned memory would not fit its memory cgroup "
                    f"({cgroup[0] >> 20} MiB left of {cgroup[1] >> 20} MiB)")
        return None


def new_pinned_bytes(page: Enforcement, swap_bytes: int) -> int:
    """Pinned memory a swap-out to `swap_bytes` may add, at most: its kept buffers hold what they can, and the
    interposer moves whole pieces, so the rest is rounded up to a piece (never past what it has resident)."""
    swapped = sum(d.swapped_bytes for d in page.devices)
    new = max(swap_bytes - swapped - max(page.pinned_bytes - swapped, 0), 0)
    resident = sum(d.swappable_bytes for d in page.devices if d.in_use) - swapped
    return min(-(-new // PIECE_BYTES) * PIECE_BYTES, max(resident, 0)) if new else 0
