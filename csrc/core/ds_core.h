/*
 * dualsparse core: plain C11, no Python, no CUDA.
 *
 * Every entry point returns a ds_status; on failure the thread-local message
 * from ds_last_error() names the argument and the offending value.  Kernels
 * never own memory: callers pass outputs and workspace (see the matching
 * *_workspace_size() queries).
 */
#ifndef DS_CORE_H
#define DS_CORE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define DS_VERSION_STRING "0.1.0"

typedef enum {
    DS_OK = 0,
    DS_ERR_VALUE = 1,       /* a value is out of its allowed range */
    DS_ERR_TYPE = 2,        /* unsupported dtype */
    DS_ERR_SHAPE = 3,       /* shapes disagree */
    DS_ERR_MEMORY = 4,      /* allocation failed */
    DS_ERR_UNSUPPORTED = 5, /* valid request this build cannot serve */
    DS_ERR_INTERNAL = 6
} ds_status;

typedef enum {
    DS_F32 = 0,
    DS_BF16 = 1,
    DS_F16 = 2,
    DS_F64 = 3,
    DS_I8 = 4,
    DS_U8 = 5,
    DS_I16 = 6,
    DS_I32 = 7,
    DS_I64 = 8,
    DS_DTYPE_COUNT = 9
} ds_dtype;

