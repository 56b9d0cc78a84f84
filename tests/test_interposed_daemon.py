"""The daemon's side of the interposer contract (docs/interposer.md) against a fake interposer written here
from the contract: attach and its checks, the shared page in `ps`, metrics and top, leases, pause, swap-out
and resume requests, and SIGSTOP/SIGCONT for processes not under the interposer."""
from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import GPUWATCH, ROOT, Daemon, Prog, wait_for
from interposer_fixtures import MAGIC, PAGE_SIZE, FakeInterposer

MiB, GiB = 1 << 20, 1 << 30
LEASE_MS, REQUEST_TIMEOUT_MS = 1000, 1500
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.fixture(scope="module")
def idaemon() -> Iterator[Daemon]:
    """Launch probes off (the page's exact counts win), short leases and request timeouts, metrics on."""
    workdir = Path(tempfile.mkdtemp(prefix="gpuwatch-test-"))
    workdir.chmod(0o755)  # the unprivileged CLI reaches the socket
    config = workdir / "gpuwatch.toml"
    config.write_text(f"[interposer]\nlease_ms = {LEASE_MS}\nrequest_timeout_ms = {REQUEST_TIMEOUT_MS}\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = Daemon(workdir, "--launches", "off", "--config", str(config), "--listen", f"127.0.0.1:{port}")
    d.metrics_url = f"http://127.0.0.1:{port}/metrics"  # type: ignore[attr-defined]
    yield d
    d.stop()


@pytest.fixture
def fakes(idaemon: Daemon) -> Iterator[Callable[..., FakeInterposer]]:
    made: list[FakeInterposer] = []

    def make(**kw: Any) -> FakeInterposer:
        f = FakeInterposer(idaemon.socket, **kw)
        made.append(f)
        return f

    yield make
    for f in made:
        f.close()
    wait_for(lambda: not idaemon.ps(os.getpid()), 5, "the fake's rows to go")


def attached(fakes: Callable[..., FakeInterposer], **kw: Any) -> FakeInterposer:
    f = fakes(**{k: v for k, v in kw.items() if k != "mem_limit"})
    reply = f.attach(mem_limit=kw.get("mem_limit"))
    assert reply == {"ok": True, "result": {"lease_ms": LEASE_MS, "room": True}}
    return f


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1 and result.stdout == "", (result.stdout, result.stderr)
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("gpuwatch: "), result.stderr
    return result.stderr.strip()


def test_attached_process_shows_its_page_in_ps(idaemon, fakes):
    f = attached(fakes, priority=2, mem_limit=GiB)
    f.device(0, quota=GiB, used=300 * MiB, swappable=256 * MiB, unswappable=44 * MiB)
    f.slot(0, 7, graph_launches=2)
    f.slot(959, 5)
    f.u32(112, 3)  # threads waiting at the gate
    row = idaemon.row(os.getpid())  # no libcuda here: the row comes from the page alone
    assert (row["interposed"], row["quota_bytes"], row["state"], row["priority"]) == (True, GiB, "running", "high")
    assert (row["swappable_bytes"], row["unswappable_bytes"], row["swapped_bytes"]) == (256 * MiB, 44 * MiB, 0)
    assert row["waiting_threads"] == 3
    assert (row["launches"], row["graph_launches"], row["launches_estimated"]) == (12, 2, False)
    f.set_state("swapping_out")
    assert idaemon.row(os.getpid())["state"] == "swapping_out"
    human = idaemon.cli("ps").stdout.splitlines()
    assert human[0].split()[:6] == ["PID", "COMM", "GPU", "STATE", "DEVICE", "QUOTA"]
    mine = next(line.split() for line in human if line.split()[0] == str(os.getpid()))
    assert mine[3] == "swapping_out" and mine[5] == "1.0GiB"


def test_quota_from_the_attach_until_the_page_has_devices(idaemon, fakes):
    attached(fakes, mem_limit=3 * GiB)
    rows = idaemon.ps(os.getpid())
    assert [(r["gpu"], r["quota_bytes"], r["interposed"]) for r in rows] == [(None, 3 * GiB, True)]
    assert idaemon.status()["interposed"] == 1
    assert "interposed: 1" in idaemon.cli("status").stdout


def test_connection_closed_unregisters_the_process(idaemon, fakes):
    f = attached(fakes)
    assert idaemon.ps(os.getpid())
    f.disconnect()
    wait_for(lambda: not idaemon.ps(os.getpid()), 5, "the process to be unregistered")


def test_lease_is_renewed_in_the_page(idaemon, fakes):
    f = attached(fakes)
    first = f.lease_deadline_ns
    assert 0 < first - time.monotonic_ns() <= LEASE_MS * 1_000_000
    wait_for(lambda: f.lease_deadline_ns > first, 2 * LEASE_MS / 1000, "a renewal")
    assert f.lease_deadline_ns - time.monotonic_ns() > LEASE_MS * 1_000_000 * 0.5


def test_a_page_that_cannot_be_sealed_is_read_and_written_without_mapping(idaemon, fakes):
    f = attached(fakes, sealable=False, mem_limit=GiB)
    f.set_state("paused")
    assert idaemon.row(os.getpid(), gpu=None)["state"] == "paused"
    first = f.lease_deadline_ns
    wait_for(lambda: f.lease_deadline_ns > first, 2 * LEASE_MS / 1000, "a renewal")


def test_pause_swap_and_resume_are_sent_and_answered(idaemon, fakes):
    f = attached(fakes, mem_limit=GiB)
    pid = str(os.getpid())
    assert idaemon.cli("pause", pid).stdout == f"gpuwatch: pid {pid} paused\n"
    r = idaemon.cli("pause", pid, "--swap", "256MiB")
    assert r.stdout == f"gpuwatch: pid {pid} swapped: 256.0MiB moved to host memory\n"
    row = idaemon.row(os.getpid())
    assert (row["state"], row["swapped_bytes"], row["swap_out_bytes_total"]) == ("swapped", 256 * MiB, 256 * MiB)
    assert idaemon.cli("pause", pid, "--swap").stdout == f"gpuwatch: pid {pid} swapped: 512.0MiB moved to host memory\n"
    assert idaemon.cli("resume", pid).stdout == f"gpuwatch: pid {pid} running\n"
    assert [(q["op"], q.get("bytes")) for q in f.requests] == [("pause", None), ("swap_out", 256 * MiB),
                                                                ("swap_out", 0), ("resume", None)]
    assert [q["id"] for q in f.requests] == sorted({q["id"] for q in f.requests})


def test_an_interposer_that_does_not_answer_times_out(idaemon, fakes):
    attached(fakes, answer=False)
    start = time.monotonic()
    error = one_line_error(idaemon.cli("pause", str(os.getpid()), check=False))
    assert f"did not answer pause within {REQUEST_TIMEOUT_MS / 1000:g} s" in error
    assert time.monotonic() - start < REQUEST_TIMEOUT_MS / 1000 + 5
    assert idaemon.answers()


def test_pause_needs_root(idaemon, fakes):
    attached(fakes)
    for args in (["pause", str(os.getpid())], ["resume", str(os.getpid())], ["pause", "1", "--swap"]):
        r = subprocess.run([*NOBODY, *GPUWATCH, "--socket", idaemon.socket, *args], capture_output=True, text=True,
                           timeout=30)
        assert one_line_error(r) == f"gpuwatch: {args[0]} needs root; uid 65534 may only read"


def _raw_attach(socket_path: str, request: dict[str, Any] | bytes) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(socket_path)
        s.sendall(request if isinstance(request, bytes) else json.dumps(request).encode() + b"\n")
        return json.loads(s.makefile("rb").readline())


@pytest.mark.parametrize("make, fields, error", [
    (dict(pid=1), {}, "the page says pid 1, but process"),
    (dict(magic=0xDEADBEEF), {}, "bad magic 0xdeadbeef"),
    (dict(max_devices=0), {}, "max_devices 0 is out of range"),
    (dict(max_devices=10**6), {}, "max_devices 1000000 is out of range"),
    (dict(name="something-else"), {}, "is not a memfd named gpuwatch-interposer"),
    (dict(size=4096), {}, "the page is 4096 bytes"),
    ({}, {"shm_fd": 999_999}, "has no file descriptor 999999"),
    ({}, {"shm_fd": -1}, "shm_fd must be"),
    ({}, {"shm_fd": "3"}, "shm_fd must be"),
    ({}, {"version": 2}, "protocol version 2 is not supported"),
    ({}, {"priority": "urgent"}, "priority must be one of"),
    ({}, {"mem_limit": -5}, "mem_limit must be"),
])
def test_bad_attach_is_refused_and_the_daemon_keeps_working(idaemon, fakes, make, fields, error):
    f = fakes(**make)
    reply = f.attach(**fields)
    assert reply["ok"] is False and error in reply["error"], reply
    assert reply["error"].startswith("interposer_attach: ")
    assert not any(r["interposed"] for r in idaemon.ps(os.getpid()))
    assert idaemon.answers()


def test_attach_with_a_file_that_is_not_a_memfd(idaemon, tmp_path):
    path = tmp_path / "page"
    path.write_bytes(struct.pack("<IIiI", MAGIC, 1, os.getpid(), 16).ljust(PAGE_SIZE, b"\0"))
    with path.open("r+b") as page:
        reply = _raw_attach(idaemon.socket, {"cmd": "interposer_attach", "version": 1, "shm_fd": page.fileno()})
    assert reply["ok"] is False and "is not a memfd named gpuwatch-interposer" in reply["error"]
    assert path.read_bytes()[32:40] == bytes(8), "the daemon wrote nothing into it"


def test_garbage_then_a_good_request_on_one_connection(idaemon):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(idaemon.socket)
        f = s.makefile("rwb")
        for line in (b'{"cmd": "interposer_attach", "version": 1, "shm_fd": \n', b"\x80not utf-8\n",
                     b'{"cmd": "interposer_attach"}\n', b'{"cmd": "ps"}\n'):
            f.write(line)
            f.flush()
            replies = json.loads(f.readline())
            if line.startswith(b'{"cmd": "ps"'):
                assert replies["ok"] is True
            else:
                assert replies["ok"] is False, replies
    assert idaemon.answers()


def test_metrics_show_quota_state_and_swap(idaemon, fakes):
    f = attached(fakes, mem_limit=2 * GiB)
    f.device(0, quota=2 * GiB, used=GiB, swappable=GiB, swapped=128 * MiB)
    f.u64(40, 3 * GiB)
    f.u64(48, GiB)
    f.set_state("paused")
    text = urllib.request.urlopen(idaemon.metrics_url, timeout=10).read().decode()
    pid = f'pid="{os.getpid()}"'
    mine = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if pid in line and not line.startswith("#")}

    def value(name: str, extra: str = "") -> float:
        return next(v for k, v in mine.items() if k.startswith(name + "{") and extra in k)

    assert value("gpuwatch_process_quota_bytes") == 2 * GiB
    assert value("gpuwatch_process_swapped_bytes") == 128 * MiB
    assert value("gpuwatch_process_swap_bytes_total", 'direction="out"') == 3 * GiB
    assert value("gpuwatch_process_swap_bytes_total", 'direction="in"') == GiB
    assert value("gpuwatch_process_state", 'state="paused"') == 1
    assert value("gpuwatch_process_state", 'state="running"') == 0
    lint = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert lint.returncode == 0 and lint.stdout.strip() == "" and lint.stderr.strip() == "", lint.stdout + lint.stderr


