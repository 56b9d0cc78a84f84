/* Process exit drops a process's accounting at once; an openat of a libcuda tells user space to
 * look for a driver library it does not watch yet. */
#include "maps.h"
#include "calls.h"
#include "events.h"
#include "quota.h"

TRACEPOINT_PROBE(sched, sched_process_exit)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = (u32)id, tgid = id >> 32;
    thread_ctx.delete(&tid);
    struct gw_call *pending = calls.lookup(&id);
    if (pending && pending->reserved)
        gw_quota_settle(tgid, pending, 0);  /* it died inside an allocation: give its reservation back */
    calls.delete(&id);
    quota_stops.delete(&id);
    room_stops.delete(&id);
    quota_forks.delete(&tid);  /* a thread of a member, or a child that never allocated */
#ifdef GW_HAVE_GROUP_DEAD
    if (!args->group_dead)
        return 0;
#else
    if (tid != tgid)
        return 0;
#endif
    room_exempt.delete(&tgid);
    ipc_users.delete(&tgid);
    for (int bit = 0; bit <= GW_MAX_GPUS; bit++) {  /* what it held before the probes saw it: out of its group */
        struct gw_proc_gpu seed_key = {.tgid = tgid, .gpu = bit - 1};
        struct gw_seed *seed = seeds.lookup(&seed_key);
        if (!seed)
            continue;
        gw_quota_add(tgid, bit - 1, -seed->bytes);
        seeds.delete(&seed_key);
    }
    u32 *maskp = procs.lookup(&tgid);
    if (!maskp) {
        quota_member.delete(&tgid);  /* a member that never touched a GPU */
        return 0;
    }
    u32 mask = *maskp;
    for (int bit = 0; bit <= GW_MAX_GPUS; bit++) {
        if (!(mask & (1u << bit)))
            continue;
        struct gw_proc_gpu key = {.tgid = tgid, .gpu = bit - 1};
        struct gw_mem *m = mem.lookup(&key);
        if (m)
            gw_quota_add(tgid, bit - 1, -m->device_bytes);
        mem.delete(&key);
        work.delete(&key);
    }
    procs.delete(&tgid);
    proc_dev.delete(&tgid);
    quota_member.delete(&tgid);
    gw_emit(GW_EV_EXIT, tgid, GW_GPU_UNKNOWN, 0, 0, 0, 0);
    return 0;
}

/* A forked child of a member of an inheriting (cgroup) group joins the group at its first allocation. Thread
 * creation fires this too: those entries go when the thread exits (and the map is an LRU). */
TRACEPOINT_PROBE(sched, sched_process_fork)
{
    u32 *group = gw_quota_group(gw_tgid());
    if (!group || !(*group & GW_QUOTA_INHERIT))
        return 0;
    u32 child = args->child_pid, g = *group;
    quota_forks.update(&child, &g);
    return 0;
}

/* the path contains "libcuda.so" */
static __always_inline int gw_is_libcuda(const char *name, int len)
{
#pragma clang loop unroll(disable)
    for (int i = 0; i < 118; i++) {
        if (i + 10 > len)
            return 0;
        if (name[i & 127] != 'l' || name[(i + 3) & 127] != 'c' || name[(i + 7) & 127] != '.')
            continue;
        if (name[(i + 1) & 127] == 'i' && name[(i + 2) & 127] == 'b' && name[(i + 4) & 127] == 'u' &&
            name[(i + 5) & 127] == 'd' && name[(i + 6) & 127] == 'a' && name[(i + 8) & 127] == 's' &&
            name[(i + 9) & 127] == 'o')
            return 1;
    }
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_openat)
{
    if (args->flags & 3)  /* O_ACCMODE: the loader opens libraries read-only */
        return 0;
    char name[128];
    int len = bpf_probe_read_user_str(name, sizeof(name), args->filename);
    if (len <= 10 || !gw_is_libcuda(name, len - 1))
        return 0;
    u64 id = bpf_get_current_pid_tgid();
    u32 one = 1;
    lib_opens.update(&id, &one);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_openat)
{
    u64 id = bpf_get_current_pid_tgid();
    if (!lib_opens.lookup(&id))
        return 0;
    lib_opens.delete(&id);
    if (args->ret >= 0)
        gw_emit(GW_EV_LIB_OPEN, id >> 32, GW_GPU_UNKNOWN, 0, 0, 0, 0);
    return 0;
}
