"""The Tracer: loads the BPF program, keeps it attached to every libcuda in use, and reads what it counted.

Library discovery is probes/discovery.py, the quota maps probes/quotamaps.py, the event fan-out
probes/fanout.py; this module owns the program's life, its threads and the reading of the accounting maps."""
from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from collections.abc import Callable
from enum import Enum
from typing import Any

from ..core import threads
from ..core.view import TracerHealth
from ..core.vocabulary import COPY_DIRECTIONS, is_power_of_two
from . import preflight, program
from .attach import Attacher
from .devices import format_uuid
from .discovery import LibraryWatch
from .fanout import SUBSCRIBER_QUEUE, EventFanout, Subscription
from .model import Event, EventType, Kind, ProbeFacts, ProbeRow
from .nvml import Nvml, NvmlSampler
from .quotamaps import QuotaMaps, signed
from .roommaps import RoomMaps
from .seeds import SeedMaps

log = logging.getLogger(__name__)
MAP_GC_S = 1.0  # exited processes' entries in the address-keyed maps are dropped this often


class LaunchMode(str, Enum):
    ALL = "all"        # every launch and copy probed
    SAMPLE = "sample"  # work probes attached part of the time, counts scaled and marked estimated
    OFF = "off"


class _RawEvent(ctypes.Structure):
    _fields_ = [("ts_ns", ctypes.c_uint64), ("addr", ctypes.c_uint64), ("size", ctypes.c_uint64),
                ("tgid", ctypes.c_uint32), ("tid", ctypes.c_uint32), ("type", ctypes.c_uint32),
                ("kind", ctypes.c_uint32), ("gpu", ctypes.c_int32), ("result", ctypes.c_int32),
                ("comm", ctypes.c_char * 16)]


