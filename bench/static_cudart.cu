// A program with the CUDA runtime linked statically (nvcc's default): the interposer must still see it.
//   nvcc -o /tmp/static_cudart bench/static_cudart.cu -ldl
//   LD_PRELOAD=interposer/libgpuwatch.so GPUWATCH_SOCKET= GPUWATCH_MEM_LIMIT=$((2<<30)) /tmp/static_cudart 1024
#include <cuda_runtime.h>
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

__global__ void fill(unsigned *p, size_t n)
{
	for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
		p[i] = (unsigned)(i * 2654435761u);
}

int main(int argc, char **argv)
{
	size_t mib = argc > 1 ? strtoull(argv[1], NULL, 10) : 1024, n = (mib << 20) / 4;
	size_t free_b, total_b;
	cudaMemGetInfo(&free_b, &total_b);
	printf("cudaMemGetInfo: free %zu total %zu\n", free_b, total_b);
	unsigned *d;
	cudaError_t e = cudaMalloc(&d, n * 4);
	if (e != cudaSuccess) {
		printf("cudaMalloc(%zu MiB): %s (%d)\n", mib, cudaGetErrorName(e), e);
		return 3;
	}
	fill<<<264, 256>>>(d, n);
	cudaDeviceSynchronize();
	int (*swap_out)(unsigned long long) = (int (*)(unsigned long long))dlsym(RTLD_DEFAULT, "gpuwatch_swap_out");
	int (*resume)(void) = (int (*)(void))dlsym(RTLD_DEFAULT, "gpuwatch_resume");
	if (swap_out && resume) {
		int out = swap_out(0);
		printf("swap out %d, resume %d\n", out, resume());
	}
	unsigned *h = (unsigned *)malloc(n * 4);
	cudaMemcpy(h, d, n * 4, cudaMemcpyDeviceToHost);
	size_t bad = 0;
	for (size_t i = 0; i < n; i++)
		bad += h[i] != (unsigned)(i * 2654435761u);
	printf("interposer %s; %zu of %zu words wrong\n", swap_out ? "present" : "absent", bad, n);
	return bad ? 1 : 0;
}
