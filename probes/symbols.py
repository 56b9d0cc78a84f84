"""Which libcuda entry points gpuwatch probes, and with which BPF functions."""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Group(str, Enum):
    MEMORY = "memory"
    CONTEXT = "context"
    WORK = "work"  # launches, graph launches, copies: the ones --launches controls


@dataclass(frozen=True)
class ProbeSpec:
    symbol: str
    entry: str | None
    ret: str | None
    group: Group
    missing: str | None = None  # None: every supported driver exports it; else why a driver may not

    @property
    def lost(self) -> str:
        """What goes uncounted when a library does not export it."""
        return LOST_WITHOUT[self.group]


# Why an entry point may be absent from a libcuda (discovery logs it at debug, not as a warning).
PER_THREAD = "per-thread default stream variant (_ptsz/_ptds): only in drivers built with it"
STREAM_ORDERED = "stream-ordered allocator: CUDA 11.2+ drivers only"
PER_THREAD_STREAM_ORDERED = "per-thread default stream variant of a CUDA 11.2+ call"
CTX_CREATE_V3 = "cuCtxCreate with execution affinity: CUDA 11.4+ drivers only"
CTX_CREATE_V4 = "cuCtxCreate with CUctxCreateParams: CUDA 12.5+ drivers only"
UUID_V2 = "cuDeviceGetUuid that also fills MIG instances' UUIDs: CUDA 11.4+ drivers only"
LAUNCH_EX = "launch with attributes (clusters): CUDA 11.8+ drivers only"
PER_THREAD_LAUNCH_EX = "per-thread default stream variant of a CUDA 11.8+ call"
LEGACY_IPC_OPEN = "the CUDA 10 cuIpcOpenMemHandle: drivers keep it for programs built then"
GRAPH_MEMORY = "graph memory nodes: CUDA 11.4+ drivers only"
CAPTURE_TO_GRAPH = "capture into an existing graph: CUDA 12.3+ drivers only"
INSTANTIATE_PARAMS = "graph instantiation with parameters: CUDA 12.0+ drivers only"
LEGACY_INSTANTIATE = "the CUDA 11 graph instantiation: drivers keep it for programs built then"
LEGACY_CAPTURE = "the CUDA 10.0 capture without a mode: drivers keep it for programs built then"

# What a missing entry point costs, by group (a warning names it when every supported driver has it).
LOST_WITHOUT: dict[Group, str] = {
    Group.MEMORY: "allocations or frees through it are not counted",
    Group.CONTEXT: "GPU attribution through it is lost",
    Group.WORK: "work submitted through it is not counted",
}

Symbol = str | tuple[str, str]  # a name, or (name, why it may be missing)


def _specs(group: Group, entry: str | None, ret: str | None, *symbols: Symbol) -> list[ProbeSpec]:
    named = [(s, None) if isinstance(s, str) else s for s in symbols]
    return [ProbeSpec(name, entry, ret, group, missing) for name, missing in named]


M, C, W = Group.MEMORY, Group.CONTEXT, Group.WORK