def test_plain_process_is_stopped_and_continued_with_signals(idaemon):
    sleeper = subprocess.Popen(["sleep", "100"])
    pid = str(sleeper.pid)
    state = lambda: Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]  # noqa: E731
    try:
        assert idaemon.cli("pause", pid).stdout == f"gpuwatch: pid {pid} stopped (SIGSTOP: it does not run under " \
                                                   "the interposer)\n"
        wait_for(lambda: state() == "T", 5, "the process to stop")
        row = idaemon.row(sleeper.pid, gpu=None)
        assert (row["state"], row["interposed"], row["quota_bytes"]) == ("stopped", False, None)
        error = one_line_error(idaemon.cli("pause", pid, "--swap", check=False))
        assert "does not run under the interposer" in error and "gpuwatch exec" in error
        assert idaemon.cli("resume", pid).stdout == f"gpuwatch: pid {pid} running (SIGCONT)\n"
        wait_for(lambda: state() == "S", 5, "the process to continue")
        assert idaemon.ps(sleeper.pid) == []
        assert one_line_error(idaemon.cli("resume", pid, check=False)) == \
            f"gpuwatch: pid {pid} was not paused by gpuwatch"
    finally:
        sleeper.kill()
        sleeper.wait()
    assert one_line_error(idaemon.cli("pause", pid, check=False)) == f"gpuwatch: no process with pid {pid}"
    assert one_line_error(idaemon.cli("pause", "1", check=False)) == "gpuwatch: will not stop pid 1: it is init"


