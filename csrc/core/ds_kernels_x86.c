/* x86-64 kernels: AVX2+FMA and AVX-512 (with and without the BF16 dot
 * product), each function compiled for its own target and called only after
 * the CPU has been checked (ds_common.c), so one build runs on any x86-64.
 *
 * The tiles are "dot tiles": mr rows of x against nr rows of w, both
 * contiguous along K, one vector accumulator per (row, row) pair, reduced at
 * the end; weights are read where they lie.  Two exceptions: at AVX2, blocks
 * of 32 rows and more go through a block GEMM (x and weight rows copied once
 * into float32 panels, or x only with the weights broadcast where they lie;
 * see "AVX2 block GEMM" below); at AMX, bfloat16 blocks of 8 rows and more
 * go to the tile unit ("AMX" below). */
#include "ds_internal.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(DS_NO_X86_KERNELS)

#include <immintrin.h>

#define TGT2 __attribute__((target("avx2,fma,f16c")))
#define TGT5 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")))
#define TGT5B __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx512bf16")))
#define INL static inline __attribute__((always_inline))

/* One switch over every (mr, nr) so that each tile shape is a fully unrolled
 * specialisation with its accumulators in registers. */
#define DS_TILE_SWITCH(FN, mr, nr, ...)                                          \
    switch ((mr) * 16 + (nr)) {                                                  \
    case 0x11: FN(1, 1, __VA_ARGS__); break;                                     \
    case 0x12: FN(1, 2, __VA_ARGS__); break;                                     \
    case 0x13: FN(1, 3, __VA_ARGS__); break;                                     \
    case 0x14: FN(1, 4, __VA_ARGS__); break;                                     \
    case 0x15: FN(1, 5, __VA_ARGS__); break;                                     \
    case 0x16: FN(1, 6, __VA_ARGS__); break;                                     \
    case 0x17: FN(1, 7, __VA_ARGS__); break;                                     \
    case 0x18: FN(1, 8, __VA_ARGS__); break;                                     \
    case 0x21: FN(2, 1, __VA_ARGS__); break;                                     \
    case 0x22: FN(2, 2, __VA_ARGS__); break;                                     \
    case 0x23: FN(2, 3, __VA_ARGS__); break;                                     \
    case 0x24: FN(2, 4, __VA_ARGS__); break;                                     \
    case 0x25: FN(2, 5, __VA_ARGS__); break;                                     \
    case 0x26: FN(2, 6, __VA_ARGS__); break;                                     \
    case 0x27: FN(2, 7, __VA_ARGS__); break;                                     \
    case 0x28: FN(2, 8, __VA_ARGS__); break;                                     \
    case 0x31: FN(3, 1, __VA_ARGS__); break;                                     \
    case 0x32: FN(3, 2, __VA_ARGS__); break;                                     \
    case 0x33: FN(3, 3, __VA_ARGS__); break;                                     \
    case 0x34: FN(3, 4, __VA_ARGS__); break;                                     \
    case 0x35: FN(3, 5, __VA_ARGS__); break;                                     \
    case 0x36: FN(3, 6, __VA_ARGS__); break;                                     \
    case 0x37: FN(3, 7, __VA_ARGS__); break;                                     \
    case 0x38: FN(3, 8, __VA_ARGS__); break;                                     \
    case 0x41: FN(4, 1, __VA_ARGS__); break;                                     \
    case 0x42: FN(4, 2, __VA_ARGS__); break;                                     \
    case 0x43: FN(4, 3, __VA_ARGS__); break;                                     \
    case 0x44: FN(4, 4, __VA_ARGS__); break;                                     \
    case 0x45: FN(4, 5, __VA_ARGS__); break;                                     \
    case 0x46: FN(4, 6, __VA_ARGS__); break;                                     \
    case 0x47: FN(4, 7, __VA_ARGS__); break;                                     \
    case 0x48: FN(4, 8, __VA_ARGS__); break;                                     \
    default: break;                                                              \
    }

/* Every weight row through the (mr x 1) tile, inlined in one loop; short
 * rows (and every row, where the call says DS_ROWS_FOUR: the rule for Intel
 * CPUs, whose prefetchers read four streams side by side faster than one,
 * 1.02-1.24x on a Xeon with float32 and bfloat16, where a Zen 4 measured
 * 0.85x for four at a time) go four at a time through the (mr x 4) tile
 * instead, so that the per-row reduction and loop overhead do not dominate
 * such short streams:
 * rows under 1 KiB, and prefixes of rows (e.g. half experts) up to 2 KiB,
 * which are streams with gaps between them.  Whole rows of 1 KiB and more
 * stay one at a time: a contiguous matrix's whole rows are one stream that
 * the hardware prefetcher follows across rows (measured 1.13-1.33x over
 * four at a time for whole rows of 1-2 KiB at one token; rows of 80-640
 * bytes 0.83-0.99x).  Each call prefetches the start of the row(s) after it:
 * a row is one stream of a few KiB, and the hardware prefetcher only follows
 * a stream after its first misses. */
#define DS_ROWS_LOOP(FN, MR, nw, x, w, K, c, ldc, accumulate, short_rows)              \
    do {                                                                             \
        int64_t j_ = 0;                                                              \
        if (short_rows)                                                              \
            for (; j_ + 4 <= (nw); j_ += 4) {                                        \
                const int64_t n_ = (nw) - (j_ + 4) < 4 ? (nw) - (j_ + 4) : 4;        \
                const void *nx_[4];                                                  \
                for (int q_ = 0; q_ < 4; q_++)                                       \
                    nx_[q_] = n_ > 0 ? (w)[j_ + 4 + (q_ < n_ ? q_ : n_ - 1)] : NULL; \
                const ds_prefetch pf_ = {nx_, 0, 1};                                 \
                FN(MR, 4, x, (w) + j_, K, (c) + j_, ldc, accumulate, n_ > 0 ? &pf_ : NULL); \
            }                                                                        \
        for (; j_ < (nw); j_++) {                                                    \
            const ds_prefetch pf_ = {(w) + j_ + 1, 0, 1};                            \
            FN(MR, 1, x, (w) + j_, K, (c) + j_, ldc, accumulate, j_ + 1 < (nw) ? &pf_ : NULL); \
        }                                                                            \
    } while (0)

#define DS_ROWS_SWITCH(FN, mr, nw, x, w, K, c, ldc, accumulate, esz, whole)          \
    do {                                                                             \
        const int64_t bytes_ = (int64_t)(K) * (int64_t)(esz);                        \
        const int short_ = ((whole) & DS_ROWS_FOUR) || bytes_ < 1024 ||              \
                           (!((whole) & DS_ROWS_WHOLE) && bytes_ <= 2048);           \
        switch (mr) {                                                                \
        case 1: DS_ROWS_LOOP(FN, 1, nw, x, w, K, c, ldc, accumulate, short_); break; \
        case 2: DS_ROWS_LOOP(FN, 2, nw, x, w, K, c, ldc, accumulate, short_); break; \
        case 3: DS_ROWS_LOOP(FN, 3, nw, x, w, K, c, ldc, accumulate, short_); break; \
        case 4: DS_ROWS_LOOP(FN, 4, nw, x, w, K, c, ldc, accumulate, short_); break; \
        default: break;                                                              \
        }                                                                            \
    } while (0)

/* =========================== AVX-512 ===================================== */

/* Lane sums of 8 vectors at once (a transpose-and-add tree: about three
 * times fewer instructions than eight separate reductions). */
INL TGT5 __m256 hsum8x16(const __m512 *v)
{
    __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(v[0], v[1]), _mm512_unpackhi_ps(v[0], v[1]));
    __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(v[2], v[3]), _mm512_unpackhi_ps(v[2], v[3]));
    __m512 t2 = _mm512_add_ps(_mm512_unpacklo_ps(v[4], v[5]), _mm512_unpackhi_ps(v[4], v[5]));
    __m512 t3 = _mm512_add_ps(_mm512_unpacklo_ps(v[6], v[7]), _mm512_unpackhi_ps(v[6], v[7]));
    __m512 u0 = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t1))),
                              _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t1))));
    __m512 u1 = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t2), _mm512_castps_pd(t3))),
                              _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t2), _mm512_castps_pd(t3))));
    __m512 w0 = _mm512_add_ps(_mm512_shuffle_f32x4(u0, u1, _MM_SHUFFLE(1, 0, 1, 0)),
                              _mm512_shuffle_f32x4(u0, u1, _MM_SHUFFLE(3, 2, 3, 2)));
    __m512 w1 = _mm512_add_ps(w0, _mm512_shuffle_f32x4(w0, w0, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm512_castps512_ps256(_mm512_shuffle_f32x4(w1, w1, _MM_SHUFFLE(2, 0, 2, 0)));
}

/* Writes the MR x NR tile: acc[ACC(i, j, 0..U)) summed, lanes reduced (eight at a
 * time), then stored or added to c. */
#define TILE5_STORE(acc, MR, NR, U, c, ldc, accumulate)                               \
    do {                                                                              \
        __m512 flat_[DS_MAX_MR * DS_MAX_NR];                                          \
        float s_[DS_MAX_MR * DS_MAX_NR];                                              \
        for (int i_ = 0; i_ < (MR); i_++)                                             \
            for (int j_ = 0; j_ < (NR); j_++) {                                       \
                __m512 v_ = acc[ACC(i_, j_, 0)];                                           \
                for (int u_ = 1; u_ < (U); u_++)                                      \
                    v_ = _mm512_add_ps(v_, acc[ACC(i_, j_, u_)]);                          \
                flat_[i_ * (NR) + j_] = v_;                                           \
            }                                                                         \
        const int n_ = (MR) * (NR), n8_ = n_ / 8 * 8;                                 \
        for (int q_ = 0; q_ < n8_; q_ += 8)                                           \
            _mm256_storeu_ps(s_ + q_, hsum8x16(flat_ + q_));                          \
        for (int q_ = n8_; q_ < n_ && q_ < DS_MAX_MR * DS_MAX_NR; q_++)              \
            s_[q_] = _mm512_reduce_add_ps(flat_[q_]);                                 \
        for (int i_ = 0; i_ < (MR); i_++)                                             \
            for (int j_ = 0; j_ < (NR); j_++) {                                       \
                float r_ = s_[i_ * (NR) + j_];                                        \
                (c)[i_ * (ldc) + j_] = (accumulate) ? (c)[i_ * (ldc) + j_] + r_ : r_; \
            }                                                                         \
    } while (0)

INL TGT5 __m512 ld5_f32(const void *p, int64_t k) { return _mm512_loadu_ps((const float *)p + k); }
INL TGT5 __m512 ld5m_f32(const void *p, int64_t k, __mmask16 m)
{
    return _mm512_maskz_loadu_ps(m, (const float *)p + k);
}
INL TGT5 __m512 ld5_bf16(const void *p, int64_t k)
{
    __m256i v = _mm256_loadu_si256((const __m256i *)((const uint16_t *)p + k));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
INL TGT5 __m512 ld5m_bf16(const void *p, int64_t k, __mmask16 m)
{
    __m256i v = _mm256_maskz_loadu_epi16(m, (const uint16_t *)p + k);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
INL TGT5 __m512 ld5_f16(const void *p, int64_t k)
{
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p + k)));
}
INL TGT5 __m512 ld5m_f16(const void *p, int64_t k, __mmask16 m)
{
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, (const uint16_t *)p + k));
}

