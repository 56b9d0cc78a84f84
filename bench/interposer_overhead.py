"""What the interposer costs a CUDA program: per launch, per training step, per allocation (GPU machine).

    python3 bench/interposer_overhead.py [PAIRS] [ROUNDS]      # defaults: 10 pairs per round, 2 rounds

Each round starts two worker processes side by side, one under LD_PRELOAD=interposer/libgpuwatch.so
(GPUWATCH_SOCKET="", no quota) and one without, both pinned to the same CPU; only one works at a time.
Each pair asks both, in shuffled order, for the same measurement:
  launch  x.add_(1) on a one-element tensor, 20000 launches after 2000 warm-up ones; µs per launch from
          wall time around synchronize (3 pairs of these per pair of the others)
  gpt2    GPT-2 124M training step (random init, batch 8 x 512 tokens, bf16 autocast, AdamW); median of
          20 steps after 2 warm-up ones (goal: < 0.5 %)
Then one pair of workers with PYTORCH_NO_CUDA_MEMORY_CACHING=1 times torch.empty + del (cudaMalloc +
cudaFree, through cuMemAlloc/cuMemFree) for 4 KiB, 2 MiB and 256 MiB.
"added" is the median over pairs of (with - without); the spread is those differences' quartiles. The
interposed worker's shared page (launch counts, used bytes) shows that it was really in the path.
JSON: $OUT/interposer_overhead.json.
"""
from __future__ import annotations

import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

from interposer_common import (KiB, MiB, Interposer, child_env, child_main, ensure_library, gpt2, out_dir,
                               train_step, write_json)

CHUNK, WARM = 20000, 2000
ALLOC_SIZES = {"4KiB": (4 * KiB, 300), "2MiB": (2 * MiB, 300), "256MiB": (256 * MiB, 30)}
LAUNCH_PER_PAIR = 3


# ---- worker (child): answers one JSON line per request line

