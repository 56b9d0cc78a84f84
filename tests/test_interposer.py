"""The interposer (libgpuwatch.so) against its contract (docs/interposer.md): real processes preload it over
the test-double driver, whose VMM emulation (a memfd per handle, mapped into reserved ranges) makes swapped
memory really unreachable and really come back. Quotas, memory info, lookups, sub-allocation, swapping,
the gate and the daemon protocol, with a fake daemon."""
from __future__ import annotations

import struct
import time

import pytest

from conftest import wait_for
from interposer_fixtures import FLAG_ATTACHED, FLAG_SWAP, MiB, IProg, driver_used

GiB = 1 << 30
QUOTA = 64 * MiB
LIMIT = {"GPUWATCH_MEM_LIMIT": str(QUOTA)}
NAME = ["13000", "42", "FakeCUDA", "Device", "0"]  # cuDriverGetVersion, cuFakeEcho(41), cuDeviceGetName


def frozen(p: IProg, spinner: str, settle: float = 0.05, hold: float = 0.2) -> int:
    """A spinner's iterations, once they have stopped: the same after `hold` seconds."""
    time.sleep(settle)  # a spinner may finish the iteration it was in
    before, work = p.spinning(spinner), p.counts()
    time.sleep(hold)
    assert (p.spinning(spinner), p.counts()) == (before, work), "work went on behind a closed gate"
    return before


def resumes(p: IProg, spinner: str, after: int, timeout: float = 3.0) -> int:
    """The CLOCK_MONOTONIC time at which a spinner was seen going again."""
    return int(wait_for(lambda: p.spinning(spinner) > after and time.clock_gettime_ns(time.CLOCK_MONOTONIC),
                        timeout, f"spinner {spinner} to go on"))


# ---- the page and the in-process API

def test_page_header_and_in_process_api(iprogs):
    p = iprogs(env={**LIMIT, "GPUWATCH_PRIORITY": "low"})
    h = p.page.header()
    assert (h["magic"], h["version"], h["pid"], h["max_devices"]) == (0x31535747, 1, p.pid, 16)
    assert (h["gate"], h["state"], h["priority"], h["flags"], h["lease_deadline_ns"]) == (0, 0, 0, FLAG_SWAP, 0)
    assert [p.page.device(d)["quota"] for d in range(16)] == [QUOTA] * 16
    assert p.ok("gwshm") == ["0x31535747", str(p.pid)]
    plain = iprogs(preload=False)
    assert plain.send("gwpause") == "err -1 no interposer"


# ---- quota: exactly the quota succeeds, a byte more is CUDA_ERROR_OUT_OF_MEMORY, on every path

@pytest.mark.parametrize("cmd", ["alloc", "async", "asyncptsz", "pool", "poolptsz", "managed"])
def test_quota_refusal_on_each_path(iprogs, tmp_path, cmd):
    state = tmp_path / "gpu"
    p = iprogs(env={**LIMIT, "FAKECUDA_SHARED_STATE": str(state)})
    p.ok(f"{cmd} a 64M")
    assert p.err(f"{cmd} b 1") == 2
    assert driver_used(state) == (0 if cmd == "managed" else QUOTA), "a refused call reached the driver"
    p.ok("free a")
    assert p.err(f"{cmd} c {QUOTA + 1}") == 2
    p.ok(f"{cmd} d 64M")
    assert p.page.device()["used"] == QUOTA
    assert p.page["quota_refusals"] == 2


def test_quota_refusal_pitched(iprogs):
    p = iprogs(env=LIMIT)
    assert p.ok("pitch a 1M 64 4") == [str(MiB)]
    assert p.err("pitch b 512 1 4") == 2
    p.ok("free a")
    assert p.err("pitch c 1M 65 4") == 2
    assert p.ok("pitch d 1000 300 4") == ["1024"]
    assert p.page.device()["used"] == 2 * MiB  # 300 KiB: one chunk of the 512 KiB class


def test_quota_counts_own_vmm_memory_until_released_and_unmapped(iprogs):
    p = iprogs(env=LIMIT)
    p.ok("create h 64M 0")
    assert p.err("create g 2M 0") == 2
    p.ok("reserve r 64M")
    p.ok("map r 0 64M h")
    p.ok("release h")
    assert p.err("create g 2M 0") == 2, "released but still mapped: still held"
    assert p.err("alloc x 1") == 2
    p.ok("unmap r 0 64M")
    p.ok("create g 2M 0")
    p.ok("create k 64M 1")  # the quota is per GPU
    assert (p.page.device(0)["used"], p.page.device(1)["used"]) == (2 * MiB, QUOTA)
    assert p.page.device(0)["unswappable"] == 2 * MiB


