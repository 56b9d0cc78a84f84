"""Safe sharing under the mixes users make (real eBPF, the real daemon, scheduler and interposer, a test-double
GPU of CAPACITY bytes): a pause by hand holds while the scheduler runs; a process without the interposer is
never stopped to make memory room, and the process that needs the room waits, bounded, then gets the
driver's out-of-memory answer; every process that does not run says why."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from pathlib import Path

import pytest

from conftest import Daemon, Prog, wait_for
from gpu_fixtures import gpu_env, scheduling_daemon, start_interposed
from interposer_fixtures import MiB

TICK_MS, ROOM_WAIT_MS = 50, 1500
SCHEDULER = (f"quantum_ms = 1000\nidle_ms = 300\nreserve_mib = 0\ncontext_mib = 0\ntick_ms = {TICK_MS}\n"
             f"room_wait_ms = {ROOM_WAIT_MS}\n")
pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def sdaemon(gpu: tuple[Path, Path]) -> Iterator[Daemon]:
    d = scheduling_daemon(gpu, "gpuwatch-safe-", SCHEDULER)
    yield d
    d.stop()


interposed = start_interposed


def plain(fakecuda: Path, daemon: Daemon, shared: Path) -> Prog:
    p = Prog([str(fakecuda / "cudaprog")], gpu_env(fakecuda, shared))
    p.ok(f"load {fakecuda / 'libcuda.so.1'}")
    wait_for(lambda: daemon.watching(fakecuda / "libcuda.so.1"), 5, "the daemon to watch the test double")
    p.ok("ctx 0")
    return p


def row(daemon: Daemon, pid: int) -> dict:
    return next(r for r in daemon.ps(pid) if r["gpu"] == 0)


def proc_state(pid: int) -> str:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2]


class Sampling(list):
    """While the block runs, `sample()` every 50 ms on a thread of its own; the values are the list."""

    def __init__(self, sample: Callable[[], Any]) -> None:
        super().__init__()
        self._sample, self._done = sample, threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self._done.is_set():
            self.append(self._sample())
            time.sleep(0.05)

    def __enter__(self) -> Sampling:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()


def test_a_pause_by_hand_holds_while_the_scheduler_runs(fakecuda: Path, interposer: Path, sdaemon: Daemon,
                                                          tmp_path: Path) -> None:
    a = interposed(fakecuda, interposer, sdaemon, tmp_path / "gpu")
    try:
        a.ok("alloc a1 33554432")
        a.ok("fill a1 11")
        assert sdaemon.cli("pause", str(a.pid), "--swap").returncode == 0
        held_since = time.monotonic()
        seen = []
        while time.monotonic() - held_since < 25 * TICK_MS / 1000 + 0.5:  # at least 25 scheduler ticks
            r = row(sdaemon, a.pid)
            seen.append((r["state"], r["reason"], r["swapped_bytes"]))
            time.sleep(TICK_MS / 1000)
        assert set(seen) == {("swapped", "paused by hand", 32 * MiB)}, seen
        assert sdaemon.cli("resume", str(a.pid)).returncode == 0
        wait_for(lambda: row(sdaemon, a.pid)["state"] == "running", 5, "it to run again")
        assert row(sdaemon, a.pid)["reason"] is None
        a.ok("check a1 11")  # every byte as it wrote it
    finally:
        a.close()


def test_a_plain_holder_keeps_running_and_the_newcomer_gets_out_of_memory_in_time(
        fakecuda: Path, interposer: Path, sdaemon: Daemon, tmp_path: Path) -> None:
    shared = tmp_path / "gpu"
    holder = plain(fakecuda, sdaemon, shared)
    b = interposed(fakecuda, interposer, sdaemon, shared)
    try:
        holder.ok("alloc h 67108864")
        holder.ok("fill h 7")
        holder.ok("spin s launch -")
        wait_for(lambda: row(sdaemon, holder.pid)["device_bytes"] == 64 * MiB, 5, "the daemon to count the holder")
        with Sampling(lambda: (proc_state(holder.pid), row(sdaemon, b.pid)["reason"])) as seen:
            started = time.monotonic()
            assert b.err("alloc b1 50331648") == 2  # 64 + 48 MiB > 96 MiB: it cannot be placed
            waited = time.monotonic() - started
        states, reasons = [s for s, _ in seen], [r for _, r in seen]
        assert ROOM_WAIT_MS / 1000 - 0.1 <= waited <= ROOM_WAIT_MS / 1000 + 2.0, waited
        assert "T" not in states and "t" not in states, "the plain holder was stopped"
        assert "waiting for device memory" in reasons, reasons
        assert row(sdaemon, holder.pid)["state"] == "running"
        b.ok("alloc b2 16777216")  # what fits still works: the process goes on
        iterations, errors, _ = map(int, holder.ok("spinstop s"))
        assert iterations > 0 and errors == 0
        holder.ok("check h 7")
    finally:
        b.close()
        holder.close()


def test_a_plain_process_paused_by_hand_says_so_and_stays_stopped(fakecuda: Path, sdaemon: Daemon,
                                                                   tmp_path: Path) -> None:
    p = plain(fakecuda, sdaemon, tmp_path / "gpu")
    try:
        p.ok("alloc x 8388608")
        wait_for(lambda: row(sdaemon, p.pid)["device_bytes"] == 8 * MiB, 5, "the daemon to count it")
        assert sdaemon.cli("pause", str(p.pid)).returncode == 0
        time.sleep(25 * TICK_MS / 1000)
        r = row(sdaemon, p.pid)
        assert (r["state"], r["reason"], proc_state(p.pid)) == ("stopped", "paused by hand", "T")
        assert "paused by hand" in sdaemon.cli("ps").stdout
        assert sdaemon.cli("resume", str(p.pid)).returncode == 0
        p.ok("alloc y 1048576")
        assert row(sdaemon, p.pid)["reason"] is None
    finally:
        p.close()


@pytest.fixture(scope="module")
def tight_host(gpu: tuple[Path, Path]) -> Iterator[Daemon]:
    """The same GPU, with 8 MiB of host memory for swapping: no swap-out of a 64 MiB piece fits."""
    d = scheduling_daemon(gpu, "gpuwatch-host-", SCHEDULER + "host_limit_mib = 8\n")
    yield d
    d.stop()


def test_beyond_the_host_budget_nothing_moves_and_the_newcomer_gets_out_of_memory(
        fakecuda: Path, interposer: Path, tight_host: Daemon, tmp_path: Path) -> None:
    shared = tmp_path / "gpu"
    a = interposed(fakecuda, interposer, tight_host, shared)
    b = interposed(fakecuda, interposer, tight_host, shared)
    try:
        a.ok("alloc a1 67108864")
        a.ok("fill a1 5")
        a.ok("spin s launch -")
        status = tight_host.status()
        assert status["host"]["limit_bytes"] == 8 * MiB and status["host"]["spare_bytes"] <= 8 * MiB
        with Sampling(lambda: row(tight_host, b.pid)["reason"]) as reasons:
            started = time.monotonic()
            assert b.err("alloc b1 50331648") == 2  # a would have to pin 64 MiB: more than the host may give
            waited = time.monotonic() - started
        assert waited <= ROOM_WAIT_MS / 1000 + 2.0, waited
        assert "waiting for host memory" in reasons, reasons
        r = row(tight_host, a.pid)
        assert (r["state"], r["swapped_bytes"], r["swap_pinned_bytes"]) == ("running", 0, 0)
        iterations, errors, _ = map(int, a.ok("spinstop s"))
        assert iterations > 0 and errors == 0
        a.ok("check a1 5")  # nobody killed, nothing lost
        b.ok("alloc b2 16777216")
    finally:
        a.close()
        b.close()
