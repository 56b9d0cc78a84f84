// Test double of NVML (libnvidia-ml.so.1) for machines without a GPU. The GPUs and the processes
// on them come from the text file named by $FAKENVML_STATE, re-read on every call:
//   gpu INDEX UUID TOTAL_BYTES UTIL_PERCENT NAME...
//   proc PID GPU_INDEX USED_BYTES
// '#' starts a comment. A GPU's used memory is its processes' bytes plus 1 GiB held by others
// ($FAKENVML_OTHER_BYTES bytes where set).
// No file (or no $FAKENVML_STATE) means no GPUs; a malformed line fails the call with
// NVML_ERROR_UNKNOWN and a message on stderr. The ABI is the one pynvml's ctypes wrappers use.
// With FAKENVML_CUDA_STATE=FILE (the FAKECUDA_SHARED_STATE of the test-double driver, tests/fakecuda) the
// processes that driver's process table lists count too, as if each had a proc line per GPU it holds memory
// on; a checkpointed process is listed with 0 bytes, as NVML lists it (the GPU index is the driver's ordinal).
#define _POSIX_C_SOURCE 200809L
#include <ctype.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

typedef enum {
	NVML_SUCCESS = 0,
	NVML_ERROR_UNINITIALIZED = 1,
	NVML_ERROR_INVALID_ARGUMENT = 2,
	NVML_ERROR_INSUFFICIENT_SIZE = 7,
	NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25,
	NVML_ERROR_UNKNOWN = 999,
} nvmlReturn_t;
typedef struct nvmlDevice_st *nvmlDevice_t;
typedef struct { unsigned long long total, free, used; } nvmlMemory_t;
typedef struct { unsigned int version; unsigned long long total, reserved, free, used; } nvmlMemory_v2_t;
typedef struct { unsigned int gpu, memory; } nvmlUtilization_t;
// nvmlProcessInfo_v2_t, which the _v2 and _v3 process queries both fill.
typedef struct {
	unsigned int pid;
	unsigned long long usedGpuMemory;
	unsigned int gpuInstanceId, computeInstanceId;
} nvmlProcessInfo_t;

#define nvmlMemory_v2 ((unsigned int)(sizeof(nvmlMemory_v2_t) | 2u << 24))
#define NOT_AVAILABLE 0xFFFFFFFFu // instance ids of a process when MIG is off
#define MAX_GPUS 64
#define OTHER_BYTES (1ull << 30)
#define DRIVER_VERSION "550.54.15"

struct gpu {
	int present;
	char uuid[41], name[96];
	unsigned long long total, used;
	unsigned int util;
};
struct state {
	struct gpu gpu[MAX_GPUS];
	unsigned int ngpus, nprocs; // nprocs: processes on the GPU that load() was asked about
};

// The test-double driver's process table (tests/fakecuda/fakecuda.c, "the shared state file"): a copy of its
// layout, checked against the version and sizes in the table's header.
#define CUDA_TABLE_OFFSET 4096
#define CUDA_TABLE_MAGIC 0x4b435046u
#define CUDA_TABLE_VERSION 1
#define CUDA_MAX_DEVICES 64
struct cuda_slot {
	_Atomic int32_t pid, agent_tid;
	_Atomic uint64_t start;
	_Atomic uint32_t state;
	_Atomic int32_t owner;
	_Atomic uint32_t req_seq, ans_seq, pending;
	uint32_t op, arg;
	int32_t result;
	int8_t remap[CUDA_MAX_DEVICES];
	_Atomic uint64_t bytes[CUDA_MAX_DEVICES], saved[CUDA_MAX_DEVICES];
};
_Static_assert(sizeof(struct cuda_slot) == 1136, "struct slot of fakecuda.c changed: change both");
struct cuda_table {
	_Atomic uint32_t magic, version, nslots, slot_size;
	uint8_t reserved[48];
	struct cuda_slot slots[];
};

static atomic_int initialized;   // nvmlInit count less nvmlShutdown count
static char devices[MAX_GPUS];   // the handle of GPU i is &devices[i]; never dereferenced

static int valid_uuid(const char *u)
{
	static const char form[] = "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx";
	for (size_t i = 0; i < sizeof form; i++)
		if (form[i] == 'x' ? !isxdigit((unsigned char)u[i]) : u[i] != form[i])
			return 0;
	return 1;
}

