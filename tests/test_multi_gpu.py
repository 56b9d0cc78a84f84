"""Several GPUs (issue 16): two test-double GPUs (the fake driver with FAKECUDA_DEVICES=2, a fake NVML that shows
both with the driver's UUIDs), the real daemon and eBPF. `gpuwatch move` of a plain program from GPU 0 to GPU 1
with its data, refused where GPU 1 has no room, surviving a daemon restart; a program on both GPUs checkpointed
and restored whole; the per-GPU plans in `ps --json`. The pure tests: the round's per-GPU verdicts combined, the
ledger's placements, the resolver's moved GPUs, and move_idle's choice, without a GPU or root."""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import ROOT, Daemon, wait_for
from gpu_fixtures import CAPACITY, PlainProg, driver_daemon, gpu_env, start_interposed
from interposer_fixtures import MiB, driver_used
from gpuwatch.core.view import Gpu, ProcessGpu, Snapshot, TracerHealth
from gpuwatch.enforcer.ledger import HAND, Ledger
from gpuwatch.enforcer.placement import Placement
from gpuwatch.enforcer.scheduler import Client, Decision, Scheduler, Verdict
from gpuwatch.enforcer.settings import SchedulerSettings
from gpuwatch.probes.devices import DeviceResolver, format_uuid, uuid_bytes

UUIDS = [format_uuid(f"fakecuda-dev{i:04d}".encode()) for i in range(2)]  # what the test-double driver answers
SCHEDULER = ("quantum_ms = 4000\nidle_ms = 10000\nreserve_mib = 0\ncontext_mib = 0\ntick_ms = 50\n"
             "room_wait_ms = 3000\nlock_timeout_ms = 300\n")


# ------------------------------------------------------------------------------------------------ two test-double GPUs


@pytest.fixture(scope="module")
def two_gpus(tmp_path_factory) -> tuple[Path, Path]:
    """A fake NVML showing two GPUs of CAPACITY bytes each, with the UUIDs the test-double driver gives them."""
    out = tmp_path_factory.mktemp("fakenvml2")
    subprocess.run(["make", "-s", "-C", str(ROOT / "tests" / "fakenvml"), f"OUT={out}"], check=True)
    (out / "state").write_text("".join(f"gpu {i} {uuid} {CAPACITY} 0 Fake GPU\n" for i, uuid in enumerate(UUIDS)))
    return out, out / "state"


@pytest.fixture
def shared2(tmp_path: Path) -> Path:
    return tmp_path / "gpus"


def two_gpu_env(fakecuda: Path, shared: Path) -> dict[str, str]:
    return {**gpu_env(fakecuda, shared), "FAKECUDA_DEVICES": "2"}


def two_gpu_daemon(gpus: tuple[Path, Path], fakecuda: Path, shared: Path, workdir: Path | None = None,
                   move_idle: bool = False, scheduler: str = SCHEDULER) -> Daemon:
    """A daemon whose driver is the test double seeing both GPUs."""
    return driver_daemon(gpus, shared, two_gpu_env(fakecuda, shared),
                         f'[daemon]\ndriver = "{fakecuda / "libcuda.so.1"}"\n[scheduler]\n{scheduler}'
                         f"move_idle = {'true' if move_idle else 'false'}\n", workdir)


@pytest.fixture
def mgpu_daemon(two_gpus, fakecuda: Path, shared2: Path) -> Iterator[Daemon]:
    d = two_gpu_daemon(two_gpus, fakecuda, shared2)
    yield d
    d.stop()
    if os.environ.get("GW_SHOW_LOG"):
        print(d.log.read_text()[-6000:])


class Plain(PlainProg):
    """A program without the interposer on the two test-double GPUs, device `ctx` current."""

    def __init__(self, fakecuda: Path, daemon: Daemon, shared: Path, ctx: int = 0) -> None:
        super().__init__(fakecuda, daemon, two_gpu_env(fakecuda, shared), ctx)


def placed(daemon: Daemon, pid: int) -> list[tuple[int, str, int]]:
    """(GPU, its UUID, device bytes) of each of the process's rows."""
    return [(r["gpu"], r["gpu_uuid"], r["device_bytes"]) for r in daemon.ps(pid)]


