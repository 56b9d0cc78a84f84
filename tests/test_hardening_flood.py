"""Denial of service (issue 12, findings 4-6): what an unprivileged local user can throw at the daemon under the
1024 file limit a service gets by default. Idle connections to the control socket and to the metrics port,
trace streams that never read and deeply nested requests: root's requests are still answered, /metrics still
scraped, a libcuda copy loaded meanwhile still attached, nobody else loses events, the log grows by a line or
two, and a daemon thread that fails is started again and counted. Floods run as a system user made for the
tests (setpriv), on loopback, bounded in count and time."""
from __future__ import annotations

import json
import logging
import os
import pwd
import resource
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Daemon, GPUWATCH, Prog, await_daemon, wait_for

from gpuwatch.core.protocol import Client, ControlError

pytestmark = pytest.mark.root

TEST_USER = "gpuwatch-test"
FD_LIMIT = 1024
IDLE_S = 5  # the daemon's idle timeout in these tests (GPUWATCH_IDLE_TIMEOUT_S; 30 s by default)

# Both scripts below connect to a unix socket the same way: non-blocking, retrying while the backlog is full,
# for at most 1 s; None when it was not accepted.
UNIX_CONNECT = r'''
def unix_connect(path):
    s = socket.socket(socket.AF_UNIX)
    s.setblocking(False)
    deadline = time.monotonic() + 1
    while True:
        try:
            s.connect(path)
            return s
        except BlockingIOError:  # the backlog is full: the daemon does not accept
            if time.monotonic() > deadline:
                s.close()
                return None
            time.sleep(0.001)
'''

# A flood of idle connections, as another user: tries COUNT connections (unix PATH or tcp HOST:PORT, whose
# connects are left in flight; a unix one not made within 1 s is counted in "errors"; 20 such in a row, or 30 s,
# end the trying), says "ready", sends nothing; a connection the daemon closes is opened again (at most 200 a
# second) until told "hold". Commands on stdin: "stats" (one JSON line back), "hold", "quit".
FLOOD = r'''
import collections, errno, json, resource, select, socket, sys, threading, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
kind, target, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
socks, poller, lock = {}, select.poll(), threading.Lock()
stats = {"opened": 0, "closed": 0, "reasons": collections.Counter(), "errors": collections.Counter()}
reopen = True
''' + UNIX_CONNECT + r'''
def connect():
    try:
        if kind == "unix":
            s = unix_connect(target)
            if s is None:
                raise BlockingIOError("not accepted within 1 s")
        else:  # in flight until the daemon accepts it: the kernel retries its SYN
            host, port = target.rsplit(":", 1)
            s = socket.socket()
            s.setblocking(False)
            if s.connect_ex((host, int(port))) not in (0, errno.EINPROGRESS):
                raise OSError("connect failed")
    except OSError as exc:
        stats["errors"][type(exc).__name__] += 1
        return False
    with lock:
        socks[s.fileno()] = [s, b""]
        poller.register(s, select.POLLIN)
        stats["opened"] += 1
    return True

def commands():
    global reopen
    for line in sys.stdin:
        word = line.strip()
        if word == "hold":
            reopen = False
        elif word == "stats":
            with lock:
                print(json.dumps({**stats, "open": len(socks)}), flush=True)
        elif word == "quit":
            break
    import os
    os._exit(0)

failed, give_up = 0, time.monotonic() + 30
for _ in range(count):
    failed = 0 if connect() else failed + 1
    if failed == 20 or time.monotonic() > give_up:  # the daemon takes no more
        break
threading.Thread(target=commands, daemon=True).start()
print("ready", flush=True)
budget, refilled, owed = 0.0, time.monotonic(), 0
while True:
    again = 0
    for fd, _ in poller.poll(100):
        with lock:
            entry = socks.get(fd)
        if entry is None:
            continue
        try:
            data = entry[0].recv(65536)
        except BlockingIOError:
            continue
        except OSError:
            data = b""
        if data:
            entry[1] = (entry[1] + data)[:4096]
            continue
        with lock:
            poller.unregister(fd)
            del socks[fd]
            stats["closed"] += 1
            first = entry[1].split(b"\n")[0].decode(errors="replace")
            stats["reasons"][json.loads(first).get("error", first) if first.startswith("{") else first] += 1
        entry[0].close()
        again += 1
    owed += again
    now = time.monotonic()
    budget, refilled = min(200.0, budget + 200 * (now - refilled)), now  # at most 200 a second
    while reopen and owed and budget >= 1:
        connect()
        owed, budget = owed - 1, budget - 1
'''

