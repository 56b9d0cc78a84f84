// CUDA IPC of memory that can move, the importer's side. cuIpcOpenMemHandle on a handle of ours (ipc.c) asks
// the exporter's server for the region's pieces, imports each descriptor (cuMemImportFromShareableHandle), maps
// them into a reservation of its own with the access our own memory gets, and answers the allocation's address
// inside it. A region already open here is opened once more, not mapped again. cuIpcCloseMemHandle undoes an
// open; the last one unmaps and tells the exporter, whose region may move again. An open waits while the
// exporter has the region in host memory (it was swapped out), up to a minute. Any other handle is the driver's.
#include "interposer.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define WAIT_NS 60000000000ull
#define RETRY_US 10000
#define ANSWER_TIMEOUT_S 30

struct peer { // a connection to an exporter's server
	int32_t pid;
	uint64_t key;
	int fd;
	struct peer *next;
};

struct import { // a region of another process, mapped here
	struct peer *peer;
	uint32_t id;
	uint64_t nonce[2];
	CUdeviceptr va;
	size_t size;
	CUcontext ctx;
	int opens;
	struct import *next;
};

struct opened { // an address cuIpcOpenMemHandle answered
	CUdeviceptr ptr;
	size_t size;
	struct import *imp;
	int count;
	struct opened *next;
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER; // every list here; held over a request to an exporter
static struct peer *peers;
static struct import *imports;
static struct opened *opened;

HIDDEN void gw_ipc_import_reset(void) // in a forked child: the mappings are the parent's
{
	pthread_mutex_init(&lock, NULL);
	for (struct peer *p = peers, *next; p; p = next) {
		next = p->next;
		close(p->fd);
		free(p);
	}
	for (struct import *i = imports, *next; i; i = next) {
		next = i->next;
		free(i);
	}
	for (struct opened *o = opened, *next; o; o = next) {
		next = o->next;
		free(o);
	}
	peers = NULL;
	imports = NULL;
	opened = NULL;
}

HIDDEN bool gw_ipc_range(CUdeviceptr ptr, CUdeviceptr *base, size_t *size)
{
	pthread_mutex_lock(&lock);
	struct opened *o = opened;
	while (o && (ptr < o->ptr || ptr - o->ptr >= o->size))
		o = o->next;
	if (o) {
		*base = o->ptr;
		*size = o->size;
	}
	pthread_mutex_unlock(&lock);
	return o;
}

// ---- talking to the exporter

static struct peer *peer_of(const struct gw_ipc_handle *h) // lock held
{
	for (struct peer *p = peers; p; p = p->next)
		if (p->pid == h->pid && p->key == h->key)
			return p;
	struct sockaddr_un a = {.sun_family = AF_UNIX};
	struct ucred c;
	socklen_t n = sizeof c;
	struct timeval timeout = {ANSWER_TIMEOUT_S, 0};
	gw_ipc_socket_name(a.sun_path, sizeof a.sun_path, h->pid, h->key);
	socklen_t len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + strlen(a.sun_path + 1));
	int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	struct peer *p = fd >= 0 ? malloc(sizeof *p) : NULL;
	// The server must be the process the handle names: nobody else may pose as it.
	if (!p || connect(fd, (struct sockaddr *)&a, len) || getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &c, &n) ||
	    c.pid != h->pid || setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout)) {
		if (fd >= 0)
			close(fd);
		free(p);
		return NULL;
	}
	*p = (struct peer){h->pid, h->key, fd, peers};
	peers = p;
	return p;
}

static void peer_drop(struct peer *gone) // lock held: its connection failed
{
	for (struct peer **p = &peers; *p; p = &(*p)->next)
		if (*p == gone) {
			*p = gone->next;
			break;
		}
	for (struct import *i = imports; i; i = i->next)
		if (i->peer == gone)
			i->peer = NULL;
	close(gone->fd);
	free(gone);
}

