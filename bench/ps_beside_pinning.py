"""How long `ps` waits on the daemon beside a process that maps the driver and pins host memory (as the driver's
checkpoint does), sample mode on: each sample attaches and detaches the launch probes, and a uprobe attach waits
for the memory map lock of every process that maps the library (bench/attach_beside_pinning.py). No GPU: the
test-double driver is the library. As root, from the repository root of the checkout to measure:

    python3 bench/ps_beside_pinning.py [GIB] [CALLS]     # defaults: 6 GiB, 60 calls

Starts the daemon of this checkout (sample mode, no NVML), a child that loads tests/fakecuda's libcuda.so.1 and
then maps and locks GIB of memory in a loop, and asks `ps` over the socket in-process CALLS times, 0.25 s apart,
first alone, then beside the child. Prints the median and the largest wait, and the calls over 1 s (a call that
waits past 30 s counts as 30 s)."""
from __future__ import annotations

import ctypes
import mmap
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAP_POPULATE, MAP_LOCKED = 0x8000, 0x2000


def pin_forever(driver: Path, gib: int) -> None:
    ctypes.CDLL(str(driver))  # mapped: the daemon's probes attach to it, the samples to this process too
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    n = gib << 30
    while True:
        p = libc.mmap(None, n, mmap.PROT_READ | mmap.PROT_WRITE,
                      mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_POPULATE | MAP_LOCKED, -1, 0)
        libc.munmap(ctypes.c_void_p(p), ctypes.c_size_t(n))


def ps_wait(path: str) -> float:
    began = time.perf_counter()
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(30)
            s.connect(path)
            s.sendall(b'{"cmd": "ps"}\n')
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
    except TimeoutError:
        return 30.0
    return time.perf_counter() - began


def series(path: str, calls: int) -> str:
    waits = []
    for _ in range(calls):
        waits.append(ps_wait(path))
        time.sleep(0.25)
    return (f"median {statistics.median(waits) * 1000:.0f} ms, largest {max(waits):.2f} s, "
            f"over 1 s: {sum(w > 1 for w in waits)} of {calls}")


def main() -> int:
    gib = int(sys.argv[1]) if len(sys.argv) > 1 else 6
    calls = int(sys.argv[2]) if len(sys.argv) > 2 else 60
    work = Path(tempfile.mkdtemp(prefix="gw-psbp-"))
    subprocess.run(["make", "-s", "-C", str(ROOT / "tests" / "fakecuda"), f"OUT={work}/fc"], check=True)
    path = str(work / "gw.sock")
    daemon = subprocess.Popen([sys.executable, "-m", "gpuwatch.client.cli", "--socket", path, "run", "--no-nvml",
                               "--no-metrics", "--launches", "sample"], stdout=(work / "daemon.log").open("w"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    child = 0
    try:
        for _ in range(300):
            if os.path.exists(path):
                break
            time.sleep(0.1)
        time.sleep(1)
        print(f"alone: {series(path, calls // 3)}", flush=True)
        child = os.fork()
        if child == 0:
            pin_forever(work / "fc" / "libcuda.so.1", gib)
            os._exit(0)
        time.sleep(3)
        print(f"beside {gib} GiB being locked: {series(path, calls)}", flush=True)
    finally:
        if child:
            os.kill(child, 9)
            os.waitpid(child, 0)
        daemon.terminate()
        daemon.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
