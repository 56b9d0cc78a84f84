// Test double of the CUDA driver library (libcuda.so.1) with host memory behind it.
// Every cu* entry point is a distinct, non-inlined exported function and never calls
// another export, so a uprobe on one symbol fires exactly once per API call.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <elf.h>
#include <fcntl.h>
#include <link.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#pragma GCC diagnostic ignored "-Wunused-parameter" // stubs ignore streams, flags, ...

typedef int CUresult;
typedef unsigned long long CUdeviceptr;
typedef int CUdevice;
typedef struct CUctx_st *CUcontext;
typedef struct CUstream_st *CUstream;
typedef struct CUfunc_st *CUfunction;
typedef struct CUgraphExec_st *CUgraphExec;
typedef struct CUmemPoolHandle_st *CUmemoryPool;
typedef struct CUevent_st *CUevent;
typedef unsigned long long CUmemGenericAllocationHandle;
typedef struct { char bytes[16]; } CUuuid;
typedef struct { int type; int id; } CUmemLocation;
typedef struct {
	int type;
	int requestedHandleTypes;
	CUmemLocation location;
	void *win32HandleMetaData;
	struct {
		unsigned char compressionType, gpuDirectRDMACapable;
		unsigned short usage;
		unsigned char reserved[4];
	} allocFlags;
} CUmemAllocationProp;
typedef struct { CUmemLocation location; int flags; } CUmemAccessDesc;
typedef struct {
	unsigned gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY, blockDimZ, sharedMemBytes;
	CUstream hStream;
	void *attrs;
	unsigned numAttrs;
} CUlaunchConfig;
typedef struct {
	size_t srcXInBytes, srcY;
	int srcMemoryType; // 1 host, 2 device, 3 array, 4 unified
	const void *srcHost;
	CUdeviceptr srcDevice;
	void *srcArray;
	size_t srcPitch, dstXInBytes, dstY;
	int dstMemoryType;
	void *dstHost;
	CUdeviceptr dstDevice;
	void *dstArray;
	size_t dstPitch, WidthInBytes, Height;
} CUDA_MEMCPY2D;

enum { OK = 0, E_VALUE = 1, E_OOM = 2, E_NOINIT = 3, E_DEVICE = 101, E_CONTEXT = 201,
       E_HANDLE = 400, E_NOTFOUND = 500, E_REGISTERED = 712, E_NOT_REGISTERED = 713, E_UNKNOWN = 999 };

#define API __attribute__((visibility("default"), noipa))
#define TRY(expr) do { CUresult try_ = (expr); if (try_) return try_; } while (0)
#define MAX_DEVICES 64
#define STACK_DEPTH 16
#define GRAN (2ULL << 20) // VMM granularity
#define RW (PROT_READ | PROT_WRITE)
#define ANON (MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE)

// Launches (kernels, graphs, host functions), and all work submitted (launches, copies, memsets, prefetches).
__attribute__((visibility("default"))) _Atomic unsigned long long fakecuda_launch_count, fakecuda_work_count;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t config_once = PTHREAD_ONCE_INIT;
static atomic_bool inited;
static bool config_failed, no_vmm;
static int ndev;
static size_t capacity;
// Device bytes in use (cuMemAlloc* and cuMemCreate): here, or with FAKECUDA_SHARED_STATE=FILE in that file
// (MAP_SHARED), so that several processes share one emulated GPU. Changed only by take() and give().
static _Atomic size_t local_used[MAX_DEVICES], *used = local_used;
// Pinned host memory (cuMemHostAlloc, cuMemAllocHost_v2, cuMemHostRegister_v2): with FAKECUDA_PIN_LIMIT=BYTES,
// at most that much at once; more is refused with CUDA_ERROR_OUT_OF_MEMORY. Lock held for both.
static bool pin_limited;
static size_t pin_limit, pinned;
// FAKECUDA_FAIL_DTOH_ASYNC=1: every cuMemcpyDtoHAsync_v2 fails with CUDA_ERROR_UNKNOWN (a copy failing).
static bool fail_dtoh_async;
#define MAX_REGISTERED 256
static struct { uintptr_t p; size_t size; } registered[MAX_REGISTERED]; // p 0: a free entry

static unsigned long long env_size(const char *name, unsigned long long dflt)
{
	static const char units[] = "KMG";
	const char *s = getenv(name), *u;
	char *end;
	if (!s || !*s)
		return dflt;
	unsigned long long v = strtoull(s, &end, 10);
	if (*end && (u = strchr(units, *end)))
		v <<= 10 * (u - units + 1);
	return v;
}

// ---- devices and contexts ----

struct CUctx_st {
	CUdevice dev;
	bool alive;
	struct CUctx_st *next;
};
static struct CUctx_st primary[MAX_DEVICES];
static int primary_refs[MAX_DEVICES];
static struct CUctx_st *created; // cuCtxCreate contexts; never freed so stale handles stay checkable
static _Thread_local CUcontext stack[STACK_DEPTH];
static _Thread_local int depth;

