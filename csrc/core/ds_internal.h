/* Internal declarations shared by the core's translation units. */
#ifndef DS_INTERNAL_H
#define DS_INTERNAL_H

#include "ds_core.h"

#include <math.h>
#include <string.h>

#if defined(__GNUC__) || defined(__clang__)
#define DS_INLINE static inline __attribute__((always_inline))
#define DS_LIKELY(x) __builtin_expect(!!(x), 1)
#define DS_UNLIKELY(x) __builtin_expect(!!(x), 0)
#else
#define DS_INLINE static inline
#define DS_LIKELY(x) (x)
#define DS_UNLIKELY(x) (x)
#endif

#ifdef DS_DEBUG
#include <assert.h>
#define DS_ASSERT(c) assert(c)
#else
#define DS_ASSERT(c) ((void)0)
#endif

#define DS_MAX_MR 4
#define DS_MAX_NR 8

/* ---- scalar conversions (round to nearest even, NaN kept quiet) -------- */
DS_INLINE float ds_bf16_to_f32(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

DS_INLINE uint16_t ds_f32_to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((u >> 16) | 0x0040u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

float ds_f16_to_f32(uint16_t h);
uint16_t ds_f32_to_f16(float f);

/* Reads element i of a small typed array as double (routing data). */
DS_INLINE double ds_load_real(const void *p, ds_dtype dt, int64_t i)
{
    switch (dt) {
    case DS_F32: return ((const float *)p)[i];
    case DS_BF16: return ds_bf16_to_f32(((const uint16_t *)p)[i]);
    case DS_F16: return ds_f16_to_f32(((const uint16_t *)p)[i]);
    case DS_F64: return ((const double *)p)[i];
    default: return NAN;
    }
}

DS_INLINE int64_t ds_load_int(const void *p, ds_dtype dt, int64_t i)
{
    switch (dt) {
    case DS_I8: return ((const int8_t *)p)[i];
    case DS_U8: return ((const uint8_t *)p)[i];
    case DS_I16: return ((const int16_t *)p)[i];
    case DS_I32: return ((const int32_t *)p)[i];
    case DS_I64: return ((const int64_t *)p)[i];
    default: return INT64_MIN;
    }
}

DS_INLINE int ds_is_real(ds_dtype dt) { return dt == DS_F32 || dt == DS_BF16 || dt == DS_F16; }
/* Routing weights may also be float64 (routers that compute in double). */
DS_INLINE int ds_is_weight(ds_dtype dt) { return ds_is_real(dt) || dt == DS_F64; }
DS_INLINE int ds_is_int(ds_dtype dt)
{
    return dt == DS_I8 || dt == DS_U8 || dt == DS_I16 || dt == DS_I32 || dt == DS_I64;
}

/* ---- kernels -------------------------------------------------------------
 * dot tile: c[i*ldc + j] (+)= sum_{k<K} x[i][k] * w[j][k]  for i < mr, j < nr,
 * float32 accumulation, mr <= DS_MAX_MR, nr <= DS_MAX_NR.  The summation
 * order depends only on (mr, nr, K, level, dtype), never on threads.
 *
 * pf (may be NULL) names nr rows the caller will read next (the next weight
 * tile, same K range): the kernel prefetches part `part` of `parts` equal
 * shares of them while it computes, so weight rows arrive from memory while
 * the previous tile is still busy (hardware prefetchers stop at every 4 KiB
 * page, which is one weight row). */
typedef struct {
    const void *const *rows;
    int part, parts;
} ds_prefetch;

typedef void (*ds_dot_tile_fn)(int mr, int nr, const void *const *x, const void *const *w,
                               int64_t K, float *c, int64_t ldc, int accumulate,
                               const ds_prefetch *pf);

/* The GEMV-shaped case (mr <= 4 rows of x): c[i*ldc + j] (+)= x_i . w_j for
 * the nw weight rows, one after another as single streams (short rows four
 * at a time), without a call per row.  whole holds flags: DS_ROWS_WHOLE says
 * that K is the matrix's whole row length (not a prefix or a K block of it),
 * so that the rows of a contiguous matrix are one stream; it is a fact of
 * the problem's shape, not of the memory layout.  DS_ROWS_FOUR sends every
 * row four at a time (the CPU's rule, ds_rows_four_rule, read once per
 * call).  The summation order depends only on (mr, nw, K, whole). */
#define DS_ROWS_WHOLE 1
#define DS_ROWS_FOUR 2
typedef void (*ds_dot_rows_fn)(int mr, int64_t nw, const void *const *x, const void *const *w,
                               int64_t K, float *c, int64_t ldc, int accumulate, int whole);

/* dst[j] = silu(gu[2j]) * gu[2j+1] for j < n, converted to dst's dtype. */
typedef void (*ds_act_fn)(const float *gu, int64_t n, void *dst);


/* out[h] = sum_{k < nk} w[k] * y[k][h] for h < H, in k order, float32, then
 * converted to out's dtype (nk == 0 writes zeros). */
typedef void (*ds_combine_fn)(const float *const *y, const float *w, int nk, int64_t H, void *out);

void ds_combine_generic_f32(const float *const *y, const float *w, int nk, int64_t H, void *out);
void ds_combine_generic_bf16(const float *const *y, const float *w, int nk, int64_t H, void *out);
void ds_combine_generic_f16(const float *const *y, const float *w, int nk, int64_t H, void *out);

/* Block GEMM for many rows of x: c[i*ldc + j] (+)= x_i . w_j for i < mb
 * (mb <= DS_GEMM_MAX_ROWS), j < nw, K <= the kernels' gemm_kmax (default
 * DS_GEMM_KMAX).  pack (DS_GEMM_PACK_FLOATS floats, per thread) holds the
 * copies it makes of x and, where it needs them, of weight rows, in its
 * first DS_GEMM_PACK_USED floats; the summation order of each output depends
 * only on K (AVX2: one chain of fused multiply-adds in k order; AMX: the
 * tile unit's pair sums).
 *
 * The pack's last DS_GEMM_XKEY_WORDS words (ds_gemm_xkey) are a key a gemm
 * may leave of the x rows it copied (mb, K, the rows' addresses), so that
 * the next call on the same rows (the engine's next item of the same
 * expert) skips copying them again.  A key vouches for the copy only while
 * the rows' contents cannot change: the engine clears every thread's key
 * (ds_gemm_forget) before each phase, and a thread's key whenever it writes
 * the pack by other means; a gemm that keeps no key clears it too.  A second
 * key (ds_gemm_wkey) does the same for a gemm's copy of its weight rows, kept
 * only while the caller says that its next calls take the same weight rows
 * (ds_gemm_reuse_w; the engine clears the flag before each phase). */
#define DS_GEMM_MAX_ROWS 128
#define DS_GEMM_KMAX 256
#define DS_GEMM_XKEY_WORDS (2 + DS_GEMM_MAX_ROWS)
#define DS_GEMM_WKEY_MAX 256 /* weight rows a kept weight copy can name */
#define DS_GEMM_KEY_WORDS (DS_GEMM_XKEY_WORDS + 3 + DS_GEMM_WKEY_MAX)
/* AMX: x panels of 128 rows x 4096 and two weight tiles' columns of 4096
 * (1.25 MiB); also holds a block of tile rows widened to float32 (up to
 * 32 x 2048); the AVX-512 GEMM: x panels of 132 rows x 1024 and up to 256
 * kept weight rows x 1024 (1.5 MiB) */
#define DS_GEMM_PACK_FLOATS (7 * 65536 + 4096)
#define DS_GEMM_PACK_USED (DS_GEMM_PACK_FLOATS - DS_GEMM_KEY_WORDS * (int64_t)(sizeof(uintptr_t) / sizeof(float)))
DS_INLINE uintptr_t *ds_gemm_xkey(float *pack) { return (uintptr_t *)(void *)(pack + DS_GEMM_PACK_USED); }
DS_INLINE uintptr_t *ds_gemm_wkey(float *pack) { return ds_gemm_xkey(pack) + DS_GEMM_XKEY_WORDS; }
DS_INLINE void ds_gemm_forget(float *pack)
{
    ds_gemm_xkey(pack)[0] = 0;
    ds_gemm_wkey(pack)[0] = 0;
}
/* Whether the caller's next gemm calls on this pack take the same weight
 * rows (blocks of rows one after another), so that a gemm that copies its
 * weights keeps every group of them (word 2 of the weight key). */
DS_INLINE void ds_gemm_reuse_w(float *pack, int on) { ds_gemm_wkey(pack)[2] = (uintptr_t)on; }
DS_INLINE int ds_gemm_reusing_w(float *pack) { return ds_gemm_wkey(pack)[2] != 0; }
/* Whether the weight key names these weight rows (nw <= DS_GEMM_WKEY_MAX
 * rows at these addresses, K long): the gemm's copy of them is still there. */
DS_INLINE int ds_gemm_w_kept(float *pack, int64_t nw, int64_t K, const void *const *w)
{
    const uintptr_t *key = ds_gemm_wkey(pack);
    int same = nw <= DS_GEMM_WKEY_MAX && key[0] == (uintptr_t)nw && key[1] == (uintptr_t)K;
    for (int64_t j = 0; same && j < nw; j++)
        same = key[3 + j] == (uintptr_t)w[j];
    return same;
}
DS_INLINE void ds_gemm_keep_w(float *pack, int64_t nw, int64_t K, const void *const *w)
{
    uintptr_t *key = ds_gemm_wkey(pack);
    key[0] = 0;
    if (nw > DS_GEMM_WKEY_MAX)
        return;
    key[1] = (uintptr_t)K;
    for (int64_t j = 0; j < nw; j++)
        key[3 + j] = (uintptr_t)w[j];
    key[0] = (uintptr_t)nw;
}
/* Whether the pack's key names these x rows (mb rows at these addresses, K
 * long): the copy the last gemm on this pack made of them is still there. */
DS_INLINE int ds_gemm_x_kept(float *pack, int64_t mb, int64_t K, const void *const *x)
{
    const uintptr_t *key = ds_gemm_xkey(pack);
    int same = key[0] == (uintptr_t)mb && key[1] == (uintptr_t)K;
    for (int64_t i = 0; same && i < mb; i++)
        same = key[2 + i] == (uintptr_t)x[i];
    return same;
}
DS_INLINE void ds_gemm_keep_x(float *pack, int64_t mb, int64_t K, const void *const *x)
{
    uintptr_t *key = ds_gemm_xkey(pack);
    key[0] = (uintptr_t)mb;
    key[1] = (uintptr_t)K;
    for (int64_t i = 0; i < mb; i++)
        key[2 + i] = (uintptr_t)x[i];
}
typedef void (*ds_gemm_fn)(int64_t mb, int64_t nw, const void *const *x, const void *const *w,
                           int64_t K, float *c, int64_t ldc, int accumulate, float *pack);

typedef struct {
    ds_dot_tile_fn dot;
    ds_dot_rows_fn rows;
    ds_act_fn act;
    ds_combine_fn combine;
    int mr, nr;       /* preferred tile: rows of x, rows of w */
    ds_gemm_fn gemm;  /* NULL: the tiles serve every row count */
    int gemm_rows;    /* blocks of at least this many rows go to gemm */
    /* optional: a dot tile with the same bits as dot whose x rows are copies
     * made by widen (n rows of K into dst, row i at element i*ldd; float32,
     * bfloat16 widened to it, or, where xw_esz is 2, bfloat16 as it is), so
     * that a block's x rows are read from one contiguous buffer and widened
     * once, not once per weight group.  float32 at AVX2 and AVX-512 (dotw ==
     * dot), bfloat16 at every x86 level. */
    ds_dot_tile_fn dotw;
    void (*widen)(int64_t n, const void *const *x, int64_t K, void *dst, int64_t ldd);
    int xw_esz;       /* bytes per element of the copies (0: 4, float32) */
    int gemm_kmax;    /* K block of gemm (0: DS_GEMM_KMAX); panels within DS_GEMM_PACK_USED */
    int gemm_keeps_w; /* gemm keeps its weight copies for the next blocks (ds_gemm_reuse_w) */
} ds_kernels;

/* Kernel set for (level, dtype); NULL when not compiled in. */
const ds_kernels *ds_kernels_generic(ds_dtype dt);
const ds_kernels *ds_kernels_avx2(ds_dtype dt);
/* The AVX2 level's two block GEMMs, which its gemm chooses between by row
 * count (for the unit tests): weights packed (every dtype), weights read in
 * place (float32, bfloat16; NULL otherwise); both NULL where AVX2 is not
 * compiled. */
void ds_gemm_avx2_variants(ds_dtype dt, ds_gemm_fn *packed, ds_gemm_fn *in_place);
const ds_kernels *ds_kernels_avx512(ds_dtype dt);
const ds_kernels *ds_kernels_avx512_bf16(ds_dtype dt);
const ds_kernels *ds_kernels_amx_bf16(ds_dtype dt);
const ds_kernels *ds_kernels_get(ds_dtype dt);       /* for the active level */

/* gu holds interleaved (a, b) pairs for n neurons; for each neuron j,
 * acc[m*stride + j] += c * metric_m(a_j, b_j) for the four metrics. */
void ds_importance_epilogue(const float *gu, int64_t n, double c, double *acc, int64_t stride);
float ds_silu(float g);

/* ---- workspace carving -------------------------------------------------- */
typedef struct {
    char *base;
    size_t used, size;
} ds_arena;

DS_INLINE size_t ds_align_up(size_t n) { return (n + 63u) & ~(size_t)63u; }

DS_INLINE void *ds_arena_take(ds_arena *a, size_t bytes)
{
    size_t n = ds_align_up(bytes);
    if (a->base == NULL) { /* sizing pass */
        a->used += n;
        return NULL;
    }
    if (a->used + n > a->size)
        return NULL;
    void *p = a->base + a->used;
    a->used += n;
    return p;
}

#endif /* DS_INTERNAL_H */
