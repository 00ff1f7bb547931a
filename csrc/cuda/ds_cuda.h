/* dualsparse CUDA entry points: plain C declarations, implemented by nvcc.
 * Every function returns a ds_status (csrc/core/ds_core.h) or a documented
 * plain value and puts detail in a thread-local message read with
 * ds_cuda_last_error(); nothing throws across this boundary.
 *
 * Device calls take the device ordinal and the stream (a cudaStream_t passed
 * as void *, e.g. torch.cuda.current_stream().cuda_stream) explicitly.
 * Host synchronisation: ds_cuda_route_levels and ds_cuda_moe_experts /
 * ds_cuda_importance each synchronise the stream once (documented at each
 * entry point): to read back a few bytes of device-side validation (and, for
 * the expert ops, the per-expert row counts that size the cuBLAS GEMMs).
 *
 * cuBLAS is never linked: ds_cuda_blas_load() dlopen()s libcublas at run time
 * (the Python layer passes the copy that torch uses first), and the expert
 * ops run on the caller's cuBLAS handle (torch's, from
 * torch.cuda.current_blas_handle(), bound to the op's stream, with the
 * workspace torch gave it): the module creates no handle and allocates
 * nothing per thread or per call (its device scratch is the caller's
 * workspace argument, from torch's caching allocator).  The handle's math
 * mode is torch's (TF32 for float32 where torch allows it), plus, for the
 * op's 16-bit GEMM calls only, CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION.
 *
 * The CUDA runtime is linked dynamically (libcudart.so.<major> of the
 * toolkit that built the module): the Python layer loads torch's copy
 * first, so one runtime serves the process. */
#ifndef DS_CUDA_H
#define DS_CUDA_H

#include <stddef.h>
#include <stdint.h>

#include "../core/ds_core.h"