/* Small tiles have few accumulators: K is unrolled so that every tile keeps
 * enough independent chains in flight to hide the instruction latency (the
 * AVX-512 BF16 dot product needs about 20 on current cores; 16 registers
 * limit AVX2 to fewer), while the accumulators, the x rows and one weight
 * vector still fit in registers. */
#define DS_UNROLL(MR, NR) ((MR) * (NR) >= 6 ? 1 : (MR) * (NR) >= 3 ? 2 : (MR) * (NR) == 2 ? 4 : 8)
/* Accumulators of the AVX-512 tiles, one flat array indexed by constants
 * after unrolling (so that the compiler keeps every one in a register). */
#define DS_ACC5 32
#define ACC(i, j, u) (((i) * NR + (j)) * U + (u))
#define DS_UNROLL5(MR, NR)                                                                  \
    ((MR) * (NR) <= 3 ? 8 : (MR) * (NR) == 4 ? 6 : (MR) * (NR) <= 6 ? 4 : (MR) * (NR) <= 8 ? 3 \
     : (MR) * (NR) <= 12 ? 2 : 1)

/* Prefetch bookkeeping shared by every tile: lines [first, first + n) of
 * each pf row, spread evenly over the main loop (one line per row every
 * `stride` iterations) so the prefetches never outrun the miss queues. */
typedef struct {
    const char *rows[DS_MAX_NR];
    int64_t first, n, stride, next, line;
} pf_state;

INL void pf_init(pf_state *p, const ds_prefetch *pf, int NR, int64_t K, size_t esz,
                 int64_t per_iter)
{
    p->n = 0;
    p->first = 0;
    p->stride = 1;
    p->next = 0;
    p->line = 0;
    for (int j = 0; j < NR; j++)
        p->rows[j] = NULL;
    if (pf == NULL || pf->rows == NULL || pf->parts < 1)
        return;
    int64_t lines = ((int64_t)K * (int64_t)esz + 63) / 64;
    int64_t share = (lines + pf->parts - 1) / pf->parts;
    p->first = (int64_t)pf->part * share;
    p->n = lines - p->first < share ? lines - p->first : share;
    int64_t iters = K / per_iter;
    p->stride = p->n > 0 && iters > p->n ? iters / p->n : 1;
    for (int j = 0; j < NR; j++)
        p->rows[j] = (const char *)pf->rows[j];
}

#define PF_STEP(p, NR, it)                                                          \
    do {                                                                            \
        if ((it) == (p).next && (p).line < (p).n) {                                 \
            for (int j_ = 0; j_ < (NR); j_++)                                       \
                _mm_prefetch((p).rows[j_] + ((p).first + (p).line) * 64, _MM_HINT_T0); \
            (p).line++;                                                             \
            (p).next += (p).stride;                                                 \
        }                                                                           \
    } while (0)

#define DEF_TILE5X(NAME, XT, T, ESZ)                                                      \
    INL TGT5 void tile5_##NAME(const int MR, const int NR, const void *const *x,          \
                             const void *const *w, int64_t K, float *c, int64_t ldc,      \
                             int accumulate, const ds_prefetch *pf)                       \
    {                                                                                     \
        const int U = DS_UNROLL5(MR, NR);                                                 \
        __m512 acc[DS_ACC5];                                                              \
        const void *xp[DS_MAX_MR], *wp[DS_MAX_NR];                                        \
        pf_state ps;                                                                      \
        pf_init(&ps, pf, NR, K, ESZ, 16 * U);                                             \
        for (int i = 0; i < MR; i++) {                                                    \
            xp[i] = x[i];                                                                 \
            for (int j = 0; j < NR; j++)                                                  \
                for (int u = 0; u < U; u++)                                               \
                    acc[ACC(i, j, u)] = _mm512_setzero_ps();                              \
        }                                                                                 \
        for (int j = 0; j < NR; j++)                                                      \
            wp[j] = w[j];                                                                 \
        int64_t k = 0, it = 0;                                                            \
        for (; k + 16 * U <= K; k += 16 * U, it++) {                                      \
            PF_STEP(ps, NR, it);                                                          \
            for (int u = 0; u < U; u++) {                                                 \
                __m512 xv[DS_MAX_MR];                                                     \
                for (int i = 0; i < MR; i++)                                              \
                    xv[i] = ld5_##XT(xp[i], k + 16 * u);                                  \
                for (int j = 0; j < NR; j++) {                                            \
                    __m512 wv = ld5_##T(wp[j], k + 16 * u);                               \
                    for (int i = 0; i < MR; i++)                                          \
                        acc[ACC(i, j, u)] = _mm512_fmadd_ps(xv[i], wv, acc[ACC(i, j, u)]);          \
                }                                                                         \
            }                                                                             \
        }                                                                                 \
        for (; k < K; k += 16) {                                                          \
            __mmask16 m = K - k >= 16 ? (__mmask16)0xffff                                 \
                                      : (__mmask16)((1u << (unsigned)(K - k)) - 1u);      \
            __m512 xv[DS_MAX_MR];                                                         \
            for (int i = 0; i < MR; i++)                                                  \
                xv[i] = ld5m_##XT(xp[i], k, m);                                           \
            for (int j = 0; j < NR; j++) {                                                \
                __m512 wv = ld5m_##T(wp[j], k, m);                                        \
                for (int i = 0; i < MR; i++)                                              \
                    acc[ACC(i, j, 0)] = _mm512_fmadd_ps(xv[i], wv, acc[ACC(i, j, 0)]);    \
            }                                                                             \
        }                                                                                 \
        TILE5_STORE(acc, MR, NR, U, c, ldc, accumulate);                                  \
    }

#define DEF_TILE5(T, ESZ)                                                                 \
    DEF_TILE5X(T, T, T, ESZ)                                                              \
    static TGT5 void dot5_##T(int mr, int nr, const void *const *x, const void *const *w,  \
                              int64_t K, float *c, int64_t ldc, int accumulate,            \
                              const ds_prefetch *pf)                                       \
    {                                                                                     \
        DS_TILE_SWITCH(tile5_##T, mr, nr, x, w, K, c, ldc, accumulate, pf)                \
    }                                                                                     \
    static TGT5 void rows5_##T(int mr, int64_t nw, const void *const *x,                  \
                               const void *const *w, int64_t K, float *c, int64_t ldc,     \
                               int accumulate, int whole)                                  \
    {                                                                                     \
        DS_ROWS_SWITCH(tile5_##T, mr, nw, x, w, K, c, ldc, accumulate, ESZ, whole);       \
    }

DEF_TILE5(f32, 4)
DEF_TILE5(bf16, 2)
DEF_TILE5(f16, 2)

/* bfloat16 weights against x rows widened to float32 once per block (see
 * the AVX2 dotw2_bf16 below; the same products and sums as tile5_bf16). */
DEF_TILE5X(xw_bf16, f32, bf16, 2)
static TGT5 void dotw5_bf16(int mr, int nr, const void *const *x, const void *const *w, int64_t K,
                            float *c, int64_t ldc, int accumulate, const ds_prefetch *pf)
{
    DS_TILE_SWITCH(tile5_xw_bf16, mr, nr, x, w, K, c, ldc, accumulate, pf)
}

/* bf16 with the dot-product instruction: 32 elements per step, pairs summed
 * inside the instruction. */
INL TGT5B void tile5b(const int MR, const int NR, const void *const *x, const void *const *w,
                      int64_t K, float *c, int64_t ldc, int accumulate, const ds_prefetch *pf)
{
    const int U = DS_UNROLL5(MR, NR);
    __m512 acc[DS_ACC5];
    const uint16_t *xp[DS_MAX_MR], *wp[DS_MAX_NR];
    pf_state ps;
    pf_init(&ps, pf, NR, K, 2, 32 * U);
    for (int i = 0; i < MR; i++) {
        xp[i] = (const uint16_t *)x[i];
        for (int j = 0; j < NR; j++)
            for (int u = 0; u < U; u++)
                acc[ACC(i, j, u)] = _mm512_setzero_ps();
    }
    for (int j = 0; j < NR; j++)
        wp[j] = (const uint16_t *)w[j];
    int64_t k = 0, it = 0;
    for (; k + 32 * U <= K; k += 32 * U, it++) {
        PF_STEP(ps, NR, it);
        for (int u = 0; u < U; u++) {
            __m512bh xv[DS_MAX_MR];
            for (int i = 0; i < MR; i++)
                xv[i] = (__m512bh)_mm512_loadu_si512((const void *)(xp[i] + k + 32 * u));
            for (int j = 0; j < NR; j++) {
                __m512bh wv = (__m512bh)_mm512_loadu_si512((const void *)(wp[j] + k + 32 * u));
                for (int i = 0; i < MR; i++)
                    acc[ACC(i, j, u)] = _mm512_dpbf16_ps(acc[ACC(i, j, u)], xv[i], wv);
            }
        }
    }
    for (; k < K; k += 32) {
        __mmask32 m = K - k >= 32 ? (__mmask32)0xffffffffu
                                  : (__mmask32)((1u << (unsigned)(K - k)) - 1u);
        __m512bh xv[DS_MAX_MR];
        for (int i = 0; i < MR; i++)
            xv[i] = (__m512bh)_mm512_maskz_loadu_epi16(m, xp[i] + k);
        for (int j = 0; j < NR; j++) {
            __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(m, wp[j] + k);
            for (int i = 0; i < MR; i++)
                acc[ACC(i, j, 0)] = _mm512_dpbf16_ps(acc[ACC(i, j, 0)], xv[i], wv);
        }
    }
    TILE5_STORE(acc, MR, NR, U, c, ldc, accumulate);
}

static TGT5B void dot5b_bf16(int mr, int nr, const void *const *x, const void *const *w,
                             int64_t K, float *c, int64_t ldc, int accumulate,
                             const ds_prefetch *pf)
{
    DS_TILE_SWITCH(tile5b, mr, nr, x, w, K, c, ldc, accumulate, pf)
}

static TGT5B void rows5b_bf16(int mr, int64_t nw, const void *const *x, const void *const *w,
                              int64_t K, float *c, int64_t ldc, int accumulate, int whole)
{
    DS_ROWS_SWITCH(tile5b, mr, nw, x, w, K, c, ldc, accumulate, 2, whole);
}

/* exp(v) for the SiLU: range reduction to |r| <= ln2/2, a degree-6
 * polynomial, and scalef for 2^n (which also handles overflow to inf and
 * underflow to 0).  Relative error below 2 ulp. */
INL TGT5 __m512 exp5(__m512 v)
{
    const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
    const __m512 ln2hi = _mm512_set1_ps(0.693359375f);
    const __m512 ln2lo = _mm512_set1_ps(-2.12194440e-4f);
    v = _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(89.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(v, log2e), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, ln2hi, v);
    r = _mm512_fnmadd_ps(n, ln2lo, r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    __m512 r2 = _mm512_mul_ps(r, r);
    p = _mm512_fmadd_ps(p, r2, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* Splits n <= 16 interleaved (g, u) pairs and returns silu(g) * u in the
 * first n lanes.  NaN in g or u propagates. */
INL TGT5 __m512 act5_pairs(const float *gu, unsigned n)
{
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    unsigned nl = 2 * n < 16 ? 2 * n : 16, nh = 2 * n - nl;
    __m512 lo = _mm512_maskz_loadu_ps((__mmask16)((1u << nl) - 1u), gu);
    __m512 hi = _mm512_maskz_loadu_ps((__mmask16)((1u << nh) - 1u), gu + 16);
    __m512 g = _mm512_permutex2var_ps(lo, even, hi);
    __m512 u = _mm512_permutex2var_ps(lo, odd, hi);
    __m512 e = exp5(_mm512_sub_ps(_mm512_setzero_ps(), g));
    __m512 s = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
    return _mm512_mul_ps(s, u);
}

/* float32 -> bfloat16, round to nearest even, NaN kept quiet (the same bits
 * as ds_f32_to_bf16). */
INL TGT5 __m256i cvt5_bf16(__m512 v)
{
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(u, _mm512_set1_epi32(0x00400000)));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}

#define DEF_ACT5(T, STORE)                                                   \
    static TGT5 void act5_##T(const float *gu, int64_t n, void *dst)       \
    {                                                                        \
        int64_t j = 0;                                                       \
        for (; j + 16 <= n; j += 16) {                                       \
            __m512 a = act5_pairs(gu + 2 * j, 16);                           \
            STORE(dst, j, a, 0xffff);                                        \
        }                                                                    \
        if (j < n) {                                                         \
            __mmask16 m = (__mmask16)((1u << (unsigned)(n - j)) - 1u);       \
            __m512 a = act5_pairs(gu + 2 * j, (unsigned)(n - j));            \
            STORE(dst, j, a, m);                                             \
        }                                                                    \
    }

#define ST5_F32(d, j, a, m) _mm512_mask_storeu_ps((float *)(d) + (j), (m), (a))
#define ST5_BF16(d, j, a, m) _mm256_mask_storeu_epi16((uint16_t *)(d) + (j), (m), cvt5_bf16(a))
#define ST5_F16(d, j, a, m) \
    _mm256_mask_storeu_epi16((uint16_t *)(d) + (j), (m), _mm512_cvtps_ph((a), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC))

DEF_ACT5(f32, ST5_F32)
DEF_ACT5(bf16, ST5_BF16)
DEF_ACT5(f16, ST5_F16)

#define DEF_COMBINE5(T, STORE)                                                          \
    static TGT5 void combine5_##T(const float *const *y, const float *w, int nk, int64_t H, \
                                  void *out)                                            \
    {                                                                                   \
        for (int64_t h = 0; h < H; h += 16) {                                           \
            __mmask16 m = H - h >= 16 ? (__mmask16)0xffff                                \
                                      : (__mmask16)((1u << (unsigned)(H - h)) - 1u);    \
            __m512 acc = _mm512_setzero_ps();                                           \
            for (int k = 0; k < nk; k++)                                                \
                acc = _mm512_fmadd_ps(_mm512_set1_ps(w[k]),                             \
                                      _mm512_maskz_loadu_ps(m, y[k] + h), acc);         \
            STORE(out, h, acc, m);                                                      \
        }                                                                               \
    }

DEF_COMBINE5(f32, ST5_F32)
DEF_COMBINE5(bf16, ST5_BF16)
DEF_COMBINE5(f16, ST5_F16)


/* ============================= AVX2 ====================================== */

INL TGT2 __m256 ld2_f32(const void *p, int64_t k) { return _mm256_loadu_ps((const float *)p + k); }
INL TGT2 __m256 ld2_bf16(const void *p, int64_t k)
{
    __m128i v = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + k));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
INL TGT2 __m256 ld2_f16(const void *p, int64_t k)
{
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + k)));
}
INL float sc_f32(const void *p, int64_t k) { return ((const float *)p)[k]; }
INL float sc_bf16(const void *p, int64_t k) { return ds_bf16_to_f32(((const uint16_t *)p)[k]); }
INL float sc_f16(const void *p, int64_t k) { return ds_f16_to_f32(((const uint16_t *)p)[k]); }

