"""Room given is room taken before anything shows it (enforcer/roomstops.py): an allocation let through, and a
restore under way, count against what each GPU can give, for the scheduler's plan, for restores and for the
probes' check, until the probes see the allocation held. On the H200 a restore asked for in that moment failed
for lack of memory and the other process's next allocation failed too."""
from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpuwatch.core.procfs import proc_stat
from gpuwatch.enforcer.ledger import ROOM, Ledger
from gpuwatch.enforcer.roomstops import GRANT_S, RoomStops
from gpuwatch.probes.quotamaps import QuotaStop

GiB = 1 << 30


class Maps:
    """The BPF room maps as the probes would hold them."""

    def __init__(self) -> None:
        self.free: dict[int, int] = {}
        self.pending: list[QuotaStop] = []

    def set_free(self, free: dict[int, int]) -> None:
        self.free = dict(free)

    def set_exempt(self, pids: set[int]) -> None:
        pass

    def stops(self) -> list[QuotaStop]:
        return list(self.pending)

    def clear_stop(self, pid: int, tid: int) -> None:
        self.pending = [s for s in self.pending if (s.pid, s.tid) != (pid, tid)]


@pytest.fixture
def stopped_child() -> Iterator[int]:
    child = subprocess.Popen(["sleep", "60"])
    os.kill(child.pid, signal.SIGSTOP)
    yield child.pid
    child.kill()
    child.wait()


def stopped_at(pid: int, nbytes: int) -> QuotaStop:
    return QuotaStop(pid=pid, tid=pid, size=nbytes, gpu=0, kind=0, group_used=0, limit=0)


def test_an_allocation_let_through_counts_as_taken_until_the_probes_see_it_held(tmp_path: Path, stopped_child):
    maps, pid = Maps(), stopped_child
    room = RoomStops(maps, Ledger(tmp_path / "state.json"))
    maps.pending = [stopped_at(pid, 60 * GiB)]
    room.reconcile(0.0, {0: 50 * GiB}, 300.0, set(), set(), {(pid, 0): GiB})
    assert room.wanted() == {pid: {0: 60 * GiB}} and room.in_flight() == {}  # waits: it does not fit
    assert (proc := proc_stat(pid)) is not None and proc.state == "T"
    room.reconcile(1.0, {0: 100 * GiB}, 300.0, set(), set(), {(pid, 0): GiB})
    assert (proc := proc_stat(pid)) is not None and proc.state != "T"  # continued: it fits
    assert ROOM not in Ledger(tmp_path / "state.json").holders(pid)
    assert room.wanted() == {pid: {0: 60 * GiB}} and room.in_flight() == {0: 60 * GiB}
    room.publish({0: 100 * GiB}, set())
    assert maps.free == {0: 40 * GiB}  # another allocation of 50 GiB is stopped by the probes meanwhile
    room.settle(2.0, {(pid, 0): 30 * GiB})  # not all of it yet
    assert room.in_flight() == {0: 60 * GiB}
    room.settle(3.0, {(pid, 0): 61 * GiB})
    assert room.in_flight() == {} and room.wanted() == {}
    room.publish({0: 39 * GiB}, set())
    assert maps.free == {0: 39 * GiB}


def test_an_allocation_never_seen_stops_counting_after_the_grant_time(tmp_path: Path, stopped_child):
    maps, pid = Maps(), stopped_child
    room = RoomStops(maps, Ledger(tmp_path / "state.json"))
    maps.pending = [stopped_at(pid, 8 * GiB)]
    room.reconcile(0.0, {0: 10 * GiB}, 300.0, set(), set(), {})
    room.settle(GRANT_S - 0.1, {})
    assert room.in_flight() == {0: 8 * GiB}
    room.settle(GRANT_S, {})  # it failed, or freed at once: nothing to wait for
    assert room.in_flight() == {}


def test_a_grant_counts_from_the_end_of_the_tick_that_made_it(tmp_path: Path, stopped_child):
    """On the H200 the tick that checkpointed a notebook for a stopped allocation took 30 s: a grant counted
    from the tick's start had expired before the next tick, which restored the notebook into that room."""
    maps, pid = Maps(), stopped_child
    room = RoomStops(maps, Ledger(tmp_path / "state.json"))
    maps.pending = [stopped_at(pid, 95 * GiB)]
    room.reconcile(0.0, {0: 100 * GiB}, 300.0, set(), set(), {(pid, 0): GiB})  # the tick began at 0
    room.publish({0: 100 * GiB}, set(), 30.0)  # and ended 30 s later
    room.settle(30.2, {(pid, 0): GiB})  # the next tick: not allocated yet
    assert room.in_flight() == {0: 95 * GiB} and maps.free == {0: 5 * GiB}
    room.settle(30.0 + GRANT_S - 0.1, {(pid, 0): GiB})
    assert room.in_flight() == {0: 95 * GiB}
    room.publish({0: 100 * GiB}, set(), 40.0)  # published again: its time is not moved again
    room.settle(30.0 + GRANT_S, {(pid, 0): GiB})
    assert room.in_flight() == {}