// Start time of thread tid of process pid (field 22 of /proc/PID/task/TID/stat); 0: no such thread, or a zombie.
static uint64_t thread_start(int pid, int tid)
{
	char path[64], buf[1024], *p;
	snprintf(path, sizeof path, "/proc/%d/task/%d/stat", pid, tid);
	int fd = open(path, O_RDONLY);
	if (fd < 0)
		return 0;
	ssize_t n = read(fd, buf, sizeof buf - 1);
	close(fd);
	if (n <= 0)
		return 0;
	buf[n] = 0;
	if (!(p = strrchr(buf, ')')) || p[1] != ' ' || p[2] == 'Z' || p[2] == 'X')
		return 0;
	p += 2;
	for (int field = 3; field < 22; field++)
		if (!(p = strchr(p, ' ')))
			return 0;
		else
			p++;
	return strtoull(p, NULL, 10);
}

// Adds the live processes of the test-double driver's table (FAKENVML_CUDA_STATE) as load() adds proc lines.
static void load_cuda(struct state *s, uintptr_t want, nvmlProcessInfo_t *infos, unsigned int cap)
{
	const char *path = getenv("FAKENVML_CUDA_STATE");
	struct stat st;
	int fd = path && *path ? open(path, O_RDONLY) : -1;
	void *map = MAP_FAILED;
	if (fd >= 0 && !fstat(fd, &st) && st.st_size > CUDA_TABLE_OFFSET + (off_t)sizeof(struct cuda_table))
		map = mmap(NULL, st.st_size, PROT_READ, MAP_SHARED, fd, 0);
	if (fd >= 0)
		close(fd);
	if (map == MAP_FAILED)
		return;
	const struct cuda_table *t = (const struct cuda_table *)((char *)map + CUDA_TABLE_OFFSET);
	uint32_t n = atomic_load(&t->nslots);
	if (atomic_load(&t->magic) == CUDA_TABLE_MAGIC && atomic_load(&t->version) == CUDA_TABLE_VERSION &&
	    atomic_load(&t->slot_size) == sizeof(struct cuda_slot) &&
	    n <= (st.st_size - CUDA_TABLE_OFFSET - sizeof *t) / sizeof(struct cuda_slot))
		for (uint32_t i = 0; i < n; i++) {
			const struct cuda_slot *c = &t->slots[i];
			int32_t pid = atomic_load(&c->pid);
			uint64_t start = atomic_load(&c->start);
			if (pid <= 0 || !start || thread_start(pid, atomic_load(&c->agent_tid)) != start)
				continue; // free, being set up, or its process ended
			for (unsigned int d = 0; d < CUDA_MAX_DEVICES && d < MAX_GPUS; d++) {
				unsigned long long bytes = atomic_load(&c->bytes[d]);
				if (!bytes && !atomic_load(&c->saved[d]))
					continue;
				s->gpu[d].used += bytes;
				if (d == want && s->nprocs++ < cap)
					infos[s->nprocs - 1] = (nvmlProcessInfo_t){(unsigned int)pid, bytes, NOT_AVAILABLE,
										   NOT_AVAILABLE};
			}
		}
	munmap(map, st.st_size);
}

