"""CUDA IPC of memory the interposer can move (docs/interposer.md, "CUDA IPC"): two programs under the interposer,
over the test-double driver, share allocations through handles of the interposer's own; what another process
has open stays on the device while the rest swaps out, counted unswappable in the exporter's page (and nowhere
in the importer's), and moves again once it is closed or its importer exits. Handles the interposer cannot
serve, importers without it, stale, forged and own handles: one clear error, never a crash or wrong data."""
from __future__ import annotations

import select
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import launch, wait_for
from interposer_fixtures import MiB, IProg

QUOTA = 64 * MiB
LIMIT = {"GPUWATCH_MEM_LIMIT": str(QUOTA)}
INVALID_VALUE, INVALID_CONTEXT, NOT_SUPPORTED = 1, 201, 801


@pytest.fixture
def logged(fakecuda: Path, interposer: Path, tmp_path: Path) -> Iterator[Callable[..., tuple[IProg, Path]]]:
    """A cudaprog under the interposer (no daemon) whose stderr goes to a file: what the library told the user."""
    started: list[IProg] = []

    def start(name: str, env: dict[str, str] | None = None) -> tuple[IProg, Path]:
        lib, log = fakecuda / "libcuda.so.1", tmp_path / f"{name}.stderr"
        argv = ["sh", "-c", 'exec "$0" 2>"$1"', str(fakecuda / "cudaprog"), str(log)]
        full = {"GPUWATCH_SOCKET": "", "GPUWATCH_REAL_LIBCUDA": str(lib), "LD_PRELOAD": str(interposer), **(env or {})}
        return launch(IProg(argv, full), lib, 0, started), log

    yield start
    for p in started:
        p.close()


def said(log: Path) -> list[str]:
    return log.read_text().splitlines()


def no_reply(p: IProg, line: str, wait: float = 0.4) -> None:
    """Sends `line` and checks that it is still in progress `wait` seconds later."""
    assert p.proc.stdin and p.proc.stdout
    p.proc.stdin.write(line + "\n")
    p.proc.stdin.flush()
    assert not select.select([p.proc.stdout], [], [], wait)[0], "it answered at once"


def shared(iprogs, exporter_env: dict[str, str] | None = None) -> tuple[IProg, IProg, str]:
    """An exporter holding x (3 MiB: a region of 4) and y (5 MiB: 6), both filled; an importer with x open."""
    a, b = iprogs(env={**LIMIT, **(exporter_env or {})}), iprogs()
    a.ok("alloc x 3M")
    a.ok("alloc y 5M")
    a.ok("fill x 7")
    a.ok("fill y 8")
    handle = a.ok("ipcget x")[0]
    b.ok(f"ipcopen x {handle} 3M")
    return a, b, handle


def test_data_is_shared_both_ways_and_only_the_imported_allocation_stays_on_the_device(iprogs):
    a, b, _ = shared(iprogs)
    assert b.ok("check x 7") == ["1"]
    b.ok("fill x 9")
    assert a.ok("check x 9") == ["1"]
    assert a.page.device() == {"quota": QUOTA, "used": 10 * MiB, "swappable": 6 * MiB, "unswappable": 4 * MiB,
                               "swapped": 0}
    assert b.page.device()["used"] == 0  # counted once: in the exporter
    a.ok("gwswapout 0")
    assert (a.page.device()["swapped"], a.page["swap_out_bytes_total"]) == (6 * MiB, 6 * MiB)
    b.ok("fill x 11")  # the importer works on while the exporter is swapped out
    assert b.ok("check x 11") == ["1"]
    a.ok("gwresume")
    assert a.ok("check x 11") == a.ok("check y 8") == ["1"]
    b.ok("ipcclose x")
    assert a.page.device() == {"quota": QUOTA, "used": 10 * MiB, "swappable": 10 * MiB, "unswappable": 0,
                               "swapped": 0}
    a.ok("gwswapout 0")
    assert a.page.device()["swapped"] == 10 * MiB
    a.ok("gwresume")
    assert a.ok("check x 11") == ["1"]


def test_an_importer_that_exits_gives_the_allocation_back(iprogs):
    a, b, _ = shared(iprogs)
    assert a.page.device()["unswappable"] == 4 * MiB
    b.close()
    wait_for(lambda: a.page.device()["unswappable"] == 0, 5, "the exporter to see the importer gone")
    assert a.page.device()["swappable"] == 10 * MiB


def test_an_allocation_opened_twice_is_mapped_once_and_closed_twice(iprogs):
    a, b, handle = shared(iprogs)
    b.ok(f"ipcopen again {handle} 3M")
    assert b.ok("ptr again")[0] == b.ok("ptr x")[0]
    b.ok("ipcclose x")
    assert a.page.device()["unswappable"] == 4 * MiB
    assert b.ok("read again") == a.ok("read x")  # the same bytes
    b.ok("ipcclose again")
    assert a.page.device()["unswappable"] == 0
    assert b.send("ipcclose again") == "err -1 no suitable object named again"


