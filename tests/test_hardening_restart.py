"""Issue 12, findings 9 and 10: what a restarted daemon must not forget.

9. A process holding memory under a quota when the daemon is killed: the next daemon counts what it held (NVML's
   figure less a context, an estimate marked in `ps`; an interposed process's page, exactly), so the quota stops
   it at the right total, not only once it allocated the quota again on top.
10. The systemd unit keeps /run/gpuwatch (the state file of stopped processes and quotas set by hand) across
   the daemon's stops and restarts."""
from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import ROOT, Daemon, Prog, wait_for
from interposer_fixtures import IProg

from gpuwatch.core.procfs import proc_stat, uptime_ticks
from gpuwatch.core.view import Gpu, TracerHealth
from gpuwatch.core.vocabulary import DEFAULT_SOCKET, STATE_FILE_NAME
from gpuwatch.enforcer.records import DeviceEnforcement, Enforcement
from gpuwatch.enforcer.seed import Seeder
from gpuwatch.probes.model import ProbeFacts, ProbeRow

MiB = 1 << 20
CONTEXT = 64 * MiB  # [scheduler] context_mib of these daemons: what NVML counts beyond the allocations
UNIT = ROOT / "daemon" / "gpuwatch.service"


# ------------------------------------------------------------------ finding 10: the unit keeps the state


def service_section() -> dict[str, str]:
    values: dict[str, str] = {}
    section = None
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif section == "Service" and "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            values[key.strip()] = value.strip()
    return values


def test_the_unit_keeps_the_state_file_across_stops_and_restarts():
    service = service_section()
    # systemd removes a RuntimeDirectory at every stop (an automatic restart after a crash included) unless
    # it is preserved: the daemon's state file lives there, beside the default socket
    assert service["RuntimeDirectory"] == "gpuwatch"
    assert service["RuntimeDirectoryPreserve"] == "yes"
    assert Path(DEFAULT_SOCKET).parent == Path("/run") / service["RuntimeDirectory"]
    assert (Path(DEFAULT_SOCKET).parent / STATE_FILE_NAME) == Path("/run/gpuwatch/stopped.json")
    # always: a process the driver holds checkpointed waits for a daemon to restore it (issue 13)
    assert service["Restart"] == "always"


def test_systemd_accepts_the_unit():
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    result = subprocess.run(["systemd-analyze", "verify", str(UNIT)], capture_output=True, text=True, timeout=60)
    problems = [line for line in result.stderr.splitlines() if UNIT.name in line
                and not ("is not executable" in line and not Path("/usr/local/bin/gpuwatch").exists())]
    assert result.returncode == 0 and not problems, result.stderr


# ------------------------------------------------------------------ finding 9: the seeder's decisions (pure)


class RecordingSeeds:
    """probes/seeds.py's part: what is seeded, and the GPUs hinted."""

    def __init__(self) -> None:
        self.seeds: dict[tuple[int, int], tuple[int, bool]] = {}
        self.hints: list[tuple[int, int]] = []

    def set(self, pid: int, ordinal: int, nbytes: int, estimated: bool) -> None:
        if nbytes:
            self.seeds[(pid, ordinal)] = (nbytes, estimated)
        else:
            self.seeds.pop((pid, ordinal), None)

    def hint_device(self, pid: int, ordinal: int) -> None:
        self.hints.append((pid, ordinal))


def facts(counted: dict[tuple[int, int], int], nvml: dict[int, int], seeds: RecordingSeeds) -> ProbeFacts:
    """What the Tracer reads: the probes' bytes per (pid, ordinal) with the seeds added, NVML's per pid on GPU 0."""
    rows = {key: ProbeRow(key[0], key[1], device_bytes=n) for key, n in counted.items()}
    for key, (n, estimated) in seeds.seeds.items():
        row = rows.setdefault(key, ProbeRow(key[0], key[1]))
        row.device_bytes += n
        row.seeded_bytes += n
        row.device_bytes_estimated = estimated
    return ProbeFacts(list(rows.values()), {}, False, False, TracerHealth("off"), [Gpu(0, "GPU-0")],
                      {(pid, 0): n for pid, n in nvml.items()})


def page(pid: int, resident: int, swapped: int = 0) -> Enforcement:
    device = DeviceEnforcement(0, None, swapped_bytes=swapped, swappable_bytes=resident + swapped, unswappable_bytes=0,
                               in_use=True)
    return Enforcement(pid=pid, interposed=True, state="running", devices=(device,))


