// The gate: every work submission passes it; the swapper closes it and waits for calls in progress.
#include "interposer.h"

#include <limits.h>
#include <linux/futex.h>
#include <linux/membarrier.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

HIDDEN __thread struct gw_slot *gw_tls_slot __attribute__((tls_model("initial-exec")));
HIDDEN struct gw_slot *gw_overflow_slot; // shared by threads beyond GW_SLOTS - 1: counted with locked instructions
HIDDEN bool gw_membarrier;
static pthread_key_t slot_key;
static pthread_once_t key_once = PTHREAD_ONCE_INIT;

static void slot_release(void *slot) { atomic_store(&((struct gw_slot *)slot)->tid, 0); }
static void key_create(void) { pthread_key_create(&slot_key, slot_release); }

HIDDEN void gw_slots_reset(void)
{
	pthread_once(&key_once, key_create);
	gw_overflow_slot = &gw->slots[0];
	gw_tls_slot = NULL;
}

static struct gw_slot *slot_acquire(void)
{
	uint32_t tid = (uint32_t)syscall(SYS_gettid);
	for (int i = 1; i < GW_SLOTS; i++) {
		uint32_t free_ = 0;
		if (atomic_load_explicit(&gw->slots[i].tid, memory_order_relaxed) == 0 &&
		    atomic_compare_exchange_strong(&gw->slots[i].tid, &free_, tid)) {
			pthread_setspecific(slot_key, &gw->slots[i]);
			return gw_tls_slot = &gw->slots[i];
		}
	}
	return gw_tls_slot = gw_overflow_slot;
}

static void futex(_Atomic uint32_t *word, int op, uint32_t value, const struct timespec *timeout)
{
	syscall(SYS_futex, (uint32_t *)word, op | FUTEX_PRIVATE_FLAG, value, timeout, NULL, 0);
}

HIDDEN struct gw_slot *gw_gate_enter_slow(uint32_t *bits)
{
	if (!gw_overflow_slot)
		gw_slots_reset();
	if (!gw_tls_slot)
		slot_acquire();
	if (gw_tls_slot != gw_overflow_slot)
		return gw_gate_enter(bits);
	struct gw_slot *s = gw_overflow_slot;
	atomic_fetch_add(&s->active, 1);
	uint32_t g = atomic_load(&gw->gate);
	*bits = g;
	return g & GATE_CLOSED ? gw_gate_wait(s, bits) : s;
}

// Waits outside the call (so a drain does not wait for us) until the gate opens, then enters again.
HIDDEN struct gw_slot *gw_gate_wait(struct gw_slot *s, uint32_t *bits)
{
	const struct timespec tick = {0, 100 * 1000 * 1000};
	uint64_t start = gw_now_ns();
	uint32_t g;
	atomic_fetch_add(&gw->waiting, 1);
	for (;;) {
		gw_gate_exit(s);
		while ((g = atomic_load(&gw->gate)) & GATE_CLOSED)
			futex(&gw->gate, FUTEX_WAIT, g, &tick);
		if (s == gw_overflow_slot)
			atomic_fetch_add(&s->active, 1);
		else
			atomic_store(&s->active, 1);
		if (!((g = atomic_load(&gw->gate)) & GATE_CLOSED))
			break;
	}
	atomic_fetch_sub(&gw->waiting, 1);
	atomic_fetch_add(&gw->gate_waits, 1);
	atomic_fetch_add(&gw->gate_wait_ns_total, gw_now_ns() - start);
	*bits = g;
	return s;
}

static _Atomic uint32_t room_denied_seq; // room_seq as the last denial left it