def test_move_takes_a_plain_program_to_gpu_1_with_its_data(fakecuda, shared2, mgpu_daemon):
    p = Plain(fakecuda, mgpu_daemon, shared2)
    p.holding("a", 32 * MiB, 7)
    assert (driver_used(shared2, 0), driver_used(shared2, 1)) == (32 * MiB, 0)
    out = mgpu_daemon.cli("move", str(p.pid), "--to", "1").stdout
    assert out.startswith(f"gpuwatch: pid {p.pid} moved from GPU 0 to GPU 1 ({UUIDS[1]}): 32.0MiB in "), out
    assert (driver_used(shared2, 0), driver_used(shared2, 1)) == (0, 32 * MiB)  # the driver holds it on GPU 1
    p.ok("check a 7")  # its data, at the same addresses, through its same device ordinal 0
    wait_for(lambda: placed(mgpu_daemon, p.pid) == [(1, UUIDS[1], 32 * MiB)], 5, "ps to show it on GPU 1 alone")
    wait_for(lambda: mgpu_daemon.row(p.pid, 1)["nvml_bytes"] == 32 * MiB, 5, "NVML to list it on GPU 1")
    assert mgpu_daemon.row(p.pid, 1)["state"] == "running"
    p.holding("b", 8 * MiB, 8)  # it goes on allocating: on GPU 1
    assert (driver_used(shared2, 0), driver_used(shared2, 1)) == (0, 40 * MiB)
    back = mgpu_daemon.cli("move", str(p.pid), "--to", UUIDS[0]).stdout  # by UUID
    assert f"moved from GPU 1 to GPU 0 ({UUIDS[0]})" in back, back
    assert (driver_used(shared2, 0), driver_used(shared2, 1)) == (40 * MiB, 0)
    wait_for(lambda: placed(mgpu_daemon, p.pid) == [(0, UUIDS[0], 40 * MiB)], 5, "ps to show it on GPU 0 alone")
    p.ok("check a 7")
    p.ok("check b 8")
    p.close()


def test_a_move_without_room_on_the_target_is_refused_and_the_process_runs_on(fakecuda, interposer, shared2,
                                                                               mgpu_daemon):
    p, q = Plain(fakecuda, mgpu_daemon, shared2), Plain(fakecuda, mgpu_daemon, shared2, ctx=1)
    p.holding("a", 32 * MiB, 3)
    q.holding("b", 80 * MiB, 4)  # GPU 1 has 16 MiB left
    failed = mgpu_daemon.cli("move", str(p.pid), "--to", "1", check=False)
    assert failed.returncode == 1
    assert failed.stderr == (f"gpuwatch: pid {p.pid} was not moved: it holds 32.0MiB and GPU 1 has 16.0MiB free "
                             "beside its processes and the reserve; it runs on GPU 0 untouched\n")
    assert (driver_used(shared2, 0), driver_used(shared2, 1)) == (32 * MiB, 80 * MiB)
    assert placed(mgpu_daemon, p.pid) == [(0, UUIDS[0], 32 * MiB)] and mgpu_daemon.row(p.pid)["state"] == "running"
    p.ok("check a 3")
    for args, problem in [(["--to", "5"], "no GPU 5 on this host; its GPUs: "
                                          f"0 ({UUIDS[0]}), 1 ({UUIDS[1]})"),
                          (["--to", "0"], f"pid {p.pid} is on GPU 0 already")]:
        r = mgpu_daemon.cli("move", str(p.pid), *args, check=False)
        assert (r.returncode, r.stderr) == (1, f"gpuwatch: {problem}\n")
    i = start_interposed(fakecuda, interposer, mgpu_daemon, shared2)
    r = mgpu_daemon.cli("move", str(i.pid), "--to", "1", check=False)
    assert (r.returncode, r.stderr) == (1, f"gpuwatch: pid {i.pid} runs under gpuwatch exec: moving an interposed "
                                           "process to another GPU is not done (the README says what it would "
                                           "need)\n")
    for prog in (p, q, i):
        prog.close()


