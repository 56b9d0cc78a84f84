"""Validates the enforcer (issue 5) on a GPU machine, as root with bcc importable:

    source .bcc/env.sh && source bench/gw-env.sh && python3 bench/validate_enforcer.py [SCENARIO ...]

Scenarios (default: all, in this order):
  oversubscribe  two GPT-2 trainings of about 90 GiB each (model + a resident buffer read every step): without
                 gpuwatch the second fails with OOM; under `gpuwatch exec` both finish with the losses of a run
                 alone; makespan against two runs one after the other (goal <= 1.1x)
  fits           two trainings that fit together: under gpuwatch against plain co-location (goal >= 0.97x)
  priority       a high-priority inference loop beside a low-priority training: p99 against the loop alone
                 (goal <= 1.5x), and the training's progress
  alone_gpuwatch the oversubscription training alone under `gpuwatch exec` (what the daemon costs a job)
  oversubscribe_plain  the same two trainings, neither under `gpuwatch exec` (the checkpoint API makes room);
                 GW_ALONE_JSON=FILE takes the baseline from an earlier run's validate_enforcer.json
  quota          a PyTorch process not under the interposer crosses its quota: stopped before the crossing
                 call, holding exactly what it held; continues correctly when its group's other process frees
Writes $OUT/validate_enforcer.json and prints a table.
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

from bench_paths import private_socket

ROOT = Path(__file__).resolve().parent.parent
JOB = [sys.executable, str(ROOT / "bench" / "enforcer_job.py")]
SOCKET = private_socket("gw-enforcer")
GPUWATCH = [sys.executable, "-P", "-m", "gpuwatch.client.cli", "--socket", SOCKET]
OUT = Path(os.environ.get("OUT", "/tmp"))
GiB = 1 << 30
TRAIN_STEPS = int(os.environ.get("GW_TRAIN_STEPS", "900"))
BIG_BUFFER_GIB = float(os.environ.get("GW_BIG_BUFFER_GIB", "80"))
results: dict[str, Any] = {}


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


class Job:
    """A workload process; its RESULT lines are collected as they come."""

    def __init__(self, name: str, args: list[str], under: list[str] | None = None, stdin: bool = False) -> None:
        self.name, self.events = name, []
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
        self.err = open(OUT / f"enforcer-{name}.stderr", "w")
        self.proc = subprocess.Popen([*(under or []), *JOB, *args], stdout=subprocess.PIPE, stderr=self.err,
                                     stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, text=True, env=env)
        self.pid = self.proc.pid
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout
        for line in self.proc.stdout:
            if line.startswith("RESULT "):
                self.events.append(json.loads(line[7:]))

    def event(self, kind: str, timeout: float = 600) -> dict[str, Any] | None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            found = [e for e in self.events if e.get("event") == kind]
            if found:
                return found[-1]
            if self.proc.poll() is not None and not self._reader.is_alive():
                return None
            time.sleep(0.1)
        return None

    def send(self, line: str) -> None:
        assert self.proc.stdin
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def wait(self, timeout: float = 600) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._reader.join(5)
        return rc

    def error(self) -> str:
        self.err.flush()
        lines = [line for line in Path(self.err.name).read_text(errors="replace").splitlines() if "Error" in line]
        return lines[-1][:300] if lines else ""


def gw(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([*GPUWATCH, *args], capture_output=True, text=True, check=check, timeout=60)


def ps() -> dict[int, dict[str, Any]]:
    return {r["pid"]: r for r in json.loads(gw("ps", "--json").stdout)}


def exec_under(*opts: str) -> list[str]:
    return [*GPUWATCH, "exec", *opts, "--"]


def start_daemon() -> subprocess.Popen:
    config = Path("/tmp/gw-enforcer.toml")
    room_wait = os.environ.get("GW_ROOM_WAIT_MS")  # oversubscribe_plain: the second waits for the first to end
    config.write_text("[scheduler]\nidle_ms = 300\n" + (f"room_wait_ms = {room_wait}\n" if room_wait else ""))
    daemon = subprocess.Popen([*GPUWATCH, "run", "--config", str(config), "--launches", "off", "--no-metrics"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def timestamped(log_file: Path) -> None:
        with open(log_file, "w") as f:
            for line in daemon.stdout:
                f.write(f"{time.strftime('%H:%M:%S')}.{int(time.time() * 1000) % 1000:03d} {line}")
                f.flush()

    threading.Thread(target=timestamped, args=(OUT / "enforcer-daemon.log",), daemon=True).start()
    for _ in range(600):
        if gw("status", check=False).returncode == 0:
            return daemon
        if daemon.poll() is not None:
            raise SystemExit("the daemon exited: see enforcer-daemon.log")
        time.sleep(0.1)
    raise SystemExit("the daemon did not answer")


def alone_run() -> dict[str, Any]:
    """The two trainings one after the other, plainly: the baseline of the makespan. Python and torch are
    imported once before, so that neither run pays for a cold file cache."""
    if "alone" not in results:
        subprocess.run([sys.executable, "-c", "import torch, transformers"], check=False, timeout=300)
        log(f"two trainings one after the other (plain, {BIG_BUFFER_GIB} GiB buffer, {TRAIN_STEPS} steps) ...")
        launched, runs = time.time(), []
        for n in "12":
            job = Job(f"alone-{n}", ["train", str(BIG_BUFFER_GIB), str(TRAIN_STEPS)])
            rc, done = job.wait(), job.event("done", 1)
            runs.append({"rc": rc, "wall_s": done["end"] - done["start"] if done else None,
                         "losses": done["losses"] if done else None, "error": job.error(),
                         "end": done["end"] if done else None, "progress": progress(job, done["start"] if done else 0)})
            log(f"  alone {n}: {runs[-1]['wall_s']:.1f} s in the training function, {step_ms(job)} ms per step")
        first, second = runs
        results["alone"] = {"rc": [r["rc"] for r in runs], "losses": first["losses"],
                            "same_losses": first["losses"] == second["losses"],
                            "wall_s": ((first["wall_s"] + second["wall_s"]) / 2
                                       if first["wall_s"] and second["wall_s"] else None),
                            "sequential_from_launch_s": second["end"] - launched if second["end"] else None,
                            "runs": [{k: v for k, v in r.items() if k != "losses"} for r in runs]}
        log(f"  one after the other: {results['alone']['sequential_from_launch_s']} s from the first launch")
    return results["alone"]


def progress(job: Job, t0: float) -> list[dict[str, Any]]:
    """The job's progress events, time relative to t0."""
    return [{**{k: v for k, v in e.items() if k != "event"}, "t": round(e["t"] - t0, 1)}
            for e in job.events if e.get("event") == "progress"]