// One request and its answer (and the descriptors that come with it: *nfds). False: the connection failed.
static bool ask(struct peer *p, uint32_t op, uint32_t id, const uint64_t nonce[2], struct gw_ipc_answer *a,
		int *fds, int *nfds)
{
	struct gw_ipc_request q = {op, id, {nonce[0], nonce[1]}};
	char control[CMSG_SPACE(sizeof(int) * GW_IPC_MAX_PIECES)];
	struct iovec v = {a, sizeof *a};
	struct msghdr m = {.msg_iov = &v, .msg_iovlen = 1, .msg_control = control, .msg_controllen = sizeof control};
	*nfds = 0;
	if (send(p->fd, &q, sizeof q, MSG_NOSIGNAL) != (ssize_t)sizeof q)
		return false;
	ssize_t got;
	while ((got = recvmsg(p->fd, &m, MSG_CMSG_CLOEXEC)) < 0 && errno == EINTR)
		;
	for (struct cmsghdr *h = got > 0 ? CMSG_FIRSTHDR(&m) : NULL; h; h = CMSG_NXTHDR(&m, h))
		if (h->cmsg_level == SOL_SOCKET && h->cmsg_type == SCM_RIGHTS) {
			int n = (int)((h->cmsg_len - CMSG_LEN(0)) / sizeof(int));
			memcpy(fds + *nfds, CMSG_DATA(h), sizeof(int) * n);
			*nfds += n;
		}
	size_t head = offsetof(struct gw_ipc_answer, piece_size);
	bool whole = got >= (ssize_t)head && a->npieces <= GW_IPC_MAX_PIECES &&
		     (size_t)got == head + a->npieces * sizeof(uint64_t) && (a->result || (int)a->npieces == *nfds);
	if (!whole)
		for (int i = 0; i < *nfds; i++)
			close(fds[i]);
	return whole;
}

static void tell_closed(struct import *imp) // lock held
{
	struct gw_ipc_answer a;
	int fds[GW_IPC_MAX_PIECES], n;
	if (imp->peer && !ask(imp->peer, GW_IPC_CLOSE, imp->id, imp->nonce, &a, fds, &n))
		peer_drop(imp->peer); // it exited: its region went with it, as far as it is concerned
}

// ---- mapping

static CUresult map_pieces(const struct gw_ipc_answer *a, const int *fds, size_t size, CUdeviceptr *va_out)
{
	CUdeviceptr va = 0;
	CUdevice dev;
	CUcontext ctx;
	size_t at = 0;
	CUresult e = gw_current(&dev, &ctx);
	if (!e && (!real_cuMemImportFromShareableHandle || !real_cuMemAddressReserve))
		e = CUDA_ERROR_NOT_SUPPORTED;
	if (!e)
		e = real_cuMemAddressReserve(&va, size, 0, 0, 0);
	for (uint32_t i = 0; !e && i < a->npieces; i++) {
		CUmemGenericAllocationHandle h;
		CUmemAllocationProp prop;
		if ((e = real_cuMemImportFromShareableHandle(&h, (void *)(intptr_t)fds[i], CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR)))
			break;
		if (!i && real_cuMemGetAllocationPropertiesFromHandle && !real_cuMemGetAllocationPropertiesFromHandle(&prop, h))
			dev = prop.location.id; // the memory's device, as this process numbers it
		e = real_cuMemMap(va + at, a->piece_size[i], 0, h, 0);
		real_cuMemRelease(h); // the mapping keeps it
		at += e ? 0 : a->piece_size[i];
	}
	if (!e) {
		struct gw_device_info *d = gw_device_info_of(dev);
		e = real_cuMemSetAccess(va, size, d->access, d->naccess);
	}
	if (e && va) {
		if (at)
			real_cuMemUnmap(va, at);
		real_cuMemAddressFree(va, size);
	}
	*va_out = va;
	return e;
}

// Maps the region the handle names. Lock held.
static CUresult import_region(const struct gw_ipc_handle *h, struct import **out)
{
	struct gw_ipc_answer a;
	int fds[GW_IPC_MAX_PIECES], n = 0;
	uint64_t deadline = gw_now_ns() + WAIT_NS;
	struct peer *p = peer_of(h);
	if (!p)
		return CUDA_ERROR_INVALID_VALUE;
	for (;;) {
		if (!ask(p, GW_IPC_OPEN, h->id, h->nonce, &a, fds, &n)) {
			peer_drop(p);
			return CUDA_ERROR_INVALID_VALUE;
		}
		if (a.result != CUDA_ERROR_NOT_READY || gw_now_ns() > deadline)
			break;
		usleep(RETRY_US);
	}
	size_t total = 0;
	for (uint32_t i = 0; !a.result && i < a.npieces; i++)
		total += a.piece_size[i];
	CUdeviceptr va = 0;
	CUresult e = a.result ? a.result : total != h->region_size ? CUDA_ERROR_INVALID_VALUE : map_pieces(&a, fds, total, &va);
	for (int i = 0; i < n; i++)
		close(fds[i]);
	struct import *imp = e ? NULL : malloc(sizeof *imp);
	if (!e && !imp) {
		real_cuMemUnmap(va, total);
		real_cuMemAddressFree(va, total);
		e = CUDA_ERROR_OUT_OF_MEMORY;
	}
	if (e) {
		struct import gone = {.peer = p, .id = h->id, .nonce = {h->nonce[0], h->nonce[1]}};
		if (!a.result) // the exporter counts it open: it is not
			tell_closed(&gone);
		return e;
	}
	*imp = (struct import){p, h->id, {h->nonce[0], h->nonce[1]}, va, total, NULL, 0, imports};
	real_cuCtxGetCurrent(&imp->ctx);
	imports = imp;
	*out = imp;
	return CUDA_SUCCESS;
}