static void configure(void)
{
	unsigned long long n = env_size("FAKECUDA_DEVICES", 2);
	const char *state = getenv("FAKECUDA_SHARED_STATE"), *nv = getenv("FAKECUDA_NO_VMM");
	ndev = n > MAX_DEVICES ? MAX_DEVICES : (int)n;
	capacity = env_size("FAKECUDA_MEM_BYTES", 8ULL << 30);
	no_vmm = nv && !strcmp(nv, "1");
	const char *pl = getenv("FAKECUDA_PIN_LIMIT");
	pin_limited = pl && *pl;
	pin_limit = env_size("FAKECUDA_PIN_LIMIT", 0);
	fail_dtoh_async = (pl = getenv("FAKECUDA_FAIL_DTOH_ASYNC")) && !strcmp(pl, "1");
	for (int i = 0; i < ndev; i++)
		primary[i] = (struct CUctx_st){.dev = i, .alive = true};
	if (state && *state) {
		struct stat st;
		void *p = MAP_FAILED;
		int fd = open(state, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
		if (fd >= 0 && !fstat(fd, &st) &&
		    (st.st_size >= (off_t)sizeof local_used || !ftruncate(fd, sizeof local_used)))
			p = mmap(NULL, sizeof local_used, RW, MAP_SHARED, fd, 0);
		if (fd >= 0)
			close(fd);
		if (p == MAP_FAILED) {
			fprintf(stderr, "fakecuda: cannot map FAKECUDA_SHARED_STATE %s\n", state);
			config_failed = true;
		} else {
			used = p;
		}
	}
}

// Takes size bytes of device dev's capacity, or returns false when they are not free.
static bool take(CUdevice dev, size_t size)
{
	size_t u = atomic_load(&used[dev]);
	do
		if (u > capacity || size > capacity - u)
			return false;
	while (!atomic_compare_exchange_weak(&used[dev], &u, u + size));
	return true;
}

static void give(CUdevice dev, size_t size) { atomic_fetch_sub(&used[dev], size); }

// Takes size bytes of pinned host memory, or returns false when FAKECUDA_PIN_LIMIT would be passed. Lock held.
static bool pin(size_t size)
{
	if (pin_limited && (pinned > pin_limit || size > pin_limit - pinned))
		return false;
	pinned += size;
	return true;
}

static CUresult check_dev(CUdevice dev)
{
	return !inited ? E_NOINIT : dev < 0 || dev >= ndev ? E_DEVICE : OK;
}

static bool is_primary(CUcontext c)
{
	for (int i = 0; i < ndev; i++)
		if (c == &primary[i])
			return true;
	return false;
}

static bool ctx_valid(CUcontext c) // lock held
{
	if (is_primary(c))
		return true;
	for (struct CUctx_st *p = created; p; p = p->next)
		if (p == c)
			return p->alive;
	return false;
}

static CUresult check_ctx(CUcontext c)
{
	if (!inited)
		return E_NOINIT;
	pthread_mutex_lock(&lock);
	bool ok = c && ctx_valid(c);
	pthread_mutex_unlock(&lock);
	return ok ? OK : E_CONTEXT;
}

// Device of the calling thread's current context.
static CUresult current(CUdevice *dev)
{
	CUcontext c = depth ? stack[depth - 1] : NULL;
	TRY(check_ctx(c));
	if (dev)
		*dev = c->dev;
	return OK;
}

static CUresult push(CUcontext c)
{
	if (depth == STACK_DEPTH)
		return E_VALUE;
	stack[depth++] = c;
	return OK;
}

API CUresult cuInit(unsigned flags)
{
	if (flags)
		return E_VALUE;
	pthread_once(&config_once, configure);
	if (config_failed)
		return E_UNKNOWN;
	inited = true;
	return OK;
}

API CUresult cuDriverGetVersion(int *version)
{
	if (!version)
		return E_VALUE;
	*version = 13000;
	return OK;
}

API CUresult cuDeviceGetCount(int *count)
{
	if (!inited)
		return E_NOINIT;
	if (!count)
		return E_VALUE;
	*count = ndev;
	return OK;
}

API CUresult cuDeviceGet(CUdevice *dev, int ordinal)
{
	TRY(check_dev(ordinal));
	if (!dev)
		return E_VALUE;
	*dev = ordinal;
	return OK;
}

API CUresult cuDeviceGetName(char *name, int len, CUdevice dev)
{
	TRY(check_dev(dev));
	if (!name || len <= 0)
		return E_VALUE;
	snprintf(name, len, "FakeCUDA Device %d", dev);
	return OK;
}

static CUresult get_uuid(CUuuid *uuid, CUdevice dev)
{
	char s[24]; // 16 bytes used: dev < MAX_DEVICES
	TRY(check_dev(dev));
	if (!uuid)
		return E_VALUE;
	snprintf(s, sizeof s, "fakecuda-dev%04d", dev);
	memcpy(uuid->bytes, s, 16);
	return OK;
}

API CUresult cuDeviceGetUuid(CUuuid *uuid, CUdevice dev) { return get_uuid(uuid, dev); }
API CUresult cuDeviceGetUuid_v2(CUuuid *uuid, CUdevice dev) { return get_uuid(uuid, dev); }

API CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice dev)
{
	TRY(check_dev(dev));
	if (!bytes)
		return E_VALUE;
	*bytes = capacity;
	return OK;
}

API CUresult cuDeviceGetAttribute(int *value, int attrib, CUdevice dev)
{
	TRY(check_dev(dev));
	if (!value)
		return E_VALUE;
	*value = attrib == 102 /* VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED */ ? !no_vmm : 0;
	return OK;
}

API CUresult cuDeviceCanAccessPeer(int *can, CUdevice dev, CUdevice peer)
{
	TRY(check_dev(dev));
	TRY(check_dev(peer));
	if (!can)
		return E_VALUE;
	*can = dev != peer;
	return OK;
}