def step_ms(job: Job) -> list[float]:
    """Milliseconds per step between consecutive progress events (50 steps apart)."""
    points = [(e["t"], e["step"]) for e in job.events if e.get("event") == "progress"]
    return [round((t1 - t0) / (s1 - s0) * 1e3, 1) for (t0, s0), (t1, s1) in zip(points, points[1:])]


def alone_gpuwatch() -> None:
    """The same training alone under `gpuwatch exec` with the daemon running and `ps` polled every 5 s, as in
    the oversubscription run: what the daemon costs a job that never waits."""
    log("training alone under gpuwatch exec ...")
    job = Job("alone-gw", ["train", str(BIG_BUFFER_GIB), str(TRAIN_STEPS)], exec_under())
    while job.proc.poll() is None:
        try:
            ps()
        except (subprocess.SubprocessError, ValueError):
            pass
        time.sleep(5)
    rc, done = job.wait(), job.event("done", 1)
    results["alone_gpuwatch"] = {"rc": rc, "wall_s": done["end"] - done["start"] if done else None,
                                 "progress": progress(job, done["start"] if done else 0),
                                 "alloc_retries": done and done.get("alloc_retries"), "error": job.error()}
    log(f"  alone under gpuwatch: {results['alone_gpuwatch']['wall_s']:.1f} s, {step_ms(job)} ms per step")


def oversubscribe() -> None:
    alone = alone_run()
    log("two plain trainings of ~90 GiB at once (no gpuwatch) ...")
    a = Job("plain-a", ["train", str(BIG_BUFFER_GIB), str(TRAIN_STEPS)])
    a.event("ready", 120)
    b = Job("plain-b", ["train", str(BIG_BUFFER_GIB), str(TRAIN_STEPS)])
    rc_b = b.wait(180)
    a.proc.kill()
    a.wait()
    plain = {"second_rc": rc_b, "second_error": b.error()}
    log(f"  plain: second exited {rc_b}: {plain['second_error']}")
    runs = [gpuwatch_pair(alone, i) for i in range(int(os.environ.get("GW_REPEAT", "1")))]
    results["oversubscribe"] = {"plain": plain, **runs[0], "runs": runs[1:]}


def oversubscribe_plain() -> None:
    """The same two trainings, neither under `gpuwatch exec`: the daemon stops the second at the allocation that
    does not fit and makes room with the driver's checkpoint API. The baseline: $GW_ALONE_JSON (a previous
    run's validate_enforcer.json, same machine and job), else a new one."""
    given = os.environ.get("GW_ALONE_JSON")
    alone = json.loads(Path(given).read_text())["alone"] if given else alone_run()
    results["alone_source"] = given or "this run"
    results["oversubscribe_plain"] = gpuwatch_pair(alone, 0, under=None)