INL TGT2 float hsum2(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Lane sums of four vectors at once, ((l0 + l2) + (l1 + l3)) + ((l4 + l6) +
 * (l5 + l7)) for each: two rounds of unpack-and-add, then the two halves
 * added (10 instructions for four sums; hsum2 takes 6 for one). */
INL TGT2 __m128 hsum2x4(const __m256 *v)
{
    __m256 t0 = _mm256_add_ps(_mm256_unpacklo_ps(v[0], v[1]), _mm256_unpackhi_ps(v[0], v[1]));
    __m256 t1 = _mm256_add_ps(_mm256_unpacklo_ps(v[2], v[3]), _mm256_unpackhi_ps(v[2], v[3]));
    __m256 u = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(t0), _mm256_castps_pd(t1))),
                             _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(t0), _mm256_castps_pd(t1))));
    return _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1));
}

/* The K tail (< 8 elements) is added after the vector reduction, in order;
 * without a tail, groups of four outputs of a row are reduced together. */
#define DEF_TILE2X(NAME, XT, T, ESZ)                                                      \
    INL TGT2 void tile2_##NAME(const int MR, const int NR, const void *const *x,          \
                             const void *const *w, int64_t K, float *c, int64_t ldc,      \
                             int accumulate, const ds_prefetch *pf)                       \
    {                                                                                     \
        const int U = DS_UNROLL(MR, NR);                                                  \
        __m256 acc[DS_MAX_MR][DS_MAX_NR][8];                                              \
        pf_state ps;                                                                      \
        pf_init(&ps, pf, NR, K, ESZ, 8 * U);                                              \
        for (int i = 0; i < MR; i++)                                                      \
            for (int j = 0; j < NR; j++)                                                  \
                for (int u = 0; u < U; u++)                                               \
                    acc[i][j][u] = _mm256_setzero_ps();                                   \
        int64_t k = 0, it = 0;                                                            \
        for (; k + 8 * U <= K; k += 8 * U, it++) {                                        \
            PF_STEP(ps, NR, it);                                                          \
            for (int u = 0; u < U; u++) {                                                 \
                __m256 xv[DS_MAX_MR];                                                     \
                for (int i = 0; i < MR; i++)                                              \
                    xv[i] = ld2_##XT(x[i], k + 8 * u);                                    \
                for (int j = 0; j < NR; j++) {                                            \
                    __m256 wv = ld2_##T(w[j], k + 8 * u);                                 \
                    for (int i = 0; i < MR; i++)                                          \
                        acc[i][j][u] = _mm256_fmadd_ps(xv[i], wv, acc[i][j][u]);          \
                }                                                                         \
            }                                                                             \
        }                                                                                 \
        for (; k + 8 <= K; k += 8) {                                                      \
            __m256 xv[DS_MAX_MR];                                                         \
            for (int i = 0; i < MR; i++)                                                  \
                xv[i] = ld2_##XT(x[i], k);                                                \
            for (int j = 0; j < NR; j++) {                                                \
                __m256 wv = ld2_##T(w[j], k);                                             \
                for (int i = 0; i < MR; i++)                                              \
                    acc[i][j][0] = _mm256_fmadd_ps(xv[i], wv, acc[i][j][0]);              \
            }                                                                             \
        }                                                                                 \
        for (int i = 0; i < MR; i++) {                                                    \
            __m256 sum[DS_MAX_NR];                                                        \
            for (int j = 0; j < NR; j++) {                                                \
                sum[j] = acc[i][j][0];                                                    \
                for (int u = 1; u < U; u++)                                               \
                    sum[j] = _mm256_add_ps(sum[j], acc[i][j][u]);                         \
            }                                                                             \
            float *ci = c + i * ldc;                                                      \
            int j = 0;                                                                    \
            if (k == K) /* no K tail: four outputs per tree, one vector store */          \
                for (; j + 4 <= NR; j += 4) {                                             \
                    __m128 v = hsum2x4(sum + j);                                          \
                    if (accumulate)                                                       \
                        v = _mm_add_ps(_mm_loadu_ps(ci + j), v);                          \
                    _mm_storeu_ps(ci + j, v);                                             \
                }                                                                         \
            for (; j < NR; j++) {                                                         \
                float v = hsum2(sum[j]);                                                  \
                for (int64_t kk = k; kk < K; kk++)                                        \
                    v += sc_##XT(x[i], kk) * sc_##T(w[j], kk);                            \
                ci[j] = accumulate ? ci[j] + v : v;                                       \
            }                                                                             \
        }                                                                                 \
    }

