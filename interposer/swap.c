// Pause, swap out to pinned host memory, swap in and resume.
#include "interposer.h"

#include <stdbool.h>
#include <stdio.h>
#include <sys/mman.h>
#include <unistd.h>

#define SEGMENT_MAX (4ull << 30)  // pinned host memory is allocated in pieces of at most this
#define SEGMENT_ROUND (64ull << 20)
#define MAX_SEGMENTS 4096
#define MAX_STREAMS 64
#define SWAP_IN_PATIENCE_NS 60000000000ull // retry a swap-in that finds the device full this long: a swap-out
                                           // running at the same time frees the memory piece by piece

// Pinned host memory, allocated on first use and kept until the daemon asks for it back (drop_host): a bump
// allocator, reset once everything is back. gw->pinned_bytes is always the sum of the segments' sizes.
static struct segment {
	char *base;
	size_t size;
	CUcontext ctx;   // current when it was pinned: freed with it current
	bool registered; // mmap + cuMemHostRegister (else cuMemHostAlloc)
} segments[MAX_SEGMENTS];
static int nsegments, seg_cur;
static size_t seg_off;

static struct {
	CUcontext ctx;
	CUstream stream;
} streams[MAX_STREAMS];
static int nstreams;

struct touch {
	char *p;
	size_t n;
};

static void *touch_pages(void *arg)
{
	struct touch *t = arg;
	for (size_t i = 0; i < t->n; i += 4096)
		t->p[i] = 0;
	return NULL;
}

// Pinned host memory: anonymous memory on huge pages, faulted in by several threads at once, then
// registered with the driver. An H200 host pinned 8 GiB this way at 0.04 s/GiB, against 0.43 s/GiB for
// cuMemHostAlloc, which faults and zeroes the pages in one thread (bench/pin_cost.c).
#define TOUCH_THREADS 16
static void *pinned_alloc(size_t size, bool *registered)
{
	*registered = true;
	char *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p != MAP_FAILED) {
		madvise(p, size, MADV_HUGEPAGE);
		long cpus = sysconf(_SC_NPROCESSORS_ONLN);
		int n = cpus < 1 ? 1 : cpus > TOUCH_THREADS ? TOUCH_THREADS : (int)cpus, started = 0;
		pthread_t threads[TOUCH_THREADS];
		struct touch parts[TOUCH_THREADS];
		size_t part = (size / n + 4095) & ~(size_t)4095;
		for (int i = 0; i < n && (size_t)i * part < size; i++) {
			parts[i] = (struct touch){p + i * part, size - i * part < part ? size - i * part : part};
			if (!pthread_create(&threads[i], NULL, touch_pages, &parts[i]))
				started = i + 1;
			else
				touch_pages(&parts[i]);
		}
		for (int i = 0; i < started; i++)
			pthread_join(threads[i], NULL);
		if (real_cuMemHostRegister_v2 && !real_cuMemHostRegister_v2(p, size, 1 /* PORTABLE */))
			return p;
		munmap(p, size);
	}
	void *q;
	*registered = false;
	return real_cuMemHostAlloc(&q, size, 1 /* CU_MEMHOSTALLOC_PORTABLE: usable from every context */) ? NULL : q;
}

// Gives one segment back to the system, with the context it was pinned in current (if it still is one).
static void pinned_free(struct segment *s)
{
	CUcontext popped;
	bool pushed = s->ctx && !real_cuCtxPushCurrent_v2(s->ctx);
	CUresult e;
	if (s->registered) {
		e = real_cuMemHostUnregister ? real_cuMemHostUnregister(s->base) : CUDA_SUCCESS;
		munmap(s->base, s->size); // even if unregistering failed: the address range is ours to give back
	} else {
		e = real_cuMemFreeHost(s->base);
	}
	if (pushed)
		real_cuCtxPopCurrent_v2(&popped);
	if (e)
		gw_log("freeing %zu bytes of pinned host memory returned CUDA error %d", s->size, e);
	atomic_fetch_sub(&gw->pinned_bytes, s->size);
	*s = (struct segment){NULL, 0, NULL, false};
}

// Frees segments[from..nsegments): lock held.
static uint64_t segments_free_from(int from)
{
	uint64_t freed = 0;
	while (nsegments > from) {
		freed += segments[nsegments - 1].size;
		pinned_free(&segments[--nsegments]);
	}
	return freed;
}

