"""The Python cases of bench/compat.py, each a small program with a deterministic result:

    python3 bench/compat_cases.py NAME

prints `RESULT {"value": ...}` (what the runs of a case are compared by) or fails as the library fails. A case
calls midpoint() half way: with GW_COMPAT_SWAP=daemon or hold it prints MIDPOINT and waits for a line on stdin
while bench/compat.py reads `gpuwatch ps` and (daemon) swaps the process out and back through the daemon; with
GW_COMPAT_SWAP=self it swaps itself out and back with the interposer's in-process API (no daemon). Imports are
inside the cases: a case needs only its own library."""
from __future__ import annotations

import ctypes
import json
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

MiB = 1 << 20


def midpoint(sync: Callable[[], Any]) -> None:
    sync()
    how = os.environ.get("GW_COMPAT_SWAP")
    if how in ("daemon", "hold"):
        print("MIDPOINT", flush=True)
        sys.stdin.readline()
    elif how == "self":
        lib = ctypes.CDLL(None)
        lib.gpuwatch_shm.restype = ctypes.POINTER(ctypes.c_uint64)
        out = lib.gpuwatch_swap_out(ctypes.c_ulonglong(0))
        page = lib.gpuwatch_shm()  # docs/interposer.md: swap_out_bytes_total at 40, device 0 at 256
        moved, used, unswappable = page[5], page[33], page[35]
        print(f"SWAPPED {out} {lib.gpuwatch_resume()} moved={moved} used={used} unswappable={unswappable}", flush=True)


def result(value: Any, **extra: Any) -> None:
    print("RESULT " + json.dumps({"value": value, **extra}), flush=True)


def torch_train(compiled: bool) -> None:
    import torch
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 256)).cuda()
    step_fn = torch.compile(model) if compiled else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(512, 256, device="cuda")
    steps = 40
    for step in range(steps):
        loss = ((step_fn(x) - x) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == steps // 2:
            midpoint(torch.cuda.synchronize)
    result(f"{loss.item():.10e}", params=f"{sum(float(p.double().sum()) for p in model.parameters()):.10e}")


def case_torch_eager() -> None:
    torch_train(compiled=False)


def case_torch_compile() -> None:
    torch_train(compiled=True)


def case_cuda_graphs() -> None:
    import torch
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.GELU(), torch.nn.Linear(512, 512)).cuda().eval()
    static_in = torch.zeros(256, 512, device="cuda")
    side = torch.cuda.Stream()
    with torch.no_grad(), torch.cuda.stream(side):  # warm-up on a side stream, as torch's docs ask
        for _ in range(3):
            model(static_in)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_out = model(static_in)
    total = 0.0
    for i in range(20):
        static_in.copy_(torch.full((256, 512), i / 20, device="cuda"))
        graph.replay()
        total += float(static_out.double().sum())
        if i == 10:
            midpoint(torch.cuda.synchronize)
    result(f"{total:.10e}")


def mp_child(inbox: Any, outbox: Any) -> None:
    import torch
    t = inbox.get()  # a CUDA tensor of the parent's, opened by CUDA IPC
    t.add_(1)
    torch.cuda.synchronize()
    outbox.put(float(t.double().sum()))
    inbox.get()  # the parent is done with it


def case_torch_mp_ipc() -> None:
    import torch
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    inbox, outbox = ctx.Queue(), ctx.Queue()
    shared = torch.arange(4 * MiB, dtype=torch.float32, device="cuda")  # 16 MiB, sent to the child
    other = torch.ones(16 * MiB, device="cuda")  # 64 MiB of its own
    child = ctx.Process(target=mp_child, args=(inbox, outbox))
    child.start()
    inbox.put(shared)
    seen = outbox.get(timeout=60)  # a child that failed leaves nothing: Empty, not a wait for ever
    midpoint(torch.cuda.synchronize)  # what the child has open stays on the device, the rest moves
    value = [seen, float(shared.double().sum()), float(other.sum())]
    inbox.put(None)
    child.join(60)
    result(value, child_exit=child.exitcode)


def case_dataloader_pinned() -> None:
    import torch
    from torch.utils.data import DataLoader, Dataset

    class Rows(Dataset):
        def __len__(self) -> int:
            return 512

        def __getitem__(self, i: int) -> Any:
            return torch.full((4096,), float(i))

    total = torch.zeros((), dtype=torch.float64, device="cuda")
    loader = DataLoader(Rows(), batch_size=32, num_workers=2, pin_memory=True)
    for n, batch in enumerate(loader):
        total += batch.cuda(non_blocking=True).double().sum()
        if n == 8:
            midpoint(torch.cuda.synchronize)
    result(f"{float(total):.10e}")


