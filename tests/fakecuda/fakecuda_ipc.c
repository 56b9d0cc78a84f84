// CUDA IPC across processes, part of fakecuda.c (included at its end).
//
// Legacy IPC: cuIpcGetMemHandle moves a cuMemAlloc allocation into a memfd mapped shared at the same address
// and kept open; its handle names the process and that descriptor, and cuIpcOpenMemHandle in another process
// maps /proc/PID/fd/FD (tests run as root; the real driver has channels of its own). What is opened is counted
// once, in the exporter: the importer's K_IPC entry owns no capacity. Opening a handle in its own process is
// CUDA_ERROR_INVALID_CONTEXT, as on the real driver; a handle that is not one of these, CUDA_ERROR_INVALID_VALUE.
// VMM: cuMemExportToShareableHandle answers a duplicate of a handle's memfd, for handles created asking for
// POSIX file descriptors (requestedHandleTypes bit 0); cuMemImportFromShareableHandle makes a handle of such a
// descriptor that owns no capacity (the exporter's handle does).
// Events: an interprocess event's handle opens as a new event in another process.

typedef struct { char reserved[64]; } CUipcMemHandle, CUipcEventHandle;
#define POSIX_FD 1            // CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
#define EVENT_INTERPROCESS 4  // CU_EVENT_INTERPROCESS
#define EVENT_DISABLE_TIMING 2 // CU_EVENT_DISABLE_TIMING: interprocess events need it

static struct alloc *alloc_at(CUdeviceptr ptr) // lock held
{
	struct alloc *a = *bucket(ptr);
	while (a && a->ptr != ptr)
		a = a->next;
	return a;
}

// Moves the bytes of the allocation at base into a memfd mapped at the same address; *fd: the memfd. Lock held.
static CUresult share_alloc(CUdeviceptr base, int *fd)
{
	struct alloc *a = alloc_at(base);
	if (!a || a->kind != K_DEVICE)
		return E_VALUE;
	if (!a->ipc_fd) {
		int m = memfd_create("fakecuda-ipc", MFD_CLOEXEC);
		void *va = (void *)(uintptr_t)a->ptr;
		if (m < 0)
			return E_OOM;
		if (ftruncate(m, a->size) || pwrite(m, va, a->size, 0) != (ssize_t)a->size ||
		    mmap(va, a->size, RW, MAP_SHARED | MAP_FIXED, m, 0) == MAP_FAILED) {
			close(m);
			return E_OOM;
		}
		a->ipc_fd = m;
	}
	*fd = a->ipc_fd;
	return OK;
}

// The handle's text as a string (it is NUL-padded, but a foreign one need not be).
static void handle_text(const char *bytes, char out[65])
{
	memcpy(out, bytes, 64);
	out[64] = 0;
}

static CUresult ipc_open(CUdeviceptr *pdptr, CUipcMemHandle handle, unsigned flags)
{
	GATED;
	CUdevice dev;
	char text[65], path[64], extra;
	int pid, fd;
	size_t size;
	TRY(current(&dev));
	handle_text(handle.reserved, text);
	if (!pdptr || flags > 1 || sscanf(text, "fakecuda-ipc %d %d %zx%c", &pid, &fd, &size, &extra) != 3 || !size)
		return E_VALUE;
	if (pid == getpid())
		return E_CONTEXT;
	snprintf(path, sizeof path, "/proc/%d/fd/%d", pid, fd);
	int m = open(path, O_RDWR | O_CLOEXEC);
	struct stat st;
	if (m < 0 || fstat(m, &st) || (size_t)st.st_size != size) {
		if (m >= 0)
			close(m);
		return E_VALUE;
	}
	void *p = mmap(NULL, size, RW, MAP_SHARED, m, 0);
	struct alloc *a = p == MAP_FAILED ? NULL : malloc(sizeof *a);
	if (!a) {
		if (p != MAP_FAILED)
			munmap(p, size);
		close(m);
		return E_OOM;
	}
	pthread_mutex_lock(&lock);
	*a = (struct alloc){(uintptr_t)p, size, dev, K_IPC, NULL, *bucket((uintptr_t)p), m};
	*bucket(a->ptr) = a;
	uses_ipc = true;
	pthread_mutex_unlock(&lock);
	*pdptr = a->ptr;
	return OK;
}

API CUresult cuIpcOpenMemHandle(CUdeviceptr *pdptr, CUipcMemHandle handle, unsigned flags)
{
	return ipc_open(pdptr, handle, flags);
}

API CUresult cuIpcOpenMemHandle_v2(CUdeviceptr *pdptr, CUipcMemHandle handle, unsigned flags)
{
	return ipc_open(pdptr, handle, flags);
}

