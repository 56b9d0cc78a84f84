"""Workloads for bench/validate_enforcer.py, one process each; results as `RESULT {json}` lines on stdout.

    python3 bench/enforcer_job.py train BUFFER_GIB STEPS     GPT-2 124M training reading a resident buffer
    python3 bench/enforcer_job.py infer SECONDS RATE [IDLE_AT IDLE_S]   GPT-2 forward requests at RATE per s
    python3 bench/enforcer_job.py hold GIB                   1 GiB tensors, one per line read on stdin
"""
from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from interposer_common import GiB, gpt2, int_checksum, train_step  # noqa: E402


def emit(**fields) -> None:
    print("RESULT " + json.dumps(fields), flush=True)


def train(buffer_gib: str, steps: str) -> None:
    import torch
    torch.use_deterministic_algorithms(True, warn_only=True)
    start = time.time()
    model, opt = gpt2(torch, seed=0, eager=True)
    gen = torch.Generator(device="cuda").manual_seed(1)
    buf = torch.randn(int(float(buffer_gib) * GiB) // 4, device="cuda", generator=gen)
    checksum = int_checksum(torch, [buf])
    emit(event="ready", pid=os.getpid(), t=time.time(), setup_s=time.time() - start)
    losses, step_end = [], []
    # Every 50 steps: wall time, this process's CPU time, the time spent enqueueing (CPU side of the steps),
    # and the GPU's time for the last step (events around it): where a slowdown comes from.
    ev = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cpu0, enqueue = time.process_time(), 0.0
    for step in range(int(steps)):
        last = step % 50 == 49
        t = time.perf_counter()
        if last:
            ev[0].record()
        tokens = torch.randint(0, 50257, (8, 512), device="cuda", generator=gen)
        extra = buf[step * 1024:(step + 1) * 1024].sum() + buf.sum() * 1e-9  # reads the whole buffer every step
        losses.append(train_step(torch, model, opt, tokens, extra))
        if last:
            ev[1].record()
        enqueue += time.perf_counter() - t
        if last:
            torch.cuda.synchronize()
            step_end.append(time.time())
            emit(event="progress", step=step + 1, t=step_end[-1], cpu_s=round(time.process_time() - cpu0, 2),
                 enqueue_s=round(enqueue, 2), gpu_step_ms=round(ev[0].elapsed_time(ev[1]), 2))
            cpu0, enqueue = time.process_time(), 0.0
    torch.cuda.synchronize()
    stats = torch.cuda.memory_stats()
    emit(event="done", pid=os.getpid(), start=start, end=time.time(), losses=[float(x).hex() for x in losses],
         buffer_intact=int_checksum(torch, [buf]) == checksum, progress=step_end,
         alloc_retries=stats.get("num_alloc_retries"), ooms=stats.get("num_ooms"))


def infer(seconds: str, rate: str, idle_at: str = "0", idle_s: str = "0") -> None:
    import torch
    model, _ = gpt2(torch, seed=0)
    model.eval()
    tokens = torch.randint(0, 50257, (1, 256), device="cuda")
    with torch.no_grad():
        for _ in range(20):
            model(tokens)
    torch.cuda.synchronize()
    emit(event="ready", pid=os.getpid(), t=time.time())
    latencies, period, t0 = [], 1 / float(rate), time.time()
    next_at, idle_start, idle_end = t0, t0 + float(idle_at), t0 + float(idle_at) + float(idle_s)
    with torch.no_grad():
        while time.time() - t0 < float(seconds):
            now = time.time()
            if float(idle_s) and idle_start <= now < idle_end:
                time.sleep(idle_end - now)
                next_at = time.time()
                continue
            if now < next_at:
                time.sleep(next_at - now)
            begin = time.perf_counter()
            model(tokens)
            torch.cuda.synchronize()
            latencies.append(time.perf_counter() - begin)
            next_at += period
    latencies.sort()
    emit(event="done", pid=os.getpid(), n=len(latencies), p50_ms=latencies[len(latencies) // 2] * 1e3,
         p99_ms=latencies[int(len(latencies) * 0.99)] * 1e3, max_ms=latencies[-1] * 1e3)


def hold(gib: str) -> None:
    """Allocates 1 GiB tensors, one per stdin line; 'free' frees them all. Each tensor holds its index."""
    import torch
    torch.zeros(1, device="cuda")
    tensors: list = []
    emit(event="ready", pid=os.getpid())
    for line in sys.stdin:
        if line.strip() == "free":
            tensors.clear()
            torch.cuda.empty_cache()
            emit(event="freed", reserved=torch.cuda.memory_reserved())
            continue
        if len(tensors) >= int(gib):
            break
        tensors.append(torch.full((GiB // 4,), float(len(tensors)), device="cuda"))
        torch.cuda.synchronize()
        ok = all(float(t[-1].item()) == i for i, t in enumerate(tensors))
        emit(event="allocated", count=len(tensors), reserved=torch.cuda.memory_reserved(), values_ok=ok)


def oom() -> None:
    """1 GiB tensors until the quota says no: the error PyTorch raises, and that the process goes on."""
    import torch
    free, total = torch.cuda.mem_get_info()
    tensors, error = [], None
    try:
        while len(tensors) < 1000:
            tensors.append(torch.ones(GiB // 4, device="cuda"))
    except torch.OutOfMemoryError as exc:
        error = f"{type(exc).__module__}.{type(exc).__name__}"
    count = len(tensors)
    tensors.clear()
    torch.cuda.empty_cache()
    after = float(torch.ones(1000, device="cuda").sum().item())
    emit(event="done", total=total, free=free, allocated_gib=count, error=error, works_after=after == 1000)


if __name__ == "__main__":
    {"train": train, "infer": infer, "hold": hold, "oom": oom}[sys.argv[1]](*sys.argv[2:])
