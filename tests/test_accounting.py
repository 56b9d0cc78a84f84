"""Exact per-process, per-GPU accounting through `gpuwatch ps --json`, real uprobes on the test double."""
from __future__ import annotations

import time

import pytest

from conftest import Daemon, Prog, wait_for

MiB = 1 << 20
GiB = 1 << 30


@pytest.mark.parametrize("kind", ["c", "python"])
def test_device_allocations_and_frees_are_exact(daemon, progs, kind):
    p = progs(kind)
    p.ok("alloc a 3M")
    p.ok("alloc b 5000")
    p.ok("alloc c 1G")
    row = daemon.row(p.pid)
    assert row["device_bytes"] == 3 * MiB + 5000 + GiB
    assert (row["allocs"], row["frees"], row["failed_allocs"]) == (3, 0, 0)
    p.ok("free b")
    row = daemon.row(p.pid)
    assert row["device_bytes"] == 3 * MiB + GiB
    assert row["frees"] == 1
    assert row["managed_bytes"] == row["host_pinned_bytes"] == 0


def test_free_on_another_thread_matches(daemon, progs):
    p = progs()
    p.ok("thread t1 ctx 0")
    p.ok("thread t1 alloc x 64M")
    p.ok("thread t2 ctx 0")
    p.ok("thread t2 alloc y 16M")
    assert daemon.row(p.pid)["device_bytes"] == 80 * MiB
    p.ok("thread t2 free x")
    p.ok("free y")
    row = daemon.row(p.pid)
    assert row["device_bytes"] == 0
    assert (row["allocs"], row["frees"]) == (2, 2)


def test_pitch_counts_pitch_times_height(daemon, progs):
    p = progs()
    pitch = int(p.ok("pitch img 1000 300 4")[0])
    assert pitch == 1024
    assert daemon.row(p.pid)["device_bytes"] == 1024 * 300
    p.ok("free img")
    assert daemon.row(p.pid)["device_bytes"] == 0


def test_async_and_pool_allocations(daemon, progs):
    p = progs()
    p.ok("async a 10M")
    p.ok("asyncptsz b 20M")
    p.ok("pool c 30M")
    assert daemon.row(p.pid)["device_bytes"] == 60 * MiB
    p.ok("freeasync b")
    p.ok("freeasync a")
    p.ok("free c")
    row = daemon.row(p.pid)
    assert (row["device_bytes"], row["allocs"], row["frees"]) == (0, 3, 3)


def test_managed_and_pinned_host_memory_counted_apart(daemon, progs):
    p = progs()
    p.ok("managed m 40M")
    p.ok("hostalloc h 6M")
    p.ok("allochost g 2M")
    row = daemon.row(p.pid)
    assert (row["device_bytes"], row["managed_bytes"], row["host_pinned_bytes"]) == (0, 40 * MiB, 8 * MiB)
    p.ok("free m")
    p.ok("freehost h")
    row = daemon.row(p.pid)
    assert (row["managed_bytes"], row["host_pinned_bytes"]) == (0, 2 * MiB)


def test_vmm_unmap_then_release(daemon, progs):
    p = progs()
    p.ok("create h 64M 0")
    p.ok("reserve r 128M")
    p.ok("map r 0 64M h")
    assert daemon.row(p.pid)["device_bytes"] == 64 * MiB
    p.ok("unmap r 0 64M")
    assert daemon.row(p.pid)["device_bytes"] == 64 * MiB, "physical memory stays until release"
    p.ok("release h")
    assert daemon.row(p.pid)["device_bytes"] == 0


def test_vmm_release_then_unmap_as_nccl_does(daemon, progs):
    p = progs()
    p.ok("create h1 32M 0")
    p.ok("create h2 32M 0")
    p.ok("reserve r 64M")
    p.ok("map r 0 32M h1")
    p.ok("map r 32M 32M h2")
    p.ok("release h1")
    p.ok("release h2")
    assert daemon.row(p.pid)["device_bytes"] == 64 * MiB, "mapped memory stays in use after release"
    p.ok("unmap r 0 64M")  # one unmap covering two mappings
    row = daemon.row(p.pid)
    assert (row["device_bytes"], row["allocs"], row["frees"]) == (0, 2, 2)


def test_vmm_handle_attributed_to_its_device(daemon, progs):
    p = progs()
    p.ok("create h 4M 1")
    assert daemon.row(p.pid, gpu=1)["device_bytes"] == 4 * MiB
    assert all(r["device_bytes"] == 0 for r in daemon.ps(p.pid) if r["gpu"] != 1)


