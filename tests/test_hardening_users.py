"""Other users (issue 12, security): what one user's process asks for never stops another user's; only a process
that runs the interposer attaches as one, and one that does not answer holds up nobody; the daemon's state file
and its directory are trusted only when nobody else could have written them.

Real eBPF, the real daemon, the test-double driver and GPU (gpu_fixtures). The other user is `gpuwatch-test`,
created here if missing; its programs run from a directory it can read (copies of the test binaries)."""
from __future__ import annotations

import json
import os
import pwd
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import GPUWATCH, Daemon, wait_for
from gpu_fixtures import CAPACITY, scheduling_daemon
from interposer_fixtures import IProg, MiB

pytestmark = pytest.mark.root

USER = "gpuwatch-test"
TICK_MS, ROOM_WAIT_MS = 50, 1500
# request_timeout_ms stays at its default (120 s): a request that moves no memory has a short timeout of its own
SCHEDULER = (f"quantum_ms = 1000\nidle_ms = 300\nreserve_mib = 0\ncontext_mib = 0\ntick_ms = {TICK_MS}\n"
             f"room_wait_ms = {ROOM_WAIT_MS}\n")
SHORT_TIMEOUT_S = 5.0  # enforcer/requests.py: a request that moves no memory


@pytest.fixture(scope="module")
def user() -> list[str]:
    """The unprivileged user (created if missing): the setpriv prefix that runs a command as it."""
    try:
        pwd.getpwnam(USER)
    except KeyError:
        made = subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER],
                              capture_output=True, text=True)
        try:  # another test session may have made it meanwhile
            pwd.getpwnam(USER)
        except KeyError:
            pytest.fail(f"cannot create the user {USER}: {made.stderr.strip()}")
    entry = pwd.getpwnam(USER)
    return ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups"]


@pytest.fixture(scope="module")
def shared(fakecuda: Path, interposer: Path) -> Iterator[Path]:
    """A directory every user reads: the test program, the test-double driver and the interposer."""
    d = Path(tempfile.mkdtemp(prefix="gpuwatch-users-"))
    d.chmod(0o755)
    for source in (fakecuda / "cudaprog", fakecuda / "libcuda.so.1", interposer):
        shutil.copy2(source, d / source.name)
        (d / source.name).chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def udaemon(gpu: tuple[Path, Path]) -> Iterator[Daemon]:
    d = scheduling_daemon(gpu, "gpuwatch-users-", SCHEDULER)
    yield d
    stop(d)


def stop(d: Daemon) -> None:
    """SIGTERM, waiting as long as detaching probes one perf event at a time may take on a busy machine
    (README, Troubleshooting)."""
    if d.proc.poll() is None:
        d.proc.send_signal(signal.SIGTERM)
    try:
        d.proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        d.proc.kill()
        d.proc.wait()


class Programs:
    """Programs started by a test, killed at its end, on a GPU of the test's own: the test-double driver's
    shared state, which every user may write."""

    def __init__(self, shared: Path) -> None:
        self.started: list[IProg | subprocess.Popen] = []
        fd, self.gpu = tempfile.mkstemp(prefix="gpu-", dir=shared)
        os.fchmod(fd, 0o666)
        os.close(fd)

    def cuda(self, d: Daemon, shared: Path, argv: list[str], env: dict[str, str] | None = None) -> IProg:
        """A test program on the shared GPU, with the driver loaded (the daemon watching it) and a context."""
        p = IProg(argv, {"GPUWATCH_REAL_LIBCUDA": str(shared / "libcuda.so.1"), "FAKECUDA_SHARED_STATE": self.gpu,
                         "FAKECUDA_MEM_BYTES": str(CAPACITY), "FAKECUDA_DEVICES": "1", **(env or {})})
        p.timeout = 30
        self.started.append(p)
        p.ok(f"load {shared / 'libcuda.so.1'}")
        wait_for(lambda: d.watching(shared / "libcuda.so.1"), 5, "the daemon to watch the test double")
        p.ok("ctx 0")
        return p

    def fake(self, argv: list[str], d: Daemon, library: Path | None) -> tuple[subprocess.Popen, dict]:
        """FAKE_INTERPOSER as a program: its attach's answer."""
        args = [d.socket] + ([str(library)] if library else [])
        p = subprocess.Popen([*argv, sys.executable, "-c", FAKE_INTERPOSER, *args], stdout=subprocess.PIPE, text=True)
        self.started.append(p)
        assert p.stdout
        assert select.select([p.stdout], [], [], 30)[0], "no answer to the attach in 30 s"
        line = p.stdout.readline()
        assert line, f"the fake interposer exited ({p.wait()})"
        return p, json.loads(line)

    def close(self) -> None:
        for p in self.started:
            if isinstance(p, IProg):
                p.close()
            else:
                p.kill()
                p.wait()
        os.unlink(self.gpu)


