// cudaprog: scripted CUDA driver client for tests. Reads one command per line on stdin and
// answers one line each: "ok [values]", "err CODE" (a CUresult) or "err -1 message".
// The driver library is dlopen()ed by the "load" command, never linked.
#define _GNU_SOURCE
#include <ctype.h>
#include <dlfcn.h>
#include <pthread.h>
#include <stdarg.h>
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
	X(cuGetProcAddress_v2, (const char *, void **, int, CUhandle, int *))
#define DECLARE(name, args) static CUresult(*name) args;
FUNCS(DECLARE)

#define REPLY_MAX 512
#define VALUE_MAX 480 // values or message inside a reply
#define MAX_ARGS 16
static char dummy; // stands in for a CUfunction / CUgraphExec
static const CUlaunchConfig config = {1, 1, 1, 1, 1, 1, 0, NULL, NULL, 0};
static void *lib;

// ---- named objects ----

enum kind { MEM = 1, HOST = 2, HANDLE = 4, RES = 8, CTX = 16 };
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
#define RESOLVE(name, args) \
	if (!(*(void **)&name = dlsym(lib, #name))) \
		return fail(v, "missing symbol " #name);
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
