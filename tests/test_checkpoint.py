"""Moving processes that never ran under gpuwatch, with the driver's checkpoint API (the test double emulates it
across processes): real eBPF, the real daemon and scheduler, a test-double GPU of CAPACITY bytes whose NVML
lists each process's bytes (0 while checkpointed). Pause and resume by hand, oversubscription of plain
programs (the room stop at the allocation that does not fit), refusals and timeouts that leave a process
running and unmovable, restores that wait for room, a daemon killed while it holds a process, and `gpuwatch
resume` with no daemon at all."""
from __future__ import annotations

import os
import queue
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import GPUWATCH, Daemon, wait_for
from gpu_fixtures import CAPACITY, PlainProg, driver_daemon, gpu_env, start_interposed
from interposer_fixtures import MiB, driver_used

SCHEDULER = ("quantum_ms = 1000\nidle_ms = 300\nreserve_mib = 0\ncontext_mib = 0\ntick_ms = 50\n"
             "room_wait_ms = 3000\nlock_timeout_ms = 300\n")
pytestmark = pytest.mark.root


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    """Each test's own test-double GPU: a killed program never gives its bytes back to the emulated device."""
    return tmp_path / "gpu"


def checkpoint_daemon(gpu: tuple[Path, Path], fakecuda: Path, shared: Path, workdir: Path | None = None,
                      driver: bool = True, host_limit_mib: int = 0) -> Daemon:
    """A daemon whose driver is the test double (its checkpoint API reaches the programs on `shared`)."""
    return driver_daemon(gpu, shared, gpu_env(fakecuda, shared),
                         (f'[daemon]\ndriver = "{fakecuda / "libcuda.so.1"}"\n' if driver else "")
                         + f"[scheduler]\n{SCHEDULER}host_limit_mib = {host_limit_mib}\n", workdir)


@pytest.fixture
def cdaemon(gpu: tuple[Path, Path], fakecuda: Path, shared: Path) -> Iterator[Daemon]:
    d = checkpoint_daemon(gpu, fakecuda, shared)
    yield d
    d.stop()
    if os.environ.get("GW_SHOW_LOG"):
        print(d.log.read_text()[-6000:])


class Plain(PlainProg):
    """A program without the interposer on the shared test-double GPU."""

    def __init__(self, fakecuda: Path, daemon: Daemon, shared: Path, **env: str) -> None:
        super().__init__(fakecuda, daemon, {**gpu_env(fakecuda, shared), **env})


def row(daemon: Daemon, pid: int) -> dict:
    return next(r for r in daemon.ps(pid) if r["gpu"] == 0)


def test_status_says_whether_checkpointing_works(gpu, fakecuda, shared, cdaemon):
    assert cdaemon.status()["checkpoint"] == {"available": True, "move_plain": True, "why_not": None}
    plain = checkpoint_daemon(gpu, fakecuda, shared, driver=False)  # the host's libcuda: none on this machine
    try:
        status = plain.status()["checkpoint"]
        assert status["available"] is False and status["why_not"], status
    finally:
        plain.stop()


def test_pause_swap_checkpoints_a_plain_process_and_resume_restores_it(fakecuda, shared, cdaemon):
    p = Plain(fakecuda, cdaemon, shared)
    p.holding("a", 32 * MiB, 7)
    assert driver_used(shared) == 32 * MiB
    out = cdaemon.cli("pause", str(p.pid), "--swap").stdout
    assert "checkpointed" in out
    assert driver_used(shared) == 0  # the device holds nothing of it
    r = wait_for(lambda: (r := row(cdaemon, p.pid))["nvml_bytes"] == 0 and r, 5, "NVML to show 0 bytes")
    assert r["state"] == "checkpointed" and r["reason"] == "paused by hand" and r["swapped_bytes"] == 32 * MiB
    waiting = p.later("check a 7")
    with pytest.raises(queue.Empty):
        waiting.get(timeout=1.0)  # its CUDA calls wait while it is checkpointed
    assert "running" in cdaemon.cli("resume", str(p.pid)).stdout
    assert waiting.get(timeout=5).startswith("ok")  # restored at the same addresses, with the same bytes
    assert driver_used(shared) == 32 * MiB and row(cdaemon, p.pid)["state"] == "running"
    p.ok("free a")
    p.close()


