/* Types, maps and helpers shared by every gpuwatch probe. One BPF program is built from all the
 * probe files, so every map here is declared once and seen by all of them. */
#ifndef GPUWATCH_H
#define GPUWATCH_H

#include <uapi/linux/ptrace.h>

#define GW_GPU_UNKNOWN (-1)
#define GW_MAX_GPUS 31          /* gpu_mask bit 0 is "unknown", bits 1..31 are GPUs 0..30 */
#define GW_CTX_STACK 8
#define GW_UNMAP_SPAN 32        /* mappings one cuMemUnmap may cover */

enum gw_kind { GW_DEVICE = 0, GW_PITCH = 1, GW_ASYNC = 2, GW_MANAGED = 3, GW_HOST = 4, GW_VMM = 5 };
enum gw_event_type { GW_EV_ALLOC = 1, GW_EV_FREE = 2, GW_EV_ALLOC_FAIL = 3, GW_EV_EXIT = 4,
                     GW_EV_LIB_OPEN = 5, GW_EV_QUOTA_STOP = 6 };
#define GW_SIGSTOP 19
#define GW_QUOTA_INHERIT 0x80000000u /* a group id with this bit: a member's forked children join it */
enum gw_copy { GW_H2D = 0, GW_D2H = 1, GW_D2D = 2, GW_COPY_ANY = 3 };

struct gw_proc_gpu { u32 tgid; s32 gpu; };

/* Memory accounting, updated atomically from any thread. */
struct gw_mem {
    u64 device_bytes;      /* plain, pitch, async/pool and VMM physical */
    u64 managed_bytes;
    u64 host_pinned_bytes;
    u64 allocs;
    u64 frees;
    u64 failed_allocs;
};

/* Work counters, per CPU: no atomics on the launch path. */
struct gw_work {
    u64 launches;
    u64 graph_launches;
    u64 copy_bytes[4];
};

struct gw_addr { u32 tgid; u32 pad; u64 addr; };
struct gw_alloc { u64 size; s32 gpu; u32 kind; };
struct gw_handle { u64 size; s32 gpu; s32 mappings; u32 released; u32 pad; };
struct gw_mapping { u64 handle; u64 size; };

/* Arguments an entry probe keeps for its return probe, per thread. */
struct gw_call { u64 out; u64 out2; u64 arg; u64 size; s32 gpu; u32 kind; u32 qgroup; u32 reserved; };

/* The allocation a thread was stopped before: it runs when the process is continued. group_used is what
 * the group held then (its members' bytes, reservations and grants). */
struct gw_stop { u64 size; s32 gpu; u32 kind; u64 group_used; u64 limit; };

struct gw_ctx_stack { u64 ctx[GW_CTX_STACK]; u32 depth; u32 pad; };
struct gw_uuid { u8 bytes[16]; };

struct gw_event {
    u64 ts_ns;
    u64 addr;
    u64 size;
    u32 tgid;
    u32 tid;
    u32 type;
    u32 kind;
    s32 gpu;
    s32 result;
    char comm[16];
};

BPF_HASH(mem, struct gw_proc_gpu, struct gw_mem, 65536);
BPF_PERCPU_HASH(work, struct gw_proc_gpu, struct gw_work, 65536);
BPF_HASH(procs, u32, u32, 65536);                          /* tgid -> gpu_mask */
BPF_HASH(allocs, struct gw_addr, struct gw_alloc, 1048576);
BPF_HASH(handles, struct gw_addr, struct gw_handle, 262144);
BPF_HASH(mappings, struct gw_addr, struct gw_mapping, 262144);
BPF_HASH(calls, u64, struct gw_call, 65536);               /* pid_tgid -> pending call */
BPF_HASH(ctx_dev, struct gw_addr, s32, 65536);              /* (tgid, CUcontext) -> device */
BPF_HASH(thread_ctx, u32, struct gw_ctx_stack, 65536);      /* thread id -> context stack */
BPF_HASH(proc_dev, u32, s32, 65536);                        /* tgid -> device made current last */
BPF_HASH(dev_uuid, struct gw_proc_gpu, struct gw_uuid, 16384); /* (tgid, ordinal) -> GPU UUID */
BPF_HASH(lib_opens, u64, u32, 4096);                         /* pid_tgid -> openat of a libcuda */
BPF_ARRAY(lost, u64, 1);
/* Quotas for processes not under the interposer: a group (one process, or every process of a cgroup)
 * may hold this many device bytes per GPU; an allocation that would cross it stops the process.
 * The group's total on a GPU is quota_used + quota_base + quota_granted (u64, wrapping: read as signed).
 * Only BPF writes quota_used (atomic adds); only user space writes quota_base and quota_granted. */
BPF_HASH(quota_member, u32, u32, 65536);                    /* tgid -> quota group */
BPF_TABLE("lru_hash", u32, u32, quota_forks, 65536);        /* child of a member of an inheriting group -> group */
BPF_HASH(quota_limit, u32, u64, 16384);                     /* group -> bytes per GPU */
BPF_HASH(quota_used, struct gw_proc_gpu, u64, 65536);       /* (group, gpu) -> allocated and reserved by members */
BPF_HASH(quota_base, struct gw_proc_gpu, u64, 65536);       /* (group, gpu) -> what members held when they joined */
BPF_HASH(quota_granted, struct gw_proc_gpu, u64, 65536);    /* (group, gpu) -> stopped allocations let run, in flight */
BPF_HASH(quota_stops, u64, struct gw_stop, 65536);          /* pid_tgid -> the allocation that thread waits to make */
#ifndef GW_RING_PAGES
#define GW_RING_PAGES 1024
#endif
BPF_RINGBUF_OUTPUT(events, GW_RING_PAGES);

