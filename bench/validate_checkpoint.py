"""Validates moving processes that never ran under gpuwatch (issue 13: the driver's checkpoint API) on a GPU
machine, as root with bcc importable:

    source .bcc/env.sh && source bench/gw-env.sh && make -s -C interposer && \\
      python3 bench/validate_checkpoint.py [SCENARIO ...]

Scenarios (default: all, in this order; the two 90 GiB plain trainings are `validate_enforcer.py
oversubscribe_plain`, the checkpoint rate is `bench/checkpoint_bench.py`):
  pause     `gpuwatch pause PID --swap` on a plain 20 GiB job computing in a loop: checkpointed, NVML shows nothing
            for it, no progress; resume: running, progressing, checksums intact. Again with the daemon SIGKILLed
            while it is checkpointed and a new daemon started (it takes the process over, `ps` says checkpointed,
            its resume restores it); and a third time with no daemon at all: `gpuwatch resume PID` as root.
  refused   a plain process holding managed memory and a pair sharing memory by legacy CUDA IPC: `pause --swap`
            is refused with the driver's words, `ps` marks them unmovable with that reason, all keep running.
  notebook  a plain idle process holding 80 GiB (a notebook), then a plain training needing about 100 GiB: the
            training runs (the idle one checkpointed), the idle one, touched meanwhile, waits and then gets its
            data back once the training ends; how long it waited.
  mixed     a plain job holding 100 GiB and computing, then a `gpuwatch exec` job of 60 GiB: both complete with
            their checksums (the plain one checkpointed while the other runs).
The daemon runs with [scheduler] quantum_ms = 10000 (notebook: derived) and room_wait_ms = 120000. Writes
$OUT/validate_checkpoint.json and $OUT/checkpoint-daemon.log; exits 1 if a check failed.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import validate_sharing as vs
from validate_sharing import GW, OUT, Job, call, gw, log

GiB = 1 << 30
JOB = str(Path(__file__).resolve().parent / "enforcer_job.py")
DAEMON: dict[str, subprocess.Popen] = {}
# The sizes are 80 (notebook) and 100 + 60 (mixed); on the 125 GiB H200 host a checkpoint is asked for
# only with 1.5x its size spare (enforcer/checkpointer.py HOST_FACTOR), so the plain sides are 60 GiB here.
NOTEBOOK_GIB = os.environ.get("GW_NOTEBOOK_GIB", "60")
MIXED_PLAIN_GIB, MIXED_EXEC_GIB = os.environ.get("GW_MIXED_PLAIN_GIB", "60"), os.environ.get("GW_MIXED_EXEC_GIB", "90")


# ------------------------------------------------------------------------------------------------ jobs (child side)

def job(kind: str, gib: str = "0", mode: str = "busy", max_s: str = "400") -> None:
    """hold: int32 tensors of 1 GiB with a pattern, touched in a loop (busy) or on each `touch` line (idle);
    managed: 1 GiB of managed memory through the driver; ipc: a 1 GiB tensor shared with a spawned child."""
    if kind == "managed":
        return _managed(int(float(gib) * GiB) or GiB)
    if kind == "ipc":
        return _ipc()
    import torch
    torch.zeros(1, device="cuda")
    n, tensors, sums, lines = GiB // 4, [], [], []
    stop = threading.Event()

    def read() -> None:
        for line in sys.stdin:
            lines.append(line.strip())
            if line.strip() == "stop":
                stop.set()
        stop.set()
    threading.Thread(target=read, daemon=True).start()

    def checksum(t: Any) -> int:
        return int(torch.stack([c.sum(dtype=torch.int64) for c in t.split(1 << 22)]).sum())

    for i in range(int(float(gib))):
        t = torch.empty(n, dtype=torch.int32, device="cuda")
        torch.arange(n, dtype=torch.int32, device="cuda", out=t).bitwise_xor_((i + 1) * 40503 % 65521)
        tensors.append(t)
        sums.append(checksum(t))
    vs.emit(event="allocated", gib=len(tensors))

    def touch() -> None:
        for op in ("add_", "sub_"):
            for t in tensors:
                getattr(t, op)(1)
        torch.cuda.synchronize()

    iterations, last, deadline, seen = 0, 0.0, time.time() + float(max_s), 0
    while not stop.is_set() and time.time() < deadline:
        if mode == "idle":
            if len(lines) > seen:
                seen, asked = seen + 1, time.time()
                touch()
                vs.emit(event="touched", asked=asked, waited_s=round(time.time() - asked, 2))
            time.sleep(0.05)
            continue
        touch()
        iterations += 1
        if time.time() - last >= 0.5:
            vs.emit(event="progress", n=iterations)
            last = time.time()
    bad = [i for i, t in enumerate(tensors) if checksum(t) != sums[i]]
    vs.emit(event="done", intact=not bad, bad_tensors=bad[:10], iterations=iterations)


def _managed(nbytes: int) -> None:
    cuda = ctypes.CDLL("libcuda.so.1")
    ctx, ptr = ctypes.c_void_p(), ctypes.c_uint64()
    assert cuda.cuInit(0) == 0 and cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), 0) == 0
    assert cuda.cuCtxSetCurrent(ctx) == 0
    rc = cuda.cuMemAllocManaged(ctypes.byref(ptr), ctypes.c_size_t(nbytes), 1)
    rc2 = cuda.cuMemsetD8_v2(ptr, 7, ctypes.c_size_t(nbytes))
    vs.emit(event="allocated", rc=rc, memset=rc2)
    n = 0
    while sys.stdin.readline().strip() not in ("stop", ""):
        n += 1
    vs.emit(event="done", intact=True, iterations=n)


def _child(q: Any, back: Any) -> None:
    t = q.get()  # a CUDA tensor through legacy IPC
    while True:
        back.put((os.getpid(), int(t.sum())))
        q.get()  # the next request


def _ipc() -> None:
    import torch
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    q, back = ctx.Queue(), ctx.Queue()
    t = torch.ones(GiB // 4, dtype=torch.int32, device="cuda")
    child = ctx.Process(target=_child, args=(q, back), daemon=True)
    child.start()
    q.put(t)
    vs.emit(event="allocated", child=child.pid, child_sum=back.get(timeout=120)[1])
    while (line := sys.stdin.readline().strip()) not in ("stop", ""):
        if line == "sum":  # the child reads the shared memory again
            q.put("sum")
            vs.emit(event="child_sum", sum=back.get(timeout=300)[1], own=int(t.sum()))
    child.kill()
    vs.emit(event="done", intact=int(t.sum()) == GiB // 4)


# ------------------------------------------------------------------------------------------------ the daemon

def start_daemon(fresh_log: bool = True, quantum_ms: int = 10000) -> subprocess.Popen:
    """quantum_ms 0: the scheduler derives it from the cost of the moves it plans."""
    DAEMON["proc"] = vs.start_daemon(f"[scheduler]\nquantum_ms = {quantum_ms}\nroom_wait_ms = 120000\n\n"
                                     "[metrics]\nenabled = false\n", "checkpoint-daemon.log", fresh_log)
    return DAEMON["proc"]


def restart_daemon(quantum_ms: int) -> None:
    daemon = DAEMON.pop("proc")
    daemon.send_signal(signal.SIGTERM)
    daemon.wait(120)
    start_daemon(fresh_log=False, quantum_ms=quantum_ms)


def kill_daemon() -> None:
    daemon = DAEMON.pop("proc")
    os.killpg(daemon.pid, signal.SIGKILL)
    daemon.wait()


def nvml_bytes(pid: int) -> int | None:
    """What NVML lists for the process (None: not listed)."""
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True).stdout
    for line in out.splitlines():
        p, used = (x.strip() for x in line.split(","))
        if p == str(pid):
            return int(used) << 20
    return None


def row(pid: int) -> dict[str, Any]:
    return next((r for r in call("ps") if r["pid"] == pid), {})


def wait_until(predicate: Any, seconds: float) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return True
    return False


def progressing(j: Job, seconds: float = 2.0) -> bool:
    before = j.progress()
    time.sleep(seconds)
    return j.progress() > before


# ------------------------------------------------------------------------------------------------ scenarios

def pause() -> dict[str, Any]:
    j = Job("pause-20g", ["hold", "20"], None, script=__file__)
    assert j.wait_for("allocated", timeout=120), "the job did not allocate"
    out: dict[str, Any] = {"nvml_before": nvml_bytes(j.pid)}
    cycles = []
    for how in ("daemon", "daemon_killed_and_restarted", "no_daemon"):
        c: dict[str, Any] = {"how": how, "pause": gw("pause", str(j.pid), "--swap")}
        time.sleep(1)
        c["ps_after_pause"] = {k: row(j.pid).get(k) for k in ("state", "reason", "swapped_bytes")}
        c["nvml_checkpointed"], c["progress_while_checkpointed"] = nvml_bytes(j.pid), progressing(j, 3)
        if how != "daemon":
            kill_daemon()
        if how == "daemon_killed_and_restarted":
            start_daemon(fresh_log=False)
            time.sleep(1)
            c["ps_new_daemon"] = {k: row(j.pid).get(k) for k in ("state", "reason")}
        c["resume"] = gw("resume", str(j.pid))
        c["progress_after_resume"], c["nvml_after_resume"] = progressing(j, 3), nvml_bytes(j.pid)
        if how == "no_daemon":
            start_daemon(fresh_log=False)
        cycles.append(c)
        log(f"  {how}: {json.dumps(c)[:600]}")
    end = vs.end_all([j], 60)[0]
    out.update(cycles=cycles, end=end)
    out["checks"] = {
        "checkpointed_each_time": all(c["pause"]["rc"] == 0 and c["ps_after_pause"]["state"] == "checkpointed"
                                      for c in cycles),
        "nvml_nothing_while_checkpointed": all(not c["nvml_checkpointed"] for c in cycles),
        "no_progress_while_checkpointed": not any(c["progress_while_checkpointed"] for c in cycles),
        "new_daemon_took_over": cycles[1].get("ps_new_daemon", {}).get("state") == "checkpointed",
        "resumed_each_time": all(c["resume"]["rc"] == 0 and c["progress_after_resume"] for c in cycles),
        "intact": end.get("intact") is True}
    return out


def refused() -> dict[str, Any]:
    """Managed memory: refused. A legacy IPC pair (exporter, importer): whatever the driver does with each is
    recorded; what it moves must come back with the data the other side sees intact."""
    managed, ipc = Job("managed", ["managed", "1"], None, script=__file__), Job("ipc", ["ipc"], None, script=__file__)
    ready = [j.wait_for("allocated", timeout=120) for j in (managed, ipc)]
    importer = (ready[1] or {}).get("child", 0)
    answers = {name: gw("pause", str(pid), "--swap") for name, pid in
               (("managed", managed.pid), ("exporter", ipc.pid), ("importer", importer))}
    time.sleep(1)
    rows = {name: row(pid) for name, pid in (("managed", managed.pid), ("exporter", ipc.pid), ("importer", importer))}
    again = gw("pause", str(managed.pid), "--swap")
    resumed = {name: gw("resume", str(pid)) for name, pid in (("importer", importer), ("exporter", ipc.pid))
               if rows[name].get("state") in ("checkpointed", "paused")}
    ipc.proc.stdin.write("sum\n")
    ipc.proc.stdin.flush()
    child_sum = ipc.wait_for("child_sum", timeout=60)
    alive = managed.proc.poll() is None and ipc.proc.poll() is None
    ends = vs.end_all([managed, ipc], 30)
    out = {"ready": ready, "answers": answers, "rows": {k: {x: r.get(x) for x in ("state", "unmovable")}
                                                        for k, r in rows.items()},
           "again": again, "resumed": resumed, "child_sum_after": child_sum, "ends": ends}
    out["checks"] = {"managed_refused_and_unmovable": answers["managed"]["rc"] != 0
                     and bool(rows["managed"].get("unmovable")) and rows["managed"].get("state") == "running",
                     "managed_not_retried": again["rc"] != 0 and "cannot be checkpointed" in again["out"],
                     "ipc_data_intact_on_both_sides": bool(child_sum) and child_sum["sum"] == GiB // 4
                     and child_sum["own"] == GiB // 4,
                     "all_kept_running": alive and all(e.get("intact") for e in ends)}
    return out


def notebook() -> dict[str, Any]:
    restart_daemon(quantum_ms=0)  # derived: a checkpoint of 80 GiB is no reason for a short slice
    idle = Job(f"notebook-{NOTEBOOK_GIB}g", ["hold", NOTEBOOK_GIB, "idle"], None, script=__file__)
    assert idle.wait_for("allocated", timeout=180), "the notebook did not allocate"
    t0 = time.time()
    train = _train_job("95", "300")
    states = []
    touched_at = None
    while train.proc.poll() is None and time.time() - t0 < 400:
        r = row(idle.pid)
        states.append((round(time.time() - t0, 1), r.get("state"), r.get("reason")))
        if touched_at is None and r.get("state") == "checkpointed" and train.progress_events():
            idle.proc.stdin.write("touch\n")
            idle.proc.stdin.flush()
            touched_at = time.time()
        time.sleep(1)
    touched = idle.wait_for("touched", timeout=180)
    train_done = train.last("done")
    end = vs.end_all([idle], 60)[0]
    out = {"states": states, "train_rc": train.proc.poll(), "train_done": bool(train_done),
           "train_intact": train_done and train_done.get("buffer_intact"), "touched": touched,
           "touch_waited_s": touched and touched.get("waited_s"), "idle_end": end}
    out["checks"] = {"training_ran": train.proc.poll() == 0 and bool(train_done),
                     "idle_checkpointed": any(s[1] == "checkpointed" for s in states),
                     "idle_got_its_data_back": bool(touched) and end.get("intact") is True}
    return out


def _train_job(buffer_gib: str, steps: str) -> Any:
    """enforcer_job.py train BUFFER STEPS, plainly, its RESULT lines collected."""
    class Train(Job):
        def __init__(self) -> None:
            self.name, self.events, self.killed = "train", [], False
            self.proc = subprocess.Popen([sys.executable, JOB, "train", buffer_gib, steps], text=True,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         start_new_session=True)
            self.pid = self.proc.pid
            threading.Thread(target=self._read, daemon=True).start()
            threading.Thread(target=self._errors, daemon=True).start()
            vs.JOBS.append(self)

        def progress_events(self) -> int:
            return sum(e["event"] == "progress" for e in self.events)
    return Train()


def mixed() -> dict[str, Any]:
    restart_daemon(quantum_ms=10000)
    plain = Job(f"plain-{MIXED_PLAIN_GIB}g", ["hold", MIXED_PLAIN_GIB, "busy", "300"], None, script=__file__)
    assert plain.wait_for("allocated", timeout=180), "the plain job did not allocate"
    t0 = time.time()
    other = Job(f"exec-{MIXED_EXEC_GIB}g", ["hold", MIXED_EXEC_GIB, "busy", "10"], [*GW, "exec", "--"],
                script=__file__)
    states = []
    while other.proc.poll() is None and time.time() - t0 < 420:
        states.append((round(time.time() - t0, 1), row(plain.pid).get("state"), row(other.pid).get("state")))
        time.sleep(1)
    other_end = vs.end_all([other], 30)[0]
    plain_progress_after = wait_until(lambda: progressing(plain, 2), 60)  # its restore: about 10 s
    plain_end = vs.end_all([plain], 120)[0]
    out = {"states": states, "other": other_end, "plain": plain_end, "plain_progress_after": plain_progress_after}
    out["checks"] = {"other_completed_intact": other_end.get("intact") is True,
                     "plain_checkpointed_meanwhile": any(s[1] == "checkpointed" for s in states),
                     "plain_completed_intact": plain_end.get("intact") is True and plain_progress_after}
    return out


SCENARIOS = {"pause": pause, "refused": refused, "notebook": notebook, "mixed": mixed}


def main() -> int:
    if sys.argv[1:2] == ["job"]:
        return job(*sys.argv[2:]) or 0
    wanted = vs.chosen(SCENARIOS)
    OUT.mkdir(parents=True, exist_ok=True)
    log(f"GPU free after {vs.cleanup()} s")
    start_daemon()
    log(f"daemon up; checkpoint {call('status').get('checkpoint')}")
    return vs.run_scenarios(SCENARIOS, wanted, "validate_checkpoint.json", lambda: DAEMON.get("proc"))


if __name__ == "__main__":
    sys.exit(main())
