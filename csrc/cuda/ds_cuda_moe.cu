// Routing levels, routing plan, expert FFN (cuBLAS GEMMs on prefixes) and
// neuron importance on the device.  Correctness first: simple kernels, one
// stream, every result summed in a fixed order (deterministic).
//
// The plan (MegaBlocks/vLLM's sort -> histogram -> offsets, made stable):
//   1. count:  per block of 256 pairs, a histogram over keys e*P + (P-l)
//              (levels descending inside an expert, as on the CPU); ids and
//              levels are validated on the way (first bad pair recorded);
//   2. scan:   per key, exclusive prefix over blocks, and the key's total;
//   3. offsets: exclusive prefix over keys;
//   -- one host synchronisation: the totals size the GEMMs, the flags give
//      the CPU engine's error messages --
//   4. place:  every pair's row = offset[key] + block prefix + rank inside the
//              block among earlier pairs with the same key (so rows are in
//              (t, k) order inside a key: the CPU engine's order).
// Then gather x rows, gate/up GEMMs per (expert, run of partitions with the
// same row count), SwiGLU on level prefixes, down GEMMs per (expert, level),
// and a combine over k in order.
//
// GEMM types: every GEMM reads A and B in the weights' dtype, accumulates in
// float32 (CUBLAS_COMPUTE_32F) and writes C in that same dtype: the only
// combinations cublasGemmGroupedBatchedEx is documented for (16BF -> 16BF,
// 16F -> 16F, 32F -> 32F), and ones cublasGemmEx supports too, so the
// grouped call and the cublasGemmEx loop give the same results.  For 16-bit
// weights the gate/up outputs are thus rounded to the dtype before SwiGLU
// (as the model's own bfloat16/float16 matmuls round them) and the down
// outputs before the float32 combine over k.
#include "ds_cuda_internal.h"

#ifndef DS_CUDA_EMULATE
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <chrono>
#include <vector>

#define PLAN_BLOCK 256
#define NO_ERR 0xFFFFFFFFFFFFFFFFull

typedef unsigned long long ull;

/* ---- small helpers (host and device) -------------------------------------- */

static const char *dt_name(ds_dtype dt)
{
    static const char *names[] = {"float32", "bfloat16", "float16", "float64", "int8",
                                  "uint8",   "int16",    "int32",   "int64"};
    return (unsigned)dt < DS_DTYPE_COUNT ? names[dt] : "unknown";
}

static size_t dt_size(ds_dtype dt)
{
    static const size_t sizes[] = {4, 2, 2, 8, 1, 1, 2, 4, 8};
    return (unsigned)dt < DS_DTYPE_COUNT ? sizes[dt] : 0;
}

static int is_real(ds_dtype dt) { return dt == DS_F32 || dt == DS_BF16 || dt == DS_F16; }
static int is_weight(ds_dtype dt) { return is_real(dt) || dt == DS_F64; }
static int is_int(ds_dtype dt)
{
    return dt == DS_I8 || dt == DS_U8 || dt == DS_I16 || dt == DS_I32 || dt == DS_I64;
}

static cudaDataType blas_type(ds_dtype dt)
{
    return dt == DS_BF16 ? CUDA_R_16BF : dt == DS_F16 ? CUDA_R_16F : CUDA_R_32F;
}

static int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

__host__ __device__ static inline double load_real(const void *p, ds_dtype dt, int64_t i)
{
    switch (dt) {
    case DS_F32: return (double)((const float *)p)[i];
    case DS_F64: return ((const double *)p)[i];
    case DS_BF16: {
        uint32_t b = (uint32_t)((const uint16_t *)p)[i] << 16;
        float f;
        memcpy(&f, &b, 4);
        return (double)f;
    }
    case DS_F16: return (double)__half2float(((const __half *)p)[i]);
    default: return 0.0;
    }
}

__host__ __device__ static inline int64_t load_int(const void *p, ds_dtype dt, int64_t i)
{
    switch (dt) {
    case DS_I8: return ((const int8_t *)p)[i];
    case DS_U8: return ((const uint8_t *)p)[i];
    case DS_I16: return ((const int16_t *)p)[i];
    case DS_I32: return ((const int32_t *)p)[i];
    case DS_I64: return ((const int64_t *)p)[i];
    default: return 0;
    }
}

__device__ static inline void store_act(void *p, ds_dtype dt, int64_t i, float v)
{
    switch (dt) {
    case DS_F32: ((float *)p)[i] = v; break;
    case DS_BF16: ((__nv_bfloat16 *)p)[i] = __float2bfloat16_rn(v); break;
    default: ((__half *)p)[i] = __float2half_rn(v); break;
    }
}

/* Reads `size` bytes at device address p (error paths only: synchronous). */
static void read_back(void *host, const void *dev, size_t size)
{
    memset(host, 0, 8);
    cudaMemcpy(host, dev, size, cudaMemcpyDeviceToHost);
}

/* Seconds the calling thread last waited in the op's one stream
 * synchronisation (ds_cuda_last_sync_seconds). */
static thread_local double last_sync_s;

/* Copies two device buffers into host memory and waits for them: the op's
 * one synchronisation.  (A device-to-pageable copy returns only when done,
 * so the clock runs from before the first copy to after the stream sync.) */
static cudaError_t read_and_sync(cudaStream_t stream, void *h1, const void *d1, size_t n1, void *h2,
                                 const void *d2, size_t n2)
{
    auto t0 = std::chrono::steady_clock::now();
    cudaError_t e = cudaSuccess;
    if (n1)
        e = cudaMemcpyAsync(h1, d1, n1, cudaMemcpyDeviceToHost, stream);
    if (e == cudaSuccess && n2)
        e = cudaMemcpyAsync(h2, d2, n2, cudaMemcpyDeviceToHost, stream);
    if (e == cudaSuccess)
        e = cudaStreamSynchronize(stream);
    last_sync_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return e;
}

extern "C" double ds_cuda_last_sync_seconds(void) { return last_sync_s; }

#define CU(call, what)                                       \
    do {                                                     \
        cudaError_t err_ = (call);                           \
        if (err_ != cudaSuccess)                             \
            return ds_cuda_rt_error(what, err_);             \
    } while (0)

static dim3 grid_for(int64_t n, int threads)
{
    int64_t b = cdiv(n, threads);
    return dim3((unsigned)(b < 65535 * 8 ? (b < 1 ? 1 : b) : 65535 * 8));
}

/* ---- routing levels ------------------------------------------------------- */

