"""Processes under the interposer (`gpuwatch exec`): their attach, leases, requests and shared pages.

A process's library connects to the control socket and sends `interposer_attach` (docs/interposer.md);
the daemon checks that the page it names is its own, answers, and keeps the connection: from then on the
daemon sends requests and the library answers each one, in order. The process is registered until the
connection closes. The daemon renews the lease in every page; a process whose daemon is gone resumes by
itself when its lease passes.

A peer is untrusted: it attaches only if it maps the library and the page it names (verify_peer); a priority
above normal is root's to give (a rule, `gpuwatch priority`), so another user's attach or page can only lower
its own; and a process that leaves a request unanswered past its timeout is treated as gone: its connection
closes and its library runs it on its own (fail open)."""
from __future__ import annotations

import itertools
import json
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from ..core import threads
from ..core.procfs import maps_text, namespace_pids
from ..core.protocol import MAX_REQUEST, Connection, ControlError, Peer
from ..core.vocabulary import PRIORITY_NAMES, Priority
from ..interposer import LIBRARY_NAME
from ..interposer.shm import MEMFD_NAME, PageError, PageReading, SharedPage
from .records import DeviceEnforcement, Enforcement
from .requests import InterposerRequests

log = logging.getLogger(__name__)
PROTOCOL_VERSION = 1
SEND_TIMEOUT_S = 5
MAX_LEASE_NS = 3_600_000 * 1_000_000  # the configuration's longest lease (daemon/config.py): bounds the arithmetic
RENEW_MAX_S = 1.0  # leases are renewed at least this often: a reload's shorter lease applies within a second


def lease_deadline(lease_ns: int) -> int:
    """The page's lease deadline for a lease of `lease_ns`, bounded so that it always fits the page's u64."""
    return time.monotonic_ns() + min(max(lease_ns, 0), MAX_LEASE_NS)


def printable(text: Any, limit: int = 200) -> str:
    """A string from an untrusted process, safe to show on a terminal."""
    return "".join(c if c.isprintable() else "?" for c in str(text)[:limit])


@dataclass(frozen=True)
class AttachRequest:
    shm_fd: int
    mem_limit: int | None  # bytes per GPU; None: no quota
    priority: str
    swap: bool

    @classmethod
    def parse(cls, request: dict[str, Any]) -> AttachRequest:
        version, fd, limit = request.get("version"), request.get("shm_fd"), request.get("mem_limit")
        priority, swap = request.get("priority", "normal"), request.get("swap", True)
        if version != PROTOCOL_VERSION:
            raise ControlError(f"interposer_attach: protocol version {printable(version, 20)} is not supported "
                               f"(the daemon speaks {PROTOCOL_VERSION})")
        if type(fd) is not int or fd < 0:
            raise ControlError("interposer_attach: shm_fd must be a file descriptor number")
        if limit is not None and (type(limit) is not int or limit < 0):
            raise ControlError("interposer_attach: mem_limit must be a number of bytes or null")
        if priority not in PRIORITY_NAMES:
            raise ControlError(f"interposer_attach: priority must be one of {', '.join(PRIORITY_NAMES)}")
        if type(swap) is not bool:
            raise ControlError("interposer_attach: swap must be true or false")
        return cls(fd, limit or None, priority, swap)


class RequestFailed(ControlError):
    pass


def verify_peer(pid: int, page: SharedPage) -> None:
    """ControlError unless process `pid` runs the interposer library (an executable mapping of a file named
    libgpuwatch.so) and has the page it sent mapped shared: a process that only made a memfd of that name does
    not attach (it would never answer a request)."""
    text = maps_text(pid)
    if text is None:
        raise ControlError(f"interposer_attach: cannot read the memory map of process {pid}")
    device, inode = page.identity()
    library = mapped = False
    for line in text.splitlines():
        fields = line.split(None, 5)
        if len(fields) < 6:
            continue
        perms, dev, ino, path = fields[1], fields[3], fields[4], fields[5].removesuffix(" (deleted)")
        library |= "x" in perms and path.rsplit("/", 1)[-1] == LIBRARY_NAME
        mapped |= perms[3:4] == "s" and path == f"/memfd:{MEMFD_NAME}" and ino == str(inode) \
            and dev == f"{os.major(device):02x}:{os.minor(device):02x}"
    if not library:
        raise ControlError(f"interposer_attach: process {pid} does not run the interposer ({LIBRARY_NAME} is not "
                           "mapped in it): start the program with `gpuwatch exec`")
    if not mapped:
        raise ControlError(f"interposer_attach: process {pid} has not mapped the page it sent: only the "
                           "interposer's own page attaches")