static const struct { CUresult code; const char *name, *desc; } errors[] = {
	{OK, "CUDA_SUCCESS", "no error"},
	{E_VALUE, "CUDA_ERROR_INVALID_VALUE", "invalid argument"},
	{E_OOM, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory"},
	{E_NOINIT, "CUDA_ERROR_NOT_INITIALIZED", "initialization error"},
	{E_DEVICE, "CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal"},
	{E_CONTEXT, "CUDA_ERROR_INVALID_CONTEXT", "invalid device context"},
	{E_HANDLE, "CUDA_ERROR_INVALID_HANDLE", "invalid resource handle"},
	{E_NOTFOUND, "CUDA_ERROR_NOT_FOUND", "named symbol not found"},
	{E_REGISTERED, "CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED",
	 "part or all of the requested memory range is already mapped"},
	{E_NOT_REGISTERED, "CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED",
	 "pointer does not correspond to a registered memory region"},
};

static CUresult error_text(CUresult e, const char **s, bool name)
{
	if (!s)
		return E_VALUE;
	for (size_t i = 0; i < sizeof errors / sizeof *errors; i++)
		if (errors[i].code == e) {
			*s = name ? errors[i].name : errors[i].desc;
			return OK;
		}
	*s = NULL;
	return E_VALUE;
}

API CUresult cuGetErrorName(CUresult e, const char **s) { return error_text(e, s, true); }
API CUresult cuGetErrorString(CUresult e, const char **s) { return error_text(e, s, false); }

API CUresult cuDevicePrimaryCtxRetain(CUcontext *ctx, CUdevice dev)
{
	TRY(check_dev(dev));
	if (!ctx)
		return E_VALUE;
	pthread_mutex_lock(&lock);
	primary_refs[dev]++;
	pthread_mutex_unlock(&lock);
	*ctx = &primary[dev];
	return OK;
}

API CUresult cuDevicePrimaryCtxRelease_v2(CUdevice dev)
{
	CUresult r = check_dev(dev);
	if (r)
		return r;
	pthread_mutex_lock(&lock);
	if (primary_refs[dev])
		primary_refs[dev]--;
	else
		r = E_CONTEXT;
	pthread_mutex_unlock(&lock);
	return r;
}

API CUresult cuCtxCreate_v2(CUcontext *ctx, unsigned flags, CUdevice dev)
{
	TRY(check_dev(dev));
	if (!ctx || depth == STACK_DEPTH)
		return E_VALUE;
	struct CUctx_st *c = malloc(sizeof *c);
	if (!c)
		return E_OOM;
	pthread_mutex_lock(&lock);
	*c = (struct CUctx_st){.dev = dev, .alive = true, .next = created};
	created = c;
	pthread_mutex_unlock(&lock);
	*ctx = c;
	return push(c);
}

API CUresult cuCtxDestroy_v2(CUcontext ctx)
{
	if (!inited)
		return E_NOINIT;
	pthread_mutex_lock(&lock);
	bool ok = ctx && !is_primary(ctx) && ctx_valid(ctx);
	if (ok)
		ctx->alive = false;
	pthread_mutex_unlock(&lock);
	if (ok && depth && stack[depth - 1] == ctx)
		depth--;
	return ok ? OK : E_CONTEXT;
}

API CUresult cuCtxSetCurrent(CUcontext ctx)
{
	TRY(ctx ? check_ctx(ctx) : inited ? OK : E_NOINIT);
	if (!ctx) {
		if (depth)
			depth--;
	} else if (!depth)
		stack[depth++] = ctx;
	else
		stack[depth - 1] = ctx;
	return OK;
}

API CUresult cuCtxGetCurrent(CUcontext *ctx)
{
	if (!inited)
		return E_NOINIT;
	if (!ctx)
		return E_VALUE;
	*ctx = depth ? stack[depth - 1] : NULL;
	return OK;
}

API CUresult cuCtxPushCurrent_v2(CUcontext ctx)
{
	TRY(check_ctx(ctx));
	return push(ctx);
}

API CUresult cuCtxPopCurrent_v2(CUcontext *ctx)
{
	if (!inited)
		return E_NOINIT;
	if (!depth)
		return E_CONTEXT;
	depth--;
	if (ctx)
		*ctx = stack[depth];
	return OK;
}

API CUresult cuCtxGetDevice(CUdevice *dev)
{
	TRY(current(dev));
	return dev ? OK : E_VALUE;
}

API CUresult cuCtxSynchronize(void) { return current(NULL); }

// ---- ordinary allocations ----

enum kind { K_DEVICE, K_MANAGED, K_HOST };
struct alloc {
	CUdeviceptr ptr;
	size_t size;
	CUdevice dev;
	enum kind kind;
	struct alloc *next;
};
#define BUCKETS 256
static struct alloc *allocs[BUCKETS];

static struct alloc **bucket(CUdeviceptr p) { return &allocs[(p >> 12) % BUCKETS]; }

static CUresult mem_alloc(CUdeviceptr *out, size_t size, enum kind kind)
{
	CUdevice dev;
	CUresult r = OK;
	TRY(current(&dev));
	if (!out || !size)
		return E_VALUE;
	struct alloc *a = malloc(sizeof *a);
	if (!a)
		return E_OOM;
	pthread_mutex_lock(&lock);
	void *p = MAP_FAILED;
	bool took = kind == K_DEVICE ? take(dev, size) : kind == K_HOST ? pin(size) : true;
	if (took)
		p = mmap(NULL, size, RW, ANON, -1, 0);
	if (p == MAP_FAILED) {
		r = E_OOM;
		free(a);
		if (took && kind == K_DEVICE)
			give(dev, size);
		if (took && kind == K_HOST)
			pinned -= size;
	} else {
		*a = (struct alloc){(uintptr_t)p, size, dev, kind, *bucket((uintptr_t)p)};
		*bucket(a->ptr) = a;
		*out = a->ptr;
	}
	pthread_mutex_unlock(&lock);
	return r;
}

static CUresult mem_free(CUdeviceptr ptr, bool host)
{
	CUresult r = OK;
	TRY(current(NULL));
	pthread_mutex_lock(&lock);
	struct alloc **pp = bucket(ptr), *a;
	while (*pp && (*pp)->ptr != ptr)
		pp = &(*pp)->next;
	if (!(a = *pp) || (a->kind == K_HOST) != host) {
		r = E_VALUE;
	} else {
		*pp = a->next;
		if (a->kind == K_DEVICE)
			give(a->dev, a->size);
		if (a->kind == K_HOST)
			pinned -= a->size;
		munmap((void *)(uintptr_t)a->ptr, a->size);
		free(a);
	}
	pthread_mutex_unlock(&lock);
	return r;
}

static CUresult host_alloc(void **pp, size_t size)
{
	CUdeviceptr p;
	CUresult r = pp ? mem_alloc(&p, size, K_HOST) : E_VALUE;
	if (!r)
		*pp = (void *)(uintptr_t)p;
	return r;
}

API CUresult cuMemAlloc_v2(CUdeviceptr *dptr, size_t size) { return mem_alloc(dptr, size, K_DEVICE); }

API CUresult cuMemAllocPitch_v2(CUdeviceptr *dptr, size_t *pitch, size_t width, size_t height,
				unsigned elemSize)
{
	size_t p = (width + 511) & ~(size_t)511, size;
	if (!pitch || p < width || __builtin_mul_overflow(p, height, &size))
		return E_VALUE;
	CUresult r = mem_alloc(dptr, size, K_DEVICE);
	if (!r)
		*pitch = p;
	return r;
}

API CUresult cuMemAllocManaged(CUdeviceptr *dptr, size_t size, unsigned flags)
{
	return mem_alloc(dptr, size, K_MANAGED);
}

API CUresult cuMemAllocAsync(CUdeviceptr *dptr, size_t size, CUstream s) { return mem_alloc(dptr, size, K_DEVICE); }
API CUresult cuMemAllocAsync_ptsz(CUdeviceptr *dptr, size_t size, CUstream s) { return mem_alloc(dptr, size, K_DEVICE); }

API CUresult cuMemAllocFromPoolAsync(CUdeviceptr *dptr, size_t size, CUmemoryPool pool, CUstream s)
{
	return mem_alloc(dptr, size, K_DEVICE);
}

API CUresult cuMemAllocFromPoolAsync_ptsz(CUdeviceptr *dptr, size_t size, CUmemoryPool pool, CUstream s)
{
	return mem_alloc(dptr, size, K_DEVICE);
}

API CUresult cuMemFree_v2(CUdeviceptr dptr) { return mem_free(dptr, false); }
API CUresult cuMemFreeAsync(CUdeviceptr dptr, CUstream s) { return mem_free(dptr, false); }
API CUresult cuMemFreeAsync_ptsz(CUdeviceptr dptr, CUstream s) { return mem_free(dptr, false); }
API CUresult cuMemHostAlloc(void **pp, size_t size, unsigned flags) { return host_alloc(pp, size); }
API CUresult cuMemAllocHost_v2(void **pp, size_t size) { return host_alloc(pp, size); }
API CUresult cuMemFreeHost(void *p) { return mem_free((uintptr_t)p, true); }
// Registrations are tracked by start address, as the driver tracks them.
API CUresult cuMemHostRegister_v2(void *p, size_t size, unsigned flags)
{
	if (!p || !size)
		return E_VALUE;
	CUresult r = E_OOM;
	int free_entry = -1;
	pthread_mutex_lock(&lock);
	for (int i = 0; i < MAX_REGISTERED && r != E_REGISTERED; i++)
		if (registered[i].p == (uintptr_t)p)
			r = E_REGISTERED;
		else if (!registered[i].p && free_entry < 0)
			free_entry = i;
	if (r != E_REGISTERED && free_entry >= 0 && pin(size)) {
		registered[free_entry].p = (uintptr_t)p;
		registered[free_entry].size = size;
		r = OK;
	}
	pthread_mutex_unlock(&lock);
	return r;
}

API CUresult cuMemHostUnregister(void *p)
{
	if (!p)
		return E_VALUE;
	CUresult r = E_NOT_REGISTERED;
	pthread_mutex_lock(&lock);
	for (int i = 0; i < MAX_REGISTERED && r; i++)
		if (registered[i].p == (uintptr_t)p) {
			pinned -= registered[i].size;
			registered[i].p = 0;
			registered[i].size = 0;
			r = OK;
		}
	pthread_mutex_unlock(&lock);
	return r;
}

API CUresult cuMemGetInfo_v2(size_t *free, size_t *total)
{
	CUdevice dev;
	TRY(current(&dev));
	if (!free || !total)
		return E_VALUE;
	size_t u = atomic_load(&used[dev]);
	*free = u > capacity ? 0 : capacity - u;
	*total = capacity;
	return OK;
}

// ---- virtual memory management: memfd-backed handles mapped into PROT_NONE reservations ----

struct handle {
	CUmemGenericAllocationHandle id;
	int fd;
	CUdevice dev;
	size_t size;
	int maps; // live mappings; memory stays counted until released and unmapped
	bool released;
	struct handle *next;
};
struct range { // a reservation (h == NULL) or a mapping
	CUdeviceptr va;
	size_t size;
	struct handle *h;
	int prot; // a mapping's access (cuMemSetAccess)
	struct range *next;
};
static struct handle *handles;
static struct range *reservations, *mappings;
static CUmemGenericAllocationHandle next_handle = 1;

static struct handle **handle_find(CUmemGenericAllocationHandle id)
{
	struct handle **p = &handles;
	while (*p && (*p)->id != id)
		p = &(*p)->next;
	return p;
}

static void handle_put(struct handle *h)
{
	if (!h->released || h->maps)
		return;
	give(h->dev, h->size);
	*handle_find(h->id) = h->next;
	free(h);
}

static struct range *reservation_of(CUdeviceptr va, size_t size)
{
	for (struct range *r = reservations; r; r = r->next)
		if (va >= r->va && size <= r->size && va - r->va <= r->size - size)
			return r;
	return NULL;
}

// True if [va, va+size) is non-empty, inside one reservation and cuts no mapping;
// *mapped gets the bytes of the mappings it contains.
static bool span_ok(CUdeviceptr va, size_t size, size_t *mapped)
{
	*mapped = 0;
	if (!size || !reservation_of(va, size))
		return false;
	for (struct range *m = mappings; m; m = m->next) {
		bool inside = m->va >= va && m->va + m->size <= va + size;
		if (!inside && m->va < va + size && va < m->va + m->size)
			return false;
		*mapped += inside ? m->size : 0;
	}
	return true;
}

static void drop_mappings(CUdeviceptr va, size_t size)
{
	for (struct range **p = &mappings, *m; (m = *p);) {
		if (m->va < va || m->va >= va + size) {
			p = &m->next;
			continue;
		}
		*p = m->next;
		m->h->maps--;
		handle_put(m->h);
		free(m);
	}
}

API CUresult cuMemGetAllocationGranularity(size_t *granularity, const CUmemAllocationProp *prop, int option)
{
	if (!granularity || !prop)
		return E_VALUE;
	*granularity = GRAN;
	return OK;
}

API CUresult cuMemCreate(CUmemGenericAllocationHandle *handle, size_t size, const CUmemAllocationProp *prop,
			 unsigned long long flags)
{
	if (!inited)
		return E_NOINIT;
	if (!handle || !prop || !size || size % GRAN)
		return E_VALUE;
	CUdevice dev = prop->location.id;
	CUresult r = OK;
	TRY(check_dev(dev));
	struct handle *h = malloc(sizeof *h);
	if (!h)
		return E_OOM;
	pthread_mutex_lock(&lock);
	bool took = take(dev, size);
	int fd = took ? memfd_create("fakecuda-vmm", MFD_CLOEXEC) : -1;
	if (fd < 0 || ftruncate(fd, size)) {
		r = E_OOM;
		if (fd >= 0)
			close(fd);
		if (took)
			give(dev, size);
		free(h);
	} else {
		*h = (struct handle){.id = next_handle++, .fd = fd, .dev = dev, .size = size, .next = handles};
		handles = h;
		*handle = h->id;
	}
	pthread_mutex_unlock(&lock);
	return r;
}

API CUresult cuMemRelease(CUmemGenericAllocationHandle handle)
{
	if (!inited)
		return E_NOINIT;
	CUresult r = OK;
	pthread_mutex_lock(&lock);
	struct handle *h = *handle_find(handle);
	if (!h || h->released) {
		r = E_HANDLE;
	} else {
		close(h->fd);
		h->released = true;
		handle_put(h);
	}
	pthread_mutex_unlock(&lock);
	return r;
}

API CUresult cuMemAddressReserve(CUdeviceptr *ptr, size_t size, size_t alignment, CUdeviceptr addr,
				 unsigned long long flags)
{
	if (!inited)
		return E_NOINIT;
	size_t align = alignment > GRAN ? alignment : GRAN;
	if (!ptr || !size || size % GRAN || alignment & (alignment - 1) || size + align < size)
		return E_VALUE;
	struct range *r = malloc(sizeof *r);
	char *base = r ? mmap((void *)(uintptr_t)addr, size + align, PROT_NONE, ANON, -1, 0) : MAP_FAILED;
	if (base == MAP_FAILED) {
		free(r);
		return E_OOM;
	}
	// Over-reserved by align bytes: trim the head and tail around the aligned range.
	char *va = (char *)(((uintptr_t)base + align - 1) & ~(uintptr_t)(align - 1));
	if (va > base)
		munmap(base, va - base);
	munmap(va + size, base + align - va);
	pthread_mutex_lock(&lock);
	*r = (struct range){.va = (uintptr_t)va, .size = size, .next = reservations};
	reservations = r;
	pthread_mutex_unlock(&lock);
	*ptr = r->va;
	return OK;
}

API CUresult cuMemAddressFree(CUdeviceptr ptr, size_t size)
{
	if (!inited)
		return E_NOINIT;
	CUresult r = E_VALUE;
	pthread_mutex_lock(&lock);
	for (struct range **p = &reservations, *res; (res = *p); p = &res->next)
		if (res->va == ptr && res->size == size) {
			drop_mappings(ptr, size);
			munmap((void *)(uintptr_t)ptr, size);
			*p = res->next;
			free(res);
			r = OK;
			break;
		}
	pthread_mutex_unlock(&lock);
	return r;
}

API CUresult cuMemMap(CUdeviceptr ptr, size_t size, size_t offset, CUmemGenericAllocationHandle handle,
		      unsigned long long flags)
{
	if (!inited)
		return E_NOINIT;
	CUresult r = OK;
	size_t mapped;
	struct range *m = NULL;
	pthread_mutex_lock(&lock);
	struct handle *h = *handle_find(handle);
	if (!h || h->released)
		r = E_HANDLE;
	else if (ptr % GRAN || size % GRAN || offset % GRAN || offset > h->size || size > h->size - offset ||
		 !span_ok(ptr, size, &mapped) || mapped)
		r = E_VALUE;
	else if (!(m = malloc(sizeof *m)) ||
		 mmap((void *)(uintptr_t)ptr, size, PROT_NONE, MAP_SHARED | MAP_FIXED, h->fd, offset) == MAP_FAILED)
		r = E_OOM;
	if (r) {
		free(m);
	} else {
		*m = (struct range){.va = ptr, .size = size, .h = h, .next = mappings};
		mappings = m;
		h->maps++;
	}
	pthread_mutex_unlock(&lock);
	return r;
}

API CUresult cuMemSetAccess(CUdeviceptr ptr, size_t size, const CUmemAccessDesc *desc, size_t count)
{
	if (!inited)
		return E_NOINIT;
	if (!desc || !count)
		return E_VALUE;
	int prot = PROT_NONE;
	for (size_t i = 0; i < count; i++) {
		if (check_dev(desc[i].location.id))
			return E_DEVICE;
		prot |= desc[i].flags == 3 ? RW : desc[i].flags == 1 ? PROT_READ : PROT_NONE;
	}
	size_t mapped;
	pthread_mutex_lock(&lock);
	bool ok = span_ok(ptr, size, &mapped) && mapped == size && !mprotect((void *)(uintptr_t)ptr, size, prot);
	for (struct range *m = mappings; ok && m; m = m->next)
		if (m->va >= ptr && m->va + m->size <= ptr + size)
			m->prot = prot;
	pthread_mutex_unlock(&lock);
	return ok ? OK : E_VALUE;
}

API CUresult cuMemUnmap(CUdeviceptr ptr, size_t size)
{
	if (!inited)
		return E_NOINIT;
	CUresult r = OK;
	size_t mapped;
	pthread_mutex_lock(&lock);
	if (!span_ok(ptr, size, &mapped) || !mapped)
		r = E_VALUE;
	else if (mmap((void *)(uintptr_t)ptr, size, PROT_NONE, ANON | MAP_FIXED, -1, 0) == MAP_FAILED)
		r = E_OOM;
	else
		drop_mappings(ptr, size);
	pthread_mutex_unlock(&lock);
	return r;
}

// True unless [p, p+n) touches reserved address space that is not mapped with access prot (the real
// driver answers CUDA_ERROR_INVALID_VALUE there: unmapped, or swapped out). Lock held.
static bool accessible(CUdeviceptr p, size_t n, int prot)
{
	if (!n)
		return true;
	if (p + n < p)
		return false;
	for (struct range *r = reservations; r; r = r->next) {
		CUdeviceptr a = p > r->va ? p : r->va, b = p + n < r->va + r->size ? p + n : r->va + r->size;
		size_t covered = 0;
		if (a >= b)
			continue;
		for (struct range *m = mappings; m; m = m->next) { // mappings never overlap
			CUdeviceptr ma = a > m->va ? a : m->va, mb = b < m->va + m->size ? b : m->va + m->size;
			if (ma < mb && (m->prot & prot) == prot)
				covered += mb - ma;
		}
		if (covered != b - a)
			return false;
	}
	return true;
}

// Counts one piece of work submitted to a device (a copy, set, prefetch or launch).
static CUresult work(void)
{
	TRY(current(NULL));
	fakecuda_work_count++;
	return OK;
}

static CUresult copy(CUdeviceptr dst, CUdeviceptr src, size_t n)
{
	TRY(work());
	if (n && (!dst || !src))
		return E_VALUE;
	pthread_mutex_lock(&lock);
	bool ok = accessible(dst, n, PROT_WRITE) && accessible(src, n, PROT_READ);
	if (ok && n)
		memmove((void *)(uintptr_t)dst, (void *)(uintptr_t)src, n);
	pthread_mutex_unlock(&lock);
	return ok ? OK : E_VALUE;
}

#define H(p) ((uintptr_t)(p))
API CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void *src, size_t n) { return copy(dst, H(src), n); }
API CUresult cuMemcpyDtoH_v2(void *dst, CUdeviceptr src, size_t n) { return copy(H(dst), src, n); }
API CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) { return copy(dst, src, n); }
API CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void *src, size_t n, CUstream s) { return copy(dst, H(src), n); }
API CUresult cuMemcpyDtoHAsync_v2(void *dst, CUdeviceptr src, size_t n, CUstream s)
{
	return fail_dtoh_async ? E_UNKNOWN : copy(H(dst), src, n);
}
API CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s) { return copy(dst, src, n); }
API CUresult cuMemcpyHtoDAsync_v2_ptsz(CUdeviceptr dst, const void *src, size_t n, CUstream s) { return copy(dst, H(src), n); }
API CUresult cuMemcpyDtoHAsync_v2_ptsz(void *dst, CUdeviceptr src, size_t n, CUstream s)
{
	return fail_dtoh_async ? E_UNKNOWN : copy(H(dst), src, n);
}
API CUresult cuMemcpyDtoDAsync_v2_ptsz(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s) { return copy(dst, src, n); }
API CUresult cuMemcpy(CUdeviceptr dst, CUdeviceptr src, size_t n) { return copy(dst, src, n); }
API CUresult cuMemcpyAsync(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s) { return copy(dst, src, n); }
API CUresult cuMemcpyAsync_ptsz(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s) { return copy(dst, src, n); }

