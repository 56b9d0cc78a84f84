// CUDA arrays and mipmapped arrays: counted against the quota from creation to destruction, never moved (the
// driver lays them out in its own way). An array counts its exact requirement where the driver tells it: that
// of a twin made with CUDA_ARRAY3D_DEFERRED_MAPPING, which takes no memory (the driver answers requirements only
// for such arrays), asked before the array is made; else its descriptor's bytes. Arrays made deferred or sparse
// take no memory at creation: what is mapped into them is counted where it is made (cuMemCreate).
#include "interposer.h"

#include <stdlib.h>

struct array {
	void *handle;
	uint64_t bytes;
	CUdevice dev;
	CUcontext ctx;
	struct array *next;
};
static struct array *arrays; // lock held

HIDDEN void gw_arrays_reset(void) { arrays = NULL; } // in a forked child: the parent's are not ours

static size_t channel_bytes(int format)
{
	switch (format) {
	case 0x01: case 0x08: case 0xc0: case 0xc1: case 0xc2: case 0xc6: case 0xc7: case 0xc8:
		return 1; // 8-bit integers, UNORM/SNORM_INT8X1..X4
	case 0x02: case 0x09: case 0x10: case 0xc3: case 0xc4: case 0xc5: case 0xc9: case 0xca: case 0xcb:
		return 2; // 16-bit integers, half, UNORM/SNORM_INT16X1..X4
	case 0x03: case 0x0a: case 0x20:
		return 4; // 32-bit integers, float
	}
	return 1; // packed, block-compressed and video formats: a byte per channel at least
}

static uint64_t dim(uint64_t n, unsigned level) { return n >> level ? n >> level : 1; }

// The descriptor's bytes over `levels` levels; 0 when it overflows (the driver then says what is wrong).
static uint64_t descriptor_bytes(const CUDA_ARRAY3D_DESCRIPTOR *d, unsigned levels)
{
	uint64_t elem = channel_bytes(d->Format) * d->NumChannels, total = 0, n;
	bool layers = d->Flags & 0x05; // CUDA_ARRAY3D_LAYERED, _CUBEMAP: depth counts layers (or faces), never halved
	for (unsigned l = 0; l < levels && l < 64; l++) {
		uint64_t h = d->Height ? dim(d->Height, l) : 1, z = !d->Depth ? 1 : layers ? d->Depth : dim(d->Depth, l);
		if (__builtin_mul_overflow(dim(d->Width, l), h, &n) || __builtin_mul_overflow(n, z, &n) ||
		    __builtin_mul_overflow(n, elem, &n) || __builtin_add_overflow(total, n, &total))
			return 0;
	}
	return total;
}

static uint64_t requirement(const CUDA_ARRAY3D_DESCRIPTOR *d, unsigned levels, bool mipmapped, CUdevice dev)
{
	CUDA_ARRAY3D_DESCRIPTOR twin = *d;
	CUDA_ARRAY_MEMORY_REQUIREMENTS req = {0};
	void *h = NULL;
	CUresult e = CUDA_ERROR_NOT_SUPPORTED;
	twin.Flags |= CUDA_ARRAY3D_DEFERRED_MAPPING;
	if (mipmapped && real_cuMipmappedArrayCreate && real_cuMipmappedArrayGetMemoryRequirements &&
	    !real_cuMipmappedArrayCreate(&h, &twin, levels)) {
		e = real_cuMipmappedArrayGetMemoryRequirements(&req, h, dev);
		real_cuMipmappedArrayDestroy(h);
	} else if (!mipmapped && real_cuArray3DCreate_v2 && real_cuArrayGetMemoryRequirements &&
		   !real_cuArray3DCreate_v2(&h, &twin)) {
		e = real_cuArrayGetMemoryRequirements(&req, h, dev);
		real_cuArrayDestroy(h);
	}
	return !e && req.size ? req.size : descriptor_bytes(d, levels);
}

enum shape { TWO_D, THREE_D, MIPMAPPED };
struct request {
	enum shape shape;
	void **out;
	const CUDA_ARRAY_DESCRIPTOR *d2;
	const CUDA_ARRAY3D_DESCRIPTOR *d3;
	unsigned levels;
};

static CUresult driver_create(const struct request *q)
{
	switch (q->shape) {
	case TWO_D: return real_cuArrayCreate_v2 ? real_cuArrayCreate_v2(q->out, q->d2) : CUDA_ERROR_NOT_FOUND;
	case THREE_D: return real_cuArray3DCreate_v2 ? real_cuArray3DCreate_v2(q->out, q->d3) : CUDA_ERROR_NOT_FOUND;
	case MIPMAPPED:
		return real_cuMipmappedArrayCreate ? real_cuMipmappedArrayCreate(q->out, q->d3, q->levels) : CUDA_ERROR_NOT_FOUND;
	}
	return CUDA_ERROR_INVALID_VALUE;
}

