"""The driver's checkpoint and restore against a raw pinned copy, in one run, on a GPU machine (no daemon):

    source bench/gw-env.sh && python3 bench/checkpoint_bench.py [GIB ...]      # default: 10 40 80

For each size, interleaved: the raw copy (an 8 GiB pinned buffer, device to host and back, median of 3), then a
plain process holding GIB (validate_checkpoint.py's idle job) locked, checkpointed, restored and unlocked from
here (medians of REPS, 2; 1 at 80 GiB), its checksums compared at the end. Reports GB/s and the quantum the
scheduler derives from the measured rate (enforcer/scheduler.py default_quantum: 20 x a switch). Writes
$OUT/checkpoint_bench.json.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from gpuwatch.core.checkpoint import Driver
from gpuwatch.enforcer.checkpointer import CHECKPOINT_BYTES_PER_S
from gpuwatch.enforcer.scheduler import SwitchCost, default_quantum

GiB = 1 << 30
OUT = Path(os.environ.get("OUT", "/tmp"))
JOB = str(Path(__file__).resolve().parent / "validate_checkpoint.py")


def raw_copy(torch: Any, n: int = 8 * GiB, reps: int = 3) -> dict[str, float]:
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    rates: dict[str, list[float]] = {"d2h": [], "h2d": []}
    for _ in range(reps):
        for direction, (dst, src) in (("d2h", (host, dev)), ("h2d", (dev, host))):
            torch.cuda.synchronize()
            t = time.perf_counter()
            dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize()
            rates[direction].append(n / (time.perf_counter() - t) / 1e9)
    del host, dev
    torch.cuda.empty_cache()
    return {k: round(statistics.median(v), 2) for k, v in rates.items()}


def holder(gib: int) -> tuple[subprocess.Popen, list[dict[str, Any]]]:
    proc = subprocess.Popen([sys.executable, JOB, "job", "hold", str(gib), "idle"], text=True, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    events: list[dict[str, Any]] = []

    def read() -> None:
        for line in proc.stdout or ():
            if line.startswith("RESULT "):
                events.append(json.loads(line[7:]))
    threading.Thread(target=read, daemon=True).start()
    deadline = time.time() + 300
    while not any(e["event"] == "allocated" for e in events):
        if proc.poll() is not None or time.time() > deadline:
            raise SystemExit(f"the {gib} GiB holder did not allocate")
        time.sleep(0.2)
    return proc, events


def diagnostics(pid: int) -> dict[str, Any]:
    """What a checkpoint uses of the host: the target's memory mappings and RSS, shared memory, the limits."""
    def read(path: str) -> str:
        try:
            return Path(path).read_text()
        except OSError:
            return ""
    status = {k: v.strip() for k, v in (line.split(":", 1) for line in read(f"/proc/{pid}/status").splitlines()
                                        if ":" in line)}
    meminfo = {k: int(v.split()[0]) << 10
               for k, v in (line.split(":", 1) for line in read("/proc/meminfo").splitlines())}
    shm = subprocess.run(["df", "-B1", "--output=size,used", "/dev/shm"], capture_output=True, text=True).stdout.split()
    return {"maps": len(read(f"/proc/{pid}/maps").splitlines()), "vm_rss": status.get("VmRSS"),
            "vm_pin": status.get("VmPin"), "vm_lck": status.get("VmLck"),
            "mem_available": meminfo.get("MemAvailable"), "shmem": meminfo.get("Shmem"),
            "dev_shm": shm[-2:], "max_map_count": read("/proc/sys/vm/max_map_count").strip()}


def nvml_bytes(pid: int) -> int:
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True).stdout
    return sum(int(u) << 20 for p, u in (line.split(", ") for line in out.splitlines()) if p == str(pid))


def main() -> int:
    import torch
    sizes = [int(a) for a in sys.argv[1:]] or [10, 40, 80]
    driver = Driver(os.environ.get("GW_DRIVER", "libcuda.so.1"))
    if not driver.available:
        raise SystemExit(driver.why_not)
    cost = SwitchCost(bytes_per_s=CHECKPOINT_BYTES_PER_S, latency=0.2, min_sample=GiB)
    results: dict[str, Any] = {"machine": subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version",
                                                          "--format=csv,noheader"], capture_output=True,
                                                         text=True).stdout.strip(), "sizes": {}}
    for gib in sizes:
        raw = raw_copy(torch)
        proc, events = holder(gib)
        held = nvml_bytes(proc.pid)
        reps = 1 if gib >= 40 else int(os.environ.get("REPS", "2"))
        times: dict[str, list[float]] = {"lock": [], "checkpoint": [], "restore": [], "unlock": []}
        nvml_checkpointed = []
        diag: dict[str, Any] = {"before": diagnostics(proc.pid)}
        try:
            for _ in range(reps):
                for step in ("lock", "checkpoint", "restore", "unlock"):
                    if step == "restore":
                        nvml_checkpointed.append(nvml_bytes(proc.pid))
                        diag["checkpointed"] = diagnostics(proc.pid)
                    t = time.perf_counter()
                    getattr(driver, step)(proc.pid, *((10000,) if step == "lock" else ()))
                    times[step].append(time.perf_counter() - t)
                cost.observe(held, times["checkpoint"][-1])
                cost.observe(held, times["restore"][-1])
        except Exception as exc:  # a failed checkpoint: what the host looked like then
            diag["failed"] = {"error": str(exc), "at": diagnostics(proc.pid), "after_s": time.perf_counter() - t}
            proc.kill()
            results["sizes"][gib] = {"raw_copy_gb_s": raw, "held_bytes_nvml": held, "diagnostics": diag}
            print(json.dumps({gib: results["sizes"][gib]}), flush=True)
            continue
        assert proc.stdin
        proc.stdin.write("stop\n")
        proc.stdin.flush()
        proc.wait(120)
        time.sleep(0.3)
        done = next((e for e in events if e["event"] == "done"), {})
        med = {k: round(statistics.median(v), 3) for k, v in times.items()}
        results["sizes"][gib] = {
            "raw_copy_gb_s": raw, "held_bytes_nvml": held, "nvml_while_checkpointed": nvml_checkpointed,
            "seconds": med, "all_seconds": times, "checkpoint_gb_s": round(held / med["checkpoint"] / 1e9, 2),
            "restore_gb_s": round(held / med["restore"] / 1e9, 2), "intact": done.get("intact"), "reps": reps,
            "diagnostics": diag}
        print(json.dumps({gib: results["sizes"][gib]}), flush=True)
    results["learnt_bytes_per_s"] = cost.bytes_per_s
    results["quantum_s"] = {f"{x} GiB excess": round(default_quantum(cost.switch_seconds(x * GiB)), 1)
                            for x in (10, 40, 80)}
    (OUT / "checkpoint_bench.json").write_text(json.dumps(results, indent=1))
    print(json.dumps({k: v for k, v in results.items() if k != "sizes"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
