/* Events to user space: one record on the ring buffer per allocation, free, failure, exit, libcuda open
 * and quota stop; when the ring is full, a count of what was lost instead. */
#ifndef GW_EVENTS_H
#define GW_EVENTS_H

#include "maps.h"

static __always_inline void gw_emit(u32 type, u32 tgid, s32 gpu, u32 kind, u64 addr, u64 size, s32 result)
{
    struct gw_event *e = events.ringbuf_reserve(sizeof(struct gw_event));
    if (!e) {
        u32 zero = 0;
        u64 *n = lost.lookup(&zero);
        if (n)
            __sync_fetch_and_add(n, 1);
        return;
    }
    e->ts_ns = bpf_ktime_get_ns();
    e->addr = addr;
    e->size = size;
    e->tgid = tgid;
    e->tid = (u32)bpf_get_current_pid_tgid();
    e->type = type;
    e->kind = kind;
    e->gpu = gpu;
    e->result = result;
    bpf_get_current_comm(&e->comm, sizeof(e->comm));
    events.ringbuf_submit(e, 0);
}

#endif