PROBES: list[ProbeSpec] = [
    *_specs(M, "alloc_device", "alloc_return", "cuMemAlloc_v2"),
    *_specs(M, "alloc_pitch", "alloc_return", "cuMemAllocPitch_v2"),
    # async allocations on a capturing stream are graph memory nodes (graphmem.c), others as memory.c counts them
    *_specs(M, "graph_alloc_async", "alloc_return", ("cuMemAllocAsync", STREAM_ORDERED),
            ("cuMemAllocAsync_ptsz", PER_THREAD_STREAM_ORDERED)),
    *_specs(M, "graph_alloc_pool", "alloc_return", ("cuMemAllocFromPoolAsync", STREAM_ORDERED),
            ("cuMemAllocFromPoolAsync_ptsz", PER_THREAD_STREAM_ORDERED)),
    *_specs(M, "alloc_managed", "alloc_return", "cuMemAllocManaged"),
    *_specs(M, "alloc_host", "alloc_return", "cuMemHostAlloc", "cuMemAllocHost_v2"),
    *_specs(M, "park_arg1", "free_return", "cuMemFree_v2", ("cuMemFreeAsync", STREAM_ORDERED),
            ("cuMemFreeAsync_ptsz", PER_THREAD_STREAM_ORDERED), "cuMemFreeHost", "cuArrayDestroy",
            "cuMipmappedArrayDestroy", "cuGraphExecDestroy"),
    *_specs(M, "array_create", "alloc_return", "cuArrayCreate_v2"),
    *_specs(M, "array3d_create", "alloc_return", "cuArray3DCreate_v2"),
    *_specs(M, "mipmap_create", "alloc_return", "cuMipmappedArrayCreate"),
    *_specs(M, "graph_alloc_node", "graph_alloc_node_return", ("cuGraphAddMemAllocNode", GRAPH_MEMORY)),
    *_specs(M, "park_arg1", "graph_capture_return", ("cuStreamBeginCapture", LEGACY_CAPTURE),
            ("cuStreamBeginCapture_ptsz", LEGACY_CAPTURE), "cuStreamBeginCapture_v2",
            ("cuStreamBeginCapture_v2_ptsz", PER_THREAD), ("cuStreamBeginCaptureToGraph", CAPTURE_TO_GRAPH),
            ("cuStreamBeginCaptureToGraph_ptsz", CAPTURE_TO_GRAPH)),
    *_specs(M, "graph_end_capture", "graph_end_capture_return", "cuStreamEndCapture",
            ("cuStreamEndCapture_ptsz", PER_THREAD)),
    *_specs(M, "graph_instantiate", "alloc_return", ("cuGraphInstantiateWithFlags", GRAPH_MEMORY),
            ("cuGraphInstantiate_v2", LEGACY_INSTANTIATE), ("cuGraphInstantiateWithParams", INSTANTIATE_PARAMS),
            ("cuGraphInstantiateWithParams_ptsz", INSTANTIATE_PARAMS)),
    *_specs(M, "graph_destroy", None, "cuGraphDestroy"),
    *_specs(M, "ipc_use", None, "cuIpcGetMemHandle", "cuIpcOpenMemHandle_v2", ("cuIpcOpenMemHandle", LEGACY_IPC_OPEN)),
    *_specs(M, "vmm_create", "vmm_create_return", "cuMemCreate"),
    *_specs(M, "park_arg1", "vmm_release_return", "cuMemRelease"),
    *_specs(M, "vmm_map", "vmm_map_return", "cuMemMap"),
    *_specs(M, "vmm_unmap", "vmm_unmap_return", "cuMemUnmap"),
    *_specs(C, "ctx_retain", "ctx_retain_return", "cuDevicePrimaryCtxRetain"),
    *_specs(C, "ctx_create_v2", "ctx_create_return", "cuCtxCreate_v2"),
    *_specs(C, "ctx_create_v3", "ctx_create_return", ("cuCtxCreate_v3", CTX_CREATE_V3)),
    *_specs(C, "ctx_create_v4", "ctx_create_return", ("cuCtxCreate_v4", CTX_CREATE_V4)),
    *_specs(C, "park_arg1", "ctx_set_return", "cuCtxSetCurrent"),
    *_specs(C, "park_arg1", "ctx_push_return", "cuCtxPushCurrent_v2"),
    *_specs(C, None, "ctx_pop_return", "cuCtxPopCurrent_v2"),
    *_specs(C, "uuid_enter", "uuid_return", "cuDeviceGetUuid", ("cuDeviceGetUuid_v2", UUID_V2)),
    *_specs(W, "launch", None, "cuLaunchKernel", ("cuLaunchKernel_ptsz", PER_THREAD), ("cuLaunchKernelEx", LAUNCH_EX),
            ("cuLaunchKernelEx_ptsz", PER_THREAD_LAUNCH_EX), "cuLaunchCooperativeKernel",
            ("cuLaunchCooperativeKernel_ptsz", PER_THREAD)),
    *_specs(W, "graph_launch", None, "cuGraphLaunch", ("cuGraphLaunch_ptsz", PER_THREAD)),
    *_specs(W, "copy_h2d", None, "cuMemcpyHtoD_v2", "cuMemcpyHtoDAsync_v2", ("cuMemcpyHtoD_v2_ptds", PER_THREAD),
            ("cuMemcpyHtoDAsync_v2_ptsz", PER_THREAD)),
    *_specs(W, "copy_d2h", None, "cuMemcpyDtoH_v2", "cuMemcpyDtoHAsync_v2", ("cuMemcpyDtoH_v2_ptds", PER_THREAD),
            ("cuMemcpyDtoHAsync_v2_ptsz", PER_THREAD)),
    *_specs(W, "copy_d2d", None, "cuMemcpyDtoD_v2", "cuMemcpyDtoDAsync_v2", ("cuMemcpyDtoD_v2_ptds", PER_THREAD),
            ("cuMemcpyDtoDAsync_v2_ptsz", PER_THREAD)),
    *_specs(W, "copy_any", None, "cuMemcpy", "cuMemcpyAsync", ("cuMemcpy_ptds", PER_THREAD),
            ("cuMemcpyAsync_ptsz", PER_THREAD)),
]

BPF_SOURCES = ["context.c", "memory.c", "vmm.c", "work.c", "lifecycle.c", "arrays.c", "graphmem.c", "ipc.c"]

# Every BPF handler gets a number: the attach cookie that the dispatcher switches on.
HANDLERS: list[str] = sorted({fn for p in PROBES for fn in (p.entry, p.ret) if fn})
COOKIE: dict[str, int] = {name: i for i, name in enumerate(HANDLERS)}
DISPATCH = "gw_dispatch"


def perf_wrapper(handler: str) -> str:
    return f"gw_perf_{handler}"


def generated_programs() -> str:
    """The dispatcher that uprobe_multi links run (one program, the cookie names the handler), and one
    wrapper per handler for kernels without uprobe_multi, where each probe is its own perf event."""
    cases = "\n".join(f"    case {COOKIE[h]}: return {h}(ctx);" for h in HANDLERS)
    wrappers = "\n".join(f"int {perf_wrapper(h)}(struct pt_regs *ctx) {{ return {h}(ctx); }}" for h in HANDLERS)
    return (f"int {DISPATCH}(struct pt_regs *ctx)\n{{\n    switch (bpf_get_attach_cookie(ctx)) {{\n{cases}\n"
            f"    }}\n    return 0;\n}}\n{wrappers}\n")
