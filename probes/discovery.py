"""Which libcuda copies are probed: the host's and every copy a process maps, found at start, at every
rescan and within a second of a process opening one (the openat tracepoint's LIB_OPEN event)."""
from __future__ import annotations

import errno
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from . import libraries
from .attach import Attacher, Attachment, Target
from .libraries import Library
from .symbols import PROBES, Group

log = logging.getLogger(__name__)
LOADING_WAIT_S = 1.0  # a process that opened a libcuda maps it right after: looked for this long


@dataclass
class AttachedLibrary:
    library: Library
    targets: dict[Group, list[Target]]
    attached: dict[Group, Attachment] = field(default_factory=dict)

    @property
    def probes(self) -> int:
        return sum(len(self.targets[g]) for g in list(self.attached))


def resolve_targets(bpf: Any, path: str) -> dict[Group, list[Target]]:
    """Each probed function's file offset, once per (offset, direction): aliases share an address.
    A function the library does not export is logged: a warning when every supported driver exports it,
    else at debug with the reason symbols.py gives."""
    offsets: dict[str, int] = {}
    for spec in PROBES:
        try:
            offsets[spec.symbol] = bpf._check_path_symbol(path.encode(), spec.symbol.encode(), None, -1)[1]
        except Exception:
            pass
    targets: dict[Group, list[Target]] = {g: [] for g in Group}
    seen: set[tuple[int, bool]] = set()
    for spec in PROBES:
        offset = offsets.get(spec.symbol)
        if offset is None:
            if not offsets:
                continue  # it exports none of them: no driver, and the caller says it skips it
            if spec.missing is None:
                log.warning("%s: entry point is not exported: %s; %s", path, spec.symbol, spec.lost)
            else:
                log.debug("%s does not export %s (%s)", path, spec.symbol, spec.missing)
            continue
        for handler, is_return in ((spec.entry, False), (spec.ret, True)):
            if handler and (offset, is_return) not in seen:
                seen.add((offset, is_return))
                targets[spec.group].append(Target(spec.symbol, offset, handler, is_return))
    return targets


class LibraryWatch:
    """The libraries probed and their attachments, under a lock of their own; `bpf` None: not loaded.

    Attaching or detaching a uprobe takes the memory map lock of every process that maps the library (the
    kernel writes the breakpoint into each); a process whose driver pins or checkpoints tens of GiB holds that
    lock for seconds (on the H200, `ps` and the scheduler stalled 16-19 s, once past 30 s, while a 60 GiB
    checkpoint ran beside sample mode's attaches). So nothing that reads the maps waits for an attach:
    paths() and probes() read without the lock, and the tracer's own lock is another."""

    def __init__(self, lock: threading.RLock, work_always: bool) -> None:
        self._lock = lock
        self._work_always = work_always
        self.bpf: Any = None
        self.attacher: Attacher | None = None
        self.libs: dict[tuple[int, int], AttachedLibrary] = {}
        self.work_attached = False
        self.opened_by: queue.SimpleQueue[int] = queue.SimpleQueue()  # pids that opened a libcuda

    def load(self, bpf: Any, attacher: Attacher) -> None:
        with self._lock:
            self.bpf, self.attacher = bpf, attacher

    def unload(self) -> None:
        """Detach everything; the program itself is the tracer's to clean up."""
        with self._lock:
            if self.attacher is not None:
                self.attacher.detach(Attachment(
                    fds=[fd for e in self.libs.values() for a in e.attached.values() for fd in a.fds]))
            self.libs.clear()
            self.bpf = None

    def attach_new(self, libs: list[Library]) -> None:
        with self._lock:
            for lib in libs:
                if lib.key in self.libs or self.bpf is None:
                    continue
                try:
                    self._attach_library(lib)
                except Exception as exc:
                    self._drop(lib.key)  # nothing half attached: the next open of it or rescan tries again
                    log.warning("cannot attach to %s: %s", lib.path, exc)

    def _drop(self, key: tuple[int, int]) -> None:
        entry = self.libs.pop(key, None)
        if entry is not None and self.attacher is not None:
            for attachment in entry.attached.values():
                self.attacher.detach(attachment)

    def attach_everything_in_use(self) -> None:
        self.attach_new(libraries.host_libraries() + libraries.all_process_libraries())

    def _attach_library(self, lib: Library) -> None:
        assert self.attacher is not None
        targets = resolve_targets(self.bpf, lib.path)
        if not any(t.symbol in ("cuMemAlloc_v2", "cuLaunchKernel") for ts in targets.values() for t in ts):
            log.info("%s exports no driver entry points: skipped", lib.path)
            return
        entry = AttachedLibrary(lib, targets)
        self.libs[lib.key] = entry
        groups = [Group.CONTEXT, Group.MEMORY]
        if self._work_always or self.work_attached:
            groups.append(Group.WORK)
        for group in groups:
            entry.attached[group] = self.attacher.attach(lib.path, targets[group])
        log.info("watching %s (%d probes)", lib.path, entry.probes)

    def set_work_probes(self, on: bool) -> None:
        """Attach or detach the launch and copy probes (what sample mode does on its own)."""
        with self._lock:
            if self.bpf is None or self.attacher is None or on == self.work_attached:
                return
            self.work_attached = on
            for key, entry in list(self.libs.items()):
                if on:
                    self._attach_work(key, entry)
                elif Group.WORK in entry.attached:
                    self.attacher.detach(entry.attached.pop(Group.WORK))

    def _attach_work(self, key: tuple[int, int], entry: AttachedLibrary) -> None:
        """One library's work probes. A copy found under a process's root (/proc/PID/root/...) is gone with that
        process: attach through another process that maps the same file, or drop it (its other probes too) until
        a process loads it again."""
        assert self.attacher is not None
        for _ in range(2):
            try:
                entry.attached[Group.WORK] = self.attacher.attach(entry.library.path, entry.targets[Group.WORK])
                return
            except Exception as exc:  # OSError from the kernel, bcc's own errors on the perf-event path
                if not isinstance(exc, OSError) or exc.errno != errno.ENOENT:
                    log.warning("cannot attach the launch probes to %s: %s", entry.library.path, exc)
                    return
                other = next((lib for lib in libraries.all_process_libraries() if lib.key == key), None)
                if other is None:
                    break
                entry.library = other
        log.info("no process maps %s any more: no longer watched until one loads it", entry.library.path)
        self._drop(key)

    def paths(self) -> list[str]:
        """The libraries watched: their memory probes attached (the context probes are before them)."""
        return [a.library.path for a in list(self.libs.values()) if Group.MEMORY in a.attached]

    def probes(self) -> int:
        return sum(e.probes for e in list(self.libs.values()))

    def pending_opens(self) -> set[int]:
        pids = set()
        while True:
            try:
                pids.add(self.opened_by.get_nowait())
            except queue.Empty:
                return pids

    def attach_loaded_by(self, pids: set[int], stop: threading.Event) -> None:
        """A process opened a libcuda; it maps it right after. Look until it does (1 s at most)."""
        deadline = {pid: time.monotonic() + LOADING_WAIT_S for pid in pids}
        while deadline and not stop.is_set():
            for pid in list(deadline):
                libs = libraries.process_libraries(pid)
                if libs or time.monotonic() > deadline[pid] or not os.path.exists(f"/proc/{pid}"):
                    del deadline[pid]
                    self.attach_new(libs)
            for pid in self.pending_opens():
                deadline.setdefault(pid, time.monotonic() + LOADING_WAIT_S)
            if deadline:
                time.sleep(0.005)