/* ---- errors ------------------------------------------------------------ */
const char *ds_last_error(void);
ds_status ds_error(ds_status code, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
const char *ds_dtype_name(ds_dtype dt);
size_t ds_dtype_size(ds_dtype dt);

/* ---- CPU features and kernel selection --------------------------------- */
typedef enum {
    DS_SIMD_GENERIC = 0,    /* portable C, auto-vectorised for the baseline ISA */
    DS_SIMD_AVX2 = 1,       /* AVX2 + FMA + F16C */
    DS_SIMD_AVX512 = 2,     /* AVX-512 F/BW/VL/DQ */
    DS_SIMD_AVX512_BF16 = 3, /* AVX-512 plus the BF16 dot-product instruction */
    DS_SIMD_AMX_BF16 = 4     /* that plus the AMX tile unit for bfloat16 blocks */
} ds_simd_level;

ds_simd_level ds_simd_detected(void);          /* best level this CPU and build allow */
ds_simd_level ds_simd_active(void);            /* level in use */
ds_status ds_simd_set(ds_simd_level level);    /* force a lower level (tests, benchmarks) */
const char *ds_simd_name(ds_simd_level level);
int ds_simd_compiled(ds_simd_level level);     /* 1 if the build contains that level */
/* The block GEMM that some levels (AVX2) use for blocks of many rows: on by
 * default; off, every block goes through the dot tiles, as on the other
 * levels (benchmarks compare the two).  Read once at the start of each call. */
void ds_block_gemm_set(int on);
int ds_block_gemm_enabled(void);
/* Weight rows of the GEMV-shaped kernel (1-3 rows of x): one at a time, each
 * row one stream, except short rows (0), or four at a time, four streams
 * side by side (1).  Chosen by the CPU's vendor at first use: 1 on Intel,
 * whose prefetchers read several streams faster than one, 0 elsewhere (AMD
 * Zen 4 measured the opposite; benchmarks/README.md).  -1 restores that
 * choice; tests set both.  Read once at the start of each call.  The two
 * rules sum in different orders: the bits of decode shapes differ between
 * them, never between thread counts. */
void ds_rows_four_set(int rule);
int ds_rows_four_rule(void);

/* ---- threads ----------------------------------------------------------- */
/* fn(ctx, item) is called once for every item in [0, n_items), by at most
 * n_threads threads (the caller included).  The split of work into items
 * must not depend on n_threads: that is what keeps results bitwise equal. */
typedef void (*ds_item_fn)(void *ctx, int64_t item, int thread_index);
ds_status ds_parallel_for(int n_threads, int64_t n_items, ds_item_fn fn, void *ctx);
int ds_max_threads(void); /* hard cap on n_threads */

/* ---- routing levels ------------------------------------------------------
 * topk_weights: T x K (f32, bf16 or f16; element strides ws0, ws1)
 * thresholds:   P ascending finite values
 * levels:       T x K (i8 or i32; element strides ls0, ls1)
 * levels[t,k] = #{ j : s[t,k] >= thresholds[j] }, s = w / sum_k w (float64,
 * summed over k in order) when normalize, else w.  A row whose float64 sum
 * overflows is scaled by a power of two before summing (same scores).
 *
 * Every entry point reads its inputs while it runs: a caller must not let
 * another thread change them during the call (the Python binding copies the
 * routing data and permutations once before calling). */
ds_status ds_route_levels(const void *topk_weights, ds_dtype w_dtype, int64_t T, int64_t K,
                          int64_t ws0, int64_t ws1, const double *thresholds, int P,
                          int normalize, void *levels, ds_dtype l_dtype, int64_t ls0,
                          int64_t ls1);

ds_status ds_check_thresholds(const double *thresholds, int P);

/* ---- expert weights ------------------------------------------------------
 * Per expert e: gate[e] and up[e] are I x H row-major with row stride ld_gu,
 * down[e] is H x I row-major with row stride ld_down.  The transformers 5.x
 * fused layout gate_up_proj [E, 2I, H] / down_proj [E, H, I] maps to
 * gate[e] = gate_up + e*2I*H, up[e] = gate[e] + I*H; the 4.x per-expert
 * nn.Linear layout passes each module's weight pointer.  Nothing is copied. */
typedef struct {
    int64_t E, I, H;
    ds_dtype dtype;             /* f32, bf16 or f16; same for x and out */
    void *const *gate;          /* E pointers (only permutation writes) */
    void *const *up;            /* E pointers */
    void *const *down;          /* E pointers */
    int64_t ld_gu;              /* >= H */
    int64_t ld_down;            /* >= I */
    /* 0 or 1: down[e] is H x I as above.  D >= 2 (at most min(127, I)):
     * down[e] holds D column blocks one after another, block b the columns
     * [b*I/D, (b+1)*I/D) (integer division) as an H x (hi - lo) row-major
     * matrix starting at element H*lo; ld_down is not read (still >= I).
     * With D equal to the call's num_partitions, a pair at level p < P reads
     * whole rows of p blocks instead of a prefix of every row (a prefix read
     * costs close to the whole row where hardware prefetchers run ahead into
     * the rest).  The prefix is summed block by block, in block order. */
    int64_t down_parts;
} ds_experts;

/* A small 2-D view of routing data (ids, weights, levels). */
typedef struct {
    const void *data;
    ds_dtype dtype;
    int64_t s0, s1; /* element strides */
} ds_mat;

/* ---- expert computation -------------------------------------------------
 * x:            T x H (row stride ldx, unit inner stride), dtype = w->dtype
 * topk_ids:     T x K, i32 or i64, values in [0, E)
 * topk_weights: T x K, f32 / bf16 / f16
 * levels:       T x K integers in [0, P], or data == NULL for all P
 * out:          T x H (row stride ldo), dtype = w->dtype; overwritten.
 * A pair at level p computes the first (p*I)/P neurons of its expert;
 * out[t] = sum_k topk_weights[t,k] * y_{t,k}, summed in k order in float32. */
typedef struct {
    int64_t T, K;
    int P;
    const void *x;
    int64_t ldx;
    ds_mat topk_ids, topk_weights, levels;
    void *out;
    int64_t ldo;
    double *timings; /* optional, 4 values: seconds in plan, gate/up, down, combine */
} ds_moe_args;

size_t ds_moe_workspace_size(const ds_experts *w, const ds_moe_args *a, int n_threads);
ds_status ds_moe_experts(const ds_experts *w, const ds_moe_args *a, void *workspace,
                         size_t workspace_size, int n_threads);

/* ---- neuron importance --------------------------------------------------
 * Adds, for every expert e and neuron n, over the (t, k) pairs routed to e:
 *   accum[0][e][n] += c * silu(a)        (gate)
 *   accum[1][e][n] += c * |silu(a)|      (abs_gate)
 *   accum[2][e][n] += c * silu(a) * b    (gate_up)
 *   accum[3][e][n] += c * |silu(a) * b|  (abs_gate_up)
 * a = gate[e][n] . x[t], b = up[e][n] . x[t], c = topk_weights[t,k] when
 * weighted else 1.  accum is 4 x E x I float64, contiguous; counts (E
 * float64, may be NULL) gets the number (or weight sum) of pairs per expert.
 * topk_weights.data may be NULL when weighted == 0. */
typedef struct {
    int64_t T, K;
    const void *x;
    int64_t ldx;
    ds_mat topk_ids, topk_weights;
    int weighted;
    double *accum;
    double *counts;
} ds_importance_args;

#define DS_NUM_METRICS 4
size_t ds_importance_workspace_size(const ds_experts *w, const ds_importance_args *a,
                                    int n_threads);
ds_status ds_importance_accumulate(const ds_experts *w, const ds_importance_args *a,
                                   void *workspace, size_t workspace_size, int n_threads);

/* ---- reconstruction ----------------------------------------------------
 * importance: E x I float64 (contiguous), all finite.
 * perm:       E x I int64; perm[e][j] = index of the neuron that goes to
 *             position j (descending importance, ties keep their order). */
ds_status ds_importance_order(const double *importance, int64_t E, int64_t I, int64_t *perm);

/* Checks that every row of perm (E x I) is a permutation of [0, I). */
ds_status ds_check_permutation(const int64_t *perm, int64_t E, int64_t I);

/* Reorders the neurons of every expert in place: new neuron j = old neuron
 * perm[e][j] (rows j of gate and up, column j of down).  With inverse, the
 * permutation undone: new neuron perm[e][j] = old neuron j.  perm is checked
 * fully before any weight is touched. */
size_t ds_permute_workspace_size(const ds_experts *w, int n_threads);
ds_status ds_permute_neurons(const ds_experts *w, const int64_t *perm, int inverse,
                             void *workspace, size_t workspace_size, int n_threads);

#ifdef __cplusplus
}
#endif
#endif /* DS_CORE_H */
