// The page shared with the daemon (layout documented in docs/interposer.md; version 1).
#pragma once
#include <stdatomic.h>
#include <stdint.h>

#define GW_SHM_MAGIC 0x31535747u // "GWS1"
#define GW_SHM_VERSION 1
#define GW_SHM_SIZE (64 * 1024)
#define GW_MAX_DEVICES 16
#define GW_SLOTS ((GW_SHM_SIZE - 4096) / 64)

enum gw_state { GW_RUNNING, GW_PAUSED, GW_SWAPPING_OUT, GW_SWAPPED, GW_SWAPPING_IN };
enum gw_flag { GW_FLAG_ATTACHED = 1, GW_FLAG_SWAP = 2, GW_FLAG_BOUNDED = 4, GW_FLAG_ROOM = 8 };

struct gw_device {
	_Atomic uint64_t quota, used, swappable, unswappable, swapped;
	uint64_t reserved[3];
};

struct gw_slot {
	_Atomic uint32_t active;
	_Atomic uint32_t tid; // 0: free
	_Atomic uint64_t launches, graph_launches, copies;
	uint64_t reserved[4];
};

struct gw_shm {
	uint32_t magic, version;
	int32_t pid;
	uint32_t max_devices;
	_Atomic uint32_t gate, state;
	uint32_t priority;
	_Atomic uint32_t flags;
	_Atomic uint64_t lease_deadline_ns;
	_Atomic uint64_t swap_out_bytes_total, swap_in_bytes_total, swap_out_ns_total, swap_in_ns_total;
	_Atomic uint64_t swaps_out, swaps_in, gate_wait_ns_total, gate_waits, quota_refusals;
	_Atomic uint32_t waiting;      // threads blocked at the gate or waiting for room: the process wants to run
	_Atomic uint32_t room_seq;     // bumped by the library when the daemon answers a wait for room
	_Atomic uint64_t wanted_bytes; // device memory that allocations wait for (the device was full)
	_Atomic uint32_t room_verdict; // the last answer: 0 retry, 1 denied (the allocation fails)
	uint32_t reserved0;
	_Atomic uint64_t pinned_bytes; // pinned host memory the library holds (swap-out buffers, kept for reuse)
	uint8_t pad0[256 - 144];
	struct gw_device dev[GW_MAX_DEVICES];
	uint8_t pad1[4096 - 256 - GW_MAX_DEVICES * 64];
	struct gw_slot slots[GW_SLOTS];
};

_Static_assert(sizeof(struct gw_slot) == 64, "slot is one cache line");
_Static_assert(__builtin_offsetof(struct gw_shm, lease_deadline_ns) == 32, "layout");
_Static_assert(__builtin_offsetof(struct gw_shm, quota_refusals) == 104, "layout");
_Static_assert(__builtin_offsetof(struct gw_shm, waiting) == 112, "layout");
_Static_assert(__builtin_offsetof(struct gw_shm, wanted_bytes) == 120, "layout");
_Static_assert(__builtin_offsetof(struct gw_shm, room_verdict) == 128, "layout");
_Static_assert(__builtin_offsetof(struct gw_shm, pinned_bytes) == 136, "layout");
_Static_assert(__builtin_offsetof(struct gw_shm, dev) == 256, "layout");
_Static_assert(__builtin_offsetof(struct gw_shm, slots) == 4096, "layout");
_Static_assert(sizeof(struct gw_shm) == GW_SHM_SIZE, "layout");
