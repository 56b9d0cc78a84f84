"""Validates safe sharing (issue 11) on a GPU machine, as root with bcc importable:

    source .bcc/env.sh && source bench/gw-env.sh && make -C interposer && python3 bench/validate_sharing.py [SCENARIO]
    python3 bench/validate_sharing.py --dry-run [SCENARIO ...]     # prints the plan (PLAN below), starts nothing

Starts the checkout's daemon in its own session ([scheduler] room_wait_ms = 10000, metrics on loopback), runs each
scenario (default: all) within its bound, then kills its jobs and waits until NVML shows the GPU free. Jobs are this
file run as `job GIB [CHUNK_GIB]`: int32 tensors of CHUNK_GIB (1 GiB) filled with a pattern and checksummed, touched
(add 1, subtract 1) in a loop until told to stop on stdin; torch.OutOfMemoryError is reported ("oom", exit 0).
Writes $OUT/validate_sharing.json, $OUT/sharing-daemon.log, $OUT/sharing-jobs.stderr; exits 1 if a check failed.
"""
from __future__ import annotations

import json
from collections.abc import Callable
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

PLAN = {
    "four": "four `gpuwatch exec` jobs of 60 GiB, 5 s apart, stopped 60 s after the last start: none killed, "
            "MemAvailable (every 0.2 s) never under the daemon's host reserve, each ran with its checksum intact or "
            "got OOM; records peak pinned bytes, min MemAvailable, reasons seen in ps",
    "plain": "a plain PyTorch job of 100 GiB, then a `gpuwatch exec` job of 60 GiB: the plain one never stopped "
             "(/proc state never T, every 0.2 s) and progressing; the other gets OOM within room_wait_ms + 2 s, "
             "ps having said `waiting for device memory`",
    "pause": "`gpuwatch pause PID --swap` on a 30 GiB job beside a 60 GiB one: for 60 s swapped, `paused by hand`, "
             "small in NVML, no progress; after `gpuwatch resume PID` running on, checksum intact",
    "cgroup": "a job in a cgroup with memory.max 16 GiB holding 40 GiB, then a job asking for one 120 GiB tensor: "
              "the first not swapped out past its cgroup (daemon log `not swapped out`), no oom_kill, intact; the "
              "second gets OOM (or runs). Skipped, saying why, without a writable cgroup v2 memory controller"}
COST_S = {"four": 200, "plain": 70, "pause": 110, "cgroup": 75}  # typical length, cleanup included
GiB = 1 << 30
RUNDIR = Path("/tmp/gw-sharing")  # only root may write the daemon's socket directory
RUNDIR.mkdir(mode=0o755, exist_ok=True)
RUNDIR.chmod(0o755)
SOCKET, METRICS, ROOM_WAIT_S = str(RUNDIR / "gw.sock"), "127.0.0.1:9446", 10.0
GW = [sys.executable, "-P", "-m", "gpuwatch.client.cli", "--socket", SOCKET]
EXEC = [*GW, "exec", "--"]
OUT, CGROUP = Path(os.environ.get("OUT", "/tmp")), Path("/sys/fs/cgroup/gwsharing")
BUDGET_S = float(os.environ.get("GW_BUDGET_S", "540"))  # a scenario that would end past this is skipped
T0, LOCK, JOBS = time.time(), threading.Lock(), []


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} +{time.time() - T0:5.1f}s {msg}", flush=True)


def gb(n: Any) -> str:
    return "-" if n is None else f"{n / GiB:.1f}G"


def emit(**fields: Any) -> None:
    print("RESULT " + json.dumps({**fields, "t": time.time()}), flush=True)


