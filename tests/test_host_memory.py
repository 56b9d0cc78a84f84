"""Host memory as a resource the daemon can see and take back (docs/interposer.md): the page's `pinned_bytes`
is the pinned host memory the library holds, `drop_host` gives it back when none of it holds swapped data,
and a swap-out that fails half way (pinning refused: FAKECUDA_PIN_LIMIT; a copy failing:
FAKECUDA_FAIL_DTOH_ASYNC) leaves the process as it was: running if it ran, its memory on the device, the
host memory pinned for the request given back."""
from __future__ import annotations

import time

import pytest

from conftest import wait_for
from gpuwatch.interposer.shm import SharedPage
from interposer_fixtures import FLAG_ATTACHED, MiB, FakeDaemon, IProg, find_memfd

pytestmark = pytest.mark.root

OOM, UNKNOWN = 2, 999


@pytest.fixture
def attached(iprogs, fake_daemons):
    """start(env) -> (program attached to a fake daemon, holding `a` (3 MiB, a 4 MiB region) filled, the daemon)."""

    def start(env: dict[str, str] | None = None) -> tuple[IProg, FakeDaemon]:
        d = fake_daemons()
        p = iprogs(env={"GPUWATCH_SOCKET": str(d.path), **(env or {})})
        d.accept()
        wait_for(lambda: p.page["flags"] & FLAG_ATTACHED, 2, "the attach")
        p.ok("alloc a 3M")
        p.ok("fill a 1")
        return p, d

    return start


def runs_at_once(p: IProg) -> None:
    """The gate is open: work and allocations go through without waiting."""
    assert (p.page["gate"], p.page["state"]) == (0, 0)
    t = time.monotonic()
    p.ok("launch 1")
    p.ok("alloc probe 1M")
    p.ok("free probe")
    assert time.monotonic() - t < 1.0, "work waited at the gate"


def failed(reply: dict, error: int, state: str) -> None:
    assert (reply["ok"], reply["error"], reply["state"]) == (False, f"CUDA error {error}", state), reply


def test_pinned_bytes_follow_swaps_and_drop_host_gives_them_back(attached):
    p, d = attached()
    assert p.page.pinned_bytes == 0
    assert d.request("drop_host") == {"id": 1, "ok": True, "state": "running", "bytes": 0}  # nothing to give

    reply = d.request("swap_out", bytes=0)
    assert (reply["ok"], reply["state"], reply["bytes"]) == (True, "swapped", 4 * MiB)
    pinned = p.page.pinned_bytes
    assert pinned >= 4 * MiB
    page = SharedPage.open(p.pid, int(find_memfd(p.pid)))  # the daemon's reader sees the same
    try:
        assert page.header().pinned_bytes == pinned
    finally:
        page.close()

    assert d.request("resume")["state"] == "running"
    assert p.page.pinned_bytes == pinned, "host memory is kept for the next swap-out"
    assert p.ok("check a 1") == ["1"]

    assert d.request("drop_host") == {"id": 4, "ok": True, "state": "running", "bytes": pinned}
    assert p.page.pinned_bytes == 0
    assert d.request("drop_host")["bytes"] == 0  # nothing left
    runs_at_once(p)

    # pinned again on the next swap-out; a paused (not swapped) process gives it back too, and stays paused
    assert d.request("swap_out", bytes=0)["bytes"] == 4 * MiB
    assert p.page.pinned_bytes == pinned
    assert d.request("resume")["state"] == "running"
    assert d.request("pause")["state"] == "paused"
    assert d.request("drop_host") == {"id": 9, "ok": True, "state": "paused", "bytes": pinned}
    assert (p.page["gate"], p.page["state"], p.page.pinned_bytes) == (1, 1, 0)
    assert d.request("resume")["state"] == "running"
    assert p.ok("check a 1") == ["1"]


def test_drop_host_while_swapped_out_frees_nothing(attached):
    p, d = attached()
    assert d.request("swap_out", bytes=0)["bytes"] == 4 * MiB
    pinned = p.page.pinned_bytes
    assert d.request("drop_host") == {"id": 2, "ok": True, "state": "swapped", "bytes": 0}
    assert p.page.pinned_bytes == pinned
    assert p.page.device()["swapped"] == 4 * MiB
    assert d.request("resume")["state"] == "running"
    assert p.ok("check a 1") == ["1"]
    assert d.request("drop_host")["bytes"] == pinned  # back on the device: now it can go
    assert p.page.pinned_bytes == 0


