// Regions: address ranges reserved with the VMM API whose physical memory, in pieces of at most
// GW_PIECE_MAX, can be taken away (swapped out) and given back at the same addresses. A region is one large
// allocation, or a chunk of small ones (suballoc.c). Pieces are made exportable (POSIX file descriptors) where
// the device allows it, so that CUDA IPC can share them (ipc.c); a region another process imported stays put.
#include "interposer.h"

#include <stdlib.h>

static struct gw_region *regions;

HIDDEN struct gw_region *gw_regions(void) { return regions; }
HIDDEN void gw_regions_reset(void) { regions = NULL; } // in a forked child: the parent's are not ours

HIDDEN bool gw_region_swappable(const struct gw_region *r) { return !r->imports; }

HIDDEN void gw_region_imported(struct gw_region *r, bool more)
{
	if (more ? r->imports++ == 0 : --r->imports == 0)
		gw_recount(r->dev, r->size, !more);
}

// Physical memory for one piece: exportable where the device allows it (a driver that refuses the handle
// type for this memory is not asked again).
static CUresult create(struct gw_device_info *d, struct gw_region *r, struct gw_piece *p, CUmemGenericAllocationHandle *h)
{
	CUmemAllocationProp prop = {.type = CU_MEM_ALLOCATION_TYPE_PINNED, .location = {CU_MEM_LOCATION_TYPE_DEVICE, r->dev}};
	CUresult e = CUDA_ERROR_NOT_SUPPORTED;
	if (d->fd_handles) {
		prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
		if ((e = real_cuMemCreate(h, p->size, &prop, 0)) == CUDA_ERROR_NOT_SUPPORTED || e == CUDA_ERROR_INVALID_VALUE)
			d->fd_handles = false;
		prop.requestedHandleTypes = 0;
	}
	p->exportable = !e;
	return e && !d->fd_handles ? real_cuMemCreate(h, p->size, &prop, 0) : e;
}

HIDDEN CUresult gw_piece_map(struct gw_region *r, struct gw_piece *p)
{
	struct gw_device_info *d = gw_device_info_of(r->dev);
	CUmemGenericAllocationHandle h;
	CUresult e = create(d, r, p, &h);
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

HIDDEN CUresult gw_region_new(CUdevice dev, CUcontext ctx, size_t size, int cls, struct gw_region **out)
{
	struct gw_region *r = calloc(1, sizeof *r);
	if (!r)
		return CUDA_ERROR_OUT_OF_MEMORY;
	*r = (struct gw_region){.size = size, .ctx = ctx, .dev = dev, .cls = cls};
	r->npieces = (uint32_t)((size + GW_PIECE_MAX - 1) / GW_PIECE_MAX);
	r->pieces = calloc(r->npieces, sizeof *r->pieces);
	if (cls >= 0) {
		r->nslots = (uint32_t)(size >> (GW_SMALL_MIN_SHIFT + cls));
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
	gw_remember_context(ctx);
	*out = r;
	return CUDA_SUCCESS;
}

HIDDEN void gw_region_free(struct gw_region *r)
{
	gw_ipc_region_gone(r);
	gw_physical_unmap(r);
	for (uint32_t i = 0; i < r->npieces; i++)
		gw_swap_forget(&r->pieces[i], r->dev);
	real_cuMemAddressFree(r->va, r->size);
	for (struct gw_region **p = &regions; *p; p = &(*p)->next)
		if (*p == r) {
			*p = r->next;
			break;
		}
	gw_chunk_forget(r);
	region_release(r);
}