def test_quota_spans_paths_and_counts_whole_chunks(iprogs):
    p = iprogs(env=LIMIT)
    p.ok("alloc a 30M")
    p.ok("async b 30M")
    p.ok("managed c 2M")
    p.ok("alloc s 4096")  # a new 2 MiB chunk: exactly the quota
    p.ok("alloc t 4096")  # the same chunk: nothing more to count
    assert p.page.device() == {"quota": QUOTA, "used": QUOTA, "swappable": 32 * MiB, "unswappable": 32 * MiB,
                               "swapped": 0}
    assert p.err("alloc u 8192") == 2  # another size class needs another chunk
    assert p.err("pool v 1") == 2
    assert p.ok("info") == ["0", str(QUOTA)]
    p.ok("free a")
    p.ok("pool v 30M")
    assert p.page.device()["used"] == QUOTA


def test_freed_small_allocations_give_their_quota_back(iprogs):
    # An empty chunk the library keeps for reuse is its own business: it must not refuse the program memory
    # the program has given back.
    p = iprogs(env=LIMIT)
    p.ok("alloc a 62M")
    p.ok("alloc s 4096")
    p.ok("free s")
    p.ok("async b 2M")
    assert p.page.device()["used"] == QUOTA


@pytest.mark.parametrize("how", ["dlsym", "default", "proc", "proc2"])
def test_quota_through_every_lookup(iprogs, how):
    p = iprogs(env=LIMIT)
    p.ok(f"allocvia {how} 0 a 64M")
    assert p.err(f"allocvia {how} 0 b 1") == 2
    assert p.page["quota_refusals"] == 1


@pytest.mark.parametrize("real", ["named", "found"])
def test_quota_in_a_program_linked_to_the_driver(iprogs, real):
    # found: no GPUWATCH_REAL_LIBCUDA, the default libcuda.so.1 is the one the program loaded (by its rpath)
    p = iprogs(env={**LIMIT, **({"GPUWATCH_REAL_LIBCUDA": ""} if real == "found" else {})}, linked=True)
    assert p.ok("resolve default cuMemAlloc_v2 0") == ["libgpuwatch.so", "cuMemAlloc_v2"]
    p.ok("alloc a 60M")
    p.ok("async b 4M")
    assert p.err("alloc c 1") == 2
    assert p.err("asyncptsz d 1") == 2
    assert p.ok("info") == ["0", str(QUOTA)]
    assert p.ok("unknown default 0") == NAME


# ---- what the process is told about memory

def test_memory_info_is_the_quota_view(iprogs):
    p = iprogs(env={**LIMIT, "FAKECUDA_MEM_BYTES": "1G"})
    assert p.ok("info") == [str(QUOTA), str(QUOTA)]
    assert p.ok("totalmem 0") == p.ok("totalmem 1") == [str(QUOTA)]
    p.ok("alloc a 3M")  # 4 MiB of physical memory
    p.ok("alloc b 5000")  # a 2 MiB chunk
    assert p.page.device() == {"quota": QUOTA, "used": 6 * MiB, "swappable": 6 * MiB, "unswappable": 0,
                               "swapped": 0}
    assert p.ok("info") == [str(QUOTA - 6 * MiB), str(QUOTA)]
    p.ok("async c 10M")
    assert p.page.device()["unswappable"] == 10 * MiB
    assert p.ok("info") == [str(QUOTA - 16 * MiB), str(QUOTA)]
    p.ok("free a")
    assert p.ok("info") == [str(QUOTA - 12 * MiB), str(QUOTA)]


def test_memory_info_without_a_quota_is_the_drivers(iprogs):
    p = iprogs(env={"FAKECUDA_MEM_BYTES": "1G"})
    p.ok("alloc a 3M")
    assert p.ok("info") == [str(GiB - 4 * MiB), str(GiB)]  # the driver holds the rounded 4 MiB
    assert p.ok("totalmem 0") == [str(GiB)]
    assert p.page.device() == {"quota": 0, "used": 4 * MiB, "swappable": 4 * MiB, "unswappable": 0, "swapped": 0}


