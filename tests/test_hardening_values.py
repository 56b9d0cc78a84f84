"""Issue 12, faults and bad values: every configuration key has a range, checked at start (one line, exit 1) and
at a reload (`configuration NOT reloaded`, the daemon keeps renewing leases); a start-up that fails stops
what it had started and exits 1 in one line, also after the probes attached, and never hangs; a busy metrics
address is found before any probe attaches; `--socket` and `-v` after the command; the client finds the
configuration's socket; UNTRACKED is `-` without NVML; a change the state file cannot record says so; a quota
stop on an unknown device says so. Pure tests first, then those that run daemons (marked root)."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import pytest

from conftest import Daemon, GPUWATCH, Prog, ROOT, await_daemon, uprobe_events, wait_for
from interposer_fixtures import FakeInterposer

from gpuwatch.client import cli
from gpuwatch.core.vocabulary import DEFAULT_SOCKET, U64_MAX, socket_path
from gpuwatch.daemon import config as configuration
from gpuwatch.enforcer import interposed
from gpuwatch.exporters.topview import COLUMNS, make_row

MiB = 1 << 20
SECTIONS = {"daemon": configuration.DaemonSection, "interposer": configuration.InterposerSection,
            "scheduler": configuration.SchedulerSection, "metrics": configuration.MetricsSection}
RANGED = [(name, f.name, f.metadata.get("range")) for name, cls in SECTIONS.items() for f in fields(cls)
          if f.metadata.get("range") is not None]
# what a key needs beside it to be valid at its bounds (the window is shorter than its period)
COMPANIONS = {"sample_window_ms": "sample_period_ms = 3600000\n", "sample_period_ms": "sample_window_ms = 1\n"}


def one_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("gpuwatch: "), r.stderr
    assert "Traceback" not in r.stderr
    return r.stderr.strip()


# ---------------------------------------------------------------- the configuration's ranges (pure)


def test_every_number_key_has_a_range():
    numbers = [(name, f.name) for name, cls in SECTIONS.items() for f in fields(cls) if type(f.default) is int]
    assert numbers and all(configuration.key_range(SECTIONS[s], k) is not None for s, k in numbers), numbers


@pytest.mark.parametrize("section, key, bounds", RANGED, ids=[f"{s}.{k}" for s, k, _ in RANGED])
def test_a_value_outside_its_range_is_refused_in_one_line_and_its_bounds_are_taken(section, key, bounds):
    low, high = bounds
    extra = COMPANIONS.get(key, "")
    for good in (low, high):
        cfg = configuration.parse(f"[{section}]\n{key} = {good}\n{extra}")
        assert getattr(getattr(cfg, section), key) == good
    for bad in (low - 1, high + 1, -(1 << 63), (1 << 63) - 1):
        with pytest.raises(configuration.ConfigError) as caught:
            configuration.parse(f"[{section}]\n{key} = {bad}\n{extra}", "gw.toml")
        message = str(caught.value)
        assert "\n" not in message
        assert re.fullmatch(rf"gw\.toml: {section}\.{key}: must be (a power of two )?from {low} to {high}, "
                            rf"not {bad}", message), message


@pytest.mark.parametrize("text, problem", [
    ("[daemon]\nring_buffer_pages = 1099511627776\n", "must be a power of two from 1 to 65536, not 1099511627776"),
    ("[daemon]\nring_buffer_pages = 131072\n", "must be a power of two from 1 to 65536"),
    ("[daemon]\nring_buffer_pages = 3\n", "must be a power of two from 1 to 65536, not 3"),
    ("[interposer]\nlease_ms = 9223372036854775807\n", "interposer.lease_ms: must be from 500 to 3600000"),
    ("[scheduler]\ntick_ms = 100000000000000000\n", "scheduler.tick_ms: must be from 1 to 10000"),
    ("[scheduler]\nreserve_mib = 9223372036854775807\n", "scheduler.reserve_mib: must be from 0 to 16777216"),
    ("[daemon]\nsample_window_ms = 1000000000000\nsample_period_ms = 2000000000000\n",
     "daemon.sample_window_ms: must be from 1 to 60000"),
])
def test_the_issues_impossible_values_are_refused(text, problem):
    with pytest.raises(configuration.ConfigError, match=re.escape(problem)):
        configuration.parse(text)


def test_readme_shows_every_range():
    readme = (ROOT / "README.md").read_text()
    for _, key, (low, high) in RANGED:
        assert re.search(rf"^{key} = \S+ +# \[{low}, {high}\]", readme, re.M), f"README: no [{low}, {high}] for {key}"


def test_command_line_options_are_checked_as_their_keys_are():
    empty = {"socket": None, "launches": None, "nvml": None, "ring_buffer_pages": None, "sample_window_ms": None,
             "sample_period_ms": None}
    with pytest.raises(configuration.ConfigError, match=r"^--ring-buffer-pages: must be a power of two from 1 to "
                                                        r"65536, not 1099511627776$"):
        configuration.with_overrides(configuration.Config(), {**empty, "ring_buffer_pages": 1 << 40}, {})
    with pytest.raises(configuration.ConfigError, match=r"^--sample-window-ms: must be from 1 to 60000, not 0$"):
        configuration.with_overrides(configuration.Config(), {**empty, "sample_window_ms": 0}, {})
    cfg = configuration.with_overrides(configuration.Config(), {**empty, "ring_buffer_pages": 65536}, {})
    assert cfg.daemon.ring_buffer_pages == 65536


@pytest.mark.parametrize("data, problem", [
    (b"[daemon]\nsocket = \"/run/x\xff.sock\"\n", "not UTF-8 text (byte 25 is 0xff)"),
    (b"\xfe\xff\x00[\x00d", "not UTF-8 text (byte 0 is 0xfe)"),
    (b"#" * ((1 << 20) + 1), "larger than 1 MiB"),
    (b"[daemon]\nlaunches = 'all\x00'\n", "invalid TOML"),
])
def test_a_file_that_is_not_utf8_toml_is_refused_in_one_line(tmp_path, data, problem):
    path = tmp_path / "gpuwatch.toml"
    path.write_bytes(data)
    with pytest.raises(configuration.ConfigError) as caught:
        configuration.load(str(path))
    assert str(caught.value).startswith(f"{path}: ") and problem in str(caught.value)
    assert "\n" not in str(caught.value)


# ---------------------------------------------------------------- leases (pure)


class _Page:
    def __init__(self) -> None:
        self.leases: list[int] = []

    def write_lease(self, deadline_ns: int) -> None:
        self.leases.append(deadline_ns)

    def close(self) -> None:
        pass


class _Process:
    def __init__(self) -> None:
        self.pid, self.page = 4242, _Page()

    def close(self) -> None:
        pass


@pytest.mark.parametrize("lease_ms", [(1 << 63) - 1, 0, -5])
def test_the_lease_thread_survives_an_impossible_lease(lease_ms):
    registry = interposed.InterposedRegistry(lease_ms=5000)
    process = _Process()
    registry._processes[process.pid] = process  # type: ignore[assignment]
    # as a reload sets them (daemon.Daemon.reload): the thread must keep renewing whatever they are
    registry.lease_ns, registry.renew_every = lease_ms * 1_000_000, lease_ms / 5000
    registry.start()
    try:
        wait_for(lambda: len(process.page.leases) >= 2, 5, "two lease renewals")
        assert registry._thread.is_alive()
        assert all(0 < d <= U64_MAX for d in process.page.leases)
    finally:
        registry.close()


def test_a_lease_deadline_always_fits_the_page():
    from gpuwatch.enforcer.interposed import lease_deadline
    now = time.monotonic_ns()
    assert now <= lease_deadline((1 << 63) - 1) <= now + 3_700_000 * 1_000_000
    assert lease_deadline(-1) >= now


# ---------------------------------------------------------------- the client (pure)


@pytest.mark.parametrize("argv, socket_given, verbose", [
    (["ps", "--socket", "/x.sock", "-v"], "/x.sock", True),
    (["--socket", "/a.sock", "-v", "ps"], "/a.sock", True),
    (["--socket", "/a.sock", "ps", "--socket", "/b.sock"], "/b.sock", False),
    (["ps"], None, False),
    (["quota", "set", "--pid", "1", "1G", "--socket", "/q.sock", "--verbose"], "/q.sock", True),
    (["quota", "list", "-v"], None, True),
    (["pause", "7", "--socket", "/p.sock"], "/p.sock", False),
    (["run", "--socket", "/r.sock", "-v"], "/r.sock", True),
    (["exec", "--socket", "/e.sock", "--", "true", "--socket", "x"], "/e.sock", False),
])
def test_socket_and_verbose_after_the_command(argv, socket_given, verbose):
    args = cli.parser().parse_args(argv)
    assert (args.socket, args.verbose) == (socket_given, verbose)


def test_ps_with_socket_after_the_command_names_that_socket(tmp_path):
    missing = tmp_path / "none.sock"
    r = subprocess.run([*GPUWATCH, "ps", "--socket", str(missing), "-v"], capture_output=True, text=True, timeout=30)
    assert one_line(r) == f"gpuwatch: no gpuwatch daemon is listening on {missing}: start one with `sudo gpuwatch run`"


def test_the_client_reads_the_configurations_socket(tmp_path, monkeypatch):
    cfg = tmp_path / "gpuwatch.toml"
    monkeypatch.delenv("GPUWATCH_SOCKET", raising=False)
    assert socket_path(str(cfg)) == DEFAULT_SOCKET  # no file
    cfg.write_text('[daemon]\nsocket = "/srv/gw/control.sock"\n[scheduler]\ntick_ms = 50\n')
    assert socket_path(str(cfg)) == "/srv/gw/control.sock"
    monkeypatch.setenv("GPUWATCH_SOCKET", "/env.sock")
    assert socket_path(str(cfg)) == "/env.sock"  # the environment wins
    monkeypatch.delenv("GPUWATCH_SOCKET")
    for text in (b"[daemon\n", b"[daemon]\nsocket = 5\n", b"[daemon]\nsocket = 'relative.sock'\n", b"\xff\xfe"):
        cfg.write_bytes(text)
        assert socket_path(str(cfg)) == DEFAULT_SOCKET, text
    help_text = cli.parser().format_help() + subprocess.run([*GPUWATCH, "ps", "--help"], capture_output=True,
                                                            text=True, timeout=30).stdout
    assert "$GPUWATCH_SOCKET" in " ".join(help_text.split()) and "[daemon] socket of /etc/gpuwatch/gpuwatch.toml" \
        in " ".join(help_text.split())


def test_untracked_is_unknown_without_nvml():
    row = {"pid": 1, "comm": "p", "gpu": 0, "state": "running", "device_bytes": 5 * MiB, "quota_bytes": None,
           "managed_bytes": 0, "host_pinned_bytes": 0, "nvml_bytes": None, "untracked_bytes": 0, "allocs": 1,
           "failed_allocs": 0, "launches": 0, "graph_launches": 0, "reason": None}
    table = cli.format_ps([row, {**row, "pid": 2, "nvml_bytes": 7 * MiB, "untracked_bytes": 2 * MiB}]).splitlines()
    header = table[0].split()
    column = header.index("UNTRACKED")
    assert table[1].split()[column] == "-" and table[2].split()[column] == "2.0MiB", table
    untracked = next(c for c in COLUMNS if c.title == "UNTRACKED")
    assert untracked.cell(make_row(row, None, "p")) == "-"
    assert untracked.cell(make_row({**row, "nvml_bytes": 0}, None, "p")) == "0B"


def test_an_unsaved_change_is_told(capsys):
    from gpuwatch.client.common import warn_unsaved
    warn_unsaved({"saved": False, "save_error": "/run/gw/stopped.json: No space left on device"})
    warn_unsaved({"state": "paused"})
    assert capsys.readouterr().err == ("gpuwatch: warning: the state file could not be written (/run/gw/stopped.json: "
                                       "No space left on device): this will not survive a daemon crash\n")


# ---------------------------------------------------------------- daemons (root)


def run_daemon(tmp_path: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """`gpuwatch run` to its end; `pid` set on the result (its probes are named after it)."""
    with subprocess.Popen([*GPUWATCH, "--socket", str(tmp_path / "gw.sock"), "run", "--no-nvml", *args],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    result.pid = proc.pid  # type: ignore[attr-defined]
    return result


def uprobes_of(pid: int) -> list[str]:
    """The uprobe_events entries a daemon made (bcc names them ..._bcc_PID; other daemons' are theirs)."""
    return [line for line in uprobe_events().splitlines() if line.split(" ")[0].endswith(f"_bcc_{pid}")]


@pytest.mark.root
@pytest.mark.parametrize("text, problem", [
    ("[daemon]\nring_buffer_pages = 1099511627776\n", "daemon.ring_buffer_pages: must be a power of two from 1 to "
                                                      "65536, not 1099511627776"),
    ("[interposer]\nlease_ms = 9223372036854775807\n", "interposer.lease_ms: must be from 500 to 3600000"),
    ("[daemon]\nsample_window_ms = 1000000000000\nsample_period_ms = 2000000000000\n",
     "daemon.sample_window_ms: must be from 1 to 60000"),
    ("[scheduler]\ntick_ms = 100000000000000000\n", "scheduler.tick_ms: must be from 1 to 10000"),
    ("[scheduler]\nreserve_mib = 9223372036854775807\n", "scheduler.reserve_mib: must be from 0 to 16777216"),
    (b"[daemon]\nlaunches = \"s\xe9mple\"\n", "not UTF-8 text (byte 22 is 0xe9)"),
])
def test_a_bad_value_stops_start_up_in_one_line_within_seconds(tmp_path, text, problem):
    cfg = tmp_path / "gpuwatch.toml"
    cfg.write_bytes(text if isinstance(text, bytes) else text.encode())
    start = time.monotonic()
    r = run_daemon(tmp_path, "--no-metrics", "--config", str(cfg), timeout=30)
    assert one_line(r).startswith(f"gpuwatch: {cfg}: ") and problem in r.stderr, r.stderr
    assert time.monotonic() - start < 10
    assert not (tmp_path / "gw.sock").exists()
    assert uprobes_of(r.pid) == []  # type: ignore[attr-defined]


@pytest.mark.root
def test_a_ring_buffer_the_kernel_cannot_give_exits_at_once_on_the_command_line_too(tmp_path):
    start = time.monotonic()
    r = run_daemon(tmp_path, "--no-metrics", "--ring-buffer-pages", str(1 << 40), timeout=30)
    assert one_line(r) == "gpuwatch: --ring-buffer-pages: must be a power of two from 1 to 65536, not 1099511627776"
    assert time.monotonic() - start < 10 and not (tmp_path / "gw.sock").exists()
    assert uprobes_of(r.pid) == []  # type: ignore[attr-defined]


@pytest.mark.root
def test_a_busy_metrics_port_is_named_before_any_probe_attaches(tmp_path, fakecuda):
    p = Prog([str(fakecuda / "cudaprog")])
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        try:
            p.ok(f"load {fakecuda / 'libcuda.so.1'}")  # a driver in use: the probes would attach to it
            start = time.monotonic()
            r = run_daemon(tmp_path, "--listen", f"127.0.0.1:{port}", timeout=30)
        finally:
            p.close()
    assert one_line(r) == (f"gpuwatch: cannot start: metrics on 127.0.0.1:{port}: Address already in use: choose "
                           "another address with --listen or [metrics] listen, or --no-metrics")
    assert time.monotonic() - start < 10
    assert "watching" not in r.stdout + r.stderr and not (tmp_path / "gw.sock").exists()


# `gpuwatch run` with one part's start replaced by a failure (or a pause), as a bug or a kernel would fail it
FAULTY_RUN = """
import sys, time
from pathlib import Path
from gpuwatch.client import cli
from gpuwatch.enforcer.procevents import ProcEvents
from gpuwatch.enforcer.quota import QuotaEnforcer
from gpuwatch.probes.tracer import Tracer
part, marker = sys.argv[1], Path(sys.argv[2])
def fail(*args, **kwargs):
    marker.write_text("failing")
    raise RuntimeError("injected failure")
def pause(self, saved):
    marker.write_text("paused")
    time.sleep(3)
if part == "probes":
    Tracer._spawn = fail  # inside the tracer's start, after it attached
elif part == "process events":
    ProcEvents.start = fail
elif part == "quotas":
    QuotaEnforcer.restore = fail
else:
    QuotaEnforcer.restore = pause
sys.exit(cli.main(sys.argv[3:]))
"""


def faulty_daemon(tmp_path: Path, part: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", FAULTY_RUN, part, str(tmp_path / "marker"), "--socket",
                             str(tmp_path / "gw.sock"), "run", "--no-nvml", "--no-metrics", "--launches", "all"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


# A daemon exits in a few seconds; the kernel's uprobe teardown can take much longer while other daemons attach
# and detach on the same machine (concurrent test runs): the bound is generous, and still a bound.
EXIT_S = 120


def stopped(d: Daemon) -> int:
    """SIGTERM, then its exit code; one that does not exit within EXIT_S is killed (the test fails)."""
    d.proc.send_signal(signal.SIGTERM)
    try:
        return d.proc.wait(timeout=EXIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(d.proc.pid, signal.SIGKILL)
        d.proc.wait()
        raise AssertionError(f"the daemon did not exit within {EXIT_S} s") from None


def finished(proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError(f"the daemon did not exit within {timeout} s") from None
    return proc.returncode, err


@pytest.mark.root
@pytest.mark.parametrize("part, what", [("probes", "the probes"), ("process events", "process events"),
                                        ("quotas", "the quotas set by hand")])
def test_a_part_that_fails_to_start_stops_what_started_and_exits_in_one_line(tmp_path, fakecuda, part, what):
    p = Prog([str(fakecuda / "cudaprog")])
    try:
        p.ok(f"load {fakecuda / 'libcuda.so.1'}")  # the probes attach to this driver before the failure
        proc = faulty_daemon(tmp_path, part)
        rc, err = finished(proc, EXIT_S)
    finally:
        p.close()
    assert (tmp_path / "marker").read_text() == "failing", err
    lines = err.splitlines()
    assert rc == 1 and lines[-1] == f"gpuwatch: cannot start: {what}: injected failure", err
    assert [line for line in lines if "cannot start" in line] == lines[-1:] and "Traceback" not in err
    assert re.search(r"watching .*libcuda\.so\.1", err), err  # it had attached, then detached: it exited
    assert not (tmp_path / "gw.sock").exists()
    assert uprobes_of(proc.pid) == []


@pytest.mark.root
def test_sigterm_during_start_up_ends_it(tmp_path):
    proc = faulty_daemon(tmp_path, "slow")
    try:
        wait_for(lambda: (tmp_path / "marker").exists() or proc.poll() is not None, 60, "start-up to reach the quotas")
    except AssertionError:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    proc.send_signal(signal.SIGTERM)
    rc, err = finished(proc, EXIT_S)
    assert rc == 0 and "stopping: asked to stop during start-up" in err and "stopped: probes detached" in err, err
    assert "running:" not in err and not (tmp_path / "gw.sock").exists()


@pytest.mark.root
def test_a_bad_reload_keeps_the_leases_renewed(tmp_path):
    cfg = tmp_path / "gpuwatch.toml"
    cfg.write_text("[interposer]\nlease_ms = 1000\n")
    d = Daemon(tmp_path, "--launches", "off", "--config", str(cfg))
    fake = FakeInterposer(d.socket)
    try:
        reply = fake.attach()
        assert reply.get("ok"), reply

        def renewed(within_s: float) -> bool:
            """A renewal happens after now, for a lease of at most within_s."""
            now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            wait_for(lambda: fake.lease_deadline_ns > now + 500_000_000, 5, "a lease renewal")
            return fake.lease_deadline_ns <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) + int(within_s * 1e9)

        assert renewed(1.0)
        for bad in ("lease_ms = 9223372036854775807", "request_timeout_ms = 9223372036854775807",
                    "lease_ms = 0"):
            cfg.write_text(f"[interposer]\n{bad}\n")
            reloads = d.log.read_text().count("configuration NOT reloaded")
            d.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: d.log.read_text().count("configuration NOT reloaded") > reloads, 10, "the refusal")
            assert renewed(1.0), bad
        assert f"configuration NOT reloaded: {cfg}: interposer.lease_ms: must be from 500 to 3600000, not " \
               "9223372036854775807" in d.log.read_text()
        cfg.write_text("[interposer]\nlease_ms = 3000\n")
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "configuration reloaded" in d.log.read_text(), 10, "the good reload")
        wait_for(lambda: fake.lease_deadline_ns > time.clock_gettime_ns(time.CLOCK_MONOTONIC) + int(2e9), 5,
                 "a renewal with the new lease")
        assert d.proc.poll() is None and "Traceback" not in d.log.read_text()
    finally:
        fake.close()
        assert stopped(d) == 0


class _StateDaemon(Daemon):
    """A daemon whose socket and state file are in `directory`, its log in `workdir`."""

    def __init__(self, workdir: Path, directory: Path) -> None:  # not super's: it puts both in one directory
        self.socket, self.log = str(directory / "gpuwatch.sock"), workdir / "daemon.log"
        self.proc = subprocess.Popen([*GPUWATCH, "--socket", self.socket, "run", "--no-nvml", "--no-metrics",
                                      "--launches", "off"], stdout=self.log.open("w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        await_daemon(self.proc, self.log, self.answers)


def fill(directory: Path) -> None:
    """Every block of the file system taken."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (64 << 10, 4 << 10, 1):
            try:
                while True:
                    os.write(fd, b"\0" * chunk)
            except OSError:
                pass
    finally:
        os.close(fd)


@pytest.mark.root
def test_pause_and_quota_set_say_when_the_state_file_cannot_be_written(tmp_path):
    state = tmp_path / "state"  # the socket's directory, where the state file is: a full disk of 512 KiB
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k,mode=0755", "tmpfs", str(state)], check=True)
    try:
        d = _StateDaemon(tmp_path, state)
        sleeper = subprocess.Popen(["sleep", "300"])
        try:
            fill(state)
            r = d.cli("pause", str(sleeper.pid))
            assert r.stdout == f"gpuwatch: pid {sleeper.pid} stopped (SIGSTOP: it does not run under the interposer)\n"
            warning = (rf"gpuwatch: warning: the state file could not be written \({state}/stopped\.json: No space "
                       r"left on device\): this will not survive a daemon crash\n")
            assert re.fullmatch(warning, r.stderr), r.stderr
            r = d.cli("quota", "set", "--pid", str(sleeper.pid), "1GiB")
            assert "quota 1.0GiB per GPU" in r.stdout and "this will not survive a daemon crash" in r.stderr, r.stderr
            d.cli("resume", str(sleeper.pid))
            (state / "filler").unlink()
            r = d.cli("quota", "set", "--pid", str(sleeper.pid), "2GiB")  # room again: saved, nothing to say
            assert r.stderr == "" and json.loads((state / "stopped.json").read_text())["quotas"], r.stderr
            r = d.cli("pause", str(sleeper.pid))
            assert r.stderr == ""
            d.cli("resume", str(sleeper.pid))
        finally:
            stopped(d)
            sleeper.kill()
            sleeper.wait()
    finally:
        subprocess.run(["umount", "-l", str(state)], check=True)


@pytest.mark.root
def test_a_quota_stop_on_an_unknown_device_says_so(tmp_path, fakecuda):
    d = Daemon(tmp_path, "--launches", "off")
    p = Prog([str(fakecuda / "cudaprog")])
    lib = fakecuda / "libcuda.so.1"
    try:
        p.ok(f"load {lib}")  # no context made current: the allocation's device is unknown
        wait_for(lambda: d.watching(lib), 10, "the daemon to watch the driver")
        d.cli("quota", "set", "--pid", str(p.pid), "8MiB")
        assert p.proc.stdin
        p.proc.stdin.write("alloc a 16M\n")
        p.proc.stdin.flush()
        line = wait_for(lambda: next((ln for ln in d.log.read_text().splitlines()
                                      if f"pid {p.pid} stopped (SIGSTOP) before allocating" in ln), None), 10,
                        "the quota stop's log line")
        assert isinstance(line, str) and "on an unknown device" in line and "device -1" not in line, line
        d.cli("quota", "set", "--pid", str(p.pid), "0")
        assert p.proc.stdout and p.proc.stdout.readline()  # continued: the allocation answered
    finally:
        p.close()
        assert stopped(d) == 0

