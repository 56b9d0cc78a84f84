// Test double of the CUDA driver library (libcuda.so.1) with host memory behind it.
// Every cu* entry point is a distinct, non-inlined exported function and never calls
// another export, so a uprobe on one symbol fires exactly once per API call.
// With FAKECUDA_SHARED_STATE it also emulates the driver's process checkpoint API across processes
// (cuCheckpointProcess*: see "the checkpoint API" below). CUDA arrays, graphs with memory nodes and stream
// capture, and IPC (legacy, VMM export and import, events) are in fakecuda_arrays.c, fakecuda_graphs.c and
// fakecuda_ipc.c, included at the end: one library, one translation unit.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <link.h>
#include <linux/futex.h>
#include <linux/membarrier.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
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

enum { OK = 0, E_VALUE = 1, E_OOM = 2, E_NOINIT = 3, E_DEVICE = 101, E_CONTEXT = 201, E_OS = 304,
       E_HANDLE = 400, E_ILLEGAL_STATE = 401, E_NOTFOUND = 500, E_REGISTERED = 712, E_NOT_REGISTERED = 713,
       E_NOT_SUPPORTED = 801, E_TIMEOUT = 909, E_UNKNOWN = 999 };

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
static bool config_failed, no_vmm, no_fd_handles;
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

// ---- the shared state file ----
// FAKECUDA_SHARED_STATE=FILE holds, from offset 0, the used[] counters (the first layout, unchanged), and from
// TABLE_OFFSET a table of process slots through which the checkpoint API reaches other processes. Every process
// that calls cuInit registers a slot there. tests/fakenvml/fakenvml.c reads the table too (FAKENVML_CUDA_STATE):
// keep its copy of struct slot in step with this one (TABLE_VERSION and the size checks catch a mismatch).
#define TABLE_OFFSET 4096
#define TABLE_MAGIC 0x4b435046u // "FPCK"
#define TABLE_VERSION 1
#define NSLOTS 256
enum { RUNNING, LOCKED, CHECKPOINTED, FAILED }; // CUprocessState
enum { OP_LOCK = 1, OP_CHECKPOINT, OP_RESTORE, OP_UNLOCK };
struct slot {
	_Atomic int32_t pid;       // the process; 0: never used; -pid: being set up (not yet answering)
	_Atomic int32_t agent_tid; // its agent thread, which serves requests (cuCheckpointProcessGetRestoreThreadId)
	_Atomic uint64_t start;    // the agent thread's start time (/proc/PID/task/TID/stat): tells a live process
	_Atomic uint32_t state;    // CUprocessState; written by the agent only
	_Atomic int32_t owner;     // pid of the caller holding the request channel; 0: free
	_Atomic uint32_t req_seq;  // futex: a caller bumps it to post a request
	_Atomic uint32_t ans_seq;  // futex: the agent sets it to the request's req_seq once answered
	_Atomic uint32_t pending;  // req_seq of the request posted, | TAKEN while the agent serves it; 0: none.
				   // The agent (taking it) or its caller (giving up) swaps it first: that one decides
	uint32_t op, arg;          // the request: OP_*, and the lock's timeoutMs or restore's "gpuPairs given"
	int32_t result;            // the answer (a CUresult)
	int8_t remap[MAX_DEVICES]; // restore with gpuPairs: the device each checkpointed device moves to; -1: none
	_Atomic uint64_t bytes[MAX_DEVICES]; // device bytes the process holds, per device (0 while checkpointed)
	_Atomic uint64_t saved[MAX_DEVICES]; // while checkpointed: the bytes in host memory, per device they left
};
_Static_assert(sizeof(struct slot) == 1136, "struct slot is shared with fakenvml.c: change both");
struct table {
	_Atomic uint32_t magic, version, nslots, slot_size;
	uint8_t reserved[48];
	struct slot slots[NSLOTS];
};
#define STATE_FILE_SIZE (TABLE_OFFSET + sizeof(struct table))
static struct table *table; // NULL without FAKECUDA_SHARED_STATE (or with a file that could not grow)
static struct slot *me;     // this process's slot; NULL: others cannot checkpoint it
// Where a device's memory lives: device i on device phys[i], until a restore with gpuPairs moves it.
static int phys[MAX_DEVICES];
static int refuse_lock;    // FAKECUDA_CHECKPOINT_REFUSE=CODE: locking this process answers CODE
static bool restore_stuck; // FAKECUDA_RESTORE_STUCK=1: a restore without room leaves this process FAILED
static atomic_bool uses_managed, uses_ipc; // what the driver cannot checkpoint (ever used, as it answers)
static void register_process(void);

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

// ---- the gate: what a LOCKED process waits at ----
// Every call that touches device memory or submits work (a "gated" call) starts with GATED. While nobody has
// locked the process, that costs one atomic load (of gate) and two stores to the thread's own tcall. Locking
// (the agent thread, close_gate) sets gate, then membarrier() makes every thread of the process pass a full
// barrier: afterwards a thread either sees gate set or its tcall.busy store is visible, so the agent waits
// for the calls in flight to end while new ones wait at the gate (the asymmetric fence of membarrier(2)).

static _Atomic unsigned gate; // 1 from lock to unlock
struct tcall {
	_Atomic unsigned busy; // inside a gated call (published to the agent)
	unsigned depth;        // gated calls nested on this thread (a host function calling the driver)
	bool linked;
	struct tcall *prev, *next;
};
static _Thread_local struct tcall tcall;
static pthread_mutex_t threads_lock = PTHREAD_MUTEX_INITIALIZER;
static struct tcall *threads; // every thread that made a gated call, until it exits
static pthread_key_t thread_key;
static pthread_once_t thread_key_once = PTHREAD_ONCE_INIT;