// Row by row; arrays are not emulated.
API CUresult cuMemcpy2D_v2(const CUDA_MEMCPY2D *c)
{
	TRY(work());
	if (!c || c->srcMemoryType < 1 || c->srcMemoryType == 3 || c->srcMemoryType > 4 || c->dstMemoryType < 1 ||
	    c->dstMemoryType == 3 || c->dstMemoryType > 4 || c->WidthInBytes > c->srcPitch ||
	    c->WidthInBytes > c->dstPitch)
		return E_VALUE;
	if (!c->WidthInBytes || !c->Height)
		return OK;
	CUdeviceptr s = c->srcMemoryType == 1 ? H(c->srcHost) : c->srcDevice;
	CUdeviceptr d = c->dstMemoryType == 1 ? H(c->dstHost) : c->dstDevice;
	s += c->srcY * c->srcPitch + c->srcXInBytes;
	d += c->dstY * c->dstPitch + c->dstXInBytes;
	if (!s || !d)
		return E_VALUE;
	pthread_mutex_lock(&lock);
	bool ok = accessible(s, c->srcPitch * (c->Height - 1) + c->WidthInBytes, PROT_READ) &&
		  accessible(d, c->dstPitch * (c->Height - 1) + c->WidthInBytes, PROT_WRITE);
	for (size_t y = 0; ok && y < c->Height; y++)
		memmove((void *)(uintptr_t)(d + y * c->dstPitch), (void *)(uintptr_t)(s + y * c->srcPitch),
			c->WidthInBytes);
	pthread_mutex_unlock(&lock);
	return ok ? OK : E_VALUE;
}

