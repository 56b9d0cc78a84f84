// Host memory pinning: cuMemHostAlloc against mmap + parallel first touch + cuMemHostRegister.
//   gcc -O2 -pthread -o /tmp/pin_cost bench/pin_cost.c -ldl && /tmp/pin_cost [GiB]
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

typedef int (*fn_init)(unsigned);
typedef int (*fn_retain)(void **, int);
typedef int (*fn_setcur)(void *);
typedef int (*fn_hostalloc)(void **, size_t, unsigned);
typedef int (*fn_freehost)(void *);
typedef int (*fn_register)(void *, size_t, unsigned);
typedef int (*fn_unregister)(void *);

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

struct touch { char *p; size_t n; };
static void *toucher(void *arg)
{
	struct touch *t = arg;
	for (size_t i = 0; i < t->n; i += 4096)
		t->p[i] = 0;
	return NULL;
}

static void touch_parallel(char *p, size_t size, int threads)
{
	pthread_t th[64];
	struct touch t[64];
	size_t part = size / threads;
	for (int i = 0; i < threads; i++) {
		t[i] = (struct touch){p + i * part, i == threads - 1 ? size - i * part : part};
		pthread_create(&th[i], NULL, toucher, &t[i]);
	}
	for (int i = 0; i < threads; i++)
		pthread_join(th[i], NULL);
}

int main(int argc, char **argv)
{
	size_t gib = argc > 1 ? strtoull(argv[1], NULL, 10) : 8, size = gib << 30;
	void *lib = dlopen("libcuda.so.1", RTLD_NOW);
	fn_init init = (fn_init)dlsym(lib, "cuInit");
	fn_retain retain = (fn_retain)dlsym(lib, "cuDevicePrimaryCtxRetain");
	fn_setcur setcur = (fn_setcur)dlsym(lib, "cuCtxSetCurrent");
	fn_hostalloc hostalloc = (fn_hostalloc)dlsym(lib, "cuMemHostAlloc");
	fn_freehost freehost = (fn_freehost)dlsym(lib, "cuMemFreeHost");
	fn_register reg = (fn_register)dlsym(lib, "cuMemHostRegister_v2");
	fn_unregister unreg = (fn_unregister)dlsym(lib, "cuMemHostUnregister");
	void *ctx, *p;
	init(0);
	retain(&ctx, 0);
	setcur(ctx);
	double t = now();
	int r = hostalloc(&p, size, 1);
	printf("cuMemHostAlloc %zu GiB: rc %d %.3f s (%.2f s/GiB)\n", gib, r, now() - t, (now() - t) / gib);
	freehost(p);
	for (int huge = 0; huge < 2; huge++)
		for (int threads = 1; threads <= 16; threads *= 4) {
			t = now();
			char *m = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
			if (huge)
				madvise(m, size, MADV_HUGEPAGE);
			touch_parallel(m, size, threads);
			double touched = now();
			r = reg(m, size, 1);
			double done = now();
			printf("mmap%s + touch x%d %.3f s + cuMemHostRegister rc %d %.3f s = %.2f s/GiB\n",
			       huge ? " (THP)" : "", threads, touched - t, r, done - touched, (done - t) / gib);
			unreg(m);
			munmap(m, size);
		}
	return 0;
}