def test_memory_info_is_the_smaller_of_quota_and_device(iprogs, tmp_path):
    gpu = {"FAKECUDA_MEM_BYTES": "1G", "FAKECUDA_SHARED_STATE": str(tmp_path / "gpu")}
    other = iprogs(env=gpu, preload=False)  # another process on the same emulated GPU
    other.ok("alloc x 900M")
    p = iprogs(env={**gpu, "GPUWATCH_MEM_LIMIT": str(512 * MiB)})
    assert p.ok("info") == [str(124 * MiB), str(512 * MiB)]
    big = iprogs(env={**gpu, "GPUWATCH_MEM_LIMIT": str(2 * GiB)})
    assert big.ok("info") == [str(124 * MiB), str(GiB)]
    assert big.ok("totalmem 0") == [str(GiB)]


def test_address_range_is_the_allocations_own(iprogs):
    p = iprogs()
    p.ok("alloc b 5000")
    assert p.ok("range b 0") == p.ok("range b 4999") == ["0", "5000"]
    p.ok("allocmany s 3 4096")
    assert p.ok("range s2 100") == ["0", "4096"]
    p.ok("alloc a 3M")
    assert p.ok("range a 3145727") == ["0", str(3 * MiB)]
    p.ok("pitch p 1000 300 4")
    assert p.ok("range p 1024") == ["0", "307200"]
    p.ok("async c 1M")  # the driver's own answer
    assert p.ok("range c 10") == ["0", str(MiB)]


def test_ipc_handles_for_memory_that_moves_and_memory_that_cannot(iprogs):
    p = iprogs()
    p.ok("alloc a 3M")
    assert p.ok("ipcget a")[0][:12] == b"GWIPC1".hex()  # ours: tests/test_compat_ipc.py opens it elsewhere
    p.ok("async b 1M")
    assert bytes.fromhex(p.ok("ipcget b")[0]).startswith(b"fakecuda-ipc ")  # the driver's own
    q = iprogs(env={"GPUWATCH_SWAP": "0"})
    q.ok("alloc a 3M")
    assert bytes.fromhex(q.ok("ipcget a")[0]).startswith(b"fakecuda-ipc ")


# ---- sub-allocation

def test_thousand_small_allocations_share_two_chunks(iprogs):
    p = iprogs(env=LIMIT)
    align, overlaps = map(int, p.ok("allocmany s 1000 4096"))
    assert overlaps == 0 and align >= 256, (align, overlaps)  # align: a power of two every pointer shares
    assert p.page.device()["used"] == 4 * MiB
    assert p.ok("info") == [str(QUOTA - 4 * MiB), str(QUOTA)]
    align, overlaps = map(int, p.ok("allocmany t 300 1"))  # the 256-byte class
    assert overlaps == 0 and align >= 256, (align, overlaps)
    align, overlaps = map(int, p.ok("allocmany u 50 20000"))  # the 32 KiB class: 64 to a chunk
    assert overlaps == 0 and align >= 256, (align, overlaps)
    assert p.page.device()["used"] == 8 * MiB
    assert p.ok("fill * 11") == ["1350"]
    assert p.ok("check * 11") == ["1350"], "allocations alias"
    assert p.ok("freeall s") == ["1000"]
    align, overlaps = map(int, p.ok("allocmany r 1000 4096"))  # the freed room serves again
    assert overlaps == 0 and align >= 256, (align, overlaps)
    assert p.page.device()["used"] == 8 * MiB
    assert p.ok("fill r* 12") == ["1000"]
    assert p.ok("check t* 11") == ["300"]
    assert p.ok("check u* 11") == ["50"]


# ---- lookups: exported names, dlsym, dlvsym, cuGetProcAddress (both), _ptsz; unknown functions pass