static CUresult set(CUdeviceptr dst, unsigned value, size_t n, size_t width)
{
	TRY(work());
	if (n && (!dst || dst % width))
		return E_VALUE;
	pthread_mutex_lock(&lock);
	bool ok = n <= SIZE_MAX / width && accessible(dst, n * width, PROT_WRITE);
	if (ok && width == 1)
		memset((void *)(uintptr_t)dst, value, n);
	for (unsigned *p = (unsigned *)(uintptr_t)dst; ok && width == 4 && n; n--)
		*p++ = value;
	pthread_mutex_unlock(&lock);
	return ok ? OK : E_VALUE;
}

API CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char value, size_t n) { return set(dst, value, n, 1); }
API CUresult cuMemsetD32_v2(CUdeviceptr dst, unsigned value, size_t n) { return set(dst, value, n, 4); }
API CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char value, size_t n, CUstream s) { return set(dst, value, n, 1); }
API CUresult cuMemsetD8Async_ptsz(CUdeviceptr dst, unsigned char value, size_t n, CUstream s) { return set(dst, value, n, 1); }
API CUresult cuMemsetD32Async(CUdeviceptr dst, unsigned value, size_t n, CUstream s) { return set(dst, value, n, 4); }
API CUresult cuMemsetD32Async_ptsz(CUdeviceptr dst, unsigned value, size_t n, CUstream s) { return set(dst, value, n, 4); }

