"""The enforcer's loop over a snapshot it is handed: what it asks of interposed processes and of the pauser.

No GPU, no eBPF: the registry and the pauser are stand-ins that record requests; the decisions are the real
scheduler's."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from gpuwatch.enforcer.enforcer import Enforcer, SchedulerSettings
from gpuwatch.enforcer.hostmemory import HostBudget, HostSettings
from gpuwatch.enforcer.interposed import InterposedRegistry
from gpuwatch.enforcer.checkpointer import Checkpointer
from gpuwatch.enforcer.ledger import Ledger
from gpuwatch.enforcer.scheduler import Verdict
from conftest import wait_for
from gpuwatch.core.view import Gpu, ProcessGpu, Snapshot, TracerHealth
from gpuwatch.enforcer.records import DeviceEnforcement, Enforcement
from gpuwatch.enforcer.requests import InterposerRequests

GiB = 1 << 30


class RecordingProcess:
    """Records each request line's op; answers as a library would."""

    def __init__(self, pid: int, requests: list[tuple[int, str]]) -> None:
        self.pid = pid

        def call(line_of: Callable[[int], str], op: str, timeout: float) -> dict[str, Any]:
            requests.append((pid, op))
            fields = line_of(1).split()
            return {"bytes": int(fields[2]) if op == "swap_out" else 0}

        self.requests = InterposerRequests(call, lambda: 1.0)


class Registry(InterposedRegistry):
    def __init__(self, pages: dict[int, Enforcement], detached: set[int]) -> None:
        super().__init__()
        self.pages, self.detached, self.requests = pages, detached, []

    def enforcement(self) -> dict[int, Enforcement]:
        return dict(self.pages)

    def get(self, pid: int) -> RecordingProcess | None:
        return RecordingProcess(pid, self.requests) if pid in self.pages else None

    def pids(self) -> list[int]:
        return sorted(self.pages)

    def detached_within(self, seconds: float) -> set[int]:
        return set(self.detached)


class RecordingPauser:
    def __init__(self) -> None:
        self.paused: list[int] = []
        self.ledger = Ledger()
        self.checkpointer = Checkpointer(None, self.ledger, why_not="no driver in this test")

    def held(self, pid: int, by: str | None = None) -> bool:
        return pid in self.paused

    def pause(self, pid: int, by: str = "hand") -> None:
        self.paused.append(pid)

    def resume(self, pid: int, by: str | None = None) -> None:
        self.paused.remove(pid)


def swapped_page(pid: int, total: int, swapped: int) -> Enforcement:
    device = DeviceEnforcement(0, None, swapped_bytes=swapped, swappable_bytes=total, unswappable_bytes=0, in_use=True)
    return Enforcement(pid=pid, interposed=True, state="swapped", devices=(device,), launches=0)


def snapshot(rows: list[ProcessGpu]) -> Snapshot:
    return Snapshot(rows, [Gpu(0, memory_total=100 * GiB)], TracerHealth("off"))


def enforcer_for(rows: list[ProcessGpu], pages: dict[int, Enforcement], detached: set[int]
                 ) -> tuple[Enforcer, Registry, RecordingPauser]:
    registry, pauser = Registry(pages, detached), RecordingPauser()
    settings = SchedulerSettings(reserve_bytes=0, context_bytes=0, idle_s=0.3)
    return Enforcer(lambda: (snapshot(rows), registry.enforcement()), registry, pauser,  # type: ignore[arg-type]
                    settings), registry, pauser


def test_a_process_whose_interposer_left_is_waited_for_not_made_room_for() -> None:
    """The other training has finished: its library disconnected while its driver still frees 90 GiB. The
    swapped-out one waits for that memory; nobody is swapped out further and the leaver is never stopped."""
    waiting = ProcessGpu(pid=10, comm="train", gpu=0, nvml_bytes=50 * GiB, interposed=True)
    leaver = ProcessGpu(pid=11, comm="train", gpu=0, nvml_bytes=90 * GiB)
    pages = {10: swapped_page(10, total=90 * GiB, swapped=40 * GiB)}
    enforcer, registry, pauser = enforcer_for([waiting, leaver], pages, detached={11})
    decisions = enforcer.tick(0.0)
    assert decisions == {10: decisions[10]} and decisions[10].verdict is Verdict.PAUSE
    assert registry.requests == [] and pauser.paused == []

    enforcer.view = lambda: (snapshot([waiting]), registry.enforcement())  # its memory is gone
    decisions = enforcer.tick(0.1)
    assert decisions[10].verdict is Verdict.RUN
    assert registry.requests == [(10, "resume")]


def test_without_the_grace_a_leaver_would_be_scheduled_like_a_plain_process() -> None:
    """The same GPU, the leaver not known as one: the waiting process is swapped out further to make room
    for memory that is about to be freed anyway (what the grace avoids)."""
    waiting = ProcessGpu(pid=10, comm="train", gpu=0, nvml_bytes=50 * GiB, interposed=True)
    leaver = ProcessGpu(pid=11, comm="train", gpu=0, nvml_bytes=90 * GiB)
    pages = {10: swapped_page(10, total=90 * GiB, swapped=40 * GiB)}
    enforcer, registry, pauser = enforcer_for([waiting, leaver], pages, detached=set())
    decisions = enforcer.tick(0.0)
    assert decisions[11].verdict is Verdict.RUN and decisions[10].verdict is Verdict.SWAP
    assert registry.requests == [(10, "swap_out")]