@pytest.mark.parametrize("how,symbol,flags,expected", [
    ("proc", "cuMemAlloc", 0, "libgpuwatch.so cuMemAlloc_v2"),
    ("proc2", "cuMemAlloc", 0, "libgpuwatch.so cuMemAlloc_v2"),
    ("proc", "cuLaunchKernel", 0, "libgpuwatch.so cuLaunchKernel"),
    ("proc", "cuLaunchKernel", 2, "libgpuwatch.so cuLaunchKernel_ptsz"),
    ("proc2", "cuLaunchKernel", 2, "libgpuwatch.so cuLaunchKernel_ptsz"),
    ("proc2", "cuMemcpyHtoDAsync", 0, "libgpuwatch.so cuMemcpyHtoDAsync_v2"),
    ("proc2", "cuMemcpyHtoDAsync", 2, "libgpuwatch.so cuMemcpyHtoDAsync_v2_ptsz"),
    ("proc2", "cuMemAllocAsync", 2, "libgpuwatch.so cuMemAllocAsync_ptsz"),
    ("proc", "cuGraphLaunch", 2, "libgpuwatch.so cuGraphLaunch_ptsz"),
    ("proc2", "cuMemsetD8Async", 2, "libgpuwatch.so cuMemsetD8Async_ptsz"),
    ("proc2", "cuMemPrefetchAsync", 2, "libgpuwatch.so cuMemPrefetchAsync_ptsz"),
    ("proc2", "cuLaunchHostFunc", 2, "libgpuwatch.so cuLaunchHostFunc_ptsz"),
    ("proc2", "cuMemcpy2D", 0, "libgpuwatch.so cuMemcpy2D_v2"),
    ("proc2", "cuMemFree", 0, "libgpuwatch.so cuMemFree_v2"),
    ("proc2", "cuMemGetInfo", 0, "libgpuwatch.so cuMemGetInfo_v2"),
    ("proc2", "cuGetProcAddress", 0, "libgpuwatch.so cuGetProcAddress_v2"),
    ("dlsym", "cuMemAlloc_v2", 0, "libgpuwatch.so cuMemAlloc_v2"),
    ("dlsym", "cuLaunchKernel_ptsz", 0, "libgpuwatch.so cuLaunchKernel_ptsz"),
    ("dlsym", "cuGetProcAddress", 0, "libgpuwatch.so cuGetProcAddress"),
    ("default", "cuMemcpyDtoH_v2", 0, "libgpuwatch.so cuMemcpyDtoH_v2"),
    ("next", "cuMemAlloc_v2", 0, "libgpuwatch.so cuMemAlloc_v2"),  # the object after the program: ours
    # not hooked: the driver's own
    ("proc2", "cuEventRecord", 2, "libcuda.so.1 cuEventRecord_ptsz"),
    ("proc", "cuCtxGetCurrent", 0, "libcuda.so.1 cuCtxGetCurrent"),
    ("proc2", "cuDriverGetVersion", 0, "libcuda.so.1 cuDriverGetVersion"),
    ("proc2", "cuFakeEcho", 2, "libcuda.so.1 cuFakeEcho"),
    ("dlsym", "cuDeviceGetName", 0, "libcuda.so.1 cuDeviceGetName"),
    ("default", "cuFakeEcho", 0, "libcuda.so.1 cuFakeEcho"),
    ("next", "cuDriverGetVersion", 0, "libcuda.so.1 cuDriverGetVersion"),
])
def test_lookup_returns_the_wrapper_of_the_exact_variant(iprogs, how, symbol, flags, expected):
    p = iprogs()
    assert " ".join(p.ok(f"resolve {how} {symbol} {flags}")) == expected


def test_wrappers_from_every_lookup_are_the_working_ones(iprogs):
    p = iprogs(env={"GPUWATCH_REAL_LIBCUDA": ""})  # the driver is the library the program's lookups found
    p.ok("launchvia proc 0 2")
    p.ok("launchvia proc2 2 3")
    p.ok("launchvia dlsym 2 4")
    p.ok("launchvia default 0 5")
    assert p.counts()[0] == 14
    assert p.page.counts()[0] == 14  # each went through a wrapper that counted it
    assert p.err("resolve proc2 cuNoSuchFunction 0") == 500


@pytest.mark.parametrize("how", ["dlsym", "default", "proc", "proc2"])
def test_unknown_functions_pass_through(iprogs, how):
    p = iprogs()
    assert p.ok(f"unknown {how} 0") == NAME
    assert p.ok(f"unknown {how} 2") == NAME
    p.ok("submit events - 3")  # functions the library uses itself, called by the program


def test_dlvsym(iprogs, fakecuda):
    # A library whose functions carry a version (glibc's dlvsym finds no unversioned symbol, and crashes in
    # glibc 2.36 when asked for version "": check_match() compares the empty version's hash, 0, with the
    # unnamed version entries).
    p = iprogs(env=LIMIT, library=fakecuda / "versioned" / "libcuda.so.1")
    assert p.ok("resolve dlvsym@FAKECUDA_1 cuMemAlloc_v2 0") == ["libgpuwatch.so", "cuMemAlloc_v2"]
    assert p.ok("resolve dlvsym@FAKECUDA_1 cuLaunchKernel_ptsz 0") == ["libgpuwatch.so", "cuLaunchKernel_ptsz"]
    assert p.ok("resolve dlvsym@FAKECUDA_1 cuDriverGetVersion 0") == ["libcuda.so.1", "cuDriverGetVersion"]
    assert p.send("resolve dlvsym@NOTTHIS cuMemAlloc_v2 0").startswith("err -1 ")
    assert p.ok("unknown dlvsym@FAKECUDA_1 0") == NAME
    p.ok("allocvia dlvsym@FAKECUDA_1 0 a 64M")
    assert p.err("allocvia dlvsym@FAKECUDA_1 0 b 1") == 2