API CUresult cuIpcCloseMemHandle(CUdeviceptr ptr)
{
	GATED;
	CUresult r = E_VALUE;
	TRY(current(NULL));
	pthread_mutex_lock(&lock);
	struct alloc **pp = bucket(ptr), *a;
	while ((a = *pp) && a->ptr != ptr)
		pp = &a->next;
	if (a && a->kind == K_IPC) {
		*pp = a->next;
		munmap((void *)(uintptr_t)a->ptr, a->size);
		close(a->ipc_fd);
		free(a);
		r = OK;
	}
	pthread_mutex_unlock(&lock);
	return r;
}

// ---- VMM shareable handles

API CUresult cuMemExportToShareableHandle(void *out, CUmemGenericAllocationHandle id, int type, unsigned long long flags)
{
	GATED;
	CUresult r = OK;
	if (!inited)
		return E_NOINIT;
	if (!out || flags || type != POSIX_FD)
		return E_VALUE;
	pthread_mutex_lock(&lock);
	struct handle *h = *handle_find(id);
	int fd = -1;
	if (!h || h->released)
		r = E_VALUE;
	else if (!(h->types & POSIX_FD))
		r = E_NOT_SUPPORTED; // not created for export
	else if ((fd = fcntl(h->fd, F_DUPFD_CLOEXEC, 3)) < 0)
		r = E_OS;
	else
		uses_ipc = true;
	pthread_mutex_unlock(&lock);
	if (!r)
		*(int *)out = fd;
	return r;
}

// The device a handle's memfd was made for: its name is /memfd:fakecuda-vmm-dN. -1: not one of ours.
static int memfd_device(int fd)
{
	char path[64], target[128];
	int dev;
	snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
	ssize_t n = readlink(path, target, sizeof target - 1);
	if (n <= 0)
		return -1;
	target[n] = 0;
	return sscanf(target, "/memfd:fakecuda-vmm-d%d", &dev) == 1 && !check_dev(dev) ? dev : -1;
}

API CUresult cuMemImportFromShareableHandle(CUmemGenericAllocationHandle *out, void *os_handle, int type)
{
	GATED;
	if (!inited)
		return E_NOINIT;
	int src = (int)(intptr_t)os_handle, dev;
	struct stat st;
	if (!out || type != POSIX_FD || src < 0 || fstat(src, &st) || !st.st_size || st.st_size % GRAN ||
	    (dev = memfd_device(src)) < 0)
		return E_VALUE;
	struct handle *h = malloc(sizeof *h);
	int fd = h ? fcntl(src, F_DUPFD_CLOEXEC, 3) : -1;
	if (fd < 0) {
		free(h);
		return E_OOM;
	}
	pthread_mutex_lock(&lock);
	*h = (struct handle){.id = next_handle++, .fd = fd, .dev = dev, .size = st.st_size, .imported = true,
			     .types = POSIX_FD, .next = handles};
	handles = h;
	*out = h->id;
	uses_ipc = true;
	pthread_mutex_unlock(&lock);
	return OK;
}

API CUresult cuMemGetAllocationPropertiesFromHandle(CUmemAllocationProp *prop, CUmemGenericAllocationHandle id)
{
	if (!inited)
		return E_NOINIT;
	if (!prop)
		return E_VALUE;
	pthread_mutex_lock(&lock);
	struct handle *h = *handle_find(id);
	if (h)
		*prop = (CUmemAllocationProp){.type = 1, .requestedHandleTypes = h->types, .location = {1, h->dev}};
	pthread_mutex_unlock(&lock);
	return h ? OK : E_VALUE;
}

// ---- events

API CUresult cuIpcGetEventHandle(CUipcEventHandle *handle, CUevent event)
{
	GATED;
	TRY(current(NULL));
	if (!handle || !event || !(event->flags & EVENT_INTERPROCESS) || !(event->flags & EVENT_DISABLE_TIMING))
		return E_VALUE;
	memset(handle, 0, sizeof *handle);
	snprintf(handle->reserved, sizeof handle->reserved, "fakecuda-ipcevent %d %llx", getpid(),
		 (unsigned long long)(uintptr_t)event);
	return OK;
}

API CUresult cuIpcOpenEventHandle(CUevent *event, CUipcEventHandle handle)
{
	GATED;
	char text[65], extra;
	int pid;
	unsigned long long addr;
	TRY(current(NULL));
	handle_text(handle.reserved, text);
	if (!event || sscanf(text, "fakecuda-ipcevent %d %llx%c", &pid, &addr, &extra) != 2)
		return E_VALUE;
	if (pid == getpid())
		return E_CONTEXT;
	if (kill(pid, 0) && errno == ESRCH)
		return E_VALUE;
	if (!(*event = malloc(sizeof **event)))
		return E_OOM;
	**event = (struct CUevent_st){.flags = EVENT_INTERPROCESS | EVENT_DISABLE_TIMING, .recorded = true};
	return OK;
}