class Tracer:
    """Attaches on start(), always detaches on stop(); facts() and subscribe() read what it sees."""

    def __init__(self, launches: LaunchMode | str = LaunchMode.SAMPLE, use_nvml: bool = True,
                 rescan_seconds: float = 30.0, sample_window: float = 0.04, sample_period: float = 4.0,
                 ring_buffer_pages: int = 1024) -> None:
        if not is_power_of_two(ring_buffer_pages):
            raise ValueError(f"ring buffer pages must be a power of two, not {ring_buffer_pages}")
        self.launch_mode = LaunchMode(launches)
        self._ring_pages = ring_buffer_pages
        self._use_nvml = use_nvml
        self._rescan_seconds = rescan_seconds
        self._sample_window, self._sample_period = sample_window, sample_period
        self._bpf: Any = None
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._exited: set[int] = set()
        self._events_seen = 0
        self._maintenance_runs = 0
        self._nvml: NvmlSampler | None = None
        self.libraries = LibraryWatch(threading.RLock(), work_always=self.launch_mode == LaunchMode.ALL)
        self.events = EventFanout()
        self.quota = QuotaMaps(lambda: self._bpf, self._lock)
        self.room = RoomMaps(lambda: self._bpf, self._lock)
        self.seeds = SeedMaps(lambda: self._bpf, self._lock)
        self.exit_listeners: list[Callable[[int], None]] = []  # told of each exited pid, after the map GC

    # lifecycle

    def start(self) -> None:
        bcc = preflight.check_all()
        self._bpf = bpf = bcc.BPF(text=program.bpf_source(), cflags=program.cflags(self._ring_pages))
        self.libraries.load(bpf, Attacher(bpf, multi=os.environ.get("GPUWATCH_UPROBE_MULTI", "1") != "0"))
        try:
            bpf["events"].open_ring_buffer(self._on_event)
            if self._use_nvml and (nvml := Nvml.open()) is not None:
                self._nvml = NvmlSampler(nvml)
                self._nvml.start()
            self.libraries.attach_everything_in_use()
            if not self.libraries.libs:
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
        if self._nvml is not None:
            self._nvml.stop()
        with self._lock:
            self.libraries.unload()
            if self._bpf is not None:
                self._bpf.cleanup()
                self._bpf = None

    def __enter__(self) -> Tracer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        self._threads.append(threads.start(name, target, self._stop))  # restarted if it raises

    def set_work_probes(self, on: bool) -> None:
        self.libraries.set_work_probes(on)

    # threads

    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            bpf = self._bpf
            if bpf is None:
                return
            bpf.ring_buffer_poll(100)

    def _on_event(self, _ctx: object, data: int, _size: int) -> None:
        raw = ctypes.cast(data, ctypes.POINTER(_RawEvent)).contents
        self._events_seen += 1
        if raw.type == EventType.LIB_OPEN:
            self.libraries.opened_by.put(raw.tgid)
        elif raw.type == EventType.EXIT:
            self._exited.add(raw.tgid)
        if not self.events.wanted:
            return
        self.events.publish(Event(ts_ns=raw.ts_ns, type=EventType(raw.type), kind=Kind(raw.kind), pid=raw.tgid,
                                  tid=raw.tid, comm=raw.comm.decode(errors="replace"),
                                  gpu=raw.gpu if raw.gpu >= 0 else None, addr=raw.addr, size=raw.size,
                                  result=raw.result))

    def _maintenance_loop(self) -> None:
        last_rescan = last_gc = time.monotonic()
        if self._maintenance_runs:  # restarted after a failure: a full rescan finds what it missed
            last_rescan -= self._rescan_seconds
        self._maintenance_runs += 1
        while not self._stop.wait(0.05):
            self.libraries.attach_loaded_by(self.libraries.pending_opens(), self._stop)
            now = time.monotonic()
            if self._exited and now - last_gc >= MAP_GC_S:
                last_gc = now
                self._collect_exited()
            if now - last_rescan >= self._rescan_seconds:
                last_rescan = now
                self._collect_exited()
                self.libraries.attach_everything_in_use()

    def _collect_exited(self) -> None:
        """Drop what exited processes left in the address-keyed maps (the exit probe cleared the rest)."""
        exited, self._exited = self._exited, set()
        with self._lock:
            if self._bpf is None:
                return
            for name in ("allocs", "handles", "mappings", "ctx_dev", "dev_uuid", "seeds", "graph_mem"):
                table = self._bpf[name]
                stale = [k for k in table.keys() if k.tgid in exited or not _alive(k.tgid)]
                for k in stale:
                    table.pop(k, None)
        for pid in exited:
            for listener in self.exit_listeners:
                listener(pid)

    def _sample_loop(self) -> None:
        while not self._stop.is_set():
            self.set_work_probes(True)
            self._stop.wait(self._sample_window)
            self.set_work_probes(False)
            self._stop.wait(self._sample_period - self._sample_window)

    # reading

    def subscribe(self, maxsize: int = SUBSCRIBER_QUEUE, wants: Callable[[Event], bool] | None = None) -> Subscription:
        return self.events.subscribe(maxsize, wants)

    def unsubscribe(self, sub: Subscription) -> None:
        self.events.unsubscribe(sub)

    def health(self) -> TracerHealth:
        with self._lock:
            lost = int(self._bpf["lost"][ctypes.c_int(0)].value) if self._bpf is not None else 0
            attacher = self.libraries.attacher
            return TracerHealth(launch_mode=self.launch_mode.value,
                                attach="uprobe_multi" if attacher and attacher.multi else "perf_event",
                                libraries=self.libraries.paths(), probes_attached=self.libraries.probes(),
                                events_lost=lost, events_seen=self._events_seen,
                                waiting_for_driver=not self.libraries.paths(), nvml=self._nvml is not None,
                                thread_restarts=threads.restarts())

    def facts(self, work: bool = True) -> ProbeFacts:
        """One reading of the accounting maps, with NVML's latest reading beside it (work False: memory only, no
        launch or copy counts: the per-CPU map is the costly one)."""
        gpus, nvml_bytes = self._nvml.latest() if self._nvml else ([], {})
        sampled = self.launch_mode == LaunchMode.SAMPLE
        with self._lock:
            if self._bpf is None:
                return ProbeFacts([], {}, sampled, self.launch_mode == LaunchMode.ALL, self.health(), gpus, nvml_bytes)
            mem_items = list(self._bpf["mem"].items())
            seed_items = list(self._bpf["seeds"].items())
            work_items = list(self._bpf["work"].items()) if work else []
            uuids = {(k.tgid, k.gpu): format_uuid(bytes(v.bytes)) for k, v in self._bpf["dev_uuid"].items()}
        scale = self._sample_period / self._sample_window if sampled else 1.0
        rows: dict[tuple[int, int], ProbeRow] = {}
        for k, m in mem_items:
            r = rows.setdefault((k.tgid, k.gpu), ProbeRow(k.tgid, k.gpu))
            r.device_bytes += signed(m.device_bytes)
            r.managed_bytes += signed(m.managed_bytes)
            r.host_pinned_bytes += signed(m.host_pinned_bytes)
            r.allocs += m.allocs
            r.frees += m.frees
            r.failed_allocs += m.failed_allocs
        for k, s in seed_items:  # held before the probes saw the process (probes/seeds.py)
            r = rows.setdefault((k.tgid, k.gpu), ProbeRow(k.tgid, k.gpu))
            r.device_bytes += s.bytes
            r.seeded_bytes += s.bytes
            r.device_bytes_estimated = r.device_bytes_estimated or bool(s.bytes and s.estimated)
        for k, per_cpu in work_items:
            r = rows.setdefault((k.tgid, k.gpu), ProbeRow(k.tgid, k.gpu))
            r.launches += round(sum(w.launches for w in per_cpu) * scale)
            r.graph_launches += round(sum(w.graph_launches for w in per_cpu) * scale)
            for i, direction in enumerate(COPY_DIRECTIONS):
                r.copy_bytes[direction] += round(sum(w.copy_bytes[i] for w in per_cpu) * scale)
        return ProbeFacts(list(rows.values()), uuids, sampled, self.launch_mode == LaunchMode.ALL, self.health(),
                          gpus, nvml_bytes)


def _alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")
