"""Validates the interposer (issue 4) against real CUDA programs on a GPU machine; no daemon, no root.

    python3 bench/validate_interposer.py [SCENARIO ...]     # default: oom swap jax cupy torch_variants

Each run is its own child process under LD_PRELOAD=interposer/libgpuwatch.so with GPUWATCH_SOCKET=""
and, where a quota is wanted, GPUWATCH_MEM_LIMIT (what `gpuwatch exec --mem-limit` sets). The in-process
API (gpuwatch_swap_out/resume/shm) is called through ctypes. Scenarios (a group or one run by name):
  oom             GPT-2 124M training under a 6 GiB quota, batch doubled until torch.OutOfMemoryError;
                  the process must go on working and exit 0; cudaMemGetInfo's total must equal the quota.
  swap            swap_a: deterministic GPT-2 training reading a resident 20 GiB buffer every step, with
                  gpuwatch_swap_out(0) + gpuwatch_resume() half-way; swap_b: the same without the swap;
                  swap_c: swap_b without the interposer. Losses must be bitwise equal between a and b.
  jax             JAX under an 8 GiB quota: pool sized from the quota, jit matmul vs numpy, a swap round trip.
  cupy            cupy (no quota) and cupy_quota (2 GiB): matmul/elementwise/reduction vs numpy, small
                  (sub-allocated) arrays across a swap round trip, the quota refusal.
  torch_variants  torch_default, torch_expandable (expandable_segments:True), torch_async
                  (backend:cudaMallocAsync) each allocating 256 MiB blocks to a 4 GiB quota; torch_graph
                  (capture, replay, swap, replay); nccl (one process, world size 1, all_reduce).
Each run either works (results checked) or fails with its error message recorded. JSON:
$OUT/validate_interposer.json; children's stderr: $OUT/validate_interposer-NAME.stderr.
"""
from __future__ import annotations

import gc
import os
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

from interposer_common import (GiB, MiB, Interposer, child_env, child_main, emit, ensure_library, gpt2,
                               int_checksum, nvml_memory, progress, run_child, train_step, write_json)

SWAP_STEPS = 30
SWAP_BUFFER_GIB = 20
MASK64 = (1 << 64) - 1


def gib(v: float | None) -> str:
    return "-" if v is None else f"{v / GiB:.2f}"


def exc_text(exc: BaseException) -> str:
    return f"{type(exc).__module__}.{type(exc).__name__}: {exc}"[:800]