static void unlink_thread(void *arg) // at thread exit
{
	struct tcall *t = arg;
	pthread_mutex_lock(&threads_lock);
	if (t->prev)
		t->prev->next = t->next;
	else
		threads = t->next;
	if (t->next)
		t->next->prev = t->prev;
	t->linked = false;
	pthread_mutex_unlock(&threads_lock);
}

static void make_thread_key(void) { pthread_key_create(&thread_key, unlink_thread); }

static void link_thread(void)
{
	pthread_once(&thread_key_once, make_thread_key);
	pthread_mutex_lock(&threads_lock);
	tcall.prev = NULL;
	tcall.next = threads;
	if (threads)
		threads->prev = &tcall;
	threads = &tcall;
	tcall.linked = true;
	pthread_mutex_unlock(&threads_lock);
	pthread_setspecific(thread_key, &tcall);
}

static long futex(_Atomic uint32_t *word, int op, uint32_t val, const struct timespec *timeout)
{
	return syscall(SYS_futex, word, op, val, timeout, NULL, 0);
}

static __attribute__((noinline)) void wait_gate(void)
{
	do {
		atomic_store_explicit(&tcall.busy, 0, memory_order_release);
		unsigned g;
		while ((g = atomic_load_explicit(&gate, memory_order_acquire)))
			futex(&gate, FUTEX_WAIT_PRIVATE, g, NULL);
		atomic_store(&tcall.busy, 1); // seq_cst: ordered before the load below, as the agent's membarrier is
	} while (atomic_load(&gate));
}

static inline void enter(void)
{
	if (tcall.depth++)
		return; // nested: the outer call already counts
	if (!tcall.linked)
		link_thread();
	atomic_store_explicit(&tcall.busy, 1, memory_order_relaxed);
	atomic_signal_fence(memory_order_seq_cst); // the compiler keeps the order; membarrier() does the rest
	if (atomic_load_explicit(&gate, memory_order_acquire))
		wait_gate();
}

static inline void leave(int *scope)
{
	(void)scope;
	if (!--tcall.depth)
		atomic_store_explicit(&tcall.busy, 0, memory_order_release);
}

// First statement of a gated function: the gate is left on every return.
#define GATED \
	enter(); \
	__attribute__((cleanup(leave), unused)) int gated_scope_ = 0

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
	no_fd_handles = (nv = getenv("FAKECUDA_NO_FD_HANDLES")) && !strcmp(nv, "1");
	const char *pl = getenv("FAKECUDA_PIN_LIMIT");
	pin_limited = pl && *pl;
	pin_limit = env_size("FAKECUDA_PIN_LIMIT", 0);
	fail_dtoh_async = (pl = getenv("FAKECUDA_FAIL_DTOH_ASYNC")) && !strcmp(pl, "1");
	refuse_lock = (int)env_size("FAKECUDA_CHECKPOINT_REFUSE", 0);
	restore_stuck = (pl = getenv("FAKECUDA_RESTORE_STUCK")) && !strcmp(pl, "1");
	for (int i = 0; i < MAX_DEVICES; i++)
		phys[i] = i;
	for (int i = 0; i < ndev; i++)
		primary[i] = (struct CUctx_st){.dev = i, .alive = true};
	if (state && *state) {
		struct stat st;
		void *p = MAP_FAILED;
		size_t size = 0;
		int fd = open(state, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
		// Grown, never shrunk: processes of older builds map only used[].
		if (fd >= 0 && !fstat(fd, &st))
			size = st.st_size >= (off_t)STATE_FILE_SIZE || !ftruncate(fd, STATE_FILE_SIZE) ? STATE_FILE_SIZE
			       : st.st_size >= (off_t)sizeof local_used || !ftruncate(fd, sizeof local_used) ? sizeof local_used
			       : 0;
		if (size)
			p = mmap(NULL, size, RW, MAP_SHARED, fd, 0);
		if (fd >= 0)
			close(fd);
		if (p == MAP_FAILED) {
			fprintf(stderr, "fakecuda: cannot map FAKECUDA_SHARED_STATE %s\n", state);
			config_failed = true;
		} else {
			used = p;
			if (size == STATE_FILE_SIZE) {
				table = (struct table *)((char *)p + TABLE_OFFSET);
				register_process();
			}
		}
	}
}

// Takes size bytes of device p's capacity (p: where the memory lives), or returns false when they are not free.
static bool claim(int p, size_t size)
{
	size_t u = atomic_load(&used[p]);
	do
		if (u > capacity || size > capacity - u)
			return false;
	while (!atomic_compare_exchange_weak(&used[p], &u, u + size));
	if (me)
		atomic_fetch_add(&me->bytes[p], size);
	return true;
}

static void unclaim(int p, size_t size)
{
	atomic_fetch_sub(&used[p], size);
	if (me)
		atomic_fetch_sub(&me->bytes[p], size);
}

// Takes size bytes of device dev's capacity, or returns false when they are not free.
static bool take(CUdevice dev, size_t size) { return claim(phys[dev], size); }
static void give(CUdevice dev, size_t size) { unclaim(phys[dev], size); }

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
	// 102: VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED; 103: HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED (exportable VMM
	// memory), unless FAKECUDA_NO_FD_HANDLES=1
	*value = attrib == 102 ? !no_vmm : attrib == 103 ? !no_vmm && !no_fd_handles : 0;
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
	{E_OS, "CUDA_ERROR_OPERATING_SYSTEM", "OS call failed or operation not supported on this OS"},
	{E_HANDLE, "CUDA_ERROR_INVALID_HANDLE", "invalid resource handle"},
	{E_ILLEGAL_STATE, "CUDA_ERROR_ILLEGAL_STATE", "the operation cannot be performed in the present state"},
	{E_NOTFOUND, "CUDA_ERROR_NOT_FOUND", "named symbol not found"},
	{E_REGISTERED, "CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED",
	 "part or all of the requested memory range is already mapped"},
	{E_NOT_REGISTERED, "CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED",
	 "pointer does not correspond to a registered memory region"},
	{E_NOT_SUPPORTED, "CUDA_ERROR_NOT_SUPPORTED", "operation not supported"},
	{E_TIMEOUT, "CUDA_ERROR_TIMEOUT", "wait operation timed out"},
	{E_UNKNOWN, "CUDA_ERROR_UNKNOWN", "unknown error"},
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

