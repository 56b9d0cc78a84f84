"""Graph memory under the interposer: memory alloc nodes and stream-ordered allocations captured into a graph
take memory from the driver's graph pool when an exec launches, and the pool keeps it until a trim. The
interposer counts the pool's reserved bytes (the driver's own figure) as unswappable; refuses a node or captured
allocation larger than the quota when it is made, and a launch that could grow the pool past the quota before it
runs, with CUDA_ERROR_OUT_OF_MEMORY; graph launches still pass the gate and are counted."""
from __future__ import annotations

from interposer_fixtures import MiB, driver_used

QUOTA = 64 * MiB
LIMIT = {"GPUWATCH_MEM_LIMIT": str(QUOTA)}
OUT_OF_MEMORY, INVALID_VALUE = 2, 1


def pool(p) -> list[int]:
    """The driver's graph pool on device 0: used, used high, reserved, reserved high."""
    return [int(v) for v in p.ok("graphmem 0")]


def captured(p, graph: str, size: str) -> None:
    """A graph made by capturing an allocation and its free on a stream."""
    p.ok(f"stream s{graph}")
    p.ok(f"capture s{graph}")
    p.ok(f"salloc {graph}x {size} s{graph}")
    p.ok(f"sfree {graph}x s{graph}")
    p.ok(f"endcapture s{graph} {graph}")


def test_the_pool_is_counted_from_the_first_launch_until_a_trim(iprogs, tmp_path):
    state = tmp_path / "gpu"
    p = iprogs(env={**LIMIT, "FAKECUDA_SHARED_STATE": str(state)})
    captured(p, "g", "10M")
    p.ok("instantiate e g")
    assert p.page.device()["used"] == 0  # nodes, not memory yet
    p.ok("glaunch e 3")
    assert pool(p) == [0, 10 * MiB, 10 * MiB, 10 * MiB]  # freed in the graph, kept by the pool
    assert p.page.device() == {"quota": QUOTA, "used": 10 * MiB, "swappable": 0, "unswappable": 10 * MiB,
                               "swapped": 0}
    assert p.page.counts()[1] == 3  # graph launches
    p.ok("trim 0")
    assert p.page.device()["used"] == driver_used(state) == 0
    p.ok("glaunch e 1")
    p.ok("destroy e")  # the pool keeps what it reserved
    assert p.page.device()["used"] == driver_used(state) == 10 * MiB
    p.ok("trim 0")
    assert p.page.device()["used"] == 0


def test_a_launch_that_could_grow_the_pool_past_the_quota_is_refused(iprogs, tmp_path):
    state = tmp_path / "gpu"
    p = iprogs(env={**LIMIT, "FAKECUDA_SHARED_STATE": str(state)})
    p.ok("alloc a 40M")
    p.ok("graphcreate g")
    p.ok("galloc g y 30M 0")
    p.ok("gfree g y")
    p.ok("instantiate e g")
    assert p.err("glaunch e 1") == OUT_OF_MEMORY
    assert (pool(p)[2], driver_used(state), p.page["quota_refusals"]) == (0, 40 * MiB, 1)
    p.ok("free a")
    p.ok("glaunch e 1")
    assert p.page.device()["used"] == 30 * MiB
    p.ok("alloc b 30M")  # the pool's 30 MiB and this: within the quota
    assert p.err("alloc c 6M") == OUT_OF_MEMORY  # graph memory counts against the quota like any
    p.ok("glaunch e 1")  # the pool has room for it already


def test_nodes_larger_than_the_quota_are_refused_when_made(iprogs):
    p = iprogs(env=LIMIT)
    p.ok("graphcreate g")
    assert p.err("galloc g y 65M 0") == OUT_OF_MEMORY
    p.ok("galloc g z 64M 0")
    p.ok("stream s")
    p.ok("capture s")
    assert p.err("salloc x 65M s") == OUT_OF_MEMORY
    p.ok("salloc w 20M s")
    assert p.page.device()["used"] == 0
    assert p.page["quota_refusals"] == 2


def test_a_graph_allocation_that_outlives_its_launch(iprogs):
    p = iprogs(env=LIMIT)
    p.ok("graphcreate g")
    p.ok("galloc g y 4M 0")  # no free node: the allocation stays after the launch
    p.ok("instantiate e g")
    p.ok("glaunch e 1")
    p.ok("fill y 5")
    assert p.ok("check y 5") == ["1"]
    assert p.err("glaunch e 1") == INVALID_VALUE  # the driver's answer: y is still allocated
    p.ok("free y")  # freed outside the graph
    p.ok("glaunch e 1")
    assert p.page.device()["used"] == 4 * MiB