def test_failed_allocation_counted_and_nothing_added(daemon, progs):
    p = progs(env={"FAKECUDA_MEM_BYTES": str(GiB)})
    p.ok("alloc a 600M")
    assert p.send("alloc b 600M") == "err 2"
    assert p.send("create h 2G 0").startswith("err 2")
    row = daemon.row(p.pid)
    assert (row["device_bytes"], row["allocs"], row["failed_allocs"]) == (600 * MiB, 1, 2)


def test_two_gpus_attributed_by_current_context(daemon, progs):
    p = progs()
    p.ok("alloc on0 1M")
    p.ok("ctx 1")
    p.ok("alloc on1 2M")
    p.ok("push 0")
    p.ok("alloc pushed0 4M")
    p.ok("pop")
    p.ok("alloc again1 8M")
    p.ok("ctxcreate mine 0")
    p.ok("alloc created0 16M")
    assert daemon.row(p.pid, gpu=0)["device_bytes"] == (1 + 4 + 16) * MiB
    assert daemon.row(p.pid, gpu=1)["device_bytes"] == (2 + 8) * MiB


def test_two_processes_counted_apart(daemon, progs):
    a, b = progs(), progs("python")
    a.ok("alloc x 7M")
    b.ok("alloc y 9M")
    assert daemon.row(a.pid)["device_bytes"] == 7 * MiB
    assert daemon.row(b.pid)["device_bytes"] == 9 * MiB


def test_exit_without_freeing_drops_the_process(daemon, progs):
    p = progs()
    p.ok("alloc leak 100M")
    assert daemon.row(p.pid)["device_bytes"] == 100 * MiB
    p.proc.stdin.write("exit 0\n")
    p.proc.stdin.flush()
    p.proc.wait(timeout=5)
    wait_for(lambda: not daemon.ps(p.pid), 2, "the exited process's rows to go")


def test_launches_graphs_and_copies_counted(daemon, progs):
    p = progs()
    p.ok("launch 100")
    p.ok("launchptsz 10")
    p.ok("launchex 5")
    p.ok("coop 3")
    p.ok("graph 7")
    p.ok("copy h2d 1000")
    p.ok("copy d2h 2000")
    p.ok("copy d2d 3000")
    p.ok("copy any 4000")
    row = daemon.row(p.pid)
    assert (row["launches"], row["graph_launches"], row["launches_estimated"]) == (118, 7, False)
    assert row["copy_bytes"] == {"h2d": 1000, "d2h": 2000, "d2d": 3000, "any": 4000}


def test_library_in_unusual_directory_loaded_after_start(daemon, progs, library_copy):
    assert not daemon.watching(library_copy)
    p = progs(library=library_copy, watch_timeout=1.0)  # the new inode is watched within 1 s of loading
    p.ok("alloc a 12M")
    p.ok("launch 4")
    row = daemon.row(p.pid)
    assert (row["device_bytes"], row["launches"]) == (12 * MiB, 4)


def test_gpu_uuid_comes_from_the_process_own_driver_query(daemon, progs):
    p = progs()
    p.ok("uuid 1")  # what cudart does for every device at start
    p.ok("ctx 1")
    p.ok("alloc a 1M")
    row = daemon.row(p.pid, gpu=1)
    assert row["gpu_uuid"] == "GPU-" + "-".join(
        b"fakecuda-dev0001".hex()[a:b] for a, b in ((0, 8), (8, 12), (12, 16), (16, 20), (20, 32)))


def test_sample_mode_scales_counts_and_marks_them_estimated(tmp_path, fakecuda, library_copy):
    d = Daemon(tmp_path, "--launches", "sample", "--sample-window-ms", "100", "--sample-period-ms", "400")
    p = Prog([str(fakecuda / "cudaprog")])
    try:
        p.ok(f"load {library_copy}")
        wait_for(lambda: d.watching(library_copy), 2, "attach")
        p.ok("ctx 0")
        p.ok("alloc a 1M")  # memory probes are always on
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            p.ok("launch 200")
        row = d.row(p.pid)
    finally:
        p.close()
        d.stop()
    assert row["launches_estimated"] is True and row["device_bytes"] == MiB
    assert row["launches"] > 0 and row["launches"] % 4 == 0, "raw counts scaled by period/window = 4"