// Reads the state file into *s; the processes on GPU want also go to infos, up to cap of them.
static nvmlReturn_t load(struct state *s, uintptr_t want, nvmlProcessInfo_t *infos, unsigned int cap)
{
	memset(s, 0, sizeof *s);
	if (!atomic_load(&initialized))
		return NVML_ERROR_UNINITIALIZED;
	const char *path = getenv("FAKENVML_STATE");
	FILE *f = path ? fopen(path, "r") : NULL;
	if (!f)
		return NVML_SUCCESS;
	nvmlReturn_t ret = NVML_SUCCESS;
	char *line = NULL;
	size_t size = 0;
	for (int lineno = 1; ret == NVML_SUCCESS && getline(&line, &size, f) >= 0; lineno++) {
		char *end = line + strcspn(line, "#\n");
		while (end > line && isspace((unsigned char)end[-1]))
			end--;
		*end = 0;
		unsigned int index, util, pid;
		unsigned long long bytes;
		char uuid[64];
		int n = 0;
		if (!line[strspn(line, " \t")])
			continue;
		if (sscanf(line, " gpu %u %63s %llu %u %n", &index, uuid, &bytes, &util, &n) == 4 && n && line[n] &&
		    index < MAX_GPUS && !s->gpu[index].present && valid_uuid(uuid) && util <= 100 &&
		    strlen(line + n) < sizeof s->gpu[0].name) {
			struct gpu *g = &s->gpu[index];
			g->present = 1, g->total = bytes, g->util = util;
			strcpy(g->uuid, uuid);
			strcpy(g->name, line + n);
			s->ngpus++;
		} else if (sscanf(line, " proc %u %u %llu%n", &pid, &index, &bytes, &n) == 3 && !line[n] &&
			   index < MAX_GPUS) {
			s->gpu[index].used += bytes;
			if (index == want && s->nprocs++ < cap)
				infos[s->nprocs - 1] = (nvmlProcessInfo_t){pid, bytes, NOT_AVAILABLE, NOT_AVAILABLE};
		} else {
			fprintf(stderr, "fakenvml: %s:%d: bad line: %s\n", path, lineno, line);
			ret = NVML_ERROR_UNKNOWN;
		}
	}
	free(line);
	fclose(f);
	if (ret == NVML_SUCCESS)
		load_cuda(s, want, infos, cap);
	const char *other = getenv("FAKENVML_OTHER_BYTES"); // default OTHER_BYTES
	unsigned long long others = other && *other ? strtoull(other, NULL, 10) : OTHER_BYTES;
	for (int i = 0; i < MAX_GPUS; i++)
		s->gpu[i].used += others;
	return ret;
}

// Reads the state and finds GPU slot i in it (listing its processes as load() does).
static nvmlReturn_t device(struct state *s, uintptr_t i, struct gpu **g, nvmlProcessInfo_t *infos, unsigned int cap)
{
	nvmlReturn_t ret = load(s, i, infos, cap);
	if (ret != NVML_SUCCESS)
		return ret;
	if (i >= MAX_GPUS || !s->gpu[i].present)
		return NVML_ERROR_INVALID_ARGUMENT;
	*g = &s->gpu[i];
	return NVML_SUCCESS;
}

static uintptr_t slot(nvmlDevice_t h) { return (uintptr_t)h - (uintptr_t)devices; }

static nvmlReturn_t copy(char *dst, unsigned int length, const char *src)
{
	if (!dst)
		return NVML_ERROR_INVALID_ARGUMENT;
	if (strlen(src) >= length)
		return NVML_ERROR_INSUFFICIENT_SIZE;
	strcpy(dst, src);
	return NVML_SUCCESS;
}

nvmlReturn_t nvmlInitWithFlags(unsigned int flags)
{
	(void)flags;
	atomic_fetch_add(&initialized, 1);
	return NVML_SUCCESS;
}

nvmlReturn_t nvmlInit_v2(void) { return nvmlInitWithFlags(0); }
nvmlReturn_t nvmlInit(void) { return nvmlInitWithFlags(0); }

nvmlReturn_t nvmlShutdown(void)
{
	int n = atomic_load(&initialized);
	while (n > 0 && !atomic_compare_exchange_weak(&initialized, &n, n - 1))
		;
	return n > 0 ? NVML_SUCCESS : NVML_ERROR_UNINITIALIZED;
}

const char *nvmlErrorString(nvmlReturn_t result)
{
	switch (result) {
	case NVML_SUCCESS: return "Success";
	case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
	case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
	case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
	case NVML_ERROR_ARGUMENT_VERSION_MISMATCH: return "Argument version mismatch";
	default: return "Unknown Error";
	}
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length)
{
	return atomic_load(&initialized) ? copy(version, length, DRIVER_VERSION) : NVML_ERROR_UNINITIALIZED;
}

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count)
{
	struct state s;
	nvmlReturn_t ret = count ? load(&s, MAX_GPUS, NULL, 0) : NVML_ERROR_INVALID_ARGUMENT;
	if (ret == NVML_SUCCESS)
		*count = s.ngpus;
	return ret;
}

