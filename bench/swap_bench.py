"""Swap-out and swap-in speed beside a raw pinned copy of the same data, in one run (GPU machine, no root).

    python3 bench/swap_bench.py [GIB] [ROUNDS]       # defaults: 16 GiB, 6 rounds

One child under LD_PRELOAD=interposer/libgpuwatch.so (GPUWATCH_SOCKET="", no quota) holds GIB 1-GiB
PyTorch tensors plus a few small ones (4 KiB .. 10 MiB), filled with random words and checksummed. It
times the first gpuwatch_swap_out(0) + gpuwatch_resume() apart (that swap-out allocates and pins the host
buffers), then ROUNDS rounds, each in alternating order: a raw copy of the same tensors into pinned
PyTorch host tensors and back (non_blocking copies, then synchronize), and a swap-out + resume. GB/s
are 1e9 bytes per second of wall time around the call; the swap's bytes are the page's
swap_out/swap_in_bytes_total increase (2 MiB rounding included). The goal is swap >= 90 % of the raw
copy. The checksum is verified after every round. JSON: $OUT/swap_bench.json.
"""
from __future__ import annotations

import statistics
import sys
import time
from typing import Any

from interposer_common import (GiB, KiB, MiB, Interposer, child_env, child_main, emit, ensure_library,
                               int_checksum, progress, run_child, write_json)

SMALL = [4 * KiB, 64 * KiB, 512 * KiB, 3 * MiB, 10 * MiB]


def raw_copy(torch: Any, host: list, dev: list, to_host: bool) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for h, d in zip(host, dev):
        (h if to_host else d).copy_(d if to_host else h, non_blocking=True)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def swap_cycle(ip: Interposer) -> dict[str, Any]:
    p0 = ip.page()
    t0 = time.perf_counter()
    rc_out = ip.swap_out(0)
    out_s = time.perf_counter() - t0
    p1 = ip.page()
    t0 = time.perf_counter()
    rc_in = ip.resume()
    in_s = time.perf_counter() - t0
    p2 = ip.page()
    moved_out = p1["swap_out_bytes_total"] - p0["swap_out_bytes_total"]
    moved_in = p2["swap_in_bytes_total"] - p1["swap_in_bytes_total"]
    out_ns = p1["swap_out_ns_total"] - p0["swap_out_ns_total"]
    in_ns = p2["swap_in_ns_total"] - p1["swap_in_ns_total"]
    return {"rc_out": rc_out, "rc_in": rc_in, "state_swapped": p1["state"], "state_after": p2["state"],
            "swapped_dev0": p1["dev0"]["swapped"], "out_s": out_s, "in_s": in_s, "out_bytes": moved_out,
            "in_bytes": moved_in, "out_GBps": moved_out / out_s / 1e9, "in_GBps": moved_in / in_s / 1e9,
            "out_GBps_internal": moved_out / out_ns if out_ns else None,
            "in_GBps_internal": moved_in / in_ns if in_ns else None}