# ---- swapping: out to host memory and back, every byte at the same address

def test_swap_round_trip_keeps_every_byte(iprogs, tmp_path):
    state = tmp_path / "gpu"
    p = iprogs(env={"FAKECUDA_SHARED_STATE": str(state)})
    p.ok("allocmany xs 3 4096")  # chunk of the 4 KiB class: 2 MiB
    p.ok("alloc xm 100K")  # 128 KiB class: 2 MiB
    p.ok("alloc xo 1M")  # 1 MiB class: 2 MiB
    p.ok("pitch xp 1000 300 4")  # 512 KiB class: 2 MiB
    p.ok("alloc xl1 3M")  # 4 MiB
    p.ok("alloc xl2 64M")  # 64 MiB
    p.ok("async xu 8M")  # unswappable
    p.ok("create h 4M 0")  # the program's own VMM memory: unswappable
    p.ok("reserve xr 4M")
    p.ok("map xr 0 4M h")
    swappable, unswappable = 76 * MiB, 12 * MiB
    assert p.page.device() == {"quota": 0, "used": swappable + unswappable, "swappable": swappable,
                               "unswappable": unswappable, "swapped": 0}
    assert driver_used(state) == swappable + unswappable
    assert p.ok("fill x* 1") == ["10"]
    p.ok("spin w verify xl1")  # a thread reading and comparing all along
    wait_for(lambda: p.spinning("w") > 5, 5, "the spinner to start")

    p.ok("gwswapout 0")
    h = p.page.header()
    assert (h["gate"], h["state"], h["swaps_out"], h["swap_out_bytes_total"]) == (1, 3, 1, swappable)
    assert p.page.device()["swapped"] == swappable
    assert driver_used(state) == unswappable, "swapped-out memory still held on the device"
    stopped = frozen(p, "w")

    p.ok("gwresume")
    h = p.page.header()
    assert (h["gate"], h["state"], h["swaps_in"], h["swap_in_bytes_total"]) == (0, 0, 1, swappable)
    assert p.page.device()["swapped"] == 0
    assert driver_used(state) == swappable + unswappable
    assert p.ok("check x* 1") == ["10"]
    resumes(p, "w", stopped)

    p.ok("gwswapout 4M")  # at least 4 MiB, in whole regions
    moved = p.page.device()["swapped"]
    assert 4 * MiB <= moved <= swappable and p.page["state"] == 3
    assert driver_used(state) == swappable + unswappable - moved
    p.ok("gwresume")
    assert p.ok("check x* 1") == ["10"]
    assert p.page.header()["swap_out_bytes_total"] == swappable + moved
    assert p.ok("spinstop w")[1:] == ["0", "0"], "the verifying thread saw an error or a wrong byte"


def test_frees_and_queries_while_swapped_out(iprogs, tmp_path):
    state = tmp_path / "gpu"
    p = iprogs(env={"FAKECUDA_SHARED_STATE": str(state)})
    p.ok("alloc a 3M")
    p.ok("alloc b 5M")
    p.ok("alloc s 4096")
    p.ok("alloc t 4096")
    assert p.ok("fill * 2") == ["4"]
    p.ok("gwswapout 0")
    assert (p.page.device()["swapped"], driver_used(state)) == (12 * MiB, 0)
    assert p.ok("range t 10") == ["0", "4096"]
    p.ok("free a")  # frees are never gated
    p.ok("free s")
    assert (p.page.device()["swapped"], driver_used(state)) == (8 * MiB, 0)
    p.ok("gwresume")
    assert driver_used(state) == 8 * MiB
    assert (p.ok("check b 2"), p.ok("check t 2")) == (["1"], ["1"])