struct Thresholds {
    double v[127];
};

/* err[0]: first pair (t*K+k) with a non-finite weight; err[1]: first row
 * that sums to 0 when normalising. */
__global__ void route_levels_kernel(const void *w, ds_dtype wdt, int64_t T, int64_t K, int64_t ws0,
                                    int64_t ws1, Thresholds thr, int P, int normalize, void *lv,
                                    ds_dtype ldt, int64_t ls0, int64_t ls1, ull *err)
{
    for (int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; t < T;
         t += (int64_t)gridDim.x * blockDim.x) {
        double sum = 0.0;
        bool bad = false;
        for (int64_t k = 0; k < K; k++) {
            double v = load_real(w, wdt, t * ws0 + k * ws1);
            if (!isfinite(v) && !bad) {
                atomicMin(&err[0], (ull)(t * K + k));
                bad = true;
            }
            sum += v;
        }
        if (bad)
            continue;
        /* As on the CPU: a row whose float64 sum overflows (weights near
         * DBL_MAX) is scaled by an exact power of two that brings its largest
         * value near 1, so that w * scale / (sum * scale) is w / sum. */
        double scale = 1.0;
        if (normalize && !isfinite(sum)) {
            double mx = 0.0;
            for (int64_t k = 0; k < K; k++)
                mx = fmax(mx, fabs(load_real(w, wdt, t * ws0 + k * ws1)));
            int e;
            frexp(mx, &e);
            scale = ldexp(1.0, -e);
            sum = 0.0;
            for (int64_t k = 0; k < K; k++)
                sum += load_real(w, wdt, t * ws0 + k * ws1) * scale;
        }
        if (normalize && sum == 0.0) {
            atomicMin(&err[1], (ull)t);
            continue;
        }
        for (int64_t k = 0; k < K; k++) {
            double s = load_real(w, wdt, t * ws0 + k * ws1);
            if (normalize)
                s = s * scale / sum;
            int l = 0;
            while (l < P && s >= thr.v[l])
                l++;
            if (ldt == DS_I8)
                ((int8_t *)lv)[t * ls0 + k * ls1] = (int8_t)l;
            else
                ((int32_t *)lv)[t * ls0 + k * ls1] = l;
        }
    }
}

extern "C" ds_status ds_cuda_route_levels(int device, void *stream_, const void *topk_weights,
                                          ds_dtype w_dtype, int64_t T, int64_t K, int64_t ws0,
                                          int64_t ws1, const double *thresholds, int P,
                                          int normalize, void *levels, ds_dtype l_dtype,
                                          int64_t ls0, int64_t ls1, void *workspace,
                                          size_t workspace_size)
{
    static const char fn[] = "route_levels";
    /* The thresholds' checks come first and touch no device (as on the CPU). */
    if (P < 1 || P > 127)
        return ds_cuda_error(DS_ERR_VALUE, "%s: thresholds must hold 1 to 127 values; got %d", fn, P);
    if (thresholds == NULL)
        return ds_cuda_error(DS_ERR_VALUE, "%s: thresholds is NULL", fn);
    for (int j = 0; j < P; j++) {
        if (!isfinite(thresholds[j]))
            return ds_cuda_error(DS_ERR_VALUE, "%s: thresholds[%d] = %g is not finite", fn, j, thresholds[j]);
        if (j > 0 && thresholds[j] < thresholds[j - 1])
            return ds_cuda_error(DS_ERR_VALUE,
                                 "%s: thresholds must be ascending; thresholds[%d] = %.17g < thresholds[%d] = %.17g",
                                 fn, j, thresholds[j], j - 1, thresholds[j - 1]);
    }
    if (!is_weight(w_dtype))
        return ds_cuda_error(DS_ERR_TYPE, "%s: topk_weights must be float32, bfloat16, float16 or "
                             "float64; got %s", fn, dt_name(w_dtype));
    if (l_dtype != DS_I8 && l_dtype != DS_I32)
        return ds_cuda_error(DS_ERR_TYPE, "%s: levels must be int8 or int32; got %s", fn,
                             dt_name(l_dtype));
    if (T < 0 || K < 1)
        return ds_cuda_error(DS_ERR_SHAPE, "%s: need T >= 0 and K >= 1; got T=%lld K=%lld", fn,
                             (long long)T, (long long)K);
    if (T > 0 && (topk_weights == NULL || levels == NULL))
        return ds_cuda_error(DS_ERR_VALUE, "%s: topk_weights and levels must not be NULL", fn);
    if (T == 0)
        return DS_OK;
    if (workspace == NULL || workspace_size < DS_CUDA_ROUTE_WORKSPACE || ((uintptr_t)workspace & 7))
        return ds_cuda_error(DS_ERR_VALUE, "%s: workspace must be %d bytes of 8-byte aligned device memory; "
                             "got %zu bytes at %p", fn, DS_CUDA_ROUTE_WORKSPACE, workspace_size, workspace);
    DeviceGuard guard(device);
    CU(guard.err, "route_levels: cudaSetDevice");
    cudaStream_t stream = (cudaStream_t)stream_;
    Thresholds thr;
    memset(&thr, 0, sizeof thr);
    memcpy(thr.v, thresholds, (size_t)P * sizeof(double));
    ull *d_err = (ull *)workspace;
    ull h_err[2] = {NO_ERR, NO_ERR};
    CU(cudaMemsetAsync(d_err, 0xFF, 2 * sizeof(ull), stream), fn);
    DS_LAUNCH(route_levels_kernel, grid_for(T, 256), 256, stream)(
        topk_weights, w_dtype, T, K, ws0, ws1, thr, P, normalize, levels, l_dtype, ls0, ls1, d_err);
    CU(cudaGetLastError(), fn);
    CU(read_and_sync(stream, h_err, d_err, sizeof h_err, NULL, NULL, 0), fn);
    /* The CPU engine scans rows in order and reports the first problem. */
    if (h_err[0] != NO_ERR && (h_err[1] == NO_ERR || h_err[0] / (ull)K <= h_err[1])) {
        int64_t t = (int64_t)(h_err[0] / (ull)K), k = (int64_t)(h_err[0] % (ull)K);
        char buf[8];
        read_back(buf, (const char *)topk_weights + (t * ws0 + k * ws1) * (int64_t)dt_size(w_dtype),
                  dt_size(w_dtype));
        return ds_cuda_error(DS_ERR_VALUE, "%s: topk_weights[%lld, %lld] = %g is not finite", fn,
                             (long long)t, (long long)k, load_real(buf, w_dtype, 0));
    }
    if (h_err[1] != NO_ERR)
        return ds_cuda_error(DS_ERR_VALUE, "%s: topk_weights row %lld sums to 0 and cannot be "
                             "normalised (pass normalize=False to use the raw weights)", fn,
                             (long long)h_err[1]);
    return DS_OK;
}

