// Test double of the CUDA driver library (libcuda.so.1) with host memory behind it.
// Every cu* entry point is a distinct, non-inlined exported function and never calls
// another export, so a uprobe on one symbol fires exactly once per API call.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
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

enum { OK = 0, E_VALUE = 1, E_OOM = 2, E_NOINIT = 3, E_DEVICE = 101, E_CONTEXT = 201,
       E_HANDLE = 400, E_NOTFOUND = 500 };

#define API __attribute__((visibility("default"), noipa))
#define TRY(expr) do { CUresult try_ = (expr); if (try_) return try_; } while (0)
#define MAX_DEVICES 64
#define STACK_DEPTH 16
#define GRAN (2ULL << 20) // VMM granularity
#define RW (PROT_READ | PROT_WRITE)
#define ANON (MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE)

__attribute__((visibility("default"))) _Atomic unsigned long long fakecuda_launch_count;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t config_once = PTHREAD_ONCE_INIT;
static atomic_bool inited;
static int ndev;
static size_t capacity;
static size_t used[MAX_DEVICES]; // device bytes in use (cuMemAlloc* and cuMemCreate)

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
	ndev = n > MAX_DEVICES ? MAX_DEVICES : (int)n;
	capacity = env_size("FAKECUDA_MEM_BYTES", 8ULL << 30);
	for (int i = 0; i < ndev; i++)
		primary[i] = (struct CUctx_st){.dev = i, .alive = true};
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
	*value = 0;
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
	if (kind != K_DEVICE || size <= capacity - used[dev])
		p = mmap(NULL, size, RW, ANON, -1, 0);
	if (p == MAP_FAILED) {
		r = E_OOM;
		free(a);
	} else {
		*a = (struct alloc){(uintptr_t)p, size, dev, kind, *bucket((uintptr_t)p)};
		*bucket(a->ptr) = a;
		if (kind == K_DEVICE)
			used[dev] += size;
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
			used[a->dev] -= a->size;
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

API CUresult cuMemGetInfo_v2(size_t *free, size_t *total)
{
	CUdevice dev;
	TRY(current(&dev));
	if (!free || !total)
		return E_VALUE;
	pthread_mutex_lock(&lock);
	*free = capacity - used[dev];
	*total = capacity;
	pthread_mutex_unlock(&lock);
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
	used[h->dev] -= h->size;
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
	int fd = size <= capacity - used[dev] ? memfd_create("fakecuda-vmm", MFD_CLOEXEC) : -1;
	if (fd < 0 || ftruncate(fd, size)) {
		r = E_OOM;
		if (fd >= 0)
			close(fd);
		free(h);
	} else {
		*h = (struct handle){.id = next_handle++, .fd = fd, .dev = dev, .size = size, .next = handles};
		handles = h;
		used[dev] += size;
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

// ---- copies and sets: device pointers are host pointers ----

static CUresult copy(CUdeviceptr dst, CUdeviceptr src, size_t n)
{
	TRY(current(NULL));
	if (n && (!dst || !src))
		return E_VALUE;
	if (n)
		memmove((void *)(uintptr_t)dst, (void *)(uintptr_t)src, n);
	return OK;
}

#define H(p) ((uintptr_t)(p))
API CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void *src, size_t n) { return copy(dst, H(src), n); }
API CUresult cuMemcpyDtoH_v2(void *dst, CUdeviceptr src, size_t n) { return copy(H(dst), src, n); }
API CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) { return copy(dst, src, n); }
API CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void *src, size_t n, CUstream s) { return copy(dst, H(src), n); }
API CUresult cuMemcpyDtoHAsync_v2(void *dst, CUdeviceptr src, size_t n, CUstream s) { return copy(H(dst), src, n); }
API CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s) { return copy(dst, src, n); }
API CUresult cuMemcpyHtoDAsync_v2_ptsz(CUdeviceptr dst, const void *src, size_t n, CUstream s) { return copy(dst, H(src), n); }
API CUresult cuMemcpyDtoHAsync_v2_ptsz(void *dst, CUdeviceptr src, size_t n, CUstream s) { return copy(H(dst), src, n); }
API CUresult cuMemcpyDtoDAsync_v2_ptsz(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s) { return copy(dst, src, n); }
API CUresult cuMemcpy(CUdeviceptr dst, CUdeviceptr src, size_t n) { return copy(dst, src, n); }
API CUresult cuMemcpyAsync(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s) { return copy(dst, src, n); }
API CUresult cuMemcpyAsync_ptsz(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s) { return copy(dst, src, n); }

API CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char value, size_t n)
{
	TRY(current(NULL));
	if (n && !dst)
		return E_VALUE;
	if (n)
		memset((void *)(uintptr_t)dst, value, n);
	return OK;
}

API CUresult cuMemsetD32_v2(CUdeviceptr dst, unsigned value, size_t n)
{
	TRY(current(NULL));
	if (n && (!dst || dst % 4))
		return E_VALUE;
	for (unsigned *p = (unsigned *)(uintptr_t)dst; n; n--)
		*p++ = value;
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

static CUresult launch(void)
{
	TRY(current(NULL));
	fakecuda_launch_count++;
	return OK;
}

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

// ---- cuGetProcAddress: resolve a base name to one of this library's exports ----

static pthread_once_t self_once = PTHREAD_ONCE_INIT;
static void *self, *self_base;

static void open_self(void)
{
	Dl_info info;
	if (dladdr(&self, &info)) {
		self = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
		self_base = info.dli_fbase;
	}
}

static CUresult proc_address(const char *symbol, void **pfn, unsigned long long flags, int *status)
{
	static const char *const suffixes[] = {"_v2_ptsz", "_ptsz", "_v2", ""};
	char name[256];
	void *f = NULL;
	Dl_info info;
	if (!symbol || !pfn)
		return E_VALUE;
	pthread_once(&self_once, open_self);
	for (int i = flags & 2 ? 0 : 2; i < 4 && !f && self; i++) {
		snprintf(name, sizeof name, "%s%s", symbol, suffixes[i]);
		f = dlsym(self, name);
		if (f && !(dladdr(f, &info) && info.dli_fbase == self_base))
			f = NULL; // a dependency's symbol (libc, ...), not ours
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