#ifdef __cplusplus
extern "C" {
#endif

const char *ds_cuda_last_error(void);

/* Number of visible devices; 0 with a reason in ds_cuda_last_error() when
 * there is no driver ("no NVIDIA driver ..."), the driver is older than the
 * runtime (both versions named) or it sees no device ("no CUDA device"). */
int ds_cuda_device_count(void);

/* Version of the CUDA runtime loaded in the process (e.g. 12040). */
int ds_cuda_runtime_version(void);

/* Driver version, 0 when no driver is loaded. */
int ds_cuda_driver_version(void);

/* Compute capabilities the module carries code for, e.g. "sm_80 sm_90 compute_90". */
const char *ds_cuda_arch_list(void);

/* Runs a one-block kernel on `device` that writes 0..n-1 into a device
 * buffer and copies it back into host[0..n): proves the module's device code
 * loads and runs.  Returns 0 on success. */
int ds_cuda_selftest(int device, int32_t *host, int n);

/* ---- cuBLAS, loaded at run time ------------------------------------------
 * Tries every path in paths[0..n) (full paths or bare sonames), then, when
 * system != 0, the sonames libcublas.so.13, .so.12, .so.11 and libcublas.so
 * through the dynamic loader.  A library already loaded in the process (e.g.
 * by torch) is found first by RTLD_NOLOAD.  Idempotent once it succeeded.
 * On failure the message names every candidate tried and why it failed. */
ds_status ds_cuda_blas_load(const char *const *paths, int n, int system);
/* Path (or soname) of the loaded cuBLAS and its version (0 when none). */
const char *ds_cuda_blas_path(void);
int ds_cuda_blas_version(void);
/* 1 when the loaded cuBLAS has cublasGemmGroupedBatchedEx (>= 12.5).  The
 * expert GEMMs then run as one grouped call per phase; otherwise (or when it
 * refuses the problem, or with DUALSPARSE_CUDA_GEMM=loop in the environment)
 * as a loop of cublasGemmEx calls on the one stream.  Problems whose 16-bit
 * matrices are not 16-byte aligned (odd sizes) always run in the loop: the
 * grouped call would fault on them. */
int ds_cuda_blas_has_grouped(void);

/* The cuBLAS status with which cublasGemmGroupedBatchedEx refused problems
 * of `dtype` (float32, bfloat16 or float16), 0 when it has not: after a
 * refusal that dtype runs as the cublasGemmEx loop without asking again
 * (until ds_cuda_blas_forget_refusals()). */
int ds_cuda_blas_grouped_refusal(ds_dtype dtype);
void ds_cuda_blas_forget_refusals(void);

/* Seconds the calling thread waited in the last op's stream synchronisation
 * (the measured cost of the one host synchronisation). */
double ds_cuda_last_sync_seconds(void);
/* 1 when every GEMM of the calling thread's last expert op ran in grouped
 * cuBLAS calls; *grouped / *loop: how many problems ran grouped and in the
 * cublasGemmEx loop. */
int ds_cuda_last_gemm_grouped(void);
void ds_cuda_last_gemm_counts(long long *grouped, long long *loop);

/* ---- routing levels ------------------------------------------------------
 * topk_weights: T x K (f32, bf16, f16 or f64; element strides ws0, ws1), device
 * thresholds:   P ascending finite values, host
 * levels:       T x K (i8 or i32; element strides ls0, ls1), device
 * workspace:    DS_CUDA_ROUTE_WORKSPACE bytes of 8-byte aligned device memory
 * Same semantics and errors as ds_route_levels.  Synchronises `stream` once
 * (a 16-byte read-back of the validation flags); on a validation error
 * levels may have been written. */
#define DS_CUDA_ROUTE_WORKSPACE 16
ds_status ds_cuda_route_levels(int device, void *stream, const void *topk_weights,
                               ds_dtype w_dtype, int64_t T, int64_t K, int64_t ws0,
                               int64_t ws1, const double *thresholds, int P, int normalize,
                               void *levels, ds_dtype l_dtype, int64_t ls0, int64_t ls1,
                               void *workspace, size_t workspace_size);

/* ---- expert computation --------------------------------------------------
 * Fused transformers 5.x layout on the device:
 *   gate_up: E x 2I x H (expert stride 2*I*H), down: E x H x I (stride H*I)
 *   x: T x H (row stride ldx), out: T x H (row stride ldo), dtype = dtype
 *   topk_ids: T x K (i32/i64), topk_weights: T x K (f32/bf16/f16/f64),
 *   levels: T x K integers in [0, P] or levels.data == NULL for all P.
 * The semantics are ds_moe_experts': a pair at level p computes the first
 * (p*I)/P neurons; out[t] = sum_k w[t,k] * y_{t,k} in k order in float32;
 * gate/up and down run as cuBLAS GEMMs with float32 accumulation and
 * outputs in dtype (the types cublasGemmGroupedBatchedEx supports: for
 * 16-bit weights the gate/up outputs and the down outputs y are rounded to
 * dtype, as the model's own matmuls round them), SwiGLU is computed in
 * float32 and rounded to dtype before the down GEMM. */
typedef struct {
    int64_t T, K, E, I, H;
    int P;
    ds_dtype dtype;
    const void *x;
    int64_t ldx;
    ds_mat topk_ids, topk_weights, levels;
    const void *gate_up;
    const void *down;
    void *out;
    int64_t ldo;
} ds_cuda_moe_args;

/* Argument checks that need no device (shapes, dtypes, strides, NULLs): the
 * messages of the CPU engine.  ds_cuda_moe_experts runs them first. */
ds_status ds_cuda_moe_check(const ds_cuda_moe_args *a);

/* Device workspace in bytes (pure arithmetic, no device needed), to be
 * passed 256-byte aligned.  cuBLAS uses the workspace of the handle. */
size_t ds_cuda_moe_workspace_size(const ds_cuda_moe_args *a);

/* blas_handle: a cublasHandle_t of `device` bound to `stream` (torch's;
 * checked with cublasGetStream, never changed).  Synchronises `stream`
 * once, after the routing plan: to read back the E*P row counts (host-side
 * GEMM sizes) and the validation flags. */
ds_status ds_cuda_moe_experts(int device, void *stream, void *blas_handle, const ds_cuda_moe_args *a,
                              void *workspace, size_t workspace_size);

/* ---- neuron importance ---------------------------------------------------
 * Same layout as above (levels, out, ldo unused; topk_weights.data may be
 * NULL when !weighted).  accum: 4 x E x I float64 on the device, counts: E
 * float64 on the device or NULL.  Same sums as ds_importance_accumulate
 * (a, b from float32 GEMM outputs, sums over rows in float64, in row order:
 * deterministic); for 16-bit weights the gate/up GEMMs therefore run in the
 * cublasGemmEx loop (16-bit -> float32 is not a grouped combination). */
typedef struct {
    ds_cuda_moe_args m;
    int weighted;
    double *accum;
    double *counts;
} ds_cuda_importance_args;

ds_status ds_cuda_importance_check(const ds_cuda_importance_args *a);
size_t ds_cuda_importance_workspace_size(const ds_cuda_importance_args *a);
/* Synchronises `stream` once (row counts and validation flags). */
ds_status ds_cuda_importance(int device, void *stream, void *blas_handle, const ds_cuda_importance_args *a,
                             void *workspace, size_t workspace_size);

#ifdef __cplusplus
}
#endif
#endif
