/* VMM: physical bytes count from cuMemCreate until the handle is released and no mapping of it
 * remains, in either order (NCCL releases a handle right after mapping it). */
#include "accounting.h"
#include "calls.h"
#include "quota.h"
#include "room.h"

static __always_inline void gw_handle_gone(u32 tgid, u64 handle, struct gw_handle *h)
{
    struct gw_handle gone = *h;
    struct gw_addr key = {.tgid = tgid, .addr = handle};
    handles.delete(&key);
    gw_freed(tgid, gone.gpu, GW_VMM, handle, gone.size);
}

/* cuMemCreate(CUmemGenericAllocationHandle *h, size_t size, const CUmemAllocationProp *prop, flags):
 * prop->location.id, at offset 12, is the device ordinal. */
static __always_inline int vmm_create(struct pt_regs *ctx)
{
    s32 dev = GW_GPU_UNKNOWN;
    bpf_probe_read_user(&dev, sizeof(dev), (void *)(PT_REGS_PARM3(ctx) + 12));
    struct gw_call c = {.out = PT_REGS_PARM1(ctx), .size = PT_REGS_PARM2(ctx), .gpu = dev, .kind = GW_VMM};
    gw_room_check(gw_tgid(), &c, gw_quota_check(gw_tgid(), &c));
    gw_park(&c);
    return 0;
}

static __always_inline int vmm_create_return(struct pt_regs *ctx)
{
    struct gw_call c;
    if (!gw_unpark(&c))
        return 0;
    u32 tgid = gw_tgid();
    s32 rc = PT_REGS_RC(ctx);
    if (rc != 0) {
        gw_quota_settle(tgid, &c, 0);
        gw_alloc_failed(tgid, c.gpu, GW_VMM, c.size, rc);
        return 0;
    }
    u64 handle = 0;
    bpf_probe_read_user(&handle, sizeof(handle), (void *)c.out);
    struct gw_addr key = {.tgid = tgid, .addr = handle};
    struct gw_handle h = {.size = c.size, .gpu = c.gpu};
    handles.update(&key, &h);
    gw_quota_settle(tgid, &c, c.size);
    gw_allocated(tgid, c.gpu, GW_VMM, handle, c.size);
    return 0;
}

static __always_inline int vmm_release_return(struct pt_regs *ctx)
{
    struct gw_call c;
    if (!gw_unpark(&c) || PT_REGS_RC(ctx) != 0)
        return 0;
    u32 tgid = gw_tgid();
    struct gw_addr key = {.tgid = tgid, .addr = c.arg};
    struct gw_handle *h = handles.lookup(&key);
    if (!h)
        return 0;
    h->released = 1;
    if (h->mappings <= 0)
        gw_handle_gone(tgid, c.arg, h);
    return 0;
}

/* cuMemMap(CUdeviceptr ptr, size_t size, size_t offset, handle, flags) */
static __always_inline int vmm_map(struct pt_regs *ctx)
{
    struct gw_call c = {.arg = PT_REGS_PARM1(ctx), .size = PT_REGS_PARM2(ctx), .out = PT_REGS_PARM4(ctx)};
    gw_park(&c);
    return 0;
}

static __always_inline int vmm_map_return(struct pt_regs *ctx)
{
    struct gw_call c;
    if (!gw_unpark(&c) || PT_REGS_RC(ctx) != 0)
        return 0;
    u32 tgid = gw_tgid();
    struct gw_addr hkey = {.tgid = tgid, .addr = c.out};
    struct gw_handle *h = handles.lookup(&hkey);
    if (!h)
        return 0;
    __sync_fetch_and_add(&h->mappings, 1);
    struct gw_addr mkey = {.tgid = tgid, .addr = c.arg};
    struct gw_mapping mp = {.handle = c.out, .size = c.size};
    mappings.update(&mkey, &mp);
    return 0;
}

/* cuMemUnmap(CUdeviceptr ptr, size_t size): the range may cover several mappings. */
static __always_inline int vmm_unmap(struct pt_regs *ctx)
{
    struct gw_call c = {.arg = PT_REGS_PARM1(ctx), .size = PT_REGS_PARM2(ctx)};
    gw_park(&c);
    return 0;
}

static __always_inline int vmm_unmap_return(struct pt_regs *ctx)
{
    struct gw_call c;
    if (!gw_unpark(&c) || PT_REGS_RC(ctx) != 0)
        return 0;
    u32 tgid = gw_tgid();
    u64 at = c.arg, end = c.arg + c.size;
    for (int i = 0; i < GW_UNMAP_SPAN && at < end; i++) {
        struct gw_addr mkey = {.tgid = tgid, .addr = at};
        struct gw_mapping *mp = mappings.lookup(&mkey);
        if (!mp)
            break;
        struct gw_mapping unmapped = *mp;
        mappings.delete(&mkey);
        at += unmapped.size ? unmapped.size : end - at;
        struct gw_addr hkey = {.tgid = tgid, .addr = unmapped.handle};
        struct gw_handle *h = handles.lookup(&hkey);
        if (!h)
            continue;
        __sync_fetch_and_add(&h->mappings, -1);
        if (h->mappings <= 0 && h->released)
            gw_handle_gone(tgid, unmapped.handle, h);
    }
    return 0;
}