API CUresult cuCtxSynchronize(void)
{
	GATED;
	return current(NULL);
}

// ---- ordinary allocations ----

enum kind { K_DEVICE, K_MANAGED, K_HOST, K_IPC }; // K_IPC: another process's, opened by legacy IPC (not counted)
struct alloc {
	CUdeviceptr ptr;
	size_t size;
	CUdevice dev;
	enum kind kind;
	void *host; // K_DEVICE while the process is checkpointed: where its bytes are
	struct alloc *next;
	int ipc_fd; // K_DEVICE exported by legacy IPC, and K_IPC: the memfd behind the mapping; 0: none
};
#define BUCKETS 256
static struct alloc *allocs[BUCKETS];

static struct alloc **bucket(CUdeviceptr p) { return &allocs[(p >> 12) % BUCKETS]; }

// fakecuda_graphs.c: stream capture and graph memory
static CUresult async_alloc(CUdeviceptr *dptr, size_t size, CUstream s);
static CUresult async_free(CUdeviceptr dptr, CUstream s);
static CUresult graph_free_outside(CUdeviceptr dptr);
static CUresult graph_launch(CUgraphExec exec);
static int capture_status(CUstream s);

static CUresult mem_alloc(CUdeviceptr *out, size_t size, enum kind kind)
{
	GATED;
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
		*a = (struct alloc){(uintptr_t)p, size, dev, kind, NULL, *bucket((uintptr_t)p), 0};
		*bucket(a->ptr) = a;
		*out = a->ptr;
		if (kind == K_MANAGED)
			uses_managed = true;
	}
	pthread_mutex_unlock(&lock);
	return r;
}

static CUresult mem_free(CUdeviceptr ptr, bool host)
{
	GATED;
	CUresult r = OK;
	TRY(current(NULL));
	pthread_mutex_lock(&lock);
	struct alloc **pp = bucket(ptr), *a;
	while (*pp && (*pp)->ptr != ptr)
		pp = &(*pp)->next;
	if (!(a = *pp) || (a->kind == K_HOST) != host || a->kind == K_IPC) {
		r = E_VALUE;
	} else {
		*pp = a->next;
		if (a->kind == K_DEVICE)
			give(a->dev, a->size);
		if (a->kind == K_HOST)
			pinned -= a->size;
		munmap((void *)(uintptr_t)a->ptr, a->size);
		if (a->ipc_fd)
			close(a->ipc_fd);
		free(a);
	}
	pthread_mutex_unlock(&lock);
	return r && !host ? graph_free_outside(ptr) : r; // a graph's allocation that outlived its launch
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

// Stream-ordered allocations and frees on a stream being captured become memory nodes of its graph.
API CUresult cuMemAllocAsync(CUdeviceptr *dptr, size_t size, CUstream s) { return async_alloc(dptr, size, s); }
API CUresult cuMemAllocAsync_ptsz(CUdeviceptr *dptr, size_t size, CUstream s) { return async_alloc(dptr, size, s); }

API CUresult cuMemAllocFromPoolAsync(CUdeviceptr *dptr, size_t size, CUmemoryPool pool, CUstream s)
{
	return async_alloc(dptr, size, s);
}

API CUresult cuMemAllocFromPoolAsync_ptsz(CUdeviceptr *dptr, size_t size, CUmemoryPool pool, CUstream s)
{
	return async_alloc(dptr, size, s);
}

API CUresult cuMemFree_v2(CUdeviceptr dptr) { return mem_free(dptr, false); }
API CUresult cuMemFreeAsync(CUdeviceptr dptr, CUstream s) { return async_free(dptr, s); }
API CUresult cuMemFreeAsync_ptsz(CUdeviceptr dptr, CUstream s) { return async_free(dptr, s); }
API CUresult cuMemHostAlloc(void **pp, size_t size, unsigned flags) { return host_alloc(pp, size); }
API CUresult cuMemAllocHost_v2(void **pp, size_t size) { return host_alloc(pp, size); }
API CUresult cuMemFreeHost(void *p) { return mem_free((uintptr_t)p, true); }
// Registrations are tracked by start address, as the driver tracks them.
API CUresult cuMemHostRegister_v2(void *p, size_t size, unsigned flags)
{
	GATED;
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
	GATED;
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
	GATED;
	CUdevice dev;
	TRY(current(&dev));
	if (!free || !total)
		return E_VALUE;
	size_t u = atomic_load(&used[phys[dev]]);
	*free = u > capacity ? 0 : capacity - u;
	*total = capacity;
	return OK;
}

// ---- virtual memory management: memfd-backed handles mapped into PROT_NONE reservations ----

struct handle {
	CUmemGenericAllocationHandle id;
	int fd; // open until the memory is freed: it keeps the bytes of a checkpointed process
	CUdevice dev;
	size_t size;
	int maps; // live mappings; memory stays counted until released and unmapped
	bool released;
	bool imported; // made from another process's exported descriptor: its capacity is the exporter's
	int types;     // the shareable handle types it was created for (1: POSIX file descriptor)
	struct handle *next;
};
struct range { // a reservation (h == NULL) or a mapping
	CUdeviceptr va;
	size_t size, offset; // offset: a mapping's, into its handle
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
	if (!h->imported)
		give(h->dev, h->size);
	close(h->fd);
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
	GATED;
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
	char name[32]; // the device is in the name: cuMemImportFromShareableHandle reads it back
	snprintf(name, sizeof name, "fakecuda-vmm-d%d", dev);
	int fd = took ? memfd_create(name, MFD_CLOEXEC) : -1;
	if (fd < 0 || ftruncate(fd, size)) {
		r = E_OOM;
		if (fd >= 0)
			close(fd);
		if (took)
			give(dev, size);
		free(h);
	} else {
		*h = (struct handle){.id = next_handle++, .fd = fd, .dev = dev, .size = size, .next = handles,
				     .types = prop->requestedHandleTypes};
		handles = h;
		*handle = h->id;
	}
	pthread_mutex_unlock(&lock);
	return r;
}

API CUresult cuMemRelease(CUmemGenericAllocationHandle handle)
{
	GATED;
	if (!inited)
		return E_NOINIT;
	CUresult r = OK;
	pthread_mutex_lock(&lock);
	struct handle *h = *handle_find(handle);
	if (!h || h->released) {
		r = E_HANDLE;
	} else {
		h->released = true;
		handle_put(h);
	}
	pthread_mutex_unlock(&lock);
	return r;
}

API CUresult cuMemAddressReserve(CUdeviceptr *ptr, size_t size, size_t alignment, CUdeviceptr addr,
				 unsigned long long flags)
{
	GATED;
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
	GATED;
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
	GATED;
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
		*m = (struct range){.va = ptr, .size = size, .offset = offset, .h = h, .next = mappings};
		mappings = m;
		h->maps++;
	}
	pthread_mutex_unlock(&lock);
	return r;
}

