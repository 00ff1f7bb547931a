// Host emulation of the CUDA runtime and cuBLAS calls of csrc/cuda (see
// cuda_emu.h).  Compiled only by the tests, with ds_cuda.cu, ds_cuda_moe.cu
// and the CPython binding, into dualsparse's test module _C_cuda_emu: the
// real kernels and host code then run on the CPU, "device" pointers being
// host pointers.
//
// Environment (read at every call, so tests can switch it between calls):
//   DS_CUDA_EMU_SEED     order in which blocks and threads run (0: in index
//                        order; other values: a shuffle seeded by the value)
//   DS_CUDA_EMU_GROUPED  "1" (default): cuBLAS has cublasGemmGroupedBatchedEx;
//                        "0": it has not (cuBLAS < 12.5); "refuse": it has,
//                        but refuses every problem (CUBLAS_STATUS_NOT_SUPPORTED)
#include "../ds_cuda_internal.h"

#include <stdio.h>
#include <stdlib.h>

#include <algorithm>
#include <barrier>
#include <random>
#include <thread>
#include <vector>

thread_local dim3 blockIdx, threadIdx, blockDim, gridDim;

/* ---- runtime ------------------------------------------------------------- */

static thread_local cudaError_t emu_last_error = cudaSuccess;
static thread_local int emu_device = 0;

static cudaError_t fail(cudaError_t e)
{
    emu_last_error = e;
    return e;
}

cudaError_t cudaGetDevice(int *device)
{
    *device = emu_device;
    return cudaSuccess;
}

cudaError_t cudaSetDevice(int device)
{
    if (device != 0)
        return fail(cudaErrorInvalidDevice);
    emu_device = device;
    return cudaSuccess;
}

cudaError_t cudaGetLastError(void)
{
    cudaError_t e = emu_last_error;
    emu_last_error = cudaSuccess;
    return e;
}

const char *cudaGetErrorString(cudaError_t err)
{
    switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    }
    return "unknown error";
}

const char *cudaGetErrorName(cudaError_t err)
{
    switch (err) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    }
    return "cudaErrorUnknown";
}

cudaError_t cudaMallocAsync(void **p, size_t size, cudaStream_t)
{
    *p = aligned_alloc(256, (size + 255) & ~(size_t)255);
    return *p ? cudaSuccess : fail(cudaErrorMemoryAllocation);
}

cudaError_t cudaFreeAsync(void *p, cudaStream_t)
{
    free(p);
    return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void *p, int value, size_t size, cudaStream_t)
{
    if (size && p == NULL)
        return fail(cudaErrorInvalidValue);
    memset(p, value, size);
    return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t size, cudaMemcpyKind, cudaStream_t)
{
    if (size && (dst == NULL || src == NULL))
        return fail(cudaErrorInvalidValue);
    memcpy(dst, src, size);
    return cudaSuccess;
}

cudaError_t cudaMemcpy(void *dst, const void *src, size_t size, cudaMemcpyKind kind)
{
    return cudaMemcpyAsync(dst, src, size, kind, NULL);
}

cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }

/* ---- launches ------------------------------------------------------------ */

static thread_local std::barrier<> *emu_barrier;

void __syncthreads(void)
{
    if (emu_barrier == NULL) {
        fprintf(stderr, "cuda_emu: __syncthreads() in a kernel launched with DS_LAUNCH; "
                        "launch it with DS_LAUNCH_SYNC\n");
        abort();
    }
    emu_barrier->arrive_and_wait();
}

static unsigned long emu_seed(void)
{
    const char *s = getenv("DS_CUDA_EMU_SEED");
    return s ? strtoul(s, NULL, 10) : 0;
}

static dim3 unflatten(unsigned long i, dim3 d)
{
    return dim3((unsigned)(i % d.x), (unsigned)(i / d.x % d.y), (unsigned)(i / d.x / d.y));
}