def case_hf_generate() -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=4, n_embd=128, vocab_size=1000, n_positions=128)
    model = GPT2LMHeadModel(config).cuda().eval()
    ids = torch.arange(1, 11, device="cuda")[None]
    first = model.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=0)
    midpoint(torch.cuda.synchronize)
    second = model.generate(first, max_new_tokens=10, do_sample=False, pad_token_id=0)
    result(second.tolist())


def case_jax_jit() -> None:
    import jax
    import jax.numpy as jnp
    key = jax.random.PRNGKey(0)
    w = jax.random.normal(key, (512, 512))
    x = jax.random.normal(jax.random.PRNGKey(1), (256, 512))
    loss = jax.jit(lambda w: jnp.mean(jnp.tanh(x @ w) ** 2))
    grad = jax.jit(jax.grad(lambda w: jnp.mean(jnp.tanh(x @ w) ** 2)))
    for step in range(40):
        w = w - 0.1 * grad(w)
        if step == 20:
            midpoint(w.block_until_ready)
    result(f"{float(loss(w)):.10e}")


def case_cupy_arrays() -> None:
    import cupy as cp
    import numpy as np
    from cupy.cuda import runtime, texture
    a = cp.arange(4 * MiB, dtype=cp.float32)
    total = float((a * 2).sum())
    desc = texture.ChannelFormatDescriptor(32, 0, 0, 0, runtime.cudaChannelFormatKindFloat)
    plane, volume = texture.CUDAarray(desc, 1024, 1024), texture.CUDAarray(desc, 128, 128, 64)
    host = np.arange(1024 * 1024, dtype=np.float32).reshape(1024, 1024)
    plane.copy_from(host)
    volume.copy_from(np.ones((64, 128, 128), dtype=np.float32))
    res = texture.ResourceDescriptor(runtime.cudaResourceTypeArray, cuArr=plane)
    tex = texture.TextureDescriptor((runtime.cudaAddressModeClamp,) * 2, runtime.cudaFilterModePoint,
                                    runtime.cudaReadModeElementType)
    obj = texture.TextureObject(res, tex)
    fetch = cp.RawKernel(r"""
    extern "C" __global__ void fetch(cudaTextureObject_t t, float *out, int w) {
        int x = blockIdx.x * blockDim.x + threadIdx.x, y = blockIdx.y;
        if (x < w) out[y * w + x] = tex2D<float>(t, x, y) * 2.0f;
    }""", "fetch")
    out = cp.zeros((1024, 1024), dtype=cp.float32)
    midpoint(cp.cuda.runtime.deviceSynchronize)
    fetch((4, 1024), (256,), (obj, out, np.int32(1024)))
    back = np.empty_like(host)
    plane.copy_to(back)
    result([total, float(out.sum(dtype=cp.float64)), float(back.sum(dtype=np.float64))])


def case_cupy_array_quota() -> None:
    """CUDA arrays of 512 MiB, two-dimensional and three-dimensional by turns, until four or a refusal."""
    import cupy as cp
    from cupy.cuda import runtime, texture
    desc = texture.ChannelFormatDescriptor(32, 0, 0, 0, runtime.cudaChannelFormatKindFloat)
    made, error = [], None
    for i in range(4):
        try:
            made.append(texture.CUDAarray(desc, 16384, 8192) if i % 2 == 0 else texture.CUDAarray(desc, 512, 512, 512))
        except cp.cuda.runtime.CUDARuntimeError as exc:
            error = str(exc)
            break
    midpoint(runtime.deviceSynchronize)
    free, total = runtime.memGetInfo()
    result(len(made), error=error, mem_get_info_total=total)


def case_triton_kernel() -> None:
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def axpy(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):  # noqa: N803 (Triton's own style)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(out_ptr + offs, 3.0 * tl.load(x_ptr + offs, mask=mask) + tl.load(y_ptr + offs, mask=mask), mask=mask)

    n = 1 << 22
    x = torch.arange(n, device="cuda", dtype=torch.float32)
    y = torch.ones(n, device="cuda")
    out = torch.empty_like(x)
    axpy[(triton.cdiv(n, 1024),)](x, y, out, n, BLOCK=1024)
    midpoint(torch.cuda.synchronize)
    axpy[(triton.cdiv(n, 1024),)](out, y, out, n, BLOCK=1024)
    result(f"{float(out.double().sum()):.10e}")


def case_nccl_single() -> None:
    import torch
    import torch.distributed as dist
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    t = torch.arange(1 << 20, device="cuda", dtype=torch.float32)
    dist.all_reduce(t)
    midpoint(torch.cuda.synchronize)
    dist.broadcast(t, 0)
    dist.all_reduce(t)
    value = f"{float(t.double().sum()):.10e}"
    dist.destroy_process_group()
    result(value)


if __name__ == "__main__":
    case = globals().get(f"case_{sys.argv[1] if len(sys.argv) > 1 else ''}")
    if case is None:
        names = [n.removeprefix("case_") for n in globals() if n.startswith("case_")]
        sys.exit("usage: compat_cases.py " + "|".join(names))
    case()