def test_a_pause_without_swap_locks_and_the_process_s_other_threads_run(fakecuda, shared, cdaemon):
    p = Plain(fakecuda, cdaemon, shared)
    p.holding("a", 8 * MiB, 3)
    assert "paused" in cdaemon.cli("pause", str(p.pid)).stdout
    assert row(cdaemon, p.pid)["state"] == "paused" and driver_used(shared) == 8 * MiB
    assert p.ok("pid") == [str(p.pid)]  # a command that makes no CUDA call answers: the process is not stopped
    waiting = p.later("check a 3")
    with pytest.raises(queue.Empty):
        waiting.get(timeout=0.5)
    cdaemon.cli("resume", str(p.pid))
    assert waiting.get(timeout=5).startswith("ok")
    p.close()


def test_a_plain_program_stopped_at_its_allocation_gets_room_from_a_plain_one_checkpointed(fakecuda, shared, cdaemon):
    """The allocation that does not fit waits, stopped, while the daemon checkpoints the other plain program (on
    the H200 checkpoints beside a SIGSTOPped CUDA process succeeded: docs/validation.md); the other comes back
    with its data once there is room again."""
    a, b = Plain(fakecuda, cdaemon, shared), Plain(fakecuda, cdaemon, shared)
    b.timeout = 30
    a.holding("x", 64 * MiB, 11)
    b.ok(f"alloc y {64 * MiB}")
    assert row(cdaemon, a.pid)["state"] == "checkpointed"
    assert driver_used(shared) == 64 * MiB  # b's: a's is in host memory
    b.ok("fill y 12")
    b.ok("check y 12")
    b.ok("free y")
    wait_for(lambda: row(cdaemon, a.pid)["state"] == "running", 20, "a to be restored")
    a.ok("check x 11")
    for p in (a, b):
        p.close()


def test_a_process_stopped_at_its_allocation_is_not_checkpointed(fakecuda, shared, cdaemon):
    """A stopped process cannot answer the driver's lock (on the H200 the lock waited past 70 s): asked by hand,
    the daemon says so at once."""
    a, b = Plain(fakecuda, cdaemon, shared), Plain(fakecuda, cdaemon, shared)
    a.holding("x", 64 * MiB, 13)
    cdaemon.cli("pause", str(a.pid))  # held by hand: nothing makes room for b
    got = b.later(f"alloc y {64 * MiB}")
    wait_for(lambda: [r["reason"] for r in cdaemon.ps(b.pid)] == ["waiting for device memory"], 5,
             "b to wait for room")
    failed = cdaemon.cli("pause", str(b.pid), "--swap", check=False)
    assert failed.returncode != 0 and "is stopped (SIGSTOP) and cannot answer the driver's lock" in failed.stderr, \
        failed.stderr
    assert got.get(timeout=10) == "err 2"  # room_wait_ms (3 s), then the driver's out-of-memory
    cdaemon.cli("resume", str(a.pid))
    a.ok("check x 13")
    for p in (a, b):
        p.close()


def test_a_pause_by_hand_of_a_process_stopped_at_its_allocation_holds_it_stopped(fakecuda, shared, cdaemon):
    a, b = Plain(fakecuda, cdaemon, shared), Plain(fakecuda, cdaemon, shared)
    a.holding("x", 64 * MiB, 13)
    cdaemon.cli("pause", str(a.pid))  # held by hand (locked, not checkpointed): nothing makes room for b
    got = b.later(f"alloc y {64 * MiB}")
    wait_for(lambda: [r["reason"] for r in cdaemon.ps(b.pid)] == ["waiting for device memory"], 5,
             "b to wait for room")
    out = cdaemon.cli("pause", str(b.pid)).stdout  # stopped already: no lock to ask the driver for
    assert "stopped (SIGSTOP" in out, out
    with pytest.raises(queue.Empty):
        got.get(timeout=4.0)  # past room_wait_ms (3 s): the hand holds it
    assert [r["reason"] for r in cdaemon.ps(b.pid)] == ["paused by hand"]
    assert row(cdaemon, a.pid)["unmovable"] is None  # nothing timed out against it
    cdaemon.cli("resume", str(b.pid))
    assert got.get(timeout=10) == "err 2"  # its allocation runs now, and the device is full
    cdaemon.cli("resume", str(a.pid))
    a.ok("check x 13")
    for p in (a, b):
        p.close()


