"""Quick check of the interposer on a real GPU: wrapping, quota view, swap round trip, launch counts.

    python3 bench/interposer_smoke.py          (builds interposer/libgpuwatch.so if missing)
"""
from __future__ import annotations

import ctypes
import json
import os
import struct
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIB = os.path.join(ROOT, "interposer", "libgpuwatch.so")


def child() -> None:
    import torch
    lib = ctypes.CDLL(None)
    lib.gpuwatch_swap_out.argtypes = [ctypes.c_ulonglong]
    lib.gpuwatch_shm.restype = ctypes.c_void_p
    page = lib.gpuwatch_shm()

    def dev0() -> dict:
        q, used, sw, unsw, swapped = struct.unpack_from("<5Q", ctypes.string_at(page + 256, 40))
        return {"quota": q, "used": used, "swappable": sw, "unswappable": unsw, "swapped": swapped}

    def launches() -> int:
        raw = ctypes.string_at(page + 4096, 64 * 960)
        return sum(struct.unpack_from("<Q", raw, 64 * i + 8)[0] for i in range(960))

    out: dict = {}
    free0, total0 = torch.cuda.mem_get_info()
    out["mem_get_info"] = [free0, total0]
    g = torch.Generator(device="cuda").manual_seed(1)
    a = torch.randn(16384, 16384, device="cuda", generator=g)  # 1 GiB
    b = torch.randn(4096, 4096, device="cuda", generator=g)
    small = [torch.full((100,), float(i), device="cuda") for i in range(50)]
    c = (b @ b).sum().item()
    ref = (a.double().sum().item(), b.double().sum().item(), c, [s.sum().item() for s in small])
    out["dev0_before"] = dev0()
    l0 = launches()
    x = torch.zeros(1, device="cuda")
    for _ in range(1000):
        x.add_(1)
    torch.cuda.synchronize()
    out["launches_counted_for_1000"] = launches() - l0
    t = time.perf_counter()
    rc = lib.gpuwatch_swap_out(0)
    out["swap_out_rc"], out["swap_out_s"] = rc, time.perf_counter() - t
    out["state_swapped"] = struct.unpack_from("<I", ctypes.string_at(page + 20, 4))[0]
    out["dev0_swapped"] = dev0()
    import pynvml
    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    out["nvml_used_while_swapped"] = pynvml.nvmlDeviceGetMemoryInfo(h).used
    t = time.perf_counter()
    rc = lib.gpuwatch_resume()
    out["swap_in_rc"], out["swap_in_s"] = rc, time.perf_counter() - t
    out["nvml_used_after"] = pynvml.nvmlDeviceGetMemoryInfo(h).used
    after = (a.double().sum().item(), b.double().sum().item(), (b @ b).sum().item(), [s.sum().item() for s in small])
    out["identical"] = after == ref
    print("RESULT " + json.dumps(out), flush=True)


def main() -> int:
    if not os.path.exists(LIB):
        subprocess.run(["make", "-s", "-C", os.path.join(ROOT, "interposer")], check=True)
    env = {**os.environ, "LD_PRELOAD": LIB, "GPUWATCH_SOCKET": "", "GPUWATCH_DEBUG": "1",
           "GPUWATCH_MEM_LIMIT": str(20 << 30)}
    p = subprocess.run([sys.executable, __file__, "child"], env=env, capture_output=True, text=True, timeout=300)
    print(p.stdout[-6000:])
    print(p.stderr[-6000:], file=sys.stderr)
    return p.returncode


if __name__ == "__main__":
    if sys.argv[1:] == ["child"]:
        child()
    else:
        sys.exit(main())