# Trace streams that never read, as another user: COUNT connections to PATH each ask for a trace (a connection not
# accepted within 1 s counts as "not accepted"; three in a row end the trying); what answers within 1.5 s with
# an error was refused (its line is kept), the rest are streams, never read until stdin says "drain": then
# one of them is read until the daemon tells it how many events it lost.
TRACES = r'''
import collections, json, resource, socket, sys, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
path, count = sys.argv[1], int(sys.argv[2])
socks, refused, failed = [], collections.Counter(), 0
''' + UNIX_CONNECT + r'''
def connect():
    s = unix_connect(path)
    if s is None:
        return None
    s.setblocking(True)
    try:
        s.sendall(b'{"cmd": "trace"}\n')
    except OSError:
        pass
    return s

for _ in range(count):
    s = connect()
    if s is None:
        refused["not accepted"] += 1
        failed += 1
        if failed == 3:  # the daemon takes no more
            break
        continue
    failed = 0
    socks.append(s)
time.sleep(1.5)
served = []
for s in socks:
    try:
        line = s.recv(4096, socket.MSG_DONTWAIT | socket.MSG_PEEK).split(b"\n")[0]  # a stream stays unread
    except BlockingIOError:
        line = b'{"ok": true}'
    except OSError as exc:
        line = type(exc).__name__.encode()
    answer = json.loads(line) if line.startswith(b"{") else {"error": line.decode()}
    if answer.get("ok"):  # a stream (an event of another process may have come already)
        served.append(s)
    else:
        refused[answer["error"]] += 1
print(json.dumps({"served": len(served), "refused": refused}), flush=True)
sys.stdin.readline()
f = served[0].makefile("rb")
served[0].settimeout(30)
lines, lost = 0, None
for line in f:
    lines += 1
    event = json.loads(line).get("event", {})
    if "lost" in event:
        lost = event["lost"]
        break
print(json.dumps({"lines": lines, "lost": lost}), flush=True)
sys.stdin.readline()
'''


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def test_user() -> tuple[int, int]:
    """The unprivileged user the floods run as (made if missing)."""
    try:
        pw = pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", TEST_USER], capture_output=True)
        pw = pwd.getpwnam(TEST_USER)  # another test may have made it at the same moment
    return pw.pw_uid, pw.pw_gid


def as_user(user: tuple[int, int], argv: list[str]) -> list[str]:
    return ["setpriv", f"--reuid={user[0]}", f"--regid={user[1]}", "--clear-groups", *argv]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LimitedDaemon(Daemon):
    """A daemon under a file limit of 1024 (soft and hard), serving metrics on loopback."""

    def __init__(self, workdir: Path, idle_s: float = IDLE_S) -> None:
        self.socket, self.log, self.port = str(workdir / "gpuwatch.sock"), workdir / "daemon.log", free_port()
        env = {**os.environ, "GPUWATCH_IDLE_TIMEOUT_S": str(idle_s)}
        self.proc = subprocess.Popen(
            [*GPUWATCH, "--socket", self.socket, "run", "--no-nvml", "--launches", "off", "--listen",
             f"127.0.0.1:{self.port}"], stdout=self.log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
            env=env, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT)))
        await_daemon(self.proc, self.log, self.answers)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Detaching can take minutes where probes fell back to perf events (one RCU grace period each, and
        other daemons of other tests detaching at the same time): that is not what these tests are about."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            try:
                return self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                return -signal.SIGKILL

    def watches(self, library: Path) -> bool:
        """watching(), where a daemon busy attaching (the tracer's lock) may answer late: not yet."""
        try:
            return self.watching(library)
        except (OSError, ControlError):
            return False

    def scrape(self, timeout: float = 5) -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=timeout).read().decode()

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def cpu_seconds(self) -> float:
        """CPU time of every thread of the daemon so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def busy(self, seconds: float = 2.0) -> float:
        """The daemon's CPU use over `seconds` (1.0: one core all the time)."""
        before = self.cpu_seconds()
        time.sleep(seconds)
        return (self.cpu_seconds() - before) / seconds

    def timed_ps(self) -> float:
        start = time.monotonic()
        rows = self.cli("ps", "--json")
        assert isinstance(json.loads(rows.stdout), list)
        return time.monotonic() - start


