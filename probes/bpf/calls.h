/* The calling process, and a call's arguments carried from its entry probe to its return probe. */
#ifndef GW_CALLS_H
#define GW_CALLS_H

#include "maps.h"

static __always_inline u32 gw_tgid(void) { return bpf_get_current_pid_tgid() >> 32; }

/* Entry probes park their arguments here; the matching return probe takes them back. */
static __always_inline void gw_park(struct gw_call *c)
{
    u64 id = bpf_get_current_pid_tgid();
    calls.update(&id, c);
}

static __always_inline int gw_unpark(struct gw_call *out)
{
    u64 id = bpf_get_current_pid_tgid();
    struct gw_call *c = calls.lookup(&id);
    if (!c)
        return 0;
    *out = *c;
    calls.delete(&id);
    return 1;
}

/* Entry handler of every call whose return probe needs only the first argument. */
static __always_inline int park_arg1(struct pt_regs *ctx)
{
    struct gw_call c = {.arg = PT_REGS_PARM1(ctx)};
    gw_park(&c);
    return 0;
}

#endif
