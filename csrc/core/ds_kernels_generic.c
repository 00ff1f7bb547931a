/* Portable kernels: plain C that compilers vectorise for the baseline ISA
 * (SSE2 on x86-64, NEON on aarch64).  Sixteen independent partial sums per
 * dot product keep the summation order fixed and vectorisable. */
#include "ds_internal.h"

#define GEN_LANES 16
#define GEN_CHUNK 256

/* Converts n elements of dtype dt to float32. */
static void gen_to_f32(const void *src, ds_dtype dt, int64_t n, float *dst)
{
    if (dt == DS_F32) {
        memcpy(dst, src, (size_t)n * 4);
    } else if (dt == DS_BF16) {
        const uint16_t *s = (const uint16_t *)src;
        for (int64_t i = 0; i < n; i++)
            dst[i] = ds_bf16_to_f32(s[i]);
    } else {
        const uint16_t *s = (const uint16_t *)src;
        for (int64_t i = 0; i < n; i++)
            dst[i] = ds_f16_to_f32(s[i]);
    }
}

static float gen_reduce(const float *acc)
{
    float r8[8], r4[4];
    for (int l = 0; l < 8; l++)
        r8[l] = acc[l] + acc[l + 8];
    for (int l = 0; l < 4; l++)
        r4[l] = r8[l] + r8[l + 4];
    return (r4[0] + r4[2]) + (r4[1] + r4[3]);
}

static float gen_dot_f32(const float *x, const float *w, int64_t K)
{
    float acc[GEN_LANES] = {0};
    int64_t k = 0;
    for (; k + GEN_LANES <= K; k += GEN_LANES)
        for (int l = 0; l < GEN_LANES; l++)
            acc[l] += x[k + l] * w[k + l];
    for (int l = 0; k + l < K; l++)
        acc[l] += x[k + l] * w[k + l];
    return gen_reduce(acc);
}

static void gen_dot_tile_impl(ds_dtype dt, int mr, int nr, const void *const *x,
                              const void *const *w, int64_t K, float *c, int64_t ldc,
                              int accumulate)
{
    if (dt == DS_F32) {
        for (int i = 0; i < mr; i++)
            for (int j = 0; j < nr; j++) {
                float v = gen_dot_f32((const float *)x[i], (const float *)w[j], K);
                c[i * ldc + j] = accumulate ? c[i * ldc + j] + v : v;
            }
        return;
    }
    /* 16-bit types: convert GEN_CHUNK elements at a time; chunk boundaries
     * are multiples of GEN_LANES, so lane assignment matches the f32 path. */
    float xf[DS_MAX_MR][GEN_CHUNK], wf[GEN_CHUNK];
    float acc[DS_MAX_MR][DS_MAX_NR][GEN_LANES];
    memset(acc, 0, sizeof acc);
    size_t esz = ds_dtype_size(dt);
    for (int64_t k0 = 0; k0 < K; k0 += GEN_CHUNK) {
        int64_t n = K - k0 < GEN_CHUNK ? K - k0 : GEN_CHUNK;
        for (int i = 0; i < mr; i++)
            gen_to_f32((const char *)x[i] + k0 * esz, dt, n, xf[i]);
        for (int j = 0; j < nr; j++) {
            gen_to_f32((const char *)w[j] + k0 * esz, dt, n, wf);
            for (int i = 0; i < mr; i++) {
                float *a = acc[i][j];
                int64_t k = 0;
                for (; k + GEN_LANES <= n; k += GEN_LANES)
                    for (int l = 0; l < GEN_LANES; l++)
                        a[l] += xf[i][k + l] * wf[k + l];
                for (int l = 0; k + l < n; l++)
                    a[l] += xf[i][k + l] * wf[k + l];
            }
        }
    }
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++) {
            float v = gen_reduce(acc[i][j]);
            c[i * ldc + j] = accumulate ? c[i * ldc + j] + v : v;
        }
}