/* ---- argument checks (no device) ------------------------------------------ */

static ds_status check_common(const char *fn, const ds_cuda_moe_args *a, int need_weights)
{
    if (a == NULL)
        return ds_cuda_error(DS_ERR_VALUE, "%s: arguments are NULL", fn);
    if (a->E < 1 || a->I < 1 || a->H < 1)
        return ds_cuda_error(DS_ERR_SHAPE, "%s: experts need E, I, H >= 1; got E=%lld I=%lld H=%lld",
                             fn, (long long)a->E, (long long)a->I, (long long)a->H);
    if (!is_real(a->dtype))
        return ds_cuda_error(DS_ERR_TYPE, "%s: weights must be float32, bfloat16 or float16; got %s",
                             fn, dt_name(a->dtype));
    if (a->gate_up == NULL || a->down == NULL)
        return ds_cuda_error(DS_ERR_VALUE, "%s: weight pointer tables are NULL", fn);
    if (a->T < 0 || a->K < 1)
        return ds_cuda_error(DS_ERR_SHAPE, "%s: need T >= 0 and K >= 1; got T=%lld K=%lld", fn,
                             (long long)a->T, (long long)a->K);
    if (a->K > a->E)
        return ds_cuda_error(DS_ERR_SHAPE, "%s: topk_ids has K=%lld slots but there are only E=%lld "
                             "experts (K must be <= E)", fn, (long long)a->K, (long long)a->E);
    /* cuBLAS sizes and the plan's row indices are int. */
    if (a->T * a->K >= INT_MAX / 2 || 2 * a->I >= INT_MAX || a->H >= INT_MAX ||
        a->E * (int64_t)a->P >= INT_MAX / 2)
        return ds_cuda_error(DS_ERR_VALUE, "%s: problem too large for the CUDA path (T*K=%lld, I=%lld, "
                             "H=%lld, E*P=%lld must stay below 2^30)", fn, (long long)(a->T * a->K),
                             (long long)a->I, (long long)a->H, (long long)(a->E * a->P));
    if (a->topk_ids.dtype != DS_I32 && a->topk_ids.dtype != DS_I64)
        return ds_cuda_error(DS_ERR_TYPE, "%s: topk_ids must be int32 or int64; got %s", fn,
                             dt_name(a->topk_ids.dtype));
    if (a->T > 0 && a->topk_ids.data == NULL)
        return ds_cuda_error(DS_ERR_VALUE, "%s: topk_ids is NULL", fn);
    if (need_weights && !is_weight(a->topk_weights.dtype))
        return ds_cuda_error(DS_ERR_TYPE, "%s: topk_weights must be float32, bfloat16, float16 or "
                             "float64; got %s", fn, dt_name(a->topk_weights.dtype));
    if (a->T > 0 && a->x == NULL)
        return ds_cuda_error(DS_ERR_VALUE, "%s: x is NULL", fn);
    return DS_OK;
}

extern "C" ds_status ds_cuda_moe_check(const ds_cuda_moe_args *a)
{
    static const char fn[] = "moe_experts";
    if (a == NULL)
        return ds_cuda_error(DS_ERR_VALUE, "%s: arguments are NULL", fn);
    if (a->P < 1 || a->P > 127 || a->P > a->I)
        return ds_cuda_error(DS_ERR_VALUE, "%s: num_partitions must be in [1, min(127, I=%lld)]; got %d",
                             fn, (long long)a->I, a->P);
    ds_status st = check_common(fn, a, 1);
    if (st != DS_OK)
        return st;
    if (a->levels.data != NULL && !is_int(a->levels.dtype))
        return ds_cuda_error(DS_ERR_TYPE, "%s: levels must be an integer array; got %s", fn,
                             dt_name(a->levels.dtype));
    if (a->T > 0 && (a->out == NULL || a->topk_weights.data == NULL))
        return ds_cuda_error(DS_ERR_VALUE, "%s: x, topk_weights and out must not be NULL", fn);
    if (a->ldx < a->H || a->ldo < a->H)
        return ds_cuda_error(DS_ERR_SHAPE, "%s: row strides of x (%lld) and out (%lld) must be >= H=%lld",
                             fn, (long long)a->ldx, (long long)a->ldo, (long long)a->H);
    return DS_OK;
}

extern "C" ds_status ds_cuda_importance_check(const ds_cuda_importance_args *a)
{
    static const char fn[] = "importance";
    if (a == NULL)
        return ds_cuda_error(DS_ERR_VALUE, "%s: arguments are NULL", fn);
    ds_status st = check_common(fn, &a->m, a->weighted);
    if (st != DS_OK)
        return st;
    if (a->accum == NULL)
        return ds_cuda_error(DS_ERR_VALUE, "%s: accum is NULL", fn);
    if (a->weighted && (a->m.topk_weights.data == NULL && a->m.T > 0))
        return ds_cuda_error(DS_ERR_TYPE, "%s: weighted importance needs float topk_weights", fn);
    if (a->m.ldx < a->m.H)
        return ds_cuda_error(DS_ERR_SHAPE, "%s: row stride of x (%lld) must be >= H=%lld", fn,
                             (long long)a->m.ldx, (long long)a->m.H);
    return DS_OK;
}

/* ---- workspace ------------------------------------------------------------- */

/* Device pointer arrays of the grouped GEMMs: (A, B, C) for at most 2*E*P
 * gate/up problems, then for at most E*P down problems. */
#define GEMM_PTRS(EP) (3 * 2 * (size_t)(EP) + 3 * (size_t)(EP))

struct Layout {
    size_t err, bad, keys, hist, total, off, row_tok, row_pair, row_lvl, pos, ptrs, xg, gu, act, y, end;
};

static size_t align256(size_t n) { return (n + 255) & ~(size_t)255; }

