"""Shared by the interposer scripts (bench/validate_interposer.py, swap_bench.py, interposer_overhead.py).

Parent side: build/find interposer/libgpuwatch.so, make a child's environment (what `gpuwatch exec
--mem-limit` sets: LD_PRELOAD, GPUWATCH_SOCKET="" for no daemon, GPUWATCH_MEM_LIMIT), run a child with a
timeout while streaming its progress, write JSON to $OUT.
Child side: the in-process API (gpuwatch_pause/swap_out/resume/shm) through ctypes, the shared page
decoded at the offsets of docs/interposer.md, NVML's view of memory, a small result protocol
(`RESULT {json}` lines, merged by the parent so a crash or a hang keeps what came before).
Nothing here imports torch, JAX or CuPy.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
ROOT = Path(__file__).resolve().parent.parent
LIB = ROOT / "interposer" / "libgpuwatch.so"
STATES = {0: "running", 1: "paused", 2: "swapping_out", 3: "swapped", 4: "swapping_in"}


# ---- parent side

def out_dir() -> Path:
    d = Path(os.environ.get("OUT", "/tmp"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def ensure_library() -> Path:
    """Builds interposer/libgpuwatch.so with `make -s -C interposer` when it is missing."""
    if not LIB.exists():
        print(f"building {LIB} ...", flush=True)
        subprocess.run(["make", "-s", "-C", str(ROOT / "interposer")], check=True)
    if not LIB.exists():
        raise SystemExit(f"{LIB} missing after make")
    return LIB


def child_env(preload: bool, mem_limit: int | None = None, **extra: str | None) -> dict[str, str]:
    """The environment of a child: with the interposer preloaded (no daemon) or plainly, plus `extra`
    (a value of None removes the variable)."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "GPUWATCH_MEM_LIMIT")}
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    env.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    env.setdefault("NVSHMEM_DISABLE_NVLS", "1")
    if preload:
        env.update(LD_PRELOAD=str(LIB), GPUWATCH_SOCKET="")
        if mem_limit:
            env["GPUWATCH_MEM_LIMIT"] = str(mem_limit)
    for k, v in extra.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def run_child(script: str, child_name: str, env: dict[str, str], timeout: float, args: list[str] | None = None,
              name: str | None = None) -> dict:
    """Runs `python3 SCRIPT child CHILD_NAME ARGS...`, prints its stdout prefixed with [NAME], merges its
    RESULT lines into one dict; kills the child's process group at `timeout`. stderr goes to
    $OUT/SCRIPT-NAME.stderr (NAME defaults to CHILD_NAME)."""
    name = name or child_name
    err_path = out_dir() / f"{Path(script).stem}-{name}.stderr"
    t0 = time.time()
    with open(err_path, "w") as err:
        child = subprocess.Popen([sys.executable, script, "child", child_name, *(args or [])], stdout=subprocess.PIPE,
                                 stderr=err, text=True, env=env, cwd=ROOT, start_new_session=True)
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = threading.Timer(timeout, kill)
        timer.start()
        result: dict[str, Any] = {}
        try:
            for line in child.stdout:
                if line.startswith("RESULT "):
                    result.update(json.loads(line[7:]))
                else:
                    print(f"  [{name}] {line.rstrip()}", flush=True)
            child.wait()
        finally:
            timer.cancel()
    tail = err_path.read_text(errors="replace")[-3000:]
    rc = child.returncode
    result.update(name=name, rc=rc, timed_out=timed_out.is_set(), wall_s=round(time.time() - t0, 1),
                  stderr_tail=tail)
    if rc != 0:
        why = "timed out" if timed_out.is_set() else (f"signal {-rc}" if rc < 0 else f"exit {rc}")
        print(f"  [{name}] FAILED ({why}): {result.get('error', '')[:600]}\n  stderr tail:\n    "
              + "\n    ".join(tail.splitlines()[-15:]), flush=True)
    return result


def write_json(filename: str, data: Any) -> Path:
    path = out_dir() / filename
    path.write_text(json.dumps(data, indent=1, default=str))
    print(f"wrote {path}", flush=True)
    return path


# ---- child side

def emit(**fields: Any) -> None:
    """Reports results to the parent (merged with earlier ones)."""
    print("RESULT " + json.dumps(fields, default=str), flush=True)