def test_swap_out_refused_host_memory_leaves_a_running_process_running(attached):
    p, d = attached({"FAKECUDA_PIN_LIMIT": str(MiB)})  # less than the 4 MiB region needs
    p.ok("spin w verify a")
    wait_for(lambda: p.spinning("w") > 5, 5, "the spinner to start")
    failed(d.request("swap_out", bytes=0), OOM, "running")
    h = p.page.header()
    assert (h["gate"], h["state"], h["swaps_out"], h["swap_out_bytes_total"]) == (0, 0, 0, 0)
    assert p.page.pinned_bytes == 0
    assert p.page.device()["swapped"] == 0
    runs_at_once(p)
    n = p.spinning("w")
    wait_for(lambda: p.spinning("w") > n + 5, 2, "the spinner to go on")
    assert p.ok("check a 1") == ["1"]
    assert p.ok("spinstop w")[1:] == ["0", "0"], "the verifying thread saw an error or a wrong byte"


def test_swap_out_refused_host_memory_leaves_a_paused_process_paused(attached):
    p, d = attached({"FAKECUDA_PIN_LIMIT": str(MiB)})
    assert d.request("pause")["state"] == "paused"
    failed(d.request("swap_out", bytes=0), OOM, "paused")
    assert (p.page["gate"], p.page["state"]) == (1, 1)
    assert p.page.pinned_bytes == 0
    assert p.page.device()["swapped"] == 0
    assert d.request("resume")["state"] == "running"
    assert p.ok("check a 1") == ["1"]
    runs_at_once(p)


def test_swap_out_failing_while_swapped_keeps_what_was_swapped(attached):
    p, d = attached({"FAKECUDA_PIN_LIMIT": str(100 * MiB)})
    p.ok("alloc big 64M")
    p.ok("fill big 2")
    reply = d.request("swap_out", bytes=4 * MiB)  # the largest region first: big, into one 64 MiB segment
    assert (reply["ok"], reply["state"], reply["bytes"]) == (True, "swapped", 64 * MiB)
    pinned = p.page.pinned_bytes
    assert 64 * MiB <= pinned <= 100 * MiB
    failed(d.request("swap_out", bytes=0), OOM, "swapped")  # `a` needs a second segment: past the limit
    assert (p.page["gate"], p.page["state"], p.page.pinned_bytes) == (1, 3, pinned)
    assert p.page.device()["swapped"] == 64 * MiB
    assert d.request("drop_host")["bytes"] == 0
    assert d.request("resume")["state"] == "running"
    assert p.ok("check big 2") == ["1"]
    assert p.ok("check a 1") == ["1"]
    assert d.request("drop_host")["bytes"] == pinned
    assert p.page.pinned_bytes == 0


def test_host_memory_pinned_for_a_failed_swap_out_is_given_back(attached):
    # Every device-to-host copy fails after the segment is pinned; the limit fits one segment only, so a
    # second attempt fails the same way (not for want of host memory) only if the first gave it back.
    p, d = attached({"FAKECUDA_FAIL_DTOH_ASYNC": "1", "FAKECUDA_PIN_LIMIT": str(64 * MiB)})
    for _ in range(2):
        failed(d.request("swap_out", bytes=0), UNKNOWN, "running")
        assert p.page.pinned_bytes == 0
        assert p.page.device()["swapped"] == 0
        runs_at_once(p)
    assert p.ok("check a 1") == ["1"]


def test_drop_host_makes_room_for_the_next_swap_out(attached):
    p, d = attached({"FAKECUDA_PIN_LIMIT": str(64 * MiB)})
    assert d.request("swap_out", bytes=0)["bytes"] == 4 * MiB
    assert d.request("resume")["state"] == "running"
    assert p.page.pinned_bytes == 64 * MiB
    p.ok("alloc big 64M")
    p.ok("fill big 2")
    # big fills the kept segment; `a` needs another, past the limit: nothing moves, the kept one stays
    failed(d.request("swap_out", bytes=0), OOM, "running")
    assert (p.page.pinned_bytes, p.page.device()["swapped"]) == (64 * MiB, 0)
    runs_at_once(p)
    assert p.ok("check big 2") == ["1"] and p.ok("check a 1") == ["1"]
    assert d.request("drop_host")["bytes"] == 64 * MiB
    assert p.page.pinned_bytes == 0
    p.ok("free big")
    reply = d.request("swap_out", bytes=0)  # the driver has the host memory back: pinning works again
    assert (reply["ok"], reply["bytes"]) == (True, 4 * MiB)
    assert d.request("resume")["state"] == "running"
    assert p.ok("check a 1") == ["1"]


def test_drop_host_takes_no_argument(attached):
    p, d = attached()
    assert d.request("swap_out", bytes=0)["ok"] is True
    assert d.request("resume")["ok"] is True
    pinned = p.page.pinned_bytes
    for line, reason in [("5 drop_host 0", "unexpected argument"), ("5 drop_host ", "unexpected argument"),
                         ("5 DROP_HOST", "unknown op"), ("5 drop_hostx", "unknown op")]:
        assert d.send_raw(line) == {"id": 5, "ok": False, "error": reason}, line
        assert p.page.pinned_bytes == pinned
    assert d.send_raw("6 drop_host") == {"id": 6, "ok": True, "state": "running", "bytes": pinned}