def test_the_seeder_counts_what_was_held_before_and_lets_it_only_shrink():
    me = os.getpid()  # running before the "probes attached"
    seeds = RecordingSeeds()
    counted = {(me, -1): 4 * MiB}  # allocated since, on no known device: its one GPU's
    nvml = {me: CONTEXT + 100 * MiB}
    s = Seeder(seeds, lambda pid, ordinal, gpus, uuids: (ordinal if ordinal >= 0 else None, None), CONTEXT,
               lambda: facts(counted, nvml, seeds), lambda: {})
    s.start()
    s.close()
    attached = uptime_ticks()
    wait_for(lambda: uptime_ticks() > attached, 1, "a clock tick: a process started from now on started after")
    assert seeds.seeds == {(me, 0): (96 * MiB, True)}  # at the start, from one reading
    assert seeds.hints == [(me, 0)]
    later = subprocess.Popen(["sleep", "30"])
    try:
        nvml[later.pid] = CONTEXT + 50 * MiB  # started after the probes: everything it holds was seen
        counted[(me, 0)] = 10 * MiB  # it allocated 10 MiB more, and NVML shows them
        nvml[me] = CONTEXT + 110 * MiB
        for _ in range(3):
            s.run(facts(counted, nvml, seeds), {})
        assert seeds.seeds == {(me, 0): (96 * MiB, True)} and seeds.hints == [(me, 0)]
        nvml[me] = CONTEXT + 44 * MiB  # it freed 70 MiB of what it held before: the probes cannot tell
        s.run(facts(counted, nvml, seeds), {})
        assert seeds.seeds[(me, 0)] == (96 * MiB, True), "one reading is not enough to lower it"
        s.run(facts(counted, nvml, seeds), {})
        assert seeds.seeds[(me, 0)] == (30 * MiB, True)
        nvml[me] = CONTEXT + 500 * MiB  # never raised again: the probes count what comes after the start
        for _ in range(2):
            s.run(facts(counted, nvml, seeds), {})
        assert seeds.seeds[(me, 0)] == (30 * MiB, True)
        # its interposer's page says exactly what it holds: it replaces the estimate, once two readings agree
        pages = {me: page(me, resident=34 * MiB, swapped=8 * MiB)}
        s.run(facts(counted, nvml, seeds), pages)
        assert seeds.seeds[(me, 0)] == (30 * MiB, True)
        s.run(facts(counted, nvml, seeds), pages)
        assert seeds.seeds[(me, 0)] == (20 * MiB, False)  # 34 MiB resident less the 14 MiB the probes counted
        s.run(facts(counted, nvml, seeds), {})  # the page went: so did what it said
        assert seeds.seeds == {}
    finally:
        later.kill()
        later.wait()


# ------------------------------------------------------------------ finding 9: what processes held before


@pytest.fixture(scope="module")
def nvml(tmp_path_factory) -> tuple[Path, Path]:
    """The test-double NVML (its library folder and its state file): one 80 GiB GPU."""
    out = tmp_path_factory.mktemp("fakenvml")
    subprocess.run(["make", "-s", "-C", str(ROOT / "tests" / "fakenvml"), f"OUT={out}"], check=True)
    state = out / "state"
    state.write_text(f"gpu 0 GPU-66616b65-6375-6461-2d64-657630303030 {80 << 30} 0 Fake H200\n")
    return out, state


def set_nvml(nvml: tuple[Path, Path], procs: dict[int, int]) -> None:
    """What NVML says each process holds on GPU 0 (written atomically: the daemon reads it at any moment)."""
    state = nvml[1]
    gpus = [line for line in state.read_text().splitlines() if line.startswith("gpu ")]
    tmp = state.with_suffix(".tmp")
    tmp.write_text("\n".join(gpus + [f"proc {pid} 0 {used}" for pid, used in procs.items()]) + "\n")
    os.replace(tmp, state)


class Daemons:
    """Daemons one after the other on one socket and state file, with the test-double NVML."""

    def __init__(self, nvml: tuple[Path, Path]) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="gpuwatch-test-"))
        self.nvml = nvml
        self.config = self.workdir / "gpuwatch.toml"
        self.config.write_text(f"[interposer]\nlease_ms = 1000\n[scheduler]\nenabled = false\n"
                               f"context_mib = {CONTEXT // MiB}\n")
        self.all: list[Daemon] = []

    def start(self) -> Daemon:
        lib_dir, state = self.nvml
        os.environ["LD_LIBRARY_PATH"], os.environ["FAKENVML_STATE"] = str(lib_dir), str(state)
        try:
            d = Daemon(self.workdir, "--config", str(self.config), "--launches", "off", nvml=True)
        finally:
            del os.environ["LD_LIBRARY_PATH"], os.environ["FAKENVML_STATE"]
        self.all.append(d)
        return d

    def close(self) -> None:
        for d in self.all:
            kill(d)  # the kernel drops its probes; nothing is stopped once the programs are gone


def kill(d: Daemon) -> int:
    """SIGKILL, as a crash: its exit waits for the kernel to drop its uprobes (slow where many are registered)."""
    if d.proc.poll() is None:
        d.proc.send_signal(signal.SIGKILL)
    return d.proc.wait(timeout=120)


@pytest.fixture
def daemons(nvml, sole_daemon_slot) -> Iterator[Daemons]:
    ds = Daemons(nvml)
    yield ds
    ds.close()
    set_nvml(nvml, {})


def state(pid: int) -> str:
    stat = proc_stat(pid)
    return stat.state if stat else "gone"