static Layout layout(const ds_cuda_moe_args *a, int P, int with_down)
{
    Layout L;
    const size_t N = (size_t)(a->T * a->K), NB = (size_t)cdiv((int64_t)N, PLAN_BLOCK);
    const size_t EP = (size_t)a->E * (size_t)P, esz = dt_size(a->dtype);
    size_t o = 0;
    L.err = o;      o += align256(4 * sizeof(ull));
    L.bad = o;      o += align256(N * sizeof(int64_t));
    L.keys = o;     o += align256(N * 4);
    L.hist = o;     o += align256(NB * EP * 4);
    L.total = o;    o += align256(EP * 4);
    L.off = o;      o += align256((EP + 1) * 4);
    L.row_tok = o;  o += align256(N * 4);
    L.row_pair = o; o += align256(N * 4);
    L.row_lvl = o;  o += align256(N * 4);
    L.pos = o;      o += align256(N * 4);
    L.ptrs = o;     o += align256(GEMM_PTRS(EP) * sizeof(void *));
    L.xg = o;       o += align256(N * (size_t)a->H * esz);
    L.gu = o;       o += align256(N * 2 * (size_t)a->I * (with_down ? esz : 4));
    L.act = o;      if (with_down) o += align256(N * (size_t)a->I * esz);
    L.y = o;        if (with_down) o += align256(N * (size_t)a->H * esz);
    L.end = o;
    return L;
}

extern "C" size_t ds_cuda_moe_workspace_size(const ds_cuda_moe_args *a)
{
    if (a == NULL || a->T < 0 || a->K < 1 || a->E < 1 || a->P < 1)
        return 0;
    return layout(a, a->P, 1).end;
}

extern "C" size_t ds_cuda_importance_workspace_size(const ds_cuda_importance_args *a)
{
    if (a == NULL || a->m.T < 0 || a->m.K < 1 || a->m.E < 1)
        return 0;
    return layout(&a->m, 1, 0).end;
}

/* ---- plan kernels ------------------------------------------------------------ */

/* err[0]: first pair with an id outside [0, E); err[1]: first pair with a
 * level outside [0, P].  Each id and level is read once; a bad one is kept in
 * bad[i], so the error message names the value that failed the check even if
 * another stream changes the input meanwhile. */
__global__ void plan_count_kernel(ds_mat ids, ds_mat lv, int64_t T, int64_t K, int64_t E, int P,
                                  int32_t *keys, int32_t *hist, int64_t EP, ull *err, int64_t *bad)
{
    int64_t i = blockIdx.x * (int64_t)PLAN_BLOCK + threadIdx.x;
    if (i >= T * K)
        return;
    int64_t t = i / K, k = i % K;
    int64_t e = load_int(ids.data, ids.dtype, t * ids.s0 + k * ids.s1);
    int64_t l = lv.data ? load_int(lv.data, lv.dtype, t * lv.s0 + k * lv.s1) : P;
    int32_t key = -1;
    if (e < 0 || e >= E) {
        bad[i] = e;
        atomicMin(&err[0], (ull)i);
    } else if (l < 0 || l > P) {
        bad[i] = l;
        atomicMin(&err[1], (ull)i);
    }
    else if (l > 0)
        key = (int32_t)(e * P + (P - l));
    keys[i] = key;
    if (key >= 0)
        atomicAdd(&hist[blockIdx.x * EP + key], 1);
}

__global__ void plan_scan_kernel(int32_t *hist, int64_t NB, int64_t EP, int32_t *total)
{
    int64_t key = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (key >= EP)
        return;
    int32_t run = 0;
    for (int64_t b = 0; b < NB; b++) {
        int32_t c = hist[b * EP + key];
        hist[b * EP + key] = run;
        run += c;
    }
    total[key] = run;
}

__global__ void plan_offsets_kernel(const int32_t *total, int64_t EP, int32_t *off)
{
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        int32_t run = 0;
        for (int64_t key = 0; key < EP; key++) {
            off[key] = run;
            run += total[key];
        }
        off[EP] = run;
    }
}

__global__ void plan_place_kernel(const int32_t *keys, const int32_t *hist, const int32_t *off,
                                  int64_t N, int64_t K, int64_t EP, int P, int32_t *row_tok,
                                  int32_t *row_pair, int32_t *row_lvl, int32_t *pos)
{
    __shared__ int32_t sk[PLAN_BLOCK];
    int64_t i = blockIdx.x * (int64_t)PLAN_BLOCK + threadIdx.x;
    int32_t key = i < N ? keys[i] : -1;
    sk[threadIdx.x] = key;
    __syncthreads();
    if (i >= N)
        return;
    if (key < 0) {
        pos[i] = -1;
        return;
    }
    int32_t rank = 0;
    for (unsigned j = 0; j < threadIdx.x; j++)
        rank += sk[j] == key;
    int32_t r = off[key] + hist[blockIdx.x * EP + key] + rank;
    row_tok[r] = (int32_t)(i / K);
    row_pair[r] = (int32_t)i;
    row_lvl[r] = P - (key % P);
    pos[i] = r;
}

template <typename T>
__global__ void gather_kernel(const T *x, int64_t ldx, const int32_t *row_tok, int64_t R, int64_t H,
                              T *xg)
{
    for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < R * H;
         idx += (int64_t)gridDim.x * blockDim.x) {
        int64_t r = idx / H, h = idx % H;
        xg[idx] = x[(int64_t)row_tok[r] * ldx + h];
    }
}

/* A[r, j] = silu(G[r, j]) * U[r, j] for j < (level_r * I) / P, in float32
 * from G and U in dt, rounded to dt. */
__global__ void swiglu_kernel(const void *gu, const int32_t *row_lvl, int64_t R, int64_t I, int P,
                              void *act, ds_dtype dt)
{
    for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < R * I;
         idx += (int64_t)gridDim.x * blockDim.x) {
        int64_t r = idx / I, j = idx % I;
        int64_t n = ((int64_t)row_lvl[r] * I) / P;
        if (j >= n)
            continue;
        float g = (float)load_real(gu, dt, r * 2 * I + j), u = (float)load_real(gu, dt, r * 2 * I + I + j);
        float a = g / (1.0f + expf(-g)) * u;
        store_act(act, dt, idx, a);
    }
}

/* out[t, h] = sum_k w[t, k] * Y[pos[t, k], h], k in order, float32 (Y in dt). */
__global__ void combine_kernel(const void *y, const int32_t *pos, ds_mat w, int64_t T, int64_t K,
                               int64_t H, void *out, int64_t ldo, ds_dtype dt)
{
    for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < T * H;
         idx += (int64_t)gridDim.x * blockDim.x) {
        int64_t t = idx / H, h = idx % H;
        float acc = 0.0f;
        for (int64_t k = 0; k < K; k++) {
            int32_t r = pos[t * K + k];
            if (r < 0)
                continue;
            float c = (float)load_real(w.data, w.dtype, t * w.s0 + k * w.s1);
            acc += c * (float)load_real(y, dt, (int64_t)r * H + h);
        }
        store_act(out, dt, t * ldo + h, acc);
    }
}