def call_with_timeout(fn: Callable[[], Any], seconds: float) -> Any:
    """fn() on a daemon thread; its value, or a note that it did not return in time (it may be held at
    the interposer's gate: it then finishes after the resume)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except Exception as exc:
            box["value"] = {"error": exc_text(exc)}

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    return box.get("value", {"error": f"did not return within {seconds}s while swapped"})


def swap_round_trip(ip: Interposer, while_swapped: Callable[[], Any] | None = None) -> dict[str, Any]:
    """gpuwatch_swap_out(0) then gpuwatch_resume(), timed, with the page and NVML (and while_swapped(),
    given 10 s) while swapped. The caller has synchronized; nothing may be submitted in between (the gate
    is closed)."""
    before = {"page": ip.page(), "nvml": nvml_memory()}
    progress("gpuwatch_swap_out(0) ...")
    t0 = time.perf_counter()
    rc_out = ip.swap_out(0)
    out_s = time.perf_counter() - t0
    during = {"page": ip.page(), "nvml": nvml_memory()}
    if while_swapped:
        during["probe"] = call_with_timeout(while_swapped, 10)
    swapped = during["page"].get("dev0", {}).get("swapped", 0)
    progress(f"swap_out rc={rc_out} {out_s:.3f}s state={during['page'].get('state_name')} "
             f"swapped={swapped / GiB:.2f} GiB; gpuwatch_resume() ...")
    t0 = time.perf_counter()
    rc_in = ip.resume()
    in_s = time.perf_counter() - t0
    after = {"page": ip.page(), "nvml": nvml_memory()}
    progress(f"resume rc={rc_in} {in_s:.3f}s state={after['page'].get('state_name')}")
    return {"rc_out": rc_out, "rc_in": rc_in, "out_s": out_s, "in_s": in_s, "swapped_bytes": swapped,
            "out_GBps": swapped / out_s / 1e9 if out_s else None, "in_GBps": swapped / in_s / 1e9 if in_s else None,
            "state_during": during["page"].get("state"), "state_after": after["page"].get("state"),
            "before": before, "during": during, "after": after}


def swap_ok(sw: dict[str, Any], min_bytes: int = 1) -> bool:
    return sw["rc_out"] == 0 and sw["rc_in"] == 0 and sw["state_during"] == 3 and sw["state_after"] == 0 \
        and sw["swapped_bytes"] >= min_bytes


def finish(checks: dict[str, bool], summary: str) -> None:
    emit(checks=checks, ok=all(checks.values()), summary=summary)


# ---- child scenarios

def oom() -> None:
    """GPT-2 training under the quota with growing batches until torch.OutOfMemoryError; then keep going."""
    import torch
    quota = int(os.environ["GPUWATCH_MEM_LIMIT"])
    ip = Interposer()
    free, total = torch.cuda.mem_get_info()
    emit(quota=quota, interposed=ip.present, mem_get_info=[free, total],
         device_total_memory=torch.cuda.get_device_properties(0).total_memory)
    model, opt = gpt2(torch)
    ok_batches: list[int] = []
    failure: dict[str, Any] | None = None
    for batch in (1, 2, 4, 8, 16, 32, 64, 128):
        try:
            tokens = torch.randint(0, 50257, (batch, 1024), device="cuda")
            loss = float(train_step(torch, model, opt, tokens).item())
            ok_batches.append(batch)
            progress(f"batch {batch}: loss {loss:.4f}, reserved {torch.cuda.memory_reserved() / GiB:.2f} GiB")
        except Exception as exc:
            failure = {"batch": batch, "type": f"{type(exc).__module__}.{type(exc).__name__}",
                       "is_torch_oom": isinstance(exc, torch.OutOfMemoryError), "message": str(exc)[:800]}
            progress(f"batch {batch}: {failure['type']}")
            break
    tokens = None
    emit(ok_batches=ok_batches, failure=failure, max_reserved=torch.cuda.max_memory_reserved(), page_at_oom=ip.page())
    opt.zero_grad(set_to_none=True)
    gc.collect()
    torch.cuda.empty_cache()
    small = float(torch.ones(1 << 20, device="cuda").sum().item())
    after_loss = float(train_step(torch, model, opt, torch.randint(0, 50257, (1, 128), device="cuda")).item())
    torch.cuda.synchronize()
    page = ip.page()
    emit(small_op=small, step_after_oom_loss=after_loss, page_end=page)
    checks = {"interposed": ip.present, "total_is_quota": total == quota, "raised_torch_oom":
              bool(failure and failure["is_torch_oom"]), "small_op_after": small == float(1 << 20),
              "step_after_oom": after_loss == after_loss and after_loss > 0,
              "reserved_within_quota": torch.cuda.max_memory_reserved() <= quota,
              "quota_refusals_counted": page.get("quota_refusals", 0) > 0}
    finish(checks, f"OOM at batch {failure and failure['batch']} ({failure and failure['type']}); "
                   f"total {total / GiB:.2f} GiB, quota {quota / GiB:.2f} GiB; refusals {page.get('quota_refusals')}")


def swap_train(mode: str) -> None:
    """Deterministic GPT-2 training whose loss depends on a resident 20 GiB buffer; mode 'swap' swaps the
    whole process out and in half-way."""
    import torch
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ip = Interposer()
    if mode == "swap" and not ip.present:
        raise RuntimeError("interposer API not found in the process (LD_PRELOAD not applied?)")
    buf = torch.empty(SWAP_BUFFER_GIB * GiB // 8, dtype=torch.int64, device="cuda")
    buf.random_(generator=torch.Generator(device="cuda").manual_seed(7))
    checksum_before = int_checksum(torch, [buf])
    model, opt = gpt2(torch, seed=0, eager=True)
    emit(interposed=ip.present, checksum_before=checksum_before, buffer_bytes=buf.numel() * 8,
         attn_implementation=getattr(model.config, "_attn_implementation", None))
    data = torch.Generator(device="cuda").manual_seed(1234)
    losses: list[str] = []
    step_checksums: list[int] = []
    step_ms: list[float] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(SWAP_STEPS):
            if mode == "swap" and step == SWAP_STEPS // 2:
                torch.cuda.synchronize()
                mem_before = torch.cuda.mem_get_info()
                sw = swap_round_trip(ip, torch.cuda.mem_get_info)
                sw["mem_get_info_before"], sw["mem_get_info_during"] = mem_before, sw["during"].get("probe")
                sw["mem_get_info_after"] = torch.cuda.mem_get_info()
                emit(swap=sw)
            t0 = time.perf_counter()
            tokens = torch.randint(0, 50257, (8, 512), device="cuda", generator=data)
            cks = buf.sum()  # wrapping int64 sum: exact, order-independent; any corrupted word changes it
            extra = (cks & 0xFFFFF).to(torch.float32) / float(1 << 20)
            loss = train_step(torch, model, opt, tokens, extra)
            losses.append(float(loss.item()).hex())
            step_checksums.append(int(cks.item()) & MASK64)
            step_ms.append((time.perf_counter() - t0) * 1e3)
            if step % 5 == 4:
                progress(f"step {step + 1}/{SWAP_STEPS} loss {float.fromhex(losses[-1]):.6f}")
    checksum_after = int_checksum(torch, [buf])
    warn = sorted({str(w.message)[:200] for w in caught if "determinis" in str(w.message).lower()})
    emit(losses=losses, step_checksums=step_checksums, checksum_after=checksum_after, step_ms=step_ms,
         determinism_warnings=warn, page_end=ip.page())
    checks = {"buffer_intact": checksum_after == checksum_before,
              "checksum_every_step": all(c == checksum_before for c in step_checksums)}
    if mode == "swap":
        checks["swap"] = swap_ok(sw, SWAP_BUFFER_GIB * GiB)
    finish(checks, f"{len(losses)} steps, last loss {float.fromhex(losses[-1]):.6f}")


def jax_check() -> None:
    """JAX's preallocated pool sized from the quota; a jit matmul vs numpy; a swap round trip."""
    import numpy as np
    import jax
    import jax.numpy as jnp
    quota = int(os.environ.get("GPUWATCH_MEM_LIMIT", "0"))
    ip = Interposer()
    dev = jax.devices()[0]
    limit = (dev.memory_stats() or {}).get("bytes_limit")
    emit(platform=dev.platform, device=str(dev), bytes_limit=limit, quota=quota,
         limit_over_quota=limit / quota if limit and quota else None, page_start=ip.page())
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((2048, 2048), dtype=np.float32) for _ in range(2))
    f = jax.jit(lambda a, b: jnp.tanh(jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST) / 32) + jnp.sin(a))
    da, db = jax.device_put(a), jax.device_put(b)
    got = np.asarray(f(da, db))
    want = np.tanh(a.astype(np.float64) @ b / 32) + np.sin(a.astype(np.float64))
    err = float(np.max(np.abs(got - want)))
    total = float(jnp.sum(da))
    sum_err = abs(total - float(a.astype(np.float64).sum()))
    emit(matmul_max_abs_err=err, sum_abs_err=sum_err)
    checks = {"interposed": ip.present, "matmul": err < 1e-4, "sum": sum_err < 0.5}
    if quota:
        checks["pool_within_quota"] = bool(limit and quota * 0.5 <= limit <= quota)
        try:
            big = jnp.zeros((int(limit * 1.1) // 4,), dtype=jnp.float32).block_until_ready()
            refusal = {"refused": False, "bytes": big.nbytes}
            del big
        except Exception as exc:
            refusal = {"refused": True, "message": exc_text(exc)}
        emit(over_pool_allocation=refusal)
        checks["over_pool_refused"] = refusal["refused"]
    if ip.present:
        sw = swap_round_trip(ip)
        again = np.asarray(f(da, db))
        emit(swap=sw, bitwise_equal_after_swap=bool(np.array_equal(again, got)))
        checks["swap"] = swap_ok(sw)
        checks["same_after_swap"] = bool(np.array_equal(again, got))
    finish(checks, f"bytes_limit {gib(limit)} GiB of quota {gib(quota)} GiB; matmul err {err:.1e}")


def cupy_check() -> None:
    """CuPy vs numpy; small arrays (sub-allocated by the interposer) across a swap; the quota refusal."""
    import numpy as np
    import cupy
    quota = int(os.environ.get("GPUWATCH_MEM_LIMIT", "0"))
    ip = Interposer()
    free, total = cupy.cuda.runtime.memGetInfo()
    rng = np.random.default_rng(1)
    a, b = (rng.standard_normal((2048, 2048), dtype=np.float32) for _ in range(2))
    ga, gb = cupy.asarray(a), cupy.asarray(b)
    mm = cupy.asnumpy(ga @ gb)
    ref = a.astype(np.float64) @ b
    mm_err = float(np.max(np.abs(mm - ref)) / np.max(np.abs(ref)))
    ew = cupy.asnumpy(cupy.sin(ga) * gb + 1)
    ew_ok = bool(np.allclose(ew, np.sin(a) * b + 1, rtol=1e-5, atol=1e-5))
    sum_err = abs(float(ga.sum()) - float(a.astype(np.float64).sum()))
    small_sizes = (16, 1000, 100_000, 400_000)  # 128 B .. 3.2 MB: below and above the 1 MiB VMM threshold
    smalls = [cupy.arange(n, dtype=cupy.int64) * 3 + 1 for n in small_sizes]
    emit(interposed=ip.present, mem_get_info=[free, total], quota=quota, matmul_rel_err=mm_err,
         elementwise_ok=ew_ok, sum_abs_err=sum_err)
    checks = {"interposed": ip.present, "matmul": mm_err < 1e-5, "elementwise": ew_ok, "sum": sum_err < 0.5}
    if ip.present:
        cupy.cuda.Device().synchronize()
        sw = swap_round_trip(ip)
        same = all(np.array_equal(cupy.asnumpy(s), np.arange(n, dtype=np.int64) * 3 + 1)
                   for s, n in zip(smalls, small_sizes)) and np.array_equal(cupy.asnumpy(ga @ gb), mm)
        emit(swap=sw, same_after_swap=bool(same))
        checks.update(swap=swap_ok(sw), same_after_swap=bool(same))
    if quota:
        held, refusal = [], None
        for _ in range(4096):
            try:
                held.append(cupy.empty(256 * MiB, dtype=cupy.uint8))
            except Exception as exc:
                refusal = {"type": f"{type(exc).__module__}.{type(exc).__name__}", "message": str(exc)[:500],
                           "is_cupy_oom": isinstance(exc, cupy.cuda.memory.OutOfMemoryError)}
                break
        held_bytes = len(held) * 256 * MiB
        del held
        cupy.get_default_memory_pool().free_all_blocks()
        after = float(cupy.ones(1000).sum())
        emit(held_before_refusal=held_bytes, refusal=refusal, after_refusal=after, page=ip.page())
        checks.update(total_is_quota=total == quota, refused_cupy_oom=bool(refusal and refusal["is_cupy_oom"]),
                      held_within_quota=held_bytes <= quota, works_after=after == 1000.0)
    finish(checks, f"matmul rel err {mm_err:.1e}; total {total / GiB:.2f} GiB")


def torch_alloc_variant() -> None:
    """The allocator named by PYTORCH_CUDA_ALLOC_CONF: a checked matmul, then 256 MiB blocks to the quota."""
    import torch
    quota = int(os.environ["GPUWATCH_MEM_LIMIT"])
    ip = Interposer()
    emit(alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""), interposed=ip.present,
         backend=torch.cuda.get_allocator_backend())
    a = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))
    got = (a.cuda() @ a.cuda()).cpu().double()
    err = float((got - a.double() @ a.double()).abs().max())
    free, total = torch.cuda.mem_get_info()
    emit(matmul_max_abs_err=err, mem_get_info=[free, total])
    held, refusal = [], None
    for _ in range(4096):
        try:
            held.append(torch.empty(256 * MiB, dtype=torch.uint8, device="cuda"))
        except Exception as exc:
            refusal = {"type": f"{type(exc).__module__}.{type(exc).__name__}", "message": str(exc)[:800],
                       "is_torch_oom": isinstance(exc, torch.OutOfMemoryError)}
            break
    held_bytes, reserved, page = len(held) * 256 * MiB, torch.cuda.memory_reserved(), ip.page()
    del held
    torch.cuda.empty_cache()
    after = float(torch.ones(1000, device="cuda").sum().item())
    emit(held_before_refusal=held_bytes, reserved_at_refusal=reserved, refusal=refusal, page_at_refusal=page,
         after_refusal=after)
    checks = {"interposed": ip.present, "matmul": err < 1e-2, "total_is_quota": total == quota,
              "refused_torch_oom": bool(refusal and refusal["is_torch_oom"]), "held_within_quota": held_bytes <= quota,
              "held_near_quota": held_bytes >= quota - GiB, "works_after": after == 1000.0}
    finish(checks, f"held {held_bytes / GiB:.2f} GiB of {quota / GiB:.2f} GiB, then "
                   f"{refusal and refusal['type']}")


