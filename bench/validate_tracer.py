"""Validates the tracer against real CUDA programs on a GPU machine (run as root, bcc importable).

    source .bcc/env.sh && source bench/gw-env.sh && python3 bench/validate_tracer.py [SCENARIO ...]

Starts `gpuwatch run --launches all`, then runs each scenario as its own process. A scenario allocates,
reports its own ground truth (PyTorch's counters, CuPy's pool, NVML) and the kernel launches it issued,
and waits while the daemon is asked (`gpuwatch ps --json`). Prints one table; JSON goes to $OUT.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from bench_paths import private_socket

MiB = 1 << 20
GPUWATCH = [sys.executable, "-P", "-m", "gpuwatch.client.cli", "--socket", private_socket("gw-validate")]


# ---- scenarios: run in a child process; each yields checkpoints {name: truth...} and waits between them

def _checkpoint(**truth) -> None:
    print(json.dumps({"pid": os.getpid(), **truth}), flush=True)
    sys.stdin.readline()


def _torch_launch_loop(torch, n: int) -> None:
    x = torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    _checkpoint(stage="before_launches")
    for _ in range(n):
        x.add_(1)
    torch.cuda.synchronize()
    _checkpoint(stage="after_launches", launches=n)


def torch_alloc(conf: str | None) -> None:
    if conf:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = conf
    import torch
    tensors = [torch.empty(512 * MiB // 4, device="cuda") for _ in range(6)]
    torch.cuda.synchronize()
    _checkpoint(stage="allocated", reserved=torch.cuda.memory_reserved(), allocated=torch.cuda.memory_allocated())
    _torch_launch_loop(torch, 1000)
    del tensors
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    _checkpoint(stage="emptied", reserved=torch.cuda.memory_reserved(), allocated=torch.cuda.memory_allocated())


def torch_graph() -> None:
    import torch
    x = torch.zeros(1024, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            x.add_(1)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(10):
            x.add_(1)
    torch.cuda.synchronize()
    _checkpoint(stage="captured", reserved=torch.cuda.memory_reserved())
    for _ in range(200):
        g.replay()
    torch.cuda.synchronize()
    _checkpoint(stage="replayed", graph_launches=200, value=float(x[0].item()))


def jax_alloc() -> None:
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.05")
    import jax.numpy as jnp
    a = jnp.ones((256, MiB // 4), dtype=jnp.float32)  # 256 MiB
    b = (a * 2).block_until_ready()
    _checkpoint(stage="allocated", array_bytes=a.nbytes + b.nbytes, sum=float(b[0, 0]))


def cupy_alloc() -> None:
    import cupy
    arrays = [cupy.ones(100 * MiB // 4, dtype=cupy.float32) for _ in range(5)]
    cupy.cuda.Device().synchronize()
    pool = cupy.get_default_memory_pool()
    _checkpoint(stage="allocated", pool_total=pool.total_bytes(), pool_used=pool.used_bytes(),
                sum=float(arrays[0].sum()))


def nccl_single() -> None:
    import torch
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    dist.init_process_group("nccl", rank=0, world_size=1)
    x = torch.ones(64 * MiB // 4, device="cuda")
    dist.all_reduce(x)
    torch.cuda.synchronize()
    _checkpoint(stage="all_reduced", reserved=torch.cuda.memory_reserved(), value=float(x[0].item()))
    dist.destroy_process_group()


def torch_two_gpus() -> None:
    """One process, memory on both GPUs: each GPU's bytes must land on its own row."""
    import torch
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda:0")
    b = torch.empty(3 << 30, dtype=torch.uint8, device="cuda:1")
    torch.cuda.synchronize(0)
    torch.cuda.synchronize(1)
    _checkpoint(stage="allocated", reserved0=torch.cuda.memory_reserved(0), reserved1=torch.cuda.memory_reserved(1),
                a=a.numel(), b=b.numel())


