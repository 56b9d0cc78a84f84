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

// ---- memory: allocations, quota and the regions that can move. One lock guards all of its bookkeeping
// (gw_memory_lock); "lock held" marks what must be called with it.

// memory.c: the allocation and free entry points, and the lock
HIDDEN void gw_memory_lock(void);
HIDDEN void gw_memory_unlock(void);
HIDDEN void gw_memory_reset(void);                  // in a forked child: nothing of the parent's is usable
HIDDEN void gw_free_context_allocs(CUcontext ctx);  // lock held: every allocation made in the context
// An allocation the device cannot hold (not one the quota refuses) waits, while a daemon is attached, for
// the daemon to make room by swapping others out; it fails if the daemon says no room will come. The entry
// point using it names what it asks for in `wanted_size`.
#define GATED(expr)                                                              \
	do {                                                                     \
		if (!gw_ensure_driver(NULL))                                     \
			return CUDA_ERROR_NOT_INITIALIZED;                       \
		uint32_t bits_;                                                  \
		struct gw_slot *slot_ = gw_gate_enter(&bits_);                   \
		CUresult r_;                                                     \
		while ((r_ = (expr)) == CUDA_ERROR_OUT_OF_MEMORY && !gw_quota_refused && \
		       gw_wait_for_room(slot_, wanted_size))                     \
			;                                                        \
		gw_gate_exit(slot_);                                             \
		return r_;                                                       \
	} while (0)

// table.c: every allocation made through the entry points, by start address
enum gw_alloc_kind { A_SWAPPABLE, A_PLAIN, A_ASYNC, A_MANAGED };
struct gw_alloc {
	CUdeviceptr ptr;
	size_t size, charged; // charged: bytes counted against the quota (0 for sub-allocations: the chunk is)
	struct gw_region *region;
	CUcontext ctx;
	CUdevice dev;
	enum gw_alloc_kind kind;
	struct gw_alloc *next;
};
HIDDEN struct gw_alloc *gw_table_add(CUdeviceptr ptr, size_t size, enum gw_alloc_kind kind, CUdevice dev,
				     CUcontext ctx);
HIDDEN struct gw_alloc *gw_table_find(CUdeviceptr ptr);
HIDDEN void gw_table_remove(struct gw_alloc *a);
HIDDEN void gw_table_each(void (*fn)(struct gw_alloc *a, void *arg), void *arg); // fn may remove its `a`
HIDDEN void gw_table_reset(void);

// quota.c: device bytes charged against the quota
extern HIDDEN __thread bool gw_quota_refused;       // the last refusal was the quota's, not the device's
HIDDEN struct gw_device *gw_dev_stats(CUdevice dev); // the shared page's counters of a device
HIDDEN bool gw_charge(CUdevice dev, uint64_t bytes, bool swappable); // lock held; false: over the quota
HIDDEN void gw_uncharge(CUdevice dev, uint64_t bytes, bool swappable);
HIDDEN void gw_charge_anyway(CUdevice dev, uint64_t bytes);        // unswappable bytes the driver holds already
// Whether `bytes` more fit the quota if `reusable` bytes already counted could serve them; a refusal is counted
// and logged as gw_charge's. Lock held.
HIDDEN bool gw_quota_room(CUdevice dev, uint64_t bytes, uint64_t reusable);
HIDDEN void gw_recount(CUdevice dev, uint64_t bytes, bool to_swappable); // counted bytes change category

// devices.c: what each device supports, and the contexts that own memory
struct gw_device_info {
	bool known, vmm;
	bool fd_handles; // VMM memory can be exported as a POSIX file descriptor (CUDA IPC of our memory: ipc.c)
	size_t granularity;
	int naccess;
	CUmemAccessDesc access[GW_MAX_DEVICES];
};
HIDDEN struct gw_device_info *gw_device_info_of(CUdevice dev); // learned at first use
HIDDEN CUresult gw_current(CUdevice *dev, CUcontext *ctx);   // the calling thread's context and its device
HIDDEN void gw_remember_context(CUcontext ctx);              // lock held: it owns memory
HIDDEN CUresult gw_sync_context(CUcontext ctx);
HIDDEN CUresult gw_sync_contexts(void);                      // every context that owns memory, lock held
HIDDEN void gw_contexts_reset(void);

// backing.c: regions, reserved ranges whose physical memory (VMM, in pieces) can be taken away and given back
struct gw_region;
struct gw_piece;
HIDDEN CUresult gw_region_new(CUdevice dev, CUcontext ctx, size_t size, int cls, struct gw_region **out); // lock held
HIDDEN void gw_region_free(struct gw_region *r);        // lock held
HIDDEN CUresult gw_physical_map(struct gw_region *r);   // every piece not mapped: create, map, grant access
HIDDEN void gw_physical_unmap(struct gw_region *r);     // every mapped piece: unmap and release
HIDDEN CUresult gw_piece_map(struct gw_region *r, struct gw_piece *p);
HIDDEN void gw_piece_unmap(struct gw_piece *p);
HIDDEN struct gw_region *gw_regions(void);              // the list, lock held
HIDDEN void gw_regions_reset(void);
HIDDEN bool gw_region_swappable(const struct gw_region *r); // no other process has it mapped: it may move
HIDDEN void gw_region_imported(struct gw_region *r, bool more); // lock held: one import more, or one less
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
	bool exportable;                     // created for POSIX file descriptor export
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
	uint32_t imports; // other processes that have it mapped (ipc.c): it cannot move, its bytes are unswappable
	struct gw_region *next;
};