static CUresult prefetch(CUdeviceptr p, size_t n, CUdevice dev)
{
	TRY(work());
	if (!p || (dev != -1 /* CU_DEVICE_CPU */ && check_dev(dev)))
		return E_VALUE;
	return OK;
}

API CUresult cuMemPrefetchAsync(CUdeviceptr p, size_t n, CUdevice dev, CUstream s) { return prefetch(p, n, dev); }
API CUresult cuMemPrefetchAsync_ptsz(CUdeviceptr p, size_t n, CUdevice dev, CUstream s) { return prefetch(p, n, dev); }

// ---- address ranges and IPC ----

enum { R_NONE, R_DEVICE, R_MANAGED, R_HOST, R_VMM };

// The allocation (ordinary, or a VMM mapping) containing p, and its kind. Lock held.
static int find_range(CUdeviceptr p, CUdeviceptr *base, size_t *size)
{
	for (int b = 0; b < BUCKETS; b++)
		for (struct alloc *a = allocs[b]; a; a = a->next)
			if (p >= a->ptr && p - a->ptr < a->size) {
				*base = a->ptr, *size = a->size;
				return a->kind == K_DEVICE ? R_DEVICE : a->kind == K_MANAGED ? R_MANAGED : R_HOST;
			}
	for (struct range *m = mappings; m; m = m->next)
		if (p >= m->va && p - m->va < m->size) {
			*base = m->va, *size = m->size;
			return R_VMM;
		}
	return R_NONE;
}