def test_a_program_on_both_gpus_is_checkpointed_and_restored_whole(fakecuda, shared2, mgpu_daemon):
    p = Plain(fakecuda, mgpu_daemon, shared2)
    p.holding("a", 16 * MiB, 11)
    p.ok("ctx 1")
    p.holding("b", 48 * MiB, 12)
    assert (driver_used(shared2, 0), driver_used(shared2, 1)) == (16 * MiB, 48 * MiB)
    assert "checkpointed" in mgpu_daemon.cli("pause", str(p.pid), "--swap").stdout
    assert (driver_used(shared2, 0), driver_used(shared2, 1)) == (0, 0)  # both GPUs: the checkpoint is whole
    rows = mgpu_daemon.ps(p.pid)
    assert [(r["gpu"], r["state"], r["swapped_bytes"]) for r in rows] == [(0, "checkpointed", 16 * MiB),
                                                                          (1, "checkpointed", 48 * MiB)]
    assert "running" in mgpu_daemon.cli("resume", str(p.pid)).stdout
    assert (driver_used(shared2, 0), driver_used(shared2, 1)) == (16 * MiB, 48 * MiB)
    p.ok("check a 11")
    p.ok("check b 12")
    p.close()


def test_per_gpu_plans_show_in_ps_and_a_checkpoint_for_one_gpu_frees_both(fakecuda, interposer, shared2,
                                                                          mgpu_daemon):
    a = Plain(fakecuda, mgpu_daemon, shared2)
    a.holding("x", 48 * MiB, 21)
    a.ok("ctx 1")
    a.holding("y", 16 * MiB, 22)
    b = start_interposed(fakecuda, interposer, mgpu_daemon, shared2)
    b.timeout = 30
    b.ok(f"alloc z {64 * MiB}")  # GPU 0 is oversubscribed: its plan checkpoints a; GPU 1's lets a run
    plans = wait_for(lambda: (rows := mgpu_daemon.ps(a.pid)) and
                     [(r["gpu"], r["plan"], r["state"]) for r in rows] == [(0, "swap", "checkpointed"),
                                                                           (1, "run", "checkpointed")] and rows,
                     10, "a's per-GPU plans")
    assert [r["reason"] for r in plans] == [f"slice of pid {b.pid}"] * 2
    assert (driver_used(shared2, 0), driver_used(shared2, 1)) == (64 * MiB, 0)  # its GPU 1 memory left too
    assert [(r["gpu"], r["plan"]) for r in mgpu_daemon.ps(b.pid)] == [(0, "run")]
    b.ok("fill z 23")
    b.ok("check z 23")
    checked = a.later("check y 22")
    b.ok("free z")
    assert checked.get(timeout=20).startswith("ok")  # restored onto both GPUs once b gave the room back
    a.ok("check x 21")
    assert (driver_used(shared2, 0), driver_used(shared2, 1)) == (48 * MiB, 16 * MiB)
    wait_for(lambda: [r["plan"] for r in mgpu_daemon.ps(a.pid)] == ["run", "run"], 5, "a to run on both GPUs")
    for p in (a, b):
        p.close()


def test_a_move_survives_a_daemon_restart(two_gpus, fakecuda, shared2):
    workdir = Path(tempfile.mkdtemp(prefix="gpuwatch-mgpu-restart-"))
    first = two_gpu_daemon(two_gpus, fakecuda, shared2, workdir)
    p = Plain(fakecuda, first, shared2)
    try:
        p.holding("a", 24 * MiB, 31)
        first.cli("move", str(p.pid), "--to", "1")
        first.stop(9)  # SIGKILL: only the state file remembers the move
        state = json.loads((workdir / "stopped.json").read_text())
        assert state["placed"] == [{"pid": p.pid, "start_time": state["placed"][0]["start_time"], "gpus": {"0": 1}}]
        second = two_gpu_daemon(two_gpus, fakecuda, shared2, workdir)
        try:
            wait_for(lambda: [(r["gpu"], r["gpu_uuid"]) for r in second.ps(p.pid)] == [(1, UUIDS[1])], 5,
                     "the new daemon to show it on GPU 1")
            p.holding("b", 8 * MiB, 32)
            # what it held before the new probes (NVML's figure on GPU 1, an estimate) and what they count since
            assert placed(second, p.pid) == [(1, UUIDS[1], 32 * MiB)]
            assert second.row(p.pid, 1)["device_bytes_estimated"] is True
            p.ok("check a 31")
        finally:
            second.stop()
    finally:
        p.close()


