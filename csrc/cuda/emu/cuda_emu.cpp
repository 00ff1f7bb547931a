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
//   DS_CUDA_EMU_DRIVER   unset: a driver with one device; "none": no driver
//                        (libcuda.so.1 absent); "old:<version>": a driver of
//                        that CUDA version, older than the runtime (13.0);
//                        "nodevice": a driver that sees no GPU
#include "../ds_cuda_internal.h"
#include "cuda_emu_hooks.h"

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

enum { EMU_RUNTIME_VERSION = 13000 };

static const char *emu_driver(void)
{
    const char *d = getenv("DS_CUDA_EMU_DRIVER");
    return d ? d : "";
}

cudaError_t cudaGetDeviceCount(int *count)
{
    const char *d = emu_driver();
    *count = 0;
    if (strcmp(d, "none") == 0 || strncmp(d, "old:", 4) == 0)
        return fail(cudaErrorInsufficientDriver); /* what cudart says in both cases */
    if (strcmp(d, "nodevice") == 0)
        return fail(cudaErrorNoDevice);
    *count = 1;
    return cudaSuccess;
}

cudaError_t cudaRuntimeGetVersion(int *version)
{
    *version = EMU_RUNTIME_VERSION;
    return cudaSuccess;
}

int ds_cuda_probe_driver(int *driver_version, char *why, size_t cap)
{
    const char *d = emu_driver();
    *driver_version = 0;
    if (strcmp(d, "none") == 0) {
        snprintf(why, cap, "libcuda.so.1: cannot open shared object file: No such file or directory");
        return 0;
    }
    *driver_version = strncmp(d, "old:", 4) == 0 ? atoi(d + 4) : EMU_RUNTIME_VERSION;
    return 1;
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
    case cudaErrorInsufficientDriver: return "CUDA driver version is insufficient for CUDA runtime version";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorMisalignedAddress: return "misaligned address";
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
    case cudaErrorInsufficientDriver: return "cudaErrorInsufficientDriver";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    case cudaErrorMisalignedAddress: return "cudaErrorMisalignedAddress";
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
    long long calls;
    int math_mode;
    long long reduced_calls; /* GEMMs with a 16-bit C that ran with reduced-precision reductions */
};

static int emu_get_property(int type, int *v)
{
    if (v == NULL || type < 0 || type > 2)
        return ST_INVALID_VALUE;
    static const int version[3] = {13, 0, 0};
    *v = version[type];
    return ST_OK;
}
static int emu_get_stream(ds_blas_handle h, cudaStream_t *s)
{
    if (h == NULL)
        return ST_NOT_INITIALIZED;
    *s = h->stream;
    return ST_OK;
}

static int emu_get_math_mode(ds_blas_handle h, int *mode)
{
    if (h == NULL)
        return ST_NOT_INITIALIZED;
    *mode = h->math_mode;
    return ST_OK;
}
static int emu_set_math_mode(ds_blas_handle h, int mode)
{
    if (h == NULL)
        return ST_NOT_INITIALIZED;
    if ((mode & ~DS_BLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION) > 3) /* DEFAULT, TENSOR_OP, PEDANTIC, TF32 */
        return ST_INVALID_VALUE;
    h->math_mode = mode;
    return ST_OK;
}

static size_t type_size(cudaDataType t) { return t == CUDA_R_32F ? 4 : 2; }

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

static void store(void *p, cudaDataType t, int64_t i, float v)
{
    switch (t) {
    case CUDA_R_32F: ((float *)p)[i] = v; break;
    case CUDA_R_16F: ((_Float16 *)p)[i] = (_Float16)v; break;
    default: ((__nv_bfloat16 *)p)[i] = __float2bfloat16_rn(v); break;
    }
}

static int is_known_type(cudaDataType t) { return t == CUDA_R_32F || t == CUDA_R_16F || t == CUDA_R_16BF; }

/* cublasGemmEx's documented combinations among the types used here: under
 * CUBLAS_COMPUTE_32F, A = B in 16F with C in 16F or 32F, 16BF with C in
 * 16BF or 32F, 32F with C in 32F; under CUBLAS_COMPUTE_32F_FAST_TF32, 32F
 * only. */
static int gemm_ex_types_ok(cudaDataType at, cudaDataType bt, cudaDataType ct, int compute)
{
    if (at != bt || !is_known_type(at) || !is_known_type(ct))
        return 0;
    if (compute == DS_BLAS_COMPUTE_32F)
        return ct == CUDA_R_32F || ct == at;
    if (compute == DS_BLAS_COMPUTE_32F_FAST_TF32)
        return at == CUDA_R_32F && ct == CUDA_R_32F;
    return 0;
}

/* cublasGemmGroupedBatchedEx's documented combinations: A = B = C in 16BF,
 * 16F or 32F under CUBLAS_COMPUTE_32F; 32F under
 * CUBLAS_COMPUTE_32F_FAST_TF32.  (No 16-bit -> 32F output.) */