void ds_emu::run_grid(dim3 grid, dim3 block, bool sync, const std::function<void()> &body)
{
    const unsigned long nb = (unsigned long)grid.x * grid.y * grid.z;
    const unsigned long nt = (unsigned long)block.x * block.y * block.z;
    if (nb == 0 || grid.x > 0x7FFFFFFFu || grid.y > 65535 || grid.z > 65535 || nt == 0 || nt > 1024 ||
        block.z > 64) {
        fail(cudaErrorInvalidConfiguration);
        return;
    }
    std::vector<unsigned long> blocks(nb), threads(nt);
    for (unsigned long i = 0; i < nb; i++)
        blocks[i] = i;
    for (unsigned long i = 0; i < nt; i++)
        threads[i] = i;
    const unsigned long seed = emu_seed();
    std::mt19937_64 rng(seed);
    if (seed)
        std::shuffle(blocks.begin(), blocks.end(), rng);
    for (unsigned long b : blocks) {
        const dim3 bi = unflatten(b, grid);
        if (!sync) {
            if (seed)
                std::shuffle(threads.begin(), threads.end(), rng);
            for (unsigned long t : threads) {
                gridDim = grid;
                blockDim = block;
                blockIdx = bi;
                threadIdx = unflatten(t, block);
                body();
            }
            continue;
        }
        std::barrier<> bar((std::ptrdiff_t)nt);
        std::vector<std::thread> pool;
        pool.reserve(nt);
        for (unsigned long t = 0; t < nt; t++)
            pool.emplace_back([&, t]() {
                gridDim = grid;
                blockDim = block;
                blockIdx = bi;
                threadIdx = unflatten(t, block);
                emu_barrier = &bar;
                body();
                emu_barrier = NULL;
                bar.arrive_and_drop();
            });
        for (std::thread &th : pool)
            th.join();
    }
}

/* ---- cuBLAS ---------------------------------------------------------------- */

enum { ST_OK = 0, ST_NOT_INITIALIZED = 1, ST_INVALID_VALUE = 7, ST_NOT_SUPPORTED = 15 };

struct cublasContext {
    cudaStream_t stream;
    void *workspace;
    size_t workspace_size;
};

static int emu_create(ds_blas_handle *h)
{
    *h = new cublasContext();
    return ST_OK;
}
static int emu_destroy(ds_blas_handle h)
{
    delete h;
    return ST_OK;
}
static int emu_set_stream(ds_blas_handle h, cudaStream_t s)
{
    if (h == NULL)
        return ST_NOT_INITIALIZED;
    h->stream = s;
    h->workspace = NULL; /* cublasSetStream resets the user workspace */
    h->workspace_size = 0;
    return ST_OK;
}
static int emu_set_workspace(ds_blas_handle h, void *ws, size_t size)
{
    if (h == NULL)
        return ST_NOT_INITIALIZED;
    if (size > 0 && (ws == NULL || ((uintptr_t)ws & 255))) /* must be 256-byte aligned */
        return ST_INVALID_VALUE;
    h->workspace = ws;
    h->workspace_size = size;
    memset(ws, 0x5A, size); /* cuBLAS may use all of it */
    return ST_OK;
}
static int emu_get_version(ds_blas_handle, int *v)
{
    *v = 0;
    return ST_OK;
}

