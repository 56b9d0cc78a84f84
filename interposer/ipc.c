// CUDA IPC of memory that can move, the exporter's side. The driver's legacy IPC refuses VMM memory, so
// cuIpcGetMemHandle on an allocation of ours answers a handle of ours (struct gw_ipc_handle): one export per
// region, whose id and random nonce the handle carries. A server thread, started at the first export, listens
// on the abstract unix socket "gpuwatch-ipc-PID-KEY" (KEY random, in the handle); an importer (ipc_import.c)
// asks it for a region and gets its pieces as POSIX file descriptors (cuMemExportToShareableHandle), which it
// imports and maps. While any importer has a region mapped, the region cannot move: swap-out skips it and its
// bytes count as unswappable. An import ends with the importer's close, or with its connection (it exited).
// Only a peer of this user (or root) is served, and only for an export whose nonce it names.
#include "interposer.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define MAX_CONNS 64

struct export {
	uint32_t id;
	uint64_t nonce[2];
	struct gw_region *region;
	struct export *next;
};

struct conn { // one importing process
	int fd;
	uint32_t *open; // the export id of each import it holds (an id once per open)
	size_t n, cap;
};

static struct export *exports; // lock held for these
static uint32_t next_id = 1;
static uint64_t key;
static int listen_fd = -1;
static bool server_failed;

HIDDEN void gw_ipc_reset(void) // in a forked child: the exports and the server are the parent's
{
	for (struct export *e = exports, *next; e; e = next) {
		next = e->next;
		free(e);
	}
	exports = NULL;
	if (listen_fd >= 0)
		close(listen_fd);
	listen_fd = -1;
	server_failed = false;
	key = 0;
}

HIDDEN void gw_ipc_socket_name(char *out, size_t cap, int32_t pid, uint64_t k)
{
	out[0] = '\0'; // abstract namespace: nothing on disk, gone with the process
	snprintf(out + 1, cap - 1, "gpuwatch-ipc-%d-%016llx", pid, (unsigned long long)k);
}

static socklen_t address(struct sockaddr_un *a, int32_t pid, uint64_t k)
{
	*a = (struct sockaddr_un){.sun_family = AF_UNIX};
	gw_ipc_socket_name(a->sun_path, sizeof a->sun_path, pid, k);
	return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + strlen(a->sun_path + 1));
}

static struct export *find(uint32_t id, const uint64_t nonce[2])
{
	for (struct export *e = exports; e; e = e->next)
		if (e->id == id && e->nonce[0] == nonce[0] && e->nonce[1] == nonce[1])
			return e;
	return NULL;
}

HIDDEN void gw_ipc_region_gone(struct gw_region *r)
{
	for (struct export **p = &exports, *e; (e = *p);)
		if (e->region == r) {
			*p = e->next;
			free(e);
		} else {
			p = &e->next;
		}
}

// ---- the server

static void import_end(uint32_t id) // lock held
{
	for (struct export *e = exports; e; e = e->next)
		if (e->id == id && e->region->imports)
			gw_region_imported(e->region, false);
}

static bool peer_allowed(int fd)
{
	struct ucred c;
	socklen_t n = sizeof c;
	return !getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &c, &n) && (c.uid == 0 || c.uid == getuid());
}

// Answers an open: the region's pieces as descriptors, if it is all on the device. Lock held.
static int open_export(struct conn *c, const struct gw_ipc_request *q, struct gw_ipc_answer *a, int *fds)
{
	struct export *e = find(q->id, q->nonce);
	struct gw_region *r = e ? e->region : NULL;
	*a = (struct gw_ipc_answer){.result = r ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE};
	for (uint32_t i = 0; r && i < r->npieces && !a->result; i++)
		if (!r->pieces[i].handle || r->pieces[i].host)
			a->result = CUDA_ERROR_NOT_READY; // swapped out (or on its way): once it is back
	if (!a->result && c->n == c->cap) {
		uint32_t *more = realloc(c->open, (c->cap * 2 + 8) * sizeof *more);
		if (more) {
			c->open = more;
			c->cap = c->cap * 2 + 8;
		} else {
			a->result = CUDA_ERROR_OUT_OF_MEMORY;
		}
	}
	if (a->result)
		return 0;
	for (uint32_t i = 0; i < r->npieces; i++) {
		int fd = -1;
		a->result = real_cuMemExportToShareableHandle(&fd, r->pieces[i].handle, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0);
		if (a->result) {
			while (i--)
				close(fds[i]);
			return 0;
		}
		fds[i] = fd;
		a->piece_size[i] = r->pieces[i].size;
	}
	a->npieces = r->npieces;
	c->open[c->n++] = e->id;
	gw_region_imported(r, true);
	return (int)r->npieces;
}

static bool send_answer(int fd, const struct gw_ipc_answer *a, const int *fds, int nfds)
{
	char control[CMSG_SPACE(sizeof(int) * GW_IPC_MAX_PIECES)] = {0};
	struct iovec v = {(void *)a, offsetof(struct gw_ipc_answer, piece_size) + a->npieces * sizeof(uint64_t)};
	struct msghdr m = {.msg_iov = &v, .msg_iovlen = 1};
	if (nfds) {
		m.msg_control = control;
		m.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
		struct cmsghdr *h = CMSG_FIRSTHDR(&m);
		*h = (struct cmsghdr){.cmsg_len = CMSG_LEN(sizeof(int) * nfds), .cmsg_level = SOL_SOCKET, .cmsg_type = SCM_RIGHTS};
		memcpy(CMSG_DATA(h), fds, sizeof(int) * nfds);
	}
	return sendmsg(fd, &m, MSG_NOSIGNAL) >= 0;
}

