"""Device memory a process held before the probes saw it (a daemon started, or restarted, after it allocated):
the `seeds` BPF map, which only this module writes (probes/bpf/maps.h). The Tracer adds a seed to the
process's device figure, a quota group counts it in its base (quotamaps.device_bytes), and the exit probe
takes it out of the group and drops it. What to seed is gpuwatch.enforcer.seed's decision."""
from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from typing import Any

from .quotamaps import _get, _loaded, _put, pid_gpu_key

BPF_NOEXIST = 1


class SeedMaps:
    """Every method is safe from any thread and does nothing while the program is not loaded."""

    def __init__(self, bpf: Callable[[], Any], lock: threading.RLock) -> None:
        self._bpf, self._lock = bpf, lock

    @_loaded(None)
    def set(self, bpf: Any, pid: int, ordinal: int, nbytes: int, estimated: bool) -> None:
        """The process held `nbytes` on its device `ordinal` before the probes saw it (0: nothing). A quota group
        it belongs to counts the change at once (its base: only user space writes it)."""
        table = bpf["seeds"]
        key = pid_gpu_key(table, pid, ordinal)
        old = table.get(key)
        before = 0 if old is None else int(old.bytes)
        if nbytes > 0:
            leaf = table.Leaf()
            leaf.bytes, leaf.estimated = nbytes, int(estimated)
            table[key] = leaf
        else:
            table.pop(key, None)
        member = bpf["quota_member"]
        group = member.get(member.Key(pid))
        if group is not None and max(nbytes, 0) != before:
            base = bpf["quota_base"]
            _put(base, group.value, ordinal, _get(base, group.value, ordinal) + max(nbytes, 0) - before)
        if not os.path.exists(f"/proc/{pid}"):
            table.pop(key, None)  # it exited meanwhile: its exit probe may have run before the seed was there

    @_loaded(None)
    def hint_device(self, bpf: Any, pid: int, ordinal: int) -> None:
        """The process's one GPU, where the probes know none (its context was made current before they
        attached): its allocations count on that device, not on an unknown one. Never over the probes' word."""
        table = bpf["proc_dev"]
        key, leaf = table.Key(pid), table.Leaf(ordinal)
        from bcc.libbcc import lib  # bcc is there: a program is loaded
        lib.bpf_update_elem(table.map_fd, ctypes.byref(key), ctypes.byref(leaf), BPF_NOEXIST)