__global__ void zero_rows_kernel(void *out, int64_t ldo, int64_t T, int64_t H, ds_dtype dt)
{
    for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < T * H;
         idx += (int64_t)gridDim.x * blockDim.x)
        store_act(out, dt, (idx / H) * ldo + idx % H, 0.0f);
}

/* One thread per (e, n): sums over the expert's rows in row order. */
__global__ void importance_kernel(const void *gu, ds_dtype dt, const int32_t *off, const int32_t *row_pair,
                                  ds_mat w, int weighted, int64_t K, int64_t E, int64_t I,
                                  double *accum, double *counts)
{
    for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < E * I;
         idx += (int64_t)gridDim.x * blockDim.x) {
        int64_t e = idx / I, n = idx % I;
        double s0 = 0, s1 = 0, s2 = 0, s3 = 0, cnt = 0;
        for (int32_t r = off[e]; r < off[e + 1]; r++) {
            double c = 1.0;
            if (weighted) {
                int64_t p = row_pair[r];
                c = load_real(w.data, w.dtype, (p / K) * w.s0 + (p % K) * w.s1);
            }
            double a = load_real(gu, dt, (int64_t)r * 2 * I + n), b = load_real(gu, dt, (int64_t)r * 2 * I + I + n);
            double sa = a / (1.0 + exp(-a));
            s0 += c * sa;
            s1 += c * fabs(sa);
            s2 += c * sa * b;
            s3 += c * fabs(sa * b);
            cnt += c;
        }
        accum[0 * E * I + idx] += s0;
        accum[1 * E * I + idx] += s1;
        accum[2 * E * I + idx] += s2;
        accum[3 * E * I + idx] += s3;
        if (counts && n == 0)
            counts[e] += cnt;
    }
}

/* ---- the shared front half: plan, read-back, gather ------------------------- */

struct Plan {
    std::vector<int32_t> total; /* E*P rows per key */
    std::vector<int64_t> off;   /* E*P+1 */
    int64_t R = 0;
};

/* One GEMM, cuBLAS column-major terms: C (m x n, ldc) = op_T(A) (m x k) *
 * B (k x n): row-major "C[rows, out] = X[rows, :k] . W[out, :k]" with
 * A = W (lda = W's row stride), B = X (ldb = X's row stride), m = out
 * features, n = rows.  A, B and C all hold the op's dtype. */
struct Gemm {
    int m, n, k;
    const void *A;
    int lda;
    const void *B;
    int ldb;
    void *C;
    int ldc;
};

/* Whether a problem's matrices meet what cublasGemmGroupedBatchedEx needs of
 * pointers it reads from device memory (where cuBLAS cannot inspect them
 * when it picks a kernel): for 16-bit types (and the FAST compute types)
 * the documentation asks for 16-byte aligned A, B and C (else, depending on
 * k, 4-byte alignment), and a misaligned one is a misaligned-address fault
 * on the device, not a status.  Problems that are not 16-byte aligned run
 * in the cublasGemmEx loop, which reads its pointers on the host. */
static int grouped_aligned(const Gemm &g, ds_dtype dt)
{
    if (dt == DS_F32)
        return 1; /* 32F under CUBLAS_COMPUTE_32F: no documented requirement */
    return (((uintptr_t)g.A | (uintptr_t)g.B | (uintptr_t)g.C) & 15) == 0;
}

/* A list of GEMMs in groups (the problems of a group share m, n, k and the
 * leading dimensions) for the grouped call, and the problems that must run
 * in the cublasGemmEx loop (misaligned for the grouped call). */
struct GemmBatch {
    ds_dtype dt, ct; /* A and B type, C type */
    std::vector<Gemm> p;
    std::vector<int> group_size;
    std::vector<Gemm> loop;
    bool open_new = true;
    GemmBatch(ds_dtype dt_, ds_dtype ct_) : dt(dt_), ct(ct_) {}
    void add(const Gemm &g, int new_group)
    {
        if (new_group)
            open_new = true;
        /* the grouped call has no 16-bit -> float32 combination */
        if (ct != dt || !grouped_aligned(g, dt)) {
            loop.push_back(g);
            return;
        }
        p.push_back(g);
        if (open_new || group_size.empty())
            group_size.push_back(1);
        else
            group_size.back()++;
        open_new = false;
    }
    size_t size() const { return p.size() + loop.size(); }
};

/* How the calling thread's last op ran its GEMMs: problems computed by
 * grouped calls and by the cublasGemmEx loop. */
static thread_local long long last_grouped_n, last_loop_n;

extern "C" int ds_cuda_last_gemm_grouped(void) { return last_grouped_n > 0 && last_loop_n == 0; }
extern "C" void ds_cuda_last_gemm_counts(long long *grouped, long long *loop)
{
    *grouped = last_grouped_n;
    *loop = last_loop_n;
}

/* cuBLAS status of the grouped call's refusal per dtype (float32, bfloat16,
 * float16), 0 while it has not refused: a refused type is not tried again
 * (the refusal costs a failed call per phase). */
static int grouped_refusal[3];

extern "C" int ds_cuda_blas_grouped_refusal(ds_dtype dt)
{
    return (unsigned)dt < 3 ? __atomic_load_n(&grouped_refusal[dt], __ATOMIC_RELAXED) : 0;
}

extern "C" void ds_cuda_blas_forget_refusals(void)
{
    for (int i = 0; i < 3; i++)
        __atomic_store_n(&grouped_refusal[i], 0, __ATOMIC_RELAXED);
}

static int grouped_wanted(const ds_blas_api *api, ds_dtype dt)
{
    const char *env = getenv("DUALSPARSE_CUDA_GEMM");
    if (env != NULL && strcmp(env, "loop") == 0)
        return 0;
    return api->gemm_grouped != NULL && ds_cuda_blas_grouped_refusal(dt) == 0;
}

/* Copies the (A, B, C) device pointers of every batch's grouped problems
 * into dev_ptrs in one host-to-device copy (batch b's at offset 3 *
 * (grouped problems before b)).  From pageable memory the copy returns once
 * the bytes are staged, so `host` may be reused after; it may wait for work
 * already queued on the stream, which is why it is made once per op, right
 * after the plan, before the GEMMs are queued. */