static void *host_space(size_t size, size_t still_needed, CUcontext ctx) // ctx current
{
	for (; seg_cur < nsegments; seg_cur++, seg_off = 0)
		if (segments[seg_cur].size - seg_off >= size) {
			void *p = segments[seg_cur].base + seg_off;
			seg_off += size;
			return p;
		}
	if (nsegments == MAX_SEGMENTS)
		return NULL;
	size_t want = still_needed < SEGMENT_MAX ? still_needed : SEGMENT_MAX;
	want = (want + SEGMENT_ROUND - 1) / SEGMENT_ROUND * SEGMENT_ROUND;
	if (want < size)
		want = size;
	bool registered;
	void *p = pinned_alloc(want, &registered);
	if (!p)
		return NULL;
	segments[nsegments++] = (struct segment){p, want, ctx, registered};
	atomic_fetch_add(&gw->pinned_bytes, want);
	seg_cur = nsegments - 1;
	seg_off = size;
	return p;
}

static CUstream stream_of(CUcontext ctx) // called with ctx current
{
	for (int i = 0; i < nstreams; i++)
		if (streams[i].ctx == ctx)
			return streams[i].stream;
	CUstream s = NULL;
	if (nstreams < MAX_STREAMS && !real_cuStreamCreate(&s, CU_STREAM_NON_BLOCKING))
		streams[nstreams++] = (typeof(streams[0])){ctx, s};
	return s;
}

static CUresult sync_streams(void)
{
	CUresult first = CUDA_SUCCESS;
	for (int i = 0; i < nstreams; i++) {
		CUcontext popped;
		if (real_cuCtxPushCurrent_v2(streams[i].ctx))
			continue;
		CUresult r = real_cuStreamSynchronize(streams[i].stream);
		real_cuCtxPopCurrent_v2(&popped);
		first = first ? first : r;
	}
	return first;
}

static CUresult copy_piece(struct gw_region *r, struct gw_piece *p, bool out)
{
	CUcontext popped;
	CUresult e = real_cuCtxPushCurrent_v2(r->ctx);
	if (e)
		return e;
	CUstream s = stream_of(r->ctx);
	e = !s ? CUDA_ERROR_OUT_OF_MEMORY : out ? real_cuMemcpyDtoHAsync_v2(p->host, p->va, p->size, s)
						: real_cuMemcpyHtoDAsync_v2(p->va, p->host, p->size, s);
	real_cuCtxPopCurrent_v2(&popped);
	return e;
}

static struct gw_device *stats(CUdevice dev) { return &gw->dev[dev >= 0 && dev < GW_MAX_DEVICES ? dev : GW_MAX_DEVICES - 1]; }

HIDDEN void gw_swap_forget(struct gw_piece *p, CUdevice dev)
{
	if (p->host)
		atomic_fetch_sub(&stats(dev)->swapped, p->size);
	p->host = NULL;
}

#define EACH_PIECE(r, p) \
	for (struct gw_region *r = gw_regions(); r; r = r->next) \
		for (struct gw_piece *p = r->pieces; p < r->pieces + r->npieces; p++)

static bool any_swapped(void)
{
	EACH_PIECE(r, p)
		if (!p->handle)
			return true;
	return false;
}

static bool any_in_host_memory(void) // swapped out, or a copy in host memory still needed
{
	EACH_PIECE(r, p)
		if (!p->handle || p->host)
			return true;
	return false;
}

HIDDEN int gw_pause(void)
{
	if (atomic_load(&gw->gate) & GATE_CLOSED)
		return CUDA_SUCCESS;
	gw_gate_close_and_drain();
	gw_memory_lock();
	CUresult e = gw_sync_contexts();
	gw_memory_unlock();
	atomic_store(&gw->state, GW_PAUSED);
	if (e)
		gw_log("synchronizing before the pause returned CUDA error %d", e);
	return e;
}

// After a swap-out that failed: a process that ran before it runs again (nothing of it moved). Lock not held.
static void run_again_if(bool was_running)
{
	gw_memory_lock();
	bool run = was_running && !any_swapped();
	if (run)
		atomic_store(&gw->state, GW_RUNNING);
	gw_memory_unlock();
	if (run)
		gw_gate_open();
}

// The pieces a swap-out moves, in the order it moves them, and each one's copy-done event.
#define MAX_MOVES 65536
#define IN_FLIGHT 4 // pieces whose copies are queued ahead of the one being released
static struct move {
	struct gw_region *r;
	struct gw_piece *p;
	CUevent done;
} moves[MAX_MOVES];

