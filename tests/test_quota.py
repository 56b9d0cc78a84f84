"""Quotas for processes not started under gpuwatch (`gpuwatch quota set`): real uprobes stop a process with
SIGSTOP before the allocation that would cross its group's quota; the daemon continues it once it fits, or
kills it. A stopped test program simply does not answer until it is continued."""
from __future__ import annotations

import itertools
import json
import os
import queue
import select
import signal
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import GPUWATCH, Daemon, Prog, wait_for

from gpuwatch.core.procfs import proc_stat
from gpuwatch.core.procfs import cgroup2_root

MiB = 1 << 20
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def state(pid: int) -> str:
    stat = proc_stat(pid)
    return stat.state if stat else "gone"


def send_nowait(p: Prog, line: str) -> None:
    assert p.proc.stdin
    p.proc.stdin.write(line + "\n")
    p.proc.stdin.flush()


def reply(p: Prog, timeout: float) -> str | None:
    """The program's next line, or None if none comes in `timeout` seconds (it is stopped)."""
    assert p.proc.stdout
    if not select.select([p.proc.stdout], [], [], timeout)[0]:
        return None
    return p.proc.stdout.readline().strip()


def stopped_before(p: Prog, line: str) -> None:
    send_nowait(p, line)
    wait_for(lambda: state(p.pid) == "T", 5, f"pid {p.pid} to stop before {line!r}")
    assert reply(p, 0.3) is None, "the stopped allocation answered"


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1 and result.stdout == "", (result.stdout, result.stderr)
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("gpuwatch: "), result.stderr
    return result.stderr.strip()


class Trace:
    """`gpuwatch trace --json --pid PID` in the background."""

    def __init__(self, d: Daemon, pid: int) -> None:
        self.proc = subprocess.Popen([*GPUWATCH, "--socket", d.socket, "trace", "--json", "--pid", str(pid)],
                                     stdout=subprocess.PIPE, text=True)
        self.events: queue.Queue[dict] = queue.Queue()
        threading.Thread(target=lambda: [self.events.put(json.loads(line)) for line in self.proc.stdout or []],
                         daemon=True).start()

    def wait(self, type_: str, timeout: float = 5.0) -> dict:
        try:
            while True:
                event = self.events.get(timeout=timeout)
                if event["type"] == type_:
                    return event
        except queue.Empty:
            raise AssertionError(f"no {type_} event in {timeout}s") from None

    def connected(self, p: Prog) -> None:
        """Allocate and free until the trace shows it: from then on it sees every event of p."""
        for _ in range(100):
            p.ok("alloc warmup 4096")
            p.ok("free warmup")
            try:
                self.wait("free", 0.1)
                return
            except AssertionError:
                pass
        raise AssertionError("the trace never connected")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def trace(daemon: Daemon) -> Iterator:
    made: list[Trace] = []

    def start(p: Prog) -> Trace:
        t = Trace(daemon, p.pid)
        made.append(t)
        t.connected(p)
        return t

    yield start
    for t in made:
        t.close()


_names = itertools.count()


@pytest.fixture
def cgroup() -> Iterator[tuple[str, Path]]:
    """A cgroup v2 directory for the test: its path as /proc/PID/cgroup shows it, and its directory."""
    root = cgroup2_root()
    if root is None:
        pytest.skip("no cgroup v2 hierarchy mounted")
    name = f"gpuwatch-test-{os.getpid()}-{next(_names)}"
    directory = root / name
    directory.mkdir()
    try:
        yield f"/{name}", directory
    finally:
        for pid in (directory / "cgroup.procs").read_text().split():
            try:
                (root / "cgroup.procs").write_text(pid)
            except OSError:
                pass
        wait_for(lambda: not (directory / "cgroup.procs").read_text().strip(), 5, "the test cgroup to empty")
        directory.rmdir()


def move(p: Prog, directory: Path) -> None:
    (directory / "cgroup.procs").write_text(str(p.pid))


def quota_list(d: Daemon) -> list[dict]:
    return json.loads(d.cli("quota", "list", "--json").stdout)


def quota_set(d: Daemon, *args: str) -> str:
    return d.cli("quota", "set", *args).stdout


# tests that run daemons of their own: the shared one stops first (sole_daemon_slot)


@dataclass
class OwnDaemon:
    workdir: Path
    lib: Path
    first: Daemon
    program: Prog
    later: list[Daemon]

    @property
    def state_file(self) -> Path:
        return self.workdir / "stopped.json"

    def restart(self) -> Daemon:
        """Another daemon on the same socket and state file (the first one must be gone)."""
        d = Daemon(self.workdir, "--launches", "off")
        self.later.append(d)
        return d