static cudaError_t upload_ptrs(const GemmBatch *const *batches, int nb, void **dev_ptrs,
                               std::vector<const void *> &host, cudaStream_t stream)
{
    host.clear();
    for (int b = 0; b < nb; b++) {
        const std::vector<Gemm> &p = batches[b]->p;
        for (const Gemm &q : p)
            host.push_back(q.A);
        for (const Gemm &q : p)
            host.push_back(q.B);
        for (const Gemm &q : p)
            host.push_back(q.C);
    }
    if (host.empty())
        return cudaSuccess;
    return cudaMemcpyAsync(dev_ptrs, host.data(), host.size() * sizeof(void *), cudaMemcpyHostToDevice, stream);
}

static ds_status gemm_loop(const ds_blas_api *api, ds_blas_handle h, const std::vector<Gemm> &ps,
                           cudaDataType bt, cudaDataType ct, const char *what)
{
    const float one = 1.0f, zero = 0.0f;
    for (const Gemm &q : ps) {
        int st = api->gemm_ex(h, DS_BLAS_OP_T, DS_BLAS_OP_N, q.m, q.n, q.k, &one, q.A, bt, q.lda, q.B, bt,
                              q.ldb, &zero, q.C, ct, q.ldc, DS_BLAS_COMPUTE_32F, DS_BLAS_GEMM_DEFAULT);
        if (st != 0)
            return ds_cuda_error(DS_ERR_INTERNAL, "%s: cublasGemmEx failed with status %d (m=%d n=%d k=%d)",
                                 what, st, q.m, q.n, q.k);
    }
    last_loop_n += (long long)ps.size();
    return DS_OK;
}

/* For GEMMs with 16-bit outputs: adds CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_
 * REDUCTION to the handle's math mode for the guard's lifetime (by default
 * cuBLAS may reduce split-K partial sums in the 16-bit output type, which
 * would round every partial sum; the op's sums stay in float32 until the
 * one rounding of C), and restores the caller's mode after (torch's GEMM
 * calls change and restore it the same way).  The mode is read when a GEMM
 * is issued, so restoring it right after the calls is safe. */
struct MathModeGuard {
    const ds_blas_api *api;
    ds_blas_handle h;
    int prev = 0, set = 0, err = 0;
    MathModeGuard(const ds_blas_api *api_, ds_blas_handle h_, ds_dtype out) : api(api_), h(h_)
    {
        if (out == DS_F32)
            return;
        err = api->get_math_mode(h, &prev);
        if (err == 0 && !(prev & DS_BLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION)) {
            err = api->set_math_mode(h, prev | DS_BLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION);
            set = err == 0;
        }
    }
    ~MathModeGuard()
    {
        if (set)
            api->set_math_mode(h, prev);
    }
};

/* Runs a batch: its aligned problems as one cublasGemmGroupedBatchedEx
 * (dev_ptrs: their uploaded pointers, NULL when none were uploaded), the
 * rest, and everything when the loaded cuBLAS lacks the grouped call,
 * refuses the problem or DUALSPARSE_CUDA_GEMM=loop, as a loop of
 * cublasGemmEx on the stream.  Both compute C in the dtype from float32
 * sums, so the results do not depend on the path. */
static ds_status run_gemms(const ds_blas_api *api, ds_blas_handle h, const GemmBatch &b, void *const *dev_ptrs,
                           const char *what)
{
    const size_t np = b.p.size();
    const ds_dtype dt = b.dt;
    const cudaDataType bt = blas_type(dt), ct = blas_type(b.ct);
    if (np > 0 && dev_ptrs != NULL) {
        const size_t G = b.group_size.size();
        std::vector<int> ta(G, DS_BLAS_OP_T), tb(G, DS_BLAS_OP_N), m(G), n(G), k(G), lda(G), ldb(G), ldc(G);
        std::vector<float> alpha(G, 1.0f), beta(G, 0.0f);
        size_t i = 0;
        for (size_t g = 0; g < G; g++) {
            const Gemm &q = b.p[i];
            m[g] = q.m; n[g] = q.n; k[g] = q.k; lda[g] = q.lda; ldb[g] = q.ldb; ldc[g] = q.ldc;
            i += (size_t)b.group_size[g];
        }
        int st = api->gemm_grouped(h, ta.data(), tb.data(), m.data(), n.data(), k.data(), alpha.data(),
                                   (const void *const *)dev_ptrs, bt, lda.data(),
                                   (const void *const *)(dev_ptrs + np), bt, ldb.data(), beta.data(),
                                   dev_ptrs + 2 * np, ct, ldc.data(), (int)G, b.group_size.data(),
                                   DS_BLAS_COMPUTE_32F);
        if (st == 0) {
            last_grouped_n += (long long)np;
        } else {
            /* Refused (a shape or type this version does not group):
             * remembered, and the loop computes these problems too (beta =
             * 0: C is never read, so whatever a refused call did is
             * overwritten). */
            if ((unsigned)dt < 3)
                __atomic_store_n(&grouped_refusal[dt], st, __ATOMIC_RELAXED);
            ds_status r = gemm_loop(api, h, b.p, bt, ct, what);
            if (r != DS_OK)
                return r;
        }
    } else {
        ds_status r = gemm_loop(api, h, b.p, bt, ct, what);
        if (r != DS_OK)
            return r;
    }
    return gemm_loop(api, h, b.loop, bt, ct, what);
}

/* Plan (count, scan, offsets; the op's one synchronisation; place), then the
 * gather of the routed rows.  On return plan holds the row counts. */