def test_a_plain_and_an_interposed_program_that_exceed_the_gpu_both_complete(fakecuda, interposer, shared, cdaemon):
    a = Plain(fakecuda, cdaemon, shared)
    a.holding("x", 64 * MiB, 21)
    b = start_interposed(fakecuda, interposer, cdaemon, shared)
    b.timeout = 30
    b.ok(f"alloc y {64 * MiB}")  # its interposer waits for room; the daemon checkpoints the plain one
    b.ok("fill y 22")
    b.ok("check y 22")
    checked = a.later("check x 21")
    b.ok("free y")
    assert checked.get(timeout=20).startswith("ok")
    for p in (a, b):
        p.close()


def test_an_allocation_that_cannot_fit_even_alone_fails_at_once(fakecuda, shared, cdaemon):
    p = Plain(fakecuda, cdaemon, shared)
    assert p.err(f"alloc big {CAPACITY + MiB}") == 2  # CUDA_ERROR_OUT_OF_MEMORY, as the driver says
    p.close()


def test_a_process_the_driver_refuses_runs_on_and_is_marked_unmovable(fakecuda, shared, cdaemon):
    refusing = Plain(fakecuda, cdaemon, shared, FAKECUDA_CHECKPOINT_REFUSE="801")
    refusing.holding("a", 8 * MiB, 1)
    failed = cdaemon.cli("pause", str(refusing.pid), "--swap", check=False)
    assert failed.returncode != 0 and "CUDA_ERROR_NOT_SUPPORTED" in failed.stderr, failed.stderr
    r = row(cdaemon, refusing.pid)
    assert r["state"] == "running" and "CUDA_ERROR_NOT_SUPPORTED" in r["unmovable"]
    refusing.ok("check a 1")
    managed = Plain(fakecuda, cdaemon, shared)
    managed.ok(f"managed m {MiB}")
    managed.holding("b", 8 * MiB, 2)
    failed = cdaemon.cli("pause", str(managed.pid), "--swap", check=False)
    assert failed.returncode != 0 and "cuCheckpointProcessCheckpoint" in failed.stderr
    assert row(cdaemon, managed.pid)["state"] == "running" and row(cdaemon, managed.pid)["unmovable"]
    managed.ok("check b 2")  # unlocked again: its calls go on
    again = cdaemon.cli("pause", str(managed.pid), "--swap", check=False)  # not retried with the driver
    assert again.returncode != 0 and "cannot be checkpointed" in again.stderr
    for p in (refusing, managed):
        p.close()


def test_a_process_that_used_legacy_cuda_ipc_is_never_checkpointed(fakecuda, shared, cdaemon):
    p = Plain(fakecuda, cdaemon, shared)
    p.holding("a", 8 * MiB, 4)
    p.ok("ipc a")  # cuIpcGetMemHandle: the probes see it
    failed = cdaemon.cli("pause", str(p.pid), "--swap", check=False)
    assert failed.returncode != 0 and "legacy CUDA IPC" in failed.stderr, failed.stderr
    r = row(cdaemon, p.pid)
    assert r["state"] == "running" and "legacy CUDA IPC" in r["unmovable"]
    assert driver_used(shared) == 8 * MiB
    p.ok("check a 4")
    p.close()


def test_a_checkpoint_the_host_cannot_take_is_not_asked_for(gpu, fakecuda, shared, cdaemon):
    p = Plain(fakecuda, cdaemon, shared)
    p.holding("a", 8 * MiB, 6)
    limited = tempfile.mkdtemp(prefix="gpuwatch-ckpt-host-")
    d = checkpoint_daemon(gpu, fakecuda, shared, Path(limited), host_limit_mib=10)  # 1.5 x 8 MiB does not fit
    try:
        failed = d.cli("pause", str(p.pid), "--swap", check=False)
        assert failed.returncode != 0 and "was not checkpointed" in failed.stderr, failed.stderr
        assert row(d, p.pid)["state"] == "running" and driver_used(shared) == 8 * MiB
        p.ok("check a 6")
    finally:
        d.stop()
        p.close()


