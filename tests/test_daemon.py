"""The daemon's life: start without a driver, detach on every way out, clear errors, the event stream."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from conftest import GPUWATCH, Daemon, Prog, first_code_byte, uprobe_events, wait_for

MiB = 1 << 20


def test_waits_for_a_driver_then_attaches_when_one_is_loaded(tmp_path, fakecuda, library_copy, sole_daemon_slot):
    d = Daemon(tmp_path, "--launches", "off")
    try:
        health = d.status()["health"]
        assert health["waiting_for_driver"] and health["libraries"] == [] and health["probes_attached"] == 0
        p = Prog([str(fakecuda / "cudaprog")])
        p.ok(f"load {library_copy}")
        wait_for(lambda: d.watching(library_copy), 1.0, "attach within 1 s")
        p.ok("ctx 0")
        p.ok("alloc a 5M")
        assert d.row(p.pid)["device_bytes"] == 5 * MiB
        assert d.status()["health"]["waiting_for_driver"] is False
        p.close()
    finally:
        d.stop()


def test_process_that_loaded_the_driver_before_the_daemon_is_found_at_start(tmp_path, fakecuda, library_copy,
                                                                            sole_daemon_slot):
    p = Prog([str(fakecuda / "cudaprog")])
    p.ok(f"load {library_copy}")
    p.ok("ctx 0")
    d = Daemon(tmp_path, "--launches", "off")
    try:
        assert d.watching(library_copy)
        p.ok("alloc a 3M")
        # the context was made current before the daemon started: without NVML the GPU is not known
        assert [(r["gpu"], r["device_bytes"]) for r in d.ps(p.pid)] == [(None, 3 * MiB)]
        p.ok("ctx 0")  # made current again (cudart does this per thread): attributed from here on
        p.ok("alloc b 5M")
        assert d.row(p.pid, gpu=0)["device_bytes"] == 5 * MiB
    finally:
        p.close()
        d.stop()


def test_perf_event_fallback_for_kernels_without_uprobe_multi(tmp_path, fakecuda, library_copy, monkeypatch,
                                                              sole_daemon_slot):
    monkeypatch.setenv("GPUWATCH_UPROBE_MULTI", "0")
    d = Daemon(tmp_path, "--launches", "all")
    p = Prog([str(fakecuda / "cudaprog")])
    try:
        p.ok(f"load {library_copy}")
        wait_for(lambda: d.watching(library_copy), 2, "attach")
        assert d.status()["health"]["attach"] == "perf_event"
        p.ok("ctx 0")
        p.ok("alloc a 3M")
        p.ok("create h 4M 0")
        p.ok("launch 9")
        row = d.row(p.pid)
        assert (row["device_bytes"], row["launches"]) == (7 * MiB, 9)
    finally:
        p.close()
        began = time.monotonic()
        d.stop(timeout=60)  # each perf-event probe's removal waits for an RCU grace period
        print(f"perf-event path: stopped in {time.monotonic() - began:.1f} s")
    assert first_code_byte(library_copy, "cuMemAlloc_v2") != 0xCC


def test_sigterm_detaches_every_probe_and_removes_the_socket(tmp_path, fakecuda, library_copy, sole_daemon_slot):
    d = Daemon(tmp_path, "--launches", "all")
    p = Prog([str(fakecuda / "cudaprog")])
    p.ok(f"load {library_copy}")
    wait_for(lambda: d.watching(library_copy), 2, "attach")
    assert first_code_byte(library_copy, "cuMemAlloc_v2") == 0xCC, "a registered uprobe shows as int3"
    start = time.monotonic()
    assert d.stop(signal.SIGTERM) == 0
    assert time.monotonic() - start < 2.0
    assert not os.path.exists(d.socket)
    assert first_code_byte(library_copy, "cuMemAlloc_v2") != 0xCC
    assert first_code_byte(library_copy, "cuLaunchKernel") != 0xCC
    assert "libcuda" not in uprobe_events()
    p.close()


def test_sigkill_leaves_no_uprobe_registered(tmp_path, fakecuda, library_copy, sole_daemon_slot):
    d = Daemon(tmp_path, "--launches", "all")
    p = Prog([str(fakecuda / "cudaprog")])
    p.ok(f"load {library_copy}")
    wait_for(lambda: d.watching(library_copy), 2, "attach")
    assert first_code_byte(library_copy, "cuMemFree_v2") == 0xCC
    d.stop(signal.SIGKILL)
    wait_for(lambda: first_code_byte(library_copy, "cuMemFree_v2") != 0xCC, 5, "the kernel to drop the probes")
    assert "libcuda" not in uprobe_events()
    p.close()


def test_trace_streams_events_for_one_process(daemon, progs):
    p = progs()
    trace = subprocess.Popen([*GPUWATCH, "--socket", daemon.socket, "trace", "--json", "--pid", str(p.pid)],
                             stdout=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: daemon.status()["trace_streams"] == 1, 5, "the daemon to serve the trace stream")
        p.ok("alloc a 2M")
        assert p.send("alloc big 100G") == "err 2"
        p.ok("free a")
        p.proc.stdin.write("exit 0\n")
        p.proc.stdin.flush()
        events = [json.loads(trace.stdout.readline()) for _ in range(4)]
    finally:
        trace.terminate()
        trace.wait()
    assert [(e["type"], e["kind"], e["size"], e["pid"]) for e in events] == [
        ("alloc", "device", 2 * MiB, p.pid), ("alloc_fail", "device", 100 << 30, p.pid),
        ("free", "device", 2 * MiB, p.pid), ("exit", "device", 0, p.pid)]
    assert events[1]["result"] == 2


def test_trace_human_output_has_one_line_per_event(daemon, progs):
    p = progs()
    trace = subprocess.Popen([*GPUWATCH, "--socket", daemon.socket, "trace", "--comm", "cudaprog"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert trace.stdout.readline().split()[:3] == ["TIME(s)", "PID", "TID"]
        wait_for(lambda: daemon.status()["trace_streams"] == 1, 5, "the daemon to serve the trace stream")
        p.ok("alloc a 1M")
        line = trace.stdout.readline().split()
    finally:
        trace.terminate()
        trace.wait()
    assert line[1:8] == [str(p.pid), line[2], "cudaprog", "0", "alloc", "device", str(MiB)]


def test_ps_without_a_daemon_says_how_to_start_one(tmp_path):
    r = subprocess.run([*GPUWATCH, "--socket", str(tmp_path / "none.sock"), "ps"], capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "sudo gpuwatch run" in r.stderr


@pytest.mark.root
def test_run_without_privileges_is_one_clear_line(tmp_path):
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *GPUWATCH, "--socket",
                        str(tmp_path / "s.sock"), "run"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == ["gpuwatch: gpuwatch run needs root (or CAP_BPF and CAP_PERFMON): run it "
                                             "with sudo"]


def test_unprivileged_user_may_read(daemon, progs):
    p = progs()
    p.ok("alloc a 1M")
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *GPUWATCH, "--socket",
                        daemon.socket, "ps", "--json"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert [row["device_bytes"] for row in json.loads(r.stdout) if row["pid"] == p.pid] == [MiB]


def test_ring_buffer_overload_is_counted_and_accounting_stays_exact(tmp_path, fakecuda, library_copy):
    d = Daemon(tmp_path, "--launches", "off", "--ring-buffer-pages", "1")
    try:
        tracer = subprocess.Popen([*GPUWATCH, "--socket", d.socket, "trace", "--json"], stdout=subprocess.PIPE)
        p = Prog([str(fakecuda / "cudaprog")])
        p.ok(f"load {library_copy}")
        wait_for(lambda: d.watching(library_copy), 2, "attach")
        p.ok("ctx 0")
        p.ok("thread a ctx 0")
        p.ok("churn 20000 4096")
        p.ok("alloc kept 7M")
        assert d.status()["health"]["events_lost"] > 0
        row = d.row(p.pid)
        assert (row["device_bytes"], row["allocs"], row["frees"]) == (7 * MiB, 20001, 20000)
        tracer.terminate()
        p.close()
    finally:
        d.stop()


def test_control_socket_rejects_bad_requests(daemon):
    import socket
    s = socket.socket(socket.AF_UNIX)
    s.connect(daemon.socket)
    f = s.makefile("rwb")
    for request, error in [(b"not json\n", "malformed JSON"), (b"[1,2]\n", "JSON object"),
                           (b'{"cmd": "nope"}\n', "unknown command"), (b'{"cmd": "trace", "pid": "x"}\n', "integer")]:
        f.write(request)
        f.flush()
        reply = json.loads(f.readline())
        assert reply["ok"] is False and error in reply["error"], reply
        if b"trace" in request:
            break
    s.close()
    s = socket.socket(socket.AF_UNIX)
    s.connect(daemon.socket)
    s.sendall(b"x" * (70 * 1024) + b"\n")
    reply = json.loads(s.makefile("rb").readline())
    assert reply["ok"] is False and "larger than" in reply["error"]
    s.close()
    assert daemon.answers()