static ds_status plan_and_gather(const char *fn, cudaStream_t stream, const ds_cuda_moe_args *a, int P,
                                 const ds_mat *lv, char *ws, const Layout &L, Plan &plan)
{
    const int64_t T = a->T, K = a->K, E = a->E, H = a->H, N = T * K;
    const int64_t NB = cdiv(N, PLAN_BLOCK), EP = E * P;
    const size_t esz = dt_size(a->dtype);
    ull *err = (ull *)(ws + L.err);
    int64_t *bad = (int64_t *)(ws + L.bad);
    int32_t *keys = (int32_t *)(ws + L.keys), *hist = (int32_t *)(ws + L.hist);
    int32_t *total = (int32_t *)(ws + L.total), *off = (int32_t *)(ws + L.off);
    int32_t *row_tok = (int32_t *)(ws + L.row_tok), *row_pair = (int32_t *)(ws + L.row_pair);
    int32_t *row_lvl = (int32_t *)(ws + L.row_lvl), *pos = (int32_t *)(ws + L.pos);

    CU(cudaMemsetAsync(err, 0xFF, 4 * sizeof(ull), stream), fn);
    CU(cudaMemsetAsync(hist, 0, (size_t)(NB * EP) * 4, stream), fn);
    DS_LAUNCH(plan_count_kernel, (unsigned)NB, PLAN_BLOCK, stream)(a->topk_ids, *lv, T, K, E, P, keys,
                                                                    hist, EP, err, bad);
    CU(cudaGetLastError(), fn);
    DS_LAUNCH(plan_scan_kernel, (unsigned)cdiv(EP, 256), 256, stream)(hist, NB, EP, total);
    CU(cudaGetLastError(), fn);
    DS_LAUNCH(plan_offsets_kernel, 1, 1, stream)(total, EP, off);
    CU(cudaGetLastError(), fn);

    /* The one host synchronisation: row counts for the GEMM sizes, and the
     * validation flags. */
    plan.total.assign((size_t)EP, 0);
    ull h_err[2] = {NO_ERR, NO_ERR};
    CU(read_and_sync(stream, plan.total.data(), total, (size_t)EP * 4, h_err, err, sizeof h_err), fn);
    if (h_err[0] != NO_ERR) {
        int64_t t = (int64_t)(h_err[0] / (ull)K), k = (int64_t)(h_err[0] % (ull)K);
        int64_t v;
        read_back(&v, bad + h_err[0], sizeof v);
        return ds_cuda_error(DS_ERR_VALUE,
                             "%s: topk_ids[%lld, %lld] = %lld is outside [0, %lld) (E = %lld experts)",
                             fn, (long long)t, (long long)k, (long long)v,
                             (long long)E, (long long)E);
    }
    if (h_err[1] != NO_ERR) {
        int64_t t = (int64_t)(h_err[1] / (ull)K), k = (int64_t)(h_err[1] % (ull)K);
        int64_t v;
        read_back(&v, bad + h_err[1], sizeof v);
        return ds_cuda_error(DS_ERR_VALUE, "%s: levels[%lld, %lld] = %lld is outside [0, num_partitions=%d]",
                             fn, (long long)t, (long long)k, (long long)v, P);
    }
    plan.off.assign((size_t)EP + 1, 0);
    for (int64_t key = 0; key < EP; key++)
        plan.off[key + 1] = plan.off[key] + plan.total[key];
    plan.R = plan.off[EP];

    DS_LAUNCH_SYNC(plan_place_kernel, (unsigned)NB, PLAN_BLOCK, stream)(keys, hist, off, N, K, EP, P, row_tok,
                                                                         row_pair, row_lvl, pos);
    CU(cudaGetLastError(), fn);
    if (plan.R == 0)
        return DS_OK;
    char *xg = ws + L.xg;
    if (esz == 4)
        DS_LAUNCH(gather_kernel<float>, grid_for(plan.R * H, 256), 256, stream)(
            (const float *)a->x, a->ldx, row_tok, plan.R, H, (float *)xg);
    else
        DS_LAUNCH(gather_kernel<uint16_t>, grid_for(plan.R * H, 256), 256, stream)(
            (const uint16_t *)a->x, a->ldx, row_tok, plan.R, H, (uint16_t *)xg);
    CU(cudaGetLastError(), fn);
    return DS_OK;
}

/* gate/up: for every expert, partition q needs the rows with level >= q (a
 * prefix of the expert's rows, levels being sorted descending); runs of
 * partitions with the same row count become one GEMM pair.  G[r, j] at
 * gu[r*2I + j], U at + I. */
static void gate_up_gemms(const ds_cuda_moe_args *a, int P, const Plan &plan, char *ws, const Layout &L,
                          GemmBatch &batch)
{
    const int64_t E = a->E, I = a->I, H = a->H;
    const size_t esz = dt_size(a->dtype);
    const char *xg = ws + L.xg;
    char *gu = ws + L.gu;
    const size_t csz = dt_size(batch.ct);
    std::vector<int64_t> mq((size_t)P + 2, 0);
    for (int64_t e = 0; e < E; e++) {
        const int64_t row0 = plan.off[e * P];
        const char *gate = (const char *)a->gate_up + (size_t)e * 2 * I * H * esz;
        const char *up = gate + (size_t)I * H * esz;
        int64_t m_q = 0; /* rows with level >= q */
        for (int q = P; q >= 1; q--) {
            m_q += plan.total[e * P + (P - q)];
            mq[q] = m_q;
        }
        int q = 1;
        while (q <= P) {
            int q1 = q;
            while (q1 + 1 <= P && mq[q1 + 1] == mq[q])
                q1++;
            const int64_t j0 = ((int64_t)(q - 1) * I) / P, j1 = ((int64_t)q1 * I) / P, m = mq[q];
            if (m > 0 && j1 > j0) {
                const char *B = xg + (size_t)row0 * H * esz;
                Gemm g = {(int)(j1 - j0), (int)m, (int)H, gate + (size_t)j0 * H * esz, (int)H, B, (int)H,
                          gu + (size_t)(row0 * 2 * I + j0) * csz, (int)(2 * I)};
                batch.add(g, 1);
                g.A = up + (size_t)j0 * H * esz;
                g.C = gu + (size_t)(row0 * 2 * I + I + j0) * csz;
                batch.add(g, 0);
            }
            q = q1 + 1;
        }
    }
}

/* down: the rows at level l of expert e form one block and use the first
 * (l*I)/P >= 1 neurons (P <= I); Y[r, h] at y[r*H + h]. */
static void down_gemms(const ds_cuda_moe_args *a, const Plan &plan, char *ws, const Layout &L, GemmBatch &batch)
{
    const int64_t E = a->E, I = a->I, H = a->H;
    const int P = a->P;
    const size_t esz = dt_size(a->dtype);
    const char *act = ws + L.act;
    char *y = ws + L.y;
    for (int64_t e = 0; e < E; e++) {
        const char *down = (const char *)a->down + (size_t)e * H * I * esz;
        for (int l = P; l >= 1; l--) {
            const int64_t key = e * P + (P - l), rb = plan.off[key], m = plan.total[key];
            const int64_t kk = ((int64_t)l * I) / P;
            if (m == 0)
                continue;
            Gemm g = {(int)H, (int)m, (int)kk, down, (int)I, act + (size_t)rb * I * esz, (int)I,
                      y + (size_t)rb * H * esz, (int)H};
            batch.add(g, 1);
        }
    }
}

/* The expert ops' workspace: `need` bytes, 256-byte aligned (cuBLAS' slice
 * of it must be). */