# ------------------------------------------------------------------------------------------------ pure


def test_with_move_idle_an_idle_plain_program_moves_to_the_free_gpu_to_make_room(two_gpus, fakecuda, interposer,
                                                                                shared2):
    d = two_gpu_daemon(two_gpus, fakecuda, shared2, move_idle=True,
                       scheduler=SCHEDULER.replace("idle_ms = 10000", "idle_ms = 300"))  # idle at once
    try:
        idle = Plain(fakecuda, d, shared2)
        idle.holding("a", 64 * MiB, 5)  # then it makes no call: idle
        busy = start_interposed(fakecuda, interposer, d, shared2)
        busy.timeout = 30
        busy.ok(f"alloc b {64 * MiB}")  # GPU 0 cannot hold both: its interposer waits while room is made
        busy.ok("fill b 6")
        assert (driver_used(shared2, 0), driver_used(shared2, 1)) == (64 * MiB, 64 * MiB)
        wait_for(lambda: placed(d, idle.pid) == [(1, UUIDS[1], 64 * MiB)], 5, "ps to show the idle one on GPU 1")
        assert d.row(idle.pid, 1)["state"] == "running"  # moved, not checkpointed into host memory
        idle.ok("check a 5")
        busy.ok("check b 6")
        for p in (idle, busy):
            p.close()
    finally:
        d.stop()


def test_a_checkpoint_for_one_gpu_moves_the_whole_plain_process_and_wins_over_a_stop():
    placement, decisions = Placement(), {}
    plain, interposed = Client(1, 8 * MiB, 8 * MiB, interposed=False), Client(2, 4 * MiB, 4 * MiB)
    gpu0, gpu1 = Scheduler(capacity=100 * MiB), Scheduler(capacity=100 * MiB)
    gpu0.decide([plain, interposed], 1.0)
    placement.planned(0, gpu0, [plain, interposed], {1: Decision(Verdict.SWAP, 8 * MiB), 2: Decision(Verdict.STOP)},
                      decisions, 1.0)
    gpu1.decide([Client(1, 24 * MiB, 24 * MiB, interposed=False), interposed], 1.0)
    placement.planned(1, gpu1, [Client(1, 24 * MiB, 24 * MiB, interposed=False), interposed],
                      {1: Decision(Verdict.STOP), 2: Decision(Verdict.SWAP, 4 * MiB)}, decisions, 1.0)
    combined = placement.combine(decisions)
    assert combined[1] == Decision(Verdict.SWAP, 32 * MiB)  # all it holds, on both GPUs
    assert combined[2] == Decision(Verdict.STOP, 4 * MiB)    # interposed: a stop still wins over a swap
    assert placement.plans == {(1, 0): "swap", (2, 0): "stop", (1, 1): "stop", (2, 1): "swap"}
    assert placement.combine({}) == {} and placement.plans == {}


class StubMover:
    def __init__(self, ledger: Ledger) -> None:
        self.moves: list[tuple[int, int]] = []
        self.pauser = type("P", (), {"ledger": ledger})()

    def move(self, pid: int, to: int) -> dict:
        self.moves.append((pid, to))
        return {}


def test_move_idle_moves_an_idle_plain_process_off_an_oversubscribed_gpu_to_one_with_room():
    snap = Snapshot([ProcessGpu(1, "idle", 0, device_bytes=40 * MiB), ProcessGpu(2, "busy", 0, device_bytes=70 * MiB),
                     ProcessGpu(3, "other", 1, device_bytes=20 * MiB)],
                    [Gpu(0, memory_total=100 * MiB), Gpu(1, memory_total=100 * MiB)], TracerHealth("off"))
    settings = SchedulerSettings(reserve_bytes=0, context_bytes=0, move_idle=True)
    idle, busy = Client(1, 40 * MiB, 40 * MiB, launches=5, interposed=False), Client(2, 70 * MiB, 0, launches=5)
    scheduler = Scheduler(capacity=100 * MiB, idle=0.5)
    scheduler.decide([idle, busy], 0.0)
    busy = Client(2, 70 * MiB, 0, launches=9)  # it launches, the plain one does not
    placement, decisions = Placement(), {}
    placement.planned(0, scheduler, [idle, busy], scheduler.decide([idle, busy], 2.0), decisions, 2.0)
    combined = placement.combine(decisions)
    assert combined[1].verdict is Verdict.SWAP  # without move_idle: checkpointed to host memory
    mover = StubMover(Ledger())
    placement.mover = mover  # type: ignore[assignment]
    assert placement.relocate(combined, snap, SchedulerSettings(move_idle=False), 2.0) == combined
    assert mover.moves == []
    moved = placement.relocate(combined, snap, settings, 2.0)
    assert mover.moves == [(1, 1)] and moved[1] == Decision(Verdict.RUN) and moved[2] == combined[2]
    assert placement.relocate(combined, snap, settings, 3.0) == combined  # not again soon: no ping-pong
    assert mover.moves == [(1, 1)]


