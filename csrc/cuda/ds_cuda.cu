// dualsparse CUDA module: build plumbing and a device self-test.  The
// kernels for the expert computation live beside this file as they arrive.
#include "ds_cuda.h"

#include <cuda_runtime.h>
#include <stdio.h>

#ifndef DS_CUDA_ARCHS
#define DS_CUDA_ARCHS "unknown"
#endif

static thread_local char ds_cuda_msg[512];

static int ds_cuda_fail(const char *what, cudaError_t err)
{
    snprintf(ds_cuda_msg, sizeof ds_cuda_msg, "%s: %s (%s)", what, cudaGetErrorString(err),
             cudaGetErrorName(err));
    return (int)err;
}

__global__ void ds_iota_kernel(int32_t *out, int n)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n)
        out[i] = i;
}

extern "C" {

const char *ds_cuda_last_error(void) { return ds_cuda_msg; }

int ds_cuda_device_count(void)
{
    int n = 0;
    cudaError_t err = cudaGetDeviceCount(&n);
    if (err != cudaSuccess) {
        ds_cuda_fail("cudaGetDeviceCount", err);
        cudaGetLastError();
        return 0;
    }
    return n;
}

int ds_cuda_runtime_version(void)
{
    int v = 0;
    cudaRuntimeGetVersion(&v);
    return v;
}

int ds_cuda_driver_version(void)
{
    int v = 0;
    if (cudaDriverGetVersion(&v) != cudaSuccess)
        return 0;
    return v;
}

const char *ds_cuda_arch_list(void) { return DS_CUDA_ARCHS; }

int ds_cuda_selftest(int device, int32_t *host, int n)
{
    int32_t *dev = NULL;
    cudaError_t err = cudaSetDevice(device);
    if (err != cudaSuccess)
        return ds_cuda_fail("cudaSetDevice", err);
    if ((err = cudaMalloc((void **)&dev, (size_t)n * sizeof(int32_t))) != cudaSuccess)
        return ds_cuda_fail("cudaMalloc", err);
    ds_iota_kernel<<<(n + 255) / 256, 256>>>(dev, n);
    err = cudaGetLastError();
    if (err == cudaSuccess)
        err = cudaMemcpy(host, dev, (size_t)n * sizeof(int32_t), cudaMemcpyDeviceToHost);
    cudaFree(dev);
    if (err != cudaSuccess)
        return ds_cuda_fail("self-test kernel", err);
    return 0;
}

}  // extern "C"