def job(gib: str, chunk_gib: str = "1", max_s: str = "400") -> None:
    """The job (child side): torch only, no gpuwatch."""
    import torch
    torch.zeros(1, device="cuda")
    stop, chunk = threading.Event(), float(chunk_gib)
    threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
    n, tensors, sums = int(chunk * GiB) // 4, [], []

    def checksum(t: Any) -> tuple[int, ...]:  # in 16 MiB pieces: a cast of the whole tensor would need 2x its size
        return tuple(int(torch.stack([c.sum(dtype=torch.int64) for c in v.split(1 << 22)]).sum()) for v in (t, t[1::3]))

    while len(tensors) * chunk < float(gib):
        asked, key, got = time.time(), (len(tensors) + 1) * 40503 % 65521, None
        try:
            t = torch.empty(n, dtype=torch.int32, device="cuda")
            got = time.time()
            if n < 1 << 31:
                torch.arange(n, dtype=torch.int32, device="cuda", out=t).bitwise_xor_(key)
            else:
                t.fill_(key)
            sums.append(checksum(t))
        except torch.OutOfMemoryError as exc:
            return emit(event="oom", allocated_gib=len(tensors) * chunk, wait_s=round(time.time() - asked, 2),
                        in_allocation=got is None, error=str(exc).splitlines()[0][:200])
        tensors.append(t)
    emit(event="allocated", gib=len(tensors) * chunk)
    iterations, last, deadline = 0, 0.0, time.time() + float(max_s)
    while not stop.is_set() and time.time() < deadline:
        for op in ("add_", "sub_"):
            for t in tensors:
                getattr(t, op)(1)
        torch.cuda.synchronize()
        iterations += 1
        if time.time() - last >= 0.5:
            emit(event="progress", n=iterations)
            last = time.time()
        time.sleep(0.05)
    bad = [i for i, t in enumerate(tensors) if checksum(t) != sums[i]]
    emit(event="done", intact=not bad, bad_tensors=bad[:10], iterations=iterations)


class Job:
    """A job in its own session; RESULT lines collected as they come, stderr into one shared file."""

    def __init__(self, name: str, args: list[str], under: list[str] | None, cgroup: Path | None = None,
                 script: str = __file__) -> None:
        """script: the file whose `job` subcommand this runs (another validation script's own jobs)."""
        self.name, self.events, self.killed = name, [], False
        pre = (lambda: (cgroup / "cgroup.procs").write_text(str(os.getpid()))) if cgroup else None
        self.proc = subprocess.Popen([*(under or []), sys.executable, script, "job", *args], text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     start_new_session=True, preexec_fn=pre)
        self.pid = self.proc.pid
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._errors, daemon=True).start()
        JOBS.append(self)
        log(f"  started {name} pid {self.pid}")

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("RESULT "):
                self.events.append(json.loads(line[7:]))

    def _errors(self) -> None:
        for line in self.proc.stderr:
            with LOCK, open(OUT / "sharing-jobs.stderr", "a") as f:
                f.write(f"{time.strftime('%H:%M:%S')} {self.name}[{self.pid}] {line}")

    def last(self, *kinds: str) -> dict[str, Any] | None:
        return next((e for e in reversed(self.events) if e["event"] in kinds), None)

    def wait_for(self, *kinds: str, timeout: float = 120) -> dict[str, Any] | None:
        deadline = time.time() + timeout
        while time.time() < deadline and self.proc.poll() is None and not self.last(*kinds):
            time.sleep(0.1)
        time.sleep(0.2)  # the reader's last lines
        return self.last(*kinds)

    def progress(self) -> int:
        return (self.last("progress") or {"n": 0})["n"]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.killed = True
            os.killpg(self.pid, signal.SIGKILL)

    def outcome(self) -> dict[str, Any]:
        end, allocated = self.last("done", "oom") or {}, self.last("allocated")
        return {"name": self.name, "pid": self.pid, "rc": self.proc.poll(), "killed_by_validator": self.killed,
                "result": end.get("event"), "allocated_at": allocated and round(allocated["t"] - T0, 1),
                "last_progress": self.progress(), **{k: v for k, v in end.items() if k not in ("event", "t")}}


def end_all(jobs: list[Job], timeout: float) -> list[dict[str, Any]]:
    """Tells every job to stop, waits for all (together at most `timeout`), kills what is left: outcomes."""
    for j in jobs:
        if j.proc.poll() is None:
            j.proc.stdin.write("stop\n")
            j.proc.stdin.flush()
    deadline = time.time() + timeout
    for j in jobs:
        try:
            j.proc.wait(max(deadline - time.time(), 0.1))
        except subprocess.TimeoutExpired:
            j.kill()
            j.proc.wait()
    time.sleep(0.3)
    return [j.outcome() for j in jobs]


def call(cmd: str, **args: Any) -> Any:
    from gpuwatch.core.protocol import Client  # the checkout's package, on bench/gw-env.sh's PYTHONPATH
    with Client(SOCKET, timeout=30) as client:
        return client.call(cmd, **args)