@contextmanager
def own_daemon(fakecuda: Path) -> Iterator[OwnDaemon]:
    """A daemon of the test's own, in a fresh directory, watching a test program that has a context."""
    workdir = Path(tempfile.mkdtemp(prefix="gpuwatch-test-"))
    lib = fakecuda / "libcuda.so.1"
    first = Daemon(workdir, "--launches", "off")
    own = OwnDaemon(workdir, lib, first, Prog([str(fakecuda / "cudaprog")]), [])
    try:
        own.program.ok(f"load {lib}")
        wait_for(lambda: first.watching(lib), 5, "the daemon to watch the test double")
        own.program.ok("ctx 0")
        yield own
    finally:
        own.program.close()
        first.stop(signal.SIGKILL)
        for d in own.later:
            d.stop()


def test_restarted_daemon_continues_what_a_killed_one_stopped(fakecuda, sole_daemon_slot):
    with own_daemon(fakecuda) as own:
        p, first = own.program, own.first
        quota_set(first, "--pid", str(p.pid), "16MiB")
        stopped_before(p, "alloc a 32M")
        wait_for(lambda: [e["pid"] for e in json.loads(own.state_file.read_text())["stopped"]] == [p.pid], 5,
                 "the state file to name the stopped process")
        assert first.stop(signal.SIGKILL) == -signal.SIGKILL
        assert reply(p, 0.5) is None and state(p.pid) == "T", "nothing continues it while no daemon runs"
        own.restart()
        answer = reply(p, 10)
        assert answer and answer.startswith("ok"), answer
        assert json.loads(own.state_file.read_text())["stopped"] == []


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_a_quota_set_by_hand_survives_a_daemon_restart(fakecuda, cgroup, how, sole_daemon_slot):
    with own_daemon(fakecuda) as own:
        p, first = own.program, own.first
        quota_set(first, "--pid", str(p.pid), "16MiB")
        quota_set(first, "--cgroup", cgroup[0], "--action", "kill", "100MiB")
        p.ok("alloc a 8M")
        start = proc_stat(p.pid).start_time
        assert json.loads(own.state_file.read_text())["quotas"] == [
            {"pid": p.pid, "start_time": start, "bytes": 16 * MiB, "action": "pause"},
            {"cgroup": cgroup[0], "bytes": 100 * MiB, "action": "kill"}]
        assert first.stop(how) == (0 if how == signal.SIGTERM else -signal.SIGKILL)
        second = own.restart()
        wait_for(lambda: second.watching(own.lib), 5, "the new daemon to watch the test double")
        groups = json.loads(second.cli("quota", "list", "--json").stdout)
        assert sorted((g["pid"] or 0, g["cgroup"], g["bytes"], g["action"]) for g in groups) == [
            (0, cgroup[0], 100 * MiB, "kill"), (p.pid, None, 16 * MiB, "pause")]
        # the new daemon's probes count from their start: the 8 MiB allocated before are not in the total
        p.ok("alloc b 16M")
        stopped_before(p, "alloc c 1M")
        quota_set(second, "--pid", str(p.pid), "0")
        answer = reply(p, 5)
        assert answer and answer.startswith("ok"), answer
        quota_set(second, "--cgroup", cgroup[0], "0")
        assert json.loads(own.state_file.read_text())["quotas"] == []


def test_daemon_stop_continues_what_it_stopped(fakecuda, sole_daemon_slot):
    with own_daemon(fakecuda) as own:
        p = own.program
        quota_set(own.first, "--pid", str(p.pid), "1MiB")
        stopped_before(p, "alloc a 2M")
        assert own.first.stop() == 0
        answer = reply(p, 10)
        assert answer and answer.startswith("ok"), answer


# the shared daemon


