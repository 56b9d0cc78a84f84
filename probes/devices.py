"""From a process's CUDA device ordinal to the host's GPU, honouring CUDA_VISIBLE_DEVICES and the moves of
`gpuwatch move` (the driver restored the process onto another GPU: its ordinal stays, its GPU changed)."""
from __future__ import annotations

from collections.abc import Callable

from ..core.procfs import visible_devices
from ..core.view import Gpu

Placement = Callable[[int], dict[int, int]]  # pid -> {host index it started on: host index it is on now}


class DeviceResolver:
    def __init__(self, placement: Placement = lambda pid: {}) -> None:
        self._visible: dict[int, list[str] | None] = {}
        self.placement = placement

    def forget(self, pid: int) -> None:
        self._visible.pop(pid, None)

    def resolve(self, pid: int, ordinal: int, gpus: list[Gpu],
                uuids: dict[tuple[int, int], str] | None = None) -> tuple[int | None, str | None]:
        """Host GPU index and UUID of `ordinal` as seen by `pid` now: where it started, then where it was moved."""
        index, uuid = self._started_on(pid, ordinal, gpus, uuids)
        moved = self.placement(pid).get(index) if index is not None else None
        if moved is None:
            return index, uuid
        return moved, next((g.uuid for g in gpus if g.index == moved), None)

    def _started_on(self, pid: int, ordinal: int, gpus: list[Gpu],
                    uuids: dict[tuple[int, int], str] | None) -> tuple[int | None, str | None]:
        """Host GPU index and UUID of `ordinal` as seen by `pid` at its start; ordinal < 0 means not known.
        A UUID the process itself asked the driver for wins; then its CUDA_VISIBLE_DEVICES at exec."""
        uuid = (uuids or {}).get((pid, ordinal))
        if uuid is not None:
            return next((g.index for g in gpus if g.uuid == uuid), None if gpus else ordinal), uuid
        if ordinal < 0:
            return (0, gpus[0].uuid) if len(gpus) == 1 else (None, None)
        if pid not in self._visible:
            self._visible[pid] = visible_devices(pid)
        visible = self._visible[pid]
        index: int | None = ordinal
        if visible is not None:
            if ordinal >= len(visible):
                return None, None
            entry = visible[ordinal]
            if entry.isdigit():
                index = int(entry)
            else:
                index = next((g.index for g in gpus if g.uuid and g.uuid.startswith(entry)), None)
        uuid = next((g.uuid for g in gpus if g.index == index), None)
        return index, uuid


def format_uuid(raw: bytes) -> str:
    """The driver's 16 UUID bytes as NVML writes them: GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx."""
    h = raw.hex()
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def uuid_bytes(text: str) -> bytes | None:
    """NVML's GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx as the driver's 16 bytes (None: not such a UUID)."""
    digits = text.removeprefix("GPU-").replace("-", "")
    try:
        raw = bytes.fromhex(digits)
    except ValueError:
        return None
    return raw if text.startswith("GPU-") and len(raw) == 16 else None
