/* Per-process, per-GPU accounting: which GPU a call acts on (the thread's current context), the GPUs a
 * process has used, and the outcomes every allocation path shares (allocated, failed, freed), each
 * counted in `mem`, in the quota group and told to user space. */
#ifndef GW_ACCOUNTING_H
#define GW_ACCOUNTING_H

#include "maps.h"
#include "events.h"
#include "quota.h"

static __always_inline s32 gw_current_gpu(u32 tgid)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct gw_ctx_stack *st = thread_ctx.lookup(&tid);
    if (st && st->depth > 0 && st->depth <= GW_CTX_STACK) {
        u32 top = (st->depth - 1) & (GW_CTX_STACK - 1);
        struct gw_addr key = {.tgid = tgid, .addr = st->ctx[top]};
        s32 *dev = ctx_dev.lookup(&key);
        if (dev)
            return *dev;
    }
    s32 *last = proc_dev.lookup(&tgid);
    return last ? *last : GW_GPU_UNKNOWN;
}

static __always_inline void gw_note_gpu(u32 tgid, s32 gpu)
{
    u32 bit = (gpu >= 0 && gpu < GW_MAX_GPUS) ? 1u << (gpu + 1) : 1u;
    u32 *mask = procs.lookup(&tgid);
    if (!mask) {
        procs.update(&tgid, &bit);
    } else if (!(*mask & bit)) {
        u32 updated = *mask | bit;
        procs.update(&tgid, &updated);
    }
}

static __always_inline struct gw_mem *gw_mem_of(u32 tgid, s32 gpu)
{
    struct gw_proc_gpu key = {.tgid = tgid, .gpu = gpu};
    struct gw_mem zero = {};
    struct gw_mem *m = mem.lookup(&key);
    if (m)
        return m;
    gw_note_gpu(tgid, gpu);
    return mem.lookup_or_try_init(&key, &zero);
}

static __always_inline void gw_add_bytes(struct gw_mem *m, u32 kind, u64 bytes)
{
    if (kind == GW_MANAGED)
        __sync_fetch_and_add(&m->managed_bytes, bytes);
    else if (kind == GW_HOST)
        __sync_fetch_and_add(&m->host_pinned_bytes, bytes);
    else
        __sync_fetch_and_add(&m->device_bytes, bytes);
}

/* The three outcomes every allocation path shares: counted, told to user space. */
static __always_inline void gw_allocated(u32 tgid, s32 gpu, u32 kind, u64 addr, u64 size)
{
    struct gw_mem *m = gw_mem_of(tgid, gpu);
    if (!m)
        return;
    gw_add_bytes(m, kind, size);
    __sync_fetch_and_add(&m->allocs, 1);
    gw_emit(GW_EV_ALLOC, tgid, gpu, kind, addr, size, 0);
}

static __always_inline void gw_alloc_failed(u32 tgid, s32 gpu, u32 kind, u64 size, s32 rc)
{
    struct gw_mem *m = gw_mem_of(tgid, gpu);
    if (!m)
        return;
    __sync_fetch_and_add(&m->failed_allocs, 1);
    gw_emit(GW_EV_ALLOC_FAIL, tgid, gpu, kind, 0, size, rc);
}

static __always_inline void gw_freed(u32 tgid, s32 gpu, u32 kind, u64 addr, u64 size)
{
    struct gw_mem *m = gw_mem_of(tgid, gpu);
    if (!m)
        return;
    gw_add_bytes(m, kind, -size);
    if (kind != GW_MANAGED && kind != GW_HOST)
        gw_quota_add(tgid, gpu, -size);
    __sync_fetch_and_add(&m->frees, 1);
    gw_emit(GW_EV_FREE, tgid, gpu, kind, addr, size, 0);
}

#endif