def test_process_stopped_before_the_allocation_past_its_quota_and_continued_when_raised(daemon, progs, trace):
    p = progs()
    t = trace(p)
    assert quota_set(daemon, "--pid", str(p.pid), "64MiB") == \
        f"gpuwatch: pid {p.pid}: quota 64.0MiB per GPU (pause at the limit)\n"
    p.ok("alloc a 40M")
    stopped_before(p, "alloc b 40M")
    event = t.wait("quota_stop")
    assert (event["pid"], event["size"], event["gpu"], event["kind"]) == (p.pid, 40 * MiB, 0, "device")
    wait_for(lambda: daemon.row(p.pid)["state"] == "stopped", 5, "ps to show the process stopped")
    row = daemon.row(p.pid)
    assert (row["device_bytes"], row["quota_bytes"], row["quota_pauses"], row["interposed"]) == \
        (40 * MiB, 64 * MiB, 1, False)
    assert reply(p, 0.5) is None
    quota_set(daemon, "--pid", str(p.pid), "128MiB")
    answer = reply(p, 5)
    assert answer and answer.startswith("ok"), answer
    row = daemon.row(p.pid)
    assert (row["device_bytes"], row["state"], row["quota_bytes"], row["quota_pauses"]) == \
        (80 * MiB, "running", 128 * MiB, 1)
    p.ok("alloc c 40M")  # 120 MiB: within the new quota
    assert daemon.row(p.pid)["device_bytes"] == 120 * MiB


def test_every_allocation_path_is_checked(daemon, progs):
    p = progs()
    quota_set(daemon, "--pid", str(p.pid), "8MiB")
    p.ok("managed m 64M")  # managed and pinned host memory are not device memory
    p.ok("hostalloc h 64M")
    for line in ("alloc a 16M", "pitch b 4096 4096 4", "async c 16M", "pool d 16M", "create e 16M 0"):
        stopped_before(p, line)
        quota_set(daemon, "--pid", str(p.pid), "1G")
        answer = reply(p, 5)
        assert answer and answer.startswith("ok"), (line, answer)
        quota_set(daemon, "--pid", str(p.pid), "8MiB")
    row = daemon.row(p.pid)
    assert (row["device_bytes"], row["quota_pauses"]) == (4 * 16 * MiB + 4096 * 4096, 5)


def test_quota_below_current_use_stops_the_next_allocation_and_removing_it_continues(daemon, progs):
    p = progs()
    p.ok("alloc a 48M")
    quota_set(daemon, "--pid", str(p.pid), "32MiB")
    stopped_before(p, "alloc b 1M")
    assert daemon.row(p.pid)["device_bytes"] == 48 * MiB
    assert quota_set(daemon, "--pid", str(p.pid), "0") == f"gpuwatch: pid {p.pid}: no quota\n"
    answer = reply(p, 5)
    assert answer and answer.startswith("ok"), answer
    row = daemon.row(p.pid)
    assert (row["device_bytes"], row["state"], row["quota_bytes"]) == (49 * MiB, "running", None)
    p.ok("alloc c 100M")


def test_kill_action(daemon, progs):
    p = progs()
    quota_set(daemon, "--pid", str(p.pid), "--action", "kill", "32MiB")
    p.ok("alloc a 16M")
    send_nowait(p, "alloc b 32M")
    assert p.proc.wait(timeout=10) == -signal.SIGKILL
    wait_for(lambda: not daemon.ps(p.pid), 5, "the killed process's rows to go")
    wait_for(lambda: not any(g["pid"] == p.pid for g in quota_list(daemon)), 5, "its quota to go with it")


def test_cgroup_group_shares_its_quota(daemon, progs, cgroup):
    path, directory = cgroup
    a, b = progs(), progs()
    a.ok("alloc before 10M")  # allocated before the rule: it counts
    move(a, directory)
    assert quota_set(daemon, "--cgroup", path, "100MiB") == \
        f"gpuwatch: cgroup {path}: quota 100.0MiB per GPU (pause at the limit)\n"
    move(b, directory)  # joins within the rescan period
    members = lambda: [g["members"] for g in quota_list(daemon) if g["cgroup"] == path][0]  # noqa: E731
    wait_for(lambda: members() == sorted([a.pid, b.pid]), 5, "b to join the cgroup's group")
    a.ok("alloc x 60M")
    b.ok("alloc y 30M")
    stopped_before(b, "alloc z 20M")  # 10 + 60 + 30 + 20 > 100
    assert state(a.pid) != "T"
    wait_for(lambda: daemon.row(b.pid)["state"] == "stopped", 5, "ps to show b stopped")
    assert (daemon.row(b.pid)["device_bytes"], daemon.row(a.pid)["state"]) == (30 * MiB, "running")
    assert daemon.row(a.pid)["quota_bytes"] == daemon.row(b.pid)["quota_bytes"] == 100 * MiB
    a.ok("free x")
    answer = reply(b, 5)
    assert answer and answer.startswith("ok"), answer
    assert daemon.row(b.pid)["device_bytes"] == 50 * MiB
    groups = [g for g in quota_list(daemon) if g["cgroup"] == path]
    assert [(g["bytes"], g["held"]) for g in groups] == [(100 * MiB, {"0": 60 * MiB})]
    assert quota_set(daemon, "--cgroup", path, "0") == f"gpuwatch: cgroup {path}: no quota\n"
    assert not any(g["cgroup"] == path for g in quota_list(daemon))