def budget(available: int, headroom: tuple[int, int] | None = None, limit: int | None = None) -> HostBudget:
    return HostBudget(HostSettings(reserve_bytes=4 * GiB, limit_bytes=limit),
                      meminfo=lambda: {"MemTotal": 125 * GiB, "MemAvailable": available},
                      headroom=lambda pid: headroom)


def contended(host: HostBudget) -> tuple[Enforcer, Registry, dict[int, Enforcement]]:
    """A holder of 60 GiB running, a newcomer asking for 60 GiB on a 100 GiB GPU: the holder must go out."""
    holder = ProcessGpu(pid=10, comm="train", gpu=0, nvml_bytes=60 * GiB, interposed=True)
    newcomer = ProcessGpu(pid=11, comm="train", gpu=0, nvml_bytes=0, interposed=True)
    running = DeviceEnforcement(0, None, swapped_bytes=0, swappable_bytes=60 * GiB, unswappable_bytes=0, in_use=True)
    pages = {10: Enforcement(pid=10, interposed=True, state="running", devices=(running,), launches=0),
             11: Enforcement(pid=11, interposed=True, state="running", wanted_bytes=60 * GiB, waiting_threads=1,
                             launches=0)}
    enforcer, registry, _ = enforcer_for([holder, newcomer], pages, detached=set())
    enforcer.host = host
    return enforcer, registry, pages


def test_a_swap_out_the_host_cannot_hold_is_not_carried_out() -> None:
    """22 GiB must go out (the excess and the slack); 16 GiB is spare: the holder runs on, nothing moves, and
    the newcomer waits for host memory (then gets out-of-memory after room_wait_ms), sent nothing meanwhile."""
    enforcer, registry, _ = contended(budget(available=20 * GiB))
    decisions = enforcer.tick(0.0)
    assert decisions[10].verdict is Verdict.RUN
    assert registry.requests == []
    assert enforcer.reasons == {11: "waiting for host memory"}


def test_a_swap_out_that_fits_the_host_and_not_the_cgroup_is_not_carried_out() -> None:
    enforcer, registry, _ = contended(budget(available=120 * GiB, headroom=(16 * GiB, 32 * GiB)))
    decisions = enforcer.tick(0.0)
    assert decisions[10].verdict is Verdict.RUN
    assert [op for _, op in registry.requests if op == "swap_out"] == []


def test_a_swap_out_within_the_budget_goes_ahead() -> None:
    enforcer, registry, _ = contended(budget(available=120 * GiB))
    decisions = enforcer.tick(0.0)
    assert decisions[10].verdict is Verdict.SWAP and decisions[10].swap_bytes == 22 * GiB
    assert [op for _, op in registry.requests if op == "swap_out"] == ["swap_out"]


def test_a_process_that_cannot_be_placed_is_left_alone_then_refused_and_refused_again_at_once() -> None:
    """A process without the interposer holds 80 GiB of 100: the newcomer's 30 GiB can never fit. It is not
    swapped out or resumed meanwhile (either would only make its allocation fail again sooner), gets one
    out-of-memory answer after room_wait_s, and when its program asks again at once (PyTorch retries once),
    the answer comes at once rather than after a second wait."""
    plain = ProcessGpu(pid=20, comm="notebook", gpu=0, nvml_bytes=80 * GiB)
    newcomer = ProcessGpu(pid=21, comm="train", gpu=0, nvml_bytes=10 * GiB, interposed=True)
    device = DeviceEnforcement(0, None, swapped_bytes=0, swappable_bytes=10 * GiB, unswappable_bytes=0, in_use=True)
    waiting = Enforcement(pid=21, interposed=True, state="running", devices=(device,), wanted_bytes=30 * GiB,
                          waiting_threads=1, launches=0)
    enforcer, registry, pauser = enforcer_for([plain, newcomer], {21: waiting}, detached=set())
    enforcer.settings = replace(enforcer.settings, room_wait_s=1.0)
    for t in (0.0, 0.5, 0.9):
        enforcer.tick(t)
    assert registry.requests == [] and pauser.paused == [] and enforcer.reasons[21] == "waiting for device memory"
    enforcer.tick(1.0)
    wait_for(lambda: registry.requests == [(21, "no_room")], 2, "the refusal")
    enforcer.tick(1.05)  # its program asked again: the page still says it waits
    wait_for(lambda: registry.requests == [(21, "no_room")] * 2, 2, "the second refusal, at once")
    assert pauser.paused == []  # the process without the interposer was never stopped


def test_the_room_check_is_told_when_the_tick_ended_not_when_it_began(monkeypatch) -> None:
    """A tick that checkpoints takes 30 s and more: the allocations it lets through count from its end."""
    import gpuwatch.enforcer.enforcer as module
    clock = [1000.0]
    monkeypatch.setattr(module.time, "monotonic", lambda: clock[0])
    rows = [ProcessGpu(pid=20, comm="train", gpu=0, nvml_bytes=10 * GiB)]
    enforcer, registry, _ = enforcer_for(rows, {}, detached=set())
    told: list[float] = []
    monkeypatch.setattr(enforcer.plain, "room_stops", lambda view, snap, pages, now, *rest: told.append(now))

    def slow_view() -> tuple[Snapshot, dict[int, Enforcement]]:
        clock[0] += 30.0
        return snapshot(rows), registry.enforcement()
    enforcer.view = slow_view  # type: ignore[method-assign]
    enforcer.tick(5.0)
    assert told == [35.0]
