/* Every BPF map, declared once for the one program all probe files are built into. Above each map, who
 * writes it and who reads it: probe files and headers (a header's helpers run in the probes that call
 * them), and the Python modules in probes/ (tracer.py, quotamaps.py). "GC": tracer.py pops what exited
 * processes left. */
#ifndef GW_MAPS_H
#define GW_MAPS_H

#include "types.h"

/* ---- accounting */
/* (tgid, gpu) -> bytes, counts. Writes: accounting.h, lifecycle.c (exit). Reads: lifecycle.c, tracer.py, quotamaps.py */
BPF_HASH(mem, struct gw_proc_gpu, struct gw_mem, 65536);
/* (tgid, gpu) -> launches, copies, per CPU. Writes: work.c, lifecycle.c (exit). Reads: tracer.py */
BPF_PERCPU_HASH(work, struct gw_proc_gpu, struct gw_work, 65536);
/* (tgid, gpu) -> device bytes it held before the probes saw it (counted in its device figure and its quota
 * group's base). Writes: seeds.py (only user space sets it), lifecycle.c (exit: out of the group, deleted).
 * Reads: tracer.py, quotamaps.py, lifecycle.c */
BPF_HASH(seeds, struct gw_proc_gpu, struct gw_seed, 65536);
/* tgid -> gpu_mask. Writes: accounting.h, work.c, lifecycle.c (exit). Reads: lifecycle.c, quotamaps.py */
BPF_HASH(procs, u32, u32, 65536);
/* (tgid, address) -> a live allocation. Writes, reads: memory.c; tracer.py (GC) */
BPF_HASH(allocs, struct gw_addr, struct gw_alloc, 1048576);
/* (tgid, VMM handle) -> size, device, mappings. Writes, reads: vmm.c; tracer.py (GC) */
BPF_HASH(handles, struct gw_addr, struct gw_handle, 262144);
/* (tgid, mapped address) -> VMM handle. Writes, reads: vmm.c; tracer.py (GC) */
BPF_HASH(mappings, struct gw_addr, struct gw_mapping, 262144);
/* pid_tgid -> pending call. Writes: entry/return probes (calls.h), lifecycle.c (exit). Reads: the same, quotamaps.py */
BPF_HASH(calls, u64, struct gw_call, 65536);

/* ---- GPU attribution */
/* (tgid, CUcontext) -> device. Writes: context.c; tracer.py (GC). Reads: context.c, accounting.h (memory.c, work.c) */
BPF_HASH(ctx_dev, struct gw_addr, s32, 65536);
/* thread id -> context stack. Writes: context.c, lifecycle.c (exit). Reads: accounting.h (memory.c, work.c) */
BPF_HASH(thread_ctx, u32, struct gw_ctx_stack, 65536);
/* tgid -> device made current last. Writes: context.c, lifecycle.c (exit), seeds.py (only where absent: the
 * one GPU of a process whose context predates the probes). Reads: accounting.h (memory.c, work.c) */
BPF_HASH(proc_dev, u32, s32, 65536);
/* (tgid, ordinal) -> GPU UUID. Writes: context.c; tracer.py (GC). Reads: tracer.py */
BPF_HASH(dev_uuid, struct gw_proc_gpu, struct gw_uuid, 16384);

/* ---- events to user space */
/* pid_tgid -> an openat of a libcuda in flight. Writes, reads: lifecycle.c */
BPF_HASH(lib_opens, u64, u32, 4096);
/* [0] -> events lost to a full ring. Writes: events.h. Reads: tracer.py */
BPF_ARRAY(lost, u64, 1);
#ifndef GW_RING_PAGES
#define GW_RING_PAGES 1024
#endif
/* The event ring. Writes: events.h (accounting.h, quota.h, lifecycle.c). Reads: tracer.py */
BPF_RINGBUF_OUTPUT(events, GW_RING_PAGES);

/* ---- quotas for processes not under the interposer: a group (one process, or every process of a cgroup)
 * may hold this many device bytes per GPU; an allocation that would cross it stops the process.
 * The group's total on a GPU is quota_used + quota_base + quota_granted (u64, wrapping: read as signed).
 * Only BPF writes quota_used (atomic adds); only user space writes quota_base and quota_granted. */
/* tgid -> quota group. Writes: quotamaps.py, quota.h (a forked child joins), lifecycle.c (exit). Reads: quota.h, quotamaps.py */
BPF_HASH(quota_member, u32, u32, 65536);
/* child of an inheriting group's member -> group. Writes: lifecycle.c (fork, exit), quota.h, quotamaps.py. Reads: quota.h */
BPF_TABLE("lru_hash", u32, u32, quota_forks, 65536);
/* group -> bytes per GPU. Writes: quotamaps.py. Reads: quota.h */
BPF_HASH(quota_limit, u32, u64, 16384);
/* (group, gpu) -> allocated and reserved by members. Writes: quota.h; quotamaps.py drops. Reads: quota.h, quotamaps.py */
BPF_HASH(quota_used, struct gw_proc_gpu, u64, 65536);
/* (group, gpu) -> what members held when they joined. Writes: quotamaps.py. Reads: quota.h, quotamaps.py */
BPF_HASH(quota_base, struct gw_proc_gpu, u64, 65536);
/* (group, gpu) -> stopped allocations let run, in flight. Writes: quotamaps.py. Reads: quota.h, quotamaps.py */
BPF_HASH(quota_granted, struct gw_proc_gpu, u64, 65536);
/* pid_tgid -> the allocation the thread waits to make. Writes: quota.h, lifecycle.c (exit), quotamaps.py. Reads: quotamaps.py */
BPF_HASH(quota_stops, u64, struct gw_stop, 65536);

/* ---- room on the device for processes not under the interposer (room.h) */
/* GPU ordinal -> bytes it can still give; absent: no room check. Writes: roommaps.py, room.h. Reads: room.h */
BPF_HASH(room_free, s32, s64, 64);
/* tgid -> 1: interposed (their interposer waits for room) or held by the driver. Writes: roommaps.py, lifecycle.c (exit). Reads: room.h */
BPF_HASH(room_exempt, u32, u32, 65536);
/* pid_tgid -> the allocation the thread waits to make. Writes: room.h, lifecycle.c (exit), roommaps.py. Reads: roommaps.py */
BPF_HASH(room_stops, u64, struct gw_stop, 65536);
/* tgid -> 1: it called cuIpcGetMemHandle or cuIpcOpenMemHandle. Writes: ipc.c, lifecycle.c (exit). Reads: roommaps.py */
BPF_HASH(ipc_users, u32, u32, 16384);

#endif