def test_swap_covers_every_device_and_context(iprogs, tmp_path):
    state = tmp_path / "gpu"
    p = iprogs(env={"FAKECUDA_SHARED_STATE": str(state)})
    p.ok("alloc a0 3M")
    p.ok("alloc s0 5000")
    p.ok("thread t1 ctx 1")
    p.ok("thread t1 alloc a1 5M")  # 6 MiB on device 1
    p.ok("thread t1 alloc s1 100")
    p.ok("ctxcreate c2 0")  # a context of the program's own, current until popped
    p.ok("alloc a2 2M")
    p.ok("pop")
    assert p.ok("fill * 3") == ["5"]
    assert (driver_used(state, 0), driver_used(state, 1)) == (8 * MiB, 8 * MiB)
    p.ok("gwswapout 0")
    assert (p.page.device(0)["swapped"], p.page.device(1)["swapped"]) == (8 * MiB, 8 * MiB)
    assert (driver_used(state, 0), driver_used(state, 1)) == (0, 0)
    p.ok("gwresume")
    assert (driver_used(state, 0), driver_used(state, 1)) == (8 * MiB, 8 * MiB)
    assert p.ok("check * 3") == ["5"]
    p.ok("thread t1 free a1")
    assert p.page.device(1)["used"] == 2 * MiB


@pytest.mark.parametrize("env", [{"GPUWATCH_SWAP": "0"}, {"FAKECUDA_NO_VMM": "1"}], ids=["no-swap", "no-vmm"])
def test_without_vmm_backing_allocations_go_to_the_driver(iprogs, env):
    p = iprogs(env={**LIMIT, **env})
    p.ok("alloc a 3M")
    p.ok("alloc b 5000")
    used = 3 * MiB + 5000
    assert p.page.device() == {"quota": QUOTA, "used": used, "swappable": 0, "unswappable": used, "swapped": 0}
    if env.get("GPUWATCH_SWAP") == "0":
        assert p.page["flags"] & FLAG_SWAP == 0
    assert p.err(f"alloc c {QUOTA - used + 1}") == 2
    p.ok("ipc a")
    p.ok("fill * 5")
    p.ok("gwswapout 0")
    assert (p.page["swaps_out"], p.page.device()["swapped"]) == (0, 0)
    p.ok("gwresume")
    assert p.ok("check * 5") == ["2"]


# ---- the gate

GATED = ["launch", "launchptsz", "launchex", "graph", "hostfunc", "memset", "memsetasync", "memset32", "copy",
         "copyhtod", "prefetch", "copy2d", "alloc"]


@pytest.mark.parametrize("kind", GATED)
def test_gate_stops_work_and_lets_it_go_again(iprogs, kind):
    p = iprogs()
    p.ok("alloc o 1M")
    p.ok(f"spin w {kind} o")
    wait_for(lambda: p.spinning("w") > 10, 5, "the spinner to start")
    p.ok("gwpause")
    h = p.page.header()
    assert (h["gate"], h["state"]) == (1, 1)
    stopped = frozen(p, "w")
    p.ok("gwresume")
    assert (p.page["gate"], p.page["state"]) == (0, 0)
    resumes(p, "w", stopped)
    assert p.page["gate_waits"] >= 1 and p.page["gate_wait_ns_total"] >= 200_000_000
    assert p.ok("spinstop w")[1:] == ["0", "0"]


def test_synchronization_and_frees_pass_a_closed_gate(iprogs):
    p = iprogs()
    p.ok("alloc o 3M")
    p.ok("spin w sync o")
    p.ok("gwpause")
    n = p.spinning("w")
    wait_for(lambda: p.spinning("w") > n + 10, 2, "synchronization behind a closed gate")
    p.ok("free o")
    assert p.page.device()["used"] == 0
    p.ok("gwresume")
    assert p.ok("spinstop w")[1:] == ["0", "0"]


def test_launch_counts_per_thread_slot(iprogs):
    p = iprogs()
    p.ok("launch 5")
    p.ok("launchptsz 2")
    p.ok("launchex 3")
    p.ok("coop 1")
    p.ok("graph 4")
    p.ok("alloc a 1M")
    p.ok("submit copy a 3")
    assert p.page.counts() == (11, 4, 3)
    p.ok("thread t1 ctx 0")
    p.ok("thread t1 launch 7")
    slots = p.page.slots()
    assert sorted(s[2] for s in slots if s[2]) == [7, 11]
    assert any(s[1] == p.pid and s[2] == 11 for s in slots)  # the main thread's slot holds its tid


# ---- the daemon

