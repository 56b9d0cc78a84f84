"""What the daemon's probes see of CUDA arrays, graph memory and CUDA IPC, exactly, through `gpuwatch ps --json`
(real uprobes on the test double): arrays by their descriptor's bytes, a graph exec by its memory nodes' sizes
from its instantiation to its destruction, memory shared by IPC once (in its exporter, unswappable while another
process has it open); quotas stop a process before an array or an exec past them. And `gpuwatch run` takes -v
and --socket after the command."""
from __future__ import annotations

import select
import subprocess

from conftest import GPUWATCH, Daemon, Prog, wait_for

from gpuwatch.core.procfs import proc_stat

MiB = 1 << 20
FLOAT, UINT8, HALF = "0x20", "0x01", "0x10"


def quota_set(d: Daemon, *args: str) -> None:
    d.cli("quota", "set", *args)


def stopped_before(p: Prog, line: str) -> None:
    assert p.proc.stdin and p.proc.stdout
    p.proc.stdin.write(line + "\n")
    p.proc.stdin.flush()
    wait_for(lambda: (s := proc_stat(p.pid)) and s.state == "T", 5, f"pid {p.pid} to stop before {line!r}")
    assert not select.select([p.proc.stdout], [], [], 0.3)[0], "the stopped call answered"


def continued(p: Prog) -> None:
    assert p.proc.stdout and select.select([p.proc.stdout], [], [], 5)[0], "it was not continued"
    assert p.proc.stdout.readline().startswith("ok")


def test_arrays_are_counted_by_their_descriptor(daemon, progs):
    p = progs()
    p.ok(f"array a 1000 500 {FLOAT} 4")  # 8,000,000 bytes
    p.ok(f"array3d b 100 100 10 {UINT8} 1 0")  # 100,000
    p.ok(f"array3d c 64 64 6 {HALF} 2 1")  # layered: 98,304
    p.ok(f"mipmap m 256 256 0 {FLOAT} 4 9")  # 1,398,096 over its 9 levels
    p.ok(f"array3d d 8192 8192 0 {FLOAT} 4 0x80")  # deferred: no memory of its own
    row = daemon.row(p.pid)
    assert (row["device_bytes"], row["allocs"], row["frees"]) == (9_596_400, 4, 0)
    p.ok("destroy a")
    p.ok("destroy m")
    p.ok("destroy d")
    row = daemon.row(p.pid)
    assert (row["device_bytes"], row["allocs"], row["frees"]) == (198_304, 4, 2)


def test_graph_memory_counts_from_instantiation_to_exec_destruction(daemon, progs):
    p = progs()
    p.ok("graphcreate g")
    p.ok("galloc g y 4M 0")
    p.ok("gfree g y")
    p.ok("stream s")
    p.ok("capture s")
    p.ok("salloc x 6M s")  # a node of the graph being captured, not an allocation
    p.ok("sfree x s")
    p.ok("endcapture s h")
    p.ok("async z 1M")  # outside any capture: an allocation
    assert daemon.row(p.pid)["device_bytes"] == MiB
    p.ok("instantiate e g")
    p.ok("instantiate f h")
    assert daemon.row(p.pid)["device_bytes"] == 11 * MiB
    p.ok("destroy g")  # execs keep what their graphs gave them
    p.ok("destroy h")
    p.ok("glaunch e 2")
    assert daemon.row(p.pid)["device_bytes"] == 11 * MiB
    p.ok("destroy e")
    assert daemon.row(p.pid)["device_bytes"] == 7 * MiB
    p.ok("destroy f")
    p.ok("freeasync z")
    row = daemon.row(p.pid)
    assert (row["device_bytes"], row["allocs"], row["frees"]) == (0, 3, 3)


def test_memory_shared_by_ipc_is_counted_once_and_unswappable_while_open(daemon, iprogs, fakecuda):
    env = {"GPUWATCH_SOCKET": daemon.socket}
    a, b = iprogs(env=env), iprogs(env=env)
    wait_for(lambda: daemon.watching(fakecuda / "libcuda.so.1"), 10, "the daemon to watch the driver")
    for p in (a, b):
        wait_for(lambda p=p: any(r["interposed"] for r in daemon.ps(p.pid)), 10, "the interposer to attach")
    a.ok("alloc x 3M")  # a region of 4 MiB
    a.ok("alloc y 5M")  # 6 MiB
    b.ok(f"ipcopen x {a.ok('ipcget x')[0]} 3M")

    def held(p: Prog) -> tuple[int, int, int]:
        rows = daemon.ps(p.pid)
        return (sum(r["device_bytes"] for r in rows), sum(r["swappable_bytes"] for r in rows),
                sum(r["unswappable_bytes"] for r in rows))

    wait_for(lambda: held(a) == (10 * MiB, 6 * MiB, 4 * MiB), 5, "ps to show x unswappable")
    assert held(b) == (0, 0, 0)
    b.ok("ipcclose x")
    wait_for(lambda: held(a) == (10 * MiB, 10 * MiB, 0), 5, "ps to show x swappable again")


def test_a_quota_stops_a_process_before_an_array_or_an_exec_past_it(daemon, progs):
    p = progs()
    quota_set(daemon, "--pid", str(p.pid), "8MiB")
    stopped_before(p, f"array a 2048 2048 {FLOAT} 4")  # 64 MiB
    quota_set(daemon, "--pid", str(p.pid), "1G")
    continued(p)
    quota_set(daemon, "--pid", str(p.pid), "8MiB")
    p.ok("graphcreate g")
    p.ok("galloc g y 16M 0")  # a node: no memory yet
    stopped_before(p, "instantiate e g")
    quota_set(daemon, "--pid", str(p.pid), "1G")
    continued(p)
    row = daemon.row(p.pid)
    assert (row["device_bytes"], row["quota_pauses"]) == (80 * MiB, 2)


def test_run_takes_v_and_socket_after_the_command(tmp_path):
    r = subprocess.run([*GPUWATCH, "run", "-v", "--socket", str(tmp_path / "gw.sock"), "--ebpf"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "int gw_dispatch(struct pt_regs *ctx)" in r.stdout, r.stderr
    r = subprocess.run([*GPUWATCH, "run", "--ebpf", "-v", "--no-such-option"], capture_output=True, text=True,
                       timeout=60)
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr == "gpuwatch: unrecognized arguments: --no-such-option\n"
