"""Processes under the interposer (`gpuwatch exec`): their attach, leases, requests and shared pages.

A process's library connects to the control socket and sends `interposer_attach` (docs/interposer.md);
the daemon checks that the page it names is its own, answers, and keeps the connection: from then on the
daemon sends requests and the library answers each one, in order. The process is registered until the
connection closes. The daemon renews the lease in every page; a process whose daemon is gone resumes by
itself when its lease passes."""
from __future__ import annotations

import itertools
import json
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..core.procfs import namespace_pids
from ..core.protocol import MAX_REQUEST, Connection, ControlError, Peer
from ..core.vocabulary import PRIORITY_NAMES
from ..interposer.shm import PageError, PageReading, SharedPage
from .records import DeviceEnforcement, Enforcement
from .requests import InterposerRequests

log = logging.getLogger(__name__)
PROTOCOL_VERSION = 1
SEND_TIMEOUT_S = 5


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


class _Pending:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.reply: dict[str, Any] | None = None
        self.error: str | None = None


class InterposedProcess:
    """One attached process: its page and its connection. request() may be called from any thread."""

    def __init__(self, pid: int, attach: AttachRequest, page: SharedPage, connection: Connection,
                 timeout: Callable[[], float] = lambda: 120.0) -> None:
        self.pid, self.attach, self.page, self.connection = pid, attach, page, connection
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
            self._pending[request_id] = pending
        try:
            with self._write_lock:
                self.connection.send_line(line_of(request_id))
        except OSError:
            self.close()  # a line may be half written: the library reconnects and attaches again
            raise RequestFailed(f"pid {self.pid}: its interposer has disconnected") from None
        if not pending.done.wait(timeout):
            with self._lock:
                self._pending.pop(request_id, None)
            raise RequestFailed(f"pid {self.pid} did not answer {op} within {timeout:g} s")
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
        return Enforcement(pid=self.pid, interposed=True, state=h.state,
                           priority=h.priority if h.priority in PRIORITY_NAMES else self.attach.priority,
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
        self._thread = threading.Thread(target=self._renew_loop, name="gpuwatch-leases", daemon=True)
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
        process = InterposedProcess(peer.pid, attach, page, connection, lambda: self.request_timeout)
        # a library that stops reading must not hold a request's thread forever
        connection.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", SEND_TIMEOUT_S, 0))
        try:
            page.write_lease(time.monotonic_ns() + self.lease_ns)
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
        while not self._stop.wait(self.renew_every):
            with self._lock:
                processes = list(self._processes.values())
            for p in processes:
                try:
                    p.page.write_lease(time.monotonic_ns() + self.lease_ns)
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