API CUresult cuMemGetAddressRange_v2(CUdeviceptr *base, size_t *size, CUdeviceptr p)
{
	CUdeviceptr b;
	size_t n;
	TRY(current(NULL));
	pthread_mutex_lock(&lock);
	int kind = find_range(p, &b, &n);
	pthread_mutex_unlock(&lock);
	if (kind == R_NONE)
		return E_NOTFOUND;
	if (base)
		*base = b;
	if (size)
		*size = n;
	return OK;
}

// cuMemAlloc memory can be shared with another process; VMM memory cannot (it has its own export path).
API CUresult cuIpcGetMemHandle(void *handle, CUdeviceptr p)
{
	CUdeviceptr b;
	size_t n;
	TRY(current(NULL));
	if (!handle)
		return E_VALUE;
	pthread_mutex_lock(&lock);
	int kind = find_range(p, &b, &n);
	pthread_mutex_unlock(&lock);
	if (kind != R_DEVICE)
		return E_VALUE;
	memset(handle, 0, 64);
	snprintf(handle, 64, "fakecuda-ipc %d %llx %zx", getpid(), b, n);
	return OK;
}

// ---- streams, launches, modules ----

struct CUstream_st {
	CUdevice dev;
};

API CUresult cuStreamCreate(CUstream *stream, unsigned flags)
{
	CUdevice dev;
	TRY(current(&dev));
	if (!stream)
		return E_VALUE;
	if (!(*stream = malloc(sizeof **stream)))
		return E_OOM;
	(*stream)->dev = dev;
	return OK;
}

API CUresult cuStreamDestroy_v2(CUstream stream)
{
	if (!stream)
		return E_HANDLE;
	free(stream);
	return OK;
}

API CUresult cuStreamSynchronize(CUstream stream) { return current(NULL); }
API CUresult cuStreamQuery(CUstream stream) { return current(NULL); }
API CUresult cuStreamQuery_ptsz(CUstream stream) { return current(NULL); }
API CUresult cuStreamIsCapturing(CUstream stream, int *status) // never: graphs are not emulated
{
	if (!status)
		return E_VALUE;
	*status = 0;
	return current(NULL);
}

API CUresult cuStreamWaitEvent(CUstream stream, CUevent event, unsigned flags) { return event ? OK : E_HANDLE; }
API CUresult cuStreamWaitEvent_ptsz(CUstream stream, CUevent event, unsigned flags) { return event ? OK : E_HANDLE; }

// Work completes when submitted: an event is complete once recorded.
struct CUevent_st {
	unsigned flags;
	bool recorded;
};

API CUresult cuEventCreate(CUevent *event, unsigned flags)
{
	TRY(current(NULL));
	if (!event)
		return E_VALUE;
	if (!(*event = malloc(sizeof **event)))
		return E_OOM;
	**event = (struct CUevent_st){.flags = flags};
	return OK;
}