static CUresult open_ours(CUdeviceptr *ptr, const struct gw_ipc_handle *h)
{
	static atomic_bool said;
	if (h->pid == getpid())
		return CUDA_ERROR_INVALID_CONTEXT; // as the driver answers a process opening its own handle
	if (!ptr || h->offset > h->region_size || h->size > h->region_size - h->offset)
		return CUDA_ERROR_INVALID_VALUE;
	pthread_mutex_lock(&lock);
	struct import *imp = imports;
	while (imp && !(imp->peer && imp->peer->pid == h->pid && imp->peer->key == h->key && imp->id == h->id))
		imp = imp->next;
	struct opened *o = opened;
	while (o && !(imp && o->imp == imp && o->ptr == imp->va + h->offset))
		o = o->next;
	CUresult e = imp ? CUDA_SUCCESS : import_region(h, &imp);
	if (!e && !o && (o = calloc(1, sizeof *o))) {
		*o = (struct opened){imp->va + h->offset, h->size, imp, 0, opened};
		opened = o;
	}
	if (!e && o) {
		o->count++;
		imp->opens++;
		*ptr = o->ptr;
	}
	pthread_mutex_unlock(&lock);
	if (e)
		gw_warn_once(&said, "CUDA IPC: cannot open memory shared by process %d (CUDA error %d: %s): run that "
				    "program with `gpuwatch exec --no-swap` if this one cannot run under `gpuwatch exec`",
			     h->pid, e, e == CUDA_ERROR_NOT_READY ? "it stayed in host memory" : "it exited, freed it, or "
			     "cannot export it");
	return e ? e : o ? CUDA_SUCCESS : CUDA_ERROR_OUT_OF_MEMORY;
}

static CUresult open_any(CUresult (*real)(CUdeviceptr *, CUipcMemHandle, unsigned), CUdeviceptr *ptr,
			 CUipcMemHandle handle, unsigned flags)
{
	struct gw_ipc_handle h;
	memcpy(&h, &handle, sizeof h);
	if (memcmp(h.magic, GW_IPC_MAGIC "\0", sizeof GW_IPC_MAGIC + 1))
		return real ? real(ptr, handle, flags) : CUDA_ERROR_NOT_FOUND;
	return open_ours(ptr, &h);
}

API CUresult cuIpcOpenMemHandle(CUdeviceptr *ptr, CUipcMemHandle handle, unsigned flags)
{
	if (!gw_ensure_driver(NULL))
		return CUDA_ERROR_NOT_INITIALIZED;
	return open_any(real_cuIpcOpenMemHandle, ptr, handle, flags);
}

API CUresult cuIpcOpenMemHandle_v2(CUdeviceptr *ptr, CUipcMemHandle handle, unsigned flags)
{
	if (!gw_ensure_driver(NULL))
		return CUDA_ERROR_NOT_INITIALIZED;
	return open_any(real_cuIpcOpenMemHandle_v2, ptr, handle, flags);
}

API CUresult cuIpcCloseMemHandle(CUdeviceptr ptr)
{
	if (!gw_ensure_driver(NULL))
		return CUDA_ERROR_NOT_INITIALIZED;
	pthread_mutex_lock(&lock);
	struct opened **p = &opened, *o;
	while ((o = *p) && o->ptr != ptr)
		p = &o->next;
	struct import *imp = o ? o->imp : NULL;
	bool ours = o;
	if (o && --o->count == 0) {
		*p = o->next;
		free(o);
	}
	if (imp && --imp->opens == 0) {
		for (struct import **i = &imports; *i; i = &(*i)->next)
			if (*i == imp) {
				*i = imp->next;
				break;
			}
		if (imp->ctx)
			gw_sync_context(imp->ctx); // work still using it finishes before it goes
		real_cuMemUnmap(imp->va, imp->size);
		real_cuMemAddressFree(imp->va, imp->size);
		tell_closed(imp);
		free(imp);
	}
	pthread_mutex_unlock(&lock);
	return ours ? CUDA_SUCCESS : real_cuIpcCloseMemHandle ? real_cuIpcCloseMemHandle(ptr) : CUDA_ERROR_INVALID_VALUE;
}