static bool describe(const struct request *q, CUDA_ARRAY3D_DESCRIPTOR *d)
{
	if (q->shape == TWO_D && q->d2)
		*d = (CUDA_ARRAY3D_DESCRIPTOR){q->d2->Width, q->d2->Height, 0, q->d2->Format, q->d2->NumChannels, 0};
	else if (q->shape != TWO_D && q->d3)
		*d = *q->d3;
	return q->shape == TWO_D ? q->d2 != NULL : q->d3 != NULL;
}

static CUresult create(const struct request *q)
{
	CUDA_ARRAY3D_DESCRIPTOR d;
	CUdevice dev;
	CUcontext ctx;
	unsigned levels = q->shape == MIPMAPPED ? q->levels : 1;
	if (!q->out || !describe(q, &d) || d.Flags & (CUDA_ARRAY3D_SPARSE | CUDA_ARRAY3D_DEFERRED_MAPPING) ||
	    !descriptor_bytes(&d, levels) || gw_current(&dev, &ctx))
		return driver_create(q); // no memory at creation, or the driver's own answer to a bad call
	uint64_t bytes = requirement(&d, levels, q->shape == MIPMAPPED, dev);
	struct array *a = malloc(sizeof *a);
	gw_memory_lock();
	if (!a || !gw_charge(dev, bytes, false)) {
		gw_memory_unlock();
		free(a);
		return CUDA_ERROR_OUT_OF_MEMORY;
	}
	gw_memory_unlock();
	CUresult e = driver_create(q);
	gw_memory_lock();
	if (e) {
		gw_uncharge(dev, bytes, false);
		free(a);
	} else {
		*a = (struct array){*q->out, bytes, dev, ctx, arrays};
		arrays = a;
		gw_remember_context(ctx);
	}
	gw_memory_unlock();
	return e;
}

static size_t wanted(const struct request *q) // for a wait for room: the descriptor's bytes
{
	CUDA_ARRAY3D_DESCRIPTOR d;
	return describe(q, &d) ? descriptor_bytes(&d, q->shape == MIPMAPPED ? q->levels : 1) : 0;
}

API CUresult cuArrayCreate_v2(CUarray *out, const CUDA_ARRAY_DESCRIPTOR *d)
{
	struct request q = {TWO_D, out, d, NULL, 1};
	size_t wanted_size = wanted(&q);
	GATED(create(&q));
}

API CUresult cuArray3DCreate_v2(CUarray *out, const CUDA_ARRAY3D_DESCRIPTOR *d)
{
	struct request q = {THREE_D, out, NULL, d, 1};
	size_t wanted_size = wanted(&q);
	GATED(create(&q));
}

API CUresult cuMipmappedArrayCreate(CUmipmappedArray *out, const CUDA_ARRAY3D_DESCRIPTOR *d, unsigned levels)
{
	struct request q = {MIPMAPPED, out, NULL, d, levels};
	size_t wanted_size = wanted(&q);
	GATED(create(&q));
}

static void forget(struct array **p) // lock held
{
	struct array *a = *p;
	*p = a->next;
	gw_uncharge(a->dev, a->bytes, false);
	free(a);
}

static CUresult destroy(void *handle, CUresult (*driver_destroy)(void *))
{
	if (!gw_ensure_driver(NULL))
		return CUDA_ERROR_NOT_INITIALIZED;
	if (!driver_destroy)
		return CUDA_ERROR_NOT_FOUND;
	CUresult e = driver_destroy(handle);
	gw_memory_lock();
	struct array **p = &arrays;
	while (!e && *p && (*p)->handle != handle)
		p = &(*p)->next;
	if (!e && *p)
		forget(p);
	gw_memory_unlock();
	return e;
}

API CUresult cuArrayDestroy(CUarray a) { return destroy(a, real_cuArrayDestroy); }
API CUresult cuMipmappedArrayDestroy(CUmipmappedArray a) { return destroy(a, real_cuMipmappedArrayDestroy); }

HIDDEN void gw_arrays_forget_context(CUcontext ctx)
{
	for (struct array **p = &arrays; *p;)
		if ((*p)->ctx == ctx)
			forget(p);
		else
			p = &(*p)->next;
}
