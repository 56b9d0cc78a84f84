"""Does a checkpoint fail beside a stopped CUDA process? (issue 13: on the H200, driver 580, every checkpoint
that failed half way had a SIGSTOPped CUDA process beside it.) No daemon; as root on a GPU machine:

    source bench/gw-env.sh && python3 bench/checkpoint_beside_stop.py [GIB [NEIGHBOUR ...]]   # default 10 GiB

A plain process holding GIB (validate_checkpoint.py's idle job) is checkpointed and restored from here three
times, with a second CUDA process holding 2 GiB beside it: running; stopped with SIGSTOP; locked by the
driver's own lock (or, with `self-stopped`, the target itself SIGSTOPped; with `sampling`, no second process but
gpuwatch's own probes on the driver library, their launch probes attached and detached as sample mode does,
every $GW_SAMPLE_PERIOD seconds, default 1, each toggle's time recorded). Each time: every call's result and
time, and the holder's checksums at the end (a holder
whose CUDA state was lost answers nothing: it is killed after 60 s and counted as lost). Writes
$OUT/checkpoint_beside_stop.json. About 2 device minutes at 10 GiB.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from checkpoint_bench import holder

from gpuwatch.core.checkpoint import CheckpointError, Driver

OUT = Path(os.environ.get("OUT", "/tmp"))


class Sampler:
    """gpuwatch's tracer with its launch probes toggled on and off in a loop: sample mode, faster."""

    def __init__(self) -> None:
        from gpuwatch.probes.tracer import Tracer
        self.tracer = Tracer(launches="off", use_nvml=False)
        self.tracer.start()
        self.toggles: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        period, on = float(os.environ.get("GW_SAMPLE_PERIOD", "1")), True
        while not self._stop.wait(period / 2):
            began = time.perf_counter()
            self.tracer.libraries.set_work_probes(on)
            self.toggles.append(round(time.perf_counter() - began, 3))
            on = not on

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join()
        self.tracer.stop()
        t = sorted(self.toggles)
        return {"toggles": len(t), "median_s": t[len(t) // 2] if t else None, "max_s": t[-1] if t else None}


def attempt(driver: Driver, gib: int, neighbour: str) -> dict[str, Any]:
    target, events = holder(gib)
    beside, _ = holder(2)
    sampler = Sampler() if neighbour == "sampling" else None
    calls: list[tuple[str, str, float]] = []

    def call(name: str, pid: int, *args: Any) -> bool:
        began = time.perf_counter()
        try:
            getattr(driver, name)(pid, *args)
            calls.append((name, "ok", round(time.perf_counter() - began, 3)))
            return True
        except CheckpointError as exc:
            calls.append((name, exc.name, round(time.perf_counter() - began, 3)))
            return False

    if neighbour == "stopped":
        os.kill(beside.pid, signal.SIGSTOP)
    elif neighbour == "self-stopped":
        os.kill(target.pid, signal.SIGSTOP)
    elif neighbour == "locked":
        call("lock", beside.pid, 10000)
    done = call("lock", target.pid, 10000) and call("checkpoint", target.pid) and call("restore", target.pid) \
        and call("unlock", target.pid)
    if neighbour == "stopped":
        os.kill(beside.pid, signal.SIGCONT)
    elif neighbour == "self-stopped":
        os.kill(target.pid, signal.SIGCONT)
    elif neighbour == "locked":
        call("unlock", beside.pid)
    sampling = sampler.stop() if sampler else None
    assert target.stdin is not None
    target.stdin.write("stop\n")
    target.stdin.flush()
    try:
        target.wait(60)
    except subprocess.TimeoutExpired:
        target.kill()
    beside.kill()
    time.sleep(0.3)
    end = next((e for e in events if e["event"] == "done"), None)
    return {"neighbour": neighbour, "calls": calls, "cycle_completed": done, "sampling": sampling,
            "data": "intact" if end and end.get("intact") else "lost" if end is None else "corrupt"}


def main() -> int:
    gib = int(sys.argv[1]) if sys.argv[1:] else 10
    driver = Driver(os.environ.get("GW_DRIVER", "libcuda.so.1"))
    if not driver.available:
        raise SystemExit(driver.why_not)
    neighbours = sys.argv[2:] or ["running", "stopped", "locked"]
    results = []
    for neighbour in neighbours:
        results.append(attempt(driver, gib, neighbour))
        (OUT / "checkpoint_beside_stop.json").write_text(json.dumps({"gib": gib, "attempts": results}, indent=1))
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