static ds_status check_workspace(const char *fn, const void *workspace, size_t size, size_t need)
{
    if (workspace == NULL || size < need || ((uintptr_t)workspace & 255))
        return ds_cuda_error(DS_ERR_VALUE, "%s: workspace must be %zu bytes of 256-byte aligned device memory; "
                             "got %zu bytes at %p", fn, need, size, workspace);
    return DS_OK;
}

/* ---- moe_experts ------------------------------------------------------------- */

extern "C" ds_status ds_cuda_moe_experts(int device, void *stream_, void *blas_handle, const ds_cuda_moe_args *a,
                                         void *workspace, size_t workspace_size)
{
    static const char fn[] = "moe_experts";
    last_grouped_n = last_loop_n = 0;
    ds_status st = ds_cuda_moe_check(a);
    if (st != DS_OK)
        return st;
    if (a->T == 0)
        return DS_OK;
    const Layout L = layout(a, a->P, 1);
    if ((st = check_workspace(fn, workspace, workspace_size, L.end)) != DS_OK)
        return st;
    DeviceGuard guard(device);
    CU(guard.err, "moe_experts: cudaSetDevice");
    cudaStream_t stream = (cudaStream_t)stream_;
    const int64_t T = a->T, K = a->K, I = a->I, H = a->H;
    const int P = a->P;
    char *ws = (char *)workspace;
    ds_blas_handle h;
    st = ds_blas_check_handle(fn, blas_handle, stream, &h);
    if (st != DS_OK)
        return st;
    Plan plan;
    st = plan_and_gather(fn, stream, a, P, &a->levels, ws, L, plan);
    if (st != DS_OK)
        return st;
    if (plan.R == 0) {
        DS_LAUNCH(zero_rows_kernel, grid_for(T * H, 256), 256, stream)(a->out, a->ldo, T, H, a->dtype);
        CU(cudaGetLastError(), fn);
        return DS_OK;
    }
    const ds_blas_api *api = ds_blas();
    MathModeGuard math(api, h, a->dtype);
    if (math.err != 0)
        return ds_cuda_error(DS_ERR_INTERNAL, "%s: cublasGetMathMode/cublasSetMathMode failed with status %d", fn,
                             math.err);
    GemmBatch gub(a->dtype, a->dtype), dnb(a->dtype, a->dtype);
    gate_up_gemms(a, P, plan, ws, L, gub);
    down_gemms(a, plan, ws, L, dnb);
    void **dev_ptrs = (void **)(ws + L.ptrs);
    std::vector<const void *> host_ptrs;
    const int grouped = grouped_wanted(api, a->dtype);
    if (grouped) {
        const GemmBatch *both[2] = {&gub, &dnb};
        CU(upload_ptrs(both, 2, dev_ptrs, host_ptrs, stream), fn);
    }
    st = run_gemms(api, h, gub, grouped ? dev_ptrs : NULL, "gate/up");
    if (st != DS_OK)
        return st;
    const int32_t *row_lvl = (const int32_t *)(ws + L.row_lvl), *pos = (const int32_t *)(ws + L.pos);
    DS_LAUNCH(swiglu_kernel, grid_for(plan.R * I, 256), 256, stream)(ws + L.gu, row_lvl, plan.R, I, P, ws + L.act,
                                                                       a->dtype);
    CU(cudaGetLastError(), fn);
    /* after a refusal in the gate/up phase the down phase does not ask again */
    st = run_gemms(api, h, dnb, grouped && grouped_wanted(api, a->dtype) ? dev_ptrs + 3 * gub.p.size() : NULL,
                   "down");
    if (st != DS_OK)
        return st;
    DS_LAUNCH(combine_kernel, grid_for(T * H, 256), 256, stream)(ws + L.y, pos, a->topk_weights,
                                                                  T, K, H, a->out, a->ldo, a->dtype);
    CU(cudaGetLastError(), fn);
    return DS_OK;
}

/* ---- importance ------------------------------------------------------------- */

extern "C" ds_status ds_cuda_importance(int device, void *stream_, void *blas_handle,
                                        const ds_cuda_importance_args *a, void *workspace, size_t workspace_size)
{
    static const char fn[] = "importance";
    last_grouped_n = last_loop_n = 0;
    ds_status st = ds_cuda_importance_check(a);
    if (st != DS_OK)
        return st;
    if (a->m.T == 0)
        return DS_OK;
    const Layout L = layout(&a->m, 1, 0);
    if ((st = check_workspace(fn, workspace, workspace_size, L.end)) != DS_OK)
        return st;
    DeviceGuard guard(device);
    CU(guard.err, "importance: cudaSetDevice");
    cudaStream_t stream = (cudaStream_t)stream_;
    char *ws = (char *)workspace;
    ds_blas_handle h;
    st = ds_blas_check_handle(fn, blas_handle, stream, &h);
    if (st != DS_OK)
        return st;
    ds_mat no_levels = {NULL, DS_I32, 0, 0};
    Plan plan;
    st = plan_and_gather(fn, stream, &a->m, 1, &no_levels, ws, L, plan);
    if (st != DS_OK)
        return st;
    if (plan.R == 0)
        return DS_OK;
    const ds_blas_api *api = ds_blas();
    /* float32 gate/up outputs (the importance sums' inputs, as on the CPU):
     * for 16-bit weights the cublasGemmEx loop, the grouped call having no
     * 16-bit -> float32 combination */
    GemmBatch gub(a->m.dtype, DS_F32);
    gate_up_gemms(&a->m, 1, plan, ws, L, gub);
    void **dev_ptrs = (void **)(ws + L.ptrs);
    std::vector<const void *> host_ptrs;
    const int grouped = grouped_wanted(api, a->m.dtype);
    if (grouped) {
        const GemmBatch *one[1] = {&gub};
        CU(upload_ptrs(one, 1, dev_ptrs, host_ptrs, stream), fn);
    }
    st = run_gemms(api, h, gub, grouped ? dev_ptrs : NULL, "gate/up");
    if (st != DS_OK)
        return st;
    DS_LAUNCH(importance_kernel, grid_for(a->m.E * a->m.I, 128), 128, stream)(
        ws + L.gu, DS_F32, (const int32_t *)(ws + L.off), (const int32_t *)(ws + L.row_pair),
        a->m.topk_weights, a->weighted, a->m.K, a->m.E, a->m.I, a->accum, a->counts);
    CU(cudaGetLastError(), fn);
    return DS_OK;
}