def worker(kind: str) -> None:
    import torch
    ip = Interposer()
    x = torch.zeros(1, device="cuda")
    if kind == "main":
        model, opt = gpt2(torch)
        tokens = torch.randint(0, 50257, (8, 512), device="cuda",
                               generator=torch.Generator(device="cuda").manual_seed(0))
        for _ in range(5):
            train_step(torch, model, opt, tokens)
    for _ in range(WARM):
        x.add_(1)
    torch.cuda.synchronize()

    def launch() -> float:
        for _ in range(WARM):
            x.add_(1)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(CHUNK):
            x.add_(1)
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / CHUNK * 1e6

    def step_ms() -> float:
        times = []
        for i in range(22):
            t0 = time.perf_counter()
            train_step(torch, model, opt, tokens)
            torch.cuda.synchronize()
            if i >= 2:
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def alloc() -> dict[str, float]:
        res = {}
        for name, (size, n) in ALLOC_SIZES.items():
            a_ns, f_ns = [], []
            for _ in range(n + 3):
                t0 = time.perf_counter_ns()
                t = torch.empty(size, dtype=torch.uint8, device="cuda")
                t1 = time.perf_counter_ns()
                del t
                t2 = time.perf_counter_ns()
                a_ns.append(t1 - t0)
                f_ns.append(t2 - t1)
            res[f"alloc_{name}"] = statistics.median(a_ns[3:]) / 1e3
            res[f"free_{name}"] = statistics.median(f_ns[3:]) / 1e3
        return res

    if kind == "alloc":
        alloc()  # warm-up
    cpu = max(0, min(2, (os.cpu_count() or 1) - 1))
    os.sched_setaffinity(0, {cpu})  # both workers of a pair on one CPU; only one works at a time
    print(json.dumps({"ready": True, "interposed": ip.present, "pid": os.getpid(), "cpu": cpu}), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "launch":
            out: Any = launch()
        elif cmd == "gpt2":
            out = step_ms()
        elif cmd == "alloc":
            out = alloc()
        elif cmd == "page":
            out = {"page": ip.page(slots=True), "reserved": torch.cuda.memory_reserved()}
        else:
            out = {"error": f"unknown request {cmd!r}"}
        print(json.dumps(out), flush=True)


# ---- parent

class Worker:
    def __init__(self, kind: str, preload: bool) -> None:
        extra = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"} if kind == "alloc" else {}
        self.label = f"{kind}-{'with' if preload else 'without'}"
        self.err = open(out_dir() / f"interposer_overhead-{self.label}.stderr", "w")
        self.p = subprocess.Popen([sys.executable, __file__, "child", "worker", kind], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=self.err, text=True,
                                  env=child_env(preload, **extra), start_new_session=True)
        self.preload = preload

    def read(self, timeout: float) -> Any:
        timer = threading.Timer(timeout, self.kill)
        timer.start()
        try:
            line = self.p.stdout.readline()
        finally:
            timer.cancel()
        if line.startswith("RESULT "):  # the worker failed: child_main reports the exception this way
            raise RuntimeError(f"worker {self.label} failed: {json.loads(line[7:]).get('error')}")
        if not line:
            tail = open(self.err.name).read()[-2000:]
            raise RuntimeError(f"worker {self.label} ended (rc {self.p.poll()}):\n{tail}")
        return json.loads(line)

    def kill(self) -> None:
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def ask(self, cmd: str, timeout: float = 120) -> Any:
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()
        return self.read(timeout)

    def close(self) -> None:
        self.p.stdin.close()
        try:
            self.p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.kill()
            self.p.wait()
        self.err.close()


def start_pair(kind: str) -> tuple[Worker, Worker]:
    pair = Worker(kind, True), Worker(kind, False)
    for w in pair:
        ready = w.read(300)
        print(f"  {w.label} ready: {ready}", flush=True)
        if ready["interposed"] != w.preload:
            raise RuntimeError(f"{w.label}: interposer present={ready['interposed']}, expected {w.preload}")
    return pair


def paired(pair: tuple[Worker, Worker], cmd: str, rng: random.Random) -> tuple[Any, Any]:
    order = list(pair)
    rng.shuffle(order)
    got = {w.preload: w.ask(cmd) for w in order}
    return got[True], got[False]


def stats(with_: list[float], without: list[float]) -> dict[str, Any]:
    diffs = [a - b for a, b in zip(with_, without)]
    base = statistics.median(without)
    added = statistics.median(diffs)
    q = statistics.quantiles(diffs, n=4) if len(diffs) > 1 else [added] * 3
    return {"without": base, "with": statistics.median(with_), "added": added, "overhead_pct": added / base * 100,
            "diff_quartiles": q, "diff_min": min(diffs), "diff_max": max(diffs), "n": len(diffs),
            "samples_with": with_, "samples_without": without}


def main() -> int:
    if child_main({"worker": worker}):
        return 0
    ensure_library()
    pairs = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    rng = random.Random(5)
    samples: dict[str, tuple[list[float], list[float]]] = {"launch_us": ([], []), "gpt2_step_ms": ([], [])}
    pages = []
    t0 = time.time()
    for r in range(rounds):
        print(f"== round {r + 1}/{rounds}: starting workers", flush=True)
        pair = start_pair("main")
        try:
            for p in range(pairs):
                for _ in range(LAUNCH_PER_PAIR):
                    w, wo = paired(pair, "launch", rng)
                    samples["launch_us"][0].append(w)
                    samples["launch_us"][1].append(wo)
                w, wo = paired(pair, "gpt2", rng)
                samples["gpt2_step_ms"][0].append(w)
                samples["gpt2_step_ms"][1].append(wo)
                print(f"  pair {p + 1}: launch {samples['launch_us'][0][-1]:.3f} vs {samples['launch_us'][1][-1]:.3f}"
                      f" us; gpt2 {w:.2f} vs {wo:.2f} ms", flush=True)
            pages.append(pair[0].ask("page"))
        finally:
            for w in pair:
                w.close()
    print("== allocation latency (PYTORCH_NO_CUDA_MEMORY_CACHING=1)", flush=True)
    pair = start_pair("alloc")
    try:
        for _ in range(pairs):
            w, wo = paired(pair, "alloc", rng)
            for k in w:
                samples.setdefault(f"{k}_us", ([], []))
                samples[f"{k}_us"][0].append(w[k])
                samples[f"{k}_us"][1].append(wo[k])
        pages.append(pair[0].ask("page"))
    finally:
        for w in pair:
            w.close()
    result = {name: stats(*s) for name, s in samples.items()}
    launches_counted = [pg["page"].get("launches") for pg in pages]
    report = {"pairs": pairs, "rounds": rounds, "chunk": CHUNK, "metrics": result, "interposed_pages": pages,
              "wall_s": time.time() - t0}
    write_json("interposer_overhead.json", report)
    goals = {"launch_us": 1.0, "gpt2_step_ms": 0.5}
    print(f"\n{'metric':18s} {'without':>10s} {'with':>10s} {'added':>10s} {'overhead':>9s} "
          f"{'pair-diff quartiles':>28s}  goal")
    for name, s in result.items():
        q = s["diff_quartiles"]
        goal = ""
        if name in goals:
            goal = f"<{goals[name]}% {'met' if s['overhead_pct'] < goals[name] else 'NOT met'}"
        print(f"{name:18s} {s['without']:10.3f} {s['with']:10.3f} {s['added']:+10.3f} {s['overhead_pct']:+8.2f}% "
              f"{q[0]:+9.3f} {q[1]:+9.3f} {q[2]:+9.3f}  {goal}")
    print(f"launches counted in the interposed workers' shared pages: {launches_counted}; "
          f"total {report['wall_s']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