#define DEF_TILE2(T, ESZ)                                                                 \
    DEF_TILE2X(T, T, T, ESZ)                                                              \
    static TGT2 void dot2_##T(int mr, int nr, const void *const *x, const void *const *w,  \
                              int64_t K, float *c, int64_t ldc, int accumulate,            \
                              const ds_prefetch *pf)                                       \
    {                                                                                     \
        DS_TILE_SWITCH(tile2_##T, mr, nr, x, w, K, c, ldc, accumulate, pf)                \
    }                                                                                     \
    static TGT2 void rows2_##T(int mr, int64_t nw, const void *const *x,                  \
                               const void *const *w, int64_t K, float *c, int64_t ldc,     \
                               int accumulate, int whole)                                  \
    {                                                                                     \
        DS_ROWS_SWITCH(tile2_##T, mr, nw, x, w, K, c, ldc, accumulate, ESZ, whole);       \
    }

DEF_TILE2(f32, 4)
DEF_TILE2(bf16, 2)
DEF_TILE2(f16, 2)

/* bfloat16 weights against x rows already widened to float32 (once per
 * block, by widen2_bf16): the same products and sums as tile2_bf16, which
 * widens every x row again for each group of weight rows.  bfloat16 has no
 * conversion instruction (a zero-extension and a shift per vector), so this
 * takes 3 of the 7 widenings per step off a 3 x 4 tile: measured 1.05-1.11x
 * at AVX2 and 1.02-1.04x at AVX-512 (benchmarks/README.md).  float16 widens
 * with one instruction (vcvtph2ps), and widening its x rows first measured no
 * faster, so it keeps tile2_f16. */
DEF_TILE2X(xw_bf16, f32, bf16, 2)
static TGT2 void dotw2_bf16(int mr, int nr, const void *const *x, const void *const *w, int64_t K,
                            float *c, int64_t ldc, int accumulate, const ds_prefetch *pf)
{
    DS_TILE_SWITCH(tile2_xw_bf16, mr, nr, x, w, K, c, ldc, accumulate, pf)
}
#define DEF_WIDEN2(T)                                                                  \
    static TGT2 void widen2_##T(int64_t n, const void *const *x, int64_t K, void *dst,  \
                                int64_t ldd)                                           \
    {                                                                                  \
        for (int64_t r = 0; r < n; r++) {                                              \
            float *d = (float *)dst + r * ldd;                                         \
            int64_t k = 0;                                                             \
            for (; k + 8 <= K; k += 8)                                                 \
                _mm256_storeu_ps(d + k, ld2_##T(x[r], k));                             \
            for (; k < K; k++)                                                         \
                d[k] = sc_##T(x[r], k);                                                \
        }                                                                              \
    }
DEF_WIDEN2(bf16)
DEF_WIDEN2(f32) /* a copy: contiguous x rows measured 1.06-1.09x at OLMoE T = 128 */

/* ---- AVX2 block GEMM ------------------------------------------------------
 * For blocks of many rows the dot tiles above are limited by their
 * horizontal reductions and by the three x rows a 16-register tile can hold.
 * Here the block's x rows are copied once, as float32, into panels of 6 rows
 * laid out k-major (xp[k*6 + i]), and each group of 16 weight rows into a
 * k-major panel (wp[k*16 + j]; 16 KiB at K = 256, kept in L1 while every x
 * panel of the block runs against it).  The 6 x 16 micro-kernel holds its
 * outputs in 12 accumulators and, per k, loads two weight vectors and
 * broadcasts six x values for 12 FMAs; its accumulators are rows of c, so
 * they are stored without a transpose.  Products of two bfloat16 or two
 * float16 values are exact in float32, so widening in the panels is the
 * arithmetic of the tiles, which widen in the loop.  Each output is one FMA
 * chain in k order.  While the block runs against one weight group, the next
 * group's rows are prefetched into L1 and the group after it into L2, a share
 * of each before each x panel (the second measured 1.04-1.09x at 32 rows per
 * expert, where one group's arithmetic is too short to cover the misses of
 * the next, and 0.99-1.05x at 64-128).  Used for blocks
 * of at least 32 rows, all three dtypes: measured against the dot tiles in
 * one process (benchmarks/README.md), 1.2-1.35x at 64-128 rows per expert
 * and level at 16-32.  Its AVX-512 form (gemm5, below) pays on 512-bit
 * units only from about 96 rows. */
#define G2_MR 6
#define G2_NR 16
_Static_assert(((DS_GEMM_MAX_ROWS + G2_MR - 1) / G2_MR * G2_MR + G2_NR) * DS_GEMM_KMAX + 8 <=
                   DS_GEMM_PACK_USED,
               "the AVX2 GEMM's panels must fit DS_GEMM_PACK_USED");

/* 8 x 8 transpose of r[0..7] (rows) in place. */
INL TGT2 void tr8x8(__m256 *r)
{
    __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    __m256 u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
    __m256 u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
    __m256 u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
    __m256 u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
    __m256 u4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
    __m256 u5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
    __m256 u6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
    __m256 u7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
    r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
    r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
    r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
    r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
    r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
    r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
    r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
    r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

/* One 6 x 16 output tile over K: xp a packed panel of 6 x rows, wp a packed
 * group of 16 weight rows; the first nrows rows and ncols columns of c are
 * written (or added to). */
INL TGT2 void g2_kernel(const float *xp, const float *wp, int64_t K, float *c, int64_t ldc,
                        int nrows, int ncols, int accumulate)
{
    __m256 a0[G2_MR], a1[G2_MR];
#pragma GCC unroll 8
    for (int i = 0; i < G2_MR; i++) {
        a0[i] = _mm256_setzero_ps();
        a1[i] = _mm256_setzero_ps();
    }
#pragma GCC unroll 4
    for (int64_t k = 0; k < K; k++) {
        const __m256 b0 = _mm256_loadu_ps(wp + G2_NR * k), b1 = _mm256_loadu_ps(wp + G2_NR * k + 8);
#pragma GCC unroll 8
        for (int i = 0; i < G2_MR; i++) {
            const __m256 a = _mm256_broadcast_ss(xp + G2_MR * k + i);
            a0[i] = _mm256_fmadd_ps(a, b0, a0[i]);
            a1[i] = _mm256_fmadd_ps(a, b1, a1[i]);
        }
    }
    /* whole rows with plain loads and stores; the column tail of nw masked */
    const int full = ncols == G2_NR;
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i m0 = _mm256_cmpgt_epi32(_mm256_set1_epi32(ncols), lane);
    const __m256i m1 = _mm256_cmpgt_epi32(_mm256_set1_epi32(ncols - 8), lane);
#pragma GCC unroll 8
    for (int i = 0; i < G2_MR; i++)
        if (i < nrows) {
            float *ci = c + i * ldc;
            __m256 v0 = a0[i], v1 = a1[i];
            if (accumulate) {
                v0 = _mm256_add_ps(full ? _mm256_loadu_ps(ci) : _mm256_maskload_ps(ci, m0), v0);
                v1 = _mm256_add_ps(full ? _mm256_loadu_ps(ci + 8) : _mm256_maskload_ps(ci + 8, m1), v1);
            }
            if (full) {
                _mm256_storeu_ps(ci, v0);
                _mm256_storeu_ps(ci + 8, v1);
            } else {
                _mm256_maskstore_ps(ci, m0, v0);
                _mm256_maskstore_ps(ci + 8, m1, v1);
            }
        }
}

/* Rows [0, nrows) of x (nrows <= 6) into one k-major panel (xp[k*6 + i]),
 * rows beyond nrows zero: eight k at a time, widened and transposed 8 x 8.
 * Each 8-wide store spills two zeros into the next k, which the next store
 * overwrites; the last spills two floats past the panel (slack in the
 * layout below). */
#define DEF_PACKX2(T)                                                               \
    INL TGT2 void packx2_##T(const void *const *x, int nrows, int64_t K, float *xp) \
    {                                                                               \
        int64_t k = 0;                                                              \
        for (; k + 8 <= K; k += 8) {                                                \
            __m256 t[8];                                                            \
            for (int r = 0; r < 8; r++)                                             \
                t[r] = r < nrows ? ld2_##T(x[r], k) : _mm256_setzero_ps();          \
            tr8x8(t);                                                               \
            for (int q = 0; q < 8; q++)                                             \
                _mm256_storeu_ps(xp + G2_MR * (k + q), t[q]);                       \
        }                                                                           \
        for (; k < K; k++)                                                          \
            for (int r = 0; r < G2_MR; r++)                                         \
                xp[G2_MR * k + r] = r < nrows ? sc_##T(x[r], k) : 0.0f;             \
    }
DEF_PACKX2(f32)
DEF_PACKX2(bf16)
DEF_PACKX2(f16)

/* Weight rows [0, nr) (nr <= 16) into one k-major group (wp[k*16 + j]),
 * widened to float32, rows beyond nr zero. */
#define DEF_PACKW2(T)                                                               \
    INL TGT2 void packw2_##T(const void *const *w, int nr, int64_t K, float *wp)    \
    {                                                                               \
        for (int r0 = 0; r0 < G2_NR; r0 += 8) {                                     \
            int64_t k = 0;                                                          \
            for (; k + 8 <= K; k += 8) {                                            \
                __m256 t[8];                                                        \
                for (int r = 0; r < 8; r++)                                         \
                    t[r] = r0 + r < nr ? ld2_##T(w[r0 + r], k) : _mm256_setzero_ps(); \
                tr8x8(t);                                                           \
                for (int q = 0; q < 8; q++)                                         \
                    _mm256_storeu_ps(wp + G2_NR * (k + q) + r0, t[q]);              \
            }                                                                       \
            for (; k < K; k++)                                                      \
                for (int r = 0; r < 8; r++)                                         \
                    wp[G2_NR * k + r0 + r] = r0 + r < nr ? sc_##T(w[r0 + r], k) : 0.0f; \
        }                                                                           \
    }
DEF_PACKW2(f32)
DEF_PACKW2(bf16)
DEF_PACKW2(f16)

/* Before x panel p of np: the p-th share of the cache lines (lines per row)
 * of the next group of weight rows, w[jn, jn + nn), into L1, and of the
 * group after it, w[j2, j2 + n2), into L2 (nn, n2 <= 0: none). */
INL void prefetch_share(const void *const *w, int64_t jn, int64_t nn, int64_t j2, int64_t n2, int64_t lines,
                        int64_t p, int64_t np)
{
    const int64_t l0 = p * lines / np, l1 = (p + 1) * lines / np;
    for (int64_t j = 0; j < nn; j++)
        for (int64_t l = l0; l < l1; l++)
            _mm_prefetch((const char *)w[jn + j] + 64 * l, _MM_HINT_T0);
    for (int64_t j = 0; j < n2; j++)
        for (int64_t l = l0; l < l1; l++)
            _mm_prefetch((const char *)w[j2 + j] + 64 * l, _MM_HINT_T1);
}

/* The driver: every x panel packed first (at most 22 x 6 rows x K floats:
 * 132 KiB at K = 256, in L2), then for each group of 16 weight rows, packed
 * once, all x panels; before panel p the p-th share of the next group's
 * cache lines is prefetched into L1, and of the group after it into L2.
 * Layout of pack: the x panels, 8 floats of slack, the weight group. */
#define DEF_GEMM2(T, ESZ)                                                               \
    static TGT2 void gemm2_##T(int64_t mb, int64_t nw, const void *const *x,            \
                               const void *const *w, int64_t K, float *c, int64_t ldc,  \
                               int accumulate, float *pack)                             \
    {                                                                                   \
        const int64_t np = (mb + G2_MR - 1) / G2_MR;                                    \
        ds_gemm_forget(pack); /* keeps no key of its x copies */                        \
        for (int64_t p = 0; p < np; p++) {                                              \
            const int64_t left = mb - p * G2_MR;                                        \
            packx2_##T(x + p * G2_MR, (int)(left < G2_MR ? left : G2_MR), K,            \
                       pack + p * G2_MR * K);                                           \
        }                                                                               \
        float *wp = pack + np * G2_MR * K + 8;                                          \
        const int64_t lines = (K * (ESZ) + 63) / 64;                                    \
        for (int64_t j0 = 0; j0 < nw; j0 += G2_NR) {                                    \
            const int nr = (int)(nw - j0 < G2_NR ? nw - j0 : G2_NR);                    \
            packw2_##T(w + j0, nr, K, wp);                                              \
            const int64_t jn = j0 + G2_NR, nn = nw - jn < G2_NR ? nw - jn : G2_NR;      \
            const int64_t j2 = jn + G2_NR, n2 = nw - j2 < G2_NR ? nw - j2 : G2_NR;      \
            for (int64_t p = 0; p < np; p++) {                                          \
                const int64_t left = mb - p * G2_MR;                                    \
                prefetch_share(w, jn, nn, j2, n2, lines, p, np);                        \
                g2_kernel(pack + p * G2_MR * K, wp, K, c + p * G2_MR * ldc + j0, ldc,   \
                          (int)(left < G2_MR ? left : G2_MR), nr, accumulate);          \
            }                                                                           \
        }                                                                               \
    }
