// The program's own VMM memory (cuMemCreate, cuMemMap): counted against the quota from creation until the
// handle is released and no mapping of it remains, in either order; never moved.
#include "interposer.h"

#include <stdlib.h>

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

static struct own_handle *own_handles;
static struct own_map *own_maps;

HIDDEN void gw_own_vmm_reset(void) // in a forked child: the parent's are not ours
{
	own_handles = NULL;
	own_maps = NULL;
}

static void own_put(struct own_handle *h)
{
	if (!h->released || h->maps)
		return;
	if (h->counted)
		gw_uncharge(h->dev, h->size, false);
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
	if (counted && (!o || !gw_charge(dev, size, false))) {
		gw_memory_unlock();
		free(o);
		return CUDA_ERROR_OUT_OF_MEMORY;
	}
	gw_memory_unlock();
	CUresult e = real_cuMemCreate(handle, size, prop, flags);
	gw_memory_lock();
	if (counted && e) {
		gw_uncharge(dev, size, false);
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
