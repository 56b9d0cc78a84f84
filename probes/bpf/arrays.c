/* CUDA arrays and mipmapped arrays: device memory from creation (cuArrayCreate_v2, cuArray3DCreate_v2,
 * cuMipmappedArrayCreate) to destruction (cuArrayDestroy, cuMipmappedArrayDestroy, whose probes are the frees').
 * BPF cannot ask the driver for an array's requirement: the bytes are the descriptor's, width x height x depth
 * x channels x the format's channel size, over every level of a mipmapped array (the driver's padding is not
 * counted; the interposer counts the exact requirement). Arrays made deferred or sparse take no memory at
 * creation: not counted. Kept in `allocs` by their handle (kind device), checked against quotas and room as
 * any allocation; the return probe is alloc_return's. */
#include "accounting.h"
#include "calls.h"
#include "quota.h"
#include "room.h"

#define GW_ARRAY_LAYERS 0x05     /* CUDA_ARRAY3D_LAYERED | CUDA_ARRAY3D_CUBEMAP: depth counts layers, never halved */
#define GW_ARRAY_NO_MEMORY 0xc0  /* CUDA_ARRAY3D_SPARSE | CUDA_ARRAY3D_DEFERRED_MAPPING */
#define GW_MAX_LEVELS 16

/* CUDA_ARRAY3D_DESCRIPTOR; a 2D CUDA_ARRAY_DESCRIPTOR is read into it with depth and flags 0. */
struct gw_array_desc { u64 width; u64 height; u64 depth; u32 format; u32 channels; u32 flags; u32 pad; };

static __always_inline u64 gw_channel_bytes(u32 format)
{
    switch (format) {
    case 0x01: case 0x08: case 0xc0: case 0xc1: case 0xc2: case 0xc6: case 0xc7: case 0xc8:
        return 1;  /* 8-bit integers, UNORM/SNORM_INT8X1..X4 */
    case 0x02: case 0x09: case 0x10: case 0xc3: case 0xc4: case 0xc5: case 0xc9: case 0xca: case 0xcb:
        return 2;  /* 16-bit integers, half, UNORM/SNORM_INT16X1..X4 */
    case 0x03: case 0x0a: case 0x20:
        return 4;  /* 32-bit integers, float */
    }
    return 1;      /* packed, block-compressed and video formats: a byte per channel at least */
}

static __always_inline u64 gw_halved(u64 n, u32 level)
{
    u64 h = n >> level;
    return h ? h : 1;
}

static __always_inline u64 gw_array_bytes(struct gw_array_desc *d, u32 levels)
{
    u64 elem = gw_channel_bytes(d->format) * d->channels, total = 0;
    int layers = d->flags & GW_ARRAY_LAYERS;
    for (u32 l = 0; l < GW_MAX_LEVELS; l++) {
        if (l >= levels)
            break;
        u64 h = d->height ? gw_halved(d->height, l) : 1;
        u64 z = !d->depth ? 1 : layers ? d->depth : gw_halved(d->depth, l);
        total += gw_halved(d->width, l) * h * z * elem;
    }
    return total;
}

static __always_inline int gw_array_enter(u64 out, struct gw_array_desc *d, u32 levels)
{
    if (d->flags & GW_ARRAY_NO_MEMORY)
        return 0;
    u32 tgid = gw_tgid();
    struct gw_call c = {.out = out, .size = gw_array_bytes(d, levels), .kind = GW_DEVICE,
                        .gpu = gw_current_gpu(tgid)};
    gw_room_check(tgid, &c, gw_quota_check(tgid, &c));
    gw_park(&c);
    return 0;
}

/* cuArrayCreate_v2(CUarray *h, const CUDA_ARRAY_DESCRIPTOR *d): {u64 width, height; u32 format, channels} */
static __always_inline int array_create(struct pt_regs *ctx)
{
    struct { u64 width; u64 height; u32 format; u32 channels; } d2 = {};
    bpf_probe_read_user(&d2, sizeof(d2), (void *)PT_REGS_PARM2(ctx));
    struct gw_array_desc d = {.width = d2.width, .height = d2.height, .format = d2.format, .channels = d2.channels};
    return gw_array_enter(PT_REGS_PARM1(ctx), &d, 1);
}

/* cuArray3DCreate_v2(CUarray *h, const CUDA_ARRAY3D_DESCRIPTOR *d) */
static __always_inline int array3d_create(struct pt_regs *ctx)
{
    struct gw_array_desc d = {};
    bpf_probe_read_user(&d, 40, (void *)PT_REGS_PARM2(ctx));
    return gw_array_enter(PT_REGS_PARM1(ctx), &d, 1);
}

/* cuMipmappedArrayCreate(CUmipmappedArray *h, const CUDA_ARRAY3D_DESCRIPTOR *d, unsigned levels) */
static __always_inline int mipmap_create(struct pt_regs *ctx)
{
    struct gw_array_desc d = {};
    bpf_probe_read_user(&d, 40, (void *)PT_REGS_PARM2(ctx));
    return gw_array_enter(PT_REGS_PARM1(ctx), &d, (u32)PT_REGS_PARM3(ctx));
}