def gw(*args: str) -> dict[str, Any]:
    t = time.time()
    p = subprocess.run([*GW, *args], capture_output=True, text=True, timeout=150)
    return {"rc": p.returncode, "out": (p.stdout + p.stderr).strip()[:300], "s": round(time.time() - t, 2)}


def meminfo() -> dict[str, int]:
    return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in open("/proc/meminfo"))}


class Sampler(threading.Thread):
    """Every 0.2 s MemAvailable and the /proc state of `stat_pids`; every 0.4 s the daemon's ps and status."""

    def __init__(self, stat_pids: tuple[int, ...] = ()) -> None:
        super().__init__(daemon=True)
        self.halt, self.stat_pids, self.stat_states = threading.Event(), stat_pids, {p: set() for p in stat_pids}
        self.min_avail = self.min_total = 1 << 62
        self.peak_pinned = self.peak_swapped = 0
        self.rows: list[tuple[float, dict[int, dict[str, Any]]]] = []
        self.start()

    def run(self) -> None:
        tick = 0
        while not self.halt.wait(0.2):
            m, tick = meminfo(), tick + 1
            self.min_avail, self.min_total = min(self.min_avail, m["MemAvailable"]), min(self.min_total, m["MemTotal"])
            for pid in self.stat_pids:
                try:
                    self.stat_states[pid].add(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0])
                except (OSError, IndexError):
                    pass
            if tick % 2:  # ps and status every 0.4 s
                continue
            try:
                rows, host = call("ps"), call("status").get("host") or {}
            except Exception:
                continue
            self.peak_pinned = max(self.peak_pinned, host.get("pinned_bytes", 0))
            self.peak_swapped = max(self.peak_swapped, host.get("swapped_bytes", 0))
            keep = ("state", "reason", "nvml_bytes", "device_bytes", "swapped_bytes", "swap_pinned_bytes")
            self.rows.append((time.time(), {r["pid"]: {k: r.get(k) for k in keep} for r in rows}))
            if tick % 50 == 0:
                log("  ps " + "; ".join(f"{p} {r['state']} {r['reason'] or '-'} dev {gb(r['device_bytes'])} nvml "
                                        f"{gb(r['nvml_bytes'])} swapped {gb(r['swapped_bytes'])}"
                                        for p, r in self.rows[-1][1].items())
                    + f" | pinned {gb(host.get('pinned_bytes'))} avail {gb(m['MemAvailable'])} of {gb(m['MemTotal'])}")

    def end(self) -> dict[str, Any]:
        self.halt.set()
        self.join(5)
        return {"min_mem_available": self.min_avail, "min_mem_total": self.min_total,
                "peak_pinned_bytes": self.peak_pinned, "peak_swapped_bytes": self.peak_swapped,
                "reasons_seen": sorted({r["reason"] for _, rs in self.rows for r in rs.values() if r["reason"]}),
                "states_seen": sorted({r["state"] for _, rs in self.rows for r in rs.values() if r["state"]})}

    def seen(self, pid: int, key: str, since: float = 0, until: float = 1e18) -> list[Any]:
        return [rows[pid][key] for t, rows in self.rows if since <= t <= until and pid in rows]


def daemon_lines(*needles: str) -> list[str]:
    return [line.strip() for line in (OUT / "sharing-daemon.log").read_text().splitlines()
            if all(n in line for n in needles)]


def four() -> dict[str, Any]:
    status = subprocess.run([*GW, "status", "--json"], capture_output=True, text=True, timeout=60).stdout
    reserve = json.loads(status)["host"]["reserve_bytes"]  # what `gpuwatch status --json` says
    s, jobs = Sampler(), []
    for i in range(4):
        jobs.append(Job(f"four-{i}", ["60"], EXEC))
        time.sleep(5 if i < 3 else 60)
    outcomes = end_all(jobs, 100)
    out = {"reserve_bytes": reserve, **s.end(), "jobs": outcomes}
    out["checks"] = {"none_killed": all(o["rc"] == 0 for o in outcomes),
                     "mem_available_above_reserve": s.min_avail >= reserve,
                     "each_ran_intact_or_oom": all(o["result"] == "oom" or (o["result"] == "done" and o["intact"])
                                                   for o in outcomes)}
    return out