def test_a_member_that_exits_makes_room(daemon, progs, cgroup):
    path, directory = cgroup
    a, b = progs(), progs()
    move(a, directory)
    move(b, directory)
    quota_set(daemon, "--cgroup", path, "64MiB")
    a.ok("alloc x 48M")
    stopped_before(b, "alloc y 32M")
    a.close()
    answer = reply(b, 5)
    assert answer and answer.startswith("ok"), answer
    quota_set(daemon, "--cgroup", path, "0")


def test_a_process_forked_in_the_cgroup_is_held_from_its_first_allocation(daemon, progs, fakecuda, cgroup, tmp_path):
    path, directory = cgroup
    progs()  # the daemon watches the test double from now on
    go = tmp_path / "go"
    quota_set(daemon, "--cgroup", path, "8MiB")
    # a shell joins the cgroup, waits, then forks the program (not exec: `|| exit` keeps the shell)
    shell = Prog(["sh", "-c", f"echo $$ > {directory}/cgroup.procs; while [ ! -e {go} ]; do sleep 0.02; done; "
                              f"{fakecuda / 'cudaprog'} || exit 1"])
    child: int | None = None
    try:
        members = lambda: [g["members"] for g in quota_list(daemon) if g["cgroup"] == path][0]  # noqa: E731
        wait_for(lambda: shell.pid in members(), 5, "the shell to join the cgroup's group")
        go.touch()
        child = int(shell.ok("pid")[0])
        assert child != shell.pid
        shell.ok(f"load {fakecuda / 'libcuda.so.1'}")
        shell.ok("ctx 0")
        send_nowait(shell, "alloc a 16M")  # at once: before the daemon could notice the child
        wait_for(lambda: state(child) == "T", 5, "the forked child to stop")
        quota_set(daemon, "--cgroup", path, "0")
        answer = reply(shell, 5)
        assert answer and answer.startswith("ok"), answer
    finally:
        if child is not None and proc_stat(child) is not None:
            os.kill(child, signal.SIGKILL)
        shell.close()


def test_quota_set_needs_root(daemon, progs):
    p = progs()
    r = subprocess.run([*NOBODY, *GPUWATCH, "--socket", daemon.socket, "quota", "set", "--pid", str(p.pid), "64MiB"],
                       capture_output=True, text=True, timeout=30)
    assert one_line_error(r) == "gpuwatch: quota_set needs root; uid 65534 may only read"
    r = subprocess.run([*NOBODY, *GPUWATCH, "--socket", daemon.socket, "quota", "list"], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stderr


def test_bad_pid_and_cgroup(daemon):
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert one_line_error(daemon.cli("quota", "set", "--pid", str(gone.pid), "1G", check=False)) == \
        f"gpuwatch: no process with pid {gone.pid}"
    error = one_line_error(daemon.cli("quota", "set", "--cgroup", "/gpuwatch-no-such-cgroup", "1G", check=False))
    assert error.startswith("gpuwatch: no cgroup /gpuwatch-no-such-cgroup")
    error = one_line_error(daemon.cli("quota", "set", "--cgroup", "relative/path", "1G", check=False))
    assert "as /proc/PID/cgroup shows it" in error
    r = daemon.cli("quota", "set", "--pid", "1", "--cgroup", "/", "1G", check=False)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    r = daemon.cli("quota", "set", "--pid", "1", "lots", check=False)
    assert r.returncode == 2 and "is not a size" in r.stderr


def test_interposed_process_gets_its_quota_through_its_interposer(daemon, iprogs, fakecuda):
    p = iprogs(env={"GPUWATCH_SOCKET": daemon.socket})
    wait_for(lambda: daemon.watching(fakecuda / "libcuda.so.1"), 10, "the daemon to watch the driver")
    wait_for(lambda: any(r["interposed"] for r in daemon.ps(p.pid)), 10, "the interposer to attach")
    assert quota_set(daemon, "--pid", str(p.pid), "64MiB") == \
        f"gpuwatch: pid {p.pid}: quota 64.0MiB per GPU (through its interposer)\n"
    p.ok("alloc a 40M")
    assert p.err("alloc b 40M") == 2  # CUDA_ERROR_OUT_OF_MEMORY, not a stop
    assert state(p.pid) != "T"
    assert [r["quota_bytes"] for r in daemon.ps(p.pid) if r["gpu"] == 0] == [64 * MiB]
