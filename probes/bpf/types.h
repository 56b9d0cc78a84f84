/* Types and constants shared by every probe: the maps' keys and values, the event sent to user space, and
 * what Python mirrors (gw_kind and gw_event_type in probes/model.py, struct gw_event in probes/tracer.py,
 * gw_copy's order in core/vocabulary.py, GW_QUOTA_INHERIT in enforcer/quota.py). */
#ifndef GW_TYPES_H
#define GW_TYPES_H

#include <uapi/linux/ptrace.h>

#define GW_GPU_UNKNOWN (-1)
#define GW_MAX_GPUS 31          /* gpu_mask bit 0 is "unknown", bits 1..31 are GPUs 0..30 */
#define GW_CTX_STACK 8
#define GW_UNMAP_SPAN 32        /* mappings one cuMemUnmap may cover */

enum gw_kind { GW_DEVICE = 0, GW_PITCH = 1, GW_ASYNC = 2, GW_MANAGED = 3, GW_HOST = 4, GW_VMM = 5 };
enum gw_event_type { GW_EV_ALLOC = 1, GW_EV_FREE = 2, GW_EV_ALLOC_FAIL = 3, GW_EV_EXIT = 4,
                     GW_EV_LIB_OPEN = 5, GW_EV_QUOTA_STOP = 6, GW_EV_ROOM_STOP = 7 };
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

/* What a process held before the probes saw it (user space's seed: the daemon started after it allocated). */
struct gw_seed {
    u64 bytes;
    u32 estimated;         /* from NVML's figure less a context; 0: the interposer's exact figure */
    u32 pad;
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

#endif
