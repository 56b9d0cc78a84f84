/* GPU attribution: the driver acts on the calling thread's current context, so follow which
 * context each thread has current and which device each context belongs to. */
#include "maps.h"
#include "calls.h"

static __always_inline void gw_ctx_device(u32 tgid, u64 ctx, s32 dev)
{
    struct gw_addr key = {.tgid = tgid, .addr = ctx};
    ctx_dev.update(&key, &dev);
}

static __always_inline void gw_ctx_current(u32 tgid, u64 ctx, int push)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct gw_ctx_stack zero = {};
    struct gw_ctx_stack *st = thread_ctx.lookup_or_try_init(&tid, &zero);
    if (!st)
        return;
    if (push || st->depth == 0) {
        if (st->depth < GW_CTX_STACK)
            st->depth++;
    }
    st->ctx[(st->depth - 1) & (GW_CTX_STACK - 1)] = ctx;
    struct gw_addr key = {.tgid = tgid, .addr = ctx};
    s32 *dev = ctx_dev.lookup(&key);
    if (dev)
        proc_dev.update(&tgid, dev);
}

/* cuDevicePrimaryCtxRetain(CUcontext *pctx, CUdevice dev) */
static __always_inline int ctx_retain(struct pt_regs *ctx)
{
    struct gw_call c = {.out = PT_REGS_PARM1(ctx), .gpu = PT_REGS_PARM2(ctx)};
    gw_park(&c);
    return 0;
}

static __always_inline int ctx_retain_return(struct pt_regs *ctx)
{
    struct gw_call c;
    if (!gw_unpark(&c) || PT_REGS_RC(ctx) != 0)
        return 0;
    u64 cu_ctx = 0;
    bpf_probe_read_user(&cu_ctx, sizeof(cu_ctx), (void *)c.out);
    gw_ctx_device(gw_tgid(), cu_ctx, c.gpu);
    return 0;
}

/* cuCtxCreate_v2(pctx, flags, dev), _v3(pctx, params, n, flags, dev), _v4(pctx, params, flags, dev):
 * the new context becomes current. */
static __always_inline int gw_ctx_create(u64 out, s32 dev)
{
    struct gw_call c = {.out = out, .gpu = dev};
    gw_park(&c);
    return 0;
}
static __always_inline int ctx_create_v2(struct pt_regs *ctx) { return gw_ctx_create(PT_REGS_PARM1(ctx), PT_REGS_PARM3(ctx)); }
static __always_inline int ctx_create_v3(struct pt_regs *ctx) { return gw_ctx_create(PT_REGS_PARM1(ctx), PT_REGS_PARM5(ctx)); }
static __always_inline int ctx_create_v4(struct pt_regs *ctx) { return gw_ctx_create(PT_REGS_PARM1(ctx), PT_REGS_PARM4(ctx)); }

static __always_inline int ctx_create_return(struct pt_regs *ctx)
{
    struct gw_call c;
    if (!gw_unpark(&c) || PT_REGS_RC(ctx) != 0)
        return 0;
    u64 cu_ctx = 0;
    bpf_probe_read_user(&cu_ctx, sizeof(cu_ctx), (void *)c.out);
    u32 tgid = gw_tgid();
    gw_ctx_device(tgid, cu_ctx, c.gpu);
    gw_ctx_current(tgid, cu_ctx, 1);
    return 0;
}

/* cuCtxSetCurrent(ctx) and cuCtxPushCurrent_v2(ctx) */
static __always_inline int ctx_set_return(struct pt_regs *ctx)
{
    struct gw_call c;
    if (!gw_unpark(&c) || PT_REGS_RC(ctx) != 0)
        return 0;
    gw_ctx_current(gw_tgid(), c.arg, 0);
    return 0;
}

static __always_inline int ctx_push_return(struct pt_regs *ctx)
{
    struct gw_call c;
    if (!gw_unpark(&c) || PT_REGS_RC(ctx) != 0)
        return 0;
    gw_ctx_current(gw_tgid(), c.arg, 1);
    return 0;
}

/* cuCtxPopCurrent_v2(CUcontext *pctx) */
static __always_inline int ctx_pop_return(struct pt_regs *ctx)
{
    if (PT_REGS_RC(ctx) != 0)
        return 0;
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct gw_ctx_stack *st = thread_ctx.lookup(&tid);
    if (st && st->depth > 0)
        st->depth--;
    return 0;
}

/* cuDeviceGetUuid(_v2)(CUuuid *uuid, CUdevice dev): a process's ordinal names a host GPU through its
 * UUID, whatever CUDA_VISIBLE_DEVICES the process set for itself. */
static __always_inline int uuid_enter(struct pt_regs *ctx)
{
    struct gw_call c = {.out = PT_REGS_PARM1(ctx), .gpu = PT_REGS_PARM2(ctx)};
    gw_park(&c);
    return 0;
}

static __always_inline int uuid_return(struct pt_regs *ctx)
{
    struct gw_call c;
    if (!gw_unpark(&c) || PT_REGS_RC(ctx) != 0)
        return 0;
    struct gw_uuid uuid = {};
    bpf_probe_read_user(&uuid, sizeof(uuid), (void *)c.out);
    struct gw_proc_gpu key = {.tgid = gw_tgid(), .gpu = c.gpu};
    dev_uuid.update(&key, &uuid);
    return 0;
}
