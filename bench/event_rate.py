"""Events per second the tracer sustains, and what a probed allocation costs (CPU machine, root, no GPU).

    python3 bench/event_rate.py [PAIRS_PER_THREAD]

Threads allocate and free on the test-double libcuda as fast as they can (bench/churn.c); each pair makes
two events. Runs without gpuwatch and with `gpuwatch run --launches off` interleaved, 3 rounds, medians.
Reports events delivered per second, events lost, added nanoseconds per probed call, daemon CPU and RSS.
"""
from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_paths import private_socket

ROOT = Path(__file__).resolve().parent.parent
SOCK = private_socket("gw-rate")
GPUWATCH = [sys.executable, "-P", "-m", "gpuwatch.client.cli", "--socket", SOCK]


def status() -> dict:
    return json.loads(subprocess.run([*GPUWATCH, "status", "--json"], capture_output=True, text=True,
                                     check=True).stdout)["health"]


def cpu_seconds(pid: int) -> float:
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss(pid: int) -> int:
    return next(int(line.split()[1]) * 1024 for line in open(f"/proc/{pid}/status") if line.startswith("VmHWM:"))


def main() -> int:
    pairs = int(sys.argv[1]) if len(sys.argv) > 1 else 100000
    if subprocess.run([*GPUWATCH, "status"], capture_output=True).returncode == 0:
        sys.exit(f"a daemon already answers on {SOCK}: stop it first")
    prebuilt = os.environ.get("GW_PREBUILT")  # a folder with libcuda.so.1, cudaprog and churn built elsewhere
    build = Path(prebuilt) if prebuilt else Path(tempfile.mkdtemp(prefix="gw-rate-"))
    if not prebuilt:
        subprocess.run(["make", "-s", "-C", str(ROOT / "tests/fakecuda"), f"OUT={build}"], check=True)
        subprocess.run(["gcc", "-O2", "-pthread", "-o", str(build / "churn"), str(ROOT / "bench/churn.c"), "-ldl"],
                       check=True)
    lib = str(build / "libcuda.so.1")

    def churn(threads: int) -> float:
        out = subprocess.run([str(build / "churn"), lib, str(threads), str(pairs), "4096"], capture_output=True,
                             text=True, check=True)
        return float(out.stdout)

    rows = []
    for threads in [int(t) for t in os.environ.get("THREADS", "1,2,4").split(",")]:
        print(f"{threads} thread(s)...", file=sys.stderr, flush=True)
        plain, traced, rates, lost_total = [], [], [], 0
        for _ in range(3):
            plain.append(churn(threads))
            d = subprocess.Popen([*GPUWATCH, "run", "--no-nvml", "--launches", "off"], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, start_new_session=True)
            while subprocess.run([*GPUWATCH, "status"], capture_output=True).returncode != 0:
                time.sleep(0.1)
            assert d.poll() is None, "the daemon exited"
            loader = subprocess.Popen([str(build / "cudaprog")], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                      text=True)
            loader.stdin.write(f"load {lib}\n")
            loader.stdin.flush()
            deadline = time.time() + 10
            while not status()["libraries"]:
                assert time.time() < deadline, "the daemon did not attach to the test double"
                time.sleep(0.05)
            loader.stdin.close()
            loader.wait()
            before, cpu0 = status(), cpu_seconds(d.pid)
            elapsed = churn(threads)
            while True:  # let the consumer drain the ring buffer
                seen = status()["events_seen"]
                time.sleep(0.3)
                after = status()
                if after["events_seen"] == seen:
                    break
            events = after["events_seen"] - before["events_seen"]
            lost = after["events_lost"] - before["events_lost"]
            lost_total += lost
            traced.append(elapsed)
            rates.append(events / elapsed)
            cpu = cpu_seconds(d.pid) - cpu0
            rss = peak_rss(d.pid)
            d.send_signal(signal.SIGTERM)
            d.wait(timeout=10)
        calls = 2 * pairs * threads
        row = {"threads": threads, "pairs_per_thread": pairs, "plain_s": statistics.median(plain),
               "traced_s": statistics.median(traced), "events_per_s": statistics.median(rates),
               "events_lost": lost_total,
               "added_ns_per_call": (statistics.median(traced) - statistics.median(plain)) / calls * 1e9 * threads,
               "daemon_cpu_s_last_round": cpu, "daemon_peak_rss": rss}
        rows.append(row)
    print(f"{'threads':>7s} {'events/s':>10s} {'lost':>6s} {'plain s':>8s} {'traced s':>9s} {'+ns/call':>9s} "
          f"{'daemon CPU s':>12s} {'RSS MiB':>8s}")
    for r in rows:
        print(f"{r['threads']:7d} {r['events_per_s']:10.0f} {r['events_lost']:6d} {r['plain_s']:8.3f} "
              f"{r['traced_s']:9.3f} {r['added_ns_per_call']:9.0f} {r['daemon_cpu_s_last_round']:12.2f} "
              f"{r['daemon_peak_rss'] / 2**20:8.1f}")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
