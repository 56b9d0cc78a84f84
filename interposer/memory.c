// Allocations: the quota, VMM backing that lets memory move, sub-allocation of small requests, and the
// memory the process makes or gets by other paths (counted, never moved).
#include "interposer.h"

#include <stdlib.h>
#include <string.h>

#define SMALL_MAX (1u << 20)  // larger requests get a region of their own
#define SMALL_MIN_SHIFT 8     // the smallest class: 256 bytes, CUDA's alignment
#define CLASSES 13            // 256 B .. 1 MiB
#define PITCH_ALIGN 512
#define DEFAULT_GRANULARITY (2u << 20)

enum alloc_kind { A_SWAPPABLE, A_PLAIN, A_ASYNC, A_MANAGED };

struct alloc {
	CUdeviceptr ptr;
	size_t size, charged; // charged: bytes counted against the quota (0 for sub-allocations: the chunk is)
	struct gw_region *region;
	CUcontext ctx;
	CUdevice dev;
	enum alloc_kind kind;
	struct alloc *next;
};

struct own_handle { // a program's own cuMemCreate: counted until released and unmapped
	CUmemGenericAllocationHandle h;
	size_t size;
	CUdevice dev;
	int maps;
	bool released, counted;
	struct own_handle *next;
};

struct own_map {
	CUdeviceptr va;
	size_t size;
	struct own_handle *h;
	struct own_map *next;
};

struct device_info {
	bool known, vmm;
	size_t granularity;
	int naccess;
	CUmemAccessDesc access[GW_MAX_DEVICES];
};