class _Pending:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.reply: dict[str, Any] | None = None
        self.error: str | None = None
        self.deadline = 0.0  # monotonic: when its answer is overdue


class InterposedProcess:
    """One attached process: its page and its connection. request() may be called from any thread."""

    def __init__(self, pid: int, attach: AttachRequest, page: SharedPage, connection: Connection,
                 timeout: Callable[[], float] = lambda: 120.0, ceiling: Priority = Priority.HIGH) -> None:
        """ceiling: the highest priority its page may claim (a page can only lower what the attach gave)."""
        self.pid, self.attach, self.page, self.connection = pid, attach, page, connection
        self.ceiling = ceiling
        self.requests = InterposerRequests(self.call, timeout)
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._lock = threading.Lock()  # the pending requests; never held while writing
        self._write_lock = threading.Lock()
        self._closed = False

    def call(self, line_of: Callable[[int], str], op: str, timeout: float) -> dict[str, Any]:
        """Send one request line (made from its id) and wait for its answer; RequestFailed when it fails,
        times out or the process goes away."""
        pending = _Pending()
        with self._lock:
            if self._closed:
                raise RequestFailed(f"pid {self.pid}: its interposer has disconnected")
            request_id = next(self._ids)
            # The library answers in order: a request sent behind one still in progress (a swap-out of many
            # GiB) has until that one's deadline, and its own timeout after it.
            start = max([time.monotonic(), *(p.deadline for p in self._pending.values())])
            pending.deadline = start + timeout
            self._pending[request_id] = pending
        try:
            with self._write_lock:
                self.connection.send_line(line_of(request_id))
        except OSError:
            self.close()  # a line may be half written: the library reconnects and attaches again
            raise RequestFailed(f"pid {self.pid}: its interposer has disconnected") from None
        if not pending.done.wait(max(pending.deadline - time.monotonic(), 0.0)):
            with self._lock:
                self._pending.pop(request_id, None)
            self.close()  # treated as gone: its library runs it on its own; the scheduler plans without it
            raise RequestFailed(f"pid {self.pid} did not answer {op} within {timeout:g} s: detached (its "
                                "interposer runs it on its own until it attaches again)")
        if pending.error is not None:
            raise RequestFailed(f"pid {self.pid}: {pending.error}")
        assert pending.reply is not None
        if pending.reply.get("ok") is not True:
            raise RequestFailed(f"pid {self.pid} refused {op}: {printable(pending.reply.get('error', 'no reason'))}")
        return pending.reply

    def serve(self) -> None:
        """Read answers until the connection closes (the process exited, or the daemon is closing)."""
        try:
            while not self.connection.closing.is_set():
                line = self.connection.rfile.readline(MAX_REQUEST + 1)
                if not line or len(line) > MAX_REQUEST:
                    return
                try:
                    reply = json.loads(line)
                except ValueError:
                    log.warning("pid %d: interposer sent a line that is not JSON: dropped", self.pid)
                    continue
                request_id = reply.get("id") if isinstance(reply, dict) else None
                with self._lock:
                    pending = self._pending.pop(request_id, None) if type(request_id) is int else None
                if pending is None:
                    log.debug("pid %d: answer to no pending request: %.200s", self.pid, line)
                    continue
                pending.reply = reply
                pending.done.set()
        except OSError:
            return
        finally:
            self.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pending, self._pending = self._pending, {}
        for p in pending.values():
            p.error = "its interposer disconnected before answering"
            p.done.set()
        try:
            self.connection.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def enforcement(self, reading: PageReading) -> Enforcement:
        h = reading.header
        devices = tuple(DeviceEnforcement(d.ordinal, d.quota or None, d.swapped, d.swappable, d.unswappable,
                                          d.in_use) for d in reading.devices)
        priority = self.attach.priority
        if h.priority in PRIORITY_NAMES:  # the page is the process's own: it may lower, never raise, its priority
            priority = min(Priority.parse(h.priority), self.ceiling).label
        return Enforcement(pid=self.pid, interposed=True, state=h.state, priority=priority,
                           mem_limit=self.attach.mem_limit, devices=devices,
                           swap_out_bytes_total=h.swap_out_bytes_total, swap_in_bytes_total=h.swap_in_bytes_total,
                           pinned_bytes=h.pinned_bytes,
                           waiting_threads=h.waiting, wanted_bytes=h.wanted_bytes, launches=reading.counts.launches,
                           graph_launches=reading.counts.graph_launches)


