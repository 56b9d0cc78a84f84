// What the process is told about memory: free and total bytes within its quota, the address range of an
// allocation the interposer made (the driver knows only the region or chunk behind it) or opened from another
// process, and CUDA IPC handles of memory that can move (ipc.c serves them).
#include "interposer.h"

API CUresult cuMemGetInfo_v2(size_t *free_bytes, size_t *total)
{
	if (!gw_ensure_driver(NULL))
		return CUDA_ERROR_NOT_INITIALIZED;
	CUresult e = real_cuMemGetInfo_v2(free_bytes, total);
	CUdevice dev;
	if (e || real_cuCtxGetDevice(&dev))
		return e;
	struct gw_device *d = gw_dev_stats(dev);
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
	uint64_t quota = e ? 0 : atomic_load(&gw_dev_stats(dev)->quota);
	if (quota && *bytes > quota)
		*bytes = quota;
	return e;
}

HIDDEN struct gw_alloc *gw_alloc_containing(CUdeviceptr ptr)
{
	for (struct gw_region *r = gw_regions(); r; r = r->next) {
		if (ptr < r->va || ptr >= r->va + r->size)
			continue;
		CUdeviceptr base = r->va;
		if (r->cls >= 0)
			base += (ptr - r->va) >> (GW_SMALL_MIN_SHIFT + r->cls) << (GW_SMALL_MIN_SHIFT + r->cls);
		struct gw_alloc *a = gw_table_find(base);
		return a && ptr < a->ptr + a->size ? a : NULL;
	}
	return NULL;
}

API CUresult cuMemGetAddressRange_v2(CUdeviceptr *base, size_t *size, CUdeviceptr ptr)
{
	if (!gw_ensure_driver(NULL))
		return CUDA_ERROR_NOT_INITIALIZED;
	gw_memory_lock();
	struct gw_alloc *a = gw_alloc_containing(ptr);
	CUdeviceptr b = a ? a->ptr : 0;
	size_t n = a ? a->size : 0;
	gw_memory_unlock();
	if (!a && !gw_ipc_range(ptr, &b, &n))
		return real_cuMemGetAddressRange_v2(base, size, ptr);
	if (base)
		*base = b;
	if (size)
		*size = n;
	return CUDA_SUCCESS;
}

API CUresult cuIpcGetMemHandle(void *handle, CUdeviceptr ptr)
{
	if (!gw_ensure_driver(NULL))
		return CUDA_ERROR_NOT_INITIALIZED;
	gw_memory_lock();
	struct gw_alloc *a = handle ? gw_alloc_containing(ptr) : NULL;
	CUresult e = a ? gw_ipc_export(a, handle) : CUDA_SUCCESS;
	gw_memory_unlock();
	return a ? e : real_cuIpcGetMemHandle(handle, ptr);
}