// suballoc.c: small allocations, in slots of chunks (regions of one size class each)
#define GW_SMALL_MAX (1u << 20) // larger requests get a region of their own
#define GW_SMALL_MIN_SHIFT 8    // the smallest class: 256 bytes, CUDA's alignment
HIDDEN CUresult gw_alloc_small(CUdeviceptr *dptr, size_t size, CUdevice dev, CUcontext ctx); // lock held
HIDDEN void gw_free_small(struct gw_region *chunk, CUdeviceptr ptr, CUdevice dev);          // lock held
HIDDEN void gw_release_empty_chunks(void);              // lock held
HIDDEN void gw_chunk_forget(struct gw_region *r);       // a region going away: no longer a chunk to use
HIDDEN void gw_suballoc_reset(void);

// own_vmm.c: the program's own cuMemCreate memory, counted until released and unmapped
HIDDEN void gw_own_vmm_reset(void);

// info.c: what the process is told about memory (sizes within its quota, address ranges)
HIDDEN struct gw_alloc *gw_alloc_containing(CUdeviceptr ptr); // lock held: our allocation holding ptr, or NULL

// ipc.c and ipc_import.c: CUDA IPC of memory that can move. A handle of ours names the exporter and one of its
// regions; the importer gets the region's pieces as file descriptors from the exporter's server (a unix socket)
// and maps them. The layout (64 bytes, CU_IPC_HANDLE_SIZE):
struct gw_ipc_handle {
	char magic[8];     // GW_IPC_MAGIC, NUL-padded
	int32_t pid;       // the exporter
	uint32_t id;       // its export (one per region)
	uint64_t nonce[2]; // random: only who got the handle can open it
	uint64_t key;      // random: the exporter's server is the abstract socket "gpuwatch-ipc-PID-KEY"
	uint64_t offset;   // of the allocation in the region
	uint64_t size;     // of the allocation
	uint64_t region_size;
};
_Static_assert(sizeof(struct gw_ipc_handle) == 64, "CU_IPC_HANDLE_SIZE");
#define GW_IPC_MAGIC "GWIPC1"
#define GW_IPC_MAX_PIECES 250 // file descriptors in one message (the kernel's SCM_MAX_FD is 253)
enum gw_ipc_op { GW_IPC_OPEN = 1, GW_IPC_CLOSE = 2 };
struct gw_ipc_request {
	uint32_t op, id;
	uint64_t nonce[2];
};
struct gw_ipc_answer { // to an open: with one descriptor per piece
	int32_t result;    // a CUresult; CUDA_ERROR_NOT_READY: swapped out, ask again
	uint32_t npieces;
	uint64_t piece_size[GW_IPC_MAX_PIECES];
};
HIDDEN void gw_ipc_socket_name(char *out, size_t cap, int32_t pid, uint64_t key); // sun_path of the server
HIDDEN CUresult gw_ipc_export(struct gw_alloc *a, struct gw_ipc_handle *out); // lock held
HIDDEN void gw_ipc_region_gone(struct gw_region *r);                   // lock held: its export ends
HIDDEN void gw_ipc_reset(void);                                        // in a forked child
HIDDEN bool gw_ipc_range(CUdeviceptr ptr, CUdeviceptr *base, size_t *size); // memory opened from another process
HIDDEN void gw_ipc_import_reset(void);                                 // in a forked child

// arrays.c: CUDA arrays and mipmapped arrays, counted (their exact requirement) and never moved
HIDDEN void gw_arrays_forget_context(CUcontext ctx); // lock held: a context going away takes its arrays
HIDDEN void gw_arrays_reset(void);

// graphmem.c: graph memory (memory nodes and captured stream-ordered allocations), counted as the driver's
// graph pool holds it and never moved
HIDDEN CUresult gw_graph_captured(CUdevice dev, size_t size); // a memory node or an allocation captured into a
							       // graph: refused if larger than the quota; lock held
HIDDEN void gw_graphmem_reset(void);

// ---- swap.c
HIDDEN int gw_pause(void);
HIDDEN int gw_swap_out(uint64_t bytes, uint64_t *moved);
HIDDEN int gw_resume(void);
HIDDEN void gw_swap_forget(struct gw_piece *p, CUdevice dev); // a freed piece's host copy is no longer needed
HIDDEN int gw_drop_host(uint64_t *freed); // frees all pinned host memory unless some holds swapped data
