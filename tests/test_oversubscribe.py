"""Oversubscription end to end: real eBPF, the real daemon and scheduler, the real interposer, and two
programs whose memory together exceeds the (test-double) GPU. Both complete with their data intact."""
from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import ROOT, Daemon, wait_for
from gpu_fixtures import CAPACITY, scheduling_daemon, start_interposed
from interposer_fixtures import MiB, driver_used



@pytest.fixture(scope="module")
def sdaemon(gpu: tuple[Path, Path]) -> Iterator[Daemon]:
    d = scheduling_daemon(gpu, "gpuwatch-sched-", "quantum_ms = 1000\nidle_ms = 300\nreserve_mib = 0\ncontext_mib = 0\n"
                                                  "tick_ms = 50\n")
    yield d
    d.stop()


start = start_interposed


def states(daemon: Daemon, *pids: int) -> dict[int, str]:
    return {r["pid"]: r["state"] for r in daemon.ps() if r["pid"] in pids}


def test_two_programs_larger_than_the_gpu_both_complete_with_their_data(fakecuda: Path, interposer: Path,
                                                                         sdaemon: Daemon, tmp_path: Path) -> None:
    shared = tmp_path / "fakecuda-state"
    a = start(fakecuda, interposer, sdaemon, shared)
    try:
        a.ok("alloc a1 33554432")
        a.ok("alloc a2 33554432")
        a.ok("fill a1 11")
        a.ok("fill a2 12")
        a.ok("spin busy launch -")  # a keeps the GPU busy from another thread
        b = start(fakecuda, interposer, sdaemon, shared)
        try:
            b.ok("alloc b1 33554432")
            assert driver_used(shared) == CAPACITY  # the device is full now
            # b's first slice (quantum_ms = 1000) ends: when b asks for more, a is the busy one and holds the
            # GPU for a slice before they change places (a timer in the daemon, not a condition to poll)
            time.sleep(1.1)
            # b's second allocation cannot fit: it waits while the daemon makes room by swapping a out
            b.ok("alloc b2 33554432")
            b.ok("fill b1 21")
            b.ok("fill b2 22")
            assert driver_used(shared) <= CAPACITY
            rows = {r["pid"]: r for r in sdaemon.ps()}
            assert rows[a.pid]["swap_out_bytes_total"] >= 32 * MiB
            assert rows[a.pid]["preemptions"] >= 1
            b.ok("check b1 21")
            b.ok("check b2 22")
            b.ok("free b1")
            b.ok("free b2")
        finally:
            b.close()
        # b is gone: a runs again with all of its memory back on the device, every byte as it wrote it
        wait_for(lambda: states(sdaemon, a.pid).get(a.pid) == "running", 10, "a to run again")
        row = next(r for r in sdaemon.ps(a.pid) if r["gpu"] == 0)
        assert row["wait_seconds"] > 0 and row["slice_seconds"] > 0
        a.ok("check a1 11")
        a.ok("check a2 12")
        iterations, errors, _ = map(int, a.ok("spinstop busy"))
        assert iterations > 0 and errors == 0  # no launch ever met an unmapped range
    finally:
        a.close()


def test_everything_fits_no_gating(fakecuda: Path, interposer: Path, sdaemon: Daemon,
                                   tmp_path: Path) -> None:
    shared = tmp_path / "fakecuda-state"
    a, b = start(fakecuda, interposer, sdaemon, shared), start(fakecuda, interposer, sdaemon, shared)
    try:
        a.ok("alloc x 33554432")
        b.ok("alloc y 33554432")
        a.ok("spin s launch -")
        b.ok("spin s launch -")
        wait_for(lambda: a.spinning("s") > 200 and b.spinning("s") > 200, 10, "both to launch")
        rows = {r["pid"]: r for r in sdaemon.ps()}
        for p in (a, b):
            assert rows[p.pid]["state"] == "running"
            assert rows[p.pid]["swap_out_bytes_total"] == 0
            assert p.page["gate_waits"] == 0  # never gated
    finally:
        a.close()
        b.close()


def test_scheduler_can_be_switched_off(tmp_path: Path) -> None:
    from gpuwatch.daemon import config
    cfg = config.parse("[scheduler]\nenabled = false\n")
    assert cfg.scheduler.enabled is False
    with pytest.raises(config.ConfigError, match="scheduler.quantum_ms: must be from 0 to 86400000, not -1"):
        config.parse("[scheduler]\nquantum_ms = -1\n")


def test_allocation_that_finds_no_room_although_the_plan_fits_fails_in_time(fakecuda: Path, interposer: Path,
                                                                              tmp_path: Path) -> None:
    """NVML says the GPU is larger than the device really is: the plan fits, the allocation does not. After
    room_wait_ms it fails with the driver's out-of-memory error instead of waiting forever."""
    out = tmp_path / "nvml"
    subprocess.run(["make", "-s", "-C", str(ROOT / "tests" / "fakenvml"), f"OUT={out}"], check=True)
    (out / "state").write_text(f"gpu 0 GPU-11111111-2222-3333-4444-555555555555 {1 << 30} 0 Fake GPU\n")
    workdir = tmp_path / "d"
    workdir.mkdir()
    workdir.chmod(0o755)
    config = workdir / "gpuwatch.toml"
    config.write_text("[scheduler]\nreserve_mib = 0\ncontext_mib = 0\ntick_ms = 50\nroom_wait_ms = 1000\n")
    os.environ["LD_LIBRARY_PATH"], os.environ["FAKENVML_STATE"] = str(out), str(out / "state")
    try:
        daemon = Daemon(workdir, "--config", str(config), nvml=True)
    finally:
        del os.environ["LD_LIBRARY_PATH"], os.environ["FAKENVML_STATE"]
    try:
        p = start(fakecuda, interposer, daemon, tmp_path / "fakecuda-state")
        try:
            p.ok("alloc a 67108864")
            started = time.monotonic()
            assert p.err("alloc b 67108864") == 2  # the device holds 96 MiB: b never fits
            assert 0.9 <= time.monotonic() - started <= 10
            p.ok("alloc c 16777216")  # the process goes on
        finally:
            p.close()
    finally:
        daemon.stop()