def test_attach_handshake(iprogs, fake_daemons):
    d = fake_daemons()
    p = iprogs(env={**LIMIT, "GPUWATCH_SOCKET": str(d.path), "GPUWATCH_PRIORITY": "high"})
    attach = d.accept()
    assert {k: v for k, v in attach.items() if k != "shm_fd"} == {
        "cmd": "interposer_attach", "version": 1, "mem_limit": QUOTA, "priority": "high", "swap": True}
    assert d.pid == p.pid
    assert d.page and (d.page["magic"], d.page["pid"], d.page["priority"]) == (0x31535747, p.pid, 2)
    wait_for(lambda: d.page and d.page["flags"] & FLAG_ATTACHED, 2, "the attached flag")
    assert d.page.device() == p.page.device()


def test_daemon_requests(iprogs, fake_daemons):
    d = fake_daemons()
    p = iprogs(env={"GPUWATCH_SOCKET": str(d.path)})
    d.accept()
    p.ok("alloc a 3M")
    p.ok("fill a 1")
    p.ok("spin w verify a")
    wait_for(lambda: p.spinning("w") > 5, 5, "the spinner to start")
    assert d.request("pause") | {"bytes": 0} == {"id": 1, "ok": True, "state": "paused", "bytes": 0}
    stopped = frozen(p, "w")
    reply = d.request("swap_out", bytes=0)
    assert (reply["ok"], reply["state"], reply["bytes"]) == (True, "swapped", 4 * MiB)
    assert p.page.device()["swapped"] == 4 * MiB
    assert d.request("resume")["state"] == "running"
    resumes(p, "w", stopped)
    assert d.request("quota", bytes=8 * MiB)["ok"] is True
    assert p.page.device()["quota"] == 8 * MiB
    assert p.err(f"alloc b {4 * MiB + 1}") == 2
    p.ok("alloc b 4M")
    reply = d.request("no_such_op")
    assert reply["ok"] is False and reply["error"]
    assert d.request("pause")["ok"] is True  # the connection goes on
    assert d.request("resume")["ok"] is True
    assert p.ok("spinstop w")[1:] == ["0", "0"]


def test_fail_open_when_the_daemon_dies(iprogs, fake_daemons):
    d = fake_daemons(lease_ms=1000)
    p = iprogs(env={"GPUWATCH_SOCKET": str(d.path)})
    d.accept()  # no lease_deadline_ns written: only the closed connection can let the process go
    p.ok("alloc a 3M")
    p.ok("fill a 1")
    p.ok("spin w verify a")
    wait_for(lambda: p.spinning("w") > 5, 5, "the spinner to start")
    assert d.request("swap_out", bytes=0)["state"] == "swapped"
    stopped = frozen(p, "w")
    d.hang_up()
    died = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    assert resumes(p, "w", stopped, timeout=3) - died < 1_500_000_000, "not back within the lease"
    assert (p.page["state"], p.page["gate"], p.page["flags"] & FLAG_ATTACHED) == (0, 0, 0)
    assert p.ok("check a 1") == ["1"]
    assert p.ok("spinstop w")[1:] == ["0", "0"]
    assert d.accept(timeout=3)["cmd"] == "interposer_attach"  # it comes back to a daemon that does


def test_fail_open_when_the_lease_passes(iprogs, fake_daemons):
    d = fake_daemons()
    p = iprogs(env={"GPUWATCH_SOCKET": str(d.path)})
    d.accept()
    p.ok("spin w launch -")
    wait_for(lambda: p.spinning("w") > 5, 5, "the spinner to start")
    d.renew(period=0.1, lease=0.4)
    assert d.request("pause")["state"] == "paused"
    stopped = frozen(p, "w", hold=0.8)  # twice the lease: renewals keep it paused
    d.stop_renewing()
    assert d.page
    deadline = d.page["lease_deadline_ns"]
    back = resumes(p, "w", stopped, timeout=3)
    assert deadline <= back < deadline + 1_000_000_000
    assert (p.page["state"], p.page["gate"]) == (0, 0)
    assert p.page["flags"] & FLAG_ATTACHED  # the connection stays


def test_attaches_to_a_daemon_that_starts_later(iprogs, fake_daemons, tmp_path):
    path = tmp_path / "late.sock"
    p = iprogs(env={"GPUWATCH_SOCKET": str(path)})
    p.ok("alloc a 1M")
    time.sleep(0.3)
    d = fake_daemons(path=path)
    start = time.monotonic()
    d.accept(timeout=3)
    assert time.monotonic() - start < 2.5
    assert d.pid == p.pid