static CUresult record_done(struct move *m)
{
	CUcontext popped;
	CUresult e = real_cuCtxPushCurrent_v2(m->r->ctx);
	if (e)
		return e;
	if (!(e = real_cuEventCreate(&m->done, 2 /* CU_EVENT_DISABLE_TIMING */)) &&
	    (e = real_cuEventRecord(m->done, stream_of(m->r->ctx)))) {
		real_cuEventDestroy_v2(m->done);
		m->done = NULL;
	}
	real_cuCtxPopCurrent_v2(&popped);
	return e;
}

// The piece's copy is in host memory: its device memory goes back to the driver at once, so that a process
// swapping in meanwhile can take it (switches overlap the two directions of the link).
static CUresult release_moved(struct move *m, uint64_t *moved)
{
	CUresult e = m->done ? real_cuEventSynchronize(m->done) : CUDA_ERROR_INVALID_VALUE;
	if (m->done)
		real_cuEventDestroy_v2(m->done);
	m->done = NULL;
	if (e)
		return e;
	gw_piece_unmap(m->p);
	atomic_fetch_add(&stats(m->r->dev)->swapped, m->p->size);
	*moved += m->p->size;
	return CUDA_SUCCESS;
}

// Chooses the pieces to move, at least `want` bytes (0: all), in whole pieces, largest regions first: they
// are the long-lived ones (a model, a buffer), less likely to be freed soon than small ones; never a region
// another process imported. Gets each its
// pinned host memory; false with nothing taken when host memory runs out.
static int plan_moves(uint64_t want, uint64_t *pinning)
{
	uint64_t total = 0, planned = 0;
	int n = 0;
	EACH_PIECE(r, p)
		total += p->handle && gw_region_swappable(r) ? p->size : 0;
	if (want && want < total)
		total = want;
	while (planned < total && n < MAX_MOVES) {
		struct gw_region *largest = NULL;
		for (struct gw_region *r = gw_regions(); r; r = r->next) {
			bool resident = false;
			if (!gw_region_swappable(r))
				continue; // another process has it mapped (CUDA IPC): it stays
			for (uint32_t i = 0; i < r->npieces; i++)
				resident |= r->pieces[i].handle && !r->pieces[i].host;
			if (resident && (!largest || r->size > largest->size))
				largest = r;
		}
		if (!largest)
			break;
		for (struct gw_piece *p = largest->pieces; p < largest->pieces + largest->npieces && planned < total &&
							   n < MAX_MOVES; p++) {
			if (!p->handle || p->host)
				continue;
			CUcontext popped;
			if (real_cuCtxPushCurrent_v2(largest->ctx))
				return -1;
			uint64_t pin_start = gw_now_ns();
			p->host = host_space(p->size, total - planned, largest->ctx);
			*pinning += gw_now_ns() - pin_start;
			real_cuCtxPopCurrent_v2(&popped);
			if (!p->host)
				return -1;
			moves[n++] = (struct move){largest, p, NULL};
			planned += p->size;
		}
	}
	return n;
}