@pytest.fixture
def programs(shared: Path) -> Iterator[Programs]:
    made = Programs(shared)
    yield made
    made.close()


# A process that is not the interposer: its own memfd named as the library's, a valid header (its pid, 16
# devices), an allocation of 4096 bytes waiting for room, the attach; then it never answers a request. With a
# second argument it maps that library first (loaded, never called), as a process running it does.
FAKE_INTERPOSER = """
import ctypes, json, mmap, os, socket, struct, sys, time
if len(sys.argv) > 2:
    ctypes.CDLL(sys.argv[2])
fd = os.memfd_create("gpuwatch-interposer", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
os.ftruncate(fd, 65536)
page = mmap.mmap(fd, 65536)
struct.pack_into("<IIiI", page, 0, 0x31535747, 1, os.getpid(), 16)
struct.pack_into("<Q", page, 120, 4096)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
s.sendall(json.dumps({"cmd": "interposer_attach", "version": 1, "shm_fd": fd, "mem_limit": None,
                      "priority": "normal", "swap": True}).encode() + b"\\n")
print(s.makefile("rb").readline().decode().strip(), flush=True)
time.sleep(300)
"""


def proc_state(pid: int) -> str:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2]


def interposed(d: Daemon, pid: int) -> bool:
    return any(r["interposed"] for r in d.ps(pid))


# ------------------------------------------------------------------------- 1: priorities come from root


def test_exec_priority_high_of_another_user_runs_at_normal_and_stops_no_one(udaemon, shared, user, programs):
    """`gpuwatch exec --priority high` from another user: it runs at normal (the library also wrote high into
    its page), so a busy one never gets root's process beside it stopped while memory fits."""
    theirs = programs.cuda(udaemon, shared, [*user, *GPUWATCH, "--socket", udaemon.socket, "exec", "--priority",
                                             "high", "--", str(shared / "cudaprog")],
                           {"GPUWATCH_INTERPOSER": str(shared / "libgpuwatch.so")})
    wait_for(lambda: interposed(udaemon, theirs.pid), 10, "the daemon to see the other user's process attached")
    theirs.ok(f"alloc a {16 * MiB}")
    theirs.ok("spin s launch -")
    root = programs.cuda(udaemon, shared, [str(shared / "cudaprog")])
    root.ok(f"alloc r {8 * MiB}")
    wait_for(lambda: [r["device_bytes"] for r in udaemon.ps(root.pid) if r["gpu"] == 0] == [8 * MiB], 5,
             "the daemon to count root's process")
    states = []
    deadline = time.monotonic() + 60 * TICK_MS / 1000  # 60 ticks: a busy high would stop it within a few
    while time.monotonic() < deadline:
        states.append(proc_state(root.pid))
        time.sleep(0.02)
    assert "T" not in states and "t" not in states, "root's process was stopped for another user's priority"
    row = next(r for r in udaemon.ps(theirs.pid) if r["gpu"] == 0)
    assert (row["interposed"], row["priority"]) == (True, "normal"), row
    assert udaemon.cli("priority", str(theirs.pid)).stdout == \
        f"gpuwatch: pid {theirs.pid} priority normal (gpuwatch exec --priority)\n"
    iterations, errors, _ = map(int, theirs.ok("spinstop s"))
    assert iterations > 0 and errors == 0


# ------------------------------------------------- 2: only the interposer attaches; silence holds up no one


def test_a_program_without_the_interposer_cannot_attach(udaemon, user, programs):
    fake, answer = programs.fake(user, udaemon, library=None)
    assert answer["ok"] is False, answer
    error = answer["error"]
    assert "\n" not in error and error == (
        f"interposer_attach: process {fake.pid} does not run the interposer (libgpuwatch.so is not mapped in it): "
        "start the program with `gpuwatch exec`"), error
    assert not interposed(udaemon, fake.pid)
    assert udaemon.answers()


