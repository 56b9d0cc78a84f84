// The C cases of bench/compat.py: a program built with nvcc that calls the runtime and the driver directly.
//   nvcc -O2 -o compat_driver bench/compat_driver.cu -lcuda
//   compat_driver arrays|ipc|graphs|pools|fork|ipccost|createcost
// Each case prints one line `RESULT {"value": ...}` (a checksum, or timings for the two *cost cases); a CUDA
// error prints `FAILED <call>: <error name> <error string>` and exits 1. At its midpoint a case with state calls
// midpoint(): with GW_COMPAT_SWAP=daemon or hold it prints MIDPOINT and waits for a line on stdin (the harness
// reads `gpuwatch ps` and, for daemon, swaps the process out and back meanwhile); with GW_COMPAT_SWAP=self it
// swaps itself out and back with the interposer's in-process API. ipc runs a second copy of itself (`ipc-child HANDLE EVENT`) that opens the memory; with
// GW_COMPAT_CHILD_PLAIN set, that copy runs without LD_PRELOAD (an importer not under gpuwatch exec).
#include <cuda.h>
#include <cuda_runtime.h>
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define RT(x) rt_check((x), #x)
#define DRV(x) drv_check((x), #x)

static void rt_check(cudaError_t e, const char *what)
{
	if (e == cudaSuccess)
		return;
	printf("FAILED %s: %s %s\n", what, cudaGetErrorName(e), cudaGetErrorString(e));
	exit(1);
}

static void drv_check(CUresult e, const char *what)
{
	const char *name = "?", *text = "?";
	if (e == CUDA_SUCCESS)
		return;
	cuGetErrorName(e, &name);
	cuGetErrorString(e, &text);
	printf("FAILED %s: %s %s\n", what, name, text);
	exit(1);
}

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

static void midpoint(void)
{
	const char *how = getenv("GW_COMPAT_SWAP");
	char line[64];
	RT(cudaDeviceSynchronize());
	if (how && (!strcmp(how, "daemon") || !strcmp(how, "hold"))) {
		printf("MIDPOINT\n");
		fflush(stdout);
		if (!fgets(line, sizeof line, stdin))
			exit(3);
	} else if (how && !strcmp(how, "self")) {
		int (*out)(unsigned long long) = (int (*)(unsigned long long))dlsym(RTLD_DEFAULT, "gpuwatch_swap_out");
		int (*in)(void) = (int (*)(void))dlsym(RTLD_DEFAULT, "gpuwatch_resume");
		const uint64_t *(*shm)(void) = (const uint64_t *(*)(void))dlsym(RTLD_DEFAULT, "gpuwatch_shm");
		int r = out && in && shm ? out(0) : -1;
		const uint64_t *page = shm ? shm() : NULL; // docs/interposer.md: swap_out_bytes_total at 40, device 0 at 256
		printf("SWAPPED %d %d moved=%llu used=%llu unswappable=%llu\n", r, in ? in() : -1,
		       page ? (unsigned long long)page[5] : 0ull, page ? (unsigned long long)page[33] : 0ull,
		       page ? (unsigned long long)page[35] : 0ull);
	}
}

__global__ void fill(unsigned *p, size_t n, unsigned seed)
{
	for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
		p[i] = (unsigned)(i * 2654435761u) ^ seed;
}

__global__ void add(unsigned *p, size_t n, unsigned v)
{
	for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
		p[i] += v;
}

static unsigned long long checksum(const unsigned *d, size_t n)
{
	unsigned *h = (unsigned *)malloc(n * sizeof *h);
	unsigned long long s = 0;
	RT(cudaMemcpy(h, d, n * sizeof *h, cudaMemcpyDeviceToHost));
	for (size_t i = 0; i < n; i++)
		s = s * 1099511628211ull + h[i];
	free(h);
	return s;
}

static unsigned long long host_sum(const void *p, size_t bytes)
{
	const unsigned char *c = (const unsigned char *)p;
	unsigned long long s = 0;
	for (size_t i = 0; i < bytes; i++)
		s = s * 1099511628211ull + c[i];
	return s;
}

// ---- cases

static void arrays(void)
{
	const size_t w = 1024, h = 1024;
	size_t bytes = w * h * sizeof(float4);
	float4 *src = (float4 *)malloc(bytes), *back = (float4 *)malloc(bytes);
	for (size_t i = 0; i < w * h; i++)
		src[i] = make_float4(i, i * 0.5f, -1.0f * i, 7);
	cudaChannelFormatDesc f4 = cudaCreateChannelDesc<float4>(), u8 = cudaCreateChannelDesc<unsigned char>();
	cudaArray_t a2, a3;
	cudaMipmappedArray_t mip;
	RT(cudaMallocArray(&a2, &f4, w, h));
	RT(cudaMalloc3DArray(&a3, &u8, make_cudaExtent(256, 256, 256)));
	RT(cudaMallocMipmappedArray(&mip, &f4, make_cudaExtent(512, 512, 0), 10));
	CUarray da;
	CUDA_ARRAY3D_DESCRIPTOR d = {512, 512, 16, CU_AD_FORMAT_HALF, 2, CUDA_ARRAY3D_LAYERED};
	DRV(cuArray3DCreate(&da, &d));
	RT(cudaMemcpy2DToArray(a2, 0, 0, src, w * sizeof(float4), w * sizeof(float4), h, cudaMemcpyHostToDevice));
	midpoint();
	RT(cudaMemcpy2DFromArray(back, w * sizeof(float4), a2, 0, 0, w * sizeof(float4), h, cudaMemcpyDeviceToHost));
	unsigned long long s = host_sum(back, bytes);
	RT(cudaFreeArray(a2));
	RT(cudaFreeArray(a3));
	RT(cudaFreeMipmappedArray(mip));
	DRV(cuArrayDestroy(da));
	printf("RESULT {\"value\": \"%016llx\", \"same\": %s}\n", s, memcmp(src, back, bytes) ? "false" : "true");
}

static void ipc_child(const char *mem_hex, const char *event_hex)
{
	cudaIpcMemHandle_t mh;
	cudaIpcEventHandle_t eh;
	unsigned *p;
	cudaEvent_t e;
	for (int i = 0; i < 64; i++) {
		sscanf(mem_hex + 2 * i, "%2hhx", &mh.reserved[i]);
		sscanf(event_hex + 2 * i, "%2hhx", &eh.reserved[i]);
	}
	RT(cudaIpcOpenMemHandle((void **)&p, mh, cudaIpcMemLazyEnablePeerAccess));
	RT(cudaIpcOpenEventHandle(&e, eh));
	add<<<256, 256>>>(p, 16u << 20, 5);
	RT(cudaEventRecord(e, 0));
	RT(cudaEventSynchronize(e));
	RT(cudaIpcCloseMemHandle(p));
	printf("child done\n");
}

static void ipc(const char *self)
{
	const size_t n = 16u << 20; // 64 MiB
	unsigned *p, *other;
	cudaIpcMemHandle_t mh;
	cudaIpcEventHandle_t eh;
	cudaEvent_t e;
	char mem_hex[129], event_hex[129];
	RT(cudaMalloc(&p, n * sizeof *p));
	RT(cudaMalloc(&other, n * sizeof *other));
	fill<<<256, 256>>>(p, n, 11);
	fill<<<256, 256>>>(other, n, 12);
	RT(cudaEventCreateWithFlags(&e, cudaEventDisableTiming | cudaEventInterprocess));
	RT(cudaIpcGetMemHandle(&mh, p));
	RT(cudaIpcGetEventHandle(&eh, e));
	for (int i = 0; i < 64; i++) {
		snprintf(mem_hex + 2 * i, 3, "%02x", (unsigned char)mh.reserved[i]);
		snprintf(event_hex + 2 * i, 3, "%02x", (unsigned char)eh.reserved[i]);
	}
	RT(cudaDeviceSynchronize());
	fflush(stdout);
	pid_t child = fork();
	if (!child) {
		if (getenv("GW_COMPAT_CHILD_PLAIN")) // the importer runs without the interposer
			unsetenv("LD_PRELOAD");
		execl("/proc/self/exe", self, "ipc-child", mem_hex, event_hex, (char *)NULL);
		_exit(127);
	}
	int status;
	waitpid(child, &status, 0);
	if (!WIFEXITED(status) || WEXITSTATUS(status)) {
		printf("FAILED the importing process: exit status %d\n", WIFEXITED(status) ? WEXITSTATUS(status) : -1);
		exit(1);
	}
	midpoint();
	printf("RESULT {\"value\": \"%016llx %016llx\"}\n", checksum(p, n), checksum(other, n));
}

static void graphs(void)
{
	const size_t n = 8u << 20; // 32 MiB
	cudaStream_t s;
	cudaGraph_t g;
	cudaGraphExec_t x;
	unsigned *out, *tmp;
	size_t reserved = 0;
	RT(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
	RT(cudaMalloc(&out, n * sizeof *out));
	RT(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
	RT(cudaMallocAsync(&tmp, n * sizeof *tmp, s));
	fill<<<256, 256, 0, s>>>(tmp, n, 3);
	add<<<256, 256, 0, s>>>(tmp, n, 1);
	RT(cudaMemcpyAsync(out, tmp, n * sizeof *tmp, cudaMemcpyDeviceToDevice, s));
	RT(cudaFreeAsync(tmp, s));
	RT(cudaStreamEndCapture(s, &g));
	RT(cudaGraphInstantiate(&x, g, 0));
	for (int i = 0; i < 10; i++)
		RT(cudaGraphLaunch(x, s));
	RT(cudaStreamSynchronize(s));
	RT(cudaDeviceGetGraphMemAttribute(0, cudaGraphMemAttrReservedMemCurrent, &reserved));
	midpoint();
	RT(cudaGraphLaunch(x, s));
	RT(cudaStreamSynchronize(s));
	unsigned long long sum = checksum(out, n);
	RT(cudaGraphExecDestroy(x));
	RT(cudaGraphDestroy(g));
	RT(cudaDeviceGraphMemTrim(0));
	size_t after = 1;
	RT(cudaDeviceGetGraphMemAttribute(0, cudaGraphMemAttrReservedMemCurrent, &after));
	printf("RESULT {\"value\": \"%016llx\", \"reserved\": %zu, \"after_trim\": %zu}\n", sum, reserved, after);
}

static void pools(void)
{
	const size_t n = 4u << 20;
	cudaStream_t s;
	cudaMemPool_t pool;
	cudaMemPoolProps props = {};
	unsigned *a, *b, *keep;
	props.allocType = cudaMemAllocationTypePinned;
	props.location = {cudaMemLocationTypeDevice, 0};
	RT(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
	RT(cudaMemPoolCreate(&pool, &props));
	RT(cudaMalloc(&keep, n * sizeof *keep));
	unsigned long long sum = 0;
	for (int i = 0; i < 20; i++) {
		RT(cudaMallocAsync(&a, n * sizeof *a, s));
		RT(cudaMallocFromPoolAsync(&b, n * sizeof *b, pool, s));
		fill<<<256, 256, 0, s>>>(a, n, i);
		RT(cudaMemcpyAsync(b, a, n * sizeof *a, cudaMemcpyDeviceToDevice, s));
		add<<<256, 256, 0, s>>>(b, n, 1);
		RT(cudaMemcpyAsync(keep, b, n * sizeof *b, cudaMemcpyDeviceToDevice, s));
		RT(cudaFreeAsync(a, s));
		RT(cudaFreeAsync(b, s));
		if (i == 10)
			midpoint();
		RT(cudaStreamSynchronize(s));
		sum ^= checksum(keep, n);
	}
	RT(cudaMemPoolDestroy(pool));
	printf("RESULT {\"value\": \"%016llx\"}\n", sum);
}

static void forks(void)
{
	const size_t n = 4u << 20;
	unsigned *p;
	RT(cudaMalloc(&p, n * sizeof *p));
	fill<<<256, 256>>>(p, n, 9);
	RT(cudaDeviceSynchronize());
	fflush(stdout);
	pid_t child = fork(); // after CUDA is initialised: the child does host work only, as CUDA requires
	if (!child) {
		unsigned long long s = 0;
		for (unsigned i = 0; i < 1000000; i++)
			s += i * 3u;
		_exit(s == 1499998500000ull ? 0 : 4);
	}
	int status;
	waitpid(child, &status, 0);
	midpoint();
	add<<<256, 256>>>(p, n, 2);
	printf("RESULT {\"value\": \"%016llx\", \"child\": %d}\n", checksum(p, n), WIFEXITED(status) ? WEXITSTATUS(status) : -1);
}

// Opening memory shared by IPC: one handle per 64 MiB allocation, opened and closed by a second process.
static void ipccost(const char *self, int argc, char **argv)
{
	enum { N = 16 };
	const size_t bytes = 64u << 20;
	if (argc > 2) { // the child: argv[2..] are handles
		double open = 0, close_ = 0;
		for (int h = 2; h < argc; h++) {
			cudaIpcMemHandle_t mh;
			void *p;
			for (int i = 0; i < 64; i++)
				sscanf(argv[h] + 2 * i, "%2hhx", &mh.reserved[i]);
			double t = now();
			RT(cudaIpcOpenMemHandle(&p, mh, cudaIpcMemLazyEnablePeerAccess));
			open += now() - t;
			t = now();
			RT(cudaIpcCloseMemHandle(p));
			close_ += now() - t;
		}
		printf("RESULT {\"open_us\": %.1f, \"close_us\": %.1f}\n", open / (argc - 2) * 1e6, close_ / (argc - 2) * 1e6);
		return;
	}
	char *args[N + 3], hex[N][129];
	double t = now();
	args[0] = (char *)self;
	args[1] = (char *)"ipccost";
	for (int k = 0; k < N; k++) {
		void *p;
		cudaIpcMemHandle_t mh;
		RT(cudaMalloc(&p, bytes));
		RT(cudaIpcGetMemHandle(&mh, p));
		for (int i = 0; i < 64; i++)
			snprintf(hex[k] + 2 * i, 3, "%02x", (unsigned char)mh.reserved[i]);
		args[k + 2] = hex[k];
	}
	args[N + 2] = NULL;
	printf("EXPORTED %.1f us per handle\n", (now() - t) / N * 1e6);
	fflush(stdout);
	pid_t child = fork();
	if (!child) {
		execv("/proc/self/exe", args);
		_exit(127);
	}
	int status;
	waitpid(child, &status, 0);
}

// cuMemCreate + cuMemMap + cuMemSetAccess and back, with and without the POSIX file descriptor handle type.
static void createcost(void)
{
	CUdevice dev;
	CUcontext ctx;
	DRV(cuInit(0));
	DRV(cuDeviceGet(&dev, 0));
	DRV(cuDevicePrimaryCtxRetain(&ctx, dev));
	DRV(cuCtxSetCurrent(ctx));
	printf("RESULT {");
	const size_t sizes[] = {2u << 20, 1u << 30};
	const int counts[] = {512, 8};
	for (int k = 0; k < 2; k++)
		for (int fd = 0; fd < 2; fd++) {
			CUmemAllocationProp prop = {};
			prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
			prop.location = {CU_MEM_LOCATION_TYPE_DEVICE, dev};
			prop.requestedHandleTypes = fd ? CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR : CU_MEM_HANDLE_TYPE_NONE;
			CUmemAccessDesc access = {{CU_MEM_LOCATION_TYPE_DEVICE, dev}, CU_MEM_ACCESS_FLAGS_PROT_READWRITE};
			CUdeviceptr va;
			CUmemGenericAllocationHandle h[512];
			DRV(cuMemAddressReserve(&va, sizes[k] * counts[k], 0, 0, 0));
			double t = now();
			for (int i = 0; i < counts[k]; i++) {
				DRV(cuMemCreate(&h[i], sizes[k], &prop, 0));
				DRV(cuMemMap(va + i * sizes[k], sizes[k], 0, h[i], 0));
				DRV(cuMemSetAccess(va + i * sizes[k], sizes[k], &access, 1));
			}
			double made = now() - t;
			t = now();
			for (int i = 0; i < counts[k]; i++) {
				DRV(cuMemUnmap(va + i * sizes[k], sizes[k]));
				DRV(cuMemRelease(h[i]));
			}
			double gone = now() - t;
			DRV(cuMemAddressFree(va, sizes[k] * counts[k]));
			printf("%s\"%s_%s_us\": [%.1f, %.1f]", k || fd ? ", " : "", k ? "1GiB" : "2MiB", fd ? "fd" : "plain",
			       made / counts[k] * 1e6, gone / counts[k] * 1e6);
		}
	printf("}\n");
}

int main(int argc, char **argv)
{
	const char *c = argc > 1 ? argv[1] : "";
	if (!strcmp(c, "arrays"))
		arrays();
	else if (!strcmp(c, "ipc"))
		ipc(argv[0]);
	else if (!strcmp(c, "ipc-child") && argc == 4)
		ipc_child(argv[2], argv[3]);
	else if (!strcmp(c, "graphs"))
		graphs();
	else if (!strcmp(c, "pools"))
		pools();
	else if (!strcmp(c, "fork"))
		forks();
	else if (!strcmp(c, "ipccost"))
		ipccost(argv[0], argc, argv);
	else if (!strcmp(c, "createcost"))
		createcost();
	else {
		fprintf(stderr, "usage: %s arrays|ipc|graphs|pools|fork|ipccost|createcost\n", argv[0]);
		return 2;
	}
	return 0;
}