// Moves at least `want` bytes (0: everything) to host memory. All-or-nothing where it can fail for want of
// host memory: every piece's pinned memory is taken before anything moves. Then pieces are copied in
// order, IN_FLIGHT queued ahead, each released as soon as its copy is done.
HIDDEN int gw_swap_out(uint64_t want, uint64_t *moved)
{
	*moved = 0;
	uint64_t pause_start = gw_now_ns();
	bool was_running = !(atomic_load(&gw->gate) & GATE_CLOSED);
	CUresult e = gw_pause();
	if (e) {
		run_again_if(was_running);
		return e;
	}
	uint64_t start = gw_now_ns(), pinning = 0;
	gw_memory_lock();
	int segments_before = nsegments, seg_cur_before = seg_cur;
	size_t seg_off_before = seg_off;
	atomic_store(&gw->state, GW_SWAPPING_OUT);
	gw_release_empty_chunks();
	int n = plan_moves(want, &pinning), queued = 0, released = 0;
	if (n < 0) {
		e = CUDA_ERROR_OUT_OF_MEMORY;
		EACH_PIECE(r, p)
			if (p->handle)
				p->host = NULL; // nothing moved: the pinned memory taken for it goes below
	}
	uint64_t pinned_at = gw_now_ns();
	while (!e && released < n) {
		while (!e && queued < n && queued - released < IN_FLIGHT)
			if (!(e = copy_piece(moves[queued].r, moves[queued].p, true)) && !(e = record_done(&moves[queued])))
				queued++;
		if (!e && released < queued)
			e = release_moved(&moves[released++], moved);
	}
	if (e && n > 0) { // what is in flight finishes; pieces not released stay on the device, their copies unused
		sync_streams();
		for (int i = released; i < n; i++) {
			if (moves[i].done)
				real_cuEventDestroy_v2(moves[i].done);
			moves[i].done = NULL;
			moves[i].p->host = NULL;
		}
	}
	gw_log("swap-out: paused in %.1f ms, host memory for it in %.1f ms (pinning %.1f ms), %llu bytes moved in "
	       "%.1f ms", (start - pause_start) / 1e6, (pinned_at - start) / 1e6, pinning / 1e6,
	       (unsigned long long)*moved, (gw_now_ns() - pinned_at) / 1e6);
	if (e && !*moved) {
		// Nothing moved: the segments this call pinned can go. Those that stay hold only what was swapped out
		// before, up to where the bump allocator stood then.
		uint64_t freed = segments_free_from(segments_before);
		seg_cur = seg_cur_before;
		seg_off = seg_off_before;
		gw_log("swap-out failed with CUDA error %d; nothing was moved, %llu bytes of host memory given back%s", e,
		       (unsigned long long)freed, was_running ? "; running again" : "");
	} else if (e) {
		gw_log("swap-out stopped with CUDA error %d after moving %llu bytes; they stay in host memory", e,
		       (unsigned long long)*moved);
	}
	if (*moved) {
		atomic_fetch_add(&gw->swaps_out, 1);
		atomic_fetch_add(&gw->swap_out_bytes_total, *moved);
		atomic_fetch_add(&gw->swap_out_ns_total, gw_now_ns() - start);
	}
	atomic_store(&gw->state, any_swapped() ? GW_SWAPPED : GW_PAUSED);
	gw_memory_unlock();
	if (e && !*moved)
		run_again_if(was_running);
	else if (e && was_running && !gw_resume())
		gw_log("swap-out: what it had moved came back; running again");
	return e;
}

// Gives back all pinned host memory if none of it holds swapped-out data; else frees nothing.
HIDDEN int gw_drop_host(uint64_t *freed)
{
	*freed = 0;
	gw_memory_lock();
	if (!any_in_host_memory()) {
		*freed = segments_free_from(0);
		seg_cur = 0;
		seg_off = 0;
		gw_log("gave back %llu bytes of pinned host memory", (unsigned long long)*freed);
	} else {
		gw_log("host memory holds swapped-out data: none given back");
	}
	gw_memory_unlock();
	return CUDA_SUCCESS;
}

static CUresult map_again(struct gw_region *r, struct gw_piece *p)
{
	uint64_t deadline = gw_now_ns() + SWAP_IN_PATIENCE_NS;
	CUresult e;
	while ((e = gw_piece_map(r, p)) == CUDA_ERROR_OUT_OF_MEMORY && gw_now_ns() < deadline)
		usleep(20000);
	return e;
}

HIDDEN int gw_resume(void)
{
	CUresult e = CUDA_SUCCESS;
	uint64_t start = gw_now_ns(), moved = 0, map_ns = 0;
	gw_memory_lock();
	if (any_swapped()) {
		atomic_store(&gw->state, GW_SWAPPING_IN);
		EACH_PIECE(r, p) {
			if (p->handle || e)
				continue;
			uint64_t t = gw_now_ns();
			e = map_again(r, p);
			map_ns += gw_now_ns() - t;
			if (!e && !(e = copy_piece(r, p, false)))
				moved += p->size;
		}
		uint64_t queued = gw_now_ns();
		CUresult synced = sync_streams();
		gw_log("swap-in: %llu bytes, mapping %.1f ms, queueing %.1f ms, waiting for copies %.1f ms",
		       (unsigned long long)moved, map_ns / 1e6, (queued - start - map_ns) / 1e6, (gw_now_ns() - queued) / 1e6);
		e = e ? e : synced;
		EACH_PIECE(r, p)
			if (p->handle && p->host && !e)
				gw_swap_forget(p, r->dev);
		if (e) {
			gw_memory_unlock();
			atomic_store(&gw->state, GW_SWAPPED);
			gw_log("swap-in stopped with CUDA error %d; the rest stays in host memory", e);
			return e; // the gate stays closed: a kernel must not meet an unmapped range
		}
		seg_cur = 0;
		seg_off = 0;
		atomic_fetch_add(&gw->swaps_in, 1);
		atomic_fetch_add(&gw->swap_in_bytes_total, moved);
		atomic_fetch_add(&gw->swap_in_ns_total, gw_now_ns() - start);
	}
	atomic_store(&gw->state, GW_RUNNING);
	gw_memory_unlock();
	gw_gate_open();
	return CUDA_SUCCESS;
}