DEF_GEMM2(f32, 4)
DEF_GEMM2(bf16, 2)
DEF_GEMM2(f16, 2)

/* ---- AVX2 block GEMM with the weights read in place ----------------------
 * The roles of the GEMM above swapped: the block's x rows are packed k-major
 * in panels of 16 (xq[k*16 + i], two vectors per k; a last panel of at most
 * 8 rows takes one), and each weight value is broadcast from its row, six
 * weight rows at a time: per k two x vectors, six broadcasts and 12 FMAs.
 * float32 weights are read where they lie; bfloat16 rows are widened, six
 * at a time, into a float32 buffer of the same layout (no transpose), which
 * measured 1.03-1.1x faster than widening each broadcast.  Each output is
 * the FMA chain of gemm2 (the same products in the same k order), so the
 * bits are gemm2's.  Without the weight packing of gemm2, which at few rows
 * per expert is a large share of the work, this measured 1.20-1.23x gemm2 at
 * 32 rows per expert (float32, OLMoE and Mixtral shapes; bfloat16 1.11-1.14x),
 * 1.05-1.09x at 40-64 and 1.02-1.03x at 128 (float32; bfloat16 0.98x there);
 * but its rows come in vectors of 8, where gemm2's come in panels of 6, and
 * at 33 or 36 rows (40 padded rows against 36) it measured 0.98x.  So
 * gemm2x below takes it where its padded rows are no more than gemm2's, up
 * to 128 rows for float32 and 64 for bfloat16 (benchmarks/README.md). */
#define G3_MR 16
#define G3_NR 6

/* c rows [0, nrows) (<= 8), columns [0, ncols) (<= 6) from acc[j], column j
 * of the 8 rows: transposed, then written (or added to) under a mask. */
INL TGT2 void g3_store(const __m256 *acc, float *c, int64_t ldc, int nrows, int ncols, int accumulate)
{
    __m256 t[8];
#pragma GCC unroll 8
    for (int j = 0; j < G3_NR; j++)
        t[j] = acc[j];
    t[6] = t[7] = _mm256_setzero_ps();
    tr8x8(t);
    const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(ncols), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
#pragma GCC unroll 8
    for (int i = 0; i < 8; i++)
        if (i < nrows) {
            float *ci = c + i * ldc;
            __m256 v = t[i];
            if (accumulate)
                v = _mm256_add_ps(_mm256_maskload_ps(ci, m), v);
            _mm256_maskstore_ps(ci, m, v);
        }
}

/* One panel of NV x 8 rows (nrows of them real) against six float32 weight
 * rows w[0..5] over K; the first ncols columns of c are written. */
#define DEF_G3(NV)                                                                           \
    INL TGT2 void g3_kernel_##NV(const float *xq, const float *const *w, int64_t K, float *c, \
                                 int64_t ldc, int nrows, int ncols, int accumulate)          \
    {                                                                                        \
        __m256 acc[NV][G3_NR];                                                               \
        _Pragma("GCC unroll 8") for (int v = 0; v < NV; v++)                                 \
            _Pragma("GCC unroll 8") for (int j = 0; j < G3_NR; j++)                          \
                acc[v][j] = _mm256_setzero_ps();                                             \
        const float *w0 = w[0], *w1 = w[1], *w2 = w[2], *w3 = w[3], *w4 = w[4], *w5 = w[5];  \
        _Pragma("GCC unroll 4") for (int64_t k = 0; k < K; k++) {                            \
            __m256 xv[NV];                                                                   \
            _Pragma("GCC unroll 8") for (int v = 0; v < NV; v++)                             \
                xv[v] = _mm256_loadu_ps(xq + G3_MR * k + 8 * v);                             \
            const float *ws[G3_NR] = {w0, w1, w2, w3, w4, w5};                               \
            _Pragma("GCC unroll 8") for (int j = 0; j < G3_NR; j++) {                        \
                const __m256 b = _mm256_broadcast_ss(ws[j] + k);                             \
                _Pragma("GCC unroll 8") for (int v = 0; v < NV; v++)                         \
                    acc[v][j] = _mm256_fmadd_ps(b, xv[v], acc[v][j]);                        \
            }                                                                                \
        }                                                                                    \
        _Pragma("GCC unroll 8") for (int v = 0; v < NV; v++)                                 \
            g3_store(acc[v], c + 8 * v * ldc, ldc, nrows - 8 * v, ncols, accumulate);        \
    }
DEF_G3(1)
DEF_G3(2)

/* The driver: every x panel packed first (at most 8 x 16 rows x K floats:
 * 128 KiB at K = 256, in L2), then for each group of six weight rows (widened
 * into the buffer after the panels where they are not float32) all x panels,
 * with the prefetches of gemm2: a share of the next group into L1 and of the
 * group after it into L2 before each panel.  A group of fewer than six rows
 * repeats its last row (its columns are not written). */
#define DEF_GEMM3(T, ESZ, WIDEN)                                                            \
    static TGT2 void gemm3_##T(int64_t mb, int64_t nw, const void *const *x,                \
                               const void *const *w, int64_t K, float *c, int64_t ldc,      \
                               int accumulate, float *pack)                                 \
    {                                                                                       \
        const int64_t np = (mb + G3_MR - 1) / G3_MR;                                        \
        ds_gemm_forget(pack); /* keeps no key of its x copies */                            \
        for (int64_t p = 0; p < np; p++) {                                                  \
            const int64_t left = mb - p * G3_MR;                                            \
            packw2_##T(x + p * G3_MR, (int)(left < G3_MR ? left : G3_MR), K,                \
                       pack + p * G3_MR * K);                                               \
        }                                                                                   \
        float *wb = pack + np * G3_MR * K + 8;                                              \
        const int64_t lines = (K * (ESZ) + 63) / 64;                                        \
        for (int64_t j0 = 0; j0 < nw; j0 += G3_NR) {                                        \
            const int nr = (int)(nw - j0 < G3_NR ? nw - j0 : G3_NR);                        \
            const float *wr[G3_NR];                                                         \
            if (WIDEN)                                                                      \
                widen2_##T(nr, w + j0, K, wb, K);                                           \
            for (int j = 0; j < G3_NR; j++) {                                               \
                const int jj = j < nr ? j : nr - 1;                                         \
                wr[j] = WIDEN ? wb + jj * K : (const float *)w[j0 + jj];                    \
            }                                                                               \
            const int64_t jn = j0 + G3_NR, nn = nw - jn < G3_NR ? nw - jn : G3_NR;          \
            const int64_t j2 = jn + G3_NR, n2 = nw - j2 < G3_NR ? nw - j2 : G3_NR;          \
            for (int64_t p = 0; p < np; p++) {                                              \
                const int64_t left = mb - p * G3_MR;                                        \
                prefetch_share(w, jn, nn, j2, n2, lines, p, np);                            \
                float *cp = c + p * G3_MR * ldc + j0;                                       \
                if (left > 8)                                                               \
                    g3_kernel_2(pack + p * G3_MR * K, wr, K, cp, ldc,                       \
                                (int)(left < G3_MR ? left : G3_MR), nr, accumulate);        \
                else                                                                        \
                    g3_kernel_1(pack + p * G3_MR * K, wr, K, cp, ldc, (int)left, nr,        \
                                accumulate);                                                \
            }                                                                               \
        }                                                                                   \
    }
DEF_GEMM3(f32, 4, 0)
DEF_GEMM3(bf16, 2, 1)
_Static_assert((DS_GEMM_MAX_ROWS + G3_MR - 1) / G3_MR * G3_MR * DS_GEMM_KMAX + 8 +
                       G3_NR * DS_GEMM_KMAX <= DS_GEMM_PACK_USED,
               "the in-place GEMM's panels and weight buffer must fit DS_GEMM_PACK_USED");

/* gemm3 where its rows, padded to vectors of 8, are no more than gemm2's,
 * padded to panels of 6, and mb <= max_rows. */
static int g3_takes(int64_t mb, int64_t max_rows)
{
    return mb <= max_rows && (mb + 7) / 8 * 8 <= (mb + G2_MR - 1) / G2_MR * G2_MR;
}
static void gemm2x_f32(int64_t mb, int64_t nw, const void *const *x, const void *const *w,
                       int64_t K, float *c, int64_t ldc, int accumulate, float *pack)
{
    (g3_takes(mb, 128) ? gemm3_f32 : gemm2_f32)(mb, nw, x, w, K, c, ldc, accumulate, pack);
}
static void gemm2x_bf16(int64_t mb, int64_t nw, const void *const *x, const void *const *w,
                        int64_t K, float *c, int64_t ldc, int accumulate, float *pack)
{
    (g3_takes(mb, 64) ? gemm3_bf16 : gemm2_bf16)(mb, nw, x, w, K, c, ldc, accumulate, pack);
}

void ds_gemm_avx2_variants(ds_dtype dt, ds_gemm_fn *packed, ds_gemm_fn *in_place)
{
    *packed = dt == DS_F32 ? gemm2_f32 : dt == DS_BF16 ? gemm2_bf16 : dt == DS_F16 ? gemm2_f16 : NULL;
    *in_place = dt == DS_F32 ? gemm3_f32 : dt == DS_BF16 ? gemm3_bf16 : NULL;
}

/* ---- SiLU(g) * u on AVX2 (the AVX-512 polynomial; 2^n built from two
 * exponent fields, so that overflow still gives inf and underflow 0) ---- */
INL TGT2 __m256 exp2v(__m256 v)
{
    const __m256 log2e = _mm256_set1_ps(1.44269504088896341f);
    const __m256 ln2hi = _mm256_set1_ps(0.693359375f);
    const __m256 ln2lo = _mm256_set1_ps(-2.12194440e-4f);
    v = _mm256_min_ps(_mm256_max_ps(v, _mm256_set1_ps(-104.0f)), _mm256_set1_ps(89.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(v, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, ln2hi, v);
    r = _mm256_fnmadd_ps(n, ln2lo, r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    __m256 r2 = _mm256_mul_ps(r, r);
    p = _mm256_fmadd_ps(p, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    /* n in [-150, 129]: 2^n = 2^(n/2) * 2^(n - n/2), both normal */
    __m256i ni = _mm256_cvtps_epi32(n);
    __m256i h1 = _mm256_srai_epi32(ni, 1), h2 = _mm256_sub_epi32(ni, h1);
    __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(h1, _mm256_set1_epi32(127)), 23));
    __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(h2, _mm256_set1_epi32(127)), 23));
    return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
}