@pytest.mark.root
def test_daemon_continues_what_it_stopped_when_it_stops(tmp_path):
    d = Daemon(tmp_path, "--launches", "off")
    sleeper = subprocess.Popen(["sleep", "100"])
    stat = Path(f"/proc/{sleeper.pid}/stat")
    try:
        d.cli("pause", str(sleeper.pid))
        wait_for(lambda: stat.read_text().rsplit(")", 1)[1].split()[0] == "T", 5, "the process to stop")
        assert d.stop(signal.SIGTERM) == 0
        assert stat.read_text().rsplit(")", 1)[1].split()[0] == "S"
    finally:
        d.stop()
        sleeper.kill()
        sleeper.wait()


def test_bad_pause_arguments_are_one_line(idaemon):
    for args, message in ((["pause", "abc"], "gpuwatch: pause: argument PID: 'abc' is not a process id"),
                          (["pause", "5", "--swap", "10XB"], "gpuwatch: pause: argument --swap: '10XB' is not a size"),
                          (["resume"], "gpuwatch: resume: the following arguments are required: PID")):
        r = idaemon.cli(*args, check=False)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith(message), r.stderr


@pytest.fixture(scope="module")
def libgpuwatch(tmp_path_factory) -> Path:
    if not (ROOT / "interposer" / "Makefile").exists():
        pytest.skip("the interposer library's sources are not in this checkout")
    out = tmp_path_factory.mktemp("libgpuwatch")
    subprocess.run(["make", "-s", "-C", str(ROOT / "interposer"), f"OUT={out}"], check=True)
    return out / "libgpuwatch.so"