def torch_graph() -> None:
    """CUDA graph capture and replay; then a swap round trip and more replays at the same addresses."""
    import torch
    ip = Interposer()
    x = torch.zeros(1 << 20, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            x.add_(1)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(10):
            x.add_(1)
        y = x * 2
    for _ in range(200):
        g.replay()
    torch.cuda.synchronize()
    v1, y1 = float(x.min().item()), float(y.max().item())
    emit(interposed=ip.present, after_200_replays=v1, y=y1)
    checks = {"interposed": ip.present, "replay": v1 == 2003.0 and float(x.max().item()) == 2003.0 and y1 == 4006.0}
    if ip.present:
        sw = swap_round_trip(ip)
        for _ in range(100):
            g.replay()
        torch.cuda.synchronize()
        v2 = float(x.min().item())
        emit(swap=sw, after_swap_and_100_replays=v2)
        checks.update(swap=swap_ok(sw), replay_after_swap=v2 == 3003.0 and float(x.max().item()) == 3003.0)
    finish(checks, f"x after replays {v1}")


def nccl() -> None:
    """Single-process NCCL (world size 1): all_reduce, a swap round trip, all_reduce again."""
    import socket
    import torch
    import torch.distributed as dist
    ip = Interposer()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    x = torch.randn(16 * MiB // 4, device="cuda", generator=torch.Generator(device="cuda").manual_seed(3))
    ref = x.clone()
    dist.all_reduce(x)
    torch.cuda.synchronize()
    first = bool(torch.equal(x, ref))
    emit(interposed=ip.present, all_reduce_equal=first, reserved=torch.cuda.memory_reserved(), page=ip.page())
    checks = {"interposed": ip.present, "all_reduce": first}
    if ip.present:
        sw = swap_round_trip(ip)
        emit(swap=sw)
        y = torch.full((1024,), 2.0, device="cuda")
        dist.all_reduce(y)
        torch.cuda.synchronize()
        again = bool((y == 2.0).all().item()) and bool(torch.equal(x, ref))
        emit(all_reduce_after_swap=again)
        checks.update(swap=swap_ok(sw), all_reduce_after_swap=again)
    dist.destroy_process_group()
    finish(checks, f"all_reduce {'ok' if first else 'WRONG'}")


CHILDREN: dict[str, Callable[..., None]] = {
    "oom": oom, "swap": swap_train, "jax": jax_check, "cupy": cupy_check, "torch_alloc": torch_alloc_variant,
    "torch_graph": torch_graph, "nccl": nccl,
}


# ---- parent

@dataclass
class Run:
    name: str
    child: str
    preload: bool = True
    mem_limit: int | None = None
    env: dict[str, str] = field(default_factory=dict)
    timeout: float = 180
    args: list[str] = field(default_factory=list)


DETERMINISTIC = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
GROUPS: dict[str, list[Run]] = {
    "oom": [Run("oom", "oom", mem_limit=6 * GiB, timeout=240)],
    "swap": [Run("swap_a", "swap", env=DETERMINISTIC, timeout=240, args=["swap"]),
             Run("swap_b", "swap", env=DETERMINISTIC, timeout=180, args=["noswap"]),
             Run("swap_c", "swap", preload=False, env=DETERMINISTIC, timeout=180, args=["noswap"])],
    "jax": [Run("jax", "jax", mem_limit=8 * GiB, timeout=180)],
    "cupy": [Run("cupy", "cupy", timeout=120), Run("cupy_quota", "cupy", mem_limit=2 * GiB, timeout=120)],
    "torch_variants": [
        Run("torch_default", "torch_alloc", mem_limit=4 * GiB, timeout=120),
        Run("torch_expandable", "torch_alloc", mem_limit=4 * GiB, timeout=120,
            env={"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}),
        Run("torch_async", "torch_alloc", mem_limit=4 * GiB, timeout=120,
            env={"PYTORCH_CUDA_ALLOC_CONF": "backend:cudaMallocAsync"}),
        Run("torch_graph", "torch_graph", timeout=120),
        Run("nccl", "nccl", timeout=120, env={"NCCL_DEBUG": "WARN"})],
}


def compare_swap(results: dict[str, dict]) -> dict[str, Any]:
    """The verdict of the swap group: run a's losses bitwise equal to run b's; the swap really happened."""
    a, b, c = (results.get(n, {}) for n in ("swap_a", "swap_b", "swap_c"))
    la, lb, lc = a.get("losses", []), b.get("losses", []), c.get("losses", [])
    sw = a.get("swap", {})

    def first_diff(x: list, y: list) -> int | None:
        return next((i for i, (p, q) in enumerate(zip(x, y)) if p != q),
                    None if len(x) == len(y) else min(len(x), len(y)))

    checks = {"a_ok": bool(a.get("ok")), "b_ok": bool(b.get("ok")), "a_complete": len(la) == SWAP_STEPS,
              "losses_a_eq_b_bitwise": bool(la) and la == lb,
              "same_buffer_a_b": (a.get("checksum_before") is not None
                                  and a.get("checksum_before") == b.get("checksum_before")),
              "swapped_ge_20GiB": sw.get("swapped_bytes", 0) >= SWAP_BUFFER_GIB * GiB}
    nvml_b, nvml_d = sw.get("before", {}).get("nvml", {}), sw.get("during", {}).get("nvml", {})
    mb, md = sw.get("mem_get_info_before"), sw.get("mem_get_info_during")
    md = md if isinstance(md, (list, tuple)) else None
    info = {"first_diff_a_b": first_diff(la, lb), "losses_b_eq_c_bitwise": bool(lb) and lb == lc,
            "first_diff_b_c": first_diff(lb, lc), "swap_out_s": sw.get("out_s"), "swap_in_s": sw.get("in_s"),
            "swap_out_GBps": sw.get("out_GBps"), "swap_in_GBps": sw.get("in_GBps"),
            "nvml_process_drop": (nvml_b.get("process_used") or 0) - (nvml_d.get("process_used") or 0)
            if nvml_b.get("process_used") is not None and nvml_d.get("process_used") is not None else None,
            "nvml_device_drop": nvml_b.get("device_used", 0) - nvml_d.get("device_used", 0)
            if "device_used" in nvml_b and "device_used" in nvml_d else None}
    return {"name": "swap_verdict", "checks": checks, "ok": all(checks.values()), "info": info,
            "summary": f"a==b {checks['losses_a_eq_b_bitwise']} (b==c {info['losses_b_eq_c_bitwise']}); swapped "
                       f"{sw.get('swapped_bytes', 0) / GiB:.2f} GiB, out {sw.get('out_s') or 0:.2f}s "
                       f"in {sw.get('in_s') or 0:.2f}s; NVML process drop {gib(info['nvml_process_drop'])} GiB;"
                       f" mem_get_info free {gib(mb and mb[0])} -> {gib(md and md[0])} GiB while swapped"}


def print_table(rows: list[dict]) -> None:
    print(f"\n{'run':18s} {'rc':>4s} {'s':>6s} {'ok':>4s}  summary / failed checks / error")
    for r in rows:
        failed = [k for k, v in (r.get("checks") or {}).items() if not v]
        ok = "yes" if r.get("ok") and r.get("rc", 0) == 0 else "NO"
        note = r.get("summary", "")
        if failed:
            note += f"  FAILED: {', '.join(failed)}"
        if r.get("error"):
            note += f"  ERROR: {r['error'][:300]}"
        if r.get("timed_out"):
            note += "  TIMED OUT"
        print(f"{r['name']:18s} {str(r.get('rc', '')):>4s} {r.get('wall_s', 0):6.1f} {ok:>4s}  {note}")


def main() -> int:
    if child_main(CHILDREN):
        return 0
    ensure_library()
    runs_by_name = {r.name: r for g in GROUPS.values() for r in g}
    wanted = sys.argv[1:] or list(GROUPS)
    unknown = [w for w in wanted if w not in GROUPS and w not in runs_by_name]
    if unknown:
        raise SystemExit(f"unknown scenario(s) {unknown}; groups: {list(GROUPS)}; runs: {list(runs_by_name)}")
    runs = [r for w in wanted for r in (GROUPS.get(w) or [runs_by_name[w]])]
    results: dict[str, dict] = {}
    t0 = time.time()
    for r in runs:
        print(f"== {r.name} (preload={r.preload}, mem_limit={r.mem_limit}, env={r.env})", flush=True)
        env = child_env(r.preload, r.mem_limit, **r.env)
        res = run_child(__file__, r.child, env, r.timeout, r.args, name=r.name)
        results[r.name] = res
        write_json("validate_interposer.json", list(results.values()))
    rows = list(results.values())
    if "swap_a" in results and "swap_b" in results:
        rows.append(compare_swap(results))
    rows = [{**r, "ok": bool(r.get("ok")) and r.get("rc", 0) == 0} for r in rows]
    write_json("validate_interposer.json", rows)
    print_table(rows)
    print(f"total {time.time() - t0:.0f}s")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
