// The allocation and free entry points: device memory goes to a region of its own (large) or a chunk's slot
// (small) when the device backs memory with VMM, so that it can move; otherwise, and for managed and
// async/pool memory, to the driver, counted against the quota and never moved. An async/pool allocation on a
// stream being captured is a graph's memory node: graphmem.c counts it when a launch takes it. Also the lock
// that guards all memory bookkeeping, and the frees of a context going away.
#include "interposer.h"

#define PITCH_ALIGN 512

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

HIDDEN void gw_memory_lock(void) { pthread_mutex_lock(&lock); }
HIDDEN void gw_memory_unlock(void) { pthread_mutex_unlock(&lock); }

HIDDEN void gw_memory_reset(void) // in a forked child: nothing of the parent's is usable
{
	pthread_mutex_init(&lock, NULL);
	gw_table_reset();
	gw_regions_reset();
	gw_suballoc_reset();
	gw_own_vmm_reset();
	gw_contexts_reset();
	gw_ipc_reset();
	gw_ipc_import_reset();
	gw_arrays_reset();
	gw_graphmem_reset();
}

// ---- allocation paths

static CUresult alloc_large(CUdeviceptr *dptr, size_t size, CUdevice dev, CUcontext ctx)
{
	size_t g = gw_device_info_of(dev)->granularity, phys = (size + g - 1) / g * g;
	struct gw_region *r;
	if (phys < size || !gw_charge(dev, phys, true))
		return CUDA_ERROR_OUT_OF_MEMORY;
	CUresult e = gw_region_new(dev, ctx, phys, -1, &r);
	struct gw_alloc *a = e ? NULL : gw_table_add(r->va, size, A_SWAPPABLE, dev, ctx);
	if (!a) {
		if (!e)
			gw_region_free(r);
		gw_uncharge(dev, phys, true);
		return e ? e : CUDA_ERROR_OUT_OF_MEMORY;
	}
	a->region = r;
	a->charged = phys;
	*dptr = r->va;
	return CUDA_SUCCESS;
}

static void free_swappable(struct gw_alloc *a)
{
	struct gw_region *r = a->region;
	CUdevice dev = a->dev;
	gw_sync_context(a->ctx); // cuMemFree waits for the device; so do we, before memory may go away
	if (r->cls >= 0) {
		gw_free_small(r, a->ptr, dev);
	} else {
		gw_uncharge(dev, a->charged, gw_region_swappable(r));
		gw_region_free(r);
	}
	gw_table_remove(a);
}

// Device memory through the driver itself: counted against the quota, never moved.
enum driver_op { OP_ALLOC, OP_MANAGED, OP_ASYNC, OP_ASYNC_PTSZ, OP_POOL, OP_POOL_PTSZ };
struct driver_request {
	enum driver_op op;
	size_t size;
	unsigned flags;
	CUstream stream;
	CUmemoryPool pool;
};

static CUresult driver_alloc(const struct driver_request *q, CUdeviceptr *dptr)
{
	switch (q->op) {
	case OP_ALLOC: return real_cuMemAlloc_v2(dptr, q->size);
	case OP_MANAGED: return real_cuMemAllocManaged(dptr, q->size, q->flags);
	case OP_ASYNC: return real_cuMemAllocAsync(dptr, q->size, q->stream);
	case OP_ASYNC_PTSZ: return real_cuMemAllocAsync_ptsz(dptr, q->size, q->stream);
	case OP_POOL: return real_cuMemAllocFromPoolAsync(dptr, q->size, q->pool, q->stream);
	case OP_POOL_PTSZ: return real_cuMemAllocFromPoolAsync_ptsz(dptr, q->size, q->pool, q->stream);
	}
	return CUDA_ERROR_INVALID_VALUE;
}

static bool captured(const struct driver_request *q)
{
	int status = 0;
	CUstream s = !q->stream && (q->op == OP_ASYNC_PTSZ || q->op == OP_POOL_PTSZ) ? CU_STREAM_PER_THREAD : q->stream;
	return q->op != OP_ALLOC && q->op != OP_MANAGED && real_cuStreamIsCapturing &&
	       !real_cuStreamIsCapturing(s, &status) && status == CU_STREAM_CAPTURE_STATUS_ACTIVE;
}

static CUresult alloc_unswappable(CUdeviceptr *dptr, const struct driver_request *q)
{
	CUdevice dev;
	CUcontext ctx;
	enum gw_alloc_kind kind = q->op == OP_ALLOC ? A_PLAIN : q->op == OP_MANAGED ? A_MANAGED : A_ASYNC;
	if (gw_current(&dev, &ctx) || !dptr || !q->size)
		return driver_alloc(q, dptr); // the driver's own answer to a bad call
	if (captured(q)) {
		gw_memory_lock();
		CUresult e = gw_graph_captured(dev, q->size);
		gw_memory_unlock();
		return e ? e : driver_alloc(q, dptr);
	}
	gw_memory_lock();
	if (!gw_charge(dev, q->size, false)) {
		gw_memory_unlock();
		return CUDA_ERROR_OUT_OF_MEMORY;
	}
	gw_memory_unlock();
	CUresult e = driver_alloc(q, dptr);
	gw_memory_lock();
	struct gw_alloc *a = e ? NULL : gw_table_add(*dptr, q->size, kind, dev, ctx);
	if (a) {
		a->charged = q->size;
		gw_remember_context(ctx);
	} else {
		gw_uncharge(dev, q->size, false);
	}
	gw_memory_unlock();
	return e;
}