def test_end_to_end_with_the_real_library(idaemon, fakecuda, libgpuwatch):
    """`gpuwatch exec` starts a program under the built library; the daemon sees it, pauses, swaps and
    resumes it for real (the test-double driver implements the VMM calls the swap uses)."""
    driver = fakecuda / "libcuda.so.1"
    p = Prog([*GPUWATCH, "--socket", idaemon.socket, "exec", "--mem-limit", "64MiB", "--priority", "high", "--",
              str(fakecuda / "cudaprog")],
             {"GPUWATCH_INTERPOSER": str(libgpuwatch), "GPUWATCH_REAL_LIBCUDA": str(driver)})
    try:
        p.ok(f"load {driver}")
        wait_for(lambda: idaemon.watching(driver), 5, "the daemon to watch the driver")
        p.ok("ctx 0")
        p.ok("alloc a 16M")
        p.ok("launch 100")
        pid = str(p.pid)  # exec: the program has gpuwatch's pid

        def attached_row() -> dict | None:
            rows = [r for r in idaemon.ps(p.pid) if r["gpu"] == 0 and r["interposed"]]
            return rows[0] if rows and rows[0]["launches"] == 100 else None

        row = wait_for(attached_row, 10, "the daemon to show the process with its page's counts")
        assert (row["quota_bytes"], row["priority"], row["state"], row["launches_estimated"]) == (64 * MiB, "high",
                                                                                                 "running", False)
        assert row["device_bytes"] == 16 * MiB
        moved = idaemon.cli("pause", pid, "--swap").stdout
        assert moved == f"gpuwatch: pid {pid} swapped: 16.0MiB moved to host memory\n"
        row = idaemon.row(p.pid)
        assert (row["state"], row["swapped_bytes"], row["swap_out_bytes_total"], row["device_bytes"]) == (
            "swapped", 16 * MiB, 16 * MiB, 0)
        assert idaemon.cli("resume", pid).stdout == f"gpuwatch: pid {pid} running\n"
        p.ok("launch 1")
        assert p.send("alloc b 60M") == "err 2"  # over the 64 MiB quota with 16 MiB in use
        row = idaemon.row(p.pid)
        assert (row["state"], row["device_bytes"], row["swap_in_bytes_total"], row["launches"]) == (
            "running", 16 * MiB, 16 * MiB, 101)
    finally:
        p.close()
    wait_for(lambda: not idaemon.ps(p.pid), 5, "the exited process's rows to go")


# ------------------------------------------------ without a daemon: the page reader, exposition and top


