"""The BPF room maps (probes/bpf/room.h), for gpuwatch.enforcer.roomstops, which decides: what each GPU can
still give, the processes the check leaves alone, and the allocations it stopped."""
from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from typing import Any

from .quotamaps import QuotaStop, _loaded


class RoomMaps:
    """Every method is safe from any thread and does nothing while the program is not loaded."""

    def __init__(self, bpf: Callable[[], Any], lock: threading.RLock) -> None:
        self._bpf, self._lock = bpf, lock

    @_loaded(None)
    def set_free(self, bpf: Any, free: dict[int, int]) -> None:
        """What each GPU (by device ordinal) can still give; a GPU left out is not checked."""
        table = bpf["room_free"]
        for key in [k for k in table.keys() if k.value not in free]:
            table.pop(key, None)
        for gpu, nbytes in free.items():
            table[table.Key(gpu)] = table.Leaf(nbytes)

    @_loaded(None)
    def set_exempt(self, bpf: Any, pids: set[int]) -> None:
        table = bpf["room_exempt"]
        now = {k.value for k in table.keys()}
        for pid in now - pids:
            table.pop(table.Key(pid), None)
        for pid in pids - now:
            table[table.Key(pid)] = table.Leaf(1)

    @_loaded(list)
    def stops(self, bpf: Any) -> list[QuotaStop]:
        return [QuotaStop(pid=k.value >> 32, tid=k.value & 0xFFFFFFFF, size=v.size, gpu=v.gpu, kind=v.kind,
                          group_used=0, limit=v.limit) for k, v in list(bpf["room_stops"].items())]

    @_loaded(None)
    def clear_stop(self, bpf: Any, pid: int, tid: int) -> None:
        table = bpf["room_stops"]
        table.pop(table.Key(ctypes.c_uint64(pid << 32 | tid).value), None)

    @_loaded(False)
    def ipc_user(self, bpf: Any, pid: int) -> bool:
        """Whether the process was seen exporting or importing memory through legacy CUDA IPC."""
        table = bpf["ipc_users"]
        return table.get(table.Key(pid)) is not None
