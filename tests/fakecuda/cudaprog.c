// cudaprog: scripted CUDA driver client for tests. Reads one command per line on stdin and
// answers one line each: "ok [values]", "err CODE" (a CUresult) or "err -1 message".
// The driver library is dlopen()ed by the "load" command and its functions found with dlsym(); built
// with -DLINKED (cudaprog-linked) the program links the driver and calls its functions by name instead.
#define _GNU_SOURCE
#include <ctype.h>
#include <dlfcn.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#pragma GCC diagnostic ignored "-Wunused-parameter" // handlers share one signature

typedef int CUresult;
typedef unsigned long long u64, CUdeviceptr, CUhandle;
typedef void *CUcontext;
typedef struct { char bytes[16]; } CUuuid;
typedef struct { int type, id; } CUmemLocation;
typedef struct {
	int type, requestedHandleTypes;
	CUmemLocation location;
	void *win32HandleMetaData;
	unsigned char allocFlags[8];
} CUmemAllocationProp;
typedef struct { CUmemLocation location; int flags; } CUmemAccessDesc;
typedef struct {
	unsigned gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY, blockDimZ, sharedMemBytes;
	void *hStream, *attrs;
	unsigned numAttrs;
} CUlaunchConfig;
typedef struct {
	size_t srcXInBytes, srcY;
	int srcMemoryType;
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

typedef struct { size_t Width, Height; int Format; unsigned NumChannels; } CUDA_ARRAY_DESCRIPTOR;
typedef struct { size_t Width, Height, Depth; int Format; unsigned NumChannels, Flags; } CUDA_ARRAY3D_DESCRIPTOR;
typedef struct {
	struct {
		int allocType, handleTypes;
		CUmemLocation location;
		void *win32SecurityAttributes;
		size_t maxSize;
		unsigned short usage;
		unsigned char reserved[54];
	} poolProps;
	const CUmemAccessDesc *accessDescs;
	size_t accessDescCount, bytesize;
	CUdeviceptr dptr;
} CUDA_MEM_ALLOC_NODE_PARAMS;
typedef struct { unsigned char bytes[64]; } CUipcHandle; // CUipcMemHandle and CUipcEventHandle

#define LAUNCH_ARGS (void *, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void *, void **)
#define FUNCS(X)                                                                   \
	X(cuInit, (unsigned))                                                      \
	X(cuDevicePrimaryCtxRetain, (CUcontext *, int))                            \
	X(cuCtxCreate_v2, (CUcontext *, unsigned, int))                            \
	X(cuCtxSetCurrent, (CUcontext))                                            \
	X(cuCtxPushCurrent_v2, (CUcontext))                                        \
	X(cuCtxPopCurrent_v2, (CUcontext *))                                       \
	X(cuDeviceGetUuid_v2, (CUuuid *, int))                                     \
	X(cuMemAlloc_v2, (CUdeviceptr *, size_t))                                  \
	X(cuMemAllocPitch_v2, (CUdeviceptr *, size_t *, size_t, size_t, unsigned)) \
	X(cuMemAllocManaged, (CUdeviceptr *, size_t, unsigned))                    \
	X(cuMemAllocAsync, (CUdeviceptr *, size_t, void *))                        \
	X(cuMemAllocAsync_ptsz, (CUdeviceptr *, size_t, void *))                   \
	X(cuMemAllocFromPoolAsync, (CUdeviceptr *, size_t, void *, void *))        \
	X(cuMemFree_v2, (CUdeviceptr))                                             \
	X(cuMemFreeAsync, (CUdeviceptr, void *))                                   \
	X(cuMemHostAlloc, (void **, size_t, unsigned))                             \
	X(cuMemAllocHost_v2, (void **, size_t))                                    \
	X(cuMemFreeHost, (void *))                                                 \
	X(cuMemGetInfo_v2, (size_t *, size_t *))                                   \
	X(cuMemCreate, (CUhandle *, size_t, const CUmemAllocationProp *, CUhandle)) \
	X(cuMemRelease, (CUhandle))                                                \
	X(cuMemAddressReserve, (CUdeviceptr *, size_t, size_t, CUdeviceptr, CUhandle)) \
	X(cuMemAddressFree, (CUdeviceptr, size_t))                                 \
	X(cuMemMap, (CUdeviceptr, size_t, size_t, CUhandle, CUhandle))             \
	X(cuMemSetAccess, (CUdeviceptr, size_t, const CUmemAccessDesc *, size_t))  \
	X(cuMemUnmap, (CUdeviceptr, size_t))                                       \
	X(cuMemsetD8_v2, (CUdeviceptr, unsigned char, size_t))                     \
	X(cuMemcpyHtoD_v2, (CUdeviceptr, const void *, size_t))                    \
	X(cuMemcpyDtoH_v2, (void *, CUdeviceptr, size_t))                          \
	X(cuMemcpyDtoD_v2, (CUdeviceptr, CUdeviceptr, size_t))                     \
	X(cuMemcpy, (CUdeviceptr, CUdeviceptr, size_t))                            \
	X(cuLaunchKernel, (void *, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void *, void **, void **)) \
	X(cuLaunchKernel_ptsz, (void *, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void *, void **, void **)) \
	X(cuLaunchKernelEx, (const CUlaunchConfig *, void *, void **, void **))    \
	X(cuLaunchCooperativeKernel, LAUNCH_ARGS)                                  \
	X(cuGraphLaunch, (void *, void *))                                         \
	X(cuGetProcAddress_v2, (const char *, void **, int, CUhandle, int *))     \
	X(cuGetProcAddress, (const char *, void **, int, CUhandle))                \
	X(cuMemAllocFromPoolAsync_ptsz, (CUdeviceptr *, size_t, void *, void *))   \
	X(cuDeviceTotalMem_v2, (size_t *, int))                                    \
	X(cuDeviceGetAttribute, (int *, int, int))                                 \
	X(cuMemGetAddressRange_v2, (CUdeviceptr *, size_t *, CUdeviceptr))         \
	X(cuIpcGetMemHandle, (void *, CUdeviceptr))                                \
	X(cuCtxSynchronize, (void))                                                \
	X(cuMemsetD8Async, (CUdeviceptr, unsigned char, size_t, void *))           \
	X(cuMemsetD32Async_ptsz, (CUdeviceptr, unsigned, size_t, void *))          \
	X(cuMemPrefetchAsync, (CUdeviceptr, size_t, int, void *))                  \
	X(cuMemcpy2D_v2, (const CUDA_MEMCPY2D *))                                  \
	X(cuMemcpyHtoDAsync_v2, (CUdeviceptr, const void *, size_t, void *))       \
	X(cuLaunchHostFunc, (void *, void (*)(void *), void *))                    \
	X(cuEventCreate, (void **, unsigned))                                      \
	X(cuEventRecord, (void *, void *))                                         \
	X(cuEventSynchronize, (void *))                                            \
	X(cuEventQuery, (void *))                                                  \
	X(cuEventDestroy_v2, (void *))                                             \
	X(cuStreamQuery, (void *))                                                 \
	X(cuStreamWaitEvent, (void *, void *, unsigned))                          \
	X(cuArrayCreate_v2, (void **, const CUDA_ARRAY_DESCRIPTOR *))              \
	X(cuArray3DCreate_v2, (void **, const CUDA_ARRAY3D_DESCRIPTOR *))          \
	X(cuMipmappedArrayCreate, (void **, const CUDA_ARRAY3D_DESCRIPTOR *, unsigned)) \
	X(cuArrayDestroy, (void *))                                                \
	X(cuMipmappedArrayDestroy, (void *))                                       \
	X(cuMemcpyHtoA_v2, (void *, size_t, const void *, size_t))                 \
	X(cuMemcpyAtoH_v2, (void *, void *, size_t, size_t))                       \
	X(cuStreamCreate, (void **, unsigned))                                     \
	X(cuStreamBeginCapture_v2, (void *, int))                                  \
	X(cuStreamEndCapture, (void *, void **))                                   \
	X(cuGraphCreate, (void **, unsigned))                                      \
	X(cuGraphAddMemAllocNode, (void **, void *, void **, size_t, CUDA_MEM_ALLOC_NODE_PARAMS *)) \
	X(cuGraphAddMemFreeNode, (void **, void *, void **, size_t, CUdeviceptr))  \
	X(cuGraphInstantiateWithFlags, (void **, void *, u64))                     \
	X(cuGraphExecDestroy, (void *))                                            \
	X(cuGraphDestroy, (void *))                                                \
	X(cuDeviceGraphMemTrim, (int))                                             \
	X(cuDeviceGetGraphMemAttribute, (int, int, u64 *))                         \
	X(cuIpcOpenMemHandle_v2, (CUdeviceptr *, CUipcHandle, unsigned))           \
	X(cuIpcCloseMemHandle, (CUdeviceptr))                                      \
	X(cuIpcGetEventHandle, (CUipcHandle *, void *))                            \
	X(cuIpcOpenEventHandle, (void **, CUipcHandle))
// The pointers' assembler names differ from the functions' (cudaprog-linked refers to both).
#define DECLARE(name, args) static CUresult(*name) args __asm__("fp_" #name);
FUNCS(DECLARE)
#ifdef LINKED
#define DECLARE_LINKED(name, args) extern CUresult linked_##name args __asm__(#name);
FUNCS(DECLARE_LINKED)
#endif

#define REPLY_MAX 512
#define VALUE_MAX 480 // values or message inside a reply
#define MAX_ARGS 16
static char dummy; // stands in for a CUfunction / CUgraphExec
static const CUlaunchConfig config = {1, 1, 1, 1, 1, 1, 0, NULL, NULL, 0};
static void *lib;

// ---- named objects ----

enum kind { MEM = 1, HOST = 2, HANDLE = 4, RES = 8, CTX = 16, ARR = 32, MIP = 64, GRAPH = 128, EXEC = 256,
	    STREAM = 512, EVENT = 1024 };
struct obj {
	char *name;
	enum kind kind;
	u64 val; // pointer, handle or context
	size_t size;
	int dev;
	struct obj *next;
};
static struct obj *objs;

static struct obj *find(const char *name, int kinds)
{
	for (struct obj *o = objs; o; o = o->next)
		if (!strcmp(o->name, name))
			return o->kind & kinds ? o : NULL;
	return NULL;
}

static int define(const char *name, enum kind kind, u64 val, size_t size, int dev)
{
	struct obj *o = find(name, ~0);
	if (!o) {
		o = calloc(1, sizeof *o);
		o->name = strdup(name);
		o->next = objs;
		objs = o;
	}
	o->kind = kind, o->val = val, o->size = size, o->dev = dev;
	return 0;
}

// ---- commands: handlers return a CUresult (values go to v) or -1 (message goes to v) ----

static int fail(char *v, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(v, VALUE_MAX, fmt, ap);
	va_end(ap);
	return -1;
}

// A number: decimal or 0x hex, with an optional K/M/G (powers of 1024) suffix.
static bool number(const char *s, u64 *v)
{
	static const char units[] = "KMG";
	const char *u;
	char *end;
	if (!isdigit((unsigned char)*s))
		return false;
	*v = strtoull(s, &end, s[0] == '0' && s[1] == 'x' ? 16 : 10);
	if (*end && (u = strchr(units, *end)) && !end[1])
		*v <<= 10 * (u - units + 1), end++;
	return !*end;
}

#define OBJ(o, name, kinds) \
	struct obj *o = find(name, kinds); \
	if (!o) \
		return fail(v, "no suitable object named %s", name)

static int c_load(char **a, u64 *n, char *v)
{
	if (!(lib = dlopen(a[1], RTLD_NOW | RTLD_GLOBAL)))
		return fail(v, "%s", dlerror());
#ifdef LINKED
#define RESOLVE(name, args) name = linked_##name;
#else
#define RESOLVE(name, args) \
	if (!(*(void **)&name = dlsym(lib, #name))) \
		return fail(v, "missing symbol " #name);
#endif
	FUNCS(RESOLVE)
	return cuInit(0);
}

static int c_ctx(char **a, u64 *n, char *v)
{
	CUcontext c;
	int r = cuDevicePrimaryCtxRetain(&c, n[1]);
	return r ? r : cuCtxSetCurrent(c);
}

static int c_ctxcreate(char **a, u64 *n, char *v)
{
	CUcontext c;
	int r = cuCtxCreate_v2(&c, 0, n[2]);
	return r ? r : define(a[1], CTX, (uintptr_t)c, 0, n[2]);
}

// A named context, or the primary context of a device ordinal.
static int context_arg(const char *arg, CUcontext *c, char *v)
{
	u64 dev;
	if (number(arg, &dev))
		return cuDevicePrimaryCtxRetain(c, dev);
	OBJ(o, arg, CTX);
	*c = (CUcontext)(uintptr_t)o->val;
	return 0;
}

static int c_push(char **a, u64 *n, char *v)
{
	CUcontext c;
	int r = context_arg(a[1], &c, v);
	return r ? r : cuCtxPushCurrent_v2(c);
}

static int c_setcur(char **a, u64 *n, char *v)
{
	CUcontext c;
	int r = context_arg(a[1], &c, v);
	return r ? r : cuCtxSetCurrent(c);
}

static int c_pop(char **a, u64 *n, char *v)
{
	CUcontext c;
	return cuCtxPopCurrent_v2(&c);
}

static int c_alloc(char **a, u64 *n, char *v)
{
	CUdeviceptr p;
	int r = cuMemAlloc_v2(&p, n[2]);
	return r ? r : define(a[1], MEM, p, n[2], 0);
}

static int c_uuid(char **a, u64 *n, char *v)
{
	CUuuid u;
	return cuDeviceGetUuid_v2(&u, (int)n[1]);
}

static int c_churn(char **a, u64 *n, char *v)
{
	for (u64 i = 0; i < n[1]; i++) {
		CUdeviceptr p;
		int r = cuMemAlloc_v2(&p, n[2]);
		if (r || (r = cuMemFree_v2(p)))
			return r;
	}
	return 0;
}

static int c_pitch(char **a, u64 *n, char *v)
{
	CUdeviceptr p;
	size_t pitch;
	int r = cuMemAllocPitch_v2(&p, &pitch, n[2], n[3], n[4]);
	if (!r)
		snprintf(v, VALUE_MAX, "%zu", pitch);
	return r ? r : define(a[1], MEM, p, pitch * n[3], 0);
}

static int c_managed(char **a, u64 *n, char *v)
{
	CUdeviceptr p;
	int r = cuMemAllocManaged(&p, n[2], 1 /* CU_MEM_ATTACH_GLOBAL */);
	return r ? r : define(a[1], MEM, p, n[2], 0);
}

static int c_async(char **a, u64 *n, char *v)
{
	CUdeviceptr p;
	int r = cuMemAllocAsync(&p, n[2], NULL);
	return r ? r : define(a[1], MEM, p, n[2], 0);
}

static int c_asyncptsz(char **a, u64 *n, char *v)
{
	CUdeviceptr p;
	int r = cuMemAllocAsync_ptsz(&p, n[2], NULL);
	return r ? r : define(a[1], MEM, p, n[2], 0);
}

static int c_pool(char **a, u64 *n, char *v)
{
	CUdeviceptr p;
	int r = cuMemAllocFromPoolAsync(&p, n[2], NULL, NULL);
	return r ? r : define(a[1], MEM, p, n[2], 0);
}

static int c_poolptsz(char **a, u64 *n, char *v)
{
	CUdeviceptr p;
	int r = cuMemAllocFromPoolAsync_ptsz(&p, n[2], NULL, NULL);
	return r ? r : define(a[1], MEM, p, n[2], 0);
}

static int c_free(char **a, u64 *n, char *v)
{
	OBJ(o, a[1], MEM | HOST);
	return cuMemFree_v2(o->val);
}

static int c_freeasync(char **a, u64 *n, char *v)
{
	OBJ(o, a[1], MEM | HOST);
	return cuMemFreeAsync(o->val, NULL);
}

static int c_hostalloc(char **a, u64 *n, char *v)
{
	void *p;
	int r = cuMemHostAlloc(&p, n[2], 0);
	return r ? r : define(a[1], HOST, (uintptr_t)p, n[2], 0);
}

static int c_allochost(char **a, u64 *n, char *v)
{
	void *p;
	int r = cuMemAllocHost_v2(&p, n[2]);
	return r ? r : define(a[1], HOST, (uintptr_t)p, n[2], 0);
}

static int c_freehost(char **a, u64 *n, char *v)
{
	OBJ(o, a[1], MEM | HOST);
	return cuMemFreeHost((void *)(uintptr_t)o->val);
}

static int c_create(char **a, u64 *n, char *v)
{
	// type 1: CU_MEM_ALLOCATION_TYPE_PINNED, location type 1: CU_MEM_LOCATION_TYPE_DEVICE
	CUmemAllocationProp prop = {.type = 1, .location = {1, n[3]}};
	CUhandle h;
	int r = cuMemCreate(&h, n[2], &prop, 0);
	return r ? r : define(a[1], HANDLE, h, n[2], n[3]);
}

static int c_release(char **a, u64 *n, char *v)
{
	OBJ(o, a[1], HANDLE);
	return cuMemRelease(o->val);
}

static int c_reserve(char **a, u64 *n, char *v)
{
	CUdeviceptr p;
	int r = cuMemAddressReserve(&p, n[2], 0, 0, 0);
	return r ? r : define(a[1], RES, p, n[2], 0);
}

static int c_map(char **a, u64 *n, char *v)
{
	OBJ(res, a[1], RES);
	OBJ(h, a[4], HANDLE);
	CUmemAccessDesc desc = {{1, h->dev}, 3 /* CU_MEM_ACCESS_FLAGS_PROT_READWRITE */};
	int r = cuMemMap(res->val + n[2], n[3], 0, h->val, 0);
	return r ? r : cuMemSetAccess(res->val + n[2], n[3], &desc, 1);
}

static int c_unmap(char **a, u64 *n, char *v)
{
	OBJ(res, a[1], RES);
	return cuMemUnmap(res->val + n[2], n[3]);
}

static int c_addrfree(char **a, u64 *n, char *v)
{
	OBJ(res, a[1], RES);
	return cuMemAddressFree(res->val, res->size);
}

static int c_write(char **a, u64 *n, char *v)
{
	OBJ(o, a[1], MEM | HOST | RES);
	return cuMemsetD8_v2(o->val, n[2], o->size);
}

static int c_read(char **a, u64 *n, char *v)
{
	enum { CHUNK = 1 << 20 };
	u64 hash = 0xcbf29ce484222325ULL; // FNV-1a 64
	int r = 0;
	OBJ(o, a[1], MEM | HOST | RES);
	unsigned char *buf = malloc(CHUNK);
	if (!buf)
		return fail(v, "out of host memory");
	for (size_t off = 0, len; !r && off < o->size; off += len) {
		len = o->size - off < CHUNK ? o->size - off : CHUNK;
		r = cuMemcpyDtoH_v2(buf, o->val + off, len);
		for (size_t i = 0; !r && i < len; i++)
			hash = (hash ^ buf[i]) * 0x100000001b3ULL;
	}
	free(buf);
	if (!r)
		snprintf(v, VALUE_MAX, "%016llx", hash);
	return r;
}

#define LAUNCHER(cmd, call)                             \
	static int c_##cmd(char **a, u64 *n, char *v)   \
	{                                               \
		int r = 0;                              \
		for (u64 i = 0; !r && i < n[1]; i++)    \
			r = call;                       \
		return r;                               \
	}
LAUNCHER(launch, cuLaunchKernel(&dummy, 1, 1, 1, 1, 1, 1, 0, NULL, NULL, NULL))
LAUNCHER(launchptsz, cuLaunchKernel_ptsz(&dummy, 1, 1, 1, 1, 1, 1, 0, NULL, NULL, NULL))
LAUNCHER(launchex, cuLaunchKernelEx(&config, &dummy, NULL, NULL))
LAUNCHER(coop, cuLaunchCooperativeKernel(&dummy, 1, 1, 1, 1, 1, 1, 0, NULL, NULL))
LAUNCHER(graph, cuGraphLaunch(&dummy, NULL))

static int c_copy(char **a, u64 *n, char *v)
{
	static const char *const dirs[] = {"h2d", "d2h", "d2d", "any"};
	int d = 0;
	while (d < 4 && strcmp(a[1], dirs[d]))
		d++;
	if (d == 4)
		return fail(v, "copy direction must be h2d, d2h, d2d or any");
	// Host buffers stand in for device memory: the copy is the only driver call.
	char *src = calloc(1, n[2] + 1), *dst = calloc(1, n[2] + 1);
	uintptr_t s = (uintptr_t)src, t = (uintptr_t)dst;
	int r = !src || !dst ? fail(v, "out of host memory")
		: d == 0   ? cuMemcpyHtoD_v2(t, src, n[2])
		: d == 1   ? cuMemcpyDtoH_v2(dst, s, n[2])
		: d == 2   ? cuMemcpyDtoD_v2(t, s, n[2])
			   : cuMemcpy(t, s, n[2]);
	free(src);
	free(dst);
	return r;
}

static int c_info(char **a, u64 *n, char *v)
{
	size_t free, total;
	int r = cuMemGetInfo_v2(&free, &total);
	if (!r)
		snprintf(v, VALUE_MAX, "%zu %zu", free, total);
	return r;
}

static int c_proc(char **a, u64 *n, char *v)
{
	void *fn;
	int status, r = cuGetProcAddress_v2(a[1], &fn, 13000, 0, &status);
	if (!r)
		snprintf(v, VALUE_MAX, "1");
	return r;
}

// ---- patterns: deterministic bytes per (seed, object name, offset), written and checked in 1 MiB chunks ----

enum { CHUNK = 1 << 20 };

static u64 mix(u64 x) // splitmix64
{
	x += 0x9e3779b97f4a7c15ULL;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
	return x ^ (x >> 31);
}

static u64 name_seed(const char *name, u64 seed)
{
	u64 h = 0xcbf29ce484222325ULL;
	while (*name)
		h = (h ^ (unsigned char)*name++) * 0x100000001b3ULL;
	return mix(h ^ seed);
}

static void pattern(unsigned char *buf, size_t off, size_t len, u64 seed) // off: a multiple of 8
{
	for (size_t i = 0; i < len; i += 8) {
		u64 w = mix(seed + (off + i) / 8);
		memcpy(buf + i, &w, len - i < 8 ? len - i : 8);
	}
}

static int fill_one(struct obj *o, u64 seed, unsigned char *buf, char *v)
{
	seed = name_seed(o->name, seed);
	int r = 0;
	for (size_t off = 0, len; !r && off < o->size; off += len) {
		len = o->size - off < CHUNK ? o->size - off : CHUNK;
		pattern(buf, off, len, seed);
		r = o->kind == ARR ? cuMemcpyHtoA_v2((void *)(uintptr_t)o->val, off, buf, len)
				   : cuMemcpyHtoD_v2(o->val + off, buf, len);
	}
	return r;
}

static int check_one(struct obj *o, u64 seed, unsigned char *buf, char *v)
{
	unsigned char *want = buf + CHUNK;
	seed = name_seed(o->name, seed);
	int r = 0;
	for (size_t off = 0, len; !r && off < o->size; off += len) {
		len = o->size - off < CHUNK ? o->size - off : CHUNK;
		pattern(want, off, len, seed);
		if ((r = o->kind == ARR ? cuMemcpyAtoH_v2(buf, (void *)(uintptr_t)o->val, off, len)
					: cuMemcpyDtoH_v2(buf, o->val + off, len)))
			break;
		for (size_t i = 0; i < len; i++)
			if (buf[i] != want[i])
				return fail(v, "%s differs at offset %zu", o->name, off + i);
	}
	return r;
}

// Applies fn to the object NAME, or to every object whose name starts with P given "P*"; the count goes to v.
static int each(const char *name, int kinds, u64 seed, int (*fn)(struct obj *, u64, unsigned char *, char *),
		char *v)
{
	size_t len = strlen(name), count = 0;
	bool prefix = len && name[len - 1] == '*';
	unsigned char *buf = malloc(2 * CHUNK);
	int r = buf ? 0 : fail(v, "out of host memory");
	for (struct obj *o = objs; !r && o; o = o->next)
		if (o->kind & kinds && (prefix ? !strncmp(o->name, name, len - 1) : !strcmp(o->name, name))) {
			r = fn(o, seed, buf, v);
			count++;
		}
	free(buf);
	if (!r && !count)
		r = fail(v, "no suitable object named %s", name);
	if (!r)
		snprintf(v, VALUE_MAX, "%zu", count);
	return r;
}

static int c_fill(char **a, u64 *n, char *v) { return each(a[1], MEM | HOST | RES | ARR, n[2], fill_one, v); }
static int c_check(char **a, u64 *n, char *v) { return each(a[1], MEM | HOST | RES | ARR, n[2], check_one, v); }

static int c_ptr(char **a, u64 *n, char *v)
{
	OBJ(o, a[1], MEM | HOST | RES);
	snprintf(v, VALUE_MAX, "0x%llx %zu", o->val, o->size);
	return 0;
}

static int cmp_u64(const void *x, const void *y)
{
	u64 a = *(const u64 *)x, b = *(const u64 *)y;
	return a < b ? -1 : a > b;
}

// COUNT allocations of SIZE named PREFIX0...: answers the alignment all pointers share (the lowest set bit
// of their OR) and how many of them overlap the next one up.
static int c_allocmany(char **a, u64 *n, char *v)
{
	char name[256];
	u64 *ptrs = malloc((n[2] + 1) * sizeof *ptrs), all = 0, overlaps = 0;
	int r = ptrs ? 0 : fail(v, "out of host memory");
	for (u64 i = 0; !r && i < n[2]; i++) {
		snprintf(name, sizeof name, "%s%llu", a[1], i);
		if (!(r = cuMemAlloc_v2(&ptrs[i], n[3]))) {
			define(name, MEM, ptrs[i], n[3], 0);
			all |= ptrs[i];
		}
	}
	if (!r) {
		qsort(ptrs, n[2], sizeof *ptrs, cmp_u64);
		for (u64 i = 1; i < n[2]; i++)
			overlaps += ptrs[i - 1] + n[3] > ptrs[i];
		snprintf(v, VALUE_MAX, "%llu %llu", all & -all, overlaps);
	}
	free(ptrs);
	return r;
}

static int c_freeall(char **a, u64 *n, char *v)
{
	size_t len = strlen(a[1]), count = 0;
	int r = 0;
	for (struct obj *o = objs; !r && o; o = o->next)
		if (o->kind == MEM && !strncmp(o->name, a[1], len)) {
			r = cuMemFree_v2(o->val);
			o->kind = 0; // gone
			count++;
		}
	if (!r)
		snprintf(v, VALUE_MAX, "%zu", count);
	return r;
}

static int c_totalmem(char **a, u64 *n, char *v)
{
	size_t bytes;
	int r = cuDeviceTotalMem_v2(&bytes, n[1]);
	if (!r)
		snprintf(v, VALUE_MAX, "%zu", bytes);
	return r;
}

static int c_attr(char **a, u64 *n, char *v)
{
	int value, r = cuDeviceGetAttribute(&value, n[1], n[2]);
	if (!r)
		snprintf(v, VALUE_MAX, "%d", value);
	return r;
}

// The allocation containing NAME + OFF: its base relative to NAME, and its size.
static int c_range(char **a, u64 *n, char *v)
{
	CUdeviceptr base;
	size_t size;
	OBJ(o, a[1], MEM | HOST | RES);
	int r = cuMemGetAddressRange_v2(&base, &size, o->val + n[2]);
	if (!r)
		snprintf(v, VALUE_MAX, "%lld %zu", (long long)(base - o->val), size);
	return r;
}

static int c_ipc(char **a, u64 *n, char *v)
{
	char handle[64];
	OBJ(o, a[1], MEM | HOST | RES);
	return cuIpcGetMemHandle(handle, o->val);
}

static int c_sync(char **a, u64 *n, char *v) { return cuCtxSynchronize(); }

#include "cudaprog_more.c"


static void sleep_ms(void *arg)
{
	const u64 *ms = arg;
	struct timespec left = {*ms / 1000, *ms % 1000 * 1000000};
	while (nanosleep(&left, &left))
		;
}

// busy MS: a call that keeps the driver busy MS milliseconds, as a long kernel would (a host function that
// sleeps, which the test double runs inside cuLaunchHostFunc).
static int c_busy(char **a, u64 *n, char *v) { return cuLaunchHostFunc(NULL, sleep_ms, &n[1]); }

// ---- the three ways to find a driver function, and the interposer's in-process API ----

// HOW: dlsym on the driver's handle, dlvsym@VERSION (dlvsym: version ""; glibc 2.36 crashes on that for a
// library without version definitions), default (dlsym RTLD_DEFAULT), next (dlsym RTLD_NEXT), proc
// (cuGetProcAddress) or proc2 (cuGetProcAddress_v2); flags go to cuGetProcAddress (2: per-thread stream).
static int resolve(const char *how, const char *symbol, u64 flags, void **fn, char *v)
{
	int status = 0, r = 0;
	*fn = NULL;
	if (!strcmp(how, "dlsym"))
		*fn = dlsym(lib, symbol);
	else if (!strncmp(how, "dlvsym", 6) && (!how[6] || how[6] == '@'))
		*fn = dlvsym(lib, symbol, how[6] ? how + 7 : "");
	else if (!strcmp(how, "default"))
		*fn = dlsym(RTLD_DEFAULT, symbol);
	else if (!strcmp(how, "next"))
		*fn = dlsym(RTLD_NEXT, symbol);
	else if (!strcmp(how, "proc"))
		r = cuGetProcAddress(symbol, fn, 13000, flags);
	else if (!strcmp(how, "proc2"))
		r = cuGetProcAddress_v2(symbol, fn, 13000, flags, &status);
	else
		return fail(v, "resolve with dlsym, dlvsym, default, next, proc or proc2");
	if (!r && status)
		return fail(v, "%s: status %d with a result", symbol, status);
	return r ? r : *fn ? 0 : fail(v, "%s not found", symbol);
}

static bool by_proc(const char *how) { return !strncmp(how, "proc", 4); }

// Which library and symbol a resolved function belongs to (dladdr): "ok FILE SYMBOL".
static int c_resolve(char **a, u64 *n, char *v)
{
	void *fn;
	Dl_info info;
	int r = resolve(a[1], a[2], n[3], &fn, v);
	if (r)
		return r;
	if (!dladdr(fn, &info))
		return fail(v, "dladdr found nothing at %p", fn);
	const char *file = info.dli_fname ? strrchr(info.dli_fname, '/') : NULL;
	snprintf(v, VALUE_MAX, "%s %s", file ? file + 1 : info.dli_fname ? info.dli_fname : "?",
		 info.dli_sname && info.dli_saddr == fn ? info.dli_sname : "?");
	return 0;
}

// Functions an interposer does not know, found and called HOW: "ok VERSION ECHO(41) DEVICE-NAME".
static int c_unknown(char **a, u64 *n, char *v)
{
	CUresult (*version)(int *), (*echo)(int, int *), (*name)(char *, int, int);
	char dev[128];
	int ver, out, r;
	if ((r = resolve(a[1], "cuDriverGetVersion", n[2], (void **)&version, v)) ||
	    (r = resolve(a[1], "cuFakeEcho", n[2], (void **)&echo, v)) ||
	    (r = resolve(a[1], "cuDeviceGetName", n[2], (void **)&name, v)) || (r = version(&ver)) ||
	    (r = echo(41, &out)) || (r = name(dev, sizeof dev, 0)))
		return r;
	snprintf(v, VALUE_MAX, "%d %d %s", ver, out, dev);
	return 0;
}

static int c_allocvia(char **a, u64 *n, char *v)
{
	CUresult (*alloc)(CUdeviceptr *, size_t);
	CUdeviceptr p;
	int r = resolve(a[1], by_proc(a[1]) ? "cuMemAlloc" : "cuMemAlloc_v2", n[2], (void **)&alloc, v);
	if (!r && !(r = alloc(&p, n[4])))
		define(a[3], MEM, p, n[4], 0);
	return r;
}

static int c_launchvia(char **a, u64 *n, char *v)
{
	CUresult (*launch)(void *, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void *,
			   void **, void **);
	const char *name = by_proc(a[1]) || !(n[2] & 2) ? "cuLaunchKernel" : "cuLaunchKernel_ptsz";
	int r = resolve(a[1], name, n[2], (void **)&launch, v);
	for (u64 i = 0; !r && i < n[3]; i++)
		r = launch(&dummy, 1, 1, 1, 1, 1, 1, 0, NULL, NULL, NULL);
	return r;
}

static void *gw_api(const char *name) { return dlsym(RTLD_DEFAULT, name); }
#define GW_API(fn, name) \
	if (!(*(void **)&fn = gw_api(name))) \
		return fail(v, "no interposer")

static int c_gwpause(char **a, u64 *n, char *v)
{
	int (*fn)(void);
	GW_API(fn, "gpuwatch_pause");
	return fn();
}

static int c_gwresume(char **a, u64 *n, char *v)
{
	int (*fn)(void);
	GW_API(fn, "gpuwatch_resume");
	return fn();
}

static int c_gwswapout(char **a, u64 *n, char *v)
{
	int (*fn)(unsigned long long);
	GW_API(fn, "gpuwatch_swap_out");
	return fn(n[1]);
}

// The shared page as the process sees it: "ok MAGIC PID".
static int c_gwshm(char **a, u64 *n, char *v)
{
	const void *(*fn)(void);
	GW_API(fn, "gpuwatch_shm");
	const uint32_t *page = fn();
	if (!page)
		return fail(v, "gpuwatch_shm returned NULL");
	snprintf(v, VALUE_MAX, "0x%08x %d", page[0], (int)page[2]);
	return 0;
}

// ---- work: one submission of a kind, synchronously or in a loop on a background thread ----

static void host_fn(void *arg) { ++*(_Atomic u64 *)arg; }
static _Atomic u64 host_fn_calls;

// One piece of work of KIND ("-" for no object where the kind needs none). The "verify" kind reads the
// object back and compares it with the pattern "fill OBJ 1" wrote.
static int submit(const char *kind, struct obj *o, unsigned char *buf, char *v)
{
	static const char *const need_obj[] = {"memset", "memsetasync", "memset32", "copy", "copyhtod", "prefetch",
					       "copy2d", "verify", NULL};
	for (int i = 0; need_obj[i]; i++)
		if (!strcmp(kind, need_obj[i]) && !o)
			return fail(v, "%s needs an object", kind);
	size_t len = o ? (o->size < CHUNK ? o->size : CHUNK) : 0;
	if (!strcmp(kind, "launch"))
		return cuLaunchKernel(&dummy, 1, 1, 1, 1, 1, 1, 0, NULL, NULL, NULL);
	if (!strcmp(kind, "launchptsz"))
		return cuLaunchKernel_ptsz(&dummy, 1, 1, 1, 1, 1, 1, 0, NULL, NULL, NULL);
	if (!strcmp(kind, "launchex"))
		return cuLaunchKernelEx(&config, &dummy, NULL, NULL);
	if (!strcmp(kind, "graph"))
		return cuGraphLaunch(&dummy, NULL);
	if (!strcmp(kind, "hostfunc"))
		return cuLaunchHostFunc(NULL, host_fn, &host_fn_calls);
	if (!strcmp(kind, "memset"))
		return cuMemsetD8_v2(o->val, 0x11, len);
	if (!strcmp(kind, "memsetasync"))
		return cuMemsetD8Async(o->val, 0x22, len, NULL);
	if (!strcmp(kind, "memset32"))
		return cuMemsetD32Async_ptsz(o->val, 0x33333333, len / 4, NULL);
	if (!strcmp(kind, "copy"))
		return cuMemcpyDtoH_v2(buf, o->val, len);
	if (!strcmp(kind, "copyhtod"))
		return cuMemcpyHtoDAsync_v2(o->val, buf, len, NULL);
	if (!strcmp(kind, "prefetch"))
		return cuMemPrefetchAsync(o->val, o->size, o->dev, NULL);
	if (!strcmp(kind, "copy2d")) { // the object's first half to its second half, as 2 rows
		CUDA_MEMCPY2D c = {.srcMemoryType = 2, .srcDevice = o->val, .srcPitch = len / 4,
				   .dstMemoryType = 2, .dstDevice = o->val + len / 2, .dstPitch = len / 4,
				   .WidthInBytes = len / 4, .Height = 2};
		return cuMemcpy2D_v2(&c);
	}
	if (!strcmp(kind, "sync")) // never gated
		return cuCtxSynchronize();
	if (!strcmp(kind, "alloc")) {
		CUdeviceptr p;
		int r = cuMemAlloc_v2(&p, 4096);
		return r ? r : cuMemFree_v2(p);
	}
	if (!strcmp(kind, "events")) {
		void *e;
		int r = cuEventCreate(&e, 2 /* CU_EVENT_DISABLE_TIMING */);
		if (r)
			return r;
		if (!(r = cuEventRecord(e, NULL)) && !(r = cuStreamWaitEvent(NULL, e, 0)) && !(r = cuEventQuery(e)) &&
		    !(r = cuEventSynchronize(e)))
			r = cuStreamQuery(NULL);
		int d = cuEventDestroy_v2(e);
		return r ? r : d;
	}
	if (!strcmp(kind, "verify")) {
		unsigned char *want = buf + CHUNK;
		u64 seed = name_seed(o->name, 1);
		int r = cuMemcpyDtoH_v2(buf, o->val, len);
		pattern(want, 0, len, seed);
		return r ? r : memcmp(buf, want, len) ? fail(v, "%s differs from its pattern", o->name) : 0;
	}
	return fail(v, "unknown kind of work %s", kind);
}

static int c_submit(char **a, u64 *n, char *v)
{
	struct obj *o = strcmp(a[2], "-") ? find(a[2], MEM | HOST | RES) : NULL;
	if (!o && strcmp(a[2], "-"))
		return fail(v, "no suitable object named %s", a[2]);
	unsigned char *buf = malloc(2 * CHUNK);
	int r = buf ? 0 : fail(v, "out of host memory");
	for (u64 i = 0; !r && i < n[3]; i++)
		r = submit(a[1], o, buf, v);
	free(buf);
	return r;
}

struct spinner {
	char *name, kind[32];
	struct obj *o;
	pthread_t tid;
	atomic_bool stop;
	_Atomic u64 iterations, errors;
	_Atomic int last; // the last error's code (-1: a message)
	struct spinner *next;
};
static struct spinner *spinners;

static void *spin_main(void *arg)
{
	struct spinner *s = arg;
	unsigned char *buf = malloc(2 * CHUNK);
	char v[VALUE_MAX];
	CUcontext c;
	struct timespec pace = {0, 20000};
	int r = buf ? cuDevicePrimaryCtxRetain(&c, s->o ? s->o->dev : 0) : -1;
	if (!r)
		r = cuCtxSetCurrent(c);
	if (r) {
		s->last = r;
		s->errors = 1;
		free(buf);
		return NULL;
	}
	while (!s->stop) {
		if ((r = submit(s->kind, s->o, buf, v))) {
			s->errors++;
			s->last = r;
		}
		s->iterations++;
		nanosleep(&pace, NULL);
	}
	free(buf);
	return NULL;
}

static struct spinner *spinner(const char *name)
{
	struct spinner *s = spinners;
	while (s && strcmp(s->name, name))
		s = s->next;
	return s;
}

// spin NAME KIND OBJ: a thread submitting work of KIND in a loop (20 us apart) until "spinstop NAME".
static int c_spin(char **a, u64 *n, char *v)
{
	struct obj *o = strcmp(a[3], "-") ? find(a[3], MEM | HOST | RES) : NULL;
	if (!o && strcmp(a[3], "-"))
		return fail(v, "no suitable object named %s", a[3]);
	if (spinner(a[1]))
		return fail(v, "spinner %s exists", a[1]);
	struct spinner *s = calloc(1, sizeof *s);
	s->name = strdup(a[1]);
	snprintf(s->kind, sizeof s->kind, "%s", a[2]);
	s->o = o;
	if (pthread_create(&s->tid, NULL, spin_main, s))
		return fail(v, "cannot create a thread");
	s->next = spinners;
	spinners = s;
	return 0;
}

// "ok ITERATIONS ERRORS LAST-ERROR"
static int c_spinstat(char **a, u64 *n, char *v)
{
	struct spinner *s = spinner(a[1]);
	if (!s)
		return fail(v, "no spinner %s", a[1]);
	snprintf(v, VALUE_MAX, "%llu %llu %d", s->iterations, s->errors, s->last);
	return 0;
}

static int c_spinstop(char **a, u64 *n, char *v)
{
	struct spinner **p = &spinners, *s;
	while ((s = *p) && strcmp(s->name, a[1]))
		p = &s->next;
	if (!s)
		return fail(v, "no spinner %s", a[1]);
	s->stop = true;
	pthread_join(s->tid, NULL);
	snprintf(v, VALUE_MAX, "%llu %llu %d", s->iterations, s->errors, s->last);
	*p = s->next;
	free(s->name);
	free(s);
	return 0;
}

// The driver's own counters: "ok LAUNCHES WORK HOST-FUNCTION-CALLS".
static int c_counts(char **a, u64 *n, char *v)
{
	_Atomic u64 *launches = dlsym(lib, "fakecuda_launch_count"), *work = dlsym(lib, "fakecuda_work_count");
	if (!launches || !work)
		return fail(v, "the driver has no fakecuda counters");
	snprintf(v, VALUE_MAX, "%llu %llu %llu", *launches, *work, host_fn_calls);
	return 0;
}

static int c_pid(char **a, u64 *n, char *v)
{
	snprintf(v, VALUE_MAX, "%d", getpid());
	return 0;
}

static int c_sleep(char **a, u64 *n, char *v)
{
	struct timespec ts = {n[1] / 1000, n[1] % 1000 * 1000000};
	nanosleep(&ts, NULL);
	return 0;
}

static int c_exit(char **a, u64 *n, char *v)
{
	puts("ok");
	fflush(stdout);
	_exit(n[1]);
}

// Argument spec: one letter per argument, 'w' a word, 'n' a number().
static const struct command {
	const char *name, *args;
	int (*fn)(char **a, u64 *n, char *v);
	bool needs_lib;
} commands[] = {
	{"load", "w", c_load, false},          {"ctx", "n", c_ctx, true},
	{"ctxcreate", "wn", c_ctxcreate, true}, {"push", "w", c_push, true},
	{"pop", "", c_pop, true},              {"setcur", "w", c_setcur, true},
	{"alloc", "wn", c_alloc, true},        {"pitch", "wnnn", c_pitch, true},
	{"managed", "wn", c_managed, true},    {"async", "wn", c_async, true},
	{"asyncptsz", "wn", c_asyncptsz, true}, {"pool", "wn", c_pool, true},
	{"free", "w", c_free, true},           {"freeasync", "w", c_freeasync, true},
	{"hostalloc", "wn", c_hostalloc, true}, {"allochost", "wn", c_allochost, true},
	{"freehost", "w", c_freehost, true},   {"create", "wnn", c_create, true},
	{"release", "w", c_release, true},     {"reserve", "wn", c_reserve, true},
	{"map", "wnnw", c_map, true},          {"unmap", "wnn", c_unmap, true},
	{"addrfree", "w", c_addrfree, true},   {"write", "wn", c_write, true},
	{"read", "w", c_read, true},           {"launch", "n", c_launch, true},
	{"launchptsz", "n", c_launchptsz, true}, {"launchex", "n", c_launchex, true},
	{"coop", "n", c_coop, true},           {"graph", "n", c_graph, true},
	{"copy", "wn", c_copy, true},          {"info", "", c_info, true},
	{"proc", "w", c_proc, true},           {"pid", "", c_pid, false},
	{"sleep", "n", c_sleep, false},        {"exit", "n", c_exit, false},
	{"churn", "nn", c_churn, true},        {"uuid", "n", c_uuid, true},
	{"poolptsz", "wn", c_poolptsz, true},  {"fill", "wn", c_fill, true},
	{"check", "wn", c_check, true},        {"ptr", "w", c_ptr, false},
	{"allocmany", "wnn", c_allocmany, true}, {"freeall", "w", c_freeall, true},
	{"totalmem", "n", c_totalmem, true},   {"attr", "nn", c_attr, true},
	{"range", "wn", c_range, true},        {"ipc", "w", c_ipc, true},
	{"sync", "", c_sync, true},            {"resolve", "wwn", c_resolve, true},
	{"unknown", "wn", c_unknown, true},    {"allocvia", "wnwn", c_allocvia, true},
	{"launchvia", "wnn", c_launchvia, true}, {"gwpause", "", c_gwpause, false},
	{"gwresume", "", c_gwresume, false},   {"gwswapout", "n", c_gwswapout, false},
	{"gwshm", "", c_gwshm, false},         {"submit", "wwn", c_submit, true},
	{"spin", "www", c_spin, true},         {"spinstat", "w", c_spinstat, false},
	{"spinstop", "w", c_spinstop, false},  {"counts", "", c_counts, true},
	{"busy", "n", c_busy, true},
	MORE_COMMANDS
};

static void exec(char *line, char *reply);

// ---- worker threads for "thread T CMD..." ----

struct worker {
	char *name;
	pthread_t tid;
	pthread_mutex_t mu;
	pthread_cond_t cv;
	char *cmd, *reply; // set while a command is pending
	struct worker *next;
};
static struct worker *workers;

static _Noreturn void *worker_main(void *arg)
{
	struct worker *w = arg;
	char comm[16];
	snprintf(comm, sizeof comm, "%s", w->name);
	pthread_setname_np(pthread_self(), comm);
	pthread_mutex_lock(&w->mu);
	for (;;) {
		while (!w->cmd)
			pthread_cond_wait(&w->cv, &w->mu);
		exec(w->cmd, w->reply);
		w->cmd = NULL;
		pthread_cond_broadcast(&w->cv);
	}
}

static void run_on_thread(const char *name, char *cmd, char *reply)
{
	struct worker *w = workers;
	while (w && strcmp(w->name, name))
		w = w->next;
	if (!w) {
		w = calloc(1, sizeof *w);
		w->name = strdup(name);
		pthread_mutex_init(&w->mu, NULL);
		pthread_cond_init(&w->cv, NULL);
		if (pthread_create(&w->tid, NULL, worker_main, w)) {
			snprintf(reply, REPLY_MAX, "err -1 cannot create thread %s", name);
			free(w->name);
			free(w);
			return;
		}
		w->next = workers;
		workers = w;
	}
	if (pthread_equal(w->tid, pthread_self())) {
		exec(cmd, reply);
		return;
	}
	pthread_mutex_lock(&w->mu);
	w->cmd = cmd, w->reply = reply;
	pthread_cond_broadcast(&w->cv);
	while (w->cmd)
		pthread_cond_wait(&w->cv, &w->mu);
	pthread_mutex_unlock(&w->mu);
}

static int dispatch(int argc, char **a, char *v)
{
	const struct command *c = commands, *end = commands + sizeof commands / sizeof *commands;
	u64 n[MAX_ARGS] = {0};
	while (c < end && strcmp(c->name, a[0]))
		c++;
	if (c == end)
		return fail(v, "unknown command %s", a[0]);
	if (argc != (int)strlen(c->args) + 1)
		return fail(v, "%s takes %zu arguments", c->name, strlen(c->args));
	for (int i = 1; i < argc; i++)
		if (c->args[i - 1] == 'n' && !number(a[i], &n[i]))
			return fail(v, "bad number %s", a[i]);
	if (c->needs_lib && !lib)
		return fail(v, "no driver loaded");
	return c->fn(a, n, v);
}

// Executes one non-empty command line (modified in place) and writes its reply line.
static void exec(char *line, char *reply)
{
	char *a[MAX_ARGS + 1], *save, v[VALUE_MAX] = "";
	int argc = 0, r;
	for (char *t = strtok_r(line, " \t\r\n", &save); t && argc <= MAX_ARGS; t = strtok_r(NULL, " \t\r\n", &save))
		a[argc++] = t;
	if (argc > MAX_ARGS)
		r = fail(v, "too many arguments");
	else if (strcmp(a[0], "thread"))
		r = dispatch(argc, a, v);
	else if (argc < 3)
		r = fail(v, "usage: thread NAME COMMAND...");
	else {
		for (char *p = a[2]; p < a[argc - 1]; p++) // rejoin the command's words
			if (!*p)
				*p = ' ';
		run_on_thread(a[1], a[2], reply);
		return;
	}
	if (r == 0)
		snprintf(reply, REPLY_MAX, *v ? "ok %s" : "ok", v);
	else if (r > 0)
		snprintf(reply, REPLY_MAX, "err %d", r);
	else
		snprintf(reply, REPLY_MAX, "err -1 %s", v);
}

int main(void)
{
	char line[4096], reply[REPLY_MAX];
	while (fgets(line, sizeof line, stdin)) {
		size_t skip = strspn(line, " \t\r\n");
		if (!line[skip] || line[skip] == '#')
			continue;
		exec(line, reply);
		puts(reply);
		fflush(stdout);
	}
	return 0;
}