/* silu(g) * u for 8 interleaved (g, u) pairs at gu. */
INL TGT2 __m256 act2_pairs8(const float *gu)
{
    const __m256i even = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    __m256 lo = _mm256_permutevar8x32_ps(_mm256_loadu_ps(gu), even);      /* g0..g3 u0..u3 */
    __m256 hi = _mm256_permutevar8x32_ps(_mm256_loadu_ps(gu + 8), even);  /* g4..g7 u4..u7 */
    __m256 g = _mm256_permute2f128_ps(lo, hi, 0x20), u = _mm256_permute2f128_ps(lo, hi, 0x31);
    __m256 e = exp2v(_mm256_sub_ps(_mm256_setzero_ps(), g));
    __m256 s = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
    return _mm256_mul_ps(s, u);
}

/* float32 -> bfloat16 (round to nearest even, NaN kept quiet) for 8 values */
INL TGT2 __m128i cvt2_bf16(__m256 v)
{
    __m256i u = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_or_si256(u, _mm256_set1_epi32(0x00400000)), nan);
    r = _mm256_srli_epi32(r, 16);
    __m256i packed = _mm256_packus_epi32(r, r); /* per 128-bit lane: r0..3 r0..3 r4..7 r4..7 */
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, _MM_SHUFFLE(3, 1, 2, 0)));
}

static TGT2 void act2_f32(const float *gu, int64_t n, void *dst)
{
    float *d = (float *)dst;
    int64_t j = 0;
    for (; j + 8 <= n; j += 8)
        _mm256_storeu_ps(d + j, act2_pairs8(gu + 2 * j));
    for (; j < n; j++)
        d[j] = ds_silu(gu[2 * j]) * gu[2 * j + 1];
}
static TGT2 void act2_bf16(const float *gu, int64_t n, void *dst)
{
    uint16_t *d = (uint16_t *)dst;
    int64_t j = 0;
    for (; j + 8 <= n; j += 8)
        _mm_storeu_si128((__m128i *)(d + j), cvt2_bf16(act2_pairs8(gu + 2 * j)));
    for (; j < n; j++)
        d[j] = ds_f32_to_bf16(ds_silu(gu[2 * j]) * gu[2 * j + 1]);
}
static TGT2 void act2_f16(const float *gu, int64_t n, void *dst)
{
    uint16_t *d = (uint16_t *)dst;
    int64_t j = 0;
    for (; j + 8 <= n; j += 8)
        _mm_storeu_si128((__m128i *)(d + j),
                         _mm256_cvtps_ph(act2_pairs8(gu + 2 * j), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    for (; j < n; j++)
        d[j] = ds_f32_to_f16(ds_silu(gu[2 * j]) * gu[2 * j + 1]);
}

/* ---- AVX-512 block GEMM ----------------------------------------------------
 * The AVX2 packed GEMM's scheme on 512-bit vectors: the block's x rows
 * copied, as float32 (16-bit dtypes widened), into k-major panels of 12 rows
 * (xp[k*12 + i]), and each group of 32 weight rows into a k-major panel (wp[k*32 + j], 128 KiB at K =
 * 1024, in L2), against which every x panel of the block runs.  The 12 x 32
 * micro-kernel holds 24 accumulators and, per k, loads two weight vectors
 * and broadcasts twelve x values for 24 FMAs (two loads per 24 FMAs, where
 * the 4 x 6 dot tiles load ten and reduce every output across lanes).  Both
 * copies are made sixteen rows at a time by a 16 x 16 transpose in
 * registers.  Each output is one FMA chain in k order, started at zero in
 * each call and then added to c: gemm2's arithmetic, so for the same K the
 * bits are gemm2's.
 *
 * Measured on an Intel Xeon (AVX-512, 2 threads; benchmarks/README.md):
 * float32 at 128-512 rows per expert 1.08-1.14x the dot tiles, below 1 under
 * about 90 rows, where one weight group's arithmetic does not pay for its
 * copy; bfloat16 and float16 weights, which the tiles widen at every load and
 * the copy widens once, level at 24-32 rows and 1.2-1.5x from 48.  Used for
 * blocks of at least G5_ROWS (float32) or G5_ROWS16 rows; the AVX-512 BF16
 * and AMX levels keep their own bfloat16 kernels. */
#define G5_MR 12
#define G5_NR 32
#define G5_KMAX 1024
#define G5_ROWS 96   /* float32 */
#define G5_ROWS16 32 /* bfloat16 and float16, widened in the copies */
_Static_assert(((DS_GEMM_MAX_ROWS + G5_MR - 1) / G5_MR * G5_MR + G5_NR) * G5_KMAX + 16 <= DS_GEMM_PACK_USED,
               "the AVX-512 GEMM's panels must fit DS_GEMM_PACK_USED");
/* where kept weight groups start: after the x panels of DS_GEMM_MAX_ROWS rows */
#define G5_WKEEP (((DS_GEMM_MAX_ROWS + G5_MR - 1) / G5_MR * G5_MR * G5_KMAX + 15) / 16 * 16)
_Static_assert(G5_WKEEP + (DS_GEMM_WKEY_MAX + G5_NR - 1) / G5_NR * G5_NR * G5_KMAX <= DS_GEMM_PACK_USED,
               "the AVX-512 GEMM's kept weight groups must fit DS_GEMM_PACK_USED");

/* 16 x 16 transpose of r[0..15] (rows) in place: r[q] becomes column q. */
INL TGT5 void tr16x16(__m512 *r)
{
    __m512 t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        const __m512d a = _mm512_castps_pd(t[i]), b = _mm512_castps_pd(t[i + 1]);
        const __m512d c2 = _mm512_castps_pd(t[i + 2]), d = _mm512_castps_pd(t[i + 3]);
        r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c2));
        r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c2));
        r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
        r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
    }
    /* r[4a + b]: rows 4a..4a+3, in each 128-bit lane l the k = 4l + b */
    for (int a = 0; a < 4; a += 2)
        for (int b = 0; b < 4; b++) {
            t[4 * a + b] = _mm512_shuffle_f32x4(r[4 * a + b], r[4 * (a + 1) + b], 0x88);
            t[4 * (a + 1) + b] = _mm512_shuffle_f32x4(r[4 * a + b], r[4 * (a + 1) + b], 0xdd);
        }
    for (int a = 0; a < 2; a++)
        for (int b = 0; b < 4; b++) {
            r[4 * a + b] = _mm512_shuffle_f32x4(t[4 * a + b], t[4 * (a + 2) + b], 0x88);
            r[4 * (a + 2) + b] = _mm512_shuffle_f32x4(t[4 * a + b], t[4 * (a + 2) + b], 0xdd);
        }
}

/* Rows [0, n) (n <= 16, the rest zero) at k .. k + kr (kr <= 16, the rest
 * zero), widened to float32 and transposed: r[q] holds k + q of each row. */
#define DEF_LOAD16T5(T)                                                              \
    INL TGT5 void ld16t5_##T(const void *const *rows, int n, int64_t k, int kr, __m512 *r) \
    {                                                                                \
        const __mmask16 m = kr >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << kr) - 1u); \
        for (int i = 0; i < 16; i++)                                                 \
            r[i] = i < n ? ld5m_##T(rows[i], k, m) : _mm512_setzero_ps();            \
        tr16x16(r);                                                                  \
    }
DEF_LOAD16T5(f32)
DEF_LOAD16T5(bf16)
DEF_LOAD16T5(f16)

/* x rows [0, n) (n <= 12) into one k-major panel (xp[k*12 + i], rows beyond
 * n zero); weight rows [0, nr) (nr <= 32) into one (wp[k*32 + j]). */
#define DEF_PACK5(T)                                                                  \
    INL TGT5 void packx5_##T(const void *const *x, int n, int64_t K, float *xp)       \
    {                                                                                 \
        for (int64_t k = 0; k < K; k += 16) {                                         \
            const int kr = K - k < 16 ? (int)(K - k) : 16;                            \
            __m512 r[16];                                                             \
            ld16t5_##T(x, n, k, kr, r);                                               \
            for (int q = 0; q < kr; q++)                                              \
                _mm512_mask_storeu_ps(xp + G5_MR * (k + q), (__mmask16)0x0fff, r[q]);  \
        }                                                                             \
    }                                                                                 \
    INL TGT5 void packw5_##T(const void *const *w, int nr, int64_t K, float *wp)      \
    {                                                                                 \
        for (int h = 0; h < G5_NR; h += 16) {                                         \
            const int n = nr - h < 0 ? 0 : nr - h < 16 ? nr - h : 16;                 \
            for (int64_t k = 0; k < K; k += 16) {                                     \
                const int kr = K - k < 16 ? (int)(K - k) : 16;                        \
                __m512 r[16];                                                         \
                ld16t5_##T(w + h, n, k, kr, r);                                       \
                for (int q = 0; q < kr; q++)                                          \
                    _mm512_storeu_ps(wp + G5_NR * (k + q) + h, r[q]);                 \
            }                                                                         \
        }                                                                             \
    }
DEF_PACK5(f32)
DEF_PACK5(bf16)
DEF_PACK5(f16)

/* One 12 x 32 output tile over K: the first nrows rows and ncols columns of c
 * written (or added to). */
typedef struct {
    const void *const *rows; /* the next weight group's rows (n of them) */
    int64_t n, l0, nl;       /* lines [l0, l0 + nl) of each */
} g5_pf;

INL TGT5 void g5_kernel(const float *xp, const float *wp, int64_t K, float *c, int64_t ldc, int nrows,
                        int ncols, int accumulate, const g5_pf *pf)
{
    const int64_t npf = pf->n * pf->nl;
    const int64_t every = npf > 0 && K / 2 > npf ? (K / 2) / npf : 1;
    int64_t q = 0, r = 0, l = pf->l0, nxt = 0;
    __m512 a0[G5_MR], a1[G5_MR];
#pragma GCC unroll 12
    for (int i = 0; i < G5_MR; i++) {
        a0[i] = _mm512_setzero_ps();
        a1[i] = _mm512_setzero_ps();
    }
    for (int64_t k = 0; k < K; k += 2) {
        if (q < npf && k >= nxt) {
            _mm_prefetch((const char *)pf->rows[r] + 64 * l, _MM_HINT_T1);
            q++;
            nxt += 2 * every;
            if (++r == pf->n) {
                r = 0;
                l++;
            }
        }
#pragma GCC unroll 2
        for (int64_t kk = k; kk < k + 2 && kk < K; kk++) {
            const __m512 b0 = _mm512_loadu_ps(wp + G5_NR * kk), b1 = _mm512_loadu_ps(wp + G5_NR * kk + 16);
#pragma GCC unroll 12
            for (int i = 0; i < G5_MR; i++) {
                const __m512 a = _mm512_set1_ps(xp[G5_MR * kk + i]);
                a0[i] = _mm512_fmadd_ps(a, b0, a0[i]);
                a1[i] = _mm512_fmadd_ps(a, b1, a1[i]);
            }
        }
    }
    const __mmask16 m0 = ncols >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << ncols) - 1u);
    const __mmask16 m1 = ncols >= 32 ? (__mmask16)0xffff
                         : ncols > 16 ? (__mmask16)((1u << (ncols - 16)) - 1u) : (__mmask16)0;