static int grouped_types_ok(cudaDataType at, cudaDataType bt, cudaDataType ct, int compute)
{
    if (at != bt || at != ct || !is_known_type(at))
        return 0;
    if (compute == DS_BLAS_COMPUTE_32F)
        return 1;
    return compute == DS_BLAS_COMPUTE_32F_FAST_TF32 && at == CUDA_R_32F;
}

/* The argument checks of the documented API (CUBLAS_STATUS_INVALID_VALUE). */
static int gemm_args_ok(int ta, int tb, int m, int n, int k, int lda, int ldb, int ldc)
{
    if ((ta != DS_BLAS_OP_N && ta != DS_BLAS_OP_T) || (tb != DS_BLAS_OP_N && tb != DS_BLAS_OP_T))
        return 0;
    if (m < 0 || n < 0 || k < 0)
        return 0;
    return lda >= std::max(1, ta == DS_BLAS_OP_N ? m : k) && ldb >= std::max(1, tb == DS_BLAS_OP_N ? k : n) &&
           ldc >= std::max(1, m);
}

/* The pointer alignment the documentation asks of a grouped (or batched)
 * call's matrices for 16-bit types and the FAST compute types (cuBLAS reads
 * them from device memory and cannot choose a kernel for them): ideally 16
 * bytes; else, if k % 8 == 0, 16 bytes, and if k % 2 == 0, 4 bytes.  A
 * violation is a misaligned-address fault on the device. */
static int grouped_ptr_ok(const void *p, cudaDataType at, int compute, int k)
{
    if (at == CUDA_R_32F && compute == DS_BLAS_COMPUTE_32F)
        return 1;
    const uintptr_t u = (uintptr_t)p;
    if (k % 8 == 0)
        return u % 16 == 0;
    if (k % 2 == 0)
        return u % 4 == 0;
    return u % type_size(at) == 0;
}

static int emu_fault_count;

static float round_to(cudaDataType t, float v)
{
    uint16_t buf[2];
    store(buf, t, 0, v);
    return t == CUDA_R_32F ? v : elem(buf, t, 0);
}

/* Column-major C (m x n) = alpha op(A) (m x k) op(B) (k x n) + beta C, in
 * float32, rounded to ct; C is not read when beta == 0.  With a 16-bit C
 * and a math mode that allows reduced-precision reductions, k >= 32 runs
 * split in two halves whose partial sums are rounded to ct before they are
 * added (what cuBLAS' split-K kernels may do then). */
static void gemm_run(ds_blas_handle h, int ta, int tb, int m, int n, int k, float alpha, const void *A,
                     cudaDataType at, int lda, const void *B, cudaDataType bt, int ldb, float beta, void *C,
                     cudaDataType ct, int ldc)
{
    const bool split = ct != CUDA_R_32F && k >= 32 && !(h->math_mode & DS_BLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION);
    if (split)
        h->reduced_calls++;
    const int half = split ? k / 2 : k;
    for (int j = 0; j < n; j++)
        for (int i = 0; i < m; i++) {
            float acc[2] = {0.0f, 0.0f};
            for (int l = 0; l < k; l++) {
                const float a = elem(A, at, ta == DS_BLAS_OP_N ? i + (int64_t)l * lda : l + (int64_t)i * lda);
                const float b = elem(B, bt, tb == DS_BLAS_OP_N ? l + (int64_t)j * ldb : j + (int64_t)l * ldb);
                acc[l >= half] += a * b;
            }
            /* split: each half's partial sum rounded to ct before they are added */
            const float ab = split ? round_to(ct, alpha * acc[0]) + round_to(ct, alpha * acc[1]) : alpha * acc[0];
            const int64_t c = i + (int64_t)j * ldc;
            store(C, ct, c, beta == 0.0f ? ab : ab + beta * elem(C, ct, c));
        }
}