def test_shared_page_reader_checks_and_reads(tmp_path):
    from gpuwatch.interposer.shm import PageError, SharedPage
    for sealable in (True, False):
        f = FakeInterposer(str(tmp_path / "none.sock"), sealable=sealable)
        try:
            f.u32(20, 99)  # a state this version does not know
            f.u32(16, 2)  # gate open, queue bounded
            f.u32(112, 4)
            f.device(2, quota=5, used=1)
            f.slot(3, 10, 20, 30)
            page = SharedPage.open(os.getpid(), f.fd)
            assert page.mapped is sealable
            reading = page.read()
            h = reading.header
            assert (h.state, h.max_devices, len(reading.devices)) == ("unknown", 16, 16)
            assert (h.gate_closed, h.queue_bounded, h.waiting) == (False, True, 4)
            assert [d.ordinal for d in reading.devices if d.in_use] == [2]
            assert (reading.counts.launches, reading.counts.graph_launches, reading.counts.copies) == (10, 20, 30)
            page.write_lease(12345)
            page.write_quota(2, 7 * GiB)
            assert (f.lease_deadline_ns, f.u64(256 + 64 * 2)) == (12345, 7 * GiB)
            with pytest.raises(ValueError):
                page.write_quota(16, 1)
            page.close()
            with pytest.raises(PageError):
                page.read()
            with pytest.raises(PageError, match="the page says pid"):
                SharedPage.open(os.getpid(), f.fd, page_pids={os.getpid() + 1})
        finally:
            f.close()


def test_exposition_with_interposed_rows_equals_prometheus_client_reference():
    from prometheus_client import CollectorRegistry, generate_latest
    from gpuwatch.exporters.metrics import families, render
    from gpuwatch.core.view import Gpu, ProcessGpu, Snapshot, TracerHealth
    from gpuwatch.core.vocabulary import STATES
    rows = [ProcessGpu(pid=10 + i, comm=f"p{i}", gpu=i % 2, interposed=i % 2 == 0,
                       quota_bytes=(i + 1) << 30 if i % 2 == 0 else None, state=[*STATES, "unknown"][i],
                       swapped_bytes=i * MiB, swap_out_bytes_total=3 * i, swap_in_bytes_total=i) for i in range(7)]
    snap = Snapshot(rows, [Gpu(0, "GPU-1", "H200", 10, 4, 30)], TracerHealth("off"))

    class Reference:
        def collect(self):
            return families(snap)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Reference())
    assert render(snap) == generate_latest(registry).decode()


def test_top_shows_a_state_column_only_when_a_process_is_paused_or_interposed():
    from gpuwatch.exporters import top
    base = {"gpu": 0, "comm": "x", "device_bytes": MiB}
    plain = [top.make_row({"pid": 1, **base}, None, "x")]
    assert top.columns_for(plain) == top.COLUMNS
    rows = plain + [top.make_row({"pid": 2, **base, "state": "swapping_out", "interposed": True}, None, "y")]
    columns = top.columns_for(rows)
    titles = [c.title for c, _ in top.fit_columns(80, columns)]
    assert titles[titles.index("GPU") + 1] == "STATE"
    lines = [top.row_line(r, 80, columns) for r in rows]
    assert lines[1].split()[3] == "swap-out" and lines[0].split()[3] == "running"
    assert all(len(line) == 80 for line in lines)


@pytest.mark.root
def test_a_restarted_daemon_continues_what_a_killed_one_paused(tmp_path) -> None:
    """`gpuwatch pause` of a plain process, the daemon killed with SIGKILL: the next daemon continues it."""
    from conftest import Daemon as _Daemon
    workdir = tmp_path / "d"
    workdir.mkdir()
    workdir.chmod(0o755)
    sleeper = subprocess.Popen(["sleep", "300"])
    try:
        first = _Daemon(workdir)
        first.cli("pause", str(sleeper.pid))
        wait_for(lambda: _proc_state(sleeper.pid) == "T", 5, "the process to stop")
        first.stop(signal.SIGKILL)
        assert _proc_state(sleeper.pid) == "T"
        second = _Daemon(workdir)
        try:
            wait_for(lambda: _proc_state(sleeper.pid) in ("S", "R"), 5, "the new daemon to continue it")
        finally:
            second.stop()
    finally:
        sleeper.kill()
        sleeper.wait()


def _proc_state(pid: int) -> str:
    return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