static float elem(const void *p, cudaDataType t, int64_t i)
{
    switch (t) {
    case CUDA_R_32F: return ((const float *)p)[i];
    case CUDA_R_16F: return (float)((const _Float16 *)p)[i];
    default: {
        uint32_t u = (uint32_t)((const uint16_t *)p)[i] << 16;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
    }
}

/* The checks of the documented API for the problems used here: A and B of
 * one type among 32F/16F/16BF, C float32, CUBLAS_COMPUTE_32F. */
static int gemm_check(int ta, int tb, int m, int n, int k, cudaDataType at, int lda, cudaDataType bt,
                      int ldb, cudaDataType ct, int ldc, int compute)
{
    if ((ta != DS_BLAS_OP_N && ta != DS_BLAS_OP_T) || (tb != DS_BLAS_OP_N && tb != DS_BLAS_OP_T))
        return ST_INVALID_VALUE;
    if (m < 0 || n < 0 || k < 0)
        return ST_INVALID_VALUE;
    if (lda < std::max(1, ta == DS_BLAS_OP_N ? m : k) || ldb < std::max(1, tb == DS_BLAS_OP_N ? k : n) ||
        ldc < std::max(1, m))
        return ST_INVALID_VALUE;
    if (at != bt || (at != CUDA_R_32F && at != CUDA_R_16F && at != CUDA_R_16BF) || ct != CUDA_R_32F ||
        compute != DS_BLAS_COMPUTE_32F)
        return ST_NOT_SUPPORTED;
    return ST_OK;
}

/* Column-major C (m x n) = alpha op(A) (m x k) op(B) (k x n) + beta C; C is
 * not read when beta == 0. */
static void gemm_run(int ta, int tb, int m, int n, int k, float alpha, const void *A, cudaDataType at,
                     int lda, const void *B, cudaDataType bt, int ldb, float beta, float *C, int ldc)
{
    for (int j = 0; j < n; j++)
        for (int i = 0; i < m; i++) {
            float acc = 0.0f;
            for (int l = 0; l < k; l++) {
                const float a = elem(A, at, ta == DS_BLAS_OP_N ? i + (int64_t)l * lda : l + (int64_t)i * lda);
                const float b = elem(B, bt, tb == DS_BLAS_OP_N ? l + (int64_t)j * ldb : j + (int64_t)l * ldb);
                acc += a * b;
            }
            float *c = C + i + (int64_t)j * ldc;
            *c = beta == 0.0f ? alpha * acc : alpha * acc + beta * *c;
        }
}

static int emu_gemm_ex(ds_blas_handle h, int ta, int tb, int m, int n, int k, const void *alpha,
                       const void *A, cudaDataType at, int lda, const void *B, cudaDataType bt, int ldb,
                       const void *beta, void *C, cudaDataType ct, int ldc, int compute, int algo)
{
    (void)algo;
    if (h == NULL)
        return ST_NOT_INITIALIZED;
    int st = gemm_check(ta, tb, m, n, k, at, lda, bt, ldb, ct, ldc, compute);
    if (st != ST_OK)
        return st;
    gemm_run(ta, tb, m, n, k, *(const float *)alpha, A, at, lda, B, bt, ldb, *(const float *)beta,
             (float *)C, ldc);
    return ST_OK;
}

static int emu_gemm_grouped(ds_blas_handle h, const int *ta, const int *tb, const int *m, const int *n,
                            const int *k, const void *alpha, const void *const *A, cudaDataType at,
                            const int *lda, const void *const *B, cudaDataType bt, const int *ldb,
                            const void *beta, void *const *C, cudaDataType ct, const int *ldc,
                            int group_count, const int *group_size, int compute)
{
    if (h == NULL)
        return ST_NOT_INITIALIZED;
    const char *mode = getenv("DS_CUDA_EMU_GROUPED");
    if (mode && strcmp(mode, "refuse") == 0)
        return ST_NOT_SUPPORTED;
    if (group_count < 0)
        return ST_INVALID_VALUE;
    /* every group is checked before anything is computed */
    for (int g = 0; g < group_count; g++) {
        if (group_size[g] < 0)
            return ST_INVALID_VALUE;
        int st = gemm_check(ta[g], tb[g], m[g], n[g], k[g], at, lda[g], bt, ldb[g], ct, ldc[g], compute);
        if (st != ST_OK)
            return st;
    }
    const float *al = (const float *)alpha, *be = (const float *)beta;
    int64_t p = 0;
    for (int g = 0; g < group_count; g++)
        for (int j = 0; j < group_size[g]; j++, p++)
            gemm_run(ta[g], tb[g], m[g], n[g], k[g], al[g], A[p], at, lda[g], B[p], bt, ldb[g], be[g],
                     (float *)C[p], ldc[g]);
    return ST_OK;
}

static ds_blas_api emu_api;

const ds_blas_api *ds_blas(void)
{
    emu_api.create = emu_create;
    emu_api.destroy = emu_destroy;
    emu_api.set_stream = emu_set_stream;
    emu_api.get_version = emu_get_version;
    emu_api.set_workspace = emu_set_workspace;
    emu_api.gemm_ex = emu_gemm_ex;
    const char *mode = getenv("DS_CUDA_EMU_GROUPED");
    emu_api.gemm_grouped = mode && strcmp(mode, "0") == 0 ? NULL : emu_gemm_grouped;
    return &emu_api;
}

static thread_local ds_blas_handle emu_handle;

ds_status ds_blas_handle_for(int device, cudaStream_t stream, void *blas_ws, size_t blas_ws_size,
                             ds_blas_handle *out)
{
    const ds_blas_api *api = ds_blas();
    if (device != 0)
        return ds_cuda_error(DS_ERR_VALUE, "device %d: the emulation has one device", device);
    if (emu_handle == NULL)
        api->create(&emu_handle);
    api->set_stream(emu_handle, stream);
    if (blas_ws != NULL && api->set_workspace(emu_handle, blas_ws, blas_ws_size) != ST_OK)
        return ds_cuda_error(DS_ERR_INTERNAL, "cublasSetWorkspace failed");
    *out = emu_handle;
    return DS_OK;
}

/* ---- the entry points ds_cuda.cu has on a real build ------------------------- */

extern "C" {

int ds_cuda_device_count(void) { return 1; }
int ds_cuda_runtime_version(void) { return 0; }
int ds_cuda_driver_version(void) { return 0; }
const char *ds_cuda_arch_list(void) { return "emulated"; }

int ds_cuda_selftest(int device, int32_t *host, int n)
{
    if (device != 0)
        return ds_cuda_error(DS_ERR_VALUE, "cudaSetDevice: invalid device ordinal"), 1;
    for (int i = 0; i < n; i++)
        host[i] = i;
    return 0;
}

ds_status ds_cuda_blas_load(const char *const *, int, int) { return DS_OK; }
const char *ds_cuda_blas_path(void) { return "emulated"; }
int ds_cuda_blas_version(void) { return 0; }
int ds_cuda_blas_has_grouped(void) { return ds_blas()->gemm_grouped != NULL; }

} // extern "C"