API CUresult cuMemSetAccess(CUdeviceptr ptr, size_t size, const CUmemAccessDesc *desc, size_t count)
{
	GATED;
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
	GATED;
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
	GATED;
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
	GATED;
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
	GATED;
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
	GATED;
	TRY(work());
	if (!p || (dev != -1 /* CU_DEVICE_CPU */ && check_dev(dev)))
		return E_VALUE;
	return OK;
}

API CUresult cuMemPrefetchAsync(CUdeviceptr p, size_t n, CUdevice dev, CUstream s) { return prefetch(p, n, dev); }
API CUresult cuMemPrefetchAsync_ptsz(CUdeviceptr p, size_t n, CUdevice dev, CUstream s) { return prefetch(p, n, dev); }

// ---- address ranges and IPC ----

enum { R_NONE, R_DEVICE, R_MANAGED, R_HOST, R_VMM, R_IPC };

// The allocation (ordinary, or a VMM mapping) containing p, and its kind. Lock held.
static int find_range(CUdeviceptr p, CUdeviceptr *base, size_t *size)
{
	for (int b = 0; b < BUCKETS; b++)
		for (struct alloc *a = allocs[b]; a; a = a->next)
			if (p >= a->ptr && p - a->ptr < a->size) {
				*base = a->ptr, *size = a->size;
				return a->kind == K_DEVICE ? R_DEVICE : a->kind == K_MANAGED ? R_MANAGED
				       : a->kind == K_IPC ? R_IPC : R_HOST;
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
	GATED;
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

static CUresult share_alloc(CUdeviceptr base, int *fd); // fakecuda_ipc.c

// cuMemAlloc memory can be shared with another process; VMM memory cannot (it has its own export path). The
// handle names this process and a descriptor of the memfd the allocation now lives in (fakecuda_ipc.c).
API CUresult cuIpcGetMemHandle(void *handle, CUdeviceptr p)
{
	GATED;
	CUdeviceptr b;
	size_t n;
	TRY(current(NULL));
	if (!handle)
		return E_VALUE;
	pthread_mutex_lock(&lock);
	int kind = find_range(p, &b, &n), fd = 0;
	CUresult r = kind != R_DEVICE ? E_VALUE : share_alloc(b, &fd);
	pthread_mutex_unlock(&lock);
	if (r)
		return r;
	memset(handle, 0, 64);
	snprintf(handle, 64, "fakecuda-ipc %d %d %zx", getpid(), fd, n);
	uses_ipc = true;
	return OK;
}

// ---- streams, launches, modules ----

struct CUstream_st {
	CUdevice dev;
	struct CUgraph_st *capture; // the graph being captured on it (fakecuda_graphs.c); NULL: none
};

API CUresult cuStreamCreate(CUstream *stream, unsigned flags)
{
	GATED;
	CUdevice dev;
	TRY(current(&dev));
	if (!stream)
		return E_VALUE;
	if (!(*stream = malloc(sizeof **stream)))
		return E_OOM;
	**stream = (struct CUstream_st){.dev = dev};
	return OK;
}

API CUresult cuStreamDestroy_v2(CUstream stream)
{
	GATED;
	if (!stream)
		return E_HANDLE;
	free(stream);
	return OK;
}

API CUresult cuStreamSynchronize(CUstream stream)
{
	GATED;
	return current(NULL);
}
API CUresult cuStreamQuery(CUstream stream)
{
	GATED;
	return current(NULL);
}
API CUresult cuStreamQuery_ptsz(CUstream stream)
{
	GATED;
	return current(NULL);
}
API CUresult cuStreamIsCapturing(CUstream stream, int *status)
{
	if (!status)
		return E_VALUE;
	*status = capture_status(stream);
	return current(NULL);
}

API CUresult cuStreamWaitEvent(CUstream stream, CUevent event, unsigned flags)
{
	GATED;
	return event ? OK : E_HANDLE;
}
API CUresult cuStreamWaitEvent_ptsz(CUstream stream, CUevent event, unsigned flags)
{
	GATED;
	return event ? OK : E_HANDLE;
}

// Work completes when submitted: an event is complete once recorded.
struct CUevent_st {
	unsigned flags;
	bool recorded;
};

API CUresult cuEventCreate(CUevent *event, unsigned flags)
{
	GATED;
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
	GATED;
	TRY(current(NULL));
	if (!event)
		return E_HANDLE;
	event->recorded = true;
	return OK;
}

API CUresult cuEventRecord(CUevent event, CUstream s) { return event_record(event); }
API CUresult cuEventRecord_ptsz(CUevent event, CUstream s) { return event_record(event); }
API CUresult cuEventSynchronize(CUevent event)
{
	GATED;
	return event ? OK : E_HANDLE;
}
API CUresult cuEventQuery(CUevent event)
{
	GATED;
	return event ? OK : E_HANDLE;
}

API CUresult cuEventDestroy_v2(CUevent event)
{
	GATED;
	if (!event)
		return E_HANDLE;
	free(event);
	return OK;
}

static CUresult launch(void)
{
	GATED;
	TRY(current(NULL));
	fakecuda_launch_count++;
	fakecuda_work_count++;
	return OK;
}

// The host function runs at once, on the caller's thread (the stream is always idle here).
static CUresult host_func(void (*fn)(void *), void *data)
{
	GATED;
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

API CUresult cuGraphLaunch(CUgraphExec exec, CUstream s) { return graph_launch(exec); }
API CUresult cuGraphLaunch_ptsz(CUgraphExec exec, CUstream s) { return graph_launch(exec); }

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

// ---- the checkpoint API (cuCheckpointProcess*) ----
// A root daemon calls these on another process (cuInit(0) first, no context needed), as on the real driver
// (r570+). A process that calls cuInit with FAKECUDA_SHARED_STATE registers a slot in the shared table and starts
// one agent thread ("cuda-ckpt"), which sleeps on a futex in its slot until a caller posts a request there; the
// agent does the work inside its own process (closes the gate, moves the memory, ...) and answers on another
// futex. A caller waits for the answer checking every 20 ms that the target still lives, so a target that dies
// answers CUDA_ERROR_INVALID_VALUE instead of a hang (one that is stopped, SIGSTOP, is waited for: the real
// driver needs the target's own thread too). Callers take turns on the slot's owner word.
//
// Answers, all decided in the target:
//   lock        RUNNING -> LOCKED once no gated call is in flight; later gated calls wait, CPU threads run on.
//               FAKECUDA_CHECKPOINT_REFUSE=CODE: CODE. A call still in flight after timeoutMs (0: wait for ever):
//               CUDA_ERROR_TIMEOUT, still RUNNING.
//   checkpoint  LOCKED -> CHECKPOINTED: each allocation's bytes move to host memory, its range stays reserved
//               but inaccessible (PROT_NONE), its bytes leave used[]. A process that ever used managed memory or
//               legacy IPC: CUDA_ERROR_NOT_SUPPORTED, still LOCKED.
//   restore     CHECKPOINTED -> LOCKED: the bytes back in used[] (gpuPairs: on the devices named, which must
//               include every checkpointed one) and at the same addresses. No room: CUDA_ERROR_OUT_OF_MEMORY,
//               still CHECKPOINTED; with FAKECUDA_RESTORE_STUCK=1 FAILED for good instead, as NVIDIA/cuda-checkpoint
//               issue 44 reports of driver 580: a later restore answers CUDA_ERROR_OPERATING_SYSTEM.
//   unlock      LOCKED -> RUNNING: the waiting calls go on.
//   Any other starting state: CUDA_ERROR_ILLEGAL_STATE.
// A caller that did not call cuInit: CUDA_ERROR_NOT_INITIALIZED; one without the shared table: NOT_SUPPORTED.
// A pid that does not exist, never called cuInit with this table, or dies meanwhile: CUDA_ERROR_INVALID_VALUE,
// the first error every function of the API documents and what callers of the real driver report for a live
// pid without CUDA state (a nonexistent pid has no documented answer); non-zero reserved fields and NULL
// out-pointers too. Pids are the caller's: callers and targets must share a pid namespace.

typedef struct {
	unsigned timeoutMs, reserved0;
	uint64_t reserved1[7];
} CUcheckpointLockArgs;
typedef struct { uint64_t reserved[8]; } CUcheckpointCheckpointArgs, CUcheckpointUnlockArgs;
typedef struct { CUuuid oldUuid, newUuid; } CUcheckpointGpuPair;
typedef struct {
	CUcheckpointGpuPair *gpuPairs;
	unsigned gpuPairsCount;
	char reserved[44];
	uint64_t reserved1;
} CUcheckpointRestoreArgs;
_Static_assert(sizeof(CUcheckpointLockArgs) == 64 && sizeof(CUcheckpointRestoreArgs) == 64, "driver ABI");

#define TAKEN 0x80000000u // in slot.pending: the agent is serving that request
static const struct timespec poll_interval = {0, 20 * 1000 * 1000};

static uint64_t now_ms(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1000ULL + t.tv_nsec / 1000000;
}

// Start time of thread tid of process pid (field 22 of /proc/PID/task/TID/stat); 0: no such thread, or a zombie.
static uint64_t thread_start(int pid, int tid)
{
	char path[64], buf[1024], *p;
	snprintf(path, sizeof path, "/proc/%d/task/%d/stat", pid, tid);
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return 0;
	ssize_t n = read(fd, buf, sizeof buf - 1);
	close(fd);
	if (n <= 0)
		return 0;
	buf[n] = 0;
	if (!(p = strrchr(buf, ')')) || p[1] != ' ' || p[2] == 'Z' || p[2] == 'X') // comm may hold ')'
		return 0;
	p += 2; // field 3
	for (int field = 3; field < 22; field++)
		if (!(p = strchr(p, ' ')))
			return 0;
		else
			p++;
	return strtoull(p, NULL, 10);
}

// True while the process registered in s as pid lives (its agent thread does: it ends only with the process).
static bool alive(struct slot *s, int pid)
{
	uint64_t start = atomic_load(&s->start);
	return pid > 0 && atomic_load(&s->pid) == pid && start &&
	       thread_start(pid, atomic_load(&s->agent_tid)) == start;
}

// ---- the target's side: its agent thread ----

static void open_gate(void)
{
	atomic_store(&gate, 0);
	futex(&gate, FUTEX_WAKE_PRIVATE, INT_MAX, NULL);
}

static bool any_busy(void)
{
	bool busy = false;
	pthread_mutex_lock(&threads_lock);
	for (struct tcall *t = threads; t && !busy; t = t->next)
		busy = atomic_load_explicit(&t->busy, memory_order_acquire);
	pthread_mutex_unlock(&threads_lock);
	return busy;
}

// Closes the gate and waits until no gated call is in flight; after timeout_ms (0: never) opens it again.
static CUresult close_gate(uint32_t timeout_ms)
{
	static const struct timespec pause = {0, 1000 * 1000};
	uint64_t t0 = now_ms();
	atomic_store(&gate, 1);
	syscall(SYS_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0, 0);
	while (any_busy()) {
		if (timeout_ms && now_ms() - t0 >= timeout_ms) {
			open_gate();
			return E_TIMEOUT;
		}
		nanosleep(&pause, NULL);
	}
	return OK;
}

// Moves the size bytes at p to new host memory (the pages themselves where the kernel can move them, so
// untouched pages stay unallocated; else a copy) and leaves p's range reserved but inaccessible. NULL: no memory.
static void *stash(CUdeviceptr p, size_t size)
{
	void *va = (void *)(uintptr_t)p, *h = mremap(va, size, size, MREMAP_MAYMOVE | MREMAP_DONTUNMAP);
	if (h == MAP_FAILED) {
		if ((h = mmap(NULL, size, RW, ANON, -1, 0)) == MAP_FAILED)
			return NULL;
		memcpy(h, va, size);
	}
	mmap(va, size, PROT_NONE, ANON | MAP_FIXED, -1, 0); // replaces the range in place: fails only for lack of maps
	return h;
}

// Puts the bytes stash() moved to h back at p. False: they stay at h.
static bool unstash(CUdeviceptr p, size_t size, void *h)
{
	void *va = (void *)(uintptr_t)p;
	if (mremap(h, size, size, MREMAP_MAYMOVE | MREMAP_FIXED, va) == va)
		return true;
	if (mmap(va, size, RW, ANON | MAP_FIXED, -1, 0) == MAP_FAILED)
		return false;
	memcpy(va, h, size);
	munmap(h, size);
	return true;
}

// Every device byte of the process to host memory. Ordinary allocations move to stash() buffers; VMM memory
// stays in its memfd (host memory as well) while its device mappings are replaced by inaccessible ones.
static CUresult checkpoint_memory(void)
{
	size_t out[MAX_DEVICES] = {0};
	CUresult r = OK;
	pthread_mutex_lock(&lock);
	for (int b = 0; b < BUCKETS && !r; b++)
		for (struct alloc *a = allocs[b]; a && !r; a = a->next)
			if (a->kind == K_DEVICE && !(a->host = stash(a->ptr, a->size)))
				r = E_OOM;
	for (int b = 0; b < BUCKETS; b++)
		for (struct alloc *a = allocs[b]; a; a = a->next)
			if (a->kind == K_DEVICE && r && a->host) { // no host memory for all: undo
				unstash(a->ptr, a->size, a->host);
				a->host = NULL;
			} else if (a->kind == K_DEVICE) {
				out[phys[a->dev]] += a->size;
			}
	if (!r) {
		for (struct handle *h = handles; h; h = h->next)
			out[phys[h->dev]] += h->imported ? 0 : h->size;
		for (struct range *m = mappings; m; m = m->next)
			mmap((void *)(uintptr_t)m->va, m->size, PROT_NONE, ANON | MAP_FIXED, -1, 0);
		for (int p = 0; p < MAX_DEVICES; p++)
			if (out[p]) {
				unclaim(p, out[p]);
				atomic_store(&me->saved[p], out[p]);
			}
	}
	pthread_mutex_unlock(&lock);
	return r;
}

// The bytes back on their devices, or (pairs) on remap[device]. E_OS: some could not be mapped back (FAILED).
static CUresult restore_memory(bool pairs, const int8_t *remap)
{
	int to[MAX_DEVICES], p;
	size_t need[MAX_DEVICES] = {0};
	for (p = 0; p < MAX_DEVICES; p++) {
		size_t n = atomic_load(&me->saved[p]);
		to[p] = pairs && remap[p] >= 0 ? remap[p] : p;
		if (to[p] >= (p < ndev ? ndev : MAX_DEVICES) || (n && pairs && remap[p] < 0))
			return E_VALUE; // a device this process does not have; gpuPairs must name every checkpointed one
		need[to[p]] += n;
	}
	for (p = 0; p < ndev && (!need[p] || claim(p, need[p])); p++)
		;
	if (p < ndev) { // all or nothing
		while (p--)
			if (need[p])
				unclaim(p, need[p]);
		return E_OOM;
	}
	bool ok = true;
	pthread_mutex_lock(&lock);
	for (int d = 0; d < MAX_DEVICES; d++)
		phys[d] = to[phys[d]];
	for (int b = 0; b < BUCKETS; b++)
		for (struct alloc *a = allocs[b]; a; a = a->next)
			if (a->host) {
				ok = unstash(a->ptr, a->size, a->host) && ok;
				a->host = NULL;
			}
	for (struct range *m = mappings; m; m = m->next)
		ok = mmap((void *)(uintptr_t)m->va, m->size, m->prot, MAP_SHARED | MAP_FIXED, m->h->fd, m->offset) !=
			     MAP_FAILED && ok;
	for (p = 0; p < MAX_DEVICES; p++)
		atomic_store(&me->saved[p], 0);
	pthread_mutex_unlock(&lock);
	return ok ? OK : E_OS;
}

static CUresult serve(uint32_t op, uint32_t arg, const int8_t *remap)
{
	uint32_t state = atomic_load(&me->state);
	CUresult r;
	switch (op) {
	case OP_LOCK:
		if (state != RUNNING)
			return E_ILLEGAL_STATE;
		if (refuse_lock)
			return refuse_lock;
		TRY(close_gate(arg));
		atomic_store(&me->state, LOCKED);
		return OK;
	case OP_CHECKPOINT:
		if (state != LOCKED)
			return E_ILLEGAL_STATE;
		if (uses_managed || uses_ipc)
			return E_NOT_SUPPORTED;
		TRY(checkpoint_memory());
		atomic_store(&me->state, CHECKPOINTED);
		return OK;
	case OP_RESTORE:
		if (state == FAILED)
			return E_OS;
		if (state != CHECKPOINTED)
			return E_ILLEGAL_STATE;
		r = restore_memory(arg, remap);
		if (!r)
			atomic_store(&me->state, LOCKED);
		else if (r == E_OS || (r == E_OOM && restore_stuck))
			atomic_store(&me->state, FAILED);
		return r;
	case OP_UNLOCK:
		if (state != LOCKED)
			return E_ILLEGAL_STATE;
		atomic_store(&me->state, RUNNING);
		open_gate();
		return OK;
	}
	return E_VALUE;
}

static _Atomic uint32_t agent_ready; // the agent answers: cuInit returns only then

static void *agent_main(void *arg)
{
	struct slot *s = arg;
	int tid = (int)syscall(SYS_gettid);
	int8_t remap[MAX_DEVICES];
	pthread_setname_np(pthread_self(), "cuda-ckpt");
	atomic_store(&s->agent_tid, tid);
	atomic_store(&s->start, thread_start(getpid(), tid));
	atomic_store(&s->pid, getpid()); // callers find it from now on
	atomic_store(&agent_ready, 1);
	futex(&agent_ready, FUTEX_WAKE_PRIVATE, 1, NULL);
	for (;;) {
		uint32_t seq = atomic_load(&s->req_seq), want = seq;
		if (!seq || !atomic_compare_exchange_strong(&s->pending, &want, seq | TAKEN)) {
			futex(&s->req_seq, FUTEX_WAIT, seq, NULL); // shared: the caller is another process
			continue;
		}
		uint32_t op = s->op, a = s->arg;
		memcpy(remap, s->remap, sizeof remap);
		s->result = serve(op, a, remap);
		atomic_store(&s->pending, 0);
		atomic_store(&s->ans_seq, seq);
		futex(&s->ans_seq, FUTEX_WAKE, INT_MAX, NULL);
	}
	return NULL;
}

static void forked(void) // in the child of a fork: not the registered process, no agent
{
	me = NULL;
	atomic_store(&gate, 0);
	pthread_mutex_init(&threads_lock, NULL);
	threads = NULL;
	tcall.linked = false;
}

// Claims a slot (the first never used or left by a process that ended) and starts the agent. Run by configure().
static void register_process(void)
{
	// Without membarrier() the gate could not stay cheap: then this process is simply not checkpointable.
	if (syscall(SYS_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED, 0, 0))
		return;
	atomic_store(&table->magic, TABLE_MAGIC);
	atomic_store(&table->version, TABLE_VERSION);
	atomic_store(&table->nslots, NSLOTS);
	atomic_store(&table->slot_size, sizeof(struct slot));
	int32_t self = getpid();
	for (int i = 0; i < NSLOTS && !me; i++) {
		struct slot *s = &table->slots[i];
		int32_t p = atomic_load(&s->pid);
		bool gone = !p || (p > 0 && !alive(s, p)) || (p < 0 && (-p == self || (kill(-p, 0) && errno == ESRCH)));
		if (gone && atomic_compare_exchange_strong(&s->pid, &p, -self))
			me = s;
	}
	if (!me)
		return; // table full: not checkpointable
	atomic_store(&me->agent_tid, 0);
	atomic_store(&me->start, 0);
	atomic_store(&me->state, RUNNING);
	atomic_store(&me->owner, 0);
	atomic_store(&me->pending, 0);
	atomic_store(&me->ans_seq, atomic_load(&me->req_seq));
	for (int d = 0; d < MAX_DEVICES; d++) {
		atomic_store(&me->bytes[d], 0);
		atomic_store(&me->saved[d], 0);
	}
	pthread_t t;
	sigset_t all, old;
	sigfillset(&all); // signals are the program's: the agent takes none
	pthread_sigmask(SIG_SETMASK, &all, &old);
	int e = pthread_create(&t, NULL, agent_main, me);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (e) {
		atomic_store(&me->pid, 0);
		me = NULL;
		return;
	}
	pthread_detach(t);
	while (!atomic_load(&agent_ready))
		futex(&agent_ready, FUTEX_WAIT_PRIVATE, 0, NULL);
	pthread_atfork(NULL, NULL, forked);
}

// ---- the caller's side ----

static CUresult find_target(int pid, struct slot **s)
{
	if (!inited)
		return E_NOINIT;
	if (!table)
		return E_NOT_SUPPORTED;
	for (int i = 0; pid > 0 && i < NSLOTS; i++)
		if (atomic_load(&table->slots[i].pid) == pid && alive(&table->slots[i], pid)) {
			*s = &table->slots[i];
			return OK;
		}
	return E_VALUE;
}

// Posts a request to the agent of process pid (slot s) and waits for its answer. timeout_ms (0: none): an
// agent that has not taken the request by then (a stopped process) makes it CUDA_ERROR_TIMEOUT.
static CUresult request(struct slot *s, int pid, uint32_t op, uint32_t arg, const int8_t *remap, uint32_t timeout_ms)
{
	_Atomic uint32_t *owner = (_Atomic uint32_t *)&s->owner;
	uint64_t t0 = now_ms();
	int32_t self = getpid(), o;
	CUresult r = E_VALUE;
	// 1. the channel: one caller at a time; a caller that died holding it loses it
	for (;;) {
		o = 0;
		if (atomic_compare_exchange_strong(&s->owner, &o, self) ||
		    (o > 0 && o != self && kill(o, 0) && errno == ESRCH &&
		     atomic_compare_exchange_strong(&s->owner, &o, self)))
			break;
		if (!alive(s, pid))
			return E_VALUE;
		if (timeout_ms && now_ms() - t0 >= timeout_ms)
			return E_TIMEOUT;
		futex(owner, FUTEX_WAIT, (uint32_t)o, &poll_interval);
	}
	// 2. what a dead caller left: cancel its request if no one took it, else let the agent finish it
	for (uint32_t left; (left = atomic_load(&s->pending));) {
		if (!(left & TAKEN)) {
			atomic_compare_exchange_strong(&s->pending, &left, 0);
			continue;
		}
		if (!alive(s, pid))
			goto out;
		nanosleep(&poll_interval, NULL);
	}
	// 3. post, and wait
	uint32_t seq = (atomic_load(&s->req_seq) + 1) & ~TAKEN;
	seq += !seq;
	s->op = op;
	s->arg = arg;
	if (remap)
		memcpy(s->remap, remap, sizeof s->remap);
	atomic_store(&s->pending, seq);
	atomic_store(&s->req_seq, seq);
	futex(&s->req_seq, FUTEX_WAKE, 1, NULL);
	for (;;) {
		uint32_t answered = atomic_load(&s->ans_seq), want = seq;
		if (answered == seq) {
			r = s->result;
			break;
		}
		if (!alive(s, pid))
			break; // E_VALUE
		if (timeout_ms && now_ms() - t0 >= timeout_ms && atomic_compare_exchange_strong(&s->pending, &want, 0)) {
			r = E_TIMEOUT;
			break;
		}
		futex(&s->ans_seq, FUTEX_WAIT, answered, &poll_interval);
	}
out:
	o = self;
	atomic_compare_exchange_strong(&s->owner, &o, 0);
	futex(owner, FUTEX_WAKE, INT_MAX, NULL);
	return r;
}

static bool zeroed(const void *p, size_t n)
{
	const unsigned char *c = p;
	while (n--)
		if (*c++)
			return false;
	return true;
}

// The device whose UUID (get_uuid's) u is, or -1.
static int uuid_device(const CUuuid *u)
{
	int d = 0;
	if (memcmp(u->bytes, "fakecuda-dev", 12))
		return -1;
	for (int i = 12; i < 16; i++)
		if (u->bytes[i] < '0' || u->bytes[i] > '9')
			return -1;
		else
			d = d * 10 + u->bytes[i] - '0';
	return d < ndev ? d : -1;
}

API CUresult cuCheckpointProcessGetState(int pid, int *state)
{
	struct slot *s;
	TRY(find_target(pid, &s));
	if (!state)
		return E_VALUE;
	*state = (int)atomic_load(&s->state);
	return OK;
}

API CUresult cuCheckpointProcessGetRestoreThreadId(int pid, int *tid)
{
	struct slot *s;
	TRY(find_target(pid, &s));
	if (!tid)
		return E_VALUE;
	*tid = atomic_load(&s->agent_tid);
	return OK;
}

API CUresult cuCheckpointProcessLock(int pid, CUcheckpointLockArgs *args)
{
	struct slot *s;
	TRY(find_target(pid, &s));
	if (args && (args->reserved0 || !zeroed(args->reserved1, sizeof args->reserved1)))
		return E_VALUE;
	unsigned timeout = args ? args->timeoutMs : 0;
	return request(s, pid, OP_LOCK, timeout, NULL, timeout);
}

API CUresult cuCheckpointProcessCheckpoint(int pid, CUcheckpointCheckpointArgs *args)
{
	struct slot *s;
	TRY(find_target(pid, &s));
	if (args && !zeroed(args, sizeof *args))
		return E_VALUE;
	return request(s, pid, OP_CHECKPOINT, 0, NULL, 0);
}

API CUresult cuCheckpointProcessRestore(int pid, CUcheckpointRestoreArgs *args)
{
	struct slot *s;
	int8_t remap[MAX_DEVICES];
	bool onto[MAX_DEVICES] = {false};
	TRY(find_target(pid, &s));
	unsigned n = args ? args->gpuPairsCount : 0;
	if (args && (!zeroed(args->reserved, sizeof args->reserved) || args->reserved1 || (n && !args->gpuPairs)))
		return E_VALUE;
	memset(remap, -1, sizeof remap);
	for (unsigned i = 0; i < n; i++) { // a one-to-one map of devices
		int from = uuid_device(&args->gpuPairs[i].oldUuid), to = uuid_device(&args->gpuPairs[i].newUuid);
		if (from < 0 || to < 0 || remap[from] >= 0 || onto[to])
			return E_VALUE;
		remap[from] = (int8_t)to;
		onto[to] = true;
	}
	return request(s, pid, OP_RESTORE, n > 0, remap, 0);
}

API CUresult cuCheckpointProcessUnlock(int pid, CUcheckpointUnlockArgs *args)
{
	struct slot *s;
	TRY(find_target(pid, &s));
	if (args && !zeroed(args, sizeof *args))
		return E_VALUE;
	return request(s, pid, OP_UNLOCK, 0, NULL, 0);
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

#include "fakecuda_arrays.c"
#include "fakecuda_graphs.c"
#include "fakecuda_ipc.c"