static CUresult event_record(CUevent event)
{
	TRY(current(NULL));
	if (!event)
		return E_HANDLE;
	event->recorded = true;
	return OK;
}

API CUresult cuEventRecord(CUevent event, CUstream s) { return event_record(event); }
API CUresult cuEventRecord_ptsz(CUevent event, CUstream s) { return event_record(event); }
API CUresult cuEventSynchronize(CUevent event) { return event ? OK : E_HANDLE; }
API CUresult cuEventQuery(CUevent event) { return event ? OK : E_HANDLE; }

API CUresult cuEventDestroy_v2(CUevent event)
{
	if (!event)
		return E_HANDLE;
	free(event);
	return OK;
}

static CUresult launch(void)
{
	TRY(current(NULL));
	fakecuda_launch_count++;
	fakecuda_work_count++;
	return OK;
}

// The host function runs at once, on the caller's thread (the stream is always idle here).
static CUresult host_func(void (*fn)(void *), void *data)
{
	if (!fn)
		return E_VALUE;
	TRY(launch());
	fn(data);
	return OK;
}

API CUresult cuLaunchHostFunc(CUstream s, void (*fn)(void *), void *data) { return host_func(fn, data); }
API CUresult cuLaunchHostFunc_ptsz(CUstream s, void (*fn)(void *), void *data) { return host_func(fn, data); }

API CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
			    unsigned bz, unsigned shmem, CUstream s, void **params, void **extra)
{
	return launch();
}

API CUresult cuLaunchKernel_ptsz(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
				 unsigned bz, unsigned shmem, CUstream s, void **params, void **extra)
{
	return launch();
}

API CUresult cuLaunchKernelEx(const CUlaunchConfig *config, CUfunction f, void **params, void **extra)
{
	return config ? launch() : E_VALUE;
}

API CUresult cuLaunchKernelEx_ptsz(const CUlaunchConfig *config, CUfunction f, void **params, void **extra)
{
	return config ? launch() : E_VALUE;
}

API CUresult cuLaunchCooperativeKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
				       unsigned by, unsigned bz, unsigned shmem, CUstream s, void **params)
{
	return launch();
}

API CUresult cuLaunchCooperativeKernel_ptsz(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
					    unsigned by, unsigned bz, unsigned shmem, CUstream s, void **params)
{
	return launch();
}

API CUresult cuGraphLaunch(CUgraphExec exec, CUstream s) { return launch(); }
API CUresult cuGraphLaunch_ptsz(CUgraphExec exec, CUstream s) { return launch(); }

API CUresult cuModuleGetFunction(CUfunction *f, void *module, const char *name)
{
	static char dummy;
	if (!f || !name)
		return E_VALUE;
	*f = (CUfunction)&dummy;
	return OK;
}

// A function no interposer can know (tests of pass-through).
API CUresult cuFakeEcho(int in, int *out)
{
	if (!out)
		return E_VALUE;
	*out = in + 1;
	return OK;
}

// ---- cuGetProcAddress: resolve a base name to one of this library's exports ----
// Read from this library's own dynamic symbol table, never through dlsym(), which a preloaded library
// may interpose (the real driver does not ask the dynamic linker either).

static pthread_once_t self_once = PTHREAD_ONCE_INIT;
static const ElfW(Sym) *self_syms;
static const char *self_strs;
static size_t self_nsyms;
static uintptr_t self_base;

static void open_self(void)
{
	Dl_info info;
	const Elf32_Word *hash = NULL;
	if (!dladdr((void *)&self_base, &info))
		return;
	self_base = (uintptr_t)info.dli_fbase;
	for (const ElfW(Dyn) *d = _DYNAMIC; d->d_tag != DT_NULL; d++) {
		// glibc relocates these entries in place; other loaders may not
		uintptr_t p = d->d_un.d_ptr < self_base ? self_base + d->d_un.d_ptr : d->d_un.d_ptr;
		if (d->d_tag == DT_SYMTAB)
			self_syms = (const ElfW(Sym) *)p;
		else if (d->d_tag == DT_STRTAB)
			self_strs = (const char *)p;
		else if (d->d_tag == DT_HASH) // the Makefile links with --hash-style=both
			hash = (const Elf32_Word *)p;
	}
	if (self_syms && self_strs && hash)
		self_nsyms = hash[1]; // nchain: the number of symbols
}

static void *self_export(const char *name) // ELF64: x86-64, like the rest of gpuwatch
{
	for (size_t i = 0; i < self_nsyms; i++) {
		const ElfW(Sym) *sym = &self_syms[i];
		if (sym->st_shndx != SHN_UNDEF && ELF64_ST_TYPE(sym->st_info) == STT_FUNC &&
		    ELF64_ST_BIND(sym->st_info) == STB_GLOBAL && !strcmp(self_strs + sym->st_name, name))
			return (void *)(self_base + sym->st_value);
	}
	return NULL;
}

static CUresult proc_address(const char *symbol, void **pfn, unsigned long long flags, int *status)
{
	static const char *const suffixes[] = {"_v2_ptsz", "_ptsz", "_v2", ""};
	char name[256];
	void *f = NULL;
	if (!symbol || !pfn)
		return E_VALUE;
	pthread_once(&self_once, open_self);
	for (int i = flags & 2 ? 0 : 2; i < 4 && !f; i++) {
		snprintf(name, sizeof name, "%s%s", symbol, suffixes[i]);
		f = self_export(name);
	}
	*pfn = f;
	if (status)
		*status = !f;
	return f ? OK : E_NOTFOUND;
}

API CUresult cuGetProcAddress(const char *symbol, void **pfn, int cudaVersion, unsigned long long flags)
{
	return proc_address(symbol, pfn, flags, NULL);
}

API CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int cudaVersion, unsigned long long flags,
				 int *symbolStatus)
{
	return proc_address(symbol, pfn, flags, symbolStatus);
}