def bench(gib: str = "16", rounds: str = "6") -> None:
    import torch
    ip = Interposer()
    if not ip.present:
        raise RuntimeError("interposer API not found in the process (LD_PRELOAD not applied?)")
    sizes = [GiB] * int(gib) + SMALL
    gen = torch.Generator(device="cuda").manual_seed(11)
    dev = [torch.empty(n // 8, dtype=torch.int64, device="cuda").random_(generator=gen) for n in sizes]
    nbytes = sum(sizes)
    checksum = int_checksum(torch, dev)
    progress(f"{nbytes / GiB:.2f} GiB in {len(dev)} tensors; pinning the raw copy's host tensors ...")
    t0 = time.perf_counter()
    host = [torch.empty(d.shape, dtype=d.dtype, pin_memory=True) for d in dev]
    pin_s = time.perf_counter() - t0
    raw_copy(torch, host, dev, True)  # first touch of the host pages
    raw_copy(torch, host, dev, False)
    page = ip.page()
    emit(bytes=nbytes, tensors=len(dev), host_pin_s=pin_s, reserved=torch.cuda.memory_reserved(),
         swappable=page["dev0"]["swappable"], unswappable=page["dev0"]["unswappable"])
    progress("first swap-out (allocates and pins the interposer's host buffers) ...")
    first = swap_cycle(ip)
    first["checksum_ok"] = int_checksum(torch, dev) == checksum
    progress(f"first: out {first['out_s']:.2f}s in {first['in_s']:.2f}s rc {first['rc_out']}/{first['rc_in']} "
             f"checksum {'ok' if first['checksum_ok'] else 'WRONG'}")
    emit(first=first)
    rows = []
    for r in range(int(rounds)):
        row: dict[str, Any] = {}
        for what in (("raw", "swap") if r % 2 == 0 else ("swap", "raw")):
            if what == "raw":
                d2h, h2d = raw_copy(torch, host, dev, True), raw_copy(torch, host, dev, False)
                row.update(raw_d2h_s=d2h, raw_h2d_s=h2d, raw_d2h_GBps=nbytes / d2h / 1e9,
                           raw_h2d_GBps=nbytes / h2d / 1e9)
            else:
                row.update(swap_cycle(ip))
        row["checksum_ok"] = int_checksum(torch, dev) == checksum
        rows.append(row)
        progress(f"round {r + 1}: raw D2H {row['raw_d2h_GBps']:.1f} H2D {row['raw_h2d_GBps']:.1f} GB/s; swap out "
                 f"{row['out_GBps']:.1f} in {row['in_GBps']:.1f} GB/s; "
                 f"checksum {'ok' if row['checksum_ok'] else 'WRONG'}")
        emit(rounds=rows)
    med = {k: statistics.median(r[k] for r in rows) for k in
           ("raw_d2h_GBps", "raw_h2d_GBps", "out_GBps", "in_GBps", "out_s", "in_s", "raw_d2h_s", "raw_h2d_s")}
    med["out_vs_raw"] = statistics.median(r["out_GBps"] / r["raw_d2h_GBps"] for r in rows)
    med["in_vs_raw"] = statistics.median(r["in_GBps"] / r["raw_h2d_GBps"] for r in rows)
    ok = all(r["checksum_ok"] and r["rc_out"] == 0 and r["rc_in"] == 0 and r["state_swapped"] == 3 for r in rows)
    emit(medians=med, all_ok=ok and first["checksum_ok"])


def main() -> int:
    if child_main({"bench": bench}):
        return 0
    ensure_library()
    args = sys.argv[1:3]
    res = run_child(__file__, "bench", child_env(preload=True), 540, args)
    write_json("swap_bench.json", res)
    med, first = res.get("medians"), res.get("first", {})
    if not med:
        print(f"no result (rc {res['rc']}): {res.get('error', '')}")
        return 1
    print(f"\n{res['bytes'] / GiB:.2f} GiB, {len(res['rounds'])} rounds, medians; swap bytes "
          f"{res['rounds'][0]['out_bytes'] / GiB:.2f} GiB moved")
    print(f"{'':10s} {'raw GB/s':>9s} {'swap GB/s':>10s} {'swap/raw':>9s} {'swap s':>8s} {'first swap s':>13s}")
    print(f"{'to host':10s} {med['raw_d2h_GBps']:9.1f} {med['out_GBps']:10.1f} {med['out_vs_raw'] * 100:8.1f}% "
          f"{med['out_s']:8.3f} {first.get('out_s', 0):13.3f}")
    print(f"{'to device':10s} {med['raw_h2d_GBps']:9.1f} {med['in_GBps']:10.1f} {med['in_vs_raw'] * 100:8.1f}% "
          f"{med['in_s']:8.3f} {first.get('in_s', 0):13.3f}")
    print(f"raw host tensors pinned in {res['host_pin_s']:.2f}s; data intact after every swap: {res['all_ok']}; "
          f"goal >= 90%: out {'met' if med['out_vs_raw'] >= 0.9 else 'NOT met'}, "
          f"in {'met' if med['in_vs_raw'] >= 0.9 else 'NOT met'}")
    return 0 if res["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