static __always_inline u32 gw_tgid(void) { return bpf_get_current_pid_tgid() >> 32; }

static __always_inline s32 gw_current_gpu(u32 tgid)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct gw_ctx_stack *st = thread_ctx.lookup(&tid);
    if (st && st->depth > 0 && st->depth <= GW_CTX_STACK) {
        u32 top = (st->depth - 1) & (GW_CTX_STACK - 1);
        struct gw_addr key = {.tgid = tgid, .addr = st->ctx[top]};
        s32 *dev = ctx_dev.lookup(&key);
        if (dev)
            return *dev;
    }
    s32 *last = proc_dev.lookup(&tgid);
    return last ? *last : GW_GPU_UNKNOWN;
}

static __always_inline void gw_note_gpu(u32 tgid, s32 gpu)
{
    u32 bit = (gpu >= 0 && gpu < GW_MAX_GPUS) ? 1u << (gpu + 1) : 1u;
    u32 *mask = procs.lookup(&tgid);
    if (!mask) {
        procs.update(&tgid, &bit);
    } else if (!(*mask & bit)) {
        u32 updated = *mask | bit;
        procs.update(&tgid, &updated);
    }
}

static __always_inline struct gw_mem *gw_mem_of(u32 tgid, s32 gpu)
{
    struct gw_proc_gpu key = {.tgid = tgid, .gpu = gpu};
    struct gw_mem zero = {};
    struct gw_mem *m = mem.lookup(&key);
    if (m)
        return m;
    gw_note_gpu(tgid, gpu);
    return mem.lookup_or_try_init(&key, &zero);
}

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
static __always_inline void gw_quota_check(u32 tgid, struct gw_call *c)
{
    if (c->kind == GW_MANAGED || c->kind == GW_HOST)
        return;
    u32 *groupp = gw_quota_group(tgid);
    if (!groupp)
        return;
    u32 group = *groupp;
    u64 *limitp = quota_limit.lookup(&group);
    if (!limitp || !*limitp)
        return;
    u64 limit = *limitp;
    struct gw_proc_gpu key = {.tgid = group, .gpu = c->gpu};
    u64 zero = 0;
    u64 *used = quota_used.lookup_or_try_init(&key, &zero);
    if (!used)
        return;  /* map full: fail open, as accounting does */
    u64 *base = quota_base.lookup(&key), *granted = quota_granted.lookup(&key);
    u64 others = (base ? *base : 0) + (granted ? *granted : 0);
    s64 total;
    if (c->size <= limit) {
        __sync_fetch_and_add(used, c->size);
        total = (s64)(*used + others);  /* ours, and what others reserved meanwhile */
        if (total <= (s64)limit) {
            c->qgroup = group;
            c->reserved = 1;
            return;
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
        return;  /* no record, no stop: user space could never continue it */
    bpf_send_signal(GW_SIGSTOP);
    gw_emit(GW_EV_QUOTA_STOP, tgid, c->gpu, c->kind, 0, c->size, 0);
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

static __always_inline void gw_add_bytes(struct gw_mem *m, u32 kind, u64 bytes)
{
    if (kind == GW_MANAGED)
        __sync_fetch_and_add(&m->managed_bytes, bytes);
    else if (kind == GW_HOST)
        __sync_fetch_and_add(&m->host_pinned_bytes, bytes);
    else
        __sync_fetch_and_add(&m->device_bytes, bytes);
}

/* The three outcomes every allocation path shares: counted, told to user space. */
static __always_inline void gw_allocated(u32 tgid, s32 gpu, u32 kind, u64 addr, u64 size)
{
    struct gw_mem *m = gw_mem_of(tgid, gpu);
    if (!m)
        return;
    gw_add_bytes(m, kind, size);
    __sync_fetch_and_add(&m->allocs, 1);
    gw_emit(GW_EV_ALLOC, tgid, gpu, kind, addr, size, 0);
}

static __always_inline void gw_alloc_failed(u32 tgid, s32 gpu, u32 kind, u64 size, s32 rc)
{
    struct gw_mem *m = gw_mem_of(tgid, gpu);
    if (!m)
        return;
    __sync_fetch_and_add(&m->failed_allocs, 1);
    gw_emit(GW_EV_ALLOC_FAIL, tgid, gpu, kind, 0, size, rc);
}

static __always_inline void gw_freed(u32 tgid, s32 gpu, u32 kind, u64 addr, u64 size)
{
    struct gw_mem *m = gw_mem_of(tgid, gpu);
    if (!m)
        return;
    gw_add_bytes(m, kind, -size);
    if (kind != GW_MANAGED && kind != GW_HOST)
        gw_quota_add(tgid, gpu, -size);
    __sync_fetch_and_add(&m->frees, 1);
    gw_emit(GW_EV_FREE, tgid, gpu, kind, addr, size, 0);
}

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