// One request; false: the connection is done.
static bool serve(struct conn *c)
{
	struct gw_ipc_request q;
	struct gw_ipc_answer a = {.result = CUDA_ERROR_INVALID_VALUE};
	int fds[GW_IPC_MAX_PIECES], nfds = 0;
	ssize_t got = recv(c->fd, &q, sizeof q, 0);
	if (got != (ssize_t)sizeof q)
		return got < 0 && (errno == EINTR || errno == EAGAIN);
	gw_memory_lock();
	if (q.op == GW_IPC_OPEN) {
		nfds = open_export(c, &q, &a, fds);
	} else if (q.op == GW_IPC_CLOSE) {
		for (size_t i = 0; i < c->n && a.result; i++)
			if (c->open[i] == q.id) {
				c->open[i] = c->open[--c->n];
				import_end(q.id);
				a.result = CUDA_SUCCESS;
			}
	}
	gw_memory_unlock();
	bool sent = send_answer(c->fd, &a, fds, nfds);
	for (int i = 0; i < nfds; i++)
		close(fds[i]); // the importer has its own now
	return sent;
}

static void hang_up(struct conn *c)
{
	gw_memory_lock();
	for (size_t i = 0; i < c->n; i++)
		import_end(c->open[i]);
	gw_memory_unlock();
	close(c->fd);
	free(c->open);
	*c = (struct conn){.fd = -1};
}

static void *server(void *arg)
{
	int fd = (int)(intptr_t)arg;
	struct conn conns[MAX_CONNS];
	struct pollfd p[MAX_CONNS + 1];
	for (int i = 0; i < MAX_CONNS; i++)
		conns[i] = (struct conn){.fd = -1};
	for (;;) {
		p[0] = (struct pollfd){.fd = fd, .events = POLLIN};
		for (int i = 0; i < MAX_CONNS; i++)
			p[i + 1] = (struct pollfd){.fd = conns[i].fd, .events = POLLIN};
		if (poll(p, MAX_CONNS + 1, -1) < 0)
			continue;
		for (int i = 0; i < MAX_CONNS; i++)
			if (p[i + 1].revents && !serve(&conns[i]))
				hang_up(&conns[i]);
		if (p[0].revents & POLLIN) {
			int s = accept4(fd, NULL, NULL, SOCK_CLOEXEC);
			int slot = 0;
			while (slot < MAX_CONNS && conns[slot].fd >= 0)
				slot++;
			if (s >= 0 && (slot == MAX_CONNS || !peer_allowed(s))) {
				gw_log("CUDA IPC: refused a connection (%s)", slot == MAX_CONNS ? "too many" : "another user");
				close(s);
			} else if (s >= 0) {
				conns[slot] = (struct conn){.fd = s};
			}
		}
	}
	return NULL;
}

static bool start_server(void) // lock held
{
	if (listen_fd >= 0 || server_failed)
		return listen_fd >= 0;
	struct sockaddr_un a;
	int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	pthread_t t;
	pthread_attr_t attr;
	sigset_t all, old;
	if (getrandom(&key, sizeof key, 0) != sizeof key || fd < 0 || bind(fd, (struct sockaddr *)&a, address(&a, getpid(), key)) ||
	    listen(fd, 16)) {
		gw_log("CUDA IPC: no server socket: %s", strerror(errno));
		server_failed = true;
		if (fd >= 0)
			close(fd);
		return false;
	}
	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	pthread_attr_setstacksize(&attr, 256 * 1024);
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old); // the program's signals are not ours to take
	server_failed = pthread_create(&t, &attr, server, (void *)(intptr_t)fd) != 0;
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	pthread_attr_destroy(&attr);
	if (server_failed)
		close(fd);
	else
		listen_fd = fd;
	return !server_failed;
}

// ---- export

static bool exportable(const struct gw_region *r)
{
	if (r->npieces > GW_IPC_MAX_PIECES || !real_cuMemExportToShareableHandle)
		return false;
	for (uint32_t i = 0; i < r->npieces; i++)
		if (!r->pieces[i].exportable && r->pieces[i].handle)
			return false;
	return true;
}

HIDDEN CUresult gw_ipc_export(struct gw_alloc *a, struct gw_ipc_handle *out)
{
	static atomic_bool said, told;
	struct gw_region *r = a->region;
	struct export *e = exports;
	while (e && e->region != r)
		e = e->next;
	if (!e && (!exportable(r) || !start_server() || !(e = calloc(1, sizeof *e)))) {
		gw_warn_once(&said, "CUDA IPC: this memory cannot be shared (%s): run the program with `gpuwatch exec "
				    "--no-swap` to share device memory between processes",
			     !exportable(r) ? "the device cannot export it as a file descriptor"
					    : "no socket for the processes that would open it");
		return CUDA_ERROR_NOT_SUPPORTED;
	}
	if (!e->id) {
		if (getrandom(e->nonce, sizeof e->nonce, 0) != sizeof e->nonce) {
			free(e);
			return CUDA_ERROR_UNKNOWN;
		}
		*e = (struct export){next_id++, {e->nonce[0], e->nonce[1]}, r, exports};
		exports = e;
	}
	memset(out, 0, sizeof *out);
	memcpy(out->magic, GW_IPC_MAGIC, sizeof GW_IPC_MAGIC);
	out->pid = getpid();
	out->id = e->id;
	memcpy(out->nonce, e->nonce, sizeof out->nonce);
	out->key = key;
	out->offset = a->ptr - r->va;
	out->size = a->size;
	out->region_size = r->size;
	gw_warn_once(&told, "CUDA IPC: memory shared from this process can be opened by processes under `gpuwatch "
			    "exec` (its children are); to share it with any other process, run this one with "
			    "`gpuwatch exec --no-swap`");
	return CUDA_SUCCESS;
}
