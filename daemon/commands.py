"""The control socket's commands: what `gpuwatch ps`, `status`, `trace`, `pause`, `resume`, `move`, `quota`,
`priority` and `policy` ask of the daemon, and the interposers' attach. Reads go to the one view."""
from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

from ..core.protocol import ControlError, Peer
from ..core.vocabulary import MAX_SIZE, PRIORITY_NAMES, Priority, size_problem
from ..enforcer.pause import pid_argument
from ..enforcer.rules import ProcessFacts
from .server import Command

if TYPE_CHECKING:
    from .daemon import Daemon

log = logging.getLogger(__name__)
TRACE_STREAMS_PER_UID = 16  # trace streams one user other than root may hold open


def commands(daemon: Daemon) -> dict[str, Command]:
    c = _Commands(daemon)
    return {
        "ps": Command(c.ps),
        "status": Command(c.status),
        "trace": Command(stream=c.trace),
        "interposer_attach": Command(takeover=daemon.interposed.attach),
        "pause": Command(c.pause, root_only=True),
        "resume": Command(c.resume, root_only=True),
        "move": Command(c.move, root_only=True),
        "quota_set": Command(c.quota_set, root_only=True),
        "quota_list": Command(lambda _peer, _request: daemon.quota.groups()),
        "priority": Command(c.priority),  # any user may read; changes are checked per peer
        "policy": Command(lambda _peer, _request: {**daemon.policy.to_json(), "events": daemon.procevents.source}),
    }