def test_two_stopped_allocations_do_not_both_get_the_same_room(tmp_path: Path):
    children = [subprocess.Popen(["sleep", "60"]) for _ in range(2)]
    try:
        for c in children:
            os.kill(c.pid, signal.SIGSTOP)
        maps = Maps()
        room = RoomStops(maps, Ledger(tmp_path / "state.json"))
        maps.pending = [stopped_at(children[0].pid, 30 * GiB)]
        room.reconcile(0.0, {0: 40 * GiB}, 300.0, set(), set(), {})
        maps.pending = [stopped_at(children[1].pid, 30 * GiB)]
        room.reconcile(0.1, {0: 40 * GiB}, 300.0, set(), set(), {})  # the first has not allocated yet
        states = [(s := proc_stat(c.pid)) is not None and s.state for c in children]
        assert states[0] != "T" and states[1] == "T"
    finally:
        for c in children:
            c.kill()
            c.wait()


def test_a_restore_under_way_holds_its_room_for_the_probes(tmp_path: Path):
    maps = Maps()
    room = RoomStops(maps, Ledger(tmp_path / "state.json"))
    room.publish({0: 100 * GiB, 1: 100 * GiB}, set())
    with room.claim(7, {0: 60 * GiB}):
        assert maps.free == {0: 40 * GiB, 1: 100 * GiB} and room.in_flight() == {0: 60 * GiB}
    assert maps.free == {0: 100 * GiB, 1: 100 * GiB} and room.in_flight() == {}
    with pytest.raises(RuntimeError), room.claim(7, {1: 10 * GiB}):
        raise RuntimeError("the driver failed")
    assert maps.free == {0: 100 * GiB, 1: 100 * GiB}  # given back whatever the restore did


def test_an_interposed_process_let_retry_has_its_room_taken_on_each_of_its_gpus(tmp_path: Path):
    """Its page says how much its allocations waited for, not on which GPU: taken on every GPU it is on, until
    the probes see it held there."""
    from gpuwatch.core.view import Gpu, ProcessGpu, Snapshot, TracerHealth
    from gpuwatch.enforcer.plainplan import PlainPlanner

    def snap(held: int) -> Snapshot:
        return Snapshot([ProcessGpu(pid=42, comm="train", gpu=0, device_bytes=held),
                         ProcessGpu(pid=42, comm="train", gpu=1, device_bytes=0),
                         ProcessGpu(pid=7, comm="other", gpu=1, device_bytes=GiB)],
                        [Gpu(index=0), Gpu(index=1)], TracerHealth(launch_mode="sample"))
    maps = Maps()
    room = RoomStops(maps, Ledger(tmp_path / "state.json"))
    plan = PlainPlanner(None, None, room)  # type: ignore[arg-type]  # only its room is used here
    plan.room_given(42, 20 * GiB, snap(GiB), 0.0)
    assert room.in_flight() == {0: 20 * GiB, 1: 20 * GiB}
    plan.room_given(99, GiB, snap(GiB), 0.0)  # no row: no GPU to take it on
    assert room.in_flight() == {0: 20 * GiB, 1: 20 * GiB}
    room.settle(1.0, {(42, 0): 21 * GiB, (42, 1): 0})
    assert room.in_flight() == {0: 20 * GiB, 1: 20 * GiB}  # seen on one GPU only: held until GRANT_S
    room.settle(GRANT_S, {(42, 0): 21 * GiB})
    assert room.in_flight() == {}


def test_a_process_waiting_again_is_counted_for_what_it_asks_now_not_also_for_what_it_was_given(
        tmp_path: Path, stopped_child):
    maps, pid = Maps(), stopped_child
    room = RoomStops(maps, Ledger(tmp_path / "state.json"))
    maps.pending = [stopped_at(pid, 30 * GiB)]
    room.reconcile(0.0, {0: 40 * GiB}, 300.0, set(), set(), {})  # let through: 30 GiB taken
    os.kill(pid, signal.SIGSTOP)
    maps.pending = [stopped_at(pid, 20 * GiB)]  # its allocation failed after all; it asks again, for less
    room.reconcile(0.5, {0: 10 * GiB}, 300.0, set(), set(), {})
    assert room.wanted() == {pid: {0: 20 * GiB}} and room.in_flight() == {}
    room.grant(8, {0: 5 * GiB}, {}, 1.0)  # an interposed process let retry ...
    room.waiting_again({8})                # ... that waits again: its page says what for
    assert room.in_flight() == {}


def test_what_a_process_holds_is_what_the_probes_saw_when_nvml_has_not_caught_up() -> None:
    """NVML is read every 0.25 s; a 95 GiB allocation the probes saw a moment ago is held now."""
    from gpuwatch.core.view import ProcessGpu
    from gpuwatch.enforcer.roomstops import resident_bytes
    just_allocated = ProcessGpu(pid=1, comm="train", gpu=0, device_bytes=95 * GiB, nvml_bytes=GiB)
    settled = ProcessGpu(pid=1, comm="train", gpu=0, device_bytes=95 * GiB, nvml_bytes=96 * GiB)
    no_nvml = ProcessGpu(pid=1, comm="train", gpu=0, device_bytes=95 * GiB)
    assert [resident_bytes(r, GiB // 2) for r in (just_allocated, settled, no_nvml)] == \
        [95 * GiB, 96 * GiB, 95 * GiB + GiB // 2]
