"""The BPF quota maps, for gpuwatch.enforcer.quota, which decides.

Only BPF writes quota_used; only this module writes quota_base and quota_granted, so that neither side's
read-modify-write loses the other's update (probes/bpf/maps.h names each map's writers).

A group's base also holds its members' CUDA contexts (set_context): memory NVML shows a process hold that no
allocation made. The probes never see it, so user space adds it where the process is a member, moves it with the
process from group to group, and takes it out at the process's exit (forget_context)."""
from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..core.procfs import ProcStat, proc_stat


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


def by_process(stops: list[QuotaStop],
               clear: Callable[[int, int], None]) -> dict[int, tuple[ProcStat, list[QuotaStop]]]:
    """Stopped allocations by process, with its stat; those of a process gone are cleared (its exit probe may not
    have run yet)."""
    grouped: dict[int, list[QuotaStop]] = {}
    for s in stops:
        grouped.setdefault(s.pid, []).append(s)
    out = {}
    for pid, mine in grouped.items():
        stat = proc_stat(pid)
        if stat is None:
            for s in mine:
                clear(pid, s.tid)
        else:
            out[pid] = (stat, mine)
    return out


def signed(v: int) -> int:
    """Counters are u64 in BPF; a free seen before its allocation can leave one briefly below zero."""
    return v - (1 << 64) if v >= 1 << 63 else v


def pid_gpu_key(table: Any, first: int, gpu: int) -> Any:
    key = table.Key()
    key.tgid, key.gpu = first, gpu
    return key


