"""Typed requests to an interposed process (docs/interposer.md, "Requests"): one line each,
`<id> <op>[ <arg>]`, answered by one JSON line that carries the id."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..core.vocabulary import STATES, U64_MAX


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
    """The requests the daemon makes of one interposed process. Each waits at most `timeout()` seconds and
    raises RequestFailed (a ControlError) when refused, late, or the process went away."""

    def __init__(self, call: Channel, timeout: Callable[[], float]) -> None:
        self._call, self._timeout = call, timeout

    def _ask(self, op: str, expected: str, arg: int | None = None) -> Reply:
        return reply_of(self._call(lambda rid: encode(rid, op, arg), op, self._timeout()), expected)

    def pause(self) -> Reply:
        """Close the gate after the calls in progress finish; memory stays on the device."""
        return self._ask("pause", "paused")

    def swap_out(self, nbytes: int = 0) -> Reply:
        """Pause and move at least `nbytes` (0: all it can) of its device memory to host memory."""
        return self._ask("swap_out", "swapped", nbytes)

    def resume(self) -> Reply:
        """Bring memory back, open the gate, and let allocations that wait for room try again."""
        return self._ask("resume", "running")

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