# ---- the test double itself

def test_fake_driver_refuses_unmapped_vmm_memory_and_shares_capacity(iprogs, tmp_path):
    gpu = {"FAKECUDA_MEM_BYTES": "1G", "FAKECUDA_SHARED_STATE": str(tmp_path / "gpu")}
    p = iprogs(env=gpu, preload=False)
    p.ok("create h 2M 0")
    p.ok("reserve r 4M")
    p.ok("map r 0 2M h")
    assert p.err("write r 1") == 1  # half of it unmapped: CUDA_ERROR_INVALID_VALUE, not SIGSEGV
    assert p.err("read r") == 1
    assert p.ok("attr 102 0") == ["1"]
    p.ok("alloc a 600M")
    q = iprogs(env={**gpu, "FAKECUDA_NO_VMM": "1"}, preload=False)
    assert q.ok("attr 102 0") == ["0"]
    assert q.ok("info") == [str(GiB - 602 * MiB), str(GiB)]
    assert q.err("alloc b 600M") == 2


def test_bounded_launch_queue_on_request(iprogs, fake_daemons):
    """`bound` sets the gate's second bit: launches then mark their stream every n and wait for the mark
    before last (events); the work goes on without error, and `bound` off clears it."""
    d = fake_daemons()
    p = iprogs(env={"GPUWATCH_SOCKET": str(d.path)})
    d.accept()
    p.ok("spin l launch -")
    assert d.request("bound", on=True)["ok"] is True
    wait_for(lambda: p.page["gate"] == 2, 2, "the gate's bounded bit")
    before = p.spinning("l")
    wait_for(lambda: p.spinning("l") > before + 500, 10, "launches to go on while bounded")
    assert d.request("bound", on=False)["ok"] is True
    wait_for(lambda: p.page["gate"] == 0, 2, "the bit to clear")
    assert p.ok("spinstop l")[1:] == ["0", "0"]


def test_allocation_waits_for_room_while_a_daemon_is_attached(iprogs, fake_daemons, tmp_path):
    """The device is full (not the quota): the allocation waits, shows in wanted_bytes, and is tried again at
    `resume`; `no_room` makes it fail with the driver's 2."""
    shared = tmp_path / "state"
    d = fake_daemons(room=True)
    env = {"GPUWATCH_SOCKET": str(d.path), "FAKECUDA_SHARED_STATE": str(shared), "FAKECUDA_MEM_BYTES": str(8 * MiB),
           "FAKECUDA_DEVICES": "1"}
    p = iprogs(env=env)
    d.accept()
    other = iprogs(env={**env, "GPUWATCH_SOCKET": ""})
    other.ok("alloc x 6M")  # another process holds most of the device
    p.proc.stdin.write("alloc a 4M\n")
    p.proc.stdin.flush()
    wanted = struct.Struct("<Q")
    wait_for(lambda: wanted.unpack_from(p.page.map, 120)[0] == 4 * MiB, 5, "the allocation to wait for room")
    assert d.request("resume")["ok"] is True  # no room yet: it waits again
    wait_for(lambda: wanted.unpack_from(p.page.map, 120)[0] == 4 * MiB, 5, "it to wait again")
    other.ok("free x")
    assert d.request("resume")["ok"] is True
    assert p.proc.stdout.readline().split()[0] == "ok"  # the allocation went through
    p.proc.stdin.write("alloc b 6M\n")
    p.proc.stdin.flush()
    wait_for(lambda: wanted.unpack_from(p.page.map, 120)[0] == 6 * MiB, 5, "the second to wait")
    assert d.request("no_room")["ok"] is True
    assert p.proc.stdout.readline().split() == ["err", "2"]


def test_allocation_fails_at_once_when_the_daemon_does_not_schedule(iprogs, fake_daemons, tmp_path):
    """A daemon without a scheduler (no `room` at attach) will not make room: a full device answers 2 at once."""
    d = fake_daemons()
    env = {"GPUWATCH_SOCKET": str(d.path), "FAKECUDA_SHARED_STATE": str(tmp_path / "state"),
           "FAKECUDA_MEM_BYTES": str(8 * MiB), "FAKECUDA_DEVICES": "1"}
    p = iprogs(env=env)
    d.accept()
    wait_for(lambda: p.page["flags"] & FLAG_ATTACHED, 2, "the attach")
    assert p.err("alloc a 10M") == 2
