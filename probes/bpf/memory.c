/* Device, pitch, async/pool, managed and pinned host allocations: counted when the call returns
 * success, keyed by process and GPU; a free matches its allocation from any thread. */
#include "accounting.h"
#include "calls.h"
#include "quota.h"
#include "room.h"

static __always_inline int gw_alloc_enter(u64 out, u64 size, u32 kind)
{
    u32 tgid = gw_tgid();
    struct gw_call c = {.out = out, .size = size, .kind = kind, .gpu = gw_current_gpu(tgid)};
    gw_room_check(tgid, &c, gw_quota_check(tgid, &c));
    gw_park(&c);
    return 0;
}

static __always_inline int gw_alloc_return(struct pt_regs *ctx)
{
    struct gw_call c;
    if (!gw_unpark(&c))
        return 0;
    u32 tgid = gw_tgid();
    s32 rc = PT_REGS_RC(ctx);
    if (rc != 0) {
        gw_quota_settle(tgid, &c, 0);
        gw_alloc_failed(tgid, c.gpu, c.kind, c.size, rc);
        return 0;
    }
    u64 addr = 0;
    bpf_probe_read_user(&addr, sizeof(addr), (void *)c.out);
    u64 size = c.size;
    if (c.kind == GW_PITCH) {
        u64 pitch = 0;
        bpf_probe_read_user(&pitch, sizeof(pitch), (void *)c.out2);
        size = pitch * c.arg;
    }
    gw_quota_settle(tgid, &c, size);
    c.size = size;
    struct gw_addr key = {.tgid = tgid, .addr = addr};
    struct gw_alloc a = {.size = c.size, .gpu = c.gpu, .kind = c.kind};
    allocs.update(&key, &a);
    gw_allocated(tgid, c.gpu, c.kind, addr, c.size);
    return 0;
}

static __always_inline int alloc_device(struct pt_regs *ctx)  { return gw_alloc_enter(PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx), GW_DEVICE); }
static __always_inline int alloc_async(struct pt_regs *ctx)   { return gw_alloc_enter(PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx), GW_ASYNC); }
static __always_inline int alloc_managed(struct pt_regs *ctx) { return gw_alloc_enter(PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx), GW_MANAGED); }
static __always_inline int alloc_host(struct pt_regs *ctx)    { return gw_alloc_enter(PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx), GW_HOST); }

/* cuMemAllocPitch_v2(CUdeviceptr *dptr, size_t *pitch, size_t width, size_t height, unsigned elem) */
static __always_inline int alloc_pitch(struct pt_regs *ctx)
{
    u32 tgid = gw_tgid();
    struct gw_call c = {.out = PT_REGS_PARM1(ctx), .out2 = PT_REGS_PARM2(ctx), .arg = PT_REGS_PARM4(ctx),
                        .size = PT_REGS_PARM3(ctx) * PT_REGS_PARM4(ctx), .kind = GW_PITCH,
                        .gpu = gw_current_gpu(tgid)};
    gw_room_check(tgid, &c, gw_quota_check(tgid, &c));
    gw_park(&c);
    return 0;
}

static __always_inline int alloc_return(struct pt_regs *ctx) { return gw_alloc_return(ctx); }

static __always_inline int free_return(struct pt_regs *ctx)
{
    struct gw_call c;
    if (!gw_unpark(&c) || PT_REGS_RC(ctx) != 0)
        return 0;
    u32 tgid = gw_tgid();
    struct gw_addr key = {.tgid = tgid, .addr = c.arg};
    struct gw_alloc *a = allocs.lookup(&key);
    if (!a)
        return 0;
    struct gw_alloc freed = *a;
    allocs.delete(&key);
    gw_freed(tgid, freed.gpu, freed.kind, c.arg, freed.size);
    return 0;
}
