/* Allocation churn for the event-rate benchmark: THREADS threads each make PAIRS cuMemAlloc_v2 +
 * cuMemFree_v2 pairs on a dlopen()ed libcuda.  usage: churn LIBCUDA THREADS PAIRS SIZE */
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

typedef unsigned long long CUdeviceptr;
typedef int (*alloc_fn)(CUdeviceptr *, size_t);
typedef int (*free_fn)(CUdeviceptr);
typedef int (*retain_fn)(void **, int);
typedef int (*setcur_fn)(void *);

static alloc_fn cu_alloc;
static free_fn cu_free;
static retain_fn cu_retain;
static setcur_fn cu_setcur;
static long pairs;
static size_t size;

static void *run(void *arg)
{
    void *ctx;
    (void)arg;
    if (cu_retain(&ctx, 0) || cu_setcur(ctx))
        return (void *)1;
    for (long i = 0; i < pairs; i++) {
        CUdeviceptr p;
        if (cu_alloc(&p, size) || cu_free(p))
            return (void *)1;
    }
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: churn LIBCUDA THREADS PAIRS SIZE\n");
        return 2;
    }
    void *lib = dlopen(argv[1], RTLD_NOW);
    if (!lib) {
        fprintf(stderr, "churn: %s\n", dlerror());
        return 1;
    }
    int (*init)(unsigned) = (int (*)(unsigned))dlsym(lib, "cuInit");
    cu_alloc = (alloc_fn)dlsym(lib, "cuMemAlloc_v2");
    cu_free = (free_fn)dlsym(lib, "cuMemFree_v2");
    cu_retain = (retain_fn)dlsym(lib, "cuDevicePrimaryCtxRetain");
    cu_setcur = (setcur_fn)dlsym(lib, "cuCtxSetCurrent");
    int threads = atoi(argv[2]);
    pairs = atol(argv[3]);
    size = strtoull(argv[4], NULL, 0);
    if (init(0) || threads < 1 || threads > 256)
        return 1;
    pthread_t tid[256];
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (int i = 0; i < threads; i++)
        pthread_create(&tid[i], NULL, run, NULL);
    int failed = 0;
    for (int i = 0; i < threads; i++) {
        void *rc;
        pthread_join(tid[i], &rc);
        failed |= rc != NULL;
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("%.6f\n", (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9);
    return failed;
}
