"""The Tracer: loads the BPF programs, attaches them to every libcuda in use, and reads accounting."""
from __future__ import annotations

import ctypes
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from . import libraries, preflight, procinfo
from .devices import DeviceResolver, format_uuid
from .libraries import Library
from .model import (COPY_DIRECTIONS, DeviceEnforcement, Enforcement, Event, EventType, Gpu, Kind, ProcessGpu, QuotaStop,
                    Snapshot, TracerHealth)
from .nvml import Nvml
from .attach import Attacher, Attachment, Target
from .symbols import BPF_SOURCES, PROBES, Group, generated_programs

log = logging.getLogger(__name__)
BPF_DIR = Path(__file__).with_name("bpf")
EXIT_FORMAT = Path("/sys/kernel/tracing/events/sched/sched_process_exit/format")


class LaunchMode(str, Enum):
    ALL = "all"        # every launch and copy probed
    SAMPLE = "sample"  # work probes attached part of the time, counts scaled and marked estimated
    OFF = "off"


class _RawEvent(ctypes.Structure):
    _fields_ = [("ts_ns", ctypes.c_uint64), ("addr", ctypes.c_uint64), ("size", ctypes.c_uint64),
                ("tgid", ctypes.c_uint32), ("tid", ctypes.c_uint32), ("type", ctypes.c_uint32),
                ("kind", ctypes.c_uint32), ("gpu", ctypes.c_int32), ("result", ctypes.c_int32),
                ("comm", ctypes.c_char * 16)]


@dataclass
class _AttachedLibrary:
    library: Library
    targets: dict[Group, list[Target]]
    attached: dict[Group, Attachment] = field(default_factory=dict)

    @property
    def probes(self) -> int:
        return sum(len(self.targets[g]) for g in self.attached)


def bpf_source() -> str:
    """All probe files as one program: bcc rewrites map calls only in the main file, not in headers."""
    include = re.compile(r'^#include "gpuwatch.h"$', re.M)
    parts = [(BPF_DIR / "gpuwatch.h").read_text()]
    parts += [include.sub("", (BPF_DIR / name).read_text()) for name in BPF_SOURCES]
    return "\n".join(parts) + generated_programs()


