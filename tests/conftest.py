"""Real eBPF against a test-double libcuda: a daemon, scripted CUDA programs, and the real CLI."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

ROOT = Path(__file__).resolve().parent.parent
FAKECUDA_SRC = ROOT / "tests" / "fakecuda"
GPUWATCH = [sys.executable, "-m", "gpuwatch.client.cli"]

# Fixture modules: their fixtures reach every test module without an import (no test module imports another).
pytest_plugins = ["interposer_fixtures", "gpu_fixtures"]

# A test that uses one of these needs root, eBPF or the built test doubles: it gets the `root` marker, and
# `pytest -m "not root"` runs the rest (pure: parsing, the scheduler, the view, top's data shaping, exec's
# environment, the architecture) as any user in seconds. A test that needs root without one of these says so
# itself with @pytest.mark.root.
ROOT_FIXTURES = frozenset({
    # here
    "fakecuda", "daemon", "sole_daemon_slot", "progs", "library_copy",
    # interposer_fixtures.py
    "interposer", "iprogs", "fake_daemons",
    # test modules' own
    "idaemon", "fakes", "libgpuwatch",  # test_interposed_daemon.py
    "fakenvml", "mdaemon", "prometheus", "mprogs",  # test_metrics.py
    "gpu", "sdaemon",  # test_oversubscribe.py
    "pdaemon", "cgroup_sleeper",  # test_policy.py
    "trace", "cgroup",  # test_quota.py
    "attached",  # test_request_lines.py
    "small_big",  # test_top.py
    "two_gpus", "shared2", "mgpu_daemon",  # test_multi_gpu.py
})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if ROOT_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.root)


@contextlib.contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """This process's environment with `env` on top, for what a child started meanwhile inherits (a daemon, a
    library reading it at load), as it was again afterwards."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture(scope="session")
