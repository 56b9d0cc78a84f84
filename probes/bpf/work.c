/* Work submitted: kernel launches, graph launches and copy bytes, counted per process and GPU in
 * per-CPU maps at function entry. */
#include "accounting.h"
#include "calls.h"

static __always_inline struct gw_work *gw_work_of(void)
{
    u32 tgid = gw_tgid();
    struct gw_proc_gpu key = {.tgid = tgid, .gpu = gw_current_gpu(tgid)};
    struct gw_work *w = work.lookup(&key);
    if (w)
        return w;
    struct gw_work zero = {};
    gw_note_gpu(tgid, key.gpu);
    return work.lookup_or_try_init(&key, &zero);
}

static __always_inline int launch(struct pt_regs *ctx)
{
    struct gw_work *w = gw_work_of();
    if (w)
        w->launches++;
    return 0;
}

static __always_inline int graph_launch(struct pt_regs *ctx)
{
    struct gw_work *w = gw_work_of();
    if (w)
        w->graph_launches++;
    return 0;
}

/* Every copy entry point probed takes its byte count as the third argument. */
static __always_inline int gw_copy(struct pt_regs *ctx, int dir)
{
    struct gw_work *w = gw_work_of();
    if (w)
        w->copy_bytes[dir & 3] += PT_REGS_PARM3(ctx);
    return 0;
}
static __always_inline int copy_h2d(struct pt_regs *ctx) { return gw_copy(ctx, GW_H2D); }
static __always_inline int copy_d2h(struct pt_regs *ctx) { return gw_copy(ctx, GW_D2H); }
static __always_inline int copy_d2d(struct pt_regs *ctx) { return gw_copy(ctx, GW_D2D); }
static __always_inline int copy_any(struct pt_regs *ctx) { return gw_copy(ctx, GW_COPY_ANY); }
