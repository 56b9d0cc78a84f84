/* Graph memory: memory alloc nodes take device memory from the driver's graph pool when their graph's exec
 * launches, and the pool keeps it between launches. BPF cannot ask the driver what the pool holds, nor follow
 * launches exactly (they may be sampled): an exec counts the sizes of its graph's alloc nodes from its
 * instantiation to its destruction (cuGraphExecDestroy, whose probes are the frees'), the most it can hold, as
 * async memory, checked against quotas and room at the instantiation. A graph gathers those sizes in graph_mem
 * from cuGraphAddMemAllocNode and from stream-ordered allocations made while a stream captures into it
 * (cuStreamBeginCapture ... cuStreamEndCapture): those are nodes, not allocations, so they are not counted when
 * made, and their captured frees find nothing to uncount. The interposer counts the pool's exact figure. */
#include "accounting.h"
#include "calls.h"
#include "quota.h"
#include "room.h"

/* (tgid, graph or capturing stream) -> the sizes of its memory alloc nodes and their GPU. Writes, reads: here;
 * tracer.py (GC) */
BPF_HASH(graph_mem, struct gw_addr, struct gw_alloc, 65536);

static __always_inline void gw_graph_add(u32 tgid, u64 graph, u64 size, s32 gpu)
{
    struct gw_addr key = {.tgid = tgid, .addr = graph};
    struct gw_alloc zero = {.gpu = gpu, .kind = GW_ASYNC};
    struct gw_alloc *g = graph_mem.lookup_or_try_init(&key, &zero);
    if (!g)
        return;
    __sync_fetch_and_add(&g->size, size);
    g->gpu = gpu;
}

/* cuGraphAddMemAllocNode(CUgraphNode *node, CUgraph g, deps, ndeps, CUDA_MEM_ALLOC_NODE_PARAMS *p):
 * p->poolProps.location.id at offset 12, p->bytesize at 104. */
static __always_inline int graph_alloc_node(struct pt_regs *ctx)
{
    u64 p = PT_REGS_PARM5(ctx), size = 0;
    s32 gpu = GW_GPU_UNKNOWN;
    bpf_probe_read_user(&gpu, sizeof(gpu), (void *)(p + 12));
    bpf_probe_read_user(&size, sizeof(size), (void *)(p + 104));
    struct gw_call c = {.arg = PT_REGS_PARM2(ctx), .size = size, .gpu = gpu};
    gw_park(&c);
    return 0;
}

static __always_inline int graph_alloc_node_return(struct pt_regs *ctx)
{
    struct gw_call c;
    if (gw_unpark(&c) && PT_REGS_RC(ctx) == 0)
        gw_graph_add(gw_tgid(), c.arg, c.size, c.gpu);
    return 0;
}

/* cuStreamBeginCapture*(CUstream s, ...): the stream gathers node sizes until cuStreamEndCapture. */
static __always_inline int graph_capture_return(struct pt_regs *ctx)
{
    struct gw_call c;
    if (!gw_unpark(&c) || PT_REGS_RC(ctx) != 0)
        return 0;
    u32 tgid = gw_tgid();
    struct gw_addr key = {.tgid = tgid, .addr = c.arg};
    struct gw_alloc zero = {.gpu = gw_current_gpu(tgid), .kind = GW_ASYNC};
    graph_mem.update(&key, &zero);
    return 0;
}

/* cuStreamEndCapture(CUstream s, CUgraph *g): what the stream gathered goes to the graph. */
static __always_inline int graph_end_capture(struct pt_regs *ctx)
{
    struct gw_call c = {.arg = PT_REGS_PARM1(ctx), .out = PT_REGS_PARM2(ctx)};
    gw_park(&c);
    return 0;
}

static __always_inline int graph_end_capture_return(struct pt_regs *ctx)
{
    struct gw_call c;
    if (!gw_unpark(&c))
        return 0;
    u32 tgid = gw_tgid();
    struct gw_addr key = {.tgid = tgid, .addr = c.arg};
    struct gw_alloc *s = graph_mem.lookup(&key);
    if (!s)
        return 0;
    struct gw_alloc gathered = *s;
    graph_mem.delete(&key);
    u64 graph = 0;
    bpf_probe_read_user(&graph, sizeof(graph), (void *)c.out);
    if (PT_REGS_RC(ctx) == 0 && gathered.size)
        gw_graph_add(tgid, graph, gathered.size, gathered.gpu);
    return 0;
}

/* cuMemAllocAsync(dptr, size, stream) and cuMemAllocFromPoolAsync(dptr, size, pool, stream), _ptsz too: on a
 * capturing stream a node of the graph; otherwise an allocation (memory.c). */
static __always_inline int gw_async_enter(struct pt_regs *ctx, u64 stream)
{
    u32 tgid = gw_tgid();
    struct gw_addr key = {.tgid = tgid, .addr = stream};
    struct gw_alloc *s = stream ? graph_mem.lookup(&key) : 0;
    if (!s)
        return gw_alloc_enter(PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx), GW_ASYNC);
    __sync_fetch_and_add(&s->size, PT_REGS_PARM2(ctx));
    return 0;
}
static __always_inline int graph_alloc_async(struct pt_regs *ctx) { return gw_async_enter(ctx, PT_REGS_PARM3(ctx)); }
static __always_inline int graph_alloc_pool(struct pt_regs *ctx) { return gw_async_enter(ctx, PT_REGS_PARM4(ctx)); }

/* cuGraphInstantiate*(CUgraphExec *exec, CUgraph g, ...): the exec counts its graph's node sizes; the return
 * probe is alloc_return's (the exec is kept in `allocs`). A graph without memory nodes is not looked at again. */
static __always_inline int graph_instantiate(struct pt_regs *ctx)
{
    u32 tgid = gw_tgid();
    struct gw_addr key = {.tgid = tgid, .addr = PT_REGS_PARM2(ctx)};
    struct gw_alloc *g = graph_mem.lookup(&key);
    if (!g || !g->size)
        return 0;
    struct gw_call c = {.out = PT_REGS_PARM1(ctx), .size = g->size, .kind = GW_ASYNC, .gpu = g->gpu};
    gw_room_check(tgid, &c, gw_quota_check(tgid, &c));
    gw_park(&c);
    return 0;
}

/* cuGraphDestroy(CUgraph g): its node sizes go (execs made from it keep theirs). */
static __always_inline int graph_destroy(struct pt_regs *ctx)
{
    struct gw_addr key = {.tgid = gw_tgid(), .addr = PT_REGS_PARM1(ctx)};
    graph_mem.delete(&key);
    return 0;
}
