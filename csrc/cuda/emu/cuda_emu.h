/* Host emulation of the small part of CUDA that csrc/cuda uses, so that the
 * very kernels and host code of ds_cuda_moe.cu can be compiled by a C++20
 * compiler (with -DDS_CUDA_EMULATE) and run on the CPU in the tests:
 *
 *   - __global__/__device__/__host__ vanish, __shared__ becomes a static
 *     (blocks run one after another, so one copy serves every block);
 *   - blockIdx/threadIdx/blockDim/gridDim are thread_local;
 *   - DS_LAUNCH(kernel, grid, block, stream)(args...) runs every block and
 *     every thread of the grid in a shuffled order (seed from the
 *     DS_CUDA_EMU_SEED environment variable), so a kernel whose result
 *     depends on the order in which threads run gives different bits under
 *     different seeds;
 *   - DS_LAUNCH_SYNC runs each block's threads as real threads with a barrier
 *     for kernels that call __syncthreads() (which aborts elsewhere);
 *   - device memory is host memory; copies and memsets are immediate;
 *     streams are ignored;
 *   - launch configurations are checked like the runtime does (an empty or
 *     oversized grid or block is cudaErrorInvalidConfiguration);
 *   - the driver is there, absent or too old as DS_CUDA_EMU_DRIVER says
 *     (cuda_emu.cpp), so the module's reports of each can be tested.
 *
 * cuBLAS is emulated in cuda_emu.cpp (column-major GEMMs with float32
 * accumulation, outputs rounded to the C type, the type combinations and
 * argument checks of the documented API, and the device fault a misaligned
 * pointer of a grouped call causes).
 * This file is never used by the nvcc build. */
#ifndef DS_CUDA_EMU_H
#define DS_CUDA_EMU_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <functional>

#define __global__
#define __device__
#define __host__
#define __shared__ static

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
typedef dim3 uint3;

extern thread_local dim3 blockIdx, threadIdx, blockDim, gridDim;

typedef enum {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorInvalidConfiguration = 9,
    cudaErrorInsufficientDriver = 35,
    cudaErrorNoDevice = 100,
    cudaErrorInvalidDevice = 101,
    cudaErrorMisalignedAddress = 716,
} cudaError_t;

typedef struct ds_emu_stream *cudaStream_t;

typedef enum {
    cudaMemcpyHostToHost = 0,
    cudaMemcpyHostToDevice = 1,
    cudaMemcpyDeviceToHost = 2,
    cudaMemcpyDeviceToDevice = 3,
    cudaMemcpyDefault = 4,
} cudaMemcpyKind;

typedef enum { CUDA_R_32F = 0, CUDA_R_16F = 2, CUDA_R_16BF = 14 } cudaDataType;

cudaError_t cudaGetDeviceCount(int *count);
cudaError_t cudaRuntimeGetVersion(int *version);
cudaError_t cudaGetDevice(int *device);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaGetLastError(void);
const char *cudaGetErrorString(cudaError_t err);
const char *cudaGetErrorName(cudaError_t err);
cudaError_t cudaMallocAsync(void **p, size_t size, cudaStream_t stream);
cudaError_t cudaFreeAsync(void *p, cudaStream_t stream);
cudaError_t cudaMemsetAsync(void *p, int value, size_t size, cudaStream_t stream);
cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t size, cudaMemcpyKind kind,
                            cudaStream_t stream);
cudaError_t cudaMemcpy(void *dst, const void *src, size_t size, cudaMemcpyKind kind);
cudaError_t cudaStreamSynchronize(cudaStream_t stream);

/* ---- half and bfloat16 ---------------------------------------------------- */
struct __half {
    _Float16 v;
};
struct __nv_bfloat16 {
    uint16_t bits;
};

static inline float __half2float(__half h) { return (float)h.v; }
static inline __half __float2half_rn(float f)
{
    __half h;
    h.v = (_Float16)f; /* IEEE round to nearest even */
    return h;
}
static inline __nv_bfloat16 __float2bfloat16_rn(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    __nv_bfloat16 b;
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) {
        b.bits = (uint16_t)((u >> 16) | 0x40u); /* quiet NaN */
        return b;
    }
    u += 0x7FFFu + ((u >> 16) & 1u);
    b.bits = (uint16_t)(u >> 16);
    return b;
}

/* ---- atomics (the kernels only need these two) ---------------------------- */
static inline unsigned long long atomicMin(unsigned long long *p, unsigned long long v)
{
    unsigned long long old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
    while (v < old && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
    }
    return old;
}
static inline int atomicAdd(int *p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }

void __syncthreads(void);

/* ---- launches -------------------------------------------------------------- */
namespace ds_emu {
/* Runs body() once per thread of the grid; sync: threads of a block run
 * concurrently (for __syncthreads). */
void run_grid(dim3 grid, dim3 block, bool sync, const std::function<void()> &body);

template <typename F>
struct Launch {
    F *fn;
    dim3 grid, block;
    bool sync;
    template <typename... A>
    void operator()(A... args) const
    {
        F *f = fn;
        run_grid(grid, block, sync, [&]() { f(args...); });
    }
};
template <typename F>
Launch<F> launch(F *fn, dim3 grid, dim3 block, bool sync)
{
    return Launch<F>{fn, grid, block, sync};
}
} // namespace ds_emu

#define DS_LAUNCH(kernel, grid, block, stream) ds_emu::launch(kernel, grid, block, false)
#define DS_LAUNCH_SYNC(kernel, grid, block, stream) ds_emu::launch(kernel, grid, block, true)

#endif