def gpuwatch_pair(alone: dict[str, Any], attempt: int, under: list[str] | None | bool = True) -> dict[str, Any]:
    """Both trainings at once, each under `gpuwatch exec` (under None: plainly, beside the daemon). The makespan
    counts from their launch to the last one's end. `ratio_from_launch`: against the two run one after the
    other, from the first one's launch to the second one's end. `ratio` (as first reported, stricter): against
    twice the time a run spends in its training function, which leaves out the interpreter's start-up that the
    makespan includes."""
    how = "under gpuwatch exec" if under else "plainly beside the daemon"
    log(f"two trainings of ~90 GiB {how} (attempt {attempt + 1}) ...")
    t0 = time.time()
    prefix = exec_under() if under is True else None
    jobs = [Job(f"gw-{n}", ["train", str(BIG_BUFFER_GIB), str(TRAIN_STEPS)], prefix) for n in "ab"]
    peak_swapped = 0
    timeline: list = []
    while any(j.proc.poll() is None for j in jobs) and time.time() - t0 < 560:
        try:
            rows = ps()
            peak_swapped = max(peak_swapped, sum(rows[j.pid]["swapped_bytes"] for j in jobs if j.pid in rows))
            mem = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines()[:3])
            timeline.append((round(time.time() - t0, 1), [rows.get(j.pid, {}).get('state') for j in jobs]))
            log(f"  states {[rows.get(j.pid, {}).get('state') for j in jobs]} swapped "
                f"{[round(rows.get(j.pid, {}).get('swapped_bytes', 0) / GiB, 1) for j in jobs]} GiB; host "
                f"{mem['MemTotal'].strip()} total, {mem['MemAvailable'].strip()} available")
        except (subprocess.SubprocessError, KeyError, ValueError):
            pass
        time.sleep(5)
    rcs = [j.wait(5) for j in jobs]
    dones = [j.event("done", 1) for j in jobs]
    makespan = max(d["end"] for d in dones if d) - t0 if all(dones) else None
    same = [bool(d and alone["losses"] and d["losses"] == alone["losses"]) for d in dones]
    out = {
        "rcs": rcs, "losses_equal_alone": same, "buffers_intact": [d and d["buffer_intact"] for d in dones],
        "makespan_s": makespan, "sequential_s": 2 * alone["wall_s"] if alone["wall_s"] else None,
        "ratio": makespan / (2 * alone["wall_s"]) if makespan and alone["wall_s"] else None,
        "sequential_from_launch_s": alone["sequential_from_launch_s"],
        "ratio_from_launch": (makespan / alone["sequential_from_launch_s"]
                              if makespan and alone["sequential_from_launch_s"] else None),
        "peak_swapped_bytes": peak_swapped, "errors": [j.error() for j in jobs], "timeline": timeline,
        "progress": [progress(j, t0) for j in jobs], "alloc_retries": [d and d.get("alloc_retries") for d in dones]}
    log(f"  gpuwatch: rcs {rcs}, losses equal {same}, buffers intact {out['buffers_intact']}, makespan {makespan}, "
        f"ratio {out['ratio']}, from launch {out['ratio_from_launch']}, peak swapped {peak_swapped / GiB:.1f} GiB")
    for j in jobs:
        log(f"  {j.name}: ms per step {step_ms(j)}")
        log(f"  {j.name}: progress {[(e['t'], e['step']) for e in progress(j, t0)]}")
    return out