nvmlReturn_t nvmlDeviceGetCount(unsigned int *count) { return nvmlDeviceGetCount_v2(count); }

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device_)
{
	struct state s;
	struct gpu *g;
	nvmlReturn_t ret = device_ ? device(&s, index, &g, NULL, 0) : NVML_ERROR_INVALID_ARGUMENT;
	if (ret == NVML_SUCCESS)
		*device_ = (nvmlDevice_t)&devices[index];
	return ret;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned int index, nvmlDevice_t *device_)
{
	return nvmlDeviceGetHandleByIndex_v2(index, device_);
}

nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t h, unsigned int *index)
{
	struct state s;
	struct gpu *g;
	nvmlReturn_t ret = index ? device(&s, slot(h), &g, NULL, 0) : NVML_ERROR_INVALID_ARGUMENT;
	if (ret == NVML_SUCCESS)
		*index = (unsigned int)slot(h);
	return ret;
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t h, char *uuid, unsigned int length)
{
	struct state s;
	struct gpu *g;
	nvmlReturn_t ret = device(&s, slot(h), &g, NULL, 0);
	return ret == NVML_SUCCESS ? copy(uuid, length, g->uuid) : ret;
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t h, char *name, unsigned int length)
{
	struct state s;
	struct gpu *g;
	nvmlReturn_t ret = device(&s, slot(h), &g, NULL, 0);
	return ret == NVML_SUCCESS ? copy(name, length, g->name) : ret;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t h, nvmlMemory_t *memory)
{
	struct state s;
	struct gpu *g;
	nvmlReturn_t ret = memory ? device(&s, slot(h), &g, NULL, 0) : NVML_ERROR_INVALID_ARGUMENT;
	if (ret == NVML_SUCCESS)
		*memory = (nvmlMemory_t){g->total, g->used < g->total ? g->total - g->used : 0, g->used};
	return ret;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t h, nvmlMemory_v2_t *memory)
{
	if (memory && memory->version != nvmlMemory_v2)
		return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
	nvmlMemory_t m;
	nvmlReturn_t ret = memory ? nvmlDeviceGetMemoryInfo(h, &m) : NVML_ERROR_INVALID_ARGUMENT;
	if (ret == NVML_SUCCESS)
		*memory = (nvmlMemory_v2_t){nvmlMemory_v2, m.total, 0, m.free, m.used};
	return ret;
}

nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t h, nvmlUtilization_t *utilization)
{
	struct state s;
	struct gpu *g;
	nvmlReturn_t ret = utilization ? device(&s, slot(h), &g, NULL, 0) : NVML_ERROR_INVALID_ARGUMENT;
	if (ret == NVML_SUCCESS)
		*utilization = (nvmlUtilization_t){g->util, 0};
	return ret;
}

// As NVML does: fills up to *count entries and sets *count to the number of processes, failing
// with NVML_ERROR_INSUFFICIENT_SIZE when that is more than fit. Graphics lists are always empty.
static nvmlReturn_t processes(nvmlDevice_t h, unsigned int *count, nvmlProcessInfo_t *infos, int compute)
{
	struct state s;
	struct gpu *g;
	if (!count || (*count && !infos))
		return NVML_ERROR_INVALID_ARGUMENT;
	nvmlReturn_t ret = device(&s, slot(h), &g, infos, compute ? *count : 0);
	if (ret != NVML_SUCCESS)
		return ret;
	unsigned int n = compute ? s.nprocs : 0;
	ret = n > *count ? NVML_ERROR_INSUFFICIENT_SIZE : NVML_SUCCESS;
	*count = n;
	return ret;
}

nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t h, unsigned int *count, nvmlProcessInfo_t *infos)
{
	return processes(h, count, infos, 1);
}

nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v2(nvmlDevice_t h, unsigned int *count, nvmlProcessInfo_t *infos)
{
	return processes(h, count, infos, 1);
}

nvmlReturn_t nvmlDeviceGetGraphicsRunningProcesses_v3(nvmlDevice_t h, unsigned int *count, nvmlProcessInfo_t *infos)
{
	return processes(h, count, infos, 0);
}

nvmlReturn_t nvmlDeviceGetGraphicsRunningProcesses_v2(nvmlDevice_t h, unsigned int *count, nvmlProcessInfo_t *infos)
{
	return processes(h, count, infos, 0);
}