def test_the_ledger_keeps_placements_and_reads_files_written_before_them(tmp_path):
    path = tmp_path / "stopped.json"
    path.write_text(json.dumps({"version": 2, "stopped": [], "quotas": []}))  # a daemon before `gpuwatch move`
    path.chmod(0o644)
    ledger = Ledger(path)
    assert ledger.recover() == [] and ledger.placement(os.getpid()) == {}
    from gpuwatch.core.procfs import proc_stat
    stat = proc_stat(os.getpid())
    assert stat is not None
    ledger.set_placement(os.getpid(), stat.start_time, {0: 1, 2: 2})
    assert ledger.placement(os.getpid()) == {0: 1}
    ledger.hold(os.getpid(), stat.start_time, HAND, signalled=False)
    ledger.set_moved(os.getpid(), "checkpointed", 64, [0, 1], {0: 16, 1: 48})
    saved = json.loads(path.read_text())
    assert saved["placed"] == [{"pid": os.getpid(), "start_time": stat.start_time, "gpus": {"0": 1}}]
    assert saved["stopped"][0]["gpu_bytes"] == {"0": 16, "1": 48}
    again = Ledger(path)
    again.recover()
    assert again.placement(os.getpid()) == {0: 1}
    assert again.recovered_moved[0]["gpu_bytes"] == {"0": 16, "1": 48}
    again.forget(os.getpid())
    assert again.placement(os.getpid()) == {} and json.loads(path.read_text())["placed"] == []
    ledger.set_placement(os.getpid(), stat.start_time + 1, {0: 1})  # a process of the same pid, gone since
    later = Ledger(path)
    assert later.recover() == [] and later.placement(os.getpid()) == {}


def test_the_resolver_shows_a_moved_process_on_its_new_gpu():
    gpus = [Gpu(0, UUIDS[0]), Gpu(1, UUIDS[1])]
    placements = {10: {0: 1}}
    resolver = DeviceResolver(lambda pid: placements.get(pid, {}))
    assert resolver.resolve(10, 0, gpus) == (1, UUIDS[1])
    assert resolver.resolve(10, 0, gpus, {(10, 0): UUIDS[0]}) == (1, UUIDS[1])  # it asked the driver before
    assert resolver.resolve(11, 0, gpus) == (0, UUIDS[0])
    assert uuid_bytes(UUIDS[1]) == b"fakecuda-dev0001"
    assert uuid_bytes("GPU-1234") is None and uuid_bytes("MIG-" + UUIDS[0][4:]) is None


def test_an_nvml_reading_from_before_a_move_does_not_put_the_process_back_on_its_old_gpu():
    """NVML is sampled: right after a move its last reading still lists the process on the GPU it left, and the
    scheduler of that GPU would plan with it there (the CI saw a moved process checkpointed for that)."""
    from gpuwatch.enforcer.view import ViewSources, build_view
    from gpuwatch.probes.model import ProbeFacts
    gpus = [Gpu(0, UUIDS[0], memory_total=CAPACITY), Gpu(1, UUIDS[1], memory_total=CAPACITY)]
    facts = ProbeFacts([], {}, False, False, TracerHealth("off"), gpus, {(10, 0): 64 * MiB, (10, 1): 64 * MiB})
    view = build_view(ViewSources(facts, resolve=DeviceResolver(lambda pid: {0: 1}).resolve,
                                  placement=lambda pid: {0: 1} if pid == 10 else {}))
    assert [(r.gpu, r.nvml_bytes) for r in view.processes] == [(1, 64 * MiB)]
