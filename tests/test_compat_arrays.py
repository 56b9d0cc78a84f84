"""CUDA arrays and mipmapped arrays under the interposer: each counts its exact requirement (the test-double
driver's is the descriptor's bytes rounded up to 2 MiB, and answers it only for deferred arrays, as the real
driver) against the quota, unswappable, from creation to destruction; past the quota the creation fails with
CUDA_ERROR_OUT_OF_MEMORY before the driver is asked; deferred and sparse arrays take nothing."""
from __future__ import annotations

from interposer_fixtures import MiB, driver_used

QUOTA = 64 * MiB
OUT_OF_MEMORY = 2
FLOAT, UINT8, HALF = "0x20", "0x01", "0x10"
DEFERRED, LAYERED = "0x80", "1"


def test_arrays_count_their_requirement_against_the_quota(iprogs, tmp_path):
    state = tmp_path / "gpu"
    p = iprogs(env={"GPUWATCH_MEM_LIMIT": str(QUOTA), "FAKECUDA_SHARED_STATE": str(state)})
    p.ok(f"array a 1000 500 {FLOAT} 4")  # 8,000,000 bytes: 8 MiB
    p.ok(f"array3d b 100 100 10 {UINT8} 1 0")  # 100,000 bytes: 2 MiB
    p.ok(f"array3d c 64 64 6 {HALF} 2 {LAYERED}")  # 98,304 bytes: 2 MiB
    p.ok(f"mipmap m 256 256 0 {FLOAT} 4 9")  # 1,398,096 bytes over its 9 levels: 2 MiB
    p.ok(f"array3d d 8192 8192 0 {FLOAT} 4 {DEFERRED}")  # 1 GiB, deferred: no memory
    used = 14 * MiB
    assert p.page.device() == {"quota": QUOTA, "used": used, "swappable": 0, "unswappable": used, "swapped": 0}
    assert driver_used(state) == used
    assert p.err(f"array big 2048 2048 {FLOAT} 4") == OUT_OF_MEMORY  # 64 MiB
    assert driver_used(state) == used, "a refused array reached the driver"
    p.ok(f"array e 3200 1024 {FLOAT} 4")  # 50 MiB: the rest of the quota, exactly
    assert p.err(f"array f 1 1 {UINT8} 1") == OUT_OF_MEMORY  # one byte: 2 MiB
    assert p.page["quota_refusals"] == 2
    p.ok("destroy e")
    p.ok("destroy m")
    assert p.page.device()["used"] == driver_used(state) == 12 * MiB
    p.ok("destroy d")
    assert p.page.device()["used"] == 12 * MiB


def test_arrays_keep_their_bytes_and_stay_put_through_a_swap(iprogs):
    p = iprogs(env={"GPUWATCH_MEM_LIMIT": str(QUOTA)})
    p.ok(f"array a 1000 500 {FLOAT} 4")
    p.ok(f"array3d b 100 100 10 {UINT8} 1 0")
    p.ok("alloc x 3M")
    p.ok("fill * 21")
    p.ok("gwswapout 0")
    assert p.page.device()["swapped"] == 4 * MiB  # x only
    p.ok("gwresume")
    assert p.ok("check * 21") == ["3"]


def test_a_bad_descriptor_gets_the_drivers_answer(iprogs):
    p = iprogs(env={"GPUWATCH_MEM_LIMIT": str(QUOTA)})
    assert p.err(f"array z 0 10 {FLOAT} 4") == 1  # no width
    assert p.err("array z 10 10 0x77 4") == 1  # a format the test double does not know
    assert p.err(f"array z 10 10 {FLOAT} 3") == 1  # three channels
    assert p.page.device()["used"] == 0
