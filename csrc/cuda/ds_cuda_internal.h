/* Shared between the CUDA translation units; never included by C code. */
#ifndef DS_CUDA_INTERNAL_H
#define DS_CUDA_INTERNAL_H

#ifdef DS_CUDA_EMULATE
/* The tests' host build of the same sources (see emu/cuda_emu.h). */
#include "emu/cuda_emu.h"
#else
#include <cuda_runtime.h>
#include <library_types.h>
/* kernel launches: DS_LAUNCH(kernel, grid, block, stream)(args...);
 * DS_LAUNCH_SYNC for kernels that call __syncthreads() (the same launch on
 * the device; the host emulation runs such blocks as real threads). */
#define DS_LAUNCH(kernel, grid, block, stream) kernel<<<(grid), (block), 0, (stream)>>>
#define DS_LAUNCH_SYNC(kernel, grid, block, stream) kernel<<<(grid), (block), 0, (stream)>>>
#endif

#include "ds_cuda.h"

/* printf-style message into the thread-local buffer; returns code. */
ds_status ds_cuda_error(ds_status code, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
/* code DS_ERR_INTERNAL with "what: <cuda error string> (<name>)". */
ds_status ds_cuda_rt_error(const char *what, cudaError_t err);

/* Puts into the message why no device is usable after cudaGetDeviceCount
 * failed with `err`: "no NVIDIA driver" where the driver library
 * (libcuda.so.1) cannot be loaded, the driver's and the module's CUDA
 * versions where the driver is too old, "no CUDA device" where the driver
 * sees none; the runtime's own words otherwise. */
void ds_cuda_explain_no_device(cudaError_t err);

/* Whether the NVIDIA driver library can be loaded: 1 with its CUDA version
 * in *driver_version (e.g. 12040, 0 when unknown), 0 with the loader's
 * reason in why[0, cap). */
int ds_cuda_probe_driver(int *driver_version, char *why, size_t cap);

/* Entered by every entry point that touches a device: clears the calling
 * thread's last-error slot (cudaGetLastError() reports the last failure of
 * ANY earlier runtime call on the thread, so a stale error from elsewhere
 * would otherwise fail this op's first launch check), saves the current
 * device, switches to `device`, and restores the previous one on exit. */
struct DeviceGuard {
    int prev = -1;
    cudaError_t err = cudaSuccess;
    explicit DeviceGuard(int device)
    {
        (void)cudaGetLastError();
        err = cudaGetDevice(&prev);
        if (err == cudaSuccess && prev != device)
            err = cudaSetDevice(device);
        if (err != cudaSuccess)
            (void)cudaGetLastError();
    }
    ~DeviceGuard()
    {
        int cur = -1;
        if (prev >= 0 && cudaGetDevice(&cur) == cudaSuccess && cur != prev)
            cudaSetDevice(prev);
        (void)cudaGetLastError();
    }
};

/* The few cuBLAS declarations used here (no cuBLAS headers are needed to
 * build: the values are the ABI of cublas_api.h / library_types.h, stable
 * since CUDA 11). */
typedef struct cublasContext *ds_blas_handle;
enum { DS_BLAS_OP_N = 0, DS_BLAS_OP_T = 1 };
enum { DS_BLAS_COMPUTE_32F = 68, DS_BLAS_COMPUTE_32F_FAST_TF32 = 77 };
enum { DS_BLAS_GEMM_DEFAULT = -1 };
/* cublasMath_t flag: reductions inside a GEMM (e.g. split-K) in the compute
 * type, never in a 16-bit output type */
enum { DS_BLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION = 16 };
/* cublasStatus_t values the module tells apart */
enum { DS_BLAS_STATUS_SUCCESS = 0, DS_BLAS_STATUS_NOT_INITIALIZED = 1, DS_BLAS_STATUS_INVALID_VALUE = 7,
       DS_BLAS_STATUS_EXECUTION_FAILED = 13, DS_BLAS_STATUS_NOT_SUPPORTED = 15 };

typedef struct {
    int (*get_property)(int type, int *value); /* cublasGetProperty: 0 major, 1 minor, 2 patch */
    int (*get_stream)(ds_blas_handle, cudaStream_t *);
    int (*get_math_mode)(ds_blas_handle, int *);
    int (*set_math_mode)(ds_blas_handle, int);
    int (*gemm_ex)(ds_blas_handle, int transa, int transb, int m, int n, int k,
                   const void *alpha, const void *A, cudaDataType Atype, int lda, const void *B,
                   cudaDataType Btype, int ldb, const void *beta, void *C, cudaDataType Ctype,
                   int ldc, int compute_type, int algo);
    /* cublasGemmGroupedBatchedEx (cuBLAS >= 12.5); NULL when absent.  Host
     * arrays of group_count parameters, device arrays of the matrices.
     * Documented type combinations (A = B type -> C type): 16BF -> 16BF,
     * 16F -> 16F, 32F -> 32F under CUBLAS_COMPUTE_32F, and 32F -> 32F under
     * CUBLAS_COMPUTE_32F_FAST_TF32; anything else is
     * CUBLAS_STATUS_NOT_SUPPORTED. */
    int (*gemm_grouped)(ds_blas_handle, const int *transa, const int *transb, const int *m,
                        const int *n, const int *k, const void *alpha, const void *const *A,
                        cudaDataType Atype, const int *lda, const void *const *B, cudaDataType Btype,
                        const int *ldb, const void *beta, void *const *C, cudaDataType Ctype,
                        const int *ldc, int group_count, const int *group_size, int compute_type);
} ds_blas_api;

/* The loaded API, or NULL with a message (tries the default search when
 * nothing was loaded yet). */
const ds_blas_api *ds_blas(void);

/* Checks the caller's cuBLAS handle (torch's, from
 * torch.cuda.current_blas_handle()) before an op uses it: not NULL, and
 * bound to `stream`.  The handle's stream and workspace are never changed
 * (cublasSetStream would reset the workspace torch gave it), and no handle
 * is ever created here: nothing is allocated per thread or per call.  Its
 * math mode is changed only for the duration of the GEMM calls of an op
 * (MathModeGuard in ds_cuda_moe.cu), as torch's own GEMM calls do. */
ds_status ds_blas_check_handle(const char *fn, void *handle, cudaStream_t stream, ds_blas_handle *out);

#endif