struct context {
	CUcontext ctx;
	struct context *next;
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct alloc **table;
static size_t table_size, table_count;
static struct gw_region *regions;
static struct gw_region *hint[GW_MAX_DEVICES][CLASSES];
static struct own_handle *own_handles;
static struct own_map *own_maps;
static struct device_info devices[GW_MAX_DEVICES];
static struct context *contexts;

HIDDEN void gw_memory_lock(void) { pthread_mutex_lock(&lock); }
HIDDEN void gw_memory_unlock(void) { pthread_mutex_unlock(&lock); }
HIDDEN struct gw_region *gw_regions(void) { return regions; }

HIDDEN void gw_memory_reset(void) // in a forked child: nothing of the parent's is usable
{
	pthread_mutex_init(&lock, NULL);
	table = NULL;
	table_size = table_count = 0;
	regions = NULL;
	memset(hint, 0, sizeof hint);
	own_handles = NULL;
	own_maps = NULL;
	contexts = NULL;
}

static struct gw_device *dev_stats(CUdevice dev)
{
	return &gw->dev[dev >= 0 && dev < GW_MAX_DEVICES ? dev : GW_MAX_DEVICES - 1];
}

// ---- the table of allocations, by start address

static size_t slot_of(CUdeviceptr p) { return (size_t)((p >> 8) * 0x9E3779B97F4A7C15ull >> 20) & (table_size - 1); }

static bool table_grow(void)
{
	size_t n = table_size ? table_size * 2 : 1024;
	struct alloc **t = calloc(n, sizeof *t);
	if (!t)
		return false;
	struct alloc **old = table;
	size_t old_size = table_size;
	table = t;
	table_size = n;
	for (size_t i = 0; i < old_size; i++)
		for (struct alloc *a = old[i], *next; a; a = next) {
			next = a->next;
			a->next = table[slot_of(a->ptr)];
			table[slot_of(a->ptr)] = a;
		}
	free(old);
	return true;
}

static struct alloc *table_add(CUdeviceptr ptr, size_t size, enum alloc_kind kind, CUdevice dev, CUcontext ctx)
{
	struct alloc *a = malloc(sizeof *a);
	if (!a || (table_count >= table_size && !table_grow())) {
		free(a);
		return NULL;
	}
	*a = (struct alloc){ptr, size, 0, NULL, ctx, dev, kind, table[slot_of(ptr)]};
	table[slot_of(ptr)] = a;
	table_count++;
	return a;
}

static struct alloc *table_find(CUdeviceptr ptr)
{
	if (!table_size)
		return NULL;
	struct alloc *a = table[slot_of(ptr)];
	while (a && a->ptr != ptr)
		a = a->next;
	return a;
}

static void table_remove(struct alloc *a)
{
	struct alloc **p = &table[slot_of(a->ptr)];
	while (*p != a)
		p = &(*p)->next;
	*p = a->next;
	table_count--;
	free(a);
}

// ---- quota

static void release_empty_chunks(void);

static __thread bool quota_refused; // the last refusal was the quota's, not the device's

static bool charge(CUdevice dev, uint64_t bytes, bool swappable)
{
	quota_refused = false;
	struct gw_device *d = dev_stats(dev);
	uint64_t quota = atomic_load(&d->quota), used = atomic_load(&d->used);
	if (quota && (bytes > quota || used > quota - bytes)) {
		release_empty_chunks(); // kept for speed, never at the price of a refusal
		used = atomic_load(&d->used);
	}
	if (quota && (bytes > quota || used > quota - bytes)) {
		atomic_fetch_add(&gw->quota_refusals, 1);
		quota_refused = true;
		gw_log("refused %llu bytes on GPU %d: %llu of the quota of %llu in use", (unsigned long long)bytes, dev,
		       (unsigned long long)used, (unsigned long long)quota);
		return false;
	}
	atomic_store(&d->used, used + bytes);
	atomic_fetch_add(swappable ? &d->swappable : &d->unswappable, bytes);
	return true;
}

static void uncharge(CUdevice dev, uint64_t bytes, bool swappable)
{
	struct gw_device *d = dev_stats(dev);
	atomic_fetch_sub(&d->used, bytes);
	atomic_fetch_sub(swappable ? &d->swappable : &d->unswappable, bytes);
}

// ---- devices and contexts

static struct device_info *device(CUdevice dev)
{
	struct device_info *d = &devices[dev >= 0 && dev < GW_MAX_DEVICES ? dev : GW_MAX_DEVICES - 1];
	if (d->known)
		return d;
	int vmm = 0, count = 0;
	d->vmm = gw_cfg.swap && dev < GW_MAX_DEVICES && real_cuMemCreate && real_cuMemAddressReserve &&
		 !real_cuDeviceGetAttribute(&vmm, CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, dev) && vmm;
	CUmemAllocationProp prop = {.type = CU_MEM_ALLOCATION_TYPE_PINNED, .location = {CU_MEM_LOCATION_TYPE_DEVICE, dev}};
	if (!real_cuMemGetAllocationGranularity || real_cuMemGetAllocationGranularity(&d->granularity, &prop, 0) ||
	    !d->granularity)
		d->granularity = DEFAULT_GRANULARITY;
	// Like cuMemAlloc memory, VMM memory is made reachable from every peer that could enable access to it.
	d->access[d->naccess++] = (CUmemAccessDesc){{CU_MEM_LOCATION_TYPE_DEVICE, dev}, CU_MEM_ACCESS_FLAGS_PROT_READWRITE};
	if (real_cuDeviceGetCount && !real_cuDeviceGetCount(&count))
		for (int peer = 0; peer < count && peer < GW_MAX_DEVICES; peer++) {
			int can = 0;
			if (peer != dev && real_cuDeviceCanAccessPeer && !real_cuDeviceCanAccessPeer(&can, peer, dev) && can)
				d->access[d->naccess++] = (CUmemAccessDesc){{CU_MEM_LOCATION_TYPE_DEVICE, peer},
									    CU_MEM_ACCESS_FLAGS_PROT_READWRITE};
		}
	d->known = true;
	return d;
}

static CUresult current(CUdevice *dev, CUcontext *ctx)
{
	CUresult r = real_cuCtxGetCurrent(ctx);
	if (!r && !*ctx)
		r = 201; // CUDA_ERROR_INVALID_CONTEXT
	return r ? r : real_cuCtxGetDevice(dev);
}

static void remember_context(CUcontext ctx)
{
	for (struct context *c = contexts; c; c = c->next)
		if (c->ctx == ctx)
			return;
	struct context *c = malloc(sizeof *c);
	if (c) {
		*c = (struct context){ctx, contexts};
		contexts = c;
	}
}

static void forget_context(CUcontext ctx)
{
	for (struct context **p = &contexts, *c; (c = *p); p = &c->next)
		if (c->ctx == ctx) {
			*p = c->next;
			free(c);
			return;
		}
}

static CUresult sync_context(CUcontext ctx)
{
	CUcontext popped;
	CUresult r = real_cuCtxPushCurrent_v2(ctx);
	if (r)
		return r;
	r = real_cuCtxSynchronize();
	real_cuCtxPopCurrent_v2(&popped);
	return r;
}

HIDDEN CUresult gw_sync_contexts(void)
{
	CUresult first = CUDA_SUCCESS;
	for (struct context *c = contexts; c; c = c->next) {
		CUresult r = sync_context(c->ctx);
		first = first ? first : r;
	}
	return first;
}

// ---- regions: reserved ranges with physical memory that can be taken away and given back

HIDDEN CUresult gw_piece_map(struct gw_region *r, struct gw_piece *p)
{
	struct device_info *d = device(r->dev);
	CUmemAllocationProp prop = {.type = CU_MEM_ALLOCATION_TYPE_PINNED, .location = {CU_MEM_LOCATION_TYPE_DEVICE, r->dev}};
	CUmemGenericAllocationHandle h;
	CUresult e = real_cuMemCreate(&h, p->size, &prop, 0);
	if (e)
		return e;
	if ((e = real_cuMemMap(p->va, p->size, 0, h, 0))) {
		real_cuMemRelease(h);
		return e;
	}
	if ((e = real_cuMemSetAccess(p->va, p->size, d->access, d->naccess))) {
		real_cuMemUnmap(p->va, p->size);
		real_cuMemRelease(h);
		return e;
	}
	p->handle = h;
	return CUDA_SUCCESS;
}

HIDDEN void gw_piece_unmap(struct gw_piece *p)
{
	real_cuMemUnmap(p->va, p->size);
	real_cuMemRelease(p->handle);
	p->handle = 0;
}

HIDDEN CUresult gw_physical_map(struct gw_region *r)
{
	for (uint32_t i = 0; i < r->npieces; i++) {
		CUresult e = r->pieces[i].handle ? CUDA_SUCCESS : gw_piece_map(r, &r->pieces[i]);
		if (e)
			return e;
	}
	return CUDA_SUCCESS;
}

HIDDEN void gw_physical_unmap(struct gw_region *r)
{
	for (uint32_t i = 0; i < r->npieces; i++)
		if (r->pieces[i].handle)
			gw_piece_unmap(&r->pieces[i]);
}

static void region_release(struct gw_region *r)
{
	free(r->pieces);
	free(r->bitmap);
	free(r);
}

static size_t reservation_alignment(size_t size)
{
#if GW_VA_ALIGN
	return size >= GW_VA_ALIGN ? GW_VA_ALIGN : 0;
#else
	(void)size;
	return 0;
#endif
}

static CUresult region_new(CUdevice dev, CUcontext ctx, size_t size, int cls, struct gw_region **out)
{
	struct gw_region *r = calloc(1, sizeof *r);
	if (!r)
		return CUDA_ERROR_OUT_OF_MEMORY;
	*r = (struct gw_region){.size = size, .ctx = ctx, .dev = dev, .cls = cls};
	r->npieces = (uint32_t)((size + GW_PIECE_MAX - 1) / GW_PIECE_MAX);
	r->pieces = calloc(r->npieces, sizeof *r->pieces);
	if (cls >= 0) {
		r->nslots = (uint32_t)(size >> (SMALL_MIN_SHIFT + cls));
		r->bitmap = calloc((r->nslots + 63) / 64, sizeof *r->bitmap);
	}
	CUresult e = !r->pieces || (cls >= 0 && !r->bitmap) ? CUDA_ERROR_OUT_OF_MEMORY
							    : real_cuMemAddressReserve(&r->va, size, reservation_alignment(size), 0, 0);
	for (uint32_t i = 0; !e && i < r->npieces; i++) {
		size_t at = (size_t)i * GW_PIECE_MAX;
		r->pieces[i] = (struct gw_piece){.va = r->va + at, .size = size - at < GW_PIECE_MAX ? size - at : GW_PIECE_MAX};
	}
	if (!e && (e = gw_physical_map(r))) {
		gw_physical_unmap(r);
		real_cuMemAddressFree(r->va, size);
	}
	if (e) {
		region_release(r);
		return e;
	}
	r->next = regions;
	regions = r;
	remember_context(ctx);
	*out = r;
	return CUDA_SUCCESS;
}

static void region_free(struct gw_region *r)
{
	gw_physical_unmap(r);
	for (uint32_t i = 0; i < r->npieces; i++)
		gw_swap_forget(&r->pieces[i], r->dev);
	real_cuMemAddressFree(r->va, r->size);
	for (struct gw_region **p = &regions; *p; p = &(*p)->next)
		if (*p == r) {
			*p = r->next;
			break;
		}
	for (int c = 0; c < CLASSES; c++)
		for (int d = 0; d < GW_MAX_DEVICES; d++)
			if (hint[d][c] == r)
				hint[d][c] = NULL;
	region_release(r);
}

// ---- allocation paths

static int size_class(size_t size)
{
	int cls = 0;
	while (((size_t)1 << (SMALL_MIN_SHIFT + cls)) < size)
		cls++;
	return cls;
}

static struct gw_region *chunk_with_room(CUdevice dev, CUcontext ctx, int cls)
{
	struct gw_region **h = &hint[dev >= 0 && dev < GW_MAX_DEVICES ? dev : GW_MAX_DEVICES - 1][cls];
	if (*h && (*h)->ctx == ctx && (*h)->used_slots < (*h)->nslots)
		return *h;
	for (struct gw_region *r = regions; r; r = r->next)
		if (r->cls == cls && r->dev == dev && r->ctx == ctx && r->used_slots < r->nslots)
			return *h = r;
	return NULL;
}

static CUresult alloc_small(CUdeviceptr *dptr, size_t size, CUdevice dev, CUcontext ctx)
{
	int cls = size_class(size);
	struct gw_region *r = chunk_with_room(dev, ctx, cls);
	size_t chunk = device(dev)->granularity;
	if (!r) {
		if (!charge(dev, chunk, true))
			return CUDA_ERROR_OUT_OF_MEMORY;
		CUresult e = region_new(dev, ctx, chunk, cls, &r);
		if (e) {
			uncharge(dev, chunk, true);
			return e;
		}
	}
	uint32_t slot = 0;
	while (r->bitmap[slot / 64] & (1ull << (slot % 64)))
		slot++;
	CUdeviceptr p = r->va + ((CUdeviceptr)slot << (SMALL_MIN_SHIFT + cls));
	struct alloc *a = table_add(p, size, A_SWAPPABLE, dev, ctx);
	if (!a) {
		if (!r->used_slots) {
			region_free(r);
			uncharge(dev, chunk, true);
		}
		return CUDA_ERROR_OUT_OF_MEMORY;
	}
	r->bitmap[slot / 64] |= 1ull << (slot % 64);
	r->used_slots++;
	a->region = r;
	*dptr = p;
	return CUDA_SUCCESS;
}

static CUresult alloc_large(CUdeviceptr *dptr, size_t size, CUdevice dev, CUcontext ctx)
{
	size_t g = device(dev)->granularity, phys = (size + g - 1) / g * g;
	struct gw_region *r;
	if (phys < size || !charge(dev, phys, true))
		return CUDA_ERROR_OUT_OF_MEMORY;
	CUresult e = region_new(dev, ctx, phys, -1, &r);
	struct alloc *a = e ? NULL : table_add(r->va, size, A_SWAPPABLE, dev, ctx);
	if (!a) {
		if (!e)
			region_free(r);
		uncharge(dev, phys, true);
		return e ? e : CUDA_ERROR_OUT_OF_MEMORY;
	}
	a->region = r;
	a->charged = phys;
	*dptr = r->va;
	return CUDA_SUCCESS;
}

static bool another_empty_chunk(const struct gw_region *chunk)
{
	for (struct gw_region *r = regions; r; r = r->next)
		if (r != chunk && r->cls == chunk->cls && r->dev == chunk->dev && r->ctx == chunk->ctx && !r->used_slots)
			return true;
	return false;
}

HIDDEN void gw_release_empty_chunks(void) { release_empty_chunks(); }

static void release_empty_chunks(void) // lock held
{
	for (struct gw_region *r = regions, *next; r; r = next) {
		next = r->next;
		if (r->cls >= 0 && !r->used_slots) {
			uncharge(r->dev, r->size, true);
			region_free(r);
		}
	}
}

static void free_swappable(struct alloc *a)
{
	struct gw_region *r = a->region;
	CUdevice dev = a->dev;
	sync_context(a->ctx); // cuMemFree waits for the device; so do we, before memory may go away
	if (r->cls >= 0) {
		uint32_t slot = (uint32_t)((a->ptr - r->va) >> (SMALL_MIN_SHIFT + r->cls));
		r->bitmap[slot / 64] &= ~(1ull << (slot % 64));
		// One empty chunk per class stays, so that a program allocating and freeing one small buffer in a
		// loop does not create and release a chunk every time.
		if (--r->used_slots == 0 && another_empty_chunk(r)) {
			uncharge(dev, r->size, true);
			region_free(r);
		}
	} else {
		uncharge(dev, a->charged, true);
		region_free(r);
	}
	table_remove(a);
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

static CUresult alloc_unswappable(CUdeviceptr *dptr, const struct driver_request *q)
{
	CUdevice dev;
	CUcontext ctx;
	enum alloc_kind kind = q->op == OP_ALLOC ? A_PLAIN : q->op == OP_MANAGED ? A_MANAGED : A_ASYNC;
	if (current(&dev, &ctx) || !dptr || !q->size)
		return driver_alloc(q, dptr); // the driver's own answer to a bad call
	gw_memory_lock();
	if (!charge(dev, q->size, false)) {
		gw_memory_unlock();
		return CUDA_ERROR_OUT_OF_MEMORY;
	}
	gw_memory_unlock();
	CUresult e = driver_alloc(q, dptr);
	gw_memory_lock();
	struct alloc *a = e ? NULL : table_add(*dptr, q->size, kind, dev, ctx);
	if (a) {
		a->charged = q->size;
		remember_context(ctx);
	} else {
		uncharge(dev, q->size, false);
	}
	gw_memory_unlock();
	return e;
}

static CUresult alloc_device(CUdeviceptr *dptr, size_t size)
{
	CUdevice dev;
	CUcontext ctx;
	CUresult e = current(&dev, &ctx);
	if (e)
		return e;
	if (!dptr || !size)
		return CUDA_ERROR_INVALID_VALUE;
	if (!device(dev)->vmm)
		return alloc_unswappable(dptr, &(struct driver_request){.op = OP_ALLOC, .size = size});
	gw_memory_lock();
	e = size <= SMALL_MAX ? alloc_small(dptr, size, dev, ctx) : alloc_large(dptr, size, dev, ctx);
	gw_memory_unlock();
	return e;
}

// ---- the exported entry points

// An allocation the device cannot hold (not one the quota refuses) waits, while a daemon is attached, for
// the daemon to make room by swapping others out; it fails if the daemon says no room will come.
#define GATED(expr)                                                              \
	do {                                                                     \
		if (!gw_ensure_driver(NULL))                                     \
			return CUDA_ERROR_NOT_INITIALIZED;                       \
		uint32_t bits_;                                                  \
		struct gw_slot *slot_ = gw_gate_enter(&bits_);                   \
		CUresult r_;                                                     \
		while ((r_ = (expr)) == CUDA_ERROR_OUT_OF_MEMORY && !quota_refused && \
		       gw_wait_for_room(slot_, wanted_size))                     \
			;                                                        \
		gw_gate_exit(slot_);                                             \
		return r_;                                                       \
	} while (0)

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
	struct alloc *a = ptr ? table_find(ptr) : NULL;
	if (a && a->kind == A_SWAPPABLE) {
		free_swappable(a);
		gw_memory_unlock();
		return CUDA_SUCCESS;
	}
	gw_memory_unlock();
	CUresult e = driver_free(ptr, s);
	gw_memory_lock();
	if (!e && (a = ptr ? table_find(ptr) : NULL) && a->kind != A_SWAPPABLE) {
		uncharge(a->dev, a->charged, false);
		table_remove(a);
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

// ---- the program's own VMM memory

static void own_put(struct own_handle *h)
{
	if (!h->released || h->maps)
		return;
	if (h->counted)
		uncharge(h->dev, h->size, false);
	for (struct own_handle **p = &own_handles; *p; p = &(*p)->next)
		if (*p == h) {
			*p = h->next;
			break;
		}
	free(h);
}

static struct own_handle *own_find(CUmemGenericAllocationHandle h)
{
	struct own_handle *o = own_handles;
	while (o && o->h != h)
		o = o->next;
	return o;
}

static CUresult own_create(CUmemGenericAllocationHandle *handle, size_t size, const CUmemAllocationProp *prop,
			   cuuint64_t flags)
{
	bool counted = prop && prop->location.type == CU_MEM_LOCATION_TYPE_DEVICE && handle && size;
	CUdevice dev = prop ? prop->location.id : 0;
	struct own_handle *o = counted ? malloc(sizeof *o) : NULL;
	gw_memory_lock();
	if (counted && (!o || !charge(dev, size, false))) {
		gw_memory_unlock();
		free(o);
		return CUDA_ERROR_OUT_OF_MEMORY;
	}
	gw_memory_unlock();
	CUresult e = real_cuMemCreate(handle, size, prop, flags);
	gw_memory_lock();
	if (counted && e) {
		uncharge(dev, size, false);
		free(o);
	} else if (counted) {
		*o = (struct own_handle){*handle, size, dev, 0, false, true, own_handles};
		own_handles = o;
	}
	gw_memory_unlock();
	return e;
}

API CUresult cuMemCreate(CUmemGenericAllocationHandle *handle, size_t size, const CUmemAllocationProp *prop,
			 cuuint64_t flags)
{
	size_t wanted_size = size;
	GATED(own_create(handle, size, prop, flags));
}

API CUresult cuMemRelease(CUmemGenericAllocationHandle h)
{
	if (!gw_ensure_driver(NULL))
		return CUDA_ERROR_NOT_INITIALIZED;
	CUresult e = real_cuMemRelease(h);
	gw_memory_lock();
	struct own_handle *o = e ? NULL : own_find(h);
	if (o) {
		o->released = true;
		own_put(o);
	}
	gw_memory_unlock();
	return e;
}

API CUresult cuMemMap(CUdeviceptr ptr, size_t size, size_t offset, CUmemGenericAllocationHandle h, cuuint64_t flags)
{
	if (!gw_ensure_driver(NULL))
		return CUDA_ERROR_NOT_INITIALIZED;
	CUresult e = real_cuMemMap(ptr, size, offset, h, flags);
	gw_memory_lock();
	struct own_handle *o = e ? NULL : own_find(h);
	struct own_map *m = o ? malloc(sizeof *m) : NULL;
	if (m) {
		*m = (struct own_map){ptr, size, o, own_maps};
		own_maps = m;
		o->maps++;
	}
	gw_memory_unlock();
	return e;
}

API CUresult cuMemUnmap(CUdeviceptr ptr, size_t size)
{
	if (!gw_ensure_driver(NULL))
		return CUDA_ERROR_NOT_INITIALIZED;
	CUresult e = real_cuMemUnmap(ptr, size);
	gw_memory_lock();
	for (struct own_map **p = &own_maps, *m; !e && (m = *p);) {
		if (m->va < ptr || m->va >= ptr + size) {
			p = &m->next;
			continue;
		}
		*p = m->next;
		m->h->maps--;
		own_put(m->h);
		free(m);
	}
	gw_memory_unlock();
	return e;
}

// ---- what the process is told about memory

API CUresult cuMemGetInfo_v2(size_t *free_bytes, size_t *total)
{
	if (!gw_ensure_driver(NULL))
		return CUDA_ERROR_NOT_INITIALIZED;
	CUresult e = real_cuMemGetInfo_v2(free_bytes, total);
	CUdevice dev;
	if (e || real_cuCtxGetDevice(&dev))
		return e;
	struct gw_device *d = dev_stats(dev);
	uint64_t quota = atomic_load(&d->quota), used = atomic_load(&d->used);
	if (quota) {
		*total = *total < quota ? *total : quota;
		uint64_t left = quota > used ? quota - used : 0;
		*free_bytes = *free_bytes < left ? *free_bytes : left;
	}
	return e;
}

API CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice dev)
{
	if (!gw_ensure_driver(NULL))
		return CUDA_ERROR_NOT_INITIALIZED;
	CUresult e = real_cuDeviceTotalMem_v2(bytes, dev);
	uint64_t quota = e ? 0 : atomic_load(&dev_stats(dev)->quota);
	if (quota && *bytes > quota)
		*bytes = quota;
	return e;
}

static struct alloc *containing(CUdeviceptr ptr) // lock held
{
	for (struct gw_region *r = regions; r; r = r->next) {
		if (ptr < r->va || ptr >= r->va + r->size)
			continue;
		CUdeviceptr base = r->va;
		if (r->cls >= 0)
			base += (ptr - r->va) >> (SMALL_MIN_SHIFT + r->cls) << (SMALL_MIN_SHIFT + r->cls);
		struct alloc *a = table_find(base);
		return a && ptr < a->ptr + a->size ? a : NULL;
	}
	return NULL;
}

API CUresult cuMemGetAddressRange_v2(CUdeviceptr *base, size_t *size, CUdeviceptr ptr)
{
	if (!gw_ensure_driver(NULL))
		return CUDA_ERROR_NOT_INITIALIZED;
	gw_memory_lock();
	struct alloc *a = containing(ptr);
	if (a) {
		if (base)
			*base = a->ptr;
		if (size)
			*size = a->size;
	}
	gw_memory_unlock();
	return a ? CUDA_SUCCESS : real_cuMemGetAddressRange_v2(base, size, ptr);
}

API CUresult cuIpcGetMemHandle(void *handle, CUdeviceptr ptr)
{
	static atomic_bool said;
	if (!gw_ensure_driver(NULL))
		return CUDA_ERROR_NOT_INITIALIZED;
	CUresult e = real_cuIpcGetMemHandle(handle, ptr);
	gw_memory_lock();
	bool ours = e && containing(ptr);
	gw_memory_unlock();
	if (ours)
		gw_warn_once(&said, "CUDA IPC cannot export swappable memory: run the program with "
				    "`gpuwatch exec --no-swap` to share device memory between processes");
	return e;
}

// ---- contexts going away take their memory with them

static void drop_context_memory(CUcontext ctx) // lock held
{
	for (size_t i = 0; i < table_size; i++)
		for (struct alloc *a = table[i], *next; a; a = next) {
			next = a->next;
			if (a->ctx != ctx)
				continue;
			if (a->kind == A_SWAPPABLE) {
				free_swappable(a);
			} else {
				uncharge(a->dev, a->charged, false);
				table_remove(a);
			}
		}
	forget_context(ctx);
}

static CUresult destroy_context(CUcontext ctx, CUresult (*destroy)(CUcontext))
{
	if (!gw_ensure_driver(NULL) || !destroy)
		return CUDA_ERROR_NOT_INITIALIZED;
	gw_memory_lock();
	if (ctx)
		drop_context_memory(ctx);
	gw_memory_unlock();
	return destroy(ctx);
}

API CUresult cuCtxDestroy_v2(CUcontext ctx) { return destroy_context(ctx, real_cuCtxDestroy_v2); }
API CUresult cuCtxDestroy(CUcontext ctx) { return destroy_context(ctx, real_cuCtxDestroy); }

static CUresult reset_primary(CUdevice dev, CUresult (*reset)(CUdevice))
{
	CUcontext ctx = NULL;
	if (!gw_ensure_driver(NULL) || !reset)
		return CUDA_ERROR_NOT_INITIALIZED;
	if (!real_cuDevicePrimaryCtxRetain(&ctx, dev)) {
		gw_memory_lock();
		drop_context_memory(ctx);
		gw_memory_unlock();
		real_cuDevicePrimaryCtxRelease_v2(dev);
	}
	return reset(dev);
}

API CUresult cuDevicePrimaryCtxReset_v2(CUdevice dev) { return reset_primary(dev, real_cuDevicePrimaryCtxReset_v2); }
API CUresult cuDevicePrimaryCtxReset(CUdevice dev) { return reset_primary(dev, real_cuDevicePrimaryCtxReset); }