def reply(p: Prog, timeout: float) -> str | None:
    assert p.proc.stdout
    if not select.select([p.proc.stdout], [], [], timeout)[0]:
        return None
    return p.proc.stdout.readline().strip()


def held(d: Daemon) -> list[dict]:
    return json.loads(d.cli("quota", "list", "--json").stdout)


def test_a_restarted_daemon_counts_what_a_process_held_under_its_quota(fakecuda, daemons, nvml):
    lib = fakecuda / "libcuda.so.1"
    first = daemons.start()
    p = Prog([str(fakecuda / "cudaprog")])
    try:
        p.ok(f"load {lib}")
        wait_for(lambda: first.watching(lib), 5, "the daemon to watch the test double")
        p.ok("ctx 0")
        first.cli("quota", "set", "--pid", str(p.pid), str(48 * MiB + CONTEXT))  # the context counts too
        set_nvml(nvml, {p.pid: CONTEXT + 32 * MiB})
        p.ok("alloc a 32M")
        assert first.row(p.pid)["device_bytes"] == 32 * MiB
        assert kill(first) == -signal.SIGKILL

        second = daemons.start()
        wait_for(lambda: second.watching(lib), 5, "the new daemon to watch the test double")
        row = second.row(p.pid)  # seeded at its start, before its quotas were restored
        assert (row["device_bytes"], row["device_bytes_estimated"], row["untracked_bytes"]) == (32 * MiB, True,
                                                                                               CONTEXT)
        table = second.cli("ps").stdout.splitlines()
        assert any(line.split()[0] == str(p.pid) and "~32.0MiB" in line.split() for line in table), table
        wait_for(lambda: [g["held"] for g in held(second)] == [{"0": 32 * MiB + CONTEXT}], 5,
                 "the group to count what it held and its context")

        # 32 MiB held before, 8 MiB more fit the 48 MiB quota (beside the context), 16 MiB more do not
        set_nvml(nvml, {p.pid: CONTEXT + 40 * MiB})
        p.ok("alloc b 8M")
        p.proc.stdin.write("alloc c 16M\n")  # type: ignore[union-attr]
        p.proc.stdin.flush()  # type: ignore[union-attr]
        wait_for(lambda: state(p.pid) == "T", 5, "the quota to stop the process before the 16 MiB")
        assert reply(p, 0.3) is None, "the allocation past the quota answered"
        assert second.row(p.pid)["state"] == "stopped"
        set_nvml(nvml, {p.pid: CONTEXT + 56 * MiB})
        second.cli("quota", "set", "--pid", str(p.pid), str(64 * MiB + CONTEXT))
        answer = reply(p, 5)
        assert answer and answer.startswith("ok"), answer
        assert [g["held"] for g in held(second)] == [{"0": 56 * MiB + CONTEXT}]

        # it frees what it held before the restart (the probes cannot match that free): NVML's figure shows it,
        # and the seed shrinks to what NVML leaves
        p.ok("free a")
        set_nvml(nvml, {p.pid: CONTEXT + 24 * MiB})
        wait_for(lambda: second.row(p.pid)["device_bytes"] == 24 * MiB, 10, "the estimate to shrink")
        assert second.row(p.pid)["device_bytes_estimated"] is False
        wait_for(lambda: [g["held"] for g in held(second)] == [{"0": 24 * MiB + CONTEXT}], 5,
                 "the group to hold what NVML leaves, its context included")  # the context is learnt each second
    finally:
        p.close()


def test_an_interposed_process_is_seeded_exactly_from_its_page(fakecuda, interposer, daemons, nvml):
    lib = fakecuda / "libcuda.so.1"
    first = daemons.start()
    p = IProg([str(fakecuda / "cudaprog")], {"LD_PRELOAD": str(interposer), "GPUWATCH_SOCKET": first.socket,
                                             "GPUWATCH_REAL_LIBCUDA": str(lib)})
    try:
        p.ok(f"load {lib}")
        wait_for(lambda: first.watching(lib), 10, "the daemon to watch the driver")
        p.ok("ctx 0")
        wait_for(lambda: any(r["interposed"] for r in first.ps(p.pid)), 10, "the daemon to see the process")
        p.ok("alloc a 24M")
        p.ok("alloc b 3M")
        used = p.page.device(0)["used"]  # what it is charged: rounded up to the VMM granularity
        assert 27 * MiB <= used < 32 * MiB
        set_nvml(nvml, {p.pid: CONTEXT + 40 * MiB})  # an estimate that the page's exact figure replaces
        assert kill(first) == -signal.SIGKILL

        second = daemons.start()

        def seeded() -> dict | None:
            rows = [r for r in second.ps(p.pid) if r["gpu"] == 0 and r["interposed"]]
            return rows[0] if rows and rows[0]["device_bytes"] == used else None

        row = wait_for(seeded, 15, "the new daemon to count what the page says the process holds")
        assert row["device_bytes_estimated"] is False
    finally:
        p.close()
