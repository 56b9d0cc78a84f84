/* Quotas for processes not under the interposer: a process's quota group, the group's bytes per GPU,
 * the reservation an allocation makes at its entry (or the stop, when it would cross the quota), and
 * settling the reservation when the allocation returns. The maps and how they add up: maps.h. */
#ifndef GW_QUOTA_H
#define GW_QUOTA_H

#include "maps.h"
#include "events.h"

/* A process's quota group, if any. A forked child of a member of an inheriting (cgroup) group joins it
 * here, at its first allocation or free. */
static __always_inline u32 *gw_quota_group(u32 tgid)
{
    u32 *group = quota_member.lookup(&tgid);
    if (group)
        return group;
    u32 *inherited = quota_forks.lookup(&tgid);
    if (!inherited)
        return 0;
    u32 g = *inherited;
    quota_forks.delete(&tgid);
    quota_member.update(&tgid, &g);
    return quota_member.lookup(&tgid);
}

static __always_inline void gw_quota_add(u32 tgid, s32 gpu, u64 bytes)
{
    u32 *group = gw_quota_group(tgid);
    if (!group)
        return;
    struct gw_proc_gpu key = {.tgid = *group, .gpu = gpu};
    u64 zero = 0;
    u64 *used = quota_used.lookup_or_try_init(&key, &zero);
    if (used)
        __sync_fetch_and_add(used, bytes);
}

/* At an allocation's entry: reserve its bytes in the group, so that concurrent allocations of members
 * cannot both pass; if the group's total then crosses its quota, take the reservation back and stop the
 * process before the call runs, holding exactly what it held. User space continues it once the
 * allocation fits (granting its bytes in quota_granted first), or kills it. */
static __always_inline int gw_quota_check(u32 tgid, struct gw_call *c)
{
    if (c->kind == GW_MANAGED || c->kind == GW_HOST)
        return 0;
    u32 *groupp = gw_quota_group(tgid);
    if (!groupp)
        return 0;
    u32 group = *groupp;
    u64 *limitp = quota_limit.lookup(&group);
    if (!limitp || !*limitp)
        return 0;
    u64 limit = *limitp;
    struct gw_proc_gpu key = {.tgid = group, .gpu = c->gpu};
    u64 zero = 0;
    u64 *used = quota_used.lookup_or_try_init(&key, &zero);
    if (!used)
        return 0;  /* map full: fail open, as accounting does */
    u64 *base = quota_base.lookup(&key), *granted = quota_granted.lookup(&key);
    u64 others = (base ? *base : 0) + (granted ? *granted : 0);
    s64 total;
    if (c->size <= limit) {
        __sync_fetch_and_add(used, c->size);
        total = (s64)(*used + others);  /* ours, and what others reserved meanwhile */
        if (total <= (s64)limit) {
            c->qgroup = group;
            c->reserved = 1;
            return 0;
        }
        __sync_fetch_and_add(used, -c->size);
        total -= c->size;
    } else {
        total = (s64)(*used + others);
    }
    u64 id = bpf_get_current_pid_tgid();
    struct gw_stop stop = {.size = c->size, .gpu = c->gpu, .kind = c->kind,
                           .group_used = total > 0 ? total : 0, .limit = limit};
    if (quota_stops.update(&id, &stop))
        return 0;  /* no record, no stop: user space could never continue it */
    bpf_send_signal(GW_SIGSTOP);
    gw_emit(GW_EV_QUOTA_STOP, tgid, c->gpu, c->kind, 0, c->size, 0);
    return 1;
}

/* An allocation returned: its reservation becomes what it allocated (`bytes`, 0 when it failed); an
 * allocation that reserved nothing (no quota, or continued after a stop) is counted now. */
static __always_inline void gw_quota_settle(u32 tgid, struct gw_call *c, u64 bytes)
{
    if (c->kind == GW_MANAGED || c->kind == GW_HOST)
        return;
    if (!c->reserved) {
        if (bytes)
            gw_quota_add(tgid, c->gpu, bytes);
        return;
    }
    struct gw_proc_gpu key = {.tgid = c->qgroup, .gpu = c->gpu};
    u64 *used = quota_used.lookup(&key);
    if (used && bytes != c->size)
        __sync_fetch_and_add(used, bytes - c->size);
}

#endif
