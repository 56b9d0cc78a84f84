// Configuration, the shared page and the connection to the daemon, which may pause, swap and resume us.
#include "interposer.h"

#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define DEFAULT_SOCKET "/run/gpuwatch/gpuwatch.sock"
#define RECONNECT_MS 1000
#define POLL_MS 100

HIDDEN struct gw_config gw_cfg = {.priority = 1, .swap = true, .real_libcuda = "libcuda.so.1"};
static struct gw_shm local_page; // until the shared page exists, and if it cannot be made
HIDDEN struct gw_shm *gw = &local_page;
static int shm_fd = -1;
static pthread_mutex_t control_lock = PTHREAD_MUTEX_INITIALIZER; // one pause, swap or resume at a time

HIDDEN uint64_t gw_now_ns(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static void vlog(const char *fmt, va_list ap)
{
	char line[512];
	int n = snprintf(line, sizeof line, "gpuwatch-interposer[%d]: ", getpid());
	vsnprintf(line + n, sizeof line - n, fmt, ap);
	fprintf(stderr, "%s\n", line);
}

HIDDEN void gw_log(const char *fmt, ...)
{
	if (!gw_cfg.debug)
		return;
	va_list ap;
	va_start(ap, fmt);
	vlog(fmt, ap);
	va_end(ap);
}

HIDDEN void gw_warn_once(atomic_bool *said, const char *fmt, ...)
{
	if (atomic_exchange(said, true))
		return;
	va_list ap;
	va_start(ap, fmt);
	vlog(fmt, ap);
	va_end(ap);
}

// ---- configuration

static void configure(void)
{
	const char *s;
	if ((s = getenv("GPUWATCH_MEM_LIMIT")) && *s) {
		char *end;
		errno = 0;
		unsigned long long v = strtoull(s, &end, 10);
		if (errno || *end || !v)
			fprintf(stderr, "gpuwatch-interposer: GPUWATCH_MEM_LIMIT=%s is not a size in bytes; "
				"running without a quota\n", s);
		else
			gw_cfg.mem_limit = v;
	}
	if ((s = getenv("GPUWATCH_PRIORITY")))
		gw_cfg.priority = !strcmp(s, "low") ? 0 : !strcmp(s, "high") ? 2 : 1;
	if ((s = getenv("GPUWATCH_SWAP")) && !strcmp(s, "0"))
		gw_cfg.swap = false;
	gw_cfg.debug = (s = getenv("GPUWATCH_DEBUG")) && *s && strcmp(s, "0");
	s = getenv("GPUWATCH_SOCKET");
	gw_cfg.socket = !s ? DEFAULT_SOCKET : *s ? s : NULL;
	if ((s = getenv("GPUWATCH_REAL_LIBCUDA")) && *s)
		gw_cfg.real_libcuda = s;
}

static void page_init(struct gw_shm *p)
{
	p->magic = GW_SHM_MAGIC;
	p->version = GW_SHM_VERSION;
	p->pid = getpid();
	p->max_devices = GW_MAX_DEVICES;
	p->priority = gw_cfg.priority;
	atomic_store(&p->flags, gw_cfg.swap ? GW_FLAG_SWAP : 0);
	for (int d = 0; d < GW_MAX_DEVICES; d++)
		atomic_store(&p->dev[d].quota, gw_cfg.mem_limit);
}

static void make_shared_page(void)
{
	int fd = memfd_create("gpuwatch-interposer", MFD_CLOEXEC | MFD_ALLOW_SEALING);
	void *p = MAP_FAILED;
	if (fd >= 0 && !ftruncate(fd, GW_SHM_SIZE))
		p = mmap(NULL, GW_SHM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (p == MAP_FAILED) {
		fprintf(stderr, "gpuwatch-interposer: no shared page (%s): the daemon will not see this process\n",
			strerror(errno));
		if (fd >= 0)
			close(fd);
		page_init(&local_page);
		return;
	}
	shm_fd = fd;
	page_init(p);
	gw = p;
}

// ---- the daemon connection

static int connect_daemon(void)
{
	struct sockaddr_un addr = {.sun_family = AF_UNIX};
	if (strlen(gw_cfg.socket) >= sizeof addr.sun_path)
		return -1;
	strcpy(addr.sun_path, gw_cfg.socket);
	int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (s < 0)
		return -1;
	if (connect(s, (struct sockaddr *)&addr, sizeof addr)) {
		close(s);
		return -1;
	}
	return s;
}

static bool send_line(int s, const char *line)
{
	size_t n = strlen(line), done = 0;
	while (done < n) {
		ssize_t w = send(s, line + done, n - done, MSG_NOSIGNAL);
		if (w <= 0 && errno != EINTR)
			return false;
		done += w > 0 ? (size_t)w : 0;
	}
	return true;
}

#define LINE_HEAD 128 // what is kept of a line that overflows the reader: enough to refuse it and name its id

struct line_reader {
	char buf[4096];
	size_t len;
	size_t dropped; // bytes of the current line dropped because it overflowed buf
};

// 1: a line in `out` (its first cap - 1 bytes; it may hold NUL bytes) and its full length, without the
// newline, in *len (when len is not NULL); 0: nothing yet; -1: closed or failed. A line longer than the
// buffer does not fail: its first LINE_HEAD bytes are kept, the rest up to its newline is dropped and
// counted in *len, so the caller sees it and can refuse it.
static int read_line(int s, struct line_reader *r, char *out, size_t cap, size_t *len)
{
	for (;;) {
		char *nl = memchr(r->buf, '\n', r->len);
		if (nl) {
			size_t n = (size_t)(nl - r->buf), copy = n < cap - 1 ? n : cap - 1;
			memcpy(out, r->buf, copy);
			out[copy] = '\0';
			if (len)
				*len = n + r->dropped;
			memmove(r->buf, nl + 1, r->len - n - 1);
			r->len -= n + 1;
			r->dropped = 0;
			return 1;
		}
		if (r->len == sizeof r->buf) { // no newline in a full buffer: keep the head, drop the rest
			r->dropped += r->len - LINE_HEAD;
			r->len = LINE_HEAD;
		}
		ssize_t got = recv(s, r->buf + r->len, sizeof r->buf - r->len, MSG_DONTWAIT);
		if (got == 0)
			return -1;
		if (got < 0)
			return errno == EAGAIN || errno == EINTR ? 0 : -1;
		r->len += (size_t)got;
	}
}

// ---- requests from the daemon: one line each, "<id> <op>[ <arg>]" (docs/interposer.md, "Daemon protocol")

#define REQUEST_MAX 80 // bytes in a request line, without its newline

enum gw_op { GW_OP_PAUSE, GW_OP_RESUME, GW_OP_SWAP_OUT, GW_OP_QUOTA, GW_OP_BOUND, GW_OP_NO_ROOM, GW_OP_DROP_HOST };

static const struct {
	const char *name;
	bool arg; // takes one decimal u64 argument
} gw_ops[] = {
	[GW_OP_PAUSE] = {"pause", false},      [GW_OP_RESUME] = {"resume", false},
	[GW_OP_SWAP_OUT] = {"swap_out", true}, [GW_OP_QUOTA] = {"quota", true},
	[GW_OP_BOUND] = {"bound", true},       [GW_OP_NO_ROOM] = {"no_room", false},
	[GW_OP_DROP_HOST] = {"drop_host", false},
};

struct gw_request {
	uint64_t id; // 0 until the id has parsed
	enum gw_op op;
	uint64_t arg; // swap_out, quota: bytes; bound: 0 or 1; others: 0
};

// A decimal u64 in canonical form: "0", or a digit 1-9 and more digits, at most 2^64 - 1; no sign, no
// space. Returns the first byte after the digits, or NULL.
static const char *parse_u64(const char *p, uint64_t *out)
{
	uint64_t v = 0;
	const char *start = p;
	if (*p < '0' || *p > '9' || (p[0] == '0' && p[1] >= '0' && p[1] <= '9'))
		return NULL;
	for (; *p >= '0' && *p <= '9'; p++) {
		unsigned d = (unsigned)(*p - '0');
		if (v > (UINT64_MAX - d) / 10)
			return NULL;
		v = v * 10 + d;
	}
	*out = v;
	return p > start ? p : NULL;
}

// Parses one request line (without its newline). Returns NULL with *out filled, or a short reason (a
// constant, safe to put in a JSON string) with out->id set if the id parsed, else 0.
static const char *parse_request(const char *line, struct gw_request *out)
{
	*out = (struct gw_request){.id = 0};
	uint64_t id;
	const char *p = parse_u64(line, &id);
	if (!p || !id || *p != ' ')
		return "bad id";
	out->id = id;
	if (strlen(line) > REQUEST_MAX)
		return "line too long";
	const char *name = ++p;
	size_t n = strcspn(name, " ");
	p = name + n;
	size_t op = 0;
	while (op < sizeof gw_ops / sizeof gw_ops[0] && (strlen(gw_ops[op].name) != n || memcmp(gw_ops[op].name, name, n)))
		op++;
	if (op == sizeof gw_ops / sizeof gw_ops[0])
		return "unknown op";
	out->op = (enum gw_op)op;
	if (!gw_ops[op].arg)
		return *p ? "unexpected argument" : NULL;
	if (*p != ' ')
		return "missing argument";
	p = parse_u64(p + 1, &out->arg);
	if (!p)
		return "bad number";
	if (*p == ' ')
		return "too many arguments";
	if (*p)
		return "bad number";
	if (out->op == GW_OP_BOUND && out->arg > 1)
		return "bound takes 0 or 1";
	return NULL;
}

static const char *state_name(uint32_t s)
{
	static const char *const names[] = {"running", "paused", "swapping_out", "swapped", "swapping_in"};
	return s < 5 ? names[s] : "unknown";
}

// Answers one request line of `len` bytes (NUL bytes in it make it malformed).
static void answer(int s, const char *line, size_t len)
{
	char reply[256];
	struct gw_request q;
	uint64_t moved = 0;
	int r = 0;
	const char *bad = parse_request(line, &q);
	if (!bad && strlen(line) != len)
		bad = "NUL byte in the line";
	if (bad) {
		gw_log("refused a request (%s): %.*s", bad, REQUEST_MAX, line);
		snprintf(reply, sizeof reply, "{\"id\":%" PRIu64 ",\"ok\":false,\"error\":\"%s\"}\n", q.id, bad);
		send_line(s, reply);
		return;
	}
	pthread_mutex_lock(&control_lock);
	switch (q.op) {
	case GW_OP_PAUSE:
		r = gw_pause();
		break;
	case GW_OP_SWAP_OUT:
		r = gw_swap_out(q.arg, &moved);
		break;
	case GW_OP_RESUME:
		r = gw_resume();
		if (!r)
			gw_room_answer(true);
		break;
	case GW_OP_BOUND:
		if (q.arg)
			atomic_fetch_or(&gw->flags, GW_FLAG_BOUNDED);
		else
			atomic_fetch_and(&gw->flags, ~GW_FLAG_BOUNDED);
		break;
	case GW_OP_NO_ROOM:
		gw_room_answer(false);
		break;
	case GW_OP_DROP_HOST:
		r = gw_drop_host(&moved);
		break;
	case GW_OP_QUOTA:
		for (int d = 0; d < GW_MAX_DEVICES; d++)
			atomic_store(&gw->dev[d].quota, q.arg);
		break;
	}
	pthread_mutex_unlock(&control_lock);
	if (r)
		snprintf(reply, sizeof reply, "{\"id\":%" PRIu64 ",\"ok\":false,\"error\":\"CUDA error %d\",\"state\":\"%s\"}\n",
			 q.id, r, state_name(atomic_load(&gw->state)));
	else
		snprintf(reply, sizeof reply, "{\"id\":%" PRIu64 ",\"ok\":true,\"state\":\"%s\",\"bytes\":%" PRIu64 "}\n",
			 q.id, state_name(atomic_load(&gw->state)), moved);
	send_line(s, reply);
}

static void fail_open(const char *why)
{
	if (atomic_load(&gw->wanted_bytes))
		gw_room_answer(false); // no daemon to make room: the allocations fail as the driver said
	if (atomic_load(&gw->state) != GW_RUNNING || atomic_load(&gw->gate) & GATE_CLOSED) {
		fprintf(stderr, "gpuwatch-interposer[%d]: %s: resuming on our own\n", getpid(), why);
		pthread_mutex_lock(&control_lock);
		gw_resume();
		pthread_mutex_unlock(&control_lock);
	}
}

static bool attach(int s, struct line_reader *r)
{
	char line[512];
	snprintf(line, sizeof line,
		 "{\"cmd\":\"interposer_attach\",\"version\":%d,\"shm_fd\":%d,\"mem_limit\":%" PRIu64
		 ",\"priority\":\"%s\",\"swap\":%s}\n",
		 GW_SHM_VERSION, shm_fd, gw_cfg.mem_limit, (const char *[]){"low", "normal", "high"}[gw_cfg.priority],
		 gw_cfg.swap ? "true" : "false");
	if (!send_line(s, line))
		return false;
	struct pollfd p = {.fd = s, .events = POLLIN};
	uint64_t deadline = gw_now_ns() + 5000000000u;
	int got;
	while ((got = read_line(s, r, line, sizeof line, NULL)) == 0 && gw_now_ns() < deadline)
		poll(&p, 1, POLL_MS);
	if (got != 1 || (!strstr(line, "\"ok\": true") && !strstr(line, "\"ok\":true"))) {
		gw_log("the daemon refused us: %s", got == 1 ? line : "no answer");
		return false;
	}
	if (strstr(line, "\"room\": true") || strstr(line, "\"room\":true")) // it schedules: it can make room
		atomic_fetch_or(&gw->flags, GW_FLAG_ROOM);
	return true;
}

static void *control_thread(void *arg)
{
	(void)arg;
	char line[4096];
	for (;;) {
		int s = connect_daemon();
		struct line_reader reader = {.len = 0, .dropped = 0};
		if (s >= 0 && attach(s, &reader)) {
			gw_log("attached to the daemon on %s", gw_cfg.socket);
			atomic_fetch_or(&gw->flags, GW_FLAG_ATTACHED);
			for (;;) {
				struct pollfd p = {.fd = s, .events = POLLIN};
				poll(&p, 1, POLL_MS);
				int got;
				size_t len;
				while ((got = read_line(s, &reader, line, sizeof line, &len)) == 1)
					answer(s, line, len);
				if (got < 0)
					break;
				uint32_t bounded = atomic_load(&gw->flags) & GW_FLAG_BOUNDED;
				if (bounded)
					atomic_fetch_or(&gw->gate, GATE_BOUNDED);
				else
					atomic_fetch_and(&gw->gate, ~GATE_BOUNDED);
				uint64_t lease = atomic_load(&gw->lease_deadline_ns);
				if (lease && gw_now_ns() > lease)
					fail_open("the daemon's lease expired");
			}
			atomic_fetch_and(&gw->flags, ~(GW_FLAG_ATTACHED | GW_FLAG_BOUNDED | GW_FLAG_ROOM));
			atomic_fetch_and(&gw->gate, ~GATE_BOUNDED);
			atomic_store(&gw->lease_deadline_ns, 0);
			fail_open("the daemon went away");
		}
		if (s >= 0)
			close(s);
		usleep(RECONNECT_MS * 1000);
	}
	return NULL;
}

HIDDEN void gw_control_start(void)
{
	make_shared_page();
	gw_slots_reset();
	if (!gw_cfg.socket)
		return;
	pthread_t t;
	pthread_attr_t attr;
	sigset_t all, old;
	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	pthread_attr_setstacksize(&attr, 256 * 1024);
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old); // the program's signals are not ours to take
	if (pthread_create(&t, &attr, control_thread, NULL))
		fprintf(stderr, "gpuwatch-interposer: no control thread: the daemon will not reach this process\n");
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	pthread_attr_destroy(&attr);
}

// ---- fork: the child holds no CUDA state and none of our threads

static void after_fork_in_child(void)
{
	pthread_mutex_init(&control_lock, NULL);
	gw_memory_reset();
	gw_slots_reset();
	if (gw != &local_page) {
		munmap(gw, GW_SHM_SIZE);
		close(shm_fd);
		shm_fd = -1;
		gw = &local_page;
	}
	memset(&local_page, 0, sizeof local_page);
	page_init(&local_page); // a forked child cannot use CUDA: it stays off the daemon's books
}

__attribute__((constructor)) static void interposer_init(void)
{
	configure();
	page_init(&local_page);
	pthread_atfork(NULL, NULL, after_fork_in_child);
}

// ---- the in-process API

API int gpuwatch_pause(void)
{
	if (!gw_ensure_driver(NULL))
		return CUDA_ERROR_NOT_INITIALIZED;
	pthread_mutex_lock(&control_lock);
	int r = gw_pause();
	pthread_mutex_unlock(&control_lock);
	return r;
}

API int gpuwatch_swap_out(unsigned long long bytes)
{
	if (!gw_ensure_driver(NULL))
		return CUDA_ERROR_NOT_INITIALIZED;
	uint64_t moved;
	pthread_mutex_lock(&control_lock);
	int r = gw_swap_out(bytes, &moved);
	pthread_mutex_unlock(&control_lock);
	return r;
}

API int gpuwatch_resume(void)
{
	pthread_mutex_lock(&control_lock);
	int r = gw_resume();
	pthread_mutex_unlock(&control_lock);
	return r;
}

API const void *gpuwatch_shm(void) { return gw; }