static void gen_dot_f32_tile(int mr, int nr, const void *const *x, const void *const *w,
                             int64_t K, float *c, int64_t ldc, int accumulate,
                             const ds_prefetch *pf)
{
    (void)pf;
    gen_dot_tile_impl(DS_F32, mr, nr, x, w, K, c, ldc, accumulate);
}
static void gen_dot_bf16_tile(int mr, int nr, const void *const *x, const void *const *w,
                              int64_t K, float *c, int64_t ldc, int accumulate,
                              const ds_prefetch *pf)
{
    (void)pf;
    gen_dot_tile_impl(DS_BF16, mr, nr, x, w, K, c, ldc, accumulate);
}
static void gen_dot_f16_tile(int mr, int nr, const void *const *x, const void *const *w,
                             int64_t K, float *c, int64_t ldc, int accumulate,
                             const ds_prefetch *pf)
{
    (void)pf;
    gen_dot_tile_impl(DS_F16, mr, nr, x, w, K, c, ldc, accumulate);
}

#define GEN_ROWS(NAME, TILE)                                                            \
    static void NAME(int mr, int64_t nw, const void *const *x, const void *const *w,     \
                     int64_t K, float *c, int64_t ldc, int accumulate, int whole)         \
    {                                                                                   \
        (void)whole;                                                                    \
        for (int64_t j = 0; j < nw; j++)                                                \
            TILE(mr, 1, x, w + j, K, c + j, ldc, accumulate, NULL);                     \
    }

GEN_ROWS(gen_rows_f32, gen_dot_f32_tile)
GEN_ROWS(gen_rows_bf16, gen_dot_bf16_tile)
GEN_ROWS(gen_rows_f16, gen_dot_f16_tile)

static void gen_act_f32(const float *gu, int64_t n, void *dst)
{
    float *d = (float *)dst;
    for (int64_t j = 0; j < n; j++)
        d[j] = ds_silu(gu[2 * j]) * gu[2 * j + 1];
}
static void gen_act_bf16(const float *gu, int64_t n, void *dst)
{
    uint16_t *d = (uint16_t *)dst;
    for (int64_t j = 0; j < n; j++)
        d[j] = ds_f32_to_bf16(ds_silu(gu[2 * j]) * gu[2 * j + 1]);
}
static void gen_act_f16(const float *gu, int64_t n, void *dst)
{
    uint16_t *d = (uint16_t *)dst;
    for (int64_t j = 0; j < n; j++)
        d[j] = ds_f32_to_f16(ds_silu(gu[2 * j]) * gu[2 * j + 1]);
}

/* The portable combine, also used by the AVX2 level (it is memory-bound). */
#define GEN_COMBINE(NAME, STORE)                                                        \
    void NAME(const float *const *y, const float *w, int nk, int64_t H, void *out) \
    {                                                                                   \
        float acc[GEN_CHUNK];                                                           \
        for (int64_t h0 = 0; h0 < H; h0 += GEN_CHUNK) {                                 \
            int64_t n = H - h0 < GEN_CHUNK ? H - h0 : GEN_CHUNK;                        \
            for (int64_t h = 0; h < n; h++)                                             \
                acc[h] = 0.0f;                                                          \
            for (int k = 0; k < nk; k++) {                                              \
                const float *yk = y[k] + h0, wk = w[k];                                 \
                for (int64_t h = 0; h < n; h++)                                         \
                    acc[h] += wk * yk[h];                                               \
            }                                                                           \
            for (int64_t h = 0; h < n; h++)                                             \
                STORE;                                                                  \
        }                                                                               \
    }

GEN_COMBINE(ds_combine_generic_f32, ((float *)out)[h0 + h] = acc[h])
GEN_COMBINE(ds_combine_generic_bf16, ((uint16_t *)out)[h0 + h] = ds_f32_to_bf16(acc[h]))
GEN_COMBINE(ds_combine_generic_f16, ((uint16_t *)out)[h0 + h] = ds_f32_to_f16(acc[h]))

static const ds_kernels gen_f32 = {gen_dot_f32_tile, gen_rows_f32, gen_act_f32, ds_combine_generic_f32, 4, 4, NULL, 0, NULL, NULL, 0, 0};
static const ds_kernels gen_bf16 = {gen_dot_bf16_tile, gen_rows_bf16, gen_act_bf16, ds_combine_generic_bf16, 4, 4, NULL, 0, NULL, NULL, 0, 0};
static const ds_kernels gen_f16 = {gen_dot_f16_tile, gen_rows_f16, gen_act_f16, ds_combine_generic_f16, 4, 4, NULL, 0, NULL, NULL, 0, 0};

const ds_kernels *ds_kernels_generic(ds_dtype dt)
{
    switch (dt) {
    case DS_F32: return &gen_f32;
    case DS_BF16: return &gen_bf16;
    case DS_F16: return &gen_f16;
    default: return NULL;
    }
}