def progress(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


def child_main(scenarios: dict[str, Any]) -> bool:
    """If argv is `child NAME ...`, runs that scenario and returns True. An exception is reported to the
    parent as `error` (type and message: the "clear message" a refusal must give) and exits 1."""
    if len(sys.argv) > 2 and sys.argv[1] == "child":
        try:
            scenarios[sys.argv[2]](*sys.argv[3:])
        except BaseException as exc:
            import traceback
            emit(error=f"{type(exc).__module__}.{type(exc).__name__}: {exc}"[:1500],
                 traceback=traceback.format_exc()[-3000:])
            sys.stdout.flush()
            os._exit(1)
        return True
    return False


class Interposer:
    """The preloaded library's in-process API, looked up in the process's global namespace."""

    def __init__(self) -> None:
        self.lib = ctypes.CDLL(None)
        self.present = hasattr(self.lib, "gpuwatch_shm")
        if self.present:
            self.lib.gpuwatch_shm.restype = ctypes.c_void_p
            self.lib.gpuwatch_swap_out.argtypes = [ctypes.c_ulonglong]
            self.lib.gpuwatch_swap_out.restype = ctypes.c_int
            self.lib.gpuwatch_resume.restype = ctypes.c_int
            self.lib.gpuwatch_pause.restype = ctypes.c_int

    def swap_out(self, nbytes: int = 0) -> int:
        return self.lib.gpuwatch_swap_out(nbytes)

    def resume(self) -> int:
        return self.lib.gpuwatch_resume()

    def pause(self) -> int:
        return self.lib.gpuwatch_pause()

    def page(self, slots: bool = False) -> dict[str, Any]:
        """The shared page's header, device 0's record and (slots=True) launch counts summed over slots."""
        if not self.present:
            return {}
        base = self.lib.gpuwatch_shm()
        if not base:
            return {"error": "gpuwatch_shm() returned NULL"}
        raw = ctypes.string_at(base, 4096 + 64 * 960 if slots else 4096)
        magic, version, pid, max_devices, gate, state, priority, flags = struct.unpack_from("<IIiIIIII", raw, 0)
        names = ["lease_deadline_ns", "swap_out_bytes_total", "swap_in_bytes_total", "swap_out_ns_total",
                 "swap_in_ns_total", "swaps_out", "swaps_in", "gate_wait_ns_total", "gate_waits", "quota_refusals"]
        page: dict[str, Any] = dict(magic=hex(magic), version=version, pid=pid, max_devices=max_devices, gate=gate,
                                    state=state, state_name=STATES.get(state, "?"), priority=priority, flags=flags)
        page.update(zip(names, struct.unpack_from("<10Q", raw, 32)))
        page["dev0"] = dict(zip(["quota", "used", "swappable", "unswappable", "swapped"],
                                struct.unpack_from("<5Q", raw, 256)))
        if slots:
            page["launches"] = page["graph_launches"] = page["copies"] = 0
            for s in range(960):
                active, _tid, launches, graphs, copies = struct.unpack_from("<IIQQQ", raw, 4096 + 64 * s)
                page["launches"] += launches
                page["graph_launches"] += graphs
                page["copies"] += copies
        return page


def nvml_memory() -> dict[str, Any]:
    """NVML's view of GPU 0: device used bytes and this process's used bytes (None where NVML cannot say)."""
    try:
        import pynvml
        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        info = pynvml.nvmlDeviceGetMemoryInfo(h)
        procs = pynvml.nvmlDeviceGetComputeRunningProcesses(h)
        mine = [p.usedGpuMemory for p in procs if p.pid == os.getpid()]
        if not mine and len(procs) == 1:  # another pid namespace: the only process is this one
            mine = [procs[0].usedGpuMemory]
        return {"device_used": int(info.used), "device_total": int(info.total),
                "process_used": int(mine[0]) if mine and mine[0] is not None else None}
    except Exception as exc:  # no pynvml, or NVML unusable: report, never fail the scenario for it
        return {"error": repr(exc)[:200]}


def int_checksum(torch: Any, tensors: list) -> int:
    """Order-independent, exact checksum of tensors' bytes: the wrapping int64 sum of each as int64 words."""
    total = 0
    for t in tensors:
        words = t.detach().reshape(-1).view(torch.int64)
        total = (total + int(words.sum().item())) & ((1 << 64) - 1)
    return total


def gpt2(torch: Any, seed: int = 0, eager: bool = False) -> tuple[Any, Any]:
    """GPT-2 124M (GPT2Config() defaults), random initialisation, on cuda, with AdamW. eager=True asks for
    the plain matmul+softmax attention (deterministic backward) instead of SDPA."""
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config()
    model = None
    if eager:
        try:
            from transformers import AutoModelForCausalLM
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
        except (TypeError, ValueError):
            cfg._attn_implementation = "eager"
    if model is None:
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(cfg)
    model = model.cuda().train()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def train_step(torch: Any, model: Any, opt: Any, tokens: Any, extra: Any = None) -> Any:
    """One AdamW step with bf16 autocast on `tokens` (labels = tokens). `extra`, a float32 scalar tensor,
    scales the loss by (1 + 1e-3 * extra). Returns the loss tensor (not synchronized)."""
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(tokens, labels=tokens).loss.float()
    if extra is not None:
        loss = loss * (1 + 1e-3 * extra)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()