def _loaded(default: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Runs the method under the tracer's lock with the loaded program as its first argument, or returns
    `default` (made anew when it is a type, like dict) while none is loaded."""
    def wrap(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def run(self: QuotaMaps, *args: Any) -> Any:
            with self._lock:
                bpf = self._bpf()
                if bpf is None:
                    return default() if isinstance(default, type) else default
                return method(self, bpf, *args)
        return run
    return wrap


class QuotaMaps:
    """Every method is safe from any thread and does nothing while the program is not loaded."""

    def __init__(self, bpf: Callable[[], Any], lock: threading.RLock) -> None:
        self._bpf, self._lock = bpf, lock
        self._contexts: dict[int, tuple[int | None, dict[int, int]]] = {}  # pid -> (group it counts in, per ordinal)

    @_loaded(None)
    def set_context(self, bpf: Any, pid: int, per_ordinal: dict[int, int]) -> None:
        """A process's context bytes per device ordinal, counted in the base of the group it is a member of now."""
        group, counted = self._contexts.get(pid, (None, {}))
        if group is not None:
            _add_base(bpf, group, counted, -1)
        member = bpf["quota_member"].get(bpf["quota_member"].Key(pid))
        group = None if member is None else member.value
        if group is not None:
            _add_base(bpf, group, per_ordinal, 1)
        self._contexts[pid] = (group, dict(per_ordinal))

    @_loaded(None)
    def forget_context(self, bpf: Any, pid: int) -> None:
        """The process exited (the exit probe took its allocations out of its group, never its context)."""
        group, counted = self._contexts.pop(pid, (None, {}))
        if group is not None:
            _add_base(bpf, group, counted, -1)

    def _move_context(self, bpf: Any, pid: int, group: int | None) -> None:
        if pid not in self._contexts:
            return
        old, counted = self._contexts[pid]
        if old is not None:
            _add_base(bpf, old, counted, -1)
        if group is not None:
            _add_base(bpf, group, counted, 1)
        self._contexts[pid] = (group, counted)

    @_loaded(False)
    def join(self, bpf: Any, pid: int, group: int) -> bool:
        """Put a process in a quota group; what it holds already counts. False: it was a member already."""
        member = bpf["quota_member"]
        current = member.get(member.Key(pid))
        if current is not None and current.value == group:
            return False
        if current is not None:
            _leave(bpf, pid)
        self._move_context(bpf, pid, group)
        held = device_bytes(bpf, pid)  # before it is a member: what it allocates later counts in BPF
        base = bpf["quota_base"]
        for gpu, n in held.items():
            _put(base, group, gpu, _get(base, group, gpu) + n)
        member[member.Key(pid)] = member.Leaf(group)
        return True

    @_loaded(None)
    def leave(self, bpf: Any, pid: int) -> None:
        _leave(bpf, pid)
        self._move_context(bpf, pid, None)

    @_loaded(None)
    def group_of(self, bpf: Any, pid: int) -> int | None:
        member = bpf["quota_member"]
        group = member.get(member.Key(pid))
        return None if group is None else group.value

    @_loaded(None)
    def set_limit(self, bpf: Any, group: int, limit: int) -> None:
        table = bpf["quota_limit"]
        table[table.Key(group)] = table.Leaf(limit)

    @_loaded(None)
    def drop_group(self, bpf: Any, group: int) -> None:
        """The group's limit, members and counts go (group ids are not reused)."""
        for pid, (counted_in, counted) in list(self._contexts.items()):
            if counted_in == group:
                self._contexts[pid] = (None, counted)
        bpf["quota_limit"].pop(bpf["quota_limit"].Key(group), None)
        for name in ("quota_member", "quota_forks"):
            table = bpf[name]
            for k in [k for k, v in table.items() if v.value == group]:
                table.pop(k, None)
        for name in ("quota_used", "quota_base", "quota_granted"):
            table = bpf[name]
            for k in [k for k in table.keys() if k.tgid == group]:
                table.pop(k, None)

    @_loaded(dict)
    def totals(self, bpf: Any, group: int) -> dict[int, int]:
        """Per device ordinal (-1 unknown): what the group's members hold, have reserved and were granted."""
        totals: dict[int, int] = {}
        for name in ("quota_used", "quota_base", "quota_granted"):
            for k, v in bpf[name].items():
                if k.tgid == group:
                    totals[k.gpu] = (totals.get(k.gpu, 0) + v.value) % (1 << 64)
        return {gpu: signed(v) for gpu, v in totals.items()}

    @_loaded(None)
    def set_granted(self, bpf: Any, group: int, gpu: int, nbytes: int) -> None:
        """Bytes of stopped allocations let run whose return the probes have not seen yet."""
        table = bpf["quota_granted"]
        if nbytes:
            _put(table, group, gpu, nbytes)
        else:
            table.pop(pid_gpu_key(table, group, gpu), None)

    @_loaded(list)
    def stops(self, bpf: Any) -> list[QuotaStop]:
        return [QuotaStop(pid=k.value >> 32, tid=k.value & 0xFFFFFFFF, size=v.size, gpu=v.gpu, kind=v.kind,
                          group_used=v.group_used, limit=v.limit) for k, v in list(bpf["quota_stops"].items())]

    @_loaded(None)
    def clear_stop(self, bpf: Any, pid: int, tid: int) -> None:
        table = bpf["quota_stops"]
        table.pop(table.Key(pid << 32 | tid), None)

    @_loaded(False)
    def traced(self, bpf: Any, pid: int) -> bool:
        """Whether the probes have seen the process use a GPU."""
        table = bpf["procs"]
        return table.get(table.Key(pid)) is not None

    @_loaded(False)
    def call_pending(self, bpf: Any, pid: int, tid: int) -> bool:
        """Whether a thread is inside a probed call (a stopped allocation has not returned)."""
        table = bpf["calls"]
        return table.get(table.Key(pid << 32 | tid)) is not None


def _leave(bpf: Any, pid: int) -> None:
    member = bpf["quota_member"]
    group = member.get(member.Key(pid))
    if group is None:
        return
    member.pop(member.Key(pid), None)
    base = bpf["quota_base"]
    for gpu, n in device_bytes(bpf, pid).items():
        _put(base, group.value, gpu, _get(base, group.value, gpu) - n)


def device_bytes(bpf: Any, pid: int) -> dict[int, int]:
    """What a process holds per device ordinal, from the accounting maps, with what it held before the probes
    saw it (seeds.py): a group's base counts both, and the exit probe takes both out."""
    procs, mem, seeds = bpf["procs"], bpf["mem"], bpf["seeds"]
    mask = procs.get(procs.Key(pid))
    held: dict[int, int] = {}
    for bit in range(32):
        if mask is not None and mask.value & (1 << bit):
            m = mem.get(pid_gpu_key(mem, pid, bit - 1))
            if m is not None and signed(m.device_bytes):
                held[bit - 1] = signed(m.device_bytes)
        seed = seeds.get(pid_gpu_key(seeds, pid, bit - 1))
        if seed is not None and seed.bytes:
            held[bit - 1] = held.get(bit - 1, 0) + int(seed.bytes)
    return held


def _add_base(bpf: Any, group: int, per_ordinal: dict[int, int], sign: int) -> None:
    base = bpf["quota_base"]
    for gpu, n in per_ordinal.items():
        _put(base, group, gpu, _get(base, group, gpu) + sign * n)


def _get(table: Any, group: int, gpu: int) -> int:
    v = table.get(pid_gpu_key(table, group, gpu))
    return 0 if v is None else signed(v.value)


def _put(table: Any, group: int, gpu: int, nbytes: int) -> None:
    table[pid_gpu_key(table, group, gpu)] = table.Leaf(nbytes % (1 << 64))
