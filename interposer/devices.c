// Devices and contexts: what each device supports (VMM, its granularity, the peers that may reach its
// memory), the calling thread's context, the contexts that own memory, and contexts going away (destroyed,
// or a primary context reset), which take their memory with them.
#include "interposer.h"

#include <stdlib.h>

#define DEFAULT_GRANULARITY (2u << 20)

struct context {
	CUcontext ctx;
	struct context *next;
};

static struct gw_device_info devices[GW_MAX_DEVICES];
static struct context *contexts;

HIDDEN void gw_contexts_reset(void) { contexts = NULL; } // in a forked child; what devices support holds

HIDDEN struct gw_device_info *gw_device_info_of(CUdevice dev)
{
	struct gw_device_info *d = &devices[dev >= 0 && dev < GW_MAX_DEVICES ? dev : GW_MAX_DEVICES - 1];
	if (d->known)
		return d;
	int vmm = 0, count = 0;
	d->vmm = gw_cfg.swap && dev < GW_MAX_DEVICES && real_cuMemCreate && real_cuMemAddressReserve &&
		 !real_cuDeviceGetAttribute(&vmm, CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, dev) && vmm;
	int fd = 0;
	d->fd_handles = d->vmm && !real_cuDeviceGetAttribute(&fd, CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED,
							      dev) && fd;
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

HIDDEN CUresult gw_current(CUdevice *dev, CUcontext *ctx)
{
	CUresult r = real_cuCtxGetCurrent(ctx);
	if (!r && !*ctx)
		r = 201; // CUDA_ERROR_INVALID_CONTEXT
	return r ? r : real_cuCtxGetDevice(dev);
}

// ---- the contexts that own memory

HIDDEN void gw_remember_context(CUcontext ctx)
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

HIDDEN CUresult gw_sync_context(CUcontext ctx)
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
		CUresult r = gw_sync_context(c->ctx);
		first = first ? first : r;
	}
	return first;
}

// ---- contexts going away take their memory with them

static void drop_context_memory(CUcontext ctx) // lock held
{
	gw_free_context_allocs(ctx);
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
