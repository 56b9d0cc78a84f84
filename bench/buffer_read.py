"""Does memory behind the interposer read as fast as the driver's own? A job that reads a large resident buffer
every step (the oversubscription job of bench/validate_enforcer.py) is timed plainly, with PyTorch's
expandable segments, and under builds of the interposer that differ in how a region is laid out, each fresh
and again after its memory was swapped out and back in.

    python3 bench/buffer_read.py [BUFFER_GIB] [STEPS]      (defaults 80, 40)

Per variant: the median of 10 full reads of the buffer (GB/s), and the median step time of STEPS training
steps of GPT-2 124M that also read the whole buffer. JSON in $OUT/buffer_read.json.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from interposer_common import (GiB, ROOT, Interposer, child_env, child_main, emit, gpt2,  # noqa: E402
                               progress, run_child, train_step, write_json)

# name -> extra CFLAGS of the interposer build
BUILDS = {
    "lib-default": "",
    "lib-align-1g": "-DGW_VA_ALIGN='(1ull<<30)'",
    "lib-piece-4g": "-DGW_VA_ALIGN='(4ull<<30)' -DGW_PIECE_MAX='(4ull<<30)'",
}


def measure(torch, buf, model, opt, gen, steps: int) -> dict:
    reads = []
    for _ in range(10):
        torch.cuda.synchronize()
        t = time.perf_counter()
        buf.sum()
        torch.cuda.synchronize()
        reads.append(time.perf_counter() - t)
    step_times = []
    for step in range(steps):
        tokens = torch.randint(0, 50257, (8, 512), device="cuda", generator=gen)
        t = time.perf_counter()
        extra = buf[step * 1024:(step + 1) * 1024].sum() + buf.sum() * 1e-9
        train_step(torch, model, opt, tokens, extra)
        torch.cuda.synchronize()
        step_times.append(time.perf_counter() - t)
    read_s = statistics.median(reads)
    return {"read_gbps": round(buf.numel() * 4 / read_s / 1e9, 1), "read_ms": round(read_s * 1e3, 2),
            "step_ms": round(statistics.median(step_times[5:]) * 1e3, 2)}


def child_run(buffer_gib: str, steps: str) -> None:
    import torch
    model, opt = gpt2(torch, seed=0, eager=True)
    gen = torch.Generator(device="cuda").manual_seed(1)
    buf = torch.randn(int(float(buffer_gib) * GiB) // 4, device="cuda", generator=gen)
    fresh = measure(torch, buf, model, opt, gen, int(steps))
    progress(f"fresh {fresh}")
    emit(fresh=fresh)
    ip = Interposer()
    if ip.present:
        rc_out = ip.swap_out(0)
        rc_in = ip.resume()
        again = measure(torch, buf, model, opt, gen, int(steps))
        progress(f"after swap (rc {rc_out}/{rc_in}) {again}")
        emit(after_swap=again, swap_rc=[rc_out, rc_in])


def main() -> int:
    buffer_gib, steps = (sys.argv[1:] + ["80", "40"][len(sys.argv) - 1:])[:2]
    libs: dict[str, Path] = {}
    for name, flags in BUILDS.items():
        d = Path("/tmp/gw-variants") / name
        subprocess.run(["make", "-s", "-B", "-C", str(ROOT / "interposer"), f"OUT={d}", f"CFLAGS=-O2 -g {flags}"],
                       check=True)
        libs[name] = d / "libgpuwatch.so"
    variants: list[tuple[str, dict]] = [
        ("plain", child_env(False)),
        ("plain-expandable", child_env(False, PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True"))]
    for name, lib in libs.items():
        env = child_env(True)
        env["LD_PRELOAD"] = str(lib)
        variants.append((name, env))
    results = {}
    for rnd in range(2):
        for name, env in variants if rnd == 0 else [v for v in variants if v[0] in ("plain", "lib-default")]:
            r = run_child(__file__, "run", env, 300, [buffer_gib, steps], name=f"{name}-{rnd}")
            results[f"{name}-{rnd}"] = {k: r.get(k)
                                        for k in ("fresh", "after_swap", "swap_rc", "rc", "wall_s", "error")}
            print(f"{name}-{rnd}: {results[f'{name}-{rnd}']}", flush=True)
    write_json("buffer_read.json", {"buffer_gib": buffer_gib, "steps": steps, "results": results})
    return 0


if __name__ == "__main__":
    if not child_main({"run": child_run}):
        sys.exit(main())