#pragma GCC unroll 12
    for (int i = 0; i < G5_MR; i++)
        if (i < nrows) {
            float *ci = c + i * ldc;
            __m512 v0 = a0[i], v1 = a1[i];
            if (accumulate) {
                v0 = _mm512_add_ps(_mm512_maskz_loadu_ps(m0, ci), v0);
                v1 = _mm512_add_ps(_mm512_maskz_loadu_ps(m1, ci + 16), v1);
            }
            _mm512_mask_storeu_ps(ci, m0, v0);
            _mm512_mask_storeu_ps(ci + 16, m1, v1);
        }
}

/* The driver: every x panel packed first (at most 11 x 12 rows x K floats:
 * 528 KiB at K = 1024, in L2; kept under the pack's key, as the AMX GEMM
 * keeps its copy, for the next call on the same rows), then for each group
 * of 32 weight rows, packed once, all x panels; panel p prefetches the p-th
 * share of the next group's cache lines into L2, one line every few k inside
 * its FMA loop (a burst before each panel ran at 0.93-0.98x the speed of no
 * prefetch, this at 1.01-1.06x).  Where the engine says that its next calls
 * are further blocks of rows on the same weight rows (ds_gemm_reuse_w), every
 * group is kept, up to 256 rows x K (1 MiB), under a second key, and those
 * calls neither copy nor prefetch them (an expert of 512 rows copied each
 * weight four times; measured 1.03-1.06x at 256-512 rows, benchmarks/README.md). */
#define DEF_GEMM5(T, ESZ)                                                               \
    static TGT5 void gemm5_##T(int64_t mb, int64_t nw, const void *const *x,            \
                               const void *const *w, int64_t K, float *c, int64_t ldc,  \
                               int accumulate, float *pack)                             \
    {                                                                                   \
        const int64_t np = (mb + G5_MR - 1) / G5_MR;                                    \
        if (!ds_gemm_x_kept(pack, mb, K, x))                                            \
            for (int64_t p = 0; p < np; p++) {                                          \
                const int64_t left = mb - p * G5_MR;                                    \
                packx5_##T(x + p * G5_MR, (int)(left < G5_MR ? left : G5_MR), K,        \
                           pack + p * G5_MR * K);                                       \
            }                                                                           \
        ds_gemm_keep_x(pack, mb, K, x);                                                 \
        const int64_t lines = (K * (ESZ) + 63) / 64;                                    \
        /* the caller's next calls take these weight rows too: every group kept, \
         * each at its own place after the largest x panels (one offset for      \
         * every call), under a key; otherwise one group at a time after x */    \
        const int keepw = ds_gemm_reusing_w(pack) && nw <= DS_GEMM_WKEY_MAX;            \
        const int wkept = keepw && ds_gemm_w_kept(pack, nw, K, w);                      \
        if (!wkept)                                                                     \
            ds_gemm_wkey(pack)[0] = 0;                                                  \
        float *wp0 = keepw ? pack + G5_WKEEP : pack + (np * G5_MR * K + 15) / 16 * 16;  \
        for (int64_t j0 = 0; j0 < nw; j0 += G5_NR) {                                    \
            const int nr = (int)(nw - j0 < G5_NR ? nw - j0 : G5_NR);                    \
            float *wp = keepw ? wp0 + j0 * K : wp0;                                     \
            if (!wkept)                                                                 \
                packw5_##T(w + j0, nr, K, wp);                                          \
            const int64_t jn = j0 + G5_NR, nn = wkept ? 0 : nw - jn < G5_NR ? nw - jn : G5_NR; \
            for (int64_t p = 0; p < np; p++) {                                          \
                const int64_t left = mb - p * G5_MR;                                    \
                const int64_t l0 = p * lines / np, l1 = (p + 1) * lines / np;           \
                const g5_pf pf = {nn > 0 ? w + jn : w, nn > 0 ? nn : 0, l0, l1 - l0};   \
                g5_kernel(pack + p * G5_MR * K, wp, K, c + p * G5_MR * ldc + j0, ldc,   \
                          (int)(left < G5_MR ? left : G5_MR), nr, accumulate, &pf);     \
            }                                                                           \
        }                                                                               \
        if (keepw && !wkept)                                                            \
            ds_gemm_keep_w(pack, nw, K, w);                                             \
    }
DEF_GEMM5(f32, 4)
DEF_GEMM5(bf16, 2)
DEF_GEMM5(f16, 2)

static const ds_kernels k5_f32 = {dot5_f32, rows5_f32, act5_f32, combine5_f32, 4, 6, gemm5_f32, G5_ROWS, dot5_f32, widen2_f32, 0, G5_KMAX, 1};
static const ds_kernels k5_bf16 = {dot5_bf16, rows5_bf16, act5_bf16, combine5_bf16, 4, 6, gemm5_bf16, G5_ROWS16,
                                   dotw5_bf16, widen2_bf16, 0, G5_KMAX, 1};
static const ds_kernels k5_f16 = {dot5_f16, rows5_f16, act5_f16, combine5_f16, 4, 6, gemm5_f16, G5_ROWS16, NULL, NULL, 0, G5_KMAX, 1};
/* bfloat16 x rows copied as they are (the BF16 tiles take bfloat16 x):
 * contiguous rows measured 1.05-1.07x at Mixtral T = 16 / 128, level at
 * OLMoE T = 128 (benchmarks/README.md). */
static void copy_bf16_rows(int64_t n, const void *const *x, int64_t K, void *dst, int64_t ldd)
{
    for (int64_t r = 0; r < n; r++)
        memcpy((uint16_t *)dst + r * ldd, x[r], (size_t)K * 2);
}
static const ds_kernels k5b_bf16 = {dot5b_bf16, rows5b_bf16, act5_bf16, combine5_bf16, 4, 6, NULL, 0,
                                    dot5b_bf16, copy_bf16_rows, 2, 0};

/* ---- AMX: bfloat16 blocks on the tile unit --------------------------------
 * C^T = W X^T in 16 x 16 float32 tiles.  Per k slice of 32: tile A holds 16
 * weight rows (32 bfloat16 each) loaded where they lie, at their own stride
 * (the engine passes the rows of one matrix, or gate and up rows
 * interleaved: every other row is evenly spaced);
 * tile B 16 x rows in the pair-interleaved layout TDPBF16PS takes
 * (B[k/2][m][k%2]: a 16 x 16 dword transpose of the x rows), packed once per
 * call and used by every weight row, and kept (keyed by the rows' addresses,
 * ds_gemm_xkey) for the next call on the same rows: the engine's items of
 * one expert share them.  Two weight tiles against two x panels per pass:
 * four accumulator tiles, transposed again when written to c.  A first
 * version packed the weights instead (the transpose on every weight
 * element): 22 us of which 20 were the packing, per 16 x 256 x 512 block,
 * against 2.5 for the tile work.
 *
 * The weight stream sets the time (benchmarks/README.md, "AMX: the weight
 * stream"): 32 rows read side by side, each in ascending lines, are 32
 * streams the hardware prefetchers follow (benchmarks/read_patterns.c:
 * 14.5 GB/s on one core, 28.5 on two, above a sequential read's 12.9 /
 * 26.5), so there is no software prefetch (it took those reads to 12.0 /
 * 24.2 GB/s and the engine to 1.08-1.17x the time), and K blocks are long (4096: a row's
 * lines of a block are one run; 512 took 1.2x the time): x panels of up to
 * 128 rows x 4096 stay in L2.  So from one row on, bfloat16 blocks run here
 * rather than on the GEMV-shaped rows kernel (1.1-1.3x faster at T = 1-16).
 * K tails, short groups and unevenly spaced
 * rows are copied (zero past K, nw and mb: masked loads, nothing past a
 * row's end is read); only the block's own rows and columns of c are
 * written.  Products of two bfloat16 values are exact in float32;
 * TDPBF16PS adds each (k, k+1) pair's products into its float32 accumulator
 * with round to nearest even and flushes denormal inputs and results to
 * zero, as the BF16 dot product of the tiles does.  The summation order
 * depends only on K: the same bits for any thread count.  The tile state is
 * configured at the start of each call and released at its end, so a thread
 * holds it only while it computes. */
#if (defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11)
#define DS_HAVE_AMX 1
#define TGTX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq")))
#define AX_K 32          /* k per tile slice */
#define AX_TILE 512      /* bfloat16 values per A or B tile (16 x 64 bytes) */
#define AX_KMAX 4096     /* K block */
_Static_assert((DS_GEMM_MAX_ROWS / 16) * (AX_KMAX / AX_K) * AX_TILE * 2 + 2 * (AX_KMAX / AX_K) * AX_TILE * 2 +
                       4 * 256 * 4 + 64 <= DS_GEMM_PACK_USED * 4,
               "the AMX GEMM's panels must fit DS_GEMM_PACK_USED");

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} ax_config;

/* 16 x 16 dwords: a[n] (row n) -> out[k] = (a[0][k], ..., a[15][k]) */
INL TGTX void ax_transpose16(__m512i *a)
{
    __m512i b[16], c[16];
    for (int i = 0; i < 16; i += 2) {
        b[i] = _mm512_unpacklo_epi32(a[i], a[i + 1]);
        b[i + 1] = _mm512_unpackhi_epi32(a[i], a[i + 1]);
    }
    for (int g = 0; g < 16; g += 4) {
        c[g] = _mm512_unpacklo_epi64(b[g], b[g + 2]);
        c[g + 1] = _mm512_unpackhi_epi64(b[g], b[g + 2]);
        c[g + 2] = _mm512_unpacklo_epi64(b[g + 1], b[g + 3]);
        c[g + 3] = _mm512_unpackhi_epi64(b[g + 1], b[g + 3]);
    }
    /* c[4g + j], 128-bit lane L: rows 4g..4g+3 at k = 4L + j */
    for (int j = 0; j < 4; j++) {
        const __m512i d0 = _mm512_shuffle_i32x4(c[j], c[4 + j], 0x88);
        const __m512i d1 = _mm512_shuffle_i32x4(c[j], c[4 + j], 0xDD);
        const __m512i d2 = _mm512_shuffle_i32x4(c[8 + j], c[12 + j], 0x88);
        const __m512i d3 = _mm512_shuffle_i32x4(c[8 + j], c[12 + j], 0xDD);
        a[j] = _mm512_shuffle_i32x4(d0, d2, 0x88);
        a[8 + j] = _mm512_shuffle_i32x4(d0, d2, 0xDD);
        a[4 + j] = _mm512_shuffle_i32x4(d1, d3, 0x88);
        a[12 + j] = _mm512_shuffle_i32x4(d1, d3, 0xDD);
    }
}

