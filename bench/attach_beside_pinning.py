"""How long a uprobe attach and detach take beside a process that pins host memory (the kernel takes the memory
map lock of every process mapping the probed file; populating and locking GiB holds it). As root, no GPU:

    python3 bench/attach_beside_pinning.py [GIB] [ROUNDS]      # defaults: 6 GiB, 8 rounds

A child maps libc (as every process does) and, in a loop, maps GIB of anonymous memory populated and locked,
then unmaps it; this process attaches and detaches a uprobe on libc's getpid ROUNDS times alone, then ROUNDS
times beside the child. Prints the medians and every time (ms)."""
from __future__ import annotations

import ctypes
import mmap
import os
import statistics
import sys
import time

from bcc import BPF

MAP_POPULATE, MAP_LOCKED = 0x8000, 0x2000


def pin_forever(gib: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype, libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                               ctypes.c_int, ctypes.c_int, ctypes.c_long]
    n = gib << 30
    while True:
        p = libc.mmap(None, n, mmap.PROT_READ | mmap.PROT_WRITE,
                      mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_POPULATE | MAP_LOCKED, -1, 0)
        if p in (None, ctypes.c_void_p(-1).value):
            raise SystemExit(f"mmap of {gib} GiB failed: {os.strerror(ctypes.get_errno())}")
        libc.munmap(ctypes.c_void_p(p), ctypes.c_size_t(n))


def rounds(b: BPF, n: int) -> tuple[list[float], list[float]]:
    attach, detach = [], []
    for _ in range(n):
        t = time.perf_counter()
        b.attach_uprobe(name="c", sym="getpid", fn_name="probe")
        attach.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        b.detach_uprobe(name="c", sym="getpid")
        detach.append((time.perf_counter() - t) * 1000)
        time.sleep(0.2)
    return attach, detach


def main() -> int:
    gib = int(sys.argv[1]) if len(sys.argv) > 1 else 6
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    b = BPF(text="int probe(void *ctx) { return 0; }")
    alone = rounds(b, n)
    child = os.fork()
    if child == 0:
        pin_forever(gib)
        os._exit(0)
    try:
        time.sleep(1.0)
        beside = rounds(b, n)
    finally:
        os.kill(child, 9)
        os.waitpid(child, 0)
    for name, (a, d) in (("alone", alone), (f"beside {gib} GiB pinning", beside)):
        print(f"{name}: attach median {statistics.median(a):.1f} ms, detach median {statistics.median(d):.1f} ms; "
              f"attach {[round(x) for x in a]}, detach {[round(x) for x in d]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