@pytest.fixture
def ldaemon() -> Iterator[LimitedDaemon]:
    workdir = Path(tempfile.mkdtemp(prefix="gpuwatch-flood-"))
    workdir.chmod(0o755)  # the test user reaches the socket
    d = LimitedDaemon(workdir)
    yield d
    d.stop()


@pytest.fixture
def slow_idle_daemon() -> Iterator[LimitedDaemon]:
    """Streams that do not read stay open a minute: long enough to fall behind and be told."""
    workdir = Path(tempfile.mkdtemp(prefix="gpuwatch-flood-"))
    workdir.chmod(0o755)
    d = LimitedDaemon(workdir, idle_s=60)
    yield d
    d.stop()


class Attacker:
    def __init__(self, user: tuple[int, int], script: str, *args: str) -> None:
        directory = Path(tempfile.mkdtemp(prefix="gpuwatch-attacker-"))
        directory.chmod(0o755)
        path = directory / "attacker.py"
        path.write_text(script)
        path.chmod(0o644)
        self.proc = subprocess.Popen(as_user(user, [sys.executable, "-I", str(path), *args]), cwd="/",
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)

    def line(self, timeout: float = 60) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, "the attacker did not answer"
        line = self.proc.stdout.readline()
        assert line, f"the attacker exited ({self.proc.poll()})"
        return line

    def tell(self, word: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(word + "\n")
        self.proc.stdin.flush()

    def stats(self) -> dict:
        self.tell("stats")
        return json.loads(self.line(10))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def attackers(test_user) -> Iterator:
    made: list[Attacker] = []

    def start(script: str, *args: str) -> Attacker:
        a = Attacker(test_user, script, *args)
        made.append(a)
        return a

    yield start
    for a in made:
        a.close()


def log_lines(d: LimitedDaemon) -> list[str]:
    return d.log.read_text(errors="replace").splitlines()


def served_while_flooded(d: LimitedDaemon, fakecuda: Path, library_copy: Path, test_user) -> Prog:
    """Root's ps answers promptly, another user's too, /metrics answers, a libcuda copy loaded now is attached,
    and the daemon stays well inside its file limit."""
    assert max(d.timed_ps() for _ in range(3)) < 10
    assert "gpuwatch_events_total" in d.scrape()
    r = subprocess.run(as_user((65534, 65534), [*GPUWATCH, "--socket", d.socket, "status", "--json"]),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    p = Prog([str(fakecuda / "cudaprog")])
    p.ok(f"load {library_copy}")
    wait_for(lambda: d.watches(library_copy), 30, "the daemon to attach to the copy loaded during the flood")
    assert d.fds() < FD_LIMIT - 100
    return p


# ------------------------------------------------------------------------------------------------ finding 4


def test_idle_control_connections_do_not_disable_the_daemon(ldaemon, attackers, test_user, fakecuda, library_copy):
    d = ldaemon
    flood = attackers(FLOOD, "unix", d.socket, "1100")
    assert flood.line(120) == "ready\n"
    p = served_while_flooded(d, fakecuda, library_copy, test_user)
    try:
        assert flood.stats()["opened"] >= 1000
        flood.tell("hold")  # what stays open is idle: closed after the idle timeout, with one line
        wait_for(lambda: flood.stats()["open"] <= 64, 5, "the connections past 64 to be refused")
        stats, uid = flood.stats(), test_user[0]
        assert stats["open"] > 0, stats
        assert any(f"uid {uid} has 64 connections open, the most one user may" in reason
                   for reason in stats["reasons"]), stats  # the rest were refused, each with one line saying why
        wait_for(lambda: flood.stats()["open"] == 0, IDLE_S + 10, "the idle connections to be closed")
        assert any(f"nothing sent for {IDLE_S} s" in reason for reason in flood.stats()["reasons"])
        assert d.busy() < 0.5
        log = log_lines(d)
        assert not [line for line in log if "Traceback" in line], log[-40:]
        assert len([line for line in log if "refused a connection" in line]) <= 2
    finally:
        p.close()


def test_idle_metrics_connections_do_not_disable_the_daemon(ldaemon, attackers, test_user, fakecuda, library_copy):
    d = ldaemon
    flood = attackers(FLOOD, "tcp", f"127.0.0.1:{d.port}", "1000")
    assert flood.line(120) == "ready\n"
    p = served_while_flooded(d, fakecuda, library_copy, test_user)
    try:
        assert flood.stats()["opened"] >= 1000
        flood.tell("hold")
        wait_for(lambda: flood.stats()["open"] <= 64, 5, "the connections past 64 to be closed")
        wait_for(lambda: flood.stats()["open"] == 0, 25, "the idle metrics connections to be closed")
        assert d.busy() < 0.5
        assert "gpuwatch_thread_restarts_total" in d.scrape()
    finally:
        p.close()


def test_the_metrics_listen_on_loopback_by_default():
    from gpuwatch.daemon.config import Config, parse_listen
    assert parse_listen(Config().metrics.listen) == ("127.0.0.1", 9445)
    unit = (Path(__file__).resolve().parent.parent / "daemon" / "gpuwatch.service").read_text()
    limits = [line.split("=", 1)[1] for line in unit.splitlines() if line.startswith("LimitNOFILE=")]
    assert limits and int(limits[0]) >= 65536, unit


# ------------------------------------------------------------------------------------------------ finding 5


def trace_reader(d: Daemon, pid: int, got: list[dict], stop: threading.Event) -> threading.Thread:
    def read() -> None:
        with Client(d.socket) as client:
            for event in client.stream("trace", pid=pid):
                got.append(event)
                if stop.is_set():
                    return

    t = threading.Thread(target=read, daemon=True)
    t.start()
    return t


def test_trace_streams_that_never_read_cost_nobody_else_events(slow_idle_daemon, attackers, test_user, fakecuda,
                                                               library_copy):
    d = slow_idle_daemon
    p = Prog([str(fakecuda / "cudaprog")])
    cli_trace: subprocess.Popen | None = None
    try:
        p.ok(f"load {library_copy}")
        wait_for(lambda: d.watches(library_copy), 30, "attach")
        p.ok("ctx 0")
        rss_before = d.rss_mib()
        traces = attackers(TRACES, d.socket, "1000")
        served = json.loads(traces.line(120))

        # root reads one process's events; a root `gpuwatch trace` of everything is left unread
        got: list[dict] = []
        stop = threading.Event()
        trace_reader(d, p.pid, got, stop)
        cli_trace = subprocess.Popen([*GPUWATCH, "--socket", d.socket, "trace", "--comm", "cudaprog"],
                                     stdout=subprocess.PIPE, text=True)
        wait_for(lambda: d.status()["trace_streams"] == served["served"] + 2, 10, "the reader's streams")
        for phase in (1, 2):
            p.ok("churn 20000 4096")
            wait_for(lambda: len(got) >= phase * 40000, 60, f"the reader to get phase {phase}'s events")
        stop.set()
        assert [e for e in got if "lost" in e] == []
        assert [e["type"] for e in got[:2]] == ["alloc", "free"] and len(got) == 80000, len(got)
        assert all(e["pid"] == p.pid for e in got)
        status = d.status()
        assert status["health"]["events_lost"] == 0
        assert d.rss_mib() - rss_before < 150, (rss_before, d.rss_mib())
        uid = test_user[0]
        assert served["served"] == 16, served  # the others were refused, each in one line
        assert served["refused"].get(f"trace: uid {uid} has 16 trace streams open, the most one user may: close "
                                     "one first") == 64 - 16, served
        assert sum(served["refused"].values()) == 1000 - 16, served

        # an unread stream lost its own events, and is told how many when it reads again
        traces.tell("drain")
        drained = json.loads(traces.line(60))
        assert drained["lost"] and drained["lost"] > 1000, drained
        assert cli_trace.stdout is not None
        lines = [cli_trace.stdout.readline() for _ in range(3000)]
        told = [line for line in lines if "events lost here: this trace fell behind" in line]
        assert told, lines[-3:]
        assert d.status()["trace_events_lost"] > 0
        assert d.busy() < 0.5
    finally:
        if cli_trace is not None:
            cli_trace.kill()
            cli_trace.wait()
        p.close()


# ------------------------------------------------------------------------------------------------ finding 6

NESTED = r'''
import socket, sys
path, connections, each = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
requests = [b"[" * 60000 + b"\n", b'{"cmd": "ps", "x": ' + b"{\"a\":" * 10000 + b"\n"]
answers = set()
for i in range(connections):
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    f = s.makefile("rwb")
    for j in range(each):
        f.write(requests[j % 2])
        f.flush()
        answers.add(f.readline().decode().strip())
    s.close()
print(len(answers))
for a in sorted(answers):
    print(a)
'''


def test_deeply_nested_requests_log_a_line_not_a_traceback_each(ldaemon, test_user, tmp_path):
    d = ldaemon
    before = len(log_lines(d))
    script = Path(tempfile.mkdtemp(prefix="gpuwatch-attacker-"))
    script.chmod(0o755)
    (script / "nested.py").write_text(NESTED)
    r = subprocess.run(as_user(test_user, [sys.executable, "-I", str(script / "nested.py"), d.socket, "20", "100"]),
                       capture_output=True, text=True, timeout=120, cwd="/")
    assert r.returncode == 0, r.stderr
    answers = r.stdout.splitlines()[1:]
    assert answers and all(json.loads(a)["ok"] is False and "nested too deeply" in json.loads(a)["error"]
                           for a in answers), answers
    grown = log_lines(d)[before:]
    assert len(grown) <= 3, grown
    assert d.timed_ps() < 5


# ------------------------------------------------------------------------------------------------ supervision


def test_a_thread_that_raises_is_started_again_and_counted(caplog):
    from gpuwatch.core import threads
    stop = threading.Event()
    runs: list[int] = []

    def loop() -> None:
        runs.append(1)
        if len(runs) <= 2:
            raise OSError(24, "Too many open files")
        stop.wait()

    with caplog.at_level(logging.INFO, logger="gpuwatch.core.threads"):
        t = threading.Thread(target=threads.supervised("test-flaky", loop, stop, backoff=0.05), daemon=True)
        t.start()
        wait_for(lambda: len(runs) == 3, 5, "the loop to run a third time")
        stop.set()
        t.join(5)
    assert not t.is_alive()
    assert threads.restarts()["test-flaky"] == 2
    records = [r for r in caplog.records if "test-flaky" in r.getMessage()]
    assert len(records) == 2 and records[0].exc_info and not records[1].exc_info, records
    assert "Too many open files" in records[1].getMessage()


def test_the_maintenance_thread_survives_running_out_of_file_descriptors(ldaemon, fakecuda, library_copy):
    """What killed the maintenance thread for good: EMFILE at its rescan. Now it is started again, counted, and
    attaches the copy that was loaded while it could not."""
    d = ldaemon
    p = Prog([str(fakecuda / "cudaprog")])
    try:
        pid = d.proc.pid
        # no descriptor at all: under a limit of the lowest free one, a descriptor another thread closes meanwhile
        # could be taken by the rescan, which then would not fail
        subprocess.run(["prlimit", f"--pid={pid}", f"--nofile=3:{FD_LIMIT}"], check=True)
        p.ok(f"load {library_copy}")  # the daemon cannot open its maps now
        wait_for(lambda: "Too many open files: '/proc'" in d.log.read_text(), 45,
                 "the maintenance thread to fail at its rescan (every 30 s)")
        subprocess.run(["prlimit", f"--pid={pid}", f"--nofile={FD_LIMIT}:{FD_LIMIT}"], check=True)
        wait_for(lambda: d.watches(library_copy), 60, "the restarted thread to attach the copy")
        assert d.status()["thread_restarts"]["gpuwatch-maintenance"] >= 1
        assert 'gpuwatch_thread_restarts_total{thread="gpuwatch-maintenance"}' in d.scrape()
    finally:
        p.close()