class _Commands:
    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        self._streams = 0  # trace streams being served: `status` tells, so that clients can wait for theirs
        self._streams_of: dict[int, int] = {}  # uid -> its trace streams
        self._trace_lost = 0  # events trace streams lost because they fell behind (each stream is told its own)
        self._lock = threading.Lock()

    def ps(self, _peer: Peer, _request: dict[str, Any]) -> list[dict[str, Any]]:
        return [p.to_json() for p in self.d.view().processes]

    def status(self, _peer: Peer, _request: dict[str, Any]) -> dict[str, Any]:
        view = self.d.view().to_json()
        return {"health": view["health"], "gpus": view["gpus"], "host": view["host"],
                "processes": len(view["processes"]),
                "interposed": len(self.d.interposed.pids()), "trace_streams": self._streams,
                "trace_events_lost": self._trace_lost, "thread_restarts": view["health"]["thread_restarts"],
                "checkpoint": self.d.checkpointer.status()}

    def trace(self, peer: Peer, request: dict[str, Any],
              closing: threading.Event) -> Generator[dict[str, Any], None, None]:
        """Events as they come; a stream that falls behind loses its own (its queue is bounded), and is told
        how many with an event {"lost": N} before the next one it gets."""
        pid, comm = request.get("pid"), request.get("comm")
        if pid is not None and not isinstance(pid, int):
            raise ControlError("trace: pid must be an integer")
        if comm is not None and not isinstance(comm, str):
            raise ControlError("trace: comm must be a string")
        with self._lock:
            mine = self._streams_of.get(peer.uid, 0)
            if mine >= TRACE_STREAMS_PER_UID and not peer.is_root:
                raise ControlError(f"trace: uid {peer.uid} has {mine} trace streams open, the most one user may: "
                                   "close one first")
            self._streams_of[peer.uid] = mine + 1
            self._streams += 1
        wants = None if pid is None and comm is None else \
            lambda e: (pid is None or e.pid == pid) and (comm is None or e.comm == comm)
        events = self.d.tracer.subscribe(wants=wants)
        told = 0
        try:
            while not closing.is_set() and not self.d.stopping.is_set():
                if (lost := events.lost) > told:
                    with self._lock:
                        self._trace_lost += lost - told
                    yield {"lost": lost - told}
                    told = lost
                try:
                    event = events.get(timeout=0.5)
                except queue.Empty:
                    continue
                yield event.to_json()
        finally:
            self.d.tracer.unsubscribe(events)
            with self._lock:
                self._streams -= 1
                self._streams_of[peer.uid] -= 1
                if not self._streams_of[peer.uid]:
                    del self._streams_of[peer.uid]

    def pause(self, _peer: Peer, request: dict[str, Any]) -> dict[str, Any]:
        pid, swap, nbytes = pid_argument(request), request.get("swap", False), request.get("bytes", 0)
        if type(swap) is not bool:
            raise ControlError("pause: swap must be true or false")
        if type(nbytes) is not int or nbytes < 0:
            raise ControlError("pause: bytes must be a number of bytes (0: all)")
        return self._saved(self.d.pauser.pause(pid, swap, nbytes))

    def _saved(self, result: dict[str, Any]) -> dict[str, Any]:
        """A change the state file could not record says so (`saved` false, and why): it would not survive a
        crash of the daemon."""
        error = self.d.ledger.save_error
        return result if error is None else {**result, "saved": False, "save_error": error}

    def resume(self, _peer: Peer, request: dict[str, Any]) -> dict[str, Any]:
        return self.d.pauser.resume(pid_argument(request))

    def move(self, _peer: Peer, request: dict[str, Any]) -> dict[str, Any]:
        """A process not under the interposer onto another GPU: `to` is the host's GPU index or its UUID."""
        pid, to = pid_argument(request), request.get("to")
        if not ((type(to) is int and to >= 0) or (isinstance(to, str) and 0 < len(to) <= 96)):
            raise ControlError("move: to must be a GPU's index or UUID")
        return self._saved(self.d.mover.move(pid, to))

    def quota_set(self, _peer: Peer, request: dict[str, Any]) -> dict[str, Any]:
        pid, cgroup, nbytes = request.get("pid"), request.get("cgroup"), request.get("bytes")
        action = request.get("action", "pause")
        if (pid is None) == (cgroup is None):
            raise ControlError("quota_set: give either pid or cgroup")
        if size_problem(nbytes) is not None:
            raise ControlError(f"quota_set: bytes must be a number of bytes from 0 (no quota) to {MAX_SIZE}")
        assert type(nbytes) is int
        if cgroup is not None:
            if not isinstance(cgroup, str) or not cgroup:
                raise ControlError("quota_set: cgroup must be a path")
            return self._saved(self.d.quota.set_cgroup(cgroup, nbytes, action, by_hand=True))
        pid = pid_argument(request)
        process = self.d.interposed.get(pid)
        if process is None:
            return self._saved(self.d.quota.set_pid(pid, nbytes, action, by_hand=True))
        if action != "pause":
            raise ControlError(f"quota_set: pid {pid} runs under the interposer, where an allocation past the quota "
                               "fails (CUDA_ERROR_OUT_OF_MEMORY): only the pause action applies")
        process.requests.set_quota(nbytes)
        self.d.quota.set_backstop(pid, nbytes, by_hand=True)
        return self._saved({"pid": pid, "bytes": nbytes, "interposed": True})

    def priority(self, peer: Peer, request: dict[str, Any]) -> dict[str, Any]:
        """Read a process's priority (anyone), or set it: root any, others only lower their own."""
        pid, level = pid_argument(request), request.get("level")
        if level is not None and level not in PRIORITY_NAMES:
            raise ControlError(f"priority: level must be one of {', '.join(PRIORITY_NAMES)}, not "
                               f"{str(level)[:20]!r}")
        facts = ProcessFacts.read(pid)
        if facts is None:
            raise ControlError(f"no process with pid {pid}")
        policy = self.d.policy
        current, source = policy.effective_priority(pid)
        rule = policy.rule_of(pid)
        result = {"pid": pid, "priority": current.label, "source": source, "rule": rule.name if rule else None}
        if level is None:
            return result
        new = Priority.parse(level)
        if facts.kernel_thread:
            raise ControlError(f"pid {pid} is a kernel thread: it has no GPU priority")
        if not peer.is_root:
            if facts.uid != peer.uid:
                raise ControlError(f"pid {pid} belongs to uid {facts.uid}: uid {peer.uid} may only change its own "
                                   "processes (root may change any)")
            if new >= current:
                raise ControlError(f"pid {pid} is {current.label}: uid {peer.uid} may only lower the priority "
                                   f"of its processes, so not to {level} (root may)")
        policy.set_override(pid, facts.start_time, new)
        log.info("pid %d: priority %s (was %s), set by uid %d", pid, level, current.label, peer.uid)
        return {**result, "priority": level, "source": "set with gpuwatch priority", "was": current.label}