def plain() -> dict[str, Any]:
    p = Job("plain-100", ["100"], None)
    if not p.wait_for("progress", timeout=120):
        return {"error": "the plain job did not allocate 100 GiB", "jobs": [p.outcome()], "checks": {"setup": False}}
    s = Sampler((p.pid,))
    time.sleep(3)
    t_start, n_start = time.time(), p.progress()
    e = Job("plain-exec-60", ["60"], EXEC)
    end = e.wait_for("oom", "done", timeout=60)
    time.sleep(2)
    n_end = p.progress()
    times = [ev["t"] for ev in p.events if ev["event"] == "progress" and ev["t"] >= t_start]
    gap = max([b - a for a, b in zip(times, times[1:])], default=99)
    outs = end_all([p, e], 60)
    out = {**s.end(), "plain_proc_states": sorted(s.stat_states[p.pid]), "plain_progress": [n_start, n_end],
           "plain_max_progress_gap_s": round(gap, 2), "exec_reasons": sorted({r for r in s.seen(e.pid, "reason") if r}),
           "exec_launch_to_end_s": round(end["t"] - t_start, 2) if end else None, "jobs": outs,
           "exec_denials": daemon_lines(f"pid {e.pid}: ", "found no room")}
    out["checks"] = {"plain_never_stopped": bool(s.stat_states[p.pid]) and not s.stat_states[p.pid] & {"T", "t"},
                     "plain_progressed": n_end > n_start and gap < 3,
                     "exec_oom_in_time": bool(end and end["event"] == "oom" and end["wait_s"] <= ROOM_WAIT_S + 2),
                     "exec_reason_waiting_for_device_memory": "waiting for device memory" in out["exec_reasons"],
                     "exec_exit_0": outs[1]["rc"] == 0}
    return out


def pause() -> dict[str, Any]:
    a, b = Job("pause-30", ["30"], EXEC), Job("pause-60", ["60"], EXEC)
    if not (a.wait_for("progress") and b.wait_for("progress")):
        return {"error": "the jobs did not allocate", "jobs": [a.outcome(), b.outcome()], "checks": {"setup": False}}
    s = Sampler()
    time.sleep(3)
    paused = gw("pause", str(a.pid), "--swap")
    log(f"  pause: {paused}")
    t_paused, na0, nb0 = time.time(), a.progress(), b.progress()
    time.sleep(30)
    try:
        metrics = [line for line in urllib.request.urlopen(f"http://{METRICS}/metrics", timeout=10).read().decode()
                   .splitlines() if line.startswith(("gpuwatch_process_waiting", "gpuwatch_host_"))]
    except OSError as exc:
        metrics = [repr(exc)]
    time.sleep(30)
    t_resume, na1, nb1 = time.time(), a.progress(), b.progress()
    resumed = gw("resume", str(a.pid))
    log(f"  resume: {resumed}")
    time.sleep(8)
    na2, state_after = a.progress(), next((r["state"] for r in call("ps") if r["pid"] == a.pid), None)
    outs = end_all([a, b], 60)
    states, reasons = s.seen(a.pid, "state", t_paused, t_resume), s.seen(a.pid, "reason", t_paused, t_resume)
    # NVML is read every 0.25 s on its own thread: samples from 2 s after the pause returned
    nvml = [n for n in s.seen(a.pid, "nvml_bytes", t_paused + 2, t_resume) if n is not None]
    out = {**s.end(), "pause_cmd": paused, "resume_cmd": resumed, "samples_while_paused": len(states),
           "states_while_paused": sorted(set(states)), "reasons_while_paused": sorted({str(r) for r in reasons}),
           "max_nvml_while_paused": max(nvml, default=None), "paused_job_progress": [na0, na1, na2],
           "other_job_progress": [nb0, nb1], "state_after_resume": state_after, "metrics": metrics, "jobs": outs}
    out["checks"] = {
        "pause_ok": paused["rc"] == 0, "swapped_all_along": len(states) >= 40 and set(states) == {"swapped"},
        "paused_by_hand_all_along": bool(reasons) and set(reasons) == {"paused by hand"},
        "small_in_nvml": bool(nvml) and max(nvml) < 2 * GiB, "no_progress_while_paused": na1 - na0 <= 1,
        "other_ran_on": nb1 > nb0, "resumed_running": resumed["rc"] == 0 and state_after == "running",
        "continues": na2 > na1, "intact": all(o["result"] == "done" and o["intact"] and o["rc"] == 0 for o in outs)}
    return out


