"""Typed requests to an interposed process (docs/interposer.md, "Requests"): one line each,
`<id> <op>[ <arg>]`, answered by one JSON line that carries the id."""
from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..core.protocol import ControlError
from ..core.vocabulary import STATES, U64_MAX

# Seconds a request that moves no memory may take (pause, resume with nothing swapped out, quota, bound,
# no_room, drop_host), or the request timeout if that is shorter: the library answers these in moments (a pause
# drains launch queues the daemon keeps short), so a process silent this long is treated as gone (its
# connection is closed; its library fails open). Moving memory (swap_out, a resume that swaps in) may take
# [interposer] request_timeout_ms.
SHORT_TIMEOUT_S = 5.0

# What carries the lines (InterposedProcess.call): the line made from the request's id, the op (for
# messages), the timeout in seconds; returns the answer.
Channel = Callable[[Callable[[int], str], str, float], dict[str, Any]]


@dataclass(frozen=True)
class Reply:
    state: str                 # the process's state after the request (vocabulary.STATES, or "unknown")
    moved_bytes: int | None    # swap_out: what went to host memory (None: the library did not say)


def encode(request_id: int, op: str, arg: int | None = None) -> str:
    if not 0 < request_id <= U64_MAX or (arg is not None and not 0 <= arg <= U64_MAX):
        raise ValueError(f"request {op}: a number out of range")
    return f"{request_id} {op}" if arg is None else f"{request_id} {op} {arg}"


def reply_of(answer: dict[str, Any], expected: str) -> Reply:
    state = answer.get("state", expected)
    moved = answer.get("bytes")
    return Reply(state if state in STATES else "unknown",
                 moved if type(moved) is int and moved >= 0 else None)


class InterposerRequests:
    """The requests the daemon makes of one interposed process. Each waits at most SHORT_TIMEOUT_S, or
    `timeout()` seconds for one that moves memory, and raises RequestFailed (a ControlError) when refused,
    late, or the process went away."""

    def __init__(self, call: Channel, timeout: Callable[[], float]) -> None:
        self._call, self._timeout = call, timeout

    def _ask(self, op: str, expected: str, arg: int | None = None, moves_memory: bool = False) -> Reply:
        timeout = self._timeout() if moves_memory else min(SHORT_TIMEOUT_S, self._timeout())
        return reply_of(self._call(lambda rid: encode(rid, op, arg), op, timeout), expected)

    def pause(self) -> Reply:
        """Close the gate after the calls in progress finish; memory stays on the device."""
        return self._ask("pause", "paused")

    def swap_out(self, nbytes: int = 0) -> Reply:
        """Pause and move at least `nbytes` (0: all it can) of its device memory to host memory."""
        return self._ask("swap_out", "swapped", nbytes, moves_memory=True)

    def resume(self, swapped: bool = True) -> Reply:
        """Bring memory back, open the gate, and let allocations that wait for room try again. `swapped`
        False: nothing of it is in host memory (the short timeout holds)."""
        return self._ask("resume", "running", moves_memory=swapped)

    def set_quota(self, nbytes: int) -> Reply:
        """Its quota on every GPU (0: none)."""
        return self._ask("quota", "running", nbytes)

    def bound_queue(self, on: bool) -> Reply:
        """Keep its launch queue short (a higher priority shares its GPU), or stop doing so."""
        return self._ask("bound", "running", int(on))

    def drop_host(self) -> Reply:
        """Give back the pinned host memory that holds no swapped-out data (`moved_bytes`: what was freed)."""
        return self._ask("drop_host", "running")

    def deny_room(self) -> Reply:
        """Allocations waiting for room fail now, as the driver said (out of memory)."""
        return self._ask("no_room", "running")


class Aside:
    """Requests that no scheduling tick waits for (no_room, bound, drop_host): on a pool of their own, so that
    a process that does not answer delays no decision and no other process's requests."""

    def __init__(self, failed: Callable[[int, str, Exception], None]) -> None:
        """failed(pid, what, error): a request failed (logged by the caller)."""
        self._failed = failed
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="gpuwatch-aside")
        self._asking: set[tuple[str, int]] = set()  # (what, pid) sent and not yet answered
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., object], *args: Any) -> None:
        try:
            self._pool.submit(fn, *args)
        except RuntimeError:  # shut down: the daemon is stopping
            pass

    def ask(self, what: str, pid: int, request: Callable[[], object], done: Callable[[], object] | None = None) -> None:
        """Sends `request` unless the same kind of request to that process is still unanswered; `done` after
        it succeeded."""
        with self._lock:
            if (what, pid) in self._asking:
                return
            self._asking.add((what, pid))

        def run() -> None:
            try:
                request()
                if done is not None:
                    done()
            except ControlError as exc:
                self._failed(pid, what, exc)
            finally:
                with self._lock:
                    self._asking.discard((what, pid))

        try:
            self._pool.submit(run)
        except RuntimeError:  # shut down: the daemon is stopping
            with self._lock:
                self._asking.discard((what, pid))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