class InterposedRegistry:
    """Every attached process by pid, and the thread that renews their leases."""

    def __init__(self, lease_ms: int = 5000, request_timeout: float = 120.0) -> None:
        self.lease_ns = lease_ms * 1_000_000
        self.renew_every = lease_ms / 5000
        self.request_timeout = request_timeout
        self.room = False  # whether a scheduler runs that makes room for allocations that find the device full
        self._processes: dict[int, InterposedProcess] = {}
        self._detached: dict[int, float] = {}  # pid -> when its library disconnected (monotonic seconds)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=threads.supervised("gpuwatch-leases", self._renew_loop, self._stop),
                                        name="gpuwatch-leases", daemon=True)
        # called with the pid of each process that attaches, before its requests are read: must not block
        self.on_attach: Callable[[int], None] | None = None

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Close every connection: the libraries resume their processes by themselves."""
        self._stop.set()
        with self._lock:
            processes = list(self._processes.values())
        for p in processes:
            p.close()
        if self._thread.is_alive():
            self._thread.join(timeout=2)

    def get(self, pid: int) -> InterposedProcess | None:
        with self._lock:
            return self._processes.get(pid)

    def pids(self) -> list[int]:
        with self._lock:
            return sorted(self._processes)

    def attach(self, peer: Peer, request: dict[str, Any], connection: Connection) -> None:
        """The `interposer_attach` command: refuses with ControlError, or owns the connection until it closes."""
        attach = AttachRequest.parse(request)
        try:
            page = SharedPage.open(peer.pid, attach.shm_fd, namespace_pids(peer.pid))
        except (PageError, OSError) as exc:
            raise ControlError(f"interposer_attach: {exc}") from None
        try:
            verify_peer(peer.pid, page)
        except BaseException:
            page.close()
            raise
        # what a process asks for itself can only lower it: above normal is root's to give
        ceiling = Priority.HIGH if peer.is_root else min(Priority.parse(attach.priority), Priority.NORMAL)
        if Priority.parse(attach.priority) > ceiling:
            log.warning("pid %d (uid %d) asked for priority %s: it runs at %s (a higher one comes from root: a "
                        "rule or `gpuwatch priority`)", peer.pid, peer.uid, attach.priority, ceiling.label)
            attach = replace(attach, priority=ceiling.label)
        process = InterposedProcess(peer.pid, attach, page, connection, lambda: self.request_timeout, ceiling)
        # a library that stops reading must not hold a request's thread forever
        connection.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", SEND_TIMEOUT_S, 0))
        try:
            page.write_lease(lease_deadline(self.lease_ns))
            connection.send({"ok": True, "result": {"lease_ms": self.lease_ns // 1_000_000, "room": self.room}})
        except (OSError, PageError):
            page.close()
            return
        with self._lock:
            previous = self._processes.get(peer.pid)
            self._processes[peer.pid] = process
        if previous is not None:
            previous.close()  # the library reconnected: the new connection wins
        log.info("pid %d attached (quota %s, priority %s, swap %s)", peer.pid, attach.mem_limit, attach.priority,
                 attach.swap)
        if self.on_attach is not None:
            try:
                self.on_attach(peer.pid)
            except Exception:
                log.exception("pid %d: attach callback failed", peer.pid)
        try:
            process.serve()
        finally:
            self._forget(process)

    def _forget(self, process: InterposedProcess) -> None:
        with self._lock:
            if self._processes.get(process.pid) is process:
                del self._processes[process.pid]
                self._detached[process.pid] = time.monotonic()
                log.info("pid %d detached", process.pid)
        process.page.close()

    def detached_within(self, seconds: float) -> set[int]:
        """Processes whose library disconnected in the last `seconds` and have not attached again: almost
        always processes on their way out, freeing their memory."""
        cutoff = time.monotonic() - seconds
        with self._lock:
            for pid in [pid for pid, at in self._detached.items() if at < cutoff or pid in self._processes]:
                del self._detached[pid]
            return set(self._detached)

    def _renew_loop(self) -> None:
        while not self._stop.wait(min(max(self.renew_every, 0.01), RENEW_MAX_S)):
            with self._lock:
                processes = list(self._processes.values())
            for p in processes:
                try:
                    p.page.write_lease(lease_deadline(self.lease_ns))
                except PageError:
                    pass  # closed while we looked

    def enforcement(self) -> dict[int, Enforcement]:
        """What every page says now. A page that stops making sense ends its process's registration."""
        with self._lock:
            processes = list(self._processes.values())
        out: dict[int, Enforcement] = {}
        for p in processes:
            try:
                out[p.pid] = p.enforcement(p.page.read())
            except PageError as exc:
                if self.get(p.pid) is p:
                    log.warning("pid %d: dropped: its shared page is no longer valid: %s", p.pid, exc)
                    p.close()
        return out