def fits() -> None:
    steps = str(max(TRAIN_STEPS // 2, 200))
    out = {}
    for mode, under in (("plain", None), ("gpuwatch", exec_under())):
        log(f"two trainings that fit ({mode}) ...")
        t0 = time.time()
        jobs = [Job(f"fits-{mode}-{n}", ["train", "30", steps], under) for n in "ab"]
        rcs = [j.wait(400) for j in jobs]
        dones = [j.event("done", 1) for j in jobs]
        out[mode] = {"rcs": rcs, "wall_s": time.time() - t0,
                     "train_s": [d["end"] - d["start"] for d in dones if d]}
        if mode == "gpuwatch":
            out["gpuwatch"]["waits"] = "see daemon log: no pause or swap expected"
    p, g = out["plain"]["train_s"], out["gpuwatch"]["train_s"]
    out["throughput_ratio"] = (sum(p) / sum(g)) if len(p) == 2 and len(g) == 2 else None
    results["fits"] = out
    log(f"  fits: throughput under gpuwatch / plain = {out['throughput_ratio']}")


def priority() -> None:
    secs, rate = "40", "40"
    log("inference loop alone (under gpuwatch, high) ...")
    alone = Job("infer-alone", ["infer", secs, rate, "15", "10"], exec_under("--priority", "high"))
    alone.wait(200)
    a = alone.event("done", 1)
    log("inference loop (high) beside a training (low) ...")
    train = Job("train-low", ["train", "20", "100000"], exec_under("--priority", "low"))
    train.event("ready", 200)
    time.sleep(15)
    t_infer = time.time()
    infer = Job("infer-high", ["infer", secs, rate, "15", "10"], exec_under("--priority", "high"))
    infer.wait(200)
    t_done = time.time()
    b = infer.event("done", 1)
    time.sleep(5)
    train.proc.send_signal(signal.SIGINT)
    train.wait(30)

    def rate_between(t0: float, t1: float) -> float | None:
        points = [(e["t"], e["step"]) for e in train.events if e.get("event") == "progress" and t0 <= e["t"] <= t1]
        return (points[-1][1] - points[0][1]) / (points[-1][0] - points[0][0]) if len(points) > 1 else None

    results["priority"] = {"alone": a, "shared": b,
                           "p99_ratio": b["p99_ms"] / a["p99_ms"] if a and b else None,
                           "train_steps_per_s_alone": rate_between(t_infer - 14, t_infer),
                           "train_steps_per_s_beside_inference": rate_between(t_infer, t_done)}
    log(f"  priority: p99 alone {a and a['p99_ms']:.2f} ms, shared {b and b['p99_ms']:.2f} ms")


def quota() -> None:
    log("quota for a process not under the interposer ...")
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines() if line.split()[2] == "cgroup2"]
    cg = Path(mounts[0] if mounts else "/sys/fs/cgroup") / "gwvalidate"
    cg.mkdir(exist_ok=True)
    holder = Job("quota-holder", ["hold", "4"], stdin=True)
    grower = Job("quota-grower", ["hold", "8"], stdin=True)
    out: dict[str, Any] = {}
    try:
        for j in (holder, grower):
            (cg / "cgroup.procs").write_text(str(j.pid))
            j.event("ready", 120)
        for _ in range(4):
            holder.send("more")
        holder.event("allocated", 60)
        time.sleep(1)
        out["set"] = gw("quota", "set", "--cgroup", str(cg), "6GiB", check=False).stdout.strip()
        count = 0
        for _ in range(8):
            grower.send("more")
            time.sleep(1.5)
            e = grower.event("allocated", 0.1)
            if e and e["count"] == count:
                break
            count = e["count"] if e else count
        stat = Path(f"/proc/{grower.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        rows = ps()
        out["stopped_state"], out["allocated_before_stop"] = stat, count
        out["ps_state"] = rows.get(grower.pid, {}).get("state")
        out["device_bytes_at_stop"] = rows.get(grower.pid, {}).get("device_bytes")
        holder.send("free")
        time.sleep(3)
        e = grower.event("allocated", 10)
        out["after_free_count"], out["values_ok"] = e and e["count"], e and e["values_ok"]
        out["ps_state_after"] = ps().get(grower.pid, {}).get("state")
    finally:
        for j in (holder, grower):
            j.proc.kill()
            j.wait(10)
        try:
            cg.rmdir()
        except OSError:
            pass
    results["quota"] = out
    log(f"  quota: {out}")


def exec_oom() -> None:
    log("gpuwatch exec --mem-limit 6GiB: 1 GiB tensors until the quota ...")
    job = Job("exec-oom", ["oom"], exec_under("--mem-limit", "6GiB"))
    results["exec_oom"] = {"rc": job.wait(120), **(job.event("done", 1) or {"error": job.error()})}
    log(f"  exec_oom: {results['exec_oom']}")


def main() -> int:
    wanted = sys.argv[1:] or ["oversubscribe", "fits", "priority", "quota", "exec_oom"]
    unknown = [n for n in wanted if n not in SCENARIOS]
    if unknown:
        raise SystemExit(f"unknown scenario {unknown[0]!r}: choose from {', '.join(SCENARIOS)}")
    daemon = start_daemon()
    try:
        for name in wanted:
            try:
                SCENARIOS[name]()
            except Exception as exc:  # one scenario's failure must not hide the others
                results[name] = {"error": repr(exc)}
                log(f"{name} failed: {exc!r}")
            (OUT / "validate_enforcer.json").write_text(json.dumps(results, indent=1, default=str))
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
        uprobe_events = Path("/sys/kernel/tracing/uprobe_events")
        log("uprobe_events after the daemon stopped: "
            + repr(uprobe_events.read_text() if uprobe_events.exists() else ""))
    summary = {k: {kk: vv for kk, vv in v.items() if kk not in ("losses",)} if isinstance(v, dict) else v
               for k, v in results.items()}
    summary.get("alone", {}).pop("losses", None)
    print(json.dumps(summary, indent=1, default=str)[:6000])
    return 0


SCENARIOS = {"oversubscribe": oversubscribe, "fits": fits, "priority": priority, "quota": quota,
             "exec_oom": exec_oom, "alone_gpuwatch": alone_gpuwatch, "oversubscribe_plain": oversubscribe_plain}

if __name__ == "__main__":
    sys.exit(main())
