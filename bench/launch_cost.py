"""Added time per kernel launch, measured paired: launch probes toggled between adjacent chunks of one
launch-bound loop, so slow drifts of a shared machine cancel (GPU machine, root, bcc importable).

    source .bcc/env.sh && source bench/gw-env.sh && python3 bench/launch_cost.py [PAIRS]

1. probes: chunks of 20000 tiny PyTorch launches with the work probes attached vs detached, order
   shuffled per pair; the median pair difference is the cost of `--launches all` per launch.
2. cycle: chunks during which one sample-mode attach+detach happens vs chunks with none; the median
   difference is what one sampling cycle costs the traced program.
--launches sample costs, per launch: duty (window/period) x (1) + (2) / (launches in one period).
"""
from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import time

CHUNK = 20000


def worker() -> None:
    import torch
    os.sched_setaffinity(0, {2})
    x = torch.zeros(1, device="cuda")
    for _ in range(20000):
        x.add_(1)
    torch.cuda.synchronize()
    print("ready", flush=True)
    while sys.stdin.readline():
        start = time.perf_counter()
        for _ in range(CHUNK):
            x.add_(1)
        torch.cuda.synchronize()
        print(json.dumps((time.perf_counter() - start) / CHUNK * 1e6), flush=True)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker()
        return 0
    from gpuwatch.probes import LaunchMode, Tracer
    pairs = int(sys.argv[1]) if len(sys.argv) > 1 else 60
    w = subprocess.Popen([sys.executable, __file__, "worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert w.stdout.readline().strip() == "ready"

    def chunk(during=None) -> float:
        w.stdin.write("\n")
        w.stdin.flush()
        if during:
            time.sleep(0.03)
            during()
        return json.loads(w.stdout.readline())

    tracer = Tracer(launches=LaunchMode.OFF, use_nvml=False)
    tracer.start()
    rng = random.Random(7)
    on, off, probe_diffs = [], [], []
    for _ in range(pairs):
        order = [True, False]
        rng.shuffle(order)
        r = {}
        for attached in order:
            tracer.set_work_probes(attached)
            r[attached] = chunk()
        tracer.set_work_probes(False)
        on.append(r[True])
        off.append(r[False])
        probe_diffs.append(r[True] - r[False])

    def cycle() -> None:
        tracer.set_work_probes(True)
        time.sleep(0.001)
        tracer.set_work_probes(False)

    plain, cycled, cycle_diffs = [], [], []
    toggle_ms = []
    for _ in range(pairs // 2):
        order = [True, False]
        rng.shuffle(order)
        r = {}
        for with_cycle in order:
            t0 = time.perf_counter()
            r[with_cycle] = chunk(cycle if with_cycle else None)
            if with_cycle:
                toggle_ms.append((time.perf_counter() - t0) * 1e3)
        plain.append(r[False])
        cycled.append(r[True])
        cycle_diffs.append((r[True] - r[False]) * CHUNK)  # microseconds the whole chunk lost
    tracer.stop()
    w.stdin.close()
    w.wait()
    q = lambda v: statistics.quantiles(v, n=4)  # noqa: E731
    per_launch = statistics.median(probe_diffs)
    per_cycle = statistics.median(cycle_diffs)
    base = statistics.median(off)
    launches_per_period = 4.0 / (base * 1e-6)
    sample_cost = 0.01 * per_launch + per_cycle / launches_per_period
    result = {"pairs": pairs, "us_per_launch_without": base, "us_per_launch_with": statistics.median(on),
              "added_us_per_launch": per_launch, "added_quartiles": q(probe_diffs),
              "cycle_cost_us": per_cycle, "cycle_quartiles": q(cycle_diffs),
              "sample_added_us_per_launch": sample_cost, "sample_overhead_pct": sample_cost / base * 100,
              "all_overhead_pct": per_launch / base * 100}
    print(json.dumps(result, indent=1))
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "launch_cost.json"), "w") as f:
        json.dump({**result, "probe_diffs": probe_diffs, "cycle_diffs": cycle_diffs}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