def cgroup() -> dict[str, Any]:
    cg, note = CGROUP, ""
    if not (cg.parent / "cgroup.controllers").exists():
        return {"skipped": f"no cgroup v2 hierarchy at {cg.parent}"}
    try:
        control = cg.parent / "cgroup.subtree_control"
        if "memory" not in control.read_text().split():
            control.write_text("+memory")
            note = "enabled +memory in the root cgroup's subtree_control"
        cg.mkdir(exist_ok=True)
        (cg / "memory.max").write_text(str(16 * GiB))
    except OSError as exc:
        return {"skipped": f"cgroup v2 memory control not writable: {exc!r}"}
    a = Job("cgroup-40", ["40"], EXEC, cgroup=cg)
    if not a.wait_for("progress"):
        return {"error": "the cgroup job did not allocate", "jobs": [a.outcome()], "checks": {"setup": False}}
    s = Sampler()
    time.sleep(2)
    b = Job("cgroup-120", ["120", "120"], EXEC)
    end = b.wait_for("oom", "done", timeout=60)
    na = a.progress()
    time.sleep(3)
    progressed = a.progress() > na
    outs = end_all([a, b], 60)
    events = dict(line.split() for line in (cg / "memory.events").read_text().splitlines())
    peak = (cg / "memory.peak").read_text().strip() if (cg / "memory.peak").exists() else None
    logged = daemon_lines(f"pid {a.pid} is not swapped out")
    out = {**s.end(), "note": note, "memory_events": events, "memory_peak": peak, "first_progressing": progressed,
           "first_swapped_max": max([n or 0 for n in s.seen(a.pid, "swapped_bytes")], default=0),
           "second_reasons": sorted({r for r in s.seen(b.pid, "reason") if r}), "not_swapped_out_log": logged[:3],
           "not_swapped_out_lines": len(logged), "jobs": outs,
           "second_daemon_lines": [line for line in daemon_lines(f"pid {b.pid} ") if "attached" not in line][:12]}
    out["checks"] = {"first_not_oom_killed": int(events.get("oom_kill", 0)) == 0 and outs[0]["rc"] == 0,
                     "first_intact": outs[0]["result"] == "done" and bool(outs[0].get("intact")),
                     # Since c27870a the scheduler does not plan a swap-out the cgroup cannot take (the
                     # process counts as unmovable), so the daemon's refusal line is no longer the evidence:
                     # what it held in host memory never passed its cgroup's 16 GiB.
                     "first_not_swapped_past_its_cgroup": out["first_swapped_max"] < 16 * GiB,
                     "second_oom_or_ran": bool(end) and outs[1]["rc"] == 0}
    return out


