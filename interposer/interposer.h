// Internal interfaces shared by the interposer's source files.
#pragma once
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "cuda_types.h"
#include "shm.h"

#define API __attribute__((visibility("default")))
#define HIDDEN __attribute__((visibility("hidden")))
#define likely(x) __builtin_expect(!!(x), 1)
#define unlikely(x) __builtin_expect(!!(x), 0)

#define REAL(name, params) extern HIDDEN CUresult (*real_##name) params;
#define HOOK(name, params) REAL(name, params)
#define WORK(name, counter, params, args) REAL(name, params)
#include "hooks.def"

// ---- resolve.c: the real driver and the wrappers handed out for its functions
extern HIDDEN atomic_bool gw_driver_ready;
HIDDEN bool gw_ensure_driver(void *hint); // loads the driver (the library holding `hint`, if given)
HIDDEN void *gw_wrap(void *real_fn);       // the wrapper for one of the driver's functions, or NULL

// ---- control.c: configuration, the shared page, the daemon connection
struct gw_config {
	uint64_t mem_limit;  // 0: none
	uint32_t priority;   // enum: 0 low, 1 normal, 2 high
	bool swap;           // back device allocations with VMM
	bool debug;
	const char *socket;  // NULL: no daemon
	const char *real_libcuda;
};
extern HIDDEN struct gw_config gw_cfg;
extern HIDDEN struct gw_shm *gw;           // never NULL: a static page until the shared one exists
HIDDEN void gw_control_start(void);        // once the driver is loaded
HIDDEN void gw_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
HIDDEN void gw_warn_once(atomic_bool *said, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
HIDDEN uint64_t gw_now_ns(void);

// ---- gate.c: the gate every work submission passes
#define GATE_CLOSED 1u
#define GATE_BOUNDED 2u
extern HIDDEN __thread struct gw_slot *gw_tls_slot __attribute__((tls_model("initial-exec")));
extern HIDDEN struct gw_slot *gw_overflow_slot;
extern HIDDEN bool gw_membarrier;
HIDDEN struct gw_slot *gw_gate_enter_slow(uint32_t *bits);
HIDDEN struct gw_slot *gw_gate_wait(struct gw_slot *s, uint32_t *bits);
HIDDEN void gw_gate_close_and_drain(void);
HIDDEN void gw_gate_open(void);
HIDDEN void gw_bound_queue(CUstream stream);
HIDDEN void gw_slots_reset(void);
HIDDEN bool gw_wait_for_room(struct gw_slot *s, uint64_t bytes); // false: give up, the allocation fails
HIDDEN void gw_room_answer(bool granted);

static inline struct gw_slot *gw_gate_enter(uint32_t *bits)
{
	struct gw_slot *s = gw_tls_slot;
	if (unlikely(!s || s == gw_overflow_slot))
		return gw_gate_enter_slow(bits);
	atomic_store_explicit(&s->active, 1, memory_order_relaxed);
	// Pairs with the membarrier in gw_gate_close_and_drain; without membarrier, a full fence.
	if (likely(gw_membarrier))
		atomic_signal_fence(memory_order_seq_cst);
	else
		atomic_thread_fence(memory_order_seq_cst);
	uint32_t g = atomic_load_explicit(&gw->gate, memory_order_relaxed);
	*bits = g;
	return unlikely(g & GATE_CLOSED) ? gw_gate_wait(s, bits) : s;
}

static inline void gw_gate_exit(struct gw_slot *s)
{
	if (unlikely(s == gw_overflow_slot))
		atomic_fetch_sub_explicit(&s->active, 1, memory_order_release);
	else
		atomic_store_explicit(&s->active, 0, memory_order_release);
}

static inline void gw_count(struct gw_slot *s, _Atomic uint64_t *counter)
{
	if (unlikely(s == gw_overflow_slot))
		atomic_fetch_add_explicit(counter, 1, memory_order_relaxed);
	else // one writer: no locked instruction
		atomic_store_explicit(counter, atomic_load_explicit(counter, memory_order_relaxed) + 1,
				      memory_order_relaxed);
}

// ---- memory.c: allocations, quota and the regions that can move
struct gw_region;
struct gw_piece;
HIDDEN void gw_memory_lock(void);
HIDDEN void gw_memory_unlock(void);
HIDDEN void gw_memory_reset(void);
HIDDEN CUresult gw_sync_contexts(void);     // every context that owns memory, lock held
HIDDEN CUresult gw_physical_map(struct gw_region *r);   // every piece not mapped: create, map, grant access
HIDDEN void gw_physical_unmap(struct gw_region *r);     // every mapped piece: unmap and release
HIDDEN CUresult gw_piece_map(struct gw_region *r, struct gw_piece *p);
HIDDEN void gw_piece_unmap(struct gw_piece *p);
HIDDEN struct gw_region *gw_regions(void);              // the list, lock held
HIDDEN void gw_release_empty_chunks(void);              // lock held
// A region's physical memory comes in pieces of at most 1 GiB, so that a swap-out moves only as much as needed.
#ifndef GW_PIECE_MAX
#define GW_PIECE_MAX (1ull << 30)
#endif
// Alignment of a region's address reservation when the region is at least that large (0: the driver's).
// bench/buffer_read.py builds variants with other values; measured, they read no faster (docs/benchmarks.md).
#ifndef GW_VA_ALIGN
#define GW_VA_ALIGN 0
#endif
struct gw_piece {
	CUdeviceptr va;
	size_t size;
	CUmemGenericAllocationHandle handle; // 0 while swapped out
	void *host;                          // the bytes while swapped out
};
struct gw_region {
	CUdeviceptr va;
	size_t size;
	CUcontext ctx;
	CUdevice dev;
	int cls;       // -1: one allocation; else a chunk of this sub-allocation class
	uint32_t npieces;
	struct gw_piece *pieces;
	uint32_t used_slots, nslots;
	uint64_t *bitmap;
	struct gw_region *next;
};

// ---- swap.c
HIDDEN int gw_pause(void);
HIDDEN int gw_swap_out(uint64_t bytes, uint64_t *moved);
HIDDEN int gw_resume(void);
HIDDEN void gw_swap_forget(struct gw_piece *p, CUdevice dev); // a freed piece's host copy is no longer needed
