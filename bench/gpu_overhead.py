"""What gpuwatch costs a CUDA program, side by side in one run (GPU machine, root, bcc importable).

    source .bcc/env.sh && source bench/gw-env.sh && python3 bench/gpu_overhead.py launch|gpt2 [ROUNDS]

One worker process keeps its CUDA context for the whole run. Each round visits every mode in a shuffled
order: no daemon, then `gpuwatch run --launches off|sample|all`; the worker measures while that daemon runs
(started before, so it finds the worker's libcuda at start). Medians per mode over rounds; the daemon's CPU
time and peak RSS per mode are read from /proc.
"""
from __future__ import annotations

import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time

from bench_paths import private_socket

SOCK = private_socket("gw-bench")
GPUWATCH = [sys.executable, "-P", "-m", "gpuwatch.client.cli", "--socket", SOCK]
MODES = ["none", "off", "sample", "all"]


def worker_launch() -> None:
    """Launch-bound loop: one tiny kernel per add_; reports microseconds per launch over ~1 s chunks."""
    import torch
    os.sched_setaffinity(0, {2})  # one CPU, away from the daemon's threads
    x = torch.zeros(1, device="cuda")
    for _ in range(20000):
        x.add_(1)
    torch.cuda.synchronize()
    print("ready", flush=True)
    while sys.stdin.readline():
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < 4.0:  # one full sampling period of --launches sample
            for _ in range(10000):
                x.add_(1)
            n += 10000
        torch.cuda.synchronize()
        print(json.dumps({"us_per_launch": (time.perf_counter() - start) / n * 1e6}), flush=True)


def worker_gpt2() -> None:
    """GPT-2 124M training steps, random initialisation, batch 8 x 1024 tokens, AdamW, bf16 autocast."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config()).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = int(os.environ.get("GPT2_BATCH", "8"))
    data = torch.randint(0, 50257, (batch, 1024), device="cuda")

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(data, labels=data).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    print("ready", flush=True)
    while sys.stdin.readline():
        times = []
        for _ in range(20):
            start = time.perf_counter()
            step()
            torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
        print(json.dumps({"ms_per_step": statistics.median(times)}), flush=True)


def proc_cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_peak_rss(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def start_daemon(mode: str) -> subprocess.Popen:
    d = subprocess.Popen([*GPUWATCH, "run", "--no-nvml", "--launches", mode], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 60
    while subprocess.run([*GPUWATCH, "status"], capture_output=True).returncode != 0:
        if d.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"daemon ({mode}) did not start")
        time.sleep(0.1)
    return d


def main() -> int:
    if sys.argv[1] == "worker":
        {"launch": worker_launch, "gpt2": worker_gpt2}[sys.argv[2]]()
        return 0
    workload, rounds = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 5
    worker = subprocess.Popen([sys.executable, __file__, "worker", workload], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert worker.stdout.readline().strip() == "ready"
    samples: dict[str, list[float]] = {m: [] for m in MODES}
    daemon_cpu: dict[str, list[float]] = {m: [] for m in MODES}
    daemon_rss: dict[str, int] = {m: 0 for m in MODES}
    rng = random.Random(1)
    for _ in range(rounds):
        order = MODES[:]
        rng.shuffle(order)
        for mode in order:
            d = start_daemon(mode) if mode != "none" else None
            cpu0, t0 = (proc_cpu_seconds(d.pid) if d else 0.0), time.time()
            worker.stdin.write("\n")
            worker.stdin.flush()
            result = json.loads(worker.stdout.readline())
            samples[mode].append(next(iter(result.values())))
            if d:
                daemon_cpu[mode].append((proc_cpu_seconds(d.pid) - cpu0) / (time.time() - t0) * 100)
                daemon_rss[mode] = max(daemon_rss[mode], proc_peak_rss(d.pid))
                d.send_signal(signal.SIGTERM)
                d.wait(timeout=10)
    worker.stdin.close()
    worker.wait()
    unit = "us/launch" if workload == "launch" else "ms/step"
    base = statistics.median(samples["none"])
    report = {"workload": workload, "rounds": rounds, "unit": unit, "samples": samples, "modes": {}}
    print(f"{workload}: medians over {rounds} interleaved rounds; 'added' is the median of each round's "
          "difference to that round's run without gpuwatch")
    print(f"{'mode':8s} {unit:>11s} {'added':>10s} {'overhead':>9s} {'spread':>17s} {'daemon CPU%':>12s} "
          f"{'daemon RSS':>11s}")
    for mode in MODES:
        med = statistics.median(samples[mode])
        diffs = [m - n for m, n in zip(samples[mode], samples["none"])]
        added = statistics.median(diffs)
        cpu = statistics.median(daemon_cpu[mode]) if daemon_cpu[mode] else 0.0
        report["modes"][mode] = {"median": med, "added": added, "overhead_pct": added / base * 100,
                                 "round_differences": diffs, "daemon_cpu_pct": cpu,
                                 "daemon_peak_rss": daemon_rss[mode]}
        print(f"{mode:8s} {med:11.3f} {added:+10.3f} {added / base * 100:+8.2f}% "
              f"{min(diffs):+8.3f}..{max(diffs):+.3f} {cpu:12.1f} {daemon_rss[mode] / 2**20:9.1f}Mi")
    with open(os.path.join(os.environ.get("OUT", "/tmp"), f"overhead_{workload}.json"), "w") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
