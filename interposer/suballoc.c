// Small allocations (up to GW_SMALL_MAX): slots of one size class in chunks, regions of one granule each,
// so that they share the granule's bytes and move like any region. One empty chunk per class, device and
// context stays for reuse; the others go when they empty, or when the quota needs their bytes.
#include "interposer.h"

#include <string.h>

#define CLASSES 13 // 256 B .. 1 MiB

static struct gw_region *hint[GW_MAX_DEVICES][CLASSES]; // per device and class: a chunk that had room

HIDDEN void gw_suballoc_reset(void) { memset(hint, 0, sizeof hint); }

HIDDEN void gw_chunk_forget(struct gw_region *r)
{
	for (int c = 0; c < CLASSES; c++)
		for (int d = 0; d < GW_MAX_DEVICES; d++)
			if (hint[d][c] == r)
				hint[d][c] = NULL;
}

static int size_class(size_t size)
{
	int cls = 0;
	while (((size_t)1 << (GW_SMALL_MIN_SHIFT + cls)) < size)
		cls++;
	return cls;
}

static struct gw_region *chunk_with_room(CUdevice dev, CUcontext ctx, int cls)
{
	struct gw_region **h = &hint[dev >= 0 && dev < GW_MAX_DEVICES ? dev : GW_MAX_DEVICES - 1][cls];
	if (*h && (*h)->ctx == ctx && (*h)->used_slots < (*h)->nslots)
		return *h;
	for (struct gw_region *r = gw_regions(); r; r = r->next)
		if (r->cls == cls && r->dev == dev && r->ctx == ctx && r->used_slots < r->nslots)
			return *h = r;
	return NULL;
}

HIDDEN CUresult gw_alloc_small(CUdeviceptr *dptr, size_t size, CUdevice dev, CUcontext ctx)
{
	int cls = size_class(size);
	struct gw_region *r = chunk_with_room(dev, ctx, cls);
	size_t chunk = gw_device_info_of(dev)->granularity;
	if (!r) {
		if (!gw_charge(dev, chunk, true))
			return CUDA_ERROR_OUT_OF_MEMORY;
		CUresult e = gw_region_new(dev, ctx, chunk, cls, &r);
		if (e) {
			gw_uncharge(dev, chunk, true);
			return e;
		}
	}
	uint32_t slot = 0;
	while (r->bitmap[slot / 64] & (1ull << (slot % 64)))
		slot++;
	CUdeviceptr p = r->va + ((CUdeviceptr)slot << (GW_SMALL_MIN_SHIFT + cls));
	struct gw_alloc *a = gw_table_add(p, size, A_SWAPPABLE, dev, ctx);
	if (!a) {
		if (!r->used_slots) {
			gw_region_free(r);
			gw_uncharge(dev, chunk, true);
		}
		return CUDA_ERROR_OUT_OF_MEMORY;
	}
	r->bitmap[slot / 64] |= 1ull << (slot % 64);
	r->used_slots++;
	a->region = r;
	*dptr = p;
	return CUDA_SUCCESS;
}

static bool another_empty_chunk(const struct gw_region *chunk)
{
	for (struct gw_region *r = gw_regions(); r; r = r->next)
		if (r != chunk && r->cls == chunk->cls && r->dev == chunk->dev && r->ctx == chunk->ctx && !r->used_slots)
			return true;
	return false;
}

HIDDEN void gw_release_empty_chunks(void)
{
	for (struct gw_region *r = gw_regions(), *next; r; r = next) {
		next = r->next;
		if (r->cls >= 0 && !r->used_slots) {
			gw_uncharge(r->dev, r->size, gw_region_swappable(r));
			gw_region_free(r);
		}
	}
}

// The slot of `ptr` in `chunk` is free again (`dev`: the allocation's device).
HIDDEN void gw_free_small(struct gw_region *chunk, CUdeviceptr ptr, CUdevice dev)
{
	struct gw_region *r = chunk;
	uint32_t slot = (uint32_t)((ptr - r->va) >> (GW_SMALL_MIN_SHIFT + r->cls));
	r->bitmap[slot / 64] &= ~(1ull << (slot % 64));
	// One empty chunk per class stays, so that a program allocating and freeing one small buffer in a
	// loop does not create and release a chunk every time.
	if (--r->used_slots == 0 && another_empty_chunk(r)) {
		gw_uncharge(dev, r->size, gw_region_swappable(r));
		gw_region_free(r);
	}
}
