"""What the device plugin offers the kubelet, and how it chooses: device IDs of the two resources, the GPUs they
belong to, and the preferred allocation that keeps a container's devices on one GPU. Pure: no I/O.

- `gpuwatch.io/gpu`: `shares_per_gpu` devices per GPU, `<GPU UUID>-share-<k>`: a share of the GPU's time.
- `gpuwatch.io/memory`: one device per whole GiB of the GPU's memory (NVML's total, rounded down),
  `<GPU UUID>-gib-<k>`: a container's count is the device memory it may hold, its CUDA context included.

IDs stay under the kubelet's 63 characters (a UUID is 40)."""
from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass

GPU_RESOURCE = "gpuwatch.io/gpu"
MEMORY_RESOURCE = "gpuwatch.io/memory"
RESOURCES = (GPU_RESOURCE, MEMORY_RESOURCE)
GiB = 1 << 30
_SEPARATORS = {GPU_RESOURCE: "-share-", MEMORY_RESOURCE: "-gib-"}
PAIR_WINDOW_S = 10.0  # a preference of one resource follows the other's choice made this recently (see Pairing)


@dataclass(frozen=True)
class GpuInfo:
    uuid: str
    memory_bytes: int
    index: int = 0


def device_ids(resource: str, gpu: GpuInfo, shares_per_gpu: int) -> list[str]:
    """The IDs this GPU offers for the resource, in order."""
    count = shares_per_gpu if resource == GPU_RESOURCE else gpu.memory_bytes // GiB
    return [f"{gpu.uuid}{_SEPARATORS[resource]}{k}" for k in range(count)]


def parse_id(device_id: str) -> tuple[str, str] | None:
    """(resource, GPU UUID) of one of our IDs; None for anything else."""
    for resource, sep in _SEPARATORS.items():
        uuid, found, k = device_id.rpartition(sep)
        if found and uuid and k.isdigit():
            return resource, uuid
    return None


def gpus_of(device_ids: list[str] | tuple[str, ...]) -> list[tuple[str, int]]:
    """(GPU UUID, how many of the IDs are on it), most first (ties: first seen first); unknown IDs are left out."""
    counts = Counter(parsed[1] for i in device_ids if (parsed := parse_id(i)) is not None)
    return counts.most_common()


class Pairing:
    """The GPU most recently chosen for each resource. The kubelet admits one container at a time and, for each of
    its resources in turn, asks for a preference and then allocates: a preference for `gpuwatch.io/memory` that
    comes within PAIR_WINDOW_S of an allocation of `gpuwatch.io/gpu` (or the other way round) is for the same
    container, as far as the plugin can tell (Allocate never names the pod), so it prefers that GPU."""

    def __init__(self, window_s: float = PAIR_WINDOW_S) -> None:
        self.window_s = window_s
        self._lock = threading.Lock()
        self._last: dict[str, tuple[str, float]] = {}

    def chose(self, resource: str, uuid: str) -> None:
        with self._lock:
            self._last[resource] = (uuid, time.monotonic())

    def partner(self, resource: str) -> str | None:
        """The GPU that the other resource was given within the window, if any."""
        with self._lock:
            found = [(uuid, at) for r, (uuid, at) in self._last.items()
                     if r != resource and time.monotonic() - at <= self.window_s]
        return max(found, key=lambda f: f[1])[0] if found else None


def preferred(available: list[str], must_include: list[str], size: int, partner: str | None = None) -> list[str]:
    """`size` IDs from `available`, all of `must_include` among them, on one GPU where one can hold them all. The
    GPU: the one the IDs that must be included are on; else the partner resource's GPU (Pairing); else the GPU
    with the fewest available IDs that still fit (best fit: whole GPUs stay free for large requests). Where no
    one GPU can hold `size`, the GPUs with the most available IDs are filled in turn."""
    chosen = list(dict.fromkeys(must_include))
    if len(chosen) >= size:
        return chosen[:max(size, 0)]
    by_gpu: dict[str, list[str]] = {}
    for device in available:
        if (parsed := parse_id(device)) is not None and device not in chosen:
            by_gpu.setdefault(parsed[1], []).append(device)
    need = size - len(chosen)
    anchors = [uuid for uuid, _ in gpus_of(chosen)]
    fits = [uuid for uuid, devices in by_gpu.items() if len(devices) >= need]
    order: list[str]
    if anchors and anchors[0] in fits:
        order = [anchors[0]]
    elif partner in fits:
        order = [partner]
    elif fits:
        order = [min(fits, key=lambda u: len(by_gpu[u]))]
    else:
        order = sorted(by_gpu, key=lambda u: (u not in anchors, -len(by_gpu[u])))
    for uuid in order:
        take = by_gpu[uuid][:need]
        chosen.extend(take)
        need -= len(take)
        if need <= 0:
            break
    return chosen
