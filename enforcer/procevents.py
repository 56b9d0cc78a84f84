"""Process lifecycle for the policy: which processes start a new program and which exit, as it happens.

The kernel's process connector (netlink, through pyroute2's ProcEventSocket) tells us of every fork, exec
and exit. `on_exec(pid)` is called at exec and for a new process at fork (a forked child runs its parent's
program: the same rules match it); `on_exit(pid)` once its last thread has exited. Where the connector
cannot be opened (no CONFIG_PROC_EVENTS, no privileges, a restricted container), one log line says so and
/proc is scanned every second instead: new processes and those whose executable changed are reported as
execs, vanished ones (and zombies) as exits. GPUWATCH_PROC_EVENTS=scan forces the scan.

Callbacks run on the listener's thread, one at a time; an exception in one is logged and the listener goes
on. close() ends the thread (within a second) and closes the socket."""
from __future__ import annotations

import errno
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable

from ..core.procfs import proc_stat, thread_states

log = logging.getLogger(__name__)
SCAN_SECONDS = 1.0
RECEIVE_BUFFER = 8 << 20
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # root may pass rmem_max
ANSWER_SECONDS = 2.0
CN_IDX_PROC = CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN, PROC_CN_MCAST_IGNORE = 1, 2
NLMSG_DONE = 3


def _control(op: int) -> bytes:
    """A netlink message to the process connector: struct nlmsghdr, struct cn_msg, then the operation."""
    payload = struct.pack("=IIIIHHI", CN_IDX_PROC, CN_VAL_PROC, 0, 0, 4, 0, op)
    return struct.pack("=IHHII", 16 + len(payload), NLMSG_DONE, 0, 0, 0) + payload


def _ended(tgid: int) -> bool:
    """Whether no thread of the process runs any more (gone, or a zombie waiting for its parent)."""
    return all(state in ("Z", "X") for state in thread_states(tgid) or [])