static CUresult alloc_device(CUdeviceptr *dptr, size_t size)
{
	CUdevice dev;
	CUcontext ctx;
	CUresult e = gw_current(&dev, &ctx);
	if (e)
		return e;
	if (!dptr || !size)
		return CUDA_ERROR_INVALID_VALUE;
	if (!gw_device_info_of(dev)->vmm)
		return alloc_unswappable(dptr, &(struct driver_request){.op = OP_ALLOC, .size = size});
	gw_memory_lock();
	e = size <= GW_SMALL_MAX ? gw_alloc_small(dptr, size, dev, ctx) : alloc_large(dptr, size, dev, ctx);
	gw_memory_unlock();
	return e;
}

// ---- the exported entry points (GATED: interposer.h)

API CUresult cuMemAlloc_v2(CUdeviceptr *dptr, size_t size)
{
	size_t wanted_size = size;
	GATED(alloc_device(dptr, size));
}

static CUresult alloc_pitch(CUdeviceptr *dptr, size_t *pitch, size_t width, size_t height, unsigned elem)
{
	size_t p = (width + PITCH_ALIGN - 1) / PITCH_ALIGN * PITCH_ALIGN, size;
	if (!pitch || !width || !height || (elem != 4 && elem != 8 && elem != 16) || p < width ||
	    __builtin_mul_overflow(p, height, &size))
		return CUDA_ERROR_INVALID_VALUE;
	CUresult e = alloc_device(dptr, size);
	if (!e)
		*pitch = p;
	return e;
}

API CUresult cuMemAllocPitch_v2(CUdeviceptr *dptr, size_t *pitch, size_t width, size_t height, unsigned elem)
{
	size_t wanted_size = width * height;
	GATED(alloc_pitch(dptr, pitch, width, height, elem));
}

API CUresult cuMemAllocManaged(CUdeviceptr *dptr, size_t size, unsigned flags)
{
	size_t wanted_size = size;
	GATED(alloc_unswappable(dptr, &(struct driver_request){.op = OP_MANAGED, .size = size, .flags = flags}));
}

API CUresult cuMemAllocAsync(CUdeviceptr *dptr, size_t size, CUstream s)
{
	size_t wanted_size = size;
	GATED(alloc_unswappable(dptr, &(struct driver_request){.op = OP_ASYNC, .size = size, .stream = s}));
}

API CUresult cuMemAllocAsync_ptsz(CUdeviceptr *dptr, size_t size, CUstream s)
{
	size_t wanted_size = size;
	GATED(alloc_unswappable(dptr, &(struct driver_request){.op = OP_ASYNC_PTSZ, .size = size, .stream = s}));
}

API CUresult cuMemAllocFromPoolAsync(CUdeviceptr *dptr, size_t size, CUmemoryPool pool, CUstream s)
{
	size_t wanted_size = size;
	GATED(alloc_unswappable(dptr, &(struct driver_request){.op = OP_POOL, .size = size, .stream = s, .pool = pool}));
}

API CUresult cuMemAllocFromPoolAsync_ptsz(CUdeviceptr *dptr, size_t size, CUmemoryPool pool, CUstream s)
{
	size_t wanted_size = size;
	GATED(alloc_unswappable(dptr,
				&(struct driver_request){.op = OP_POOL_PTSZ, .size = size, .stream = s, .pool = pool}));
}

// Frees: never gated. `driver_free` is the driver's own call for memory the driver allocated.
static CUresult free_any(CUdeviceptr ptr, CUresult (*driver_free)(CUdeviceptr, CUstream), CUstream s)
{
	if (!gw_ensure_driver(NULL))
		return CUDA_ERROR_NOT_INITIALIZED;
	gw_memory_lock();
	struct gw_alloc *a = ptr ? gw_table_find(ptr) : NULL;
	if (a && a->kind == A_SWAPPABLE) {
		free_swappable(a);
		gw_memory_unlock();
		return CUDA_SUCCESS;
	}
	gw_memory_unlock();
	CUresult e = driver_free(ptr, s);
	gw_memory_lock();
	if (!e && (a = ptr ? gw_table_find(ptr) : NULL) && a->kind != A_SWAPPABLE) {
		gw_uncharge(a->dev, a->charged, false);
		gw_table_remove(a);
	}
	gw_memory_unlock();
	return e;
}

static CUresult free_sync(CUdeviceptr p, CUstream s) { (void)s; return real_cuMemFree_v2(p); }
static CUresult free_async(CUdeviceptr p, CUstream s) { return real_cuMemFreeAsync(p, s); }
static CUresult free_async_ptsz(CUdeviceptr p, CUstream s) { return real_cuMemFreeAsync_ptsz(p, s); }

API CUresult cuMemFree_v2(CUdeviceptr ptr) { return free_any(ptr, free_sync, NULL); }
API CUresult cuMemFreeAsync(CUdeviceptr ptr, CUstream s) { return free_any(ptr, free_async, s); }
API CUresult cuMemFreeAsync_ptsz(CUdeviceptr ptr, CUstream s) { return free_any(ptr, free_async_ptsz, s); }

// A context going away (devices.c) takes its allocations with it.
static void free_if_of_context(struct gw_alloc *a, void *ctx)
{
	if (a->ctx != ctx)
		return;
	if (a->kind == A_SWAPPABLE) {
		free_swappable(a);
	} else {
		gw_uncharge(a->dev, a->charged, false);
		gw_table_remove(a);
	}
}

HIDDEN void gw_free_context_allocs(CUcontext ctx)
{
	gw_table_each(free_if_of_context, ctx);
	gw_arrays_forget_context(ctx);
}