class Tracer:
    """Attaches on start(), always detaches on stop(); snapshot() and subscribe() read what it sees."""

    def __init__(self, launches: LaunchMode | str = LaunchMode.SAMPLE, use_nvml: bool = True,
                 rescan_seconds: float = 30.0, sample_window: float = 0.04, sample_period: float = 4.0,
                 ring_buffer_pages: int = 1024) -> None:
        if ring_buffer_pages < 1 or ring_buffer_pages & (ring_buffer_pages - 1):
            raise ValueError(f"ring buffer pages must be a power of two, not {ring_buffer_pages}")
        self.launch_mode = LaunchMode(launches)
        self._ring_pages = ring_buffer_pages
        self._use_nvml = use_nvml
        self._rescan_seconds = rescan_seconds
        self._sample_window, self._sample_period = sample_window, sample_period
        self._bpf = None
        self._attacher: Attacher | None = None
        self._lock = threading.RLock()
        self._libs: dict[tuple[int, int], _AttachedLibrary] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lib_open_pids: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._exited: set[int] = set()
        self._subscribers: list[queue.Queue[Event]] = []
        self._procs: dict[int, procinfo.ProcInfo] = {}
        self._devices = DeviceResolver()
        self._nvml: Nvml | None = None
        self._work_attached = False
        self._events_seen = 0
        self._enforcement: Callable[[], dict[int, Enforcement]] = dict

    # lifecycle

    def start(self) -> None:
        bcc = preflight.check_all()
        cflags = ["-Wno-unused-function", f"-DGW_RING_PAGES={self._ring_pages}"]
        if EXIT_FORMAT.exists() and "group_dead" in EXIT_FORMAT.read_text():
            cflags.append("-DGW_HAVE_GROUP_DEAD")
        self._bpf = bcc.BPF(text=bpf_source(), cflags=cflags)
        self._attacher = Attacher(self._bpf, multi=os.environ.get("GPUWATCH_UPROBE_MULTI", "1") != "0")
        try:
            self._bpf["events"].open_ring_buffer(self._on_event)
            if self._use_nvml:
                self._nvml = Nvml.open()
            self._attach_new(libraries.host_libraries() + libraries.all_process_libraries())
            if not self._libs:
                log.warning("no libcuda found yet: waiting for a process to load one")
            self._spawn(self._poll_loop, "gpuwatch-events")
            self._spawn(self._maintenance_loop, "gpuwatch-maintenance")
            if self.launch_mode == LaunchMode.SAMPLE:
                self._spawn(self._sample_loop, "gpuwatch-sampler")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=2)
        self._threads.clear()
        with self._lock:
            if self._attacher is not None:
                self._attacher.detach(Attachment(
                    fds=[fd for e in self._libs.values() for a in e.attached.values() for fd in a.fds]))
            if self._bpf is not None:
                self._bpf.cleanup()
                self._bpf = None
            self._libs.clear()

    def __enter__(self) -> Tracer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _spawn(self, target, name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    # attaching

    def _attach_new(self, libs: list[Library]) -> None:
        with self._lock:
            for lib in libs:
                if lib.key in self._libs or self._bpf is None:
                    continue
                try:
                    self._attach_library(lib)
                except Exception as exc:
                    log.warning("cannot attach to %s: %s", lib.path, exc)

    def _attach_library(self, lib: Library) -> None:
        targets = resolve_targets(self._bpf, lib.path)
        if not any(t.symbol in ("cuMemAlloc_v2", "cuLaunchKernel") for ts in targets.values() for t in ts):
            log.info("%s exports no driver entry points: skipped", lib.path)
            return
        entry = _AttachedLibrary(lib, targets)
        self._libs[lib.key] = entry
        groups = [Group.CONTEXT, Group.MEMORY]
        if self.launch_mode == LaunchMode.ALL or self._work_attached:
            groups.append(Group.WORK)
        for group in groups:
            entry.attached[group] = self._attacher.attach(lib.path, targets[group])
        log.info("watching %s (%d probes)", lib.path, entry.probes)

    def set_work_probes(self, on: bool) -> None:
        """Attach or detach the launch and copy probes (what sample mode does on its own)."""
        with self._lock:
            if self._bpf is None or on == self._work_attached:
                return
            self._work_attached = on
            for entry in self._libs.values():
                if on:
                    entry.attached[Group.WORK] = self._attacher.attach(entry.library.path, entry.targets[Group.WORK])
                elif Group.WORK in entry.attached:
                    self._attacher.detach(entry.attached.pop(Group.WORK))

    # threads

    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            bpf = self._bpf
            if bpf is None:
                return
            bpf.ring_buffer_poll(100)

    def _on_event(self, _ctx, data, _size) -> None:
        raw = ctypes.cast(data, ctypes.POINTER(_RawEvent)).contents
        self._events_seen += 1
        if raw.type == EventType.LIB_OPEN:
            self._lib_open_pids.put(raw.tgid)
        elif raw.type == EventType.EXIT:
            self._exited.add(raw.tgid)
        if not self._subscribers:
            return
        event = Event(ts_ns=raw.ts_ns, type=EventType(raw.type), kind=Kind(raw.kind), pid=raw.tgid, tid=raw.tid,
                      comm=raw.comm.decode(errors="replace"), gpu=raw.gpu if raw.gpu >= 0 else None,
                      addr=raw.addr, size=raw.size, result=raw.result)
        for sub in list(self._subscribers):
            try:
                sub.put_nowait(event)
            except queue.Full:
                pass

    def _maintenance_loop(self) -> None:
        last_rescan = last_gc = time.monotonic()
        while not self._stop.wait(0.05):
            self._attach_loaded_by(self._pending_lib_opens())
            now = time.monotonic()
            if self._exited and now - last_gc >= 1.0:
                last_gc = now
                self._collect_exited()
            if now - last_rescan >= self._rescan_seconds:
                last_rescan = now
                self._collect_exited()
                self._attach_new(libraries.host_libraries() + libraries.all_process_libraries())

    def _pending_lib_opens(self) -> set[int]:
        pids = set()
        while True:
            try:
                pids.add(self._lib_open_pids.get_nowait())
            except queue.Empty:
                return pids

    def _attach_loaded_by(self, pids: set[int]) -> None:
        """A process opened a libcuda; it maps it right after. Look until it does (1 s at most)."""
        deadline = {pid: time.monotonic() + 1.0 for pid in pids}
        while deadline and not self._stop.is_set():
            for pid in list(deadline):
                libs = libraries.process_libraries(pid)
                if libs or time.monotonic() > deadline[pid] or not os.path.exists(f"/proc/{pid}"):
                    del deadline[pid]
                    self._attach_new(libs)
            for pid in self._pending_lib_opens():
                deadline.setdefault(pid, time.monotonic() + 1.0)
            if deadline:
                time.sleep(0.005)

    def _collect_exited(self) -> None:
        """Drop what exited processes left in the address-keyed maps (the exit probe cleared the rest)."""
        exited, self._exited = self._exited, set()
        with self._lock:
            if self._bpf is None:
                return
            for pid in exited:
                self._procs.pop(pid, None)
                self._devices.forget(pid)
            for name in ("allocs", "handles", "mappings", "ctx_dev", "dev_uuid"):
                table = self._bpf[name]
                stale = [k for k in table.keys() if k.tgid in exited or not _alive(k.tgid)]
                for k in stale:
                    table.pop(k, None)

    def _sample_loop(self) -> None:
        while not self._stop.is_set():
            self.set_work_probes(True)
            self._stop.wait(self._sample_window)
            self.set_work_probes(False)
            self._stop.wait(self._sample_period - self._sample_window)

    # quota groups: enforcer/quota.py decides; only BPF writes quota_used, only these write quota_base and
    # quota_granted (so neither side's read-modify-write loses the other's update)

    def quota_join(self, pid: int, group: int) -> bool:
        """Put a process in a quota group; what it holds already counts. False: it was a member already."""
        with self._lock:
            if self._bpf is None:
                return False
            member = self._bpf["quota_member"]
            current = member.get(member.Key(pid))
            if current is not None and current.value == group:
                return False
            if current is not None:
                self._quota_leave(pid)
            held = self._device_bytes(pid)  # before it is a member: what it allocates later counts in BPF
            base = self._bpf["quota_base"]
            for gpu, n in held.items():
                self._quota_put(base, group, gpu, self._quota_get(base, group, gpu) + n)
            member[member.Key(pid)] = member.Leaf(group)
            return True

    def quota_leave(self, pid: int) -> None:
        with self._lock:
            if self._bpf is not None:
                self._quota_leave(pid)

    def _quota_leave(self, pid: int) -> None:
        member = self._bpf["quota_member"]
        group = member.get(member.Key(pid))
        if group is None:
            return
        member.pop(member.Key(pid), None)
        base = self._bpf["quota_base"]
        for gpu, n in self._device_bytes(pid).items():
            self._quota_put(base, group.value, gpu, self._quota_get(base, group.value, gpu) - n)

    def quota_group_of(self, pid: int) -> int | None:
        with self._lock:
            if self._bpf is None:
                return None
            member = self._bpf["quota_member"]
            group = member.get(member.Key(pid))
            return None if group is None else group.value

    def quota_set_limit(self, group: int, limit: int) -> None:
        with self._lock:
            if self._bpf is not None:
                table = self._bpf["quota_limit"]
                table[table.Key(group)] = table.Leaf(limit)

    def quota_drop_group(self, group: int) -> None:
        """The group's limit, members and counts go (group ids are not reused)."""
        with self._lock:
            if self._bpf is None:
                return
            self._bpf["quota_limit"].pop(self._bpf["quota_limit"].Key(group), None)
            for name in ("quota_member", "quota_forks"):
                table = self._bpf[name]
                for k in [k for k, v in table.items() if v.value == group]:
                    table.pop(k, None)
            for name in ("quota_used", "quota_base", "quota_granted"):
                table = self._bpf[name]
                for k in [k for k in table.keys() if k.tgid == group]:
                    table.pop(k, None)

    def quota_totals(self, group: int) -> dict[int, int]:
        """Per device ordinal (-1 unknown): what the group's members hold, have reserved and were granted."""
        totals: dict[int, int] = {}
        with self._lock:
            if self._bpf is None:
                return totals
            for name in ("quota_used", "quota_base", "quota_granted"):
                for k, v in self._bpf[name].items():
                    if k.tgid == group:
                        totals[k.gpu] = (totals.get(k.gpu, 0) + v.value) % (1 << 64)
        return {gpu: _signed(v) for gpu, v in totals.items()}

    def quota_set_granted(self, group: int, gpu: int, nbytes: int) -> None:
        """Bytes of stopped allocations let run whose return the probes have not seen yet."""
        with self._lock:
            if self._bpf is None:
                return
            table = self._bpf["quota_granted"]
            if nbytes:
                self._quota_put(table, group, gpu, nbytes)
            else:
                table.pop(self._quota_key(table, group, gpu), None)

    def quota_stops(self) -> list[QuotaStop]:
        with self._lock:
            if self._bpf is None:
                return []
            items = list(self._bpf["quota_stops"].items())
        return [QuotaStop(pid=k.value >> 32, tid=k.value & 0xFFFFFFFF, size=v.size, gpu=v.gpu, kind=v.kind,
                          group_used=v.group_used, limit=v.limit) for k, v in items]

    def quota_clear_stop(self, pid: int, tid: int) -> None:
        with self._lock:
            if self._bpf is not None:
                table = self._bpf["quota_stops"]
                table.pop(table.Key(pid << 32 | tid), None)

    def traced(self, pid: int) -> bool:
        """Whether the probes have seen the process use a GPU."""
        with self._lock:
            if self._bpf is None:
                return False
            table = self._bpf["procs"]
            return table.get(table.Key(pid)) is not None

    def call_pending(self, pid: int, tid: int) -> bool:
        """Whether a thread is inside a probed call (a stopped allocation has not returned)."""
        with self._lock:
            if self._bpf is None:
                return False
            table = self._bpf["calls"]
            return table.get(table.Key(pid << 32 | tid)) is not None

    def _device_bytes(self, pid: int) -> dict[int, int]:
        procs, mem = self._bpf["procs"], self._bpf["mem"]
        mask = procs.get(procs.Key(pid))
        held: dict[int, int] = {}
        for bit in range(32):
            if mask is not None and mask.value & (1 << bit):
                m = mem.get(self._quota_key(mem, pid, bit - 1))
                if m is not None and _signed(m.device_bytes):
                    held[bit - 1] = _signed(m.device_bytes)
        return held

    @staticmethod
    def _quota_key(table, first: int, gpu: int):
        key = table.Key()
        key.tgid, key.gpu = first, gpu
        return key

    def _quota_get(self, table, group: int, gpu: int) -> int:
        v = table.get(self._quota_key(table, group, gpu))
        return 0 if v is None else _signed(v.value)

    def _quota_put(self, table, group: int, gpu: int, nbytes: int) -> None:
        table[self._quota_key(table, group, gpu)] = table.Leaf(nbytes % (1 << 64))

    # reading

    def set_enforcement(self, source: Callable[[], dict[int, Enforcement]]) -> None:
        """What the enforcer knows of processes (interposed, paused), folded into every snapshot."""
        self._enforcement = source

    def subscribe(self, maxsize: int = 65536) -> queue.Queue[Event]:
        q: queue.Queue[Event] = queue.Queue(maxsize=maxsize)
        self._subscribers.append(q)
        return q

    def unsubscribe(self, q: queue.Queue[Event]) -> None:
        if q in self._subscribers:
            self._subscribers.remove(q)

    def health(self) -> TracerHealth:
        with self._lock:
            lost = 0
            if self._bpf is not None:
                lost = int(self._bpf["lost"][ctypes.c_int(0)].value)
            return TracerHealth(launch_mode=self.launch_mode.value,
                                attach="uprobe_multi" if self._attacher and self._attacher.multi else "perf_event",
                                libraries=[a.library.path for a in self._libs.values()],
                                probes_attached=sum(e.probes for e in self._libs.values()),
                                events_lost=lost, events_seen=self._events_seen,
                                waiting_for_driver=not self._libs, nvml=self._nvml is not None)

    def snapshot(self) -> Snapshot:
        gpus = self._nvml.gpus() if self._nvml else []
        nvml_bytes = self._nvml.process_bytes() if self._nvml else {}
        rows: dict[tuple[int, int | None], ProcessGpu] = {}
        with self._lock:
            if self._bpf is None:
                return Snapshot([], gpus, self.health())
            mem_items = list(self._bpf["mem"].items())
            work_items = list(self._bpf["work"].items())
            uuids = {(k.tgid, k.gpu): format_uuid(bytes(v.bytes)) for k, v in self._bpf["dev_uuid"].items()}
        scale = self._sample_period / self._sample_window if self.launch_mode == LaunchMode.SAMPLE else 1.0

        def row(tgid: int, ordinal: int) -> ProcessGpu:
            index, uuid = self._devices.resolve(tgid, ordinal, gpus, uuids)
            key = (tgid, index)
            if key not in rows:
                rows[key] = self._row(tgid, index, uuid)
                rows[key].launches_estimated = self.launch_mode == LaunchMode.SAMPLE
            return rows[key]

        for k, m in mem_items:
            r = row(k.tgid, k.gpu)
            r.device_bytes += _signed(m.device_bytes)
            r.managed_bytes += _signed(m.managed_bytes)
            r.host_pinned_bytes += _signed(m.host_pinned_bytes)
            r.allocs += m.allocs
            r.frees += m.frees
            r.failed_allocs += m.failed_allocs
        for k, per_cpu in work_items:
            r = row(k.tgid, k.gpu)
            r.launches += round(sum(w.launches for w in per_cpu) * scale)
            r.graph_launches += round(sum(w.graph_launches for w in per_cpu) * scale)
            for i, direction in enumerate(COPY_DIRECTIONS):
                r.copy_bytes[direction] += round(sum(w.copy_bytes[i] for w in per_cpu) * scale)
        for (pid, index), used in nvml_bytes.items():
            key = (pid, index)
            if key not in rows:
                uuid = next((g.uuid for g in gpus if g.index == index), None)
                rows[key] = self._row(pid, index, uuid)
            rows[key].nvml_bytes = used
        for r in rows.values():
            if r.nvml_bytes is not None:
                r.untracked_bytes = max(r.nvml_bytes - r.device_bytes, 0)
        self._add_enforcement(rows, self._enforcement(), row, gpus, uuids)
        live = [r for r in rows.values() if _alive(r.pid)]
        live.sort(key=lambda r: (r.pid, -1 if r.gpu is None else r.gpu))
        return Snapshot(live, gpus, self.health())

    def _add_enforcement(self, rows: dict[tuple[int, int | None], ProcessGpu], enforcement: dict[int, Enforcement],
                         row: Callable[[int, int], ProcessGpu], gpus: list[Gpu],
                         uuids: dict[tuple[int, int], str]) -> None:
        """Interposed and paused processes get rows even where the probes saw nothing yet."""
        by_pid: dict[int, list[ProcessGpu]] = {}
        for (pid, _), r in rows.items():
            by_pid.setdefault(pid, []).append(r)
        for pid, e in enforcement.items():
            mine = by_pid.setdefault(pid, [])
            records: dict[int | None, DeviceEnforcement] = {}
            for d in e.devices:
                index = self._devices.resolve(pid, d.ordinal, gpus, uuids)[0]
                records.setdefault(index, d)
                if d.in_use and not any(r.gpu == index for r in mine):
                    mine.append(row(pid, d.ordinal))
            if not mine:
                mine.append(rows.setdefault((pid, None), self._row(pid, None, None)))
            for r in mine:
                d = records.get(r.gpu)
                r.interposed, r.state, r.priority = e.interposed, e.state, e.priority
                r.quota_bytes = d.quota_bytes if d and d.quota_bytes else e.mem_limit
                r.swapped_bytes, r.swappable_bytes, r.unswappable_bytes = (
                    (d.swapped_bytes, d.swappable_bytes, d.unswappable_bytes) if d else (0, 0, 0))
            # process-wide counters go on one row, so that sums over rows stay right: its first GPU's
            on_gpus = sorted((r for r in mine if r.gpu is not None), key=lambda r: r.gpu)
            main = on_gpus[0] if on_gpus else mine[0]
            main.swap_out_bytes_total, main.swap_in_bytes_total = e.swap_out_bytes_total, e.swap_in_bytes_total
            main.waiting_threads = e.waiting_threads
            main.quota_pauses = e.quota_pauses
            main.slice_seconds, main.wait_seconds, main.preemptions = e.slice_seconds, e.wait_seconds, e.preemptions
            # the page counts every launch exactly at no cost, the probes only while attached: prefer the page
            # unless the probes count everything too (its counts are per process: only with one GPU)
            if e.launches is not None and len(on_gpus) <= 1 and self.launch_mode != LaunchMode.ALL:
                main.launches, main.graph_launches = e.launches, e.graph_launches or 0
                main.launches_estimated = False

    def _row(self, pid: int, gpu: int | None, uuid: str | None) -> ProcessGpu:
        info = self._procs.get(pid)
        if info is None:
            info = procinfo.read(pid)
            if info is not None:
                self._procs[pid] = info
        if info is None:
            return ProcessGpu(pid=pid, comm="?", gpu=gpu, gpu_uuid=uuid)
        return ProcessGpu(pid=pid, comm=info.comm, gpu=gpu, gpu_uuid=uuid, user=info.user,
                          container_id=info.container_id, pod_uid=info.pod_uid)


def resolve_targets(bpf, path: str) -> dict[Group, list[Target]]:
    """Each probed function's file offset, once per (offset, direction): aliases share an address."""
    targets: dict[Group, list[Target]] = {g: [] for g in Group}
    seen: set[tuple[int, bool]] = set()
    for spec in PROBES:
        try:
            _, offset = bpf._check_path_symbol(path.encode(), spec.symbol.encode(), None, -1)
        except Exception:
            continue  # this driver version does not export it
        for handler, is_return in ((spec.entry, False), (spec.ret, True)):
            if handler and (offset, is_return) not in seen:
                seen.add((offset, is_return))
                targets[spec.group].append(Target(spec.symbol, offset, handler, is_return))
    return targets


def _alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def _signed(v: int) -> int:
    """Counters are u64 in BPF; a free seen before its allocation can leave one briefly below zero."""
    return v - (1 << 64) if v >= 1 << 63 else v