def test_a_small_allocation_is_shared_with_its_chunk_and_its_own_range(iprogs):
    a, b = iprogs(env=LIMIT), iprogs()
    a.ok("alloc s 1000")
    a.ok("alloc t 1000")  # the same 2 MiB chunk
    a.ok("fill * 5")
    b.ok(f"ipcopen s {a.ok('ipcget s')[0]} 1000")
    b.ok(f"ipcopen t {a.ok('ipcget t')[0]} 1000")
    assert b.ok("check s 5") == b.ok("check t 5") == ["1"]
    assert b.ok("range s 999") == ["0", "1000"]
    assert a.page.device()["unswappable"] == 2 * MiB


def test_an_open_waits_while_the_exporter_is_swapped_out(iprogs):
    a, b = iprogs(env=LIMIT), iprogs()
    a.ok("alloc x 3M")
    a.ok("fill x 4")
    handle = a.ok("ipcget x")[0]
    a.ok("gwswapout 0")
    no_reply(b, f"ipcopen x {handle} 3M")
    a.ok("gwresume")
    assert b.proc.stdout and select.select([b.proc.stdout], [], [], 5)[0]
    assert b.proc.stdout.readline().strip() == "ok"
    assert b.ok("check x 4") == ["1"]
    assert a.page.device()["unswappable"] == 4 * MiB


def test_an_importer_without_the_interposer_is_refused_and_the_exporter_says_what_works(iprogs, logged):
    a, log = logged("exporter", LIMIT)
    a.ok("alloc x 3M")
    a.ok("fill x 6")
    handle = a.ok("ipcget x")[0]
    plain = iprogs(preload=False)
    assert plain.err(f"ipcopen x {handle} 3M") == INVALID_VALUE  # the driver does not know the handle
    lines = said(log)
    assert len(lines) == 1 and "`gpuwatch exec --no-swap`" in lines[0], lines
    a.ok("alloc y 3M")
    a.ok("ipcget y")
    assert said(log) == lines  # once
    no_swap = iprogs(env={"GPUWATCH_SWAP": "0"})  # under the interposer, with memory of its own not backed by VMM
    no_swap.ok(f"ipcopen x {handle} 3M")
    assert no_swap.ok("check x 6") == ["1"]


def test_memory_the_device_cannot_export_is_refused_naming_no_swap(logged):
    a, log = logged("exporter", {"FAKECUDA_NO_FD_HANDLES": "1"})
    a.ok("alloc x 3M")
    assert a.err("ipcget x") == NOT_SUPPORTED
    lines = said(log)
    assert len(lines) == 1 and "cannot be shared" in lines[0] and "`gpuwatch exec --no-swap`" in lines[0], lines
    a.ok("gwswapout 0")  # the memory itself moves as ever
    assert a.page.device()["swapped"] == 4 * MiB


def test_own_forged_stale_and_orphaned_handles(iprogs, logged):
    a, b, handle = shared(iprogs)
    assert a.err(f"ipcopen self {handle} 3M") == INVALID_CONTEXT  # as the driver answers a process's own handle
    forged = handle[:40] + ("0" if handle[40] != "0" else "1") + handle[41:]  # another nonce
    c, log = logged("importer")
    assert c.err(f"ipcopen x {forged} 3M") == INVALID_VALUE
    assert len(said(log)) == 1 and "cannot open memory shared by process" in said(log)[0]
    a.ok("alloc z 2M")
    z = a.ok("ipcget z")[0]
    a.ok("free z")
    assert c.err(f"ipcopen z {z} 2M") == INVALID_VALUE  # freed: its export ended
    assert b.ok("check x 7") == ["1"]  # what was open stays so
    a.close()
    assert c.err(f"ipcopen x {handle} 3M") == INVALID_VALUE  # the exporter is gone
    assert b.ok("check x 7") == ["1"]  # the importer's mapping holds the memory
    b.ok("ipcclose x")


def test_memory_the_driver_allocates_is_shared_by_the_driver(iprogs):
    a, b = iprogs(env=LIMIT), iprogs()
    a.ok("async m 1M")  # stream-ordered: never moved, exported by the driver's own IPC
    a.ok("fill m 3")
    handle = a.ok("ipcget m")[0]
    assert bytes.fromhex(handle).startswith(b"fakecuda-ipc ")
    b.ok(f"ipcopen m {handle} 1M")
    assert b.ok("check m 3") == ["1"]
    b.ok("fill m 4")
    assert a.ok("check m 4") == ["1"]
    b.ok("ipcclose m")


def test_event_ipc_passes_through(iprogs):
    a, b = iprogs(), iprogs()
    handle = a.ok("ipcevent e")[0]
    assert bytes.fromhex(handle).startswith(b"fakecuda-ipcevent ")
    b.ok(f"ipcopenevent e {handle}")
