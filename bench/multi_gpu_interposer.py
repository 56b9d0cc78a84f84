"""The interposer in one process that uses every GPU: a quota per GPU, and a swap round trip of memory on
all of them with the data checked. Run on a machine with two or more GPUs:

    make -C interposer && python3 bench/multi_gpu_interposer.py
"""
from __future__ import annotations

import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from interposer_common import GiB, Interposer, child_env, ensure_library, int_checksum  # noqa: E402

QUOTA = 8 * GiB


def child() -> None:
    import torch
    ip = Interposer()
    n = torch.cuda.device_count()
    totals = [torch.cuda.mem_get_info(d)[1] for d in range(n)]
    print(f"{n} GPUs; mem_get_info totals {totals}", flush=True)
    tensors = [torch.randn(6 * GiB // 4, device=f"cuda:{d}") for d in range(n)]
    refused = []
    for d in range(n):
        try:
            torch.empty(3 * GiB // 4, device=f"cuda:{d}")
            refused.append(False)
        except torch.OutOfMemoryError:
            refused.append(True)
    before = [int_checksum(torch, [t]) for t in tensors]
    rc_out = ip.swap_out(0)
    page = ip.page()
    rc_in = ip.resume()
    after = [int_checksum(torch, [t]) for t in tensors]
    sums = [float(t.mul_(2).sum().item()) for t in tensors]  # kernels on every GPU after the swap
    print(f"quota view {all(t == QUOTA for t in totals)}; 3 GiB more refused on each GPU {refused}; "
          f"swap out {rc_out} (state {page.get('state_name')}), resume {rc_in}; data intact {before == after}; "
          f"kernels ran {all(s == s for s in sums)}", flush=True)
    ok = all(t == QUOTA for t in totals) and all(refused) and rc_out == 0 and rc_in == 0 and before == after
    print("RESULT", "ok" if ok and n >= 2 else "FAILED", flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["child"]:
        child()
    else:
        ensure_library()
        sys.exit(subprocess.run([sys.executable, __file__, "child"], env=child_env(True, QUOTA),
                                timeout=300).returncode)