def cleanup() -> float:
    """Kills every job, then waits (at most 60 s) until NVML shows no compute process and under 2 GiB used."""
    for j in JOBS:
        j.kill()
    JOBS.clear()
    t = time.time()
    while time.time() - t < 60:
        apps, used = (subprocess.run(["nvidia-smi", f"--query-{q}", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True).stdout.split()
                      for q in ("compute-apps=pid", "gpu=memory.used"))
        if not apps and used and int(used[0]) < 2048:
            break
        time.sleep(1)
    try:
        CGROUP.rmdir()
    except OSError:
        pass
    return round(time.time() - t, 1)


def start_daemon(config_text: str | None = None, log_name: str = "sharing-daemon.log",
                 fresh_log: bool = True) -> subprocess.Popen:
    """The checkout's daemon in its own session, its output timestamped into OUT/log_name; returns once it answers.
    config_text: its configuration (default: this scenario set's)."""
    config = Path(f"/tmp/gw-{Path(log_name).stem.removesuffix('-daemon')}.toml")
    config.write_text(config_text or
                      f'[scheduler]\nroom_wait_ms = {int(ROOM_WAIT_S * 1000)}\n\n[metrics]\nlisten = "{METRICS}"\n')
    daemon = subprocess.Popen([*GW, "run", "--config", str(config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True)

    def keep() -> None:
        with open(OUT / log_name, "w" if fresh_log else "a") as f:
            for line in daemon.stdout:
                f.write(f"{time.strftime('%H:%M:%S')}.{int(time.time() * 1000) % 1000:03d} {line}")
                f.flush()

    threading.Thread(target=keep, daemon=True).start()
    for _ in range(1200):
        try:
            call("status")
            return daemon
        except Exception:
            if daemon.poll() is not None:
                raise SystemExit(f"the daemon exited: see {log_name}") from None
            time.sleep(0.1)
    raise SystemExit("the daemon did not answer in 120 s")


def chosen(scenarios: dict[str, Any]) -> list[str]:
    """The scenarios named on the command line (options aside), or all; one line for an unknown name."""
    wanted = [a for a in sys.argv[1:] if not a.startswith("-")] or list(scenarios)
    if unknown := [n for n in wanted if n not in scenarios]:
        raise SystemExit(f"unknown scenario {unknown[0]!r}: choose from {', '.join(scenarios)}")
    return wanted


def run_scenarios(scenarios: dict[str, Callable[[], dict[str, Any]]], wanted: list[str], out_file: str,
                  daemon: Callable[[], subprocess.Popen | None], results: dict[str, Any] | None = None,
                  skip: Callable[[str], str | None] = lambda name: None) -> int:
    """Each wanted scenario in turn (one's failure does not hide the others; `skip` says why one is not run),
    the GPU cleaned after each, the results in OUT/out_file; then the daemon (`daemon()`: the one running now)
    is stopped. Returns 1 on a FAIL or where the daemon had died."""
    results = results if results is not None else {}
    try:
        for name in wanted:
            if (why := skip(name)) is not None:
                results[name] = {"skipped": why}
                continue
            log(f"scenario {name}")
            try:
                results[name] = scenarios[name]()
            except Exception as exc:  # one scenario's failure must not hide the others
                results[name] = {"error": repr(exc), "checks": {"ran": False}}
            results[name]["gpu_free_after_s"] = cleanup()
            log(f"  {name}: {json.dumps(results[name], default=str)[:3000]}")
            (OUT / out_file).write_text(json.dumps(results, indent=1, default=str))
    finally:
        cleanup()
        running = daemon()
        results["daemon_alive_at_end"] = running is not None and running.poll() is None
        if running is not None:
            running.send_signal(signal.SIGTERM)
            try:
                running.wait(60)
            except subprocess.TimeoutExpired:
                running.kill()
    results["verdicts"] = verdicts = {n: "skipped" if "skipped" in results[n] else "pass" if all(
        results[n].get("checks", {"none": False}).values()) else "FAIL" for n in wanted}
    (OUT / out_file).write_text(json.dumps(results, indent=1, default=str))
    print(json.dumps({n: {"verdict": v, "checks": results[n].get("checks"), "skipped": results[n].get("skipped")}
                      for n, v in verdicts.items()}, indent=1))
    return 1 if "FAIL" in verdicts.values() or not results["daemon_alive_at_end"] else 0


SCENARIOS = {"four": four, "plain": plain, "pause": pause, "cgroup": cgroup}


def main() -> int:
    if sys.argv[1:2] == ["job"]:
        return job(*sys.argv[2:]) or 0
    wanted = chosen(SCENARIOS)
    if "--dry-run" in sys.argv:
        print(f"daemon: {' '.join(GW)} run --config /tmp/gw-sharing.toml (room_wait_ms {ROOM_WAIT_S * 1000:.0f}, "
              f"metrics {METRICS}); budget {BUDGET_S:.0f} s; output in {OUT}\njobs: {' '.join(EXEC)} "
              f"{sys.executable} {__file__} job GIB [CHUNK_GIB]")
        for name in wanted:
            print(f"{name} (about {COST_S[name]} s): {PLAN[name]}")
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    m = meminfo()
    results: dict[str, Any] = {"host_at_start": {"MemTotal": m["MemTotal"], "MemAvailable": m["MemAvailable"]}}
    log(f"host MemTotal {gb(m['MemTotal'])}, MemAvailable {gb(m['MemAvailable'])}; GPU free after {cleanup()} s")
    daemon = start_daemon()
    log(f"daemon up; status host {call('status').get('host')}")

    def over_budget(name: str) -> str | None:
        used = time.time() - T0
        return f"time budget: {used:.0f} s used of {BUDGET_S:.0f}" if used + COST_S[name] > BUDGET_S else None
    return run_scenarios(SCENARIOS, wanted, "validate_sharing.json", lambda: daemon, results, over_budget)


if __name__ == "__main__":
    sys.exit(main())