def test_a_process_that_never_answers_holds_up_no_one(udaemon, shared, user, programs, interposer):
    """Another user's process maps the library, attaches with an allocation waiting for room, and never
    answers. Root's program that finds no room gets its out-of-memory answer on time, and the silent one is
    detached after the short timeout (its requests ran aside, never in the scheduler's tick)."""
    holder = programs.cuda(udaemon, shared, [str(shared / "cudaprog")])
    b = programs.cuda(udaemon, shared, [str(shared / "cudaprog")],
                      {"LD_PRELOAD": str(shared / "libgpuwatch.so"), "GPUWATCH_SOCKET": udaemon.socket})
    wait_for(lambda: interposed(udaemon, b.pid), 10, "root's interposed program to attach")
    holder.ok(f"alloc h {64 * MiB}")
    wait_for(lambda: [r["device_bytes"] for r in udaemon.ps(holder.pid) if r["gpu"] == 0] == [64 * MiB], 5,
             "the daemon to count the holder")
    silent, answer = programs.fake(user, udaemon, library=shared / "libgpuwatch.so")
    assert answer["ok"] is True, answer
    attached_at = time.monotonic()
    wait_for(lambda: interposed(udaemon, silent.pid), 5, "the silent process to be registered")
    started = time.monotonic()
    assert b.err(f"alloc b1 {48 * MiB}") == 2  # 64 + 48 MiB > 96 MiB: it cannot be placed
    waited = time.monotonic() - started
    assert ROOM_WAIT_MS / 1000 - 0.1 <= waited <= ROOM_WAIT_MS / 1000 + 2.0, waited
    wait_for(lambda: not interposed(udaemon, silent.pid), SHORT_TIMEOUT_S + 5, "the silent process to be detached")
    assert time.monotonic() - attached_at <= SHORT_TIMEOUT_S + 5
    assert silent.poll() is None, "nothing was done to the silent process but detaching it"
    b.ok(f"alloc b2 {16 * MiB}")  # what fits still works


# ------------------------------------------------------------------- 3: the state file and its directory


