/* Room on the device for processes not under the interposer: an allocation that does not fit what its GPU can
 * still give stops the process before the call runs, while user space makes room (it checkpoints or swaps
 * others out) and continues it; or, after room_wait_ms, continues it to fail as the driver says. Off unless
 * user space writes room_free for the GPU (enforcer/roomstops.py). */
#ifndef GW_ROOM_H
#define GW_ROOM_H

#include "maps.h"
#include "events.h"

/* At an allocation's entry, after the quota check (`stopped`: the quota stopped it already). What fits is taken
 * from room_free at once, so that concurrent allocations cannot both pass; user space rewrites it every tick. */
static __always_inline void gw_room_check(u32 tgid, struct gw_call *c, int stopped)
{
    if (stopped || c->kind == GW_MANAGED || c->kind == GW_HOST || c->gpu < 0)
        return;
    s32 gpu = c->gpu;
    s64 *free = room_free.lookup(&gpu);  /* first: with the check off (the usual case) the one lookup */
    if (!free || room_exempt.lookup(&tgid))
        return;
    if ((s64)c->size <= *free) {
        __sync_fetch_and_add(free, -(s64)c->size);
        return;
    }
    u64 id = bpf_get_current_pid_tgid();
    struct gw_stop stop = {.size = c->size, .gpu = c->gpu, .kind = c->kind, .group_used = 0,
                           .limit = *free > 0 ? *free : 0};
    if (room_stops.update(&id, &stop))
        return;  /* no record, no stop: user space could never continue it */
    bpf_send_signal(GW_SIGSTOP);
    gw_emit(GW_EV_ROOM_STOP, tgid, c->gpu, c->kind, 0, c->size, 0);
}

#endif