def fakecuda(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fakecuda")
    subprocess.run(["make", "-s", "-C", str(FAKECUDA_SRC), f"OUT={out}"], check=True)
    return out


def await_daemon(proc: subprocess.Popen, log: Path, answers: Callable[[], bool]) -> None:
    """Until a daemon just started answers; one that never does (in 60 s) is killed, not left behind for later
    tests, and one that exited fails with its log."""
    try:
        wait_for(lambda: proc.poll() is not None or answers(), 60, "daemon to answer")
    except AssertionError:
        proc.kill()
        proc.wait()
        raise AssertionError(f"the daemon did not answer in 60 s: {log.read_text()[-2000:]}") from None
    assert proc.poll() is None, log.read_text()


class Daemon:
    def __init__(self, workdir: Path, *args: str, nvml: bool = False) -> None:
        self.socket = str(workdir / "gpuwatch.sock")
        self.log = workdir / "daemon.log"
        if "--listen" not in args:
            args = (*args, "--no-metrics")
        if not nvml:
            args = ("--no-nvml", *args)
        self.proc = subprocess.Popen([*GPUWATCH, "--socket", self.socket, "run", *args],
                                     stdout=self.log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        await_daemon(self.proc, self.log, self.answers)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([*GPUWATCH, "--socket", self.socket, *args], capture_output=True, text=True, timeout=30)
        if check:
            assert result.returncode == 0, result.stderr
        return result

    def answers(self) -> bool:
        return os.path.exists(self.socket) and self.cli("status", "--json", check=False).returncode == 0

    def status(self) -> dict:
        return json.loads(self.cli("status", "--json").stdout)

    def ps(self, pid: int | None = None) -> list[dict]:
        rows = json.loads(self.cli("ps", "--json").stdout)
        return [r for r in rows if pid is None or r["pid"] == pid]

    def row(self, pid: int, gpu: int = 0) -> dict:
        rows = [r for r in self.ps(pid) if r["gpu"] == gpu]
        assert len(rows) == 1, f"expected one row for pid {pid} gpu {gpu}: {self.ps(pid)}"
        return rows[0]

    def watching(self, library: Path) -> bool:
        return watching(self.socket, library)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)


class SharedDaemon:
    """The daemon that tests share (the `daemon` fixture): started when a test first asks for it, stopped
    for a test that must be the only daemon (`sole_daemon_slot`) and at the end of each module, so that each
    module starts with a fresh one; the next test that asks starts it again. Test order does not matter."""

    def __init__(self) -> None:
        self.current: Daemon | None = None

    def get(self) -> Daemon:
        if self.current is not None and self.current.proc.poll() is not None:
            dead, self.current = self.current, None  # the next test gets a new one; this one says why
            pytest.fail(f"the shared daemon exited ({dead.proc.returncode}) after an earlier test; its log ends:\n"
                        + dead.log.read_text()[-3000:])
        if self.current is None:
            workdir = Path(tempfile.mkdtemp(prefix="gpuwatch-test-"))
            workdir.chmod(0o755)  # other users reach the socket (tests of unprivileged reads)
            self.current = Daemon(workdir, "--launches", "all")
        return self.current

    def stop(self) -> None:
        if self.current is not None:
            d, self.current = self.current, None
            d.stop()


SHARED_DAEMON = SharedDaemon()


@pytest.fixture(scope="module", autouse=True)
def _shared_daemon_per_module() -> Iterator[None]:
    yield
    SHARED_DAEMON.stop()


@pytest.fixture
def daemon(request: pytest.FixtureRequest) -> Daemon:
    """The shared daemon (`--launches all`), running."""
    if "sole_daemon_slot" in request.fixturenames:
        pytest.fail("a test uses either daemon or sole_daemon_slot, not both")
    return SHARED_DAEMON.get()


@pytest.fixture
def sole_daemon_slot() -> None:
    """For a test that must be the only daemon (another would attach to its libraries too, or keep a
    uprobe registered): stops the shared daemon; the next test that uses `daemon` starts it again."""
    SHARED_DAEMON.stop()


class Prog:
    """A scripted CUDA program (C or Python) speaking the fakecuda command protocol."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
                                     env={**os.environ, **(env or {})})
        self.pid = self.proc.pid

    def send(self, line: str) -> str:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline().strip()
        assert reply, f"no reply to {line!r} (exit code {self.proc.poll()})"
        return reply

    def ok(self, line: str) -> list[str]:
        reply = self.send(line)
        assert reply.split()[0] == "ok", f"{line!r} -> {reply!r}"
        return reply.split()[1:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


ProgT = TypeVar("ProgT", bound="Prog")


def watching(socket: str, library: Path) -> bool:
    """Whether the daemon on `socket` has its probes on `library`. Asked in-process (no CLI start-up in the
    measurement): tests time the attach against 1 s."""
    from gpuwatch.core.protocol import Client
    with Client(socket) as client:
        libraries = client.call("status")["health"]["libraries"]
    ino = library.stat().st_ino
    return any(os.path.exists(p) and os.stat(p).st_ino == ino for p in libraries)


def launch(p: ProgT, lib: Path, ctx: int | None, started: list, watched: Callable[[], object] | None = None,
           timeout: float = 5.0) -> ProgT:
    """A program just started: recorded for closing, the driver `lib` loaded, `watched` waited for (the daemon
    watching that library), and device `ctx`'s context made current (None: no context)."""
    started.append(p)
    p.ok(f"load {lib}")
    if watched is not None:
        wait_for(watched, timeout, f"daemon to watch {lib}")
    if ctx is not None:
        p.ok(f"ctx {ctx}")
    return p


@pytest.fixture
def progs(fakecuda: Path, daemon: Daemon) -> Iterator[Callable[..., Prog]]:
    """Starts programs that have loaded the test-double libcuda, once the daemon watches it."""
    started: list[Prog] = []

    def start(kind: str = "c", library: Path | None = None, env: dict[str, str] | None = None,
              ctx: int | None = 0, watch_timeout: float = 5.0) -> Prog:
        lib = library or fakecuda / "libcuda.so.1"
        argv = [str(fakecuda / "cudaprog")] if kind == "c" else [sys.executable, str(FAKECUDA_SRC / "cudaprog.py")]
        return launch(Prog(argv, env), lib, ctx, started, lambda: daemon.watching(lib), watch_timeout)

    yield start
    for p in started:
        p.close()


def uprobe_events() -> str:
    path = Path("/sys/kernel/tracing/uprobe_events")
    return path.read_text() if path.exists() else ""


def first_code_byte(library: Path, symbol: str) -> int:
    """The first instruction byte of a function as a process sees it: 0xcc while a uprobe is registered."""
    code = f"""
import ctypes
lib = ctypes.CDLL({str(library)!r})
addr = ctypes.cast(getattr(lib, {symbol!r}), ctypes.c_void_p).value
print(ctypes.string_at(addr, 1)[0])
"""
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


@pytest.fixture
def library_copy(fakecuda: Path, tmp_path: Path) -> Path:
    """The test double under a new inode in an unusual directory (a container's or compat copy)."""
    target = tmp_path / "opt" / "vendor-driver" / "lib64" / "libcuda.so.1"
    target.parent.mkdir(parents=True)
    shutil.copy2(fakecuda / "libcuda.so.1", target)
    return target