def torch_visible_devices() -> None:
    """CUDA_VISIBLE_DEVICES=1: the process's cuda:0 is the host's GPU 1."""
    os.environ["CUDA_VISIBLE_DEVICES"] = "1"
    import torch
    a = torch.empty(2 << 30, dtype=torch.uint8, device="cuda:0")
    torch.cuda.synchronize()
    _checkpoint(stage="allocated", reserved_host_gpu1=torch.cuda.memory_reserved(0), a=a.numel())


TWO_GPU_SCENARIOS = {"torch_two_gpus": torch_two_gpus, "torch_visible_devices": torch_visible_devices}

SCENARIOS = {
    "torch_default": lambda: torch_alloc(None),
    "torch_expandable": lambda: torch_alloc("expandable_segments:True"),
    "torch_async": lambda: torch_alloc("backend:cudaMallocAsync"),
    "torch_graph": torch_graph,
    "jax": jax_alloc,
    "cupy": cupy_alloc,
    "nccl_single": nccl_single,
}


# ---- driver

def ps(pid: int) -> list[dict]:
    out = subprocess.run([*GPUWATCH, "ps", "--json"], capture_output=True, text=True, check=True).stdout
    return [r for r in json.loads(out) if r["pid"] == pid]


def run_scenario(name: str) -> list[dict]:
    child = subprocess.Popen([sys.executable, __file__, "child", name], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    results = []
    try:
        while line := child.stdout.readline():
            truth = json.loads(line)
            time.sleep(0.3)  # NVML's per-process numbers lag slightly
            rows = ps(truth["pid"])
            results.append({"scenario": name, **truth, "rows": rows})
            child.stdin.write("\n")
            child.stdin.flush()
    finally:
        child.wait(timeout=300)
    results.append({"scenario": name, "stage": "exit", "exit_code": child.returncode})
    return results


def summarize(results: list[dict]) -> None:
    print(f"{'scenario':18s} {'stage':16s} {'gpu':>3s} {'traced':>13s} {'truth':>28s} {'nvml':>13s} "
          f"{'untracked':>11s} {'allocs':>7s} {'launches':>9s} {'graphs':>7s}")
    for r in results:
        truth = {k: v for k, v in r.items() if k not in ("scenario", "stage", "pid", "rows")}
        for row in r.get("rows") or [{}]:
            print(f"{r['scenario']:18s} {r['stage']:16s} {str(row.get('gpu', '-')):>3s} "
                  f"{row.get('device_bytes', '-')!s:>13s} {json.dumps(truth)[:28]:>28s} "
                  f"{row.get('nvml_bytes', '-')!s:>13s} "
                  f"{row.get('untracked_bytes', '-')!s:>11s} {row.get('allocs', '-')!s:>7s} "
                  f"{row.get('launches', '-')!s:>9s} {row.get('graph_launches', '-')!s:>7s}")


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "child":
        {**SCENARIOS, **TWO_GPU_SCENARIOS}[sys.argv[2]]()
        return 0
    names = sys.argv[1:] or list(SCENARIOS)
    log = open(os.path.join(os.environ.get("OUT", "/tmp"), "daemon.log"), "w")
    daemon = subprocess.Popen([*GPUWATCH, "run", "--launches", "all"], stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    results: list[dict] = []
    try:
        deadline = time.time() + 120
        while subprocess.run([*GPUWATCH, "status"], capture_output=True).returncode != 0:
            assert daemon.poll() is None and time.time() < deadline, open(log.name).read()
            time.sleep(0.2)
        for name in names:
            try:
                results += run_scenario(name)
            except Exception as exc:
                results.append({"scenario": name, "stage": "error", "error": repr(exc)})
        status = json.loads(subprocess.run([*GPUWATCH, "status", "--json"], capture_output=True, text=True).stdout)
        results.append({"scenario": "daemon", "stage": "status", "health": status["health"]})
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=10)
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "validate_tracer.json"), "w") as f:
        json.dump(results, f, indent=1)
    summarize(results)
    print("uprobe_events after stop:", repr(open("/sys/kernel/tracing/uprobe_events").read()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