HIDDEN bool gw_wait_for_room(struct gw_slot *s, uint64_t bytes)
{
	if (!(atomic_load(&gw->flags) & GW_FLAG_ROOM))
		return false;
	const struct timespec tick = {0, 100 * 1000 * 1000};
	uint32_t seq = atomic_load(&gw->room_seq);
	atomic_fetch_add(&gw->wanted_bytes, bytes);
	atomic_fetch_add(&gw->waiting, 1);
	gw_gate_exit(s); // a swap-out may run while we wait
	gw_log("the device is full: waiting for the daemon to make room for %llu bytes", (unsigned long long)bytes);
	while (atomic_load(&gw->room_seq) == seq && atomic_load(&gw->flags) & GW_FLAG_ROOM)
		futex(&gw->room_seq, FUTEX_WAIT, seq, &tick);
	atomic_fetch_sub(&gw->waiting, 1);
	atomic_fetch_sub(&gw->wanted_bytes, bytes);
	// A denial since this wait began wins over a later "retry" (a resume that comes while this thread is
	// still held at the closed gate): the allocation fails as the driver said.
	bool denied = (int32_t)(atomic_load(&room_denied_seq) - seq) > 0;
	uint32_t bits;
	struct gw_slot *again = gw_gate_enter(&bits); // the same slot: this thread's
	(void)again;
	return atomic_load(&gw->room_seq) != seq && !denied;
}

HIDDEN void gw_room_answer(bool granted)
{
	atomic_store(&gw->room_verdict, granted ? 0 : 1);
	uint32_t seq = atomic_fetch_add(&gw->room_seq, 1) + 1;
	if (!granted)
		atomic_store(&room_denied_seq, seq);
	futex(&gw->room_seq, FUTEX_WAKE, INT_MAX, NULL);
}

HIDDEN void gw_gate_close_and_drain(void)
{
	atomic_fetch_or(&gw->gate, GATE_CLOSED);
	// Every thread now either sees the gate closed or has its `active` store visible to us.
	if (!gw_membarrier || syscall(SYS_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0, 0))
		atomic_thread_fence(memory_order_seq_cst);
	for (int i = 0; i < GW_SLOTS; i++)
		for (int spins = 0; atomic_load(&gw->slots[i].active); spins++)
			if (spins > 100)
				usleep(50);
}

HIDDEN void gw_gate_open(void)
{
	atomic_fetch_and(&gw->gate, ~GATE_CLOSED);
	futex(&gw->gate, FUTEX_WAKE, INT_MAX, NULL);
}

// Bounded queue: every n launches a thread marks its stream and waits for its previous mark, so no more
// than about 2n launches are queued when the gate closes. n adapts: halved when the wait was long
// (the device is far behind), doubled when it was short.
#define BOUND_MIN 8
#define BOUND_MAX 4096
#define BOUND_LONG_NS 1000000
#define BOUND_SHORT_NS 100000
static __thread struct {
	uint32_t since, n;
	int cur;
	bool pending;
	CUcontext ctx;
	CUevent ev[2];
} bq;

HIDDEN void gw_bound_queue(CUstream stream)
{
	if (!bq.n)
		bq.n = 64;
	if (++bq.since < bq.n)
		return;
	bq.since = 0;
	CUcontext ctx = NULL;
	int capturing = 0;
	if (real_cuCtxGetCurrent(&ctx) || !ctx || !real_cuStreamIsCapturing ||
	    real_cuStreamIsCapturing(stream, &capturing) || capturing)
		return;
	if (ctx != bq.ctx) {
		if (real_cuEventCreate(&bq.ev[0], CU_EVENT_DISABLE_TIMING) ||
		    real_cuEventCreate(&bq.ev[1], CU_EVENT_DISABLE_TIMING)) {
			bq.ctx = NULL;
			return;
		}
		bq.ctx = ctx;
		bq.pending = false;
	}
	if (real_cuEventRecord(bq.ev[bq.cur], stream))
		return;
	if (bq.pending) {
		uint64_t start = gw_now_ns();
		real_cuEventSynchronize(bq.ev[bq.cur ^ 1]);
		uint64_t waited = gw_now_ns() - start;
		if (waited > BOUND_LONG_NS && bq.n > BOUND_MIN)
			bq.n /= 2;
		else if (waited < BOUND_SHORT_NS && bq.n < BOUND_MAX)
			bq.n *= 2;
	}
	bq.pending = true;
	bq.cur ^= 1;
}

__attribute__((constructor)) static void membarrier_register(void)
{
	long cmds = syscall(SYS_membarrier, MEMBARRIER_CMD_QUERY, 0, 0);
	gw_membarrier = cmds > 0 && cmds & MEMBARRIER_CMD_PRIVATE_EXPEDITED &&
			!syscall(SYS_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED, 0, 0);
}