def test_a_lock_that_times_out_leaves_the_process_running_and_three_make_it_unmovable(fakecuda, shared, cdaemon):
    p = Plain(fakecuda, cdaemon, shared)
    p.holding("a", 4 * MiB, 5)
    for _ in range(3):
        busy = p.later("busy 1500")  # inside a CUDA call for 1.5 s: the lock (300 ms) times out
        failed = cdaemon.cli("pause", str(p.pid), check=False)
        assert failed.returncode != 0 and "was not locked" in failed.stderr, failed.stderr
        assert busy.get(timeout=5).startswith("ok")
        assert row(cdaemon, p.pid)["state"] == "running"
    assert "did not stop within 300 ms 3 times" in row(cdaemon, p.pid)["unmovable"]
    p.close()


def test_a_resume_without_room_waits_and_the_restore_comes_when_there_is(fakecuda, shared, cdaemon):
    a = Plain(fakecuda, cdaemon, shared, FAKECUDA_RESTORE_STUCK="1")  # a restore without room would be fatal
    a.holding("x", 48 * MiB, 31)
    cdaemon.cli("pause", str(a.pid), "--swap")
    b = Plain(fakecuda, cdaemon, shared, FAKECUDA_CHECKPOINT_REFUSE="801")  # it cannot make room for a
    b.holding("y", 80 * MiB, 32)  # fits only because a is out
    out = cdaemon.cli("resume", str(a.pid)).stdout
    assert "checkpointed" in out and "no room" in out, out
    wait_for(lambda: row(cdaemon, b.pid)["unmovable"], 5, "the scheduler to find b unmovable")
    r = row(cdaemon, a.pid)
    assert r["state"] == "checkpointed" and r["reason"] == "waiting for device memory"
    checked = a.later("check x 31")
    with pytest.raises(queue.Empty):
        checked.get(timeout=1.0)
    b.ok("free y")
    assert checked.get(timeout=10).startswith("ok")  # restored by the scheduler once b gave the room back
    for p in (a, b):
        p.close()


def test_a_daemon_killed_while_a_process_is_checkpointed_leaves_it_to_the_next(gpu, fakecuda, shared):
    workdir = Path(tempfile.mkdtemp(prefix="gpuwatch-ckpt-kill-"))
    first = checkpoint_daemon(gpu, fakecuda, shared, workdir)
    try:
        p = Plain(fakecuda, first, shared)
        p.holding("a", 16 * MiB, 41)
        first.cli("pause", str(p.pid), "--swap")
    finally:
        first.stop(9)  # SIGKILL: nothing restores it
    assert driver_used(shared) == 0
    second = checkpoint_daemon(gpu, fakecuda, shared, workdir)
    try:
        r = row(second, p.pid)
        assert r["state"] == "checkpointed" and r["reason"] == "paused by hand"
        assert "running" in second.cli("resume", str(p.pid)).stdout
        p.ok("check a 41")
    finally:
        second.stop()
        p.close()


def test_a_clean_stop_restores_what_fits(gpu, fakecuda, shared):
    d = checkpoint_daemon(gpu, fakecuda, shared)
    try:
        p = Plain(fakecuda, d, shared)
        p.holding("a", 16 * MiB, 51)
        d.cli("pause", str(p.pid), "--swap")
        assert d.stop() == 0
        assert driver_used(shared) == 16 * MiB
        p.ok("check a 51")
        p.close()
    finally:
        d.stop(9)


def test_resume_with_no_daemon_restores_and_unlocks_by_itself(gpu, fakecuda, shared):
    d = checkpoint_daemon(gpu, fakecuda, shared)
    try:
        p = Plain(fakecuda, d, shared)
        p.holding("a", 16 * MiB, 61)
        d.cli("pause", str(p.pid), "--swap")
    finally:
        d.stop(9)
    lib_dir, state = gpu
    env = {**os.environ, **gpu_env(fakecuda, shared), "FAKENVML_STATE": str(state),
           "FAKENVML_CUDA_STATE": str(shared), "FAKENVML_OTHER_BYTES": "0",
           "LD_LIBRARY_PATH": f"{lib_dir}:{fakecuda}"}
    out = subprocess.run([*GPUWATCH, "--socket", d.socket, "resume", str(p.pid)], capture_output=True, text=True,
                         env=env, timeout=30)
    assert out.returncode == 0 and "restored and unlocked by this command" in out.stdout, out.stderr
    p.ok("check a 61")
    assert driver_used(shared) == 16 * MiB
    p.close()