static int emu_gemm_ex(ds_blas_handle h, int ta, int tb, int m, int n, int k, const void *alpha,
                       const void *A, cudaDataType at, int lda, const void *B, cudaDataType bt, int ldb,
                       const void *beta, void *C, cudaDataType ct, int ldc, int compute, int algo)
{
    (void)algo;
    if (h == NULL)
        return ST_NOT_INITIALIZED;
    if (!gemm_args_ok(ta, tb, m, n, k, lda, ldb, ldc))
        return ST_INVALID_VALUE;
    if (!gemm_ex_types_ok(at, bt, ct, compute))
        return ST_NOT_SUPPORTED;
    h->calls++;
    gemm_run(h, ta, tb, m, n, k, *(const float *)alpha, A, at, lda, B, bt, ldb, *(const float *)beta, C, ct, ldc);
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
        if (group_size[g] < 0 || !gemm_args_ok(ta[g], tb[g], m[g], n[g], k[g], lda[g], ldb[g], ldc[g]))
            return ST_INVALID_VALUE;
    }
    if (!grouped_types_ok(at, bt, ct, compute))
        return ST_NOT_SUPPORTED;
    h->calls++;
    /* The device reads the pointer arrays: a misaligned matrix faults there
     * (the call itself has returned success), nothing is computed, and the
     * error surfaces at the next runtime call that reports errors. */
    int64_t p = 0;
    for (int g = 0; g < group_count; g++)
        for (int j = 0; j < group_size[g]; j++, p++)
            if (!grouped_ptr_ok(A[p], at, compute, k[g]) || !grouped_ptr_ok(B[p], bt, compute, k[g]) ||
                !grouped_ptr_ok(C[p], at, compute, k[g])) {
                __atomic_add_fetch(&emu_fault_count, 1, __ATOMIC_SEQ_CST);
                fail(cudaErrorMisalignedAddress);
                return ST_OK;
            }
    const float *al = (const float *)alpha, *be = (const float *)beta;
    p = 0;
    for (int g = 0; g < group_count; g++)
        for (int j = 0; j < group_size[g]; j++, p++)
            gemm_run(h, ta[g], tb[g], m[g], n[g], k[g], al[g], A[p], at, lda[g], B[p], bt, ldb[g], be[g], C[p], ct,
                     ldc[g]);
    return ST_OK;
}

static ds_blas_api emu_api;

const ds_blas_api *ds_blas(void)
{
    emu_api.get_property = emu_get_property;
    emu_api.get_stream = emu_get_stream;
    emu_api.get_math_mode = emu_get_math_mode;
    emu_api.set_math_mode = emu_set_math_mode;
    emu_api.gemm_ex = emu_gemm_ex;
    const char *mode = getenv("DS_CUDA_EMU_GROUPED");
    emu_api.gemm_grouped = mode && strcmp(mode, "0") == 0 ? NULL : emu_gemm_grouped;
    return &emu_api;
}

/* ---- test hooks (cuda_emu_hooks.h) ------------------------------------------- */

static cublasContext emu_torch_handle;

extern "C" void *ds_emu_blas_handle(void *stream)
{
    emu_torch_handle.stream = (cudaStream_t)stream;
    return &emu_torch_handle;
}

extern "C" long long ds_emu_blas_handle_calls(void *h) { return h ? ((cublasContext *)h)->calls : 0; }
extern "C" long long ds_emu_blas_reduced_calls(void *h) { return h ? ((cublasContext *)h)->reduced_calls : 0; }
extern "C" int ds_emu_blas_math_mode(void *h, int set, int mode)
{
    if (set)
        ((cublasContext *)h)->math_mode = mode;
    return ((cublasContext *)h)->math_mode;
}

extern "C" int ds_emu_faults(void) { return __atomic_load_n(&emu_fault_count, __ATOMIC_SEQ_CST); }

extern "C" int ds_emu_grouped_probe(int atype, int btype, int ctype, int compute, int k, int offset_bytes,
                                    int *faulted)
{
    cublasContext h = {};
    const int n = 8;
    std::vector<char> buf(3 * 256 * 64 + 256 * 4);
    char *base = (char *)(((uintptr_t)buf.data() + 255) & ~(uintptr_t)255);
    void *A = base + offset_bytes, *B = base + 256 * 64 + offset_bytes, *C = base + 2 * 256 * 64 + offset_bytes;
    const void *Ap[1] = {A}, *Bp[1] = {B};
    void *Cp[1] = {C};
    const int t = DS_BLAS_OP_T, nn = DS_BLAS_OP_N, ld = std::max(k, 1), size = 1;
    const float one = 1.0f, zero = 0.0f;
    const int before = ds_emu_faults();
    (void)cudaGetLastError();
    int st = emu_gemm_grouped(&h, &t, &nn, &n, &n, &k, &one, Ap, (cudaDataType)atype, &ld, Bp, (cudaDataType)btype,
                              &ld, &zero, Cp, (cudaDataType)ctype, &n, 1, &size, compute);
    *faulted = ds_emu_faults() != before && cudaGetLastError() == cudaErrorMisalignedAddress;
    return st;
}

extern "C" int ds_emu_gemm_ex_probe(int atype, int btype, int ctype, int compute)
{
    cublasContext h = {};
    float A[4] = {0}, B[4] = {0}, C[4] = {0};
    const float one = 1.0f, zero = 0.0f;
    return emu_gemm_ex(&h, DS_BLAS_OP_T, DS_BLAS_OP_N, 1, 1, 1, &one, A, (cudaDataType)atype, 1, B,
                       (cudaDataType)btype, 1, &zero, C, (cudaDataType)ctype, 1, compute, DS_BLAS_GEMM_DEFAULT);
}

/* ---- the entry points ds_cuda.cu has on a real build ------------------------- */

extern "C" {

int ds_cuda_runtime_version(void) { return EMU_RUNTIME_VERSION; }
int ds_cuda_driver_version(void)
{
    int v = 0;
    char why[256];
    return ds_cuda_probe_driver(&v, why, sizeof why) ? v : 0;
}
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
