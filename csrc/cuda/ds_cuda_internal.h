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
 * build: the values are the ABI of cublas_api.h, stable since CUDA 11). */
typedef struct cublasContext *ds_blas_handle;
enum { DS_BLAS_OP_N = 0, DS_BLAS_OP_T = 1 };
enum { DS_BLAS_COMPUTE_32F = 68 };
enum { DS_BLAS_GEMM_DEFAULT = -1 };

typedef struct {
    int (*create)(ds_blas_handle *);
    int (*destroy)(ds_blas_handle);
    int (*set_stream)(ds_blas_handle, cudaStream_t);
    int (*get_version)(ds_blas_handle, int *);
    /* cublasSetWorkspace_v2: each op gives cuBLAS a slice of its own
     * workspace, so a handle used on several streams never shares cuBLAS'
     * default workspace between them (cublasSetStream resets it); NULL when
     * absent. */
    int (*set_workspace)(ds_blas_handle, void *, size_t);
    int (*gemm_ex)(ds_blas_handle, int transa, int transb, int m, int n, int k,
                   const void *alpha, const void *A, cudaDataType Atype, int lda, const void *B,
                   cudaDataType Btype, int ldb, const void *beta, void *C, cudaDataType Ctype,
                   int ldc, int compute_type, int algo);
    /* cublasGemmGroupedBatchedEx (cuBLAS >= 12.5); NULL when absent.  Host
     * arrays of group_count parameters, device arrays of the matrices. */
    int (*gemm_grouped)(ds_blas_handle, const int *transa, const int *transb, const int *m,
                        const int *n, const int *k, const void *alpha, const void *const *A,
                        cudaDataType Atype, const int *lda, const void *const *B, cudaDataType Btype,
                        const int *ldb, const void *beta, void *const *C, cudaDataType Ctype,
                        const int *ldc, int group_count, const int *group_size, int compute_type);
} ds_blas_api;

/* The loaded API, or NULL with a message (tries the default search when
 * nothing was loaded yet). */
const ds_blas_api *ds_blas(void);
/* A cuBLAS handle for `device` (current device must be `device`), created
 * once per (thread, device) and kept; bound to `stream` and, when
 * blas_ws != NULL, to the workspace blas_ws[0, blas_ws_size) on return. */
ds_status ds_blas_handle_for(int device, cudaStream_t stream, void *blas_ws, size_t blas_ws_size,
                             ds_blas_handle *out);

/* Bytes of cuBLAS workspace each expert op reserves in its own workspace
 * (what cuBLAS asks for on Hopper; 4 MiB suffices before). */
#define DS_BLAS_WORKSPACE ((size_t)32 << 20)

#endif
