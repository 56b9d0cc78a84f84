"""Scrape time and daemon memory with many traced processes (CPU machine, root, no GPU).

    python3 bench/scrape_cost.py [PROCESSES]

Starts `gpuwatch run --launches all` with metrics on a loopback port, then PROCESSES test-double CUDA
programs that each allocate on two GPUs and launch. Times 20 scrapes of /metrics and 20 `gpuwatch ps --json`
(medians), and reads the daemon's peak RSS. Goals: scrape under 100 ms, RSS under 200 MB.
"""
from __future__ import annotations

import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench_paths import private_socket

ROOT = Path(__file__).resolve().parent.parent
SOCK = private_socket("gw-scrape")
GPUWATCH = [sys.executable, "-P", "-m", "gpuwatch.client.cli", "--socket", SOCK]


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    resource.setrlimit(resource.RLIMIT_NOFILE, (8192, 8192))
    build = Path(tempfile.mkdtemp(prefix="gw-scrape-"))
    subprocess.run(["make", "-s", "-C", str(ROOT / "tests/fakecuda"), f"OUT={build}"], check=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    daemon = subprocess.Popen([*GPUWATCH, "run", "--no-nvml", "--launches", "all", "--listen", f"127.0.0.1:{port}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    procs = []
    try:
        while subprocess.run([*GPUWATCH, "status"], capture_output=True).returncode != 0:
            time.sleep(0.2)
        script = f"load {build}/libcuda.so.1\nctx 0\nalloc a 3M\nlaunch 10\nctx 1\nalloc b 5M\n"
        first = subprocess.Popen([str(build / "cudaprog")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        first.stdin.write(f"load {build}/libcuda.so.1\n")
        first.stdin.flush()
        procs.append(first)
        while '"libraries": []' in subprocess.run([*GPUWATCH, "status", "--json"], capture_output=True,
                                                  text=True).stdout:
            time.sleep(0.05)  # the daemon attaches when the first program loads the library
        first.stdin.write("ctx 0\nalloc a 3M\nlaunch 10\nctx 1\nalloc b 5M\n")
        first.stdin.flush()
        first.stdout.readline()
        for _ in range(n - 1):
            p = subprocess.Popen([str(build / "cudaprog")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            p.stdin.write(script)
            p.stdin.flush()
            procs.append(p)
        for _ in range(5):
            assert first.stdout.readline().startswith("ok")
        for p in procs[1:]:
            for _ in range(6):
                assert p.stdout.readline().startswith("ok")
        time.sleep(1)
        scrape_ms, ps_ms = [], []
        for _ in range(20):
            t = time.perf_counter()
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read()
            scrape_ms.append((time.perf_counter() - t) * 1e3)
            t = time.perf_counter()
            subprocess.run([*GPUWATCH, "ps", "--json"], capture_output=True, check=True)
            ps_ms.append((time.perf_counter() - t) * 1e3)
        series = sum(1 for line in body.decode().splitlines() if line.startswith("gpuwatch_process_device_memory"))
        rss = next(int(line.split()[1]) * 1024 for line in open(f"/proc/{daemon.pid}/status")
                   if line.startswith("VmHWM:"))
        print(f"processes {n}, device-memory series {series}, exposition {len(body)} bytes")
        print(f"scrape: median {statistics.median(scrape_ms):.1f} ms "
              f"(min {min(scrape_ms):.1f}, max {max(scrape_ms):.1f})")
        print(f"gpuwatch ps --json: median {statistics.median(ps_ms):.1f} ms (includes the client's start)")
        print(f"daemon peak RSS: {rss / 2**20:.1f} MiB")
    finally:
        for p in procs:
            p.kill()
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