/* 32 bfloat16 of row r from element k0, n of them valid (the rest zero) */
INL TGTX __m512i ax_load32(const void *r, int64_t k0, int64_t n)
{
    const uint16_t *p = (const uint16_t *)r + k0;
    if (n >= AX_K)
        return _mm512_loadu_si512((const void *)p);
    return _mm512_maskz_loadu_epi16((__mmask32)((1ull << n) - 1), p);
}

/* Where the 16 weight rows of an A tile lie: rows w[j], w[j + step], ...
 * evenly spaced in memory (the stride in bytes), or not (0). */
static int64_t ax_stride(const void *const *w, int64_t j, int64_t step)
{
    const uintptr_t r0 = (uintptr_t)w[j];
    const int64_t d = (int64_t)((uintptr_t)w[j + step] - r0);
    for (int64_t t = 2; t < 16; t++)
        if ((int64_t)((uintptr_t)w[j + t * step] - r0) != t * d)
            return 0;
    return d;
}

/* Writes C^T tiles out: ct[u] (16 weight rows x 16 x rows, float32) for
 * u < nt, transposed; row m of the panel gets columns col0 + (nt == 2 and
 * interleaved ? 2t + u : 16u + t) for the first ncols columns. */
INL TGTX void ax_write(float *ct, int nt, int interleaved, float *c, int64_t ldc, int64_t nrows, int64_t ncols,
                       int accumulate)
{
    __m512i v[2][16];
    for (int u = 0; u < nt; u++) {
        for (int t = 0; t < 16; t++)
            v[u][t] = _mm512_loadu_si512((const void *)(ct + 256 * u + 16 * t));
        ax_transpose16(v[u]);
    }
    const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    const int64_t n0 = ncols < 16 ? ncols : 16, n1 = ncols - 16 > 0 ? ncols - 16 : 0;
    const __mmask16 m0 = (__mmask16)((1u << n0) - 1), m1 = (__mmask16)((1u << n1) - 1);
    for (int64_t m = 0; m < nrows; m++) {
        float *cm = c + m * ldc;
        __m512 a = _mm512_castsi512_ps(v[0][m]), b = _mm512_setzero_ps();
        if (nt == 2) {
            b = _mm512_castsi512_ps(v[1][m]);
            if (interleaved) {
                const __m512 e = a;
                a = _mm512_permutex2var_ps(e, lo, b);
                b = _mm512_permutex2var_ps(e, hi, b);
            }
        }
        if (accumulate) {
            a = _mm512_add_ps(_mm512_maskz_loadu_ps(m0, cm), a);
            if (n1)
                b = _mm512_add_ps(_mm512_maskz_loadu_ps(m1, cm + 16), b);
        }
        _mm512_mask_storeu_ps(cm, m0, a);
        if (n1)
            _mm512_mask_storeu_ps(cm + 16, m1, b);
    }
}

static TGTX void gemm_amx_bf16(int64_t mb, int64_t nw, const void *const *x, const void *const *w,
                               int64_t K, float *c, int64_t ldc, int accumulate, float *pack)
{
    const int64_t nfull = K / AX_K, ns = (K + AX_K - 1) / AX_K, np = (mb + 15) / 16;
    uint16_t *xp = (uint16_t *)pack;          /* np x ns B tiles: x rows, pair-interleaved */
    uint16_t *wb = xp + np * ns * AX_TILE;    /* 2 x ns A tiles: weight rows copied, when they must be */
    float *cs = (float *)(wb + 2 * ns * AX_TILE); /* 4 accumulator tiles, 16 x 16 */
    ax_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = 16;
    }
    _tile_loadconfig(&cfg);
    /* x packed, unless the last call on this pack left the same rows there */
    const int packed = ds_gemm_x_kept(pack, mb, K, x);
    for (int64_t p = 0; p < (packed ? 0 : np); p++)
        for (int64_t s = 0; s < ns; s++) {
            __m512i a[16];
            for (int64_t i = 0; i < 16; i++) {
                const int64_t r = p * 16 + i;
                a[i] = r < mb ? ax_load32(x[r], s * AX_K, K - s * AX_K) : _mm512_setzero_si512();
            }
            ax_transpose16(a);
            uint16_t *t = xp + (p * ns + s) * AX_TILE;
            for (int k = 0; k < 16; k++)
                _mm512_storeu_si512((void *)(t + k * AX_K), a[k]);
        }
    ds_gemm_keep_x(pack, mb, K, x);
    for (int64_t j0 = 0; j0 < nw; j0 += 32) {
        /* the group's two A tiles: 16 evenly spaced rows each, read where
         * they lie (entries j0.. and j0+16.., or the even and the odd entries
         * of 32: gate and up rows interleaved); otherwise (a short group,
         * rows spaced unevenly) copied, zero past nw.  The K tail is always
         * copied (zero past K). */
        const int64_t nr = nw - j0 < 32 ? nw - j0 : 32;
        int nt = nr > 16 ? 2 : 1, inter = 0;
        const char *base[2] = {NULL, NULL};
        int64_t stride[2] = {0, 0};
        if (nr == 32) {
            stride[0] = ax_stride(w, j0, 1);
            stride[1] = ax_stride(w, j0 + 16, 1);
            if (stride[0] && stride[1]) {
                base[0] = (const char *)w[j0];
                base[1] = (const char *)w[j0 + 16];
            } else {
                stride[0] = ax_stride(w, j0, 2);
                stride[1] = ax_stride(w, j0 + 1, 2);
                if (stride[0] && stride[1]) {
                    base[0] = (const char *)w[j0];
                    base[1] = (const char *)w[j0 + 1];
                    inter = 1;
                }
            }
        } else if (nr == 16 && (stride[0] = ax_stride(w, j0, 1)) != 0) {
            base[0] = (const char *)w[j0];
        }
        const int copy_all = base[0] == NULL;
        const int64_t s_copy = copy_all ? 0 : nfull; /* slices from here on come from wb */
        for (int u = 0; u < nt; u++)
            for (int64_t s = s_copy; s < ns; s++) {
                uint16_t *t = wb + (u * ns + s) * AX_TILE;
                for (int64_t r = 0; r < 16; r++) {
                    const int64_t e = copy_all ? 16 * u + r : (inter ? 2 * r + u : 16 * u + r);
                    _mm512_storeu_si512((void *)(t + r * AX_K),
                                        e < nr ? ax_load32(w[j0 + e], s * AX_K, K - s * AX_K)
                                               : _mm512_setzero_si512());
                }
            }
        for (int64_t p0 = 0; p0 < np; p0 += 2) {
            const int two = np - p0 > 1;
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int64_t s = 0; s < ns; s++) {
                if (s < s_copy) {
                    _tile_loadd(4, base[0] + 64 * s, stride[0]);
                    if (nt > 1)
                        _tile_loadd(5, base[1] + 64 * s, stride[1]);
                } else {
                    _tile_loadd(4, wb + s * AX_TILE, 64);
                    if (nt > 1)
                        _tile_loadd(5, wb + (ns + s) * AX_TILE, 64);
                }
                _tile_loadd(6, xp + (p0 * ns + s) * AX_TILE, 64);
                _tile_dpbf16ps(0, 4, 6);
                if (nt > 1)
                    _tile_dpbf16ps(1, 5, 6);
                if (two) {
                    _tile_loadd(7, xp + ((p0 + 1) * ns + s) * AX_TILE, 64);
                    _tile_dpbf16ps(2, 4, 7);
                    if (nt > 1)
                        _tile_dpbf16ps(3, 5, 7);
                }
            }
            _tile_stored(0, cs, 64);
            _tile_stored(1, cs + 256, 64);
            _tile_stored(2, cs + 512, 64);
            _tile_stored(3, cs + 768, 64);
            for (int pp = 0; pp <= two; pp++) {
                const int64_t r0 = (p0 + pp) * 16, nrows = mb - r0 < 16 ? mb - r0 : 16;
                ax_write(cs + 512 * pp, nt, inter, c + r0 * ldc + j0, ldc, nrows, nr, accumulate);
            }
        }
    }
    _tile_release();
}

/* Every block goes to the tile unit, from one row on: the weight stream,
 * not the arithmetic, sets the time (above). */
static const ds_kernels kx_bf16 = {dot5b_bf16, rows5b_bf16, act5_bf16, combine5_bf16, 4, 6, gemm_amx_bf16, 1,
                                   dot5b_bf16, copy_bf16_rows, 2, AX_KMAX};
const ds_kernels *ds_kernels_amx_bf16(ds_dtype dt) { return dt == DS_BF16 ? &kx_bf16 : NULL; }
#else
const ds_kernels *ds_kernels_amx_bf16(ds_dtype dt) { (void)dt; return NULL; }
#endif

const ds_kernels *ds_kernels_avx512(ds_dtype dt)
{
    switch (dt) {
    case DS_F32: return &k5_f32;
    case DS_BF16: return &k5_bf16;
    case DS_F16: return &k5_f16;
    default: return NULL;
    }
}

const ds_kernels *ds_kernels_avx512_bf16(ds_dtype dt) { return dt == DS_BF16 ? &k5b_bf16 : NULL; }

static const ds_kernels k2_f32 = {dot2_f32, rows2_f32, act2_f32, ds_combine_generic_f32, 3, 4, gemm2x_f32, 32, dot2_f32, widen2_f32, 0, 0};
static const ds_kernels k2_bf16 = {dot2_bf16, rows2_bf16, act2_bf16, ds_combine_generic_bf16, 3, 4, gemm2x_bf16, 32,
                                   dotw2_bf16, widen2_bf16, 0, 0};
static const ds_kernels k2_f16 = {dot2_f16, rows2_f16, act2_f16, ds_combine_generic_f16, 3, 4, gemm2_f16, 32, NULL, NULL, 0, 0};

const ds_kernels *ds_kernels_avx2(ds_dtype dt)
{
    switch (dt) {
    case DS_F32: return &k2_f32;
    case DS_BF16: return &k2_bf16;
    case DS_F16: return &k2_f16;
    default: return NULL;
    }
}

#else /* not x86-64 with GCC/Clang */

const ds_kernels *ds_kernels_avx2(ds_dtype dt) { (void)dt; return NULL; }
const ds_kernels *ds_kernels_avx512(ds_dtype dt) { (void)dt; return NULL; }
const ds_kernels *ds_kernels_avx512_bf16(ds_dtype dt) { (void)dt; return NULL; }
const ds_kernels *ds_kernels_amx_bf16(ds_dtype dt) { (void)dt; return NULL; }
void ds_gemm_avx2_variants(ds_dtype dt, ds_gemm_fn *packed, ds_gemm_fn *in_place)
{
    (void)dt;
    *packed = *in_place = NULL;
}

#endif