class ProcEvents:
    def __init__(self, on_exec: Callable[[int], object], on_exit: Callable[[int], object],
                 on_lost: Callable[[], object] | None = None, mode: str | None = None) -> None:
        """on_lost: events were dropped (the socket's buffer overflowed): everything should be re-read.
        mode: "auto" (netlink, else the scan), "netlink" or "scan"; default $GPUWATCH_PROC_EVENTS or auto."""
        self.on_exec, self.on_exit, self.on_lost = on_exec, on_exit, on_lost
        self.mode = mode or os.environ.get("GPUWATCH_PROC_EVENTS", "auto")
        self.source: str | None = None  # "netlink" or "scan" once started
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread: threading.Thread | None = None
        self._known: dict[int, tuple[int, str]] = {}  # the scan: pid -> (start time, executable)
        self._ending: dict[int, tuple[float, float]] = {}  # leader exited, threads left: tgid -> (next check, step)

    # lifecycle

    def start(self) -> None:
        """Subscribes before it returns: every exec and exit after this call is reported."""
        ready = threading.Event()
        problem: list[str] = []
        if self.mode != "scan":
            self._thread = threading.Thread(target=self._netlink, args=(ready, problem), name="gpuwatch-procevents",
                                            daemon=True)
            self._thread.start()
            ready.wait(10)
            if not problem and ready.is_set():
                self.source = "netlink"
                return
            self._thread.join(timeout=2)
            if self.mode == "netlink":
                raise OSError(f"process events: {problem[0] if problem else 'no answer from the connector'}")
            log.warning("process events: %s; scanning /proc every %g s instead",
                        problem[0] if problem else "no answer from the process connector", SCAN_SECONDS)
        else:
            log.info("process events: scanning /proc every %g s (GPUWATCH_PROC_EVENTS=scan)", SCAN_SECONDS)
        self.source = "scan"
        self._known = self._scan_once()
        self._thread = threading.Thread(target=self._scan, name="gpuwatch-procscan", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout=5)
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1

    def _call(self, callback: Callable[..., object] | None, *args: int) -> None:
        if callback is None:
            return
        try:
            callback(*args)
        except Exception:
            log.exception("process events: %s%s failed", getattr(callback, "__name__", "callback"), args)

    # the process connector

    def _netlink(self, ready: threading.Event, problem: list[str]) -> None:
        nl = raw = None
        try:
            from pyroute2 import ProcEventSocket
            nl = ProcEventSocket()
            nl.bind()
            # Subscribe on our own descriptor, without pyroute2's control(): that waits for the answer
            # forever where the kernel has the connector but not CONFIG_PROC_EVENTS.
            raw = socket.socket(fileno=os.dup(nl.fileno()))
            try:
                raw.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RECEIVE_BUFFER)
            except OSError:
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
            raw.send(_control(PROC_CN_MCAST_LISTEN))
            if not select.select([raw], [], [], ANSWER_SECONDS)[0]:
                raise OSError(f"no answer within {ANSWER_SECONDS:g} s (a kernel without CONFIG_PROC_EVENTS?)")
        except Exception as exc:
            problem.append(f"cannot listen to the process connector: {exc}")
            for closable in (raw, nl):
                if closable is not None:
                    closable.close()
            return
        finally:
            ready.set()
        try:
            self._receive(raw, nl.marshal)
        except Exception as exc:  # the connector failed later: go on as if it had never opened
            if not self._stop.is_set():
                log.error("process events: the process connector failed: %s; scanning /proc every %g s instead",
                          exc, SCAN_SECONDS)
                self.source = "scan"
                self._known = self._scan_once()
                self._call(self.on_lost)
                self._scan()
        finally:
            try:
                raw.send(_control(PROC_CN_MCAST_IGNORE))
            except OSError:
                pass
            raw.close()
            nl.close()

    def _receive(self, raw: socket.socket, marshal) -> None:
        from pyroute2.netlink.connector.cn_proc import PROC_EVENT_EXEC, PROC_EVENT_EXIT, PROC_EVENT_FORK
        while not self._stop.is_set():
            timeout = None
            if self._ending:
                timeout = max(0.0, min(t for t, _ in self._ending.values()) - time.monotonic())
            readable, _, _ = select.select([raw.fileno(), self._wake_r], [], [], timeout)
            if self._stop.is_set():
                return
            if raw.fileno() in readable:
                try:
                    data = raw.recv(1 << 16)
                except OSError as exc:
                    if exc.errno == errno.ENOBUFS:
                        log.warning("process events: the kernel dropped events (buffer full): re-reading /proc")
                        self._call(self.on_lost)
                        continue
                    if exc.errno in (errno.EINTR, errno.EAGAIN):
                        continue
                    raise
                for msg in marshal.parse(data):
                    what = msg.get("what")
                    if what == PROC_EVENT_EXEC:
                        self._call(self.on_exec, msg["process_tgid"])
                    elif what == PROC_EVENT_FORK and msg["child_pid"] == msg["child_tgid"]:
                        self._call(self.on_exec, msg["child_tgid"])
                    elif what == PROC_EVENT_EXIT:
                        tgid = msg["process_tgid"]
                        if msg["process_pid"] == tgid or tgid in self._ending:
                            self._check_ended(tgid, first=tgid not in self._ending)
            now = time.monotonic()
            for tgid in [t for t, (at, _) in self._ending.items() if at <= now]:
                self._check_ended(tgid, first=False)

    def _check_ended(self, tgid: int, first: bool) -> None:
        """At its leader's exit a process has usually ended; where threads still run (the leader left
        first, or the others are still on their way out) it is checked again, soon, then less often."""
        if _ended(tgid):
            self._ending.pop(tgid, None)
            self._call(self.on_exit, tgid)
            return
        step = 0.01 if first else min(self._ending.get(tgid, (0.0, 0.01))[1] * 2, 1.0)
        self._ending[tgid] = (time.monotonic() + step, step)

    # the fallback

    def _scan_once(self) -> dict[int, tuple[int, str]]:
        found: dict[int, tuple[int, str]] = {}
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            pid = int(name)
            stat = proc_stat(pid)
            if stat is None or stat.state in ("Z", "X"):
                continue
            try:
                exe = os.readlink(f"/proc/{pid}/exe")
            except OSError:
                exe = ""
            found[pid] = (stat.start_time, exe)
        return found

    def _scan(self) -> None:
        while not self._stop.wait(SCAN_SECONDS):
            try:
                now = self._scan_once()
            except OSError as exc:
                log.warning("process events: cannot scan /proc: %s", exc)
                continue
            for pid in sorted(set(self._known) - set(now)):
                self._call(self.on_exit, pid)
            for pid, seen in sorted(now.items()):
                before = self._known.get(pid)
                if before != seen:
                    if before is not None and before[0] != seen[0]:
                        self._call(self.on_exit, pid)  # the pid was reused between two scans
                    self._call(self.on_exec, pid)
            self._known = now
