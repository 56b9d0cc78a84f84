"""Validates several GPUs (issue 16) on a two-GPU machine (nvidia-h200-x2), as root with bcc importable:

    source .bcc/env.sh && source bench/gw-env.sh && make -s -C interposer && \\
      python3 bench/validate_multi_gpu.py [SCENARIO ...]

Scenarios (default: all, in this order):
  five   two GPUs, five jobs of 60 GiB each (three on GPU 0, two on GPU 1; interposed and plain mixed): every job
         completes with its checksums, nobody is killed; the per-GPU plans (`plan` of `ps --json`, per row) and
         the metrics' per-GPU series are sampled while they run.
  span   one plain job holding 1 GiB on GPU 0 and 3 GiB on GPU 1: `gpuwatch pause PID --swap` checkpoints it whole
         (NVML shows nothing of it on either GPU), `gpuwatch resume PID` restores it; checksums intact on both.
  nccl   `torchrun --nproc-per-node 2` under `gpuwatch exec`: an all-reduce over both GPUs, repeated; the results
         are right, and what the scheduler did with each rank (ps states and plans) is recorded.
  move   a plain PyTorch training (fixed seed) on GPU 0, moved to GPU 1 mid-run with `gpuwatch move PID --to 1`:
         its losses bitwise equal to a run that never moved, NVML lists it on GPU 1 afterwards, the move's time.
Writes $OUT/validate_multi_gpu.json and $OUT/multi-gpu-daemon.log; exits 1 if a check failed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import validate_sharing as vs
from validate_sharing import GW, OUT, Job, call, gw, log

GiB = 1 << 30
HERE = str(Path(__file__).resolve())
DAEMON: dict[str, subprocess.Popen] = {}


# ------------------------------------------------------------------------------------------------ jobs (child side)

def job(kind: str, *args: str) -> None:
    if kind == "span":
        return _span(*args)
    if kind == "train":
        return _train(*args)
    if kind == "nccl":
        return _nccl(*args)
    raise SystemExit(f"unknown job {kind!r}")


def _span(gib0: str = "1", gib1: str = "3") -> None:
    """int32 tensors of 1 GiB on each GPU, checked after every `check` line."""
    import torch
    held = {d: [torch.full((GiB // 4,), 1000 * d + i, dtype=torch.int32, device=f"cuda:{d}")
                for i in range(int(n))] for d, n in ((0, gib0), (1, gib1))}
    vs.emit(event="allocated", gib={d: len(ts) for d, ts in held.items()})
    while (line := sys.stdin.readline().strip()) not in ("stop", ""):
        if line == "check":
            bad = [(d, i) for d, ts in held.items() for i, t in enumerate(ts) if not bool((t == 1000 * d + i).all())]
            vs.emit(event="checked", intact=not bad, bad=bad[:10])
    vs.emit(event="done", intact=True)


def _train(steps: str = "400", gib: str = "20") -> None:
    """A deterministic MLP training on cuda:0 (its ordinal stays 0 through a move), GIB of ballast beside it;
    each step's loss as the bits of its float."""
    import struct

    import torch
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    ballast = [torch.ones(GiB // 4, dtype=torch.int32, device="cuda:0") for _ in range(int(gib))]
    model = torch.nn.Sequential(torch.nn.Linear(4096, 4096), torch.nn.ReLU(), torch.nn.Linear(4096, 1)).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(1024, 4096, device="cuda"), torch.randn(1024, 1, device="cuda")
    vs.emit(event="allocated", gib=len(ballast))
    for step in range(int(steps)):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        bits = struct.unpack("<I", struct.pack("<f", float(loss)))[0]
        vs.emit(event="loss", step=step, bits=bits)
        time.sleep(0.05)
    vs.emit(event="done", intact=all(bool((t == 1).all()) for t in ballast))


def _nccl(rounds: str = "50") -> None:
    import torch
    import torch.distributed as dist
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(rank)
    t = torch.empty(GiB // 4, dtype=torch.float32, device="cuda")
    wrong = 0
    for i in range(int(rounds)):
        t.fill_(rank + 1 + i)
        dist.all_reduce(t)
        wrong += int(not bool((t == sum(r + 1 + i for r in range(world))).all()))
    vs.emit(event="done", rank=rank, intact=wrong == 0, wrong_rounds=wrong)
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ the daemon

def start_daemon() -> None:
    DAEMON["proc"] = vs.start_daemon(f'[scheduler]\nquantum_ms = 10000\nroom_wait_ms = 120000\n\n[metrics]\n'
                                     f'listen = "{vs.METRICS}"\n', "multi-gpu-daemon.log", True)


def rows(pid: int) -> list[dict[str, Any]]:
    return [r for r in call("ps") if r["pid"] == pid]


def nvml_gpus(pid: int) -> list[str]:
    """The UUIDs of the GPUs NVML lists the process on."""
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,gpu_uuid", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout
    return [uuid.strip() for p, uuid in (line.split(",") for line in out.splitlines() if "," in line)
            if p.strip() == str(pid)]


def on_gpu(gpu: int) -> dict[str, str]:
    return {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)}


# ------------------------------------------------------------------------------------------------ scenarios

def five() -> dict[str, Any]:
    plan = [(0, True), (0, False), (0, True), (1, False), (1, True)]  # (GPU, under gpuwatch exec)
    jobs = []
    for n, (gpu, interposed) in enumerate(plan):
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)  # Job starts its process with this environment
        jobs.append(Job(f"{'exec' if interposed else 'plain'}-{n}-gpu{gpu}", ["60", "1", "120"],
                        [*GW, "exec", "--"] if interposed else None))
    os.environ.pop("CUDA_VISIBLE_DEVICES")
    samples, t0 = [], time.time()
    while any(j.proc.poll() is None for j in jobs) and time.time() - t0 < 1200:
        samples.append([(r["pid"], r["gpu"], r["state"], r["plan"]) for r in call("ps")])
        time.sleep(2)
    metrics = subprocess.run(["curl", "-s", f"http://{vs.METRICS}/metrics"], capture_output=True, text=True).stdout
    ends = vs.end_all(jobs, 60)
    return {"ends": ends, "samples": samples[::5],
            "checks": {"all_completed_intact": all(e.get("intact") is True for e in ends),
                       "nobody_killed": not any(j.killed for j in jobs),
                       "plans_per_gpu_seen": any(p is not None for s in samples for (_, _, _, p) in s),
                       "metrics_per_gpu": 'gpu="1"' in metrics and 'gpu="0"' in metrics}}


def span() -> dict[str, Any]:
    j = Job("span-1g-3g", ["span", "1", "3"], None, script=HERE)
    assert j.wait_for("allocated", timeout=120), "the job did not allocate"
    out: dict[str, Any] = {"pause": gw("pause", str(j.pid), "--swap")}
    time.sleep(1)
    out["ps_checkpointed"] = [(r["gpu"], r["state"], r["swapped_bytes"]) for r in rows(j.pid)]
    out["nvml_checkpointed"] = nvml_gpus(j.pid)
    out["resume"] = gw("resume", str(j.pid))
    j.proc.stdin.write("check\n")
    j.proc.stdin.flush()
    checked = j.wait_for("checked", timeout=120) or {}
    vs.end_all([j], 30)
    out["checks"] = {"checkpointed_on_both": [s for _, s, _ in out["ps_checkpointed"]] == ["checkpointed"] * 2,
                     "intact_on_both": checked.get("intact") is True}
    return out


def nccl() -> dict[str, Any]:
    torchrun = [*GW, "exec", "--", sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", HERE,
                "job", "nccl", "200"]
    proc = subprocess.Popen(torchrun, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    states, t0 = [], time.time()
    while proc.poll() is None and time.time() - t0 < 600:
        states.append([(r["pid"], r["gpu"], r["state"], r["plan"]) for r in call("ps") if r["interposed"]])
        time.sleep(1)
    output = proc.communicate(timeout=60)[0]
    done = [json.loads(line[7:]) for line in output.splitlines() if line.startswith("RESULT ")]
    return {"states": states[::5], "done": done,
            "checks": {"both_ranks_correct": len(done) == 2 and all(d["intact"] for d in done),
                       "no_rank_paused_alone": not any(len({s for _, _, s, _ in sample}) > 1 for sample in states)}}


def move() -> dict[str, Any]:
    reference = Job("train-reference", ["train", "400", "20"], None, script=HERE)
    reference.wait_for("done", timeout=900)
    vs.end_all([reference], 30)
    os.environ["CUDA_VISIBLE_DEVICES"] = "0,1"
    moved = Job("train-moved", ["train", "400", "20"], None, script=HERE)
    os.environ.pop("CUDA_VISIBLE_DEVICES")
    assert moved.wait_for("allocated", timeout=300), "the training did not start"
    while (moved.last("loss") or {"step": 0})["step"] < 100:
        time.sleep(0.2)
    began = time.time()
    result = gw("move", str(moved.pid), "--to", "1")
    seconds = time.time() - began
    gpu1 = call("status")["gpus"][1]["uuid"]
    nvml_after = nvml_gpus(moved.pid)
    moved.wait_for("done", timeout=900)
    vs.end_all([moved], 30)
    losses = [[e["bits"] for e in j.events if e["event"] == "loss"] for j in (reference, moved)]
    return {"move": result, "move_s": round(seconds, 2), "nvml_after": nvml_after, "steps": len(losses[1]),
            "checks": {"losses_bitwise_equal": len(losses[0]) == 400 and losses[0] == losses[1],
                       "nvml_on_gpu1": nvml_after == [gpu1],
                       "ps_on_gpu1": [r["gpu"] for r in rows(moved.pid)] in ([1], [])}}


SCENARIOS = {"five": five, "span": span, "nccl": nccl, "move": move}


def main() -> int:
    if sys.argv[1:2] == ["job"]:
        return job(*sys.argv[2:]) or 0
    wanted = vs.chosen(SCENARIOS)
    OUT.mkdir(parents=True, exist_ok=True)
    log(f"GPU free after {vs.cleanup()} s")
    start_daemon()
    gpus = call("status")["gpus"]
    if len(gpus) < 2:
        raise SystemExit(f"two GPUs needed, NVML shows {len(gpus)}")
    return vs.run_scenarios(SCENARIOS, wanted, "validate_multi_gpu.json", lambda: DAEMON.get("proc"))


if __name__ == "__main__":
    sys.exit(main())
