"""A switch between two interposed processes against the raw duplex copy, in one run (GPU machine, no root).

    python3 bench/switch_duplex.py [GIB] [ROUNDS]      # defaults: 32 GiB each, 3 rounds

PCIe is full duplex: a switch that moves one process out and another in can use both directions at once.
A filler process (plain PyTorch) takes the device but for room for one set of GIB 1-GiB tensors, so the
process coming in can map a piece only once the one going out has released one. Two children A and B run
under LD_PRELOAD=interposer/libgpuwatch.so (no daemon: GPUWATCH_SOCKET=""), each with GIB tensors filled and
checksummed; B starts swapped out. Host memory: both children keep their pinned buffers (2 x GIB) and the
filler pins 16 GiB: 80 GiB with the defaults, on a 128 GiB H200 host. Each round, in alternating order:
  - serial:  A swaps out, then B swaps in (what gpuwatch did before: 29 GB/s together on an H200);
  - overlap: B swaps out while A swaps in, started together (the daemon does this now);
and, in the filler, the raw copy: the same bytes host-to-device and device-to-host on two streams at once,
pinned (the physical limit), and each direction alone. GB/s count bytes moved in both directions over the
wall time of the switch. Checksums are verified after every round. JSON: $OUT/switch_duplex.json.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

from interposer_common import GiB, ROOT, child_env, ensure_library, out_dir, write_json

SCRIPT = str(ROOT / "bench" / "switch_duplex.py")


def holder(gib: int) -> None:
    """A child under the interposer: allocates and fills, then answers `out`, `in`, `check` on stdin."""
    import torch

    from interposer_common import Interposer, int_checksum
    ip = Interposer()
    tensors = [torch.full((GiB // 4,), i + 1, dtype=torch.int32, device="cuda") for i in range(gib)]
    torch.cuda.synchronize()
    expected = int_checksum(torch, tensors)
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        t0 = time.perf_counter()
        if cmd == "out":
            rc = ip.swap_out(0)
        elif cmd == "in":
            rc = ip.resume()
        elif cmd == "check":
            rc = 0 if int_checksum(torch, tensors) == expected else 1
        else:
            rc = -1
        print(json.dumps({"cmd": cmd, "rc": rc, "s": time.perf_counter() - t0}), flush=True)


def filler(leave_gib: int) -> None:
    """Plain PyTorch: takes the device but `leave_gib`, then measures the raw duplex copy on request."""
    import torch
    n = 8
    dev = [torch.empty(GiB, dtype=torch.uint8, device="cuda") for _ in range(2 * n)]
    free, _ = torch.cuda.mem_get_info()
    keep = torch.empty(max(free - leave_gib * GiB, 0), dtype=torch.uint8, device="cuda")
    host = [torch.empty(GiB, dtype=torch.uint8, pin_memory=True) for _ in range(2 * n)]
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    print("ready", flush=True)
    for line in sys.stdin:
        kind = line.strip()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        if kind in ("h2d", "duplex"):
            with torch.cuda.stream(s1):
                for i in range(n):
                    dev[i].copy_(host[i], non_blocking=True)
        if kind in ("d2h", "duplex"):
            with torch.cuda.stream(s2):
                for i in range(n, 2 * n):
                    host[i].copy_(dev[i], non_blocking=True)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        moved = n * GiB * (2 if kind == "duplex" else 1)
        print(json.dumps({"kind": kind, "GBps": moved / seconds / 1e9}), flush=True)
    del keep


class Child:
    def __init__(self, name: str, args: list[str], preload: bool) -> None:
        err = open(out_dir() / f"switch-{name}.stderr", "w")
        self.proc = subprocess.Popen([sys.executable, SCRIPT, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=err, text=True, env=child_env(preload), cwd=ROOT)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            raise SystemExit(f"{name} did not start: {line!r} (see {err.name})")

    def ask(self, cmd: str) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def together(*calls: tuple[Child, str]) -> tuple[float, list[dict[str, Any]]]:
    results: list[dict[str, Any]] = [{} for _ in calls]

    def one(i: int, child: Child, cmd: str) -> None:
        results[i] = child.ask(cmd)

    threads = [threading.Thread(target=one, args=(i, c, cmd)) for i, (c, cmd) in enumerate(calls)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, results


def main(gib: int = 32, rounds: int = 3) -> None:
    ensure_library()
    fill = Child("filler", ["filler", str(gib + 2)], preload=False)
    a = Child("a", ["holder", str(gib)], preload=True)
    assert a.ask("out")["rc"] == 0  # room for b's tensors while it starts
    b = Child("b", ["holder", str(gib)], preload=True)
    assert b.ask("out")["rc"] == 0 and a.ask("in")["rc"] == 0  # a resident, b swapped out
    moved = 2 * gib * GiB
    rows: list[dict[str, Any]] = []
    out_, in_ = b, a  # after each switch the roles change
    try:
        for r in range(rounds):
            for mode in (("serial", "overlap") if r % 2 == 0 else ("overlap", "serial")):
                out_, in_ = in_, out_
                if mode == "serial":
                    t0 = time.perf_counter()
                    rc = [out_.ask("out")["rc"], in_.ask("in")["rc"]]
                    seconds = time.perf_counter() - t0
                else:
                    seconds, res = together((out_, "out"), (in_, "in"))
                    rc = [x["rc"] for x in res]
                intact = a.ask("check")["rc"] == 0 if a is in_ else True
                intact = intact and (b.ask("check")["rc"] == 0 if b is in_ else True)
                raw = {k: fill.ask(k)["GBps"] for k in ("duplex", "h2d", "d2h")}
                rows.append({"round": r, "mode": mode, "rc": rc, "seconds": seconds, "GBps": moved / seconds / 1e9,
                             "intact": intact, **{f"raw_{k}_GBps": v for k, v in raw.items()}})
                print(json.dumps(rows[-1]), flush=True)
    finally:
        for c in (a, b, fill):
            c.close()
    summary = {m: statistics.median(x["GBps"] for x in rows if x["mode"] == m) for m in ("serial", "overlap")}
    summary["raw_duplex"] = statistics.median(x["raw_duplex_GBps"] for x in rows)
    summary["all_intact"] = all(x["intact"] and x["rc"] == [0, 0] for x in rows)
    print(json.dumps({"median_GBps": summary}), flush=True)
    write_json("switch_duplex.json", {"gib_each": gib, "rows": rows, "median": summary})


if __name__ == "__main__":
    if sys.argv[1:2] == ["holder"]:
        holder(int(sys.argv[2]))
    elif sys.argv[1:2] == ["filler"]:
        filler(int(sys.argv[2]))
    else:
        main(*(int(x) for x in sys.argv[1:3]))
