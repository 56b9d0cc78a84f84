"""The daemon's requests as the library reads them (docs/interposer.md, "Daemon protocol"): one line
`<id> <op>[ <arg>]`, parsed strictly. Every malformed line gets `ok: false` with a reason and the id when the id
parsed (else 0), changes nothing in the process, and the connection goes on: a valid request afterwards works."""
from __future__ import annotations

import json

import pytest

from conftest import wait_for
from interposer_fixtures import FLAG_ATTACHED, FLAG_BOUNDED, MiB, FakeDaemon, IProg

QUOTA = 64 * MiB
U64_MAX = (1 << 64) - 1

# (line, the id the answer carries)
MALFORMED = [
    # arguments
    ("1 swap_out", 1),
    ("1 swap_out ", 1),
    ("1 swap_out -5", 1),
    ("1 swap_out +5", 1),
    ("1 swap_out 99999999999999999999999", 1),
    (f"1 swap_out {U64_MAX + 1}", 1),
    ("1 swap_out 0x10", 1),
    ("1 swap_out 1e6", 1),
    ("1 swap_out 007", 1),
    ("1 swap_out  5", 1),
    ("1 swap_out 5 ", 1),
    ("1 swap_out 5 6", 1),
    ("1 quota", 1),
    ("1 quota -1", 1),
    ("1 quota 12MiB", 1),
    ("1 bound 2", 1),
    ("1 bound", 1),
    ("1 bound true", 1),
    ("1 bound 01", 1),
    ("1 pause extra", 1),
    ("1 pause ", 1),
    ("1 resume 0", 1),
    ("1 no_room 1", 1),
    # ops and spacing
    ("1  pause", 1),
    ("1 PAUSE", 1),
    ("1 pausex", 1),
    ("1 no_such_op", 1),
    ("1 ", 1),
    ("7 pause\r", 7),
    ("1 pause\x00", 1),
    ("1\tpause", 0),
    (" 1 pause", 0),
    # ids
    ("01 pause", 0),
    ("x pause", 0),
    ("0 pause", 0),
    ("-1 pause", 0),
    ("+1 pause", 0),
    (f"{U64_MAX + 1} pause", 0),
    ("pause", 0),
    ("1", 0),
    ("", 0),
    ('{"id": 1, "op": "pause"}', 0),  # the JSON requests of before
    # length
    ("1 swap_out " + "1" * 189, 1),  # 200 bytes
    ("1 pause " + "x" * 192, 1),
    ("1" * 200, 0),
    ("3 pause " + "x" * 10000, 3),  # longer than the library's read buffer
]


def snapshot(p: IProg) -> tuple:
    h = p.page.header()
    return (h["state"], h["gate"], h["flags"] & FLAG_BOUNDED, h["swaps_out"], h["swaps_in"],
            h["swap_out_bytes_total"], p.page.device())


@pytest.fixture
def attached(iprogs, fake_daemons) -> tuple[IProg, FakeDaemon]:
    d = fake_daemons()
    p = iprogs(env={"GPUWATCH_SOCKET": str(d.path), "GPUWATCH_MEM_LIMIT": str(QUOTA)})
    d.accept()
    wait_for(lambda: p.page["flags"] & FLAG_ATTACHED, 2, "the attach")
    p.ok("alloc a 3M")
    p.ok("fill a 1")
    return p, d


def refused(d: FakeDaemon, line: str, id_: int) -> None:
    reply = d.send_raw(line)
    assert reply["ok"] is False and isinstance(reply.get("error"), str) and reply["error"], (line, reply)
    assert reply["id"] == id_, (line, reply)


def test_malformed_lines_are_refused_and_change_nothing(attached):
    p, d = attached
    before = snapshot(p)
    for line, id_ in MALFORMED:
        refused(d, line, id_)
        assert snapshot(p) == before, f"{line!r} changed the process"
    assert p.ok("check a 1") == ["1"]
    reply = d.request("pause")  # the connection goes on
    assert (reply["id"], reply["ok"], reply["state"]) == (1, True, "paused")
    assert d.request("resume")["state"] == "running"


def test_malformed_lines_leave_a_paused_process_paused(attached):
    p, d = attached
    assert d.request("pause")["state"] == "paused"
    before = snapshot(p)
    for line, id_ in [("5 resume x", 5), ("5 resume ", 5), ("5  resume", 5), ("05 resume", 0), ("5 swap_out -1", 5),
                      ("5 swap_out", 5), ("5 quota 1.5", 5), ("5 no_room x", 5)]:
        refused(d, line, id_)
        assert snapshot(p) == before, f"{line!r} changed the process"
    reply = d.request("swap_out", bytes=0)
    assert (reply["ok"], reply["state"], reply["bytes"]) == (True, "swapped", 4 * MiB)
    assert d.request("resume")["state"] == "running"
    assert p.ok("check a 1") == ["1"]


def test_the_line_limit_is_80_bytes(attached):
    _, d = attached
    assert d.send_raw("1 " + "a" * 78)["error"] == "unknown op"  # 80 bytes: read, the op is unknown
    assert d.send_raw("1 " + "a" * 79)["error"] == "line too long"  # 81 bytes


def test_valid_requests_at_the_edges(attached):
    p, d = attached
    reply = d.send_raw(f"{U64_MAX} pause")
    assert (reply["id"], reply["ok"], reply["state"]) == (U64_MAX, True, "paused")
    assert d.send_raw("2 resume")["state"] == "running"
    assert d.send_raw(f"3 quota {U64_MAX}")["ok"] is True
    assert p.page.device()["quota"] == U64_MAX
    assert d.send_raw("4 quota 0")["ok"] is True  # no quota
    assert p.page.device()["quota"] == 0
    assert d.send_raw("5 bound 1")["ok"] is True
    wait_for(lambda: p.page["flags"] & FLAG_BOUNDED, 2, "the bounded flag")
    assert d.send_raw("6 bound 0")["ok"] is True
    wait_for(lambda: not p.page["flags"] & FLAG_BOUNDED, 2, "the bounded flag to clear")
    reply = d.send_raw(f"7 swap_out {U64_MAX}")
    assert (reply["ok"], reply["state"], reply["bytes"]) == (True, "swapped", 4 * MiB)
    assert d.send_raw("8 resume")["state"] == "running"
    assert d.send_raw("9 no_room") == {"id": 9, "ok": True, "state": "running", "bytes": 0}
    assert p.ok("check a 1") == ["1"]


def test_requests_in_one_write_are_answered_in_order(attached):
    _, d = attached
    assert d.conn
    d.conn.sendall(b"1 pause\n2 pause x\n3 resume\n" + b"y" * 5000 + b"\n4 pause\n5 resume\n")
    replies = [d.read_line() for _ in range(6)]
    got = [(r["id"], r["ok"]) for r in map(json.loads, replies)]
    assert got == [(1, True), (2, False), (3, True), (0, False), (4, True), (5, True)]