def run_daemon(socket_path: Path) -> subprocess.CompletedProcess:
    """`gpuwatch run` that is expected to refuse to start (killed after 30 s if it does start)."""
    return subprocess.run([*GPUWATCH, "--socket", str(socket_path), "run", "--no-nvml", "--no-metrics",
                           "--launches", "off"], capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("mode, owned_by_user, problem", [
    (0o1777, False, "is writable by others (mode 1777)"),
    (0o775, False, "is writable by others (mode 0775)"),
    (0o755, True, "is owned by uid"),
])
def test_the_daemon_refuses_a_socket_directory_others_can_write(tmp_path, user, mode, owned_by_user, problem):
    workdir = tmp_path / "sock"
    workdir.mkdir()
    workdir.chmod(mode)
    if owned_by_user:
        entry = pwd.getpwnam(USER)
        os.chown(workdir, entry.pw_uid, entry.pw_gid)
    planted = {"version": 2, "stopped": [], "quotas": []}
    (workdir / "stopped.json").write_text(json.dumps(planted))
    started = time.monotonic()
    r = run_daemon(workdir / "gw.sock")
    assert time.monotonic() - started < 20
    assert r.returncode == 1 and r.stdout == "", (r.returncode, r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"gpuwatch: the socket directory {workdir} "), r.stderr
    assert problem in r.stderr and "/run/gpuwatch" in r.stderr, r.stderr
    assert sorted(p.name for p in workdir.iterdir()) == ["stopped.json"], "nothing was created or rewritten there"
    assert json.loads((workdir / "stopped.json").read_text()) == planted


@pytest.mark.parametrize("how", ["owned by the other user", "writable by others", "a symbolic link"])
def test_a_state_file_someone_else_could_write_is_not_restored(tmp_path, fakecuda, user, how):
    """A state file beside the socket with a 1-byte quota, action kill, on root's process: ignored with one
    warning, so root's process allocates and lives."""
    workdir = tmp_path / "d"
    workdir.mkdir()
    workdir.chmod(0o755)
    lib = fakecuda / "libcuda.so.1"
    p = IProg([str(fakecuda / "cudaprog")], {})
    d: Daemon | None = None
    try:
        p.ok(f"load {lib}")
        p.ok("ctx 0")
        from gpuwatch.core.procfs import proc_stat
        stat = proc_stat(p.pid)
        assert stat is not None
        planted = json.dumps({"version": 2, "stopped": [], "quotas": [
            {"pid": p.pid, "start_time": stat.start_time, "bytes": 1, "action": "kill"}]})
        state = workdir / "stopped.json"
        if how == "a symbolic link":
            target = tmp_path / "elsewhere.json"
            target.write_text(planted)
            target.chmod(0o644)
            state.symlink_to(target)
        else:
            state.write_text(planted)
            state.chmod(0o666 if how == "writable by others" else 0o644)
            if how == "owned by the other user":
                entry = pwd.getpwnam(USER)
                os.chown(state, entry.pw_uid, entry.pw_gid)
        d = Daemon(workdir, "--launches", "off")
        wait_for(lambda: d.watching(lib), 5, "the daemon to watch the test double")
        assert json.loads(d.cli("quota", "list", "--json").stdout) == []
        p.ok(f"alloc a {MiB}")
        assert p.proc.poll() is None and proc_state(p.pid) != "Z"
        problem = {"owned by the other user": f"is owned by uid {pwd.getpwnam(USER).pw_uid}, not root",
                   "writable by others": "is writable by group or others (mode 0666)",
                   "a symbolic link": "is a symbolic link"}[how]
        warnings = [line for line in d.log.read_text().splitlines() if str(state) in line]
        assert len(warnings) == 1 and problem in warnings[0] and "ignored" in warnings[0], warnings
        assert not state.is_symlink() and os.stat(state).st_uid == 0 and os.stat(state).st_mode & 0o022 == 0
    finally:
        p.close()
        if d is not None:
            stop(d)


def test_the_state_file_is_replaced_never_written_through(tmp_path):
    """Links planted where the old code wrote its temporary file, and as the state file itself: the daemon's
    writes replace its own file and touch nothing a link points to."""
    from gpuwatch.enforcer.ledger import Ledger
    precious, other = tmp_path / "precious.txt", tmp_path / "other.txt"
    precious.write_text("precious\n")
    other.write_text("other\n")
    workdir = tmp_path / "d"
    workdir.mkdir()
    workdir.chmod(0o755)
    (workdir / "stopped.json.tmp").symlink_to(precious)
    (workdir / "stopped.json").symlink_to(other)
    ledger = Ledger(workdir / "stopped.json")
    assert ledger.recover() == []
    ledger.set_quotas([{"pid": 5, "start_time": 7, "bytes": MiB, "action": "pause"}])
    ledger.save()
    assert precious.read_text() == "precious\n" and other.read_text() == "other\n"
    state = workdir / "stopped.json"
    assert not state.is_symlink() and json.loads(state.read_text())["quotas"][0]["pid"] == 5
    st = os.stat(state)
    assert st.st_uid == 0 and st.st_mode & 0o022 == 0
    assert sorted(p.name for p in workdir.iterdir()) == ["stopped.json", "stopped.json.tmp"], "no temporary left"


def test_a_missing_socket_directory_is_made_for_root_only(tmp_path):
    from gpuwatch.daemon.paths import check_state_directories
    socket_path = tmp_path / "run" / "gpuwatch" / "gw.sock"
    old = os.umask(0)
    try:
        check_state_directories(str(socket_path), socket_path.parent / "stopped.json")
    finally:
        os.umask(old)
    st = os.stat(socket_path.parent)
    assert st.st_uid == 0 and st.st_mode & 0o7777 == 0o755


def test_only_requests_that_move_memory_wait_the_request_timeout():
    """Requests that move no memory wait SHORT_TIMEOUT_S at most, whatever request_timeout_ms says; a swap-out
    and a resume that swaps in wait request_timeout_ms."""
    from gpuwatch.enforcer import requests
    assert requests.SHORT_TIMEOUT_S == SHORT_TIMEOUT_S
    seen: list[tuple[str, float]] = []

    def channel(line_of, op: str, timeout: float) -> dict:
        seen.append((op, timeout))
        return {"ok": True, "state": "running"}

    r = requests.InterposerRequests(channel, lambda: 120.0)
    r.pause(), r.resume(swapped=False), r.set_quota(1), r.bound_queue(True), r.deny_room(), r.drop_host()
    r.swap_out(0), r.resume()
    assert seen == [("pause", 5.0), ("resume", 5.0), ("quota", 5.0), ("bound", 5.0), ("no_room", 5.0),
                    ("drop_host", 5.0), ("swap_out", 120.0), ("resume", 120.0)]
