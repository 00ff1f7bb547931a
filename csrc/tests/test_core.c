/* Unit tests of csrc/core alone (no Python): every operation against a
 * float64 reference written here, on every SIMD level this CPU offers.
 * Prints "N passed, M failed" and exits non-zero on any failure. */
#include "../core/ds_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

static int n_pass, n_fail;

#define CHECK(cond, ...)                                                     \
    do {                                                                     \
        if (cond) {                                                          \
            n_pass++;                                                        \
        } else {                                                             \
            n_fail++;                                                        \
            printf("FAIL %s:%d: ", __FILE__, __LINE__);                      \
            printf(__VA_ARGS__);                                             \
            printf("\n");                                                    \
        }                                                                    \
    } while (0)

/* xorshift64*: deterministic test data */
static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint64_t rng_u64(void)
{
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545F4914F6CDD1Dull;
}
static double rng_unif(void) { return (double)(rng_u64() >> 11) * (1.0 / 9007199254740992.0); }
static double rng_normal(void)
{
    double s = 0;
    for (int i = 0; i < 12; i++)
        s += rng_unif();
    return s - 6.0;
}

/* typed buffers: values are stored in dtype and read back as double */
static void store(void *p, ds_dtype dt, int64_t i, double v)
{
    if (dt == DS_F32) ((float *)p)[i] = (float)v;
    else if (dt == DS_BF16) ((uint16_t *)p)[i] = ds_f32_to_bf16((float)v);
    else ((uint16_t *)p)[i] = ds_f32_to_f16((float)v);
}
static double load(const void *p, ds_dtype dt, int64_t i) { return ds_load_real(p, dt, i); }

static double silu_d(double g) { return g / (1.0 + exp(-g)); }

/* ---------------------------------------------------------------- cases */

typedef struct {
    const char *name;
    int64_t T, H, I, E, K;
    int P;
    int ids_mode;  /* 0 random distinct, 1 all on expert 0 (K=1), 2 skip expert E-1 */
    int lv_mode;   /* 0 none (full), 1 random levels */
} mcase;

static const mcase cases[] = {
    {"T=0", 0, 16, 8, 4, 2, 1, 0, 0},
    {"T=1", 1, 64, 48, 8, 2, 1, 0, 0},
    {"K=1", 9, 40, 24, 5, 1, 1, 0, 1},
    {"K=E", 7, 33, 20, 4, 4, 2, 0, 1},
    {"one expert", 13, 48, 32, 6, 1, 1, 1, 0},
    {"empty expert", 21, 37, 29, 6, 3, 2, 2, 1},
    {"odd sizes P=2", 17, 67, 77, 7, 3, 2, 0, 1},
    {"odd I P=4", 19, 53, 131, 5, 2, 4, 0, 1},
    {"many rows", 150, 96, 160, 4, 2, 2, 0, 1},
    {"long K", 5, 1100, 40, 3, 2, 3, 0, 1},
    /* blocks of 32-128 rows with K over one K block (the AVX2 block GEMM),
     * row counts that leave partial panels, weight groups that leave a tail,
     * and experts of over 128 rows (split into even blocks) with levels */
    {"many rows long K", 200, 1100, 24, 2, 1, 1, 0, 0},
    {"many rows full", 160, 40, 600, 2, 1, 3, 0, 0},
    {"rows over 128", 420, 75, 40, 2, 1, 2, 0, 1},
    /* 390 rows on one expert: blocks of 98, 98, 98 and 96 rows (panels of 12
     * rows: 9, 9, 9, 8) that take the GEMM's weight copies in turn, over two
     * K blocks */
    {"GEMM blocks on kept weights", 390, 1100, 40, 2, 1, 1, 1, 0},
    /* dot tiles (about 20 rows per expert) over two K blocks that are both
     * multiples of 8, so that the second adds to the first: the AVX2 tiles'
     * four-at-a-time reduction with accumulation */
    {"tiles two K blocks", 40, 2112, 48, 4, 2, 2, 0, 1},
    /* up to three rows per expert (the GEMV-shaped rows kernel) with whole
     * rows of 1-2 KiB (one at a time) and prefixes under them (four at a
     * time); every dtype runs both, the sizes are chosen for one: float32
     * gate/up rows of 1536 bytes, down rows of 2000, prefixes of 1000;
     * 16-bit down rows of 1400, gate/up of 1200, prefixes of 700 */
    {"GEMV rows 1-2 KiB, float32 sizes", 3, 384, 500, 4, 2, 2, 0, 1},
    {"GEMV rows 1-2 KiB, 16-bit sizes", 3, 600, 700, 4, 2, 2, 0, 1},
    /* K over the AMX GEMM's K block of 4096 (the second block adds to the
     * first): gate/up rows of 4200, and down prefixes of up to 4200 */
    {"K over 4096, gate/up", 40, 4200, 24, 2, 1, 1, 0, 0},
    {"K over 4096, down", 24, 40, 4200, 2, 1, 2, 0, 1},
};

typedef struct {
    int64_t E, I, H;
    ds_dtype dt;
    void *gu;   /* E x 2I x H */
    void *dn;   /* E x H x I */
    void *gate[64], *up[64], *down[64];
    ds_experts w;
} weights;

static void make_weights(weights *W, int64_t E, int64_t I, int64_t H, ds_dtype dt)
{
    size_t esz = ds_dtype_size(dt);
    W->E = E; W->I = I; W->H = H; W->dt = dt;
    W->gu = malloc((size_t)(E * 2 * I * H) * esz);
    W->dn = malloc((size_t)(E * H * I) * esz);
    double sg = 1.0 / sqrt((double)H), sd = 1.0 / sqrt((double)I);
    for (int64_t i = 0; i < E * 2 * I * H; i++) store(W->gu, dt, i, sg * rng_normal());
    for (int64_t i = 0; i < E * H * I; i++) store(W->dn, dt, i, sd * rng_normal());
    for (int64_t e = 0; e < E; e++) {
        W->gate[e] = (char *)W->gu + (size_t)(e * 2 * I * H) * esz;
        W->up[e] = (char *)W->gate[e] + (size_t)(I * H) * esz;
        W->down[e] = (char *)W->dn + (size_t)(e * H * I) * esz;
    }
    W->w.E = E; W->w.I = I; W->w.H = H; W->w.dtype = dt;
    W->w.gate = W->gate; W->w.up = W->up; W->w.down = W->down;
    W->w.ld_gu = H; W->w.ld_down = I;
    W->w.down_parts = 0;
}

static void free_weights(weights *W) { free(W->gu); free(W->dn); }

/* float64 reference of moe_experts, reading the stored (rounded) values;
 * for 16-bit types the activation is rounded like the engine stores it. */
static void ref_moe(const weights *W, const mcase *c, const void *x, const int32_t *ids,
                    const float *tw, const int8_t *lv, double *out)
{
    const int64_t H = W->H, I = W->I;
    double *act = malloc((size_t)I * sizeof(double));
    for (int64_t t = 0; t < c->T; t++) {
        for (int64_t h = 0; h < H; h++) out[t * H + h] = 0;
        for (int64_t k = 0; k < c->K; k++) {
            int l = lv ? lv[t * c->K + k] : c->P;
            int64_t n = (l * I) / c->P, e = ids[t * c->K + k];
            if (n == 0) continue;
            for (int64_t j = 0; j < n; j++) {
                double a = 0, b = 0;
                for (int64_t h = 0; h < H; h++) {
                    double xv = load(x, W->dt, t * H + h);
                    a += xv * load(W->gate[e], W->dt, j * H + h);
                    b += xv * load(W->up[e], W->dt, j * H + h);
                }
                act[j] = silu_d(a) * b;
            }
            for (int64_t h = 0; h < H; h++) {
                double y = 0;
                for (int64_t j = 0; j < n; j++)
                    y += act[j] * load(W->down[e], W->dt, h * I + j);
                out[t * H + h] += (double)tw[t * c->K + k] * y;
            }
        }
    }
    free(act);
}

static void make_routing(const mcase *c, int64_t E, int32_t *ids, float *tw, int8_t *lv)
{
    for (int64_t t = 0; t < c->T; t++) {
        int used[64] = {0};
        for (int64_t k = 0; k < c->K; k++) {
            int64_t e;
            if (c->ids_mode == 1) e = 0;
            else {
                int64_t range = c->ids_mode == 2 ? E - 1 : E;
                do { e = (int64_t)(rng_u64() % (uint64_t)range); } while (used[e] && c->K <= range);
            }
            used[e] = 1;
            ids[t * c->K + k] = (int32_t)e;
            tw[t * c->K + k] = (float)(0.05 + rng_unif());
            lv[t * c->K + k] = (int8_t)(rng_u64() % (uint64_t)(c->P + 1));
        }
    }
}

static double tol_for(ds_dtype dt) { return dt == DS_F32 ? 2e-5 : dt == DS_BF16 ? 2e-2 : 4e-3; }

/* The arguments of a ds_moe_experts call on case c (its levels where it
 * has them). */
static ds_moe_args moe_args(const mcase *c, const void *x, const int32_t *ids, const float *tw,
                            const int8_t *lv, void *out)
{
    ds_moe_args a;
    memset(&a, 0, sizeof a);
    a.T = c->T; a.K = c->K; a.P = c->P; a.x = x; a.ldx = c->H;
    a.topk_ids = (ds_mat){ids, DS_I32, c->K, 1};
    a.topk_weights = (ds_mat){tw, DS_F32, c->K, 1};
    a.levels = (ds_mat){c->lv_mode ? lv : NULL, DS_I8, c->K, 1};
    a.out = out; a.ldo = c->H;
    return a;
}

/* The arguments of a ds_importance_accumulate call on the first T tokens of
 * case c. */
static ds_importance_args importance_args(const mcase *c, int64_t T, const void *x, const int32_t *ids,
                                          const float *tw, double *accum)
{
    ds_importance_args ia;
    memset(&ia, 0, sizeof ia);
    ia.T = T; ia.K = c->K; ia.x = x; ia.ldx = c->H;
    ia.topk_ids = (ds_mat){ids, DS_I32, c->K, 1};
    ia.topk_weights = (ds_mat){tw, DS_F32, c->K, 1};
    ia.accum = accum;
    return ia;
}

/* One ds_moe_experts call on case c with `threads` threads; returns the
 * output (T*H values of the weights' dtype, malloc'ed, prefilled with 0xff). */
static void *run_engine(const mcase *c, const ds_experts *w, const void *x, const int32_t *ids,
                        const float *tw, const int8_t *lv, int threads, const char *level,
                        const char *what)
{
    const size_t esz = ds_dtype_size(w->dtype), n = (size_t)(c->T * c->H + 1) * esz;
    void *out = malloc(n);
    memset(out, 0xff, n);
    ds_moe_args a = moe_args(c, x, ids, tw, lv, out);
    size_t ws = ds_moe_workspace_size(w, &a, threads);
    void *wsp = malloc(ws);
    ds_status st = ds_moe_experts(w, &a, wsp, ws, threads);
    CHECK(st == DS_OK, "%s %s %s%s: status %d (%s)", c->name, ds_dtype_name(w->dtype), level, what, st,
          ds_last_error());
    free(wsp);
    return out;
}

static void run_moe_case(const mcase *c, ds_dtype dt, const char *level)
{
    weights W;
    make_weights(&W, c->E, c->I, c->H, dt);
    size_t esz = ds_dtype_size(dt);
    int64_t TK = c->T * c->K, TH = c->T * c->H;
    void *x = malloc((size_t)(TH + 1) * esz);
    for (int64_t i = 0; i < TH; i++) store(x, dt, i, rng_normal());
    int32_t *ids = malloc((size_t)(TK + 1) * 4);
    float *tw = malloc((size_t)(TK + 1) * 4);
    int8_t *lv = malloc((size_t)(TK + 1));
    make_routing(c, c->E, ids, tw, lv);
    double *ref = malloc((size_t)(TH + 1) * sizeof(double));
    ref_moe(&W, c, x, ids, tw, c->lv_mode ? lv : NULL, ref);

    void *outs[3];
    for (int r = 0; r < 3; r++)
        outs[r] = run_engine(c, &W.w, x, ids, tw, lv, r + 1, level, "");
    double scale = 0;
    for (int64_t i = 0; i < TH; i++) scale = fmax(scale, fabs(ref[i]));
    double maxerr = 0;
    for (int64_t i = 0; i < TH; i++) maxerr = fmax(maxerr, fabs(load(outs[0], dt, i) - ref[i]));
    CHECK(maxerr <= tol_for(dt) * fmax(scale, 1e-3), "%s %s %s: max error %.3g (scale %.3g)",
          c->name, ds_dtype_name(dt), level, maxerr, scale);
    CHECK(memcmp(outs[0], outs[1], (size_t)TH * esz) == 0 && memcmp(outs[0], outs[2], (size_t)TH * esz) == 0,
          "%s %s %s: results differ across thread counts", c->name, ds_dtype_name(dt), level);
    /* down in D column blocks (down_parts): D = P (each level reads whole
     * blocks), and D that puts partition ends inside blocks; blocks of
     * unequal widths where D does not divide I.  Within the tolerance of the
     * same reference, and the same bits for 1 and 2 threads. */
    const int64_t Ds[3] = {c->P, 2, 3};
    for (int di = 0; di < 3; di++) {
        const int64_t D = Ds[di];
        if (D < 2 || D > c->I || (di > 0 && D == c->P))
            continue;
        char *pd = malloc((size_t)(c->E * c->H * c->I) * esz + 1);
        void *pdown[64];
        for (int64_t e = 0; e < c->E; e++) {
            char *dst = pd + (size_t)(e * c->H * c->I) * esz;
            const char *src = (const char *)W.down[e];
            pdown[e] = dst;
            for (int64_t b = 0; b < D; b++) {
                const int64_t lo = b * c->I / D, hi = (b + 1) * c->I / D;
                for (int64_t h = 0; h < c->H; h++)
                    memcpy(dst + (size_t)(c->H * lo + h * (hi - lo)) * esz,
                           src + (size_t)(h * c->I + lo) * esz, (size_t)(hi - lo) * esz);
            }
        }
        ds_experts wp = W.w;
        wp.down = pdown;
        wp.down_parts = D;
        wp.ld_down = c->I;
        void *po[2];
        for (int r = 0; r < 2; r++)
            po[r] = run_engine(c, &wp, x, ids, tw, lv, r + 1, level, " down in blocks");
        double perr = 0;
        for (int64_t i = 0; i < TH; i++) perr = fmax(perr, fabs(load(po[0], dt, i) - ref[i]));
        CHECK(perr <= tol_for(dt) * fmax(scale, 1e-3), "%s %s %s down in %lld blocks: max error %.3g (scale %.3g)",
              c->name, ds_dtype_name(dt), level, (long long)D, perr, scale);
        CHECK(memcmp(po[0], po[1], (size_t)TH * esz) == 0,
              "%s %s %s down in %lld blocks: results differ across thread counts", c->name,
              ds_dtype_name(dt), level, (long long)D);
        free(po[0]); free(po[1]); free(pd);
    }
    for (int r = 0; r < 3; r++) free(outs[r]);
    free(x); free(ids); free(tw); free(lv); free(ref);
    free_weights(&W);
}

static void test_moe_all_levels(void)
{
    ds_simd_level best = ds_simd_detected();
    for (int l = 0; l <= (int)best; l++) {
        if (!ds_simd_compiled((ds_simd_level)l)) continue;
        CHECK(ds_simd_set((ds_simd_level)l) == DS_OK, "set level %d", l);
        const ds_dtype dts[3] = {DS_F32, DS_BF16, DS_F16};
        for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
            for (int d = 0; d < 3; d++)
                run_moe_case(&cases[i], dts[d], ds_simd_name((ds_simd_level)l));
        /* the GEMV-shaped kernel's other rule for weight rows (one at a
         * time or four at a time: the CPU's vendor picks one), on the cases
         * of few rows per expert */
        const int rule = ds_rows_four_rule();
        ds_rows_four_set(!rule);
        CHECK(ds_rows_four_rule() == !rule, "rows rule set to %d", !rule);
        for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
            if (cases[i].T * cases[i].K <= 4 * cases[i].E)
                for (int d = 0; d < 3; d++)
                    run_moe_case(&cases[i], dts[d], ds_simd_name((ds_simd_level)l));
        ds_rows_four_set(-1);
        CHECK(ds_rows_four_rule() == rule, "rows rule restored to the CPU's");
    }
    ds_simd_set(best);
}

/* Two calls on one workspace and one x buffer whose contents change in
 * between (a model's layers do this): the block GEMMs may keep a copy of x
 * rows keyed by their addresses, which the engine must not trust across
 * calls or phases.  The second call gives the bits of a call on a fresh
 * workspace, at every level, 1 and 2 threads. */
static void test_x_rewritten(void)
{
    ds_simd_level best = ds_simd_detected();
    const mcase *c = &cases[8]; /* "many rows": 75 rows per expert, P = 2 */
    const ds_dtype dts[2] = {DS_BF16, DS_F32};
    for (int l = 0; l <= (int)best; l++) {
        if (!ds_simd_compiled((ds_simd_level)l) || ds_simd_set((ds_simd_level)l) != DS_OK)
            continue;
        for (int d = 0; d < 2; d++) {
            const ds_dtype dt = dts[d];
            const size_t esz = ds_dtype_size(dt);
            weights W;
            make_weights(&W, c->E, c->I, c->H, dt);
            const int64_t TK = c->T * c->K, TH = c->T * c->H;
            int32_t *ids = malloc((size_t)TK * 4);
            float *tw = malloc((size_t)TK * 4);
            int8_t *lv = malloc((size_t)TK);
            make_routing(c, c->E, ids, tw, lv);
            void *x = malloc((size_t)TH * esz), *out = malloc((size_t)TH * esz);
            for (int threads = 1; threads <= 2; threads++) {
                ds_moe_args a = moe_args(c, x, ids, tw, lv, out);
                const size_t ws = ds_moe_workspace_size(&W.w, &a, threads);
                void *wsp = malloc(ws);
                ds_status st = DS_OK;
                for (int round = 0; round < 2 && st == DS_OK; round++) {
                    for (int64_t i = 0; i < TH; i++)
                        store(x, dt, i, rng_normal());
                    st = ds_moe_experts(&W.w, &a, wsp, ws, threads);
                }
                CHECK(st == DS_OK, "x rewritten %s %s: status %d (%s)", ds_simd_name((ds_simd_level)l),
                      ds_dtype_name(dt), st, ds_last_error());
                /* the reference reads a copy of x at another address,
                 * which no key can name */
                void *xc = malloc((size_t)TH * esz);
                memcpy(xc, x, (size_t)TH * esz);
                void *fresh = run_engine(c, &W.w, xc, ids, tw, lv, threads, ds_simd_name((ds_simd_level)l),
                                         " x rewritten");
                CHECK(memcmp(out, fresh, (size_t)TH * esz) == 0,
                      "x rewritten %s %s, %d thread(s): the second call on one workspace gives the bits of "
                      "a fresh call", ds_simd_name((ds_simd_level)l), ds_dtype_name(dt), threads);
                free(fresh); free(wsp);
                /* importance (phase 1 only), the first 50 tokens, every
                 * pair on expert 0: one block of 100 rows, so the second
                 * call's first block has the rows the first call's last
                 * block had */
                for (int64_t i = 0; i < TK; i++)
                    ids[i] = 0;
                double *acc[2];
                for (int r = 0; r < 2; r++) {
                    acc[r] = calloc((size_t)(4 * c->E * c->I), sizeof(double));
                    ds_importance_args ia = importance_args(c, 50, r == 0 ? x : xc, ids, tw, acc[r]);
                    const size_t iws = ds_importance_workspace_size(&W.w, &ia, threads);
                    void *iwsp = malloc(iws);
                    st = DS_OK;
                    /* r = 0: x rewritten between two calls on one
                     * workspace; r = 1: a fresh workspace on a copy of the
                     * last x */
                    for (int round = 0; round < 2 - r && st == DS_OK; round++) {
                        for (int64_t i = 0; r == 0 && i < TH; i++)
                            store(x, dt, i, rng_normal());
                        memset(acc[r], 0, (size_t)(4 * c->E * c->I) * sizeof(double));
                        st = ds_importance_accumulate(&W.w, &ia, iwsp, iws, threads);
                    }
                    CHECK(st == DS_OK, "x rewritten importance: %s", ds_last_error());
                    free(iwsp);
                    if (r == 0)
                        memcpy(xc, x, (size_t)TH * esz);
                }
                CHECK(memcmp(acc[0], acc[1], (size_t)(4 * c->E * c->I) * sizeof(double)) == 0,
                      "x rewritten %s %s, %d thread(s): importance on one workspace gives the bits of a fresh "
                      "call", ds_simd_name((ds_simd_level)l), ds_dtype_name(dt), threads);
                free(acc[0]); free(acc[1]); free(xc);
                make_routing(c, c->E, ids, tw, lv);
            }
            free(x); free(out); free(ids); free(tw); free(lv);
            free_weights(&W);
        }
    }
    ds_simd_set(best);
}

/* The same for weights: an expert of 200 rows (two blocks of 100 on a
 * block GEMM) takes the GEMM's copy of its weight rows for both blocks,
 * keyed by their addresses.  Importance (one gate/up item: 100 neurons)
 * called twice on one workspace, the weights rewritten in place in
 * between, gives the bits of a call on a copy of the weights at other
 * addresses; so does moe_experts. */
static void test_weights_rewritten(void)
{
    ds_simd_level best = ds_simd_detected();
    const mcase c = {"kept weights", 200, 300, 100, 1, 1, 1, 1, 0};
    const ds_dtype dts[2] = {DS_BF16, DS_F32};
    for (int l = 0; l <= (int)best; l++) {
        if (!ds_simd_compiled((ds_simd_level)l) || ds_simd_set((ds_simd_level)l) != DS_OK)
            continue;
        for (int d = 0; d < 2; d++) {
            const ds_dtype dt = dts[d];
            const size_t esz = ds_dtype_size(dt);
            weights W;
            make_weights(&W, c.E, c.I, c.H, dt);
            const int64_t TK = c.T * c.K, TH = c.T * c.H;
            int32_t *ids = malloc((size_t)TK * 4);
            float *tw = malloc((size_t)TK * 4);
            int8_t *lv = malloc((size_t)TK);
            make_routing(&c, c.E, ids, tw, lv);
            void *x = malloc((size_t)TH * esz), *out = malloc((size_t)TH * esz);
            for (int64_t i = 0; i < TH; i++)
                store(x, dt, i, rng_normal());
            const int64_t ngu = 2 * c.I * c.H, ndn = c.H * c.I;
            weights Wc;
            make_weights(&Wc, c.E, c.I, c.H, dt);
            for (int threads = 1; threads <= 2; threads++) {
                /* importance: r = 0 twice on one workspace, weights
                 * rewritten before each call; r = 1 once on a fresh one */
                double *acc[2];
                ds_status st = DS_OK;
                for (int r = 0; r < 2; r++) {
                    acc[r] = calloc((size_t)(4 * c.E * c.I), sizeof(double));
                    ds_importance_args ia = importance_args(&c, c.T, x, ids, tw, acc[r]);
                    const size_t iws = ds_importance_workspace_size(&W.w, &ia, threads);
                    void *iwsp = malloc(iws);
                    for (int round = 0; round < 2 - r && st == DS_OK; round++) {
                        for (int64_t i = 0; r == 0 && i < ngu; i++)
                            store(W.gu, dt, i, rng_normal() / sqrt((double)c.H));
                        memset(acc[r], 0, (size_t)(4 * c.E * c.I) * sizeof(double));
                        st = ds_importance_accumulate(r == 0 ? &W.w : &Wc.w, &ia, iwsp, iws, threads);
                    }
                    free(iwsp);
                    /* the fresh call reads a copy of the weights at other
                     * addresses, which no key can name */
                    if (r == 0) {
                        memcpy(Wc.gu, W.gu, (size_t)ngu * esz);
                        memcpy(Wc.dn, W.dn, (size_t)ndn * esz);
                    }
                }
                CHECK(st == DS_OK, "weights rewritten importance: %s", ds_last_error());
                CHECK(memcmp(acc[0], acc[1], (size_t)(4 * c.E * c.I) * sizeof(double)) == 0,
                      "weights rewritten %s %s, %d thread(s): importance on one workspace gives the bits "
                      "of a fresh call", ds_simd_name((ds_simd_level)l), ds_dtype_name(dt), threads);
                free(acc[0]); free(acc[1]);
                /* moe_experts: two calls on one workspace, all weights
                 * rewritten in between, against a fresh workspace */
                ds_moe_args a = moe_args(&c, x, ids, tw, NULL, out);
                const size_t ws = ds_moe_workspace_size(&W.w, &a, threads);
                void *wsp = malloc(ws);
                for (int round = 0; round < 2 && st == DS_OK; round++) {
                    for (int64_t i = 0; i < ngu; i++)
                        store(W.gu, dt, i, rng_normal() / sqrt((double)c.H));
                    for (int64_t i = 0; i < ndn; i++)
                        store(W.dn, dt, i, rng_normal() / sqrt((double)c.I));
                    st = ds_moe_experts(&W.w, &a, wsp, ws, threads);
                }
                CHECK(st == DS_OK, "weights rewritten %s %s: status %d (%s)", ds_simd_name((ds_simd_level)l),
                      ds_dtype_name(dt), st, ds_last_error());
                memcpy(Wc.gu, W.gu, (size_t)ngu * esz);
                memcpy(Wc.dn, W.dn, (size_t)ndn * esz);
                void *fresh = run_engine(&c, &Wc.w, x, ids, tw, NULL, threads, ds_simd_name((ds_simd_level)l),
                                         " weights rewritten");
                CHECK(memcmp(out, fresh, (size_t)TH * esz) == 0,
                      "weights rewritten %s %s, %d thread(s): the second call on one workspace gives the "
                      "bits of a fresh call", ds_simd_name((ds_simd_level)l), ds_dtype_name(dt), threads);
                free(fresh); free(wsp);
            }
            free(x); free(out); free(ids); free(tw); free(lv);
            free_weights(&W);
            free_weights(&Wc);
        }
    }
    ds_simd_set(best);
}

/* The tiles that take x rows copied once per block (float32, bfloat16
 * widened to float32, or bfloat16 as it is for the BF16 dot product:
 * kernels' dotw + widen): the same bits as the tile that reads x in
 * place, and within rounding of a float64 reference, for every tile shape,
 * K with and without a tail, with and without accumulation, copied rows
 * packed and with a padded stride. */
static void test_widened_tiles(void)
{
    ds_simd_level best = ds_simd_detected();
    const int64_t Ks[4] = {8, 75, 256, 1088};
    const ds_dtype dts[2] = {DS_BF16, DS_F32};
    for (int l = 0; l <= (int)best; l++) {
        if (!ds_simd_compiled((ds_simd_level)l) || ds_simd_set((ds_simd_level)l) != DS_OK)
            continue;
        for (int d = 0; d < 2; d++) {
            const ds_dtype dt = dts[d];
            const ds_kernels *kn = ds_kernels_get(dt);
            if (kn == NULL || kn->dotw == NULL)
                continue;
            const size_t esz = ds_dtype_size(dt);
            for (int ki = 0; ki < 8; ki++) {
                const int64_t K = Ks[ki % 4], ldd = ki < 4 ? K : K + 13;
                char *xb = malloc((size_t)(DS_MAX_MR * K) * esz), *wb = malloc((size_t)(DS_MAX_NR * K) * esz);
                float *xf = malloc((size_t)(DS_MAX_MR * ldd) * sizeof(float));
                for (int64_t i = 0; i < DS_MAX_MR * K; i++)
                    store(xb, dt, i, rng_normal());
                for (int64_t i = 0; i < DS_MAX_NR * K; i++)
                    store(wb, dt, i, rng_normal());
                const void *xr[DS_MAX_MR], *wr[DS_MAX_NR], *xw[DS_MAX_MR];
                for (int i = 0; i < DS_MAX_MR; i++)
                    xr[i] = xb + (size_t)(i * K) * esz;
                for (int j = 0; j < DS_MAX_NR; j++)
                    wr[j] = wb + (size_t)(j * K) * esz;
                kn->widen(DS_MAX_MR, xr, K, xf, ldd);
                const size_t xesz = kn->xw_esz ? (size_t)kn->xw_esz : sizeof(float);
                for (int i = 0; i < DS_MAX_MR; i++)
                    xw[i] = (const char *)xf + (size_t)(i * ldd) * xesz;
                int same = 1, close = 1;
                for (int mr = 1; mr <= DS_MAX_MR; mr++)
                    for (int nr = 1; nr <= DS_MAX_NR; nr++)
                        for (int acc = 0; acc < 2; acc++) {
                            float c1[DS_MAX_MR * DS_MAX_NR], c2[DS_MAX_MR * DS_MAX_NR];
                            for (int q = 0; q < DS_MAX_MR * DS_MAX_NR; q++)
                                c1[q] = c2[q] = acc ? (float)q : -1.0f;
                            kn->dot(mr, nr, xr, wr, K, c1, DS_MAX_NR, acc, NULL);
                            kn->dotw(mr, nr, xw, wr, K, c2, DS_MAX_NR, acc, NULL);
                            for (int i = 0; i < mr; i++)
                                for (int j = 0; j < nr; j++) {
                                    const int q = i * DS_MAX_NR + j;
                                    if (memcmp(&c1[q], &c2[q], sizeof(float)) != 0)
                                        same = 0;
                                    double ref = acc ? (double)q : 0.0, mag = 0.0;
                                    for (int64_t k = 0; k < K; k++) {
                                        double p = load(xb, dt, i * K + k) * load(wb, dt, j * K + k);
                                        ref += p;
                                        mag += fabs(p);
                                    }
                                    if (fabs((double)c2[q] - ref) > 1e-5 * (mag + fabs(ref)) + 1e-6)
                                        close = 0;
                                }
                        }
                CHECK(same, "%s %s dotw: same bits as dot (K=%lld, ldd=%lld)",
                      ds_simd_name((ds_simd_level)l), ds_dtype_name(dt), (long long)K, (long long)ldd);
                CHECK(close, "%s %s dotw: matches float64 (K=%lld, ldd=%lld)",
                      ds_simd_name((ds_simd_level)l), ds_dtype_name(dt), (long long)K, (long long)ldd);
                free(xb); free(wb); free(xf);
            }
        }
    }
    ds_simd_set(best);
}

/* A block GEMM (kernels' gemm) against a float64 reference, and, where
 * same is given, bitwise against it: every row count 1-128 that matters
 * (the engine gives block GEMMs blocks of gemm_rows-128 rows), weight groups
 * with and without a tail, rows evenly spaced, interleaved from two
 * matrices or out of order, K up to the kernel's K block with and without a
 * vector tail (odd K too),
 * with and without accumulation into c with a padded stride; rows and
 * columns outside the block untouched. */
static void check_gemm(const char *what, ds_gemm_fn fn, ds_gemm_fn same, ds_dtype dt, int64_t kmax)
{
    const int64_t mbs[] = {1, 5, 8, 9, 16, 17, 24, 31, 32, 33, 36, 40, 48, 56, 64, 72, 100, 127, 128};
    const int64_t nws[] = {1, 6, 7, 16, 29, 33, 64};
    /* up to kmax, the kernel's K block; beyond 512 for a few shapes only */
    const int64_t Ks[] = {8, 75, 256, 333, 512, 1000, 4096};
    const size_t esz = ds_dtype_size(dt);
    float *pack = malloc(DS_GEMM_PACK_FLOATS * sizeof(float));
    for (size_t ki = 0; ki < sizeof Ks / sizeof Ks[0]; ki++)
        for (size_t mi = 0; mi < sizeof mbs / sizeof mbs[0]; mi++)
            for (size_t ni = 0; ni < sizeof nws / sizeof nws[0] && Ks[ki] <= kmax; ni++) {
                const int64_t K = Ks[ki], mb = mbs[mi], nw = nws[ni], ldc = nw + 3;
                if (K > 512 && !((mb == 8 || mb == 17 || mb == 33 || mb == 128) && (nw == 33 || nw == 64)))
                    continue;
                /* rows of x and w at a stride of K + 5 elements: not contiguous */
                char *xb = malloc((size_t)(mb * (K + 5)) * esz), *wb = malloc((size_t)(nw * (K + 5)) * esz);
                for (int64_t i = 0; i < mb * (K + 5); i++)
                    store(xb, dt, i, rng_normal());
                for (int64_t i = 0; i < nw * (K + 5); i++)
                    store(wb, dt, i, rng_normal());
                const void **xr = malloc((size_t)mb * sizeof(void *));
                const void **wr = malloc((size_t)nw * sizeof(void *));
                for (int64_t i = 0; i < mb; i++)
                    xr[i] = xb + (size_t)(i * (K + 5)) * esz;
                /* weight rows evenly spaced, two matrices interleaved (gate
                 * and up rows, as the engine passes them), or out of order */
                const int layout = (int)((mi + ni + ki) % 3);
                const int64_t half = (nw + 1) / 2;
                for (int64_t j = 0; j < nw; j++) {
                    const int64_t r = layout == 0 ? j : layout == 1 ? (j % 2) * half + j / 2 : (j * 5 + 3) % nw;
                    wr[j] = wb + (size_t)(r * (K + 5)) * esz;
                }
                float *c1 = malloc((size_t)((mb + 1) * ldc) * sizeof(float));
                float *c2 = malloc((size_t)((mb + 1) * ldc) * sizeof(float));
                for (int acc = 0; acc < 2; acc++) {
                    for (int64_t q = 0; q < (mb + 1) * ldc; q++)
                        c1[q] = c2[q] = acc ? (float)(q % 17) - 8.0f : -1.5f;
                    /* new x rows: their keys cleared, as the engine does
                     * before each phase; the second pass (acc = 1) calls
                     * again on the same rows, unchanged, where a GEMM may
                     * reuse the copy it keyed */
                    if (acc == 0)
                        ds_gemm_forget(pack);
                    if (same != NULL)
                        same(mb, nw, xr, wr, K, c1, ldc, acc, pack);
                    fn(mb, nw, xr, wr, K, c2, ldc, acc, pack);
                    int bits = same == NULL || memcmp(c1, c2, (size_t)((mb + 1) * ldc) * sizeof(float)) == 0;
                    int close = 1, kept = 1;
                    for (int64_t i = 0; i <= mb; i++)
                        for (int64_t j = 0; j < ldc; j++) {
                            const int64_t q = i * ldc + j;
                            const float init = acc ? (float)(q % 17) - 8.0f : -1.5f;
                            if (i == mb || j >= nw) {
                                if (c2[q] != init)
                                    kept = 0;
                                continue;
                            }
                            double ref = acc ? (double)init : 0.0, mag = fabs(ref);
                            for (int64_t k = 0; k < K; k++) {
                                const double pr = load(xr[i], dt, k) * load(wr[j], dt, k);
                                ref += pr;
                                mag += fabs(pr);
                            }
                            if (fabs((double)c2[q] - ref) > 1e-6 * mag + 1e-7)
                                close = 0;
                        }
                    CHECK(bits, "%s: the bits of the packed GEMM (mb=%lld nw=%lld K=%lld acc=%d layout=%d)", what,
                          (long long)mb, (long long)nw, (long long)K, acc, layout);
                    CHECK(close, "%s: matches float64 (mb=%lld nw=%lld K=%lld acc=%d layout=%d)", what,
                          (long long)mb, (long long)nw, (long long)K, acc, layout);
                    CHECK(kept, "%s: writes only its block (mb=%lld nw=%lld K=%lld acc=%d layout=%d)", what,
                          (long long)mb, (long long)nw, (long long)K, acc, layout);
                }
                free(xb); free(wb); free(xr); free(wr); free(c1); free(c2);
            }
    free(pack);
}

/* The AVX2 level's two block GEMMs (weights packed, weights read in place),
 * which its gemm chooses between by row count: the same bits, and float64;
 * the AMX level's bfloat16 GEMM against float64. */
static void test_block_gemms(void)
{
    if (ds_simd_compiled(DS_SIMD_AVX2) && ds_simd_detected() >= DS_SIMD_AVX2) {
        const ds_dtype dts[2] = {DS_F32, DS_BF16};
        for (int d = 0; d < 2; d++) {
            ds_gemm_fn packed, in_place;
            ds_gemm_avx2_variants(dts[d], &packed, &in_place);
            CHECK(packed != NULL && in_place != NULL, "avx2 %s: both block GEMMs present", ds_dtype_name(dts[d]));
            if (packed == NULL || in_place == NULL)
                continue;
            char what[64];
            snprintf(what, sizeof what, "avx2 %s in-place GEMM", ds_dtype_name(dts[d]));
            check_gemm(what, in_place, packed, dts[d], DS_GEMM_KMAX);
        }
    } else {
        printf("skip: AVX2 block GEMMs (AVX2 not compiled or not on this CPU)\n");
    }
    if (ds_simd_compiled(DS_SIMD_AVX512) && ds_simd_detected() >= DS_SIMD_AVX512) {
        const ds_dtype dts[3] = {DS_F32, DS_BF16, DS_F16};
        for (int d = 0; d < 3; d++) {
            const ds_kernels *kn = ds_kernels_avx512(dts[d]);
            CHECK(kn != NULL && kn->gemm != NULL, "avx512: a %s block GEMM", ds_dtype_name(dts[d]));
            if (kn == NULL || kn->gemm == NULL)
                continue;
            /* float64 up to its K block; the bits of the AVX2 packed GEMM
             * (the same FMA chain per output) up to that one's */
            char what[64];
            snprintf(what, sizeof what, "avx512 %s GEMM", ds_dtype_name(dts[d]));
            check_gemm(what, kn->gemm, NULL, dts[d], kn->gemm_kmax ? kn->gemm_kmax : DS_GEMM_KMAX);
            ds_gemm_fn packed = NULL, in_place = NULL;
            ds_gemm_avx2_variants(dts[d], &packed, &in_place);
            snprintf(what, sizeof what, "avx512 %s GEMM against AVX2's", ds_dtype_name(dts[d]));
            if (packed != NULL && ds_simd_detected() >= DS_SIMD_AVX2)
                check_gemm(what, kn->gemm, packed, dts[d], DS_GEMM_KMAX);
        }
    } else {
        printf("skip: AVX-512 block GEMM (AVX-512 not compiled or not on this CPU)\n");
    }
    if (ds_simd_compiled(DS_SIMD_AMX_BF16) && ds_simd_detected() >= DS_SIMD_AMX_BF16) {
        const ds_kernels *kn = ds_kernels_amx_bf16(DS_BF16);
        CHECK(kn != NULL && kn->gemm != NULL, "amx_bf16: a bfloat16 block GEMM");
        if (kn != NULL && kn->gemm != NULL)
            check_gemm("amx_bf16 GEMM", kn->gemm, NULL, DS_BF16, kn->gemm_kmax ? kn->gemm_kmax : DS_GEMM_KMAX);
    } else {
        printf("skip: AMX block GEMM (not compiled, or no AMX usable on this CPU and OS)\n");
    }
}

/* ------------------------------------------------------------ errors */

static void test_moe_errors(void)
{
    weights W;
    make_weights(&W, 4, 8, 16, DS_F32);
    float x[3 * 16], out[3 * 16], tw[6] = {1, 1, 1, 1, 1, 1};
    int32_t ids[6] = {0, 1, 2, 3, 1, 2};
    int8_t lv[6] = {1, 1, 1, 1, 1, 1};
    for (int i = 0; i < 48; i++) { x[i] = 1; out[i] = 42.0f; }
    ds_moe_args a;
    memset(&a, 0, sizeof a);
    a.T = 3; a.K = 2; a.P = 1; a.x = x; a.ldx = 16; a.out = out; a.ldo = 16;
    a.topk_ids = (ds_mat){ids, DS_I32, 2, 1};
    a.topk_weights = (ds_mat){tw, DS_F32, 2, 1};
    a.levels = (ds_mat){lv, DS_I8, 2, 1};
    size_t ws = ds_moe_workspace_size(&W.w, &a, 2);
    void *wsp = malloc(ws);

    ids[3] = 4;
    ds_status st = ds_moe_experts(&W.w, &a, wsp, ws, 2);
    CHECK(st == DS_ERR_VALUE && strstr(ds_last_error(), "topk_ids[1, 1] = 4"), "id out of range: %s", ds_last_error());
    ids[3] = -1;
    st = ds_moe_experts(&W.w, &a, wsp, ws, 2);
    CHECK(st == DS_ERR_VALUE && strstr(ds_last_error(), "= -1"), "negative id: %s", ds_last_error());
    ids[3] = 3;
    lv[5] = 2;
    st = ds_moe_experts(&W.w, &a, wsp, ws, 2);
    CHECK(st == DS_ERR_VALUE && strstr(ds_last_error(), "levels[2, 1] = 2"), "level out of range: %s", ds_last_error());
    lv[5] = 1;
    int untouched = 1;
    for (int i = 0; i < 48; i++) untouched &= out[i] == 42.0f;
    CHECK(untouched, "out written before validation finished");
    a.K = 5;
    st = ds_moe_experts(&W.w, &a, wsp, ws, 2);
    CHECK(st == DS_ERR_SHAPE && strstr(ds_last_error(), "K must be <= E"), "K > E: %s", ds_last_error());
    a.K = 2;
    a.P = 9;
    st = ds_moe_experts(&W.w, &a, wsp, ws, 2);
    CHECK(st == DS_ERR_VALUE && strstr(ds_last_error(), "num_partitions"), "P > I: %s", ds_last_error());
    a.P = 1;
    W.w.down_parts = 9; /* more blocks than I = 8 columns */
    st = ds_moe_experts(&W.w, &a, wsp, ws, 2);
    CHECK(st == DS_ERR_VALUE && strstr(ds_last_error(), "down_parts must be in [0, min(127, I=8)]; got 9"),
          "down_parts > I: %s", ds_last_error());
    W.w.down_parts = -1;
    st = ds_moe_experts(&W.w, &a, wsp, ws, 2);
    CHECK(st == DS_ERR_VALUE && strstr(ds_last_error(), "got -1"), "down_parts < 0: %s", ds_last_error());
    W.w.down_parts = 2;
    {
        int64_t perm[4 * 8];
        for (int i = 0; i < 32; i++) perm[i] = i % 8;
        size_t pws = ds_permute_workspace_size(&W.w, 1);
        void *pw = malloc(pws);
        st = ds_permute_neurons(&W.w, perm, 0, pw, pws, 1);
        CHECK(st == DS_ERR_UNSUPPORTED && strstr(ds_last_error(), "2 column blocks"),
              "permute with down in blocks: %s", ds_last_error());
        free(pw);
    }
    W.w.down_parts = 0;
    st = ds_moe_experts(&W.w, &a, wsp, 10, 2);
    CHECK(st == DS_ERR_VALUE && strstr(ds_last_error(), "workspace"), "small workspace: %s", ds_last_error());
    st = ds_moe_experts(&W.w, &a, wsp, ws, 0);
    CHECK(st == DS_ERR_VALUE && strstr(ds_last_error(), "num_threads"), "0 threads: %s", ds_last_error());
    a.topk_ids.dtype = DS_F32;
    st = ds_moe_experts(&W.w, &a, wsp, ws, 1);
    CHECK(st == DS_ERR_TYPE && strstr(ds_last_error(), "topk_ids must be int32 or int64"), "ids dtype: %s", ds_last_error());
    a.topk_ids.dtype = DS_I32;
    st = ds_moe_experts(&W.w, &a, wsp, ws, 1);
    CHECK(st == DS_OK, "valid call after errors: %s", ds_last_error());
    free(wsp);
    free_weights(&W);
}

/* ------------------------------------------------------------ routing */

static void test_route_levels(void)
{
    /* exact boundaries: 0.25 / 1.0 = 0.25 exactly */
    float w[2 * 4] = {0.25f, 0.5f, 0.125f, 0.125f, 0.0f, 3.0f, 1.0f, 0.0f};
    double thr[2] = {0.125, 0.25};
    int8_t lv[8];
    ds_status st = ds_route_levels(w, DS_F32, 2, 4, 4, 1, thr, 2, 1, lv, DS_I8, 4, 1);
    CHECK(st == DS_OK, "route ok: %s", ds_last_error());
    int8_t want[8] = {2, 2, 1, 1, 0, 2, 2, 0};
    CHECK(memcmp(lv, want, 8) == 0, "route boundaries: got %d %d %d %d %d %d %d %d", lv[0], lv[1], lv[2], lv[3], lv[4], lv[5], lv[6], lv[7]);
    /* unnormalised, int32 output with a transposed (strided) input */
    float wt[4 * 2] = {0.2f, 0.0f, 0.1f, 0.3f, 0.05f, 0.4f, 0.3f, 0.2f};
    int32_t l32[8];
    st = ds_route_levels(wt, DS_F32, 2, 4, 1, 2, thr, 2, 0, l32, DS_I32, 4, 1);
    CHECK(st == DS_OK, "route strided: %s", ds_last_error());
    int32_t want2[8] = {1, 0, 0, 2, 0, 2, 2, 1};
    CHECK(memcmp(l32, want2, sizeof want2) == 0, "route strided values");
    /* random check against a direct double computation, bf16 input */
    uint16_t wb[50 * 6];
    int8_t lb[50 * 6];
    double t3[3] = {0.05, 0.1, 0.2};
    for (int i = 0; i < 300; i++) wb[i] = ds_f32_to_bf16((float)rng_unif());
    wb[0] = ds_f32_to_bf16(0.5f);
    st = ds_route_levels(wb, DS_BF16, 50, 6, 6, 1, t3, 3, 1, lb, DS_I8, 6, 1);
    int ok = st == DS_OK;
    for (int t = 0; t < 50 && ok; t++) {
        double s = 0;
        for (int k = 0; k < 6; k++) s += ds_bf16_to_f32(wb[t * 6 + k]);
        for (int k = 0; k < 6; k++) {
            double v = ds_bf16_to_f32(wb[t * 6 + k]) / s;
            int l = (v >= 0.05) + (v >= 0.1) + (v >= 0.2);
            ok &= l == lb[t * 6 + k];
        }
    }
    CHECK(ok, "route bf16 random");
    /* errors */
    double bad[2] = {0.3, 0.2};
    st = ds_route_levels(w, DS_F32, 2, 4, 4, 1, bad, 2, 1, lv, DS_I8, 4, 1);
    CHECK(st == DS_ERR_VALUE && strstr(ds_last_error(), "ascending"), "unsorted: %s", ds_last_error());
    double nan_t[1] = {NAN};
    st = ds_route_levels(w, DS_F32, 2, 4, 4, 1, nan_t, 1, 1, lv, DS_I8, 4, 1);
    CHECK(st == DS_ERR_VALUE && strstr(ds_last_error(), "not finite"), "nan threshold: %s", ds_last_error());
    float zero[4] = {0, 0, 0, 0};
    memset(lv, 7, sizeof lv);
    st = ds_route_levels(zero, DS_F32, 1, 4, 4, 1, thr, 2, 1, lv, DS_I8, 4, 1);
    CHECK(st == DS_ERR_VALUE && strstr(ds_last_error(), "sums to 0") && lv[0] == 7, "zero row: %s", ds_last_error());
    float inf_w[4] = {1, INFINITY, 0, 0};
    st = ds_route_levels(inf_w, DS_F32, 1, 4, 4, 1, thr, 2, 1, lv, DS_I8, 4, 1);
    CHECK(st == DS_ERR_VALUE && strstr(ds_last_error(), "topk_weights[0, 1]"), "inf weight: %s", ds_last_error());
    /* float64 rows whose plain sum overflows: scores are still w / sum */
    double big[6] = {1e308, 1e308, 1.5e308, 0.5e308, 1.0, 3.0};
    double t3b[3] = {0.25, 0.5, 0.7};
    int8_t lbig[6];
    st = ds_route_levels(big, DS_F64, 3, 2, 2, 1, t3b, 3, 1, lbig, DS_I8, 2, 1);
    const int8_t want_big[6] = {2, 2, 3, 1, 1, 3};
    CHECK(st == DS_OK && memcmp(lbig, want_big, 6) == 0, "overflowing row sums: %s; got %d %d %d %d %d %d",
          ds_last_error(), lbig[0], lbig[1], lbig[2], lbig[3], lbig[4], lbig[5]);
    double cancel[2] = {1e308, -1e308};
    st = ds_route_levels(cancel, DS_F64, 1, 2, 2, 1, t3b, 3, 1, lbig, DS_I8, 2, 1);
    CHECK(st == DS_ERR_VALUE && strstr(ds_last_error(), "sums to 0"), "cancelling huge row: %s", ds_last_error());
}

/* ------------------------------------------------------------ importance */

static void test_importance(void)
{
    const int64_t E = 5, I = 37, H = 45, T = 23, K = 2;
    for (int d = 0; d < 2; d++) {
        ds_dtype dt = d == 0 ? DS_F32 : DS_BF16;
        weights W;
        make_weights(&W, E, I, H, dt);
        void *x = malloc((size_t)(T * H) * ds_dtype_size(dt));
        for (int64_t i = 0; i < T * H; i++) store(x, dt, i, rng_normal());
        int64_t ids[T * K];
        float tw[T * K];
        for (int64_t i = 0; i < T * K; i++) {
            ids[i] = (int64_t)(rng_u64() % (uint64_t)(E - 1)); /* expert E-1 unused */
            tw[i] = (float)rng_unif();
        }
        for (int weighted = 0; weighted < 2; weighted++) {
            double *acc[2], cnt[2][E];
            for (int r = 0; r < 2; r++) {
                acc[r] = calloc((size_t)(4 * E * I), sizeof(double));
                memset(cnt[r], 0, sizeof cnt[r]);
                ds_importance_args a;
                memset(&a, 0, sizeof a);
                a.T = T; a.K = K; a.x = x; a.ldx = H;
                a.topk_ids = (ds_mat){ids, DS_I64, K, 1};
                a.topk_weights = (ds_mat){tw, DS_F32, K, 1};
                a.weighted = weighted; a.accum = acc[r]; a.counts = cnt[r];
                int nt = r == 0 ? 1 : 2;
                size_t ws = ds_importance_workspace_size(&W.w, &a, nt);
                void *wsp = malloc(ws);
                /* two streaming calls: accumulate twice */
                ds_status st = ds_importance_accumulate(&W.w, &a, wsp, ws, nt);
                st |= ds_importance_accumulate(&W.w, &a, wsp, ws, nt);
                CHECK(st == DS_OK, "importance status: %s", ds_last_error());
                free(wsp);
            }
            double maxrel = 0;
            double rc[E];
            memset(rc, 0, sizeof rc);
            for (int64_t e = 0; e < E; e++)
                for (int64_t j = 0; j < I; j++) {
                    double ref[4] = {0, 0, 0, 0};
                    for (int64_t p = 0; p < T * K; p++) {
                        if (ids[p] != e) continue;
                        int64_t t = p / K;
                        double a = 0, b = 0;
                        for (int64_t h = 0; h < H; h++) {
                            double xv = load(x, dt, t * H + h);
                            a += xv * load(W.gate[e], dt, j * H + h);
                            b += xv * load(W.up[e], dt, j * H + h);
                        }
                        double c = weighted ? tw[p] : 1.0, s = silu_d(a);
                        ref[0] += c * s; ref[1] += c * fabs(s); ref[2] += c * s * b; ref[3] += c * fabs(s * b);
                        if (j == 0) rc[e] += c;
                    }
                    for (int m = 0; m < 4; m++) {
                        double got = acc[0][(m * E + e) * I + j] / 2.0;
                        double err = fabs(got - ref[m]) / fmax(1.0, fabs(ref[m]));
                        maxrel = fmax(maxrel, err);
                    }
                }
            CHECK(maxrel < (dt == DS_F32 ? 1e-4 : 2e-2), "importance %s weighted=%d: max rel err %.3g", ds_dtype_name(dt), weighted, maxrel);
            CHECK(memcmp(acc[0], acc[1], (size_t)(4 * E * I) * sizeof(double)) == 0, "importance thread invariance");
            int cok = 1;
            for (int64_t e = 0; e < E; e++) cok &= fabs(cnt[0][e] / 2.0 - rc[e]) < 1e-9;
            CHECK(cok && cnt[0][E - 1] == 0, "importance counts");
            free(acc[0]); free(acc[1]);
        }
        free(x);
        free_weights(&W);
    }
}

/* ------------------------------------------------------------ permutation */

static void test_permutation(void)
{
    const int64_t E = 3, I = 11, H = 7;
    double imp[E * I];
    for (int64_t i = 0; i < E * I; i++) imp[i] = (double)(rng_u64() % 5); /* many ties */
    int64_t perm[E * I];
    CHECK(ds_importance_order(imp, E, I, perm) == DS_OK, "order ok");
    int ok = 1;
    for (int64_t e = 0; e < E; e++)
        for (int64_t j = 1; j < I; j++) {
            double a = imp[e * I + perm[e * I + j - 1]], b = imp[e * I + perm[e * I + j]];
            ok &= a > b || (a == b && perm[e * I + j - 1] < perm[e * I + j]);
        }
    CHECK(ok, "order is descending and stable");
    CHECK(ds_check_permutation(perm, E, I) == DS_OK, "order is a permutation");
    imp[4] = NAN;
    CHECK(ds_importance_order(imp, E, I, perm) == DS_ERR_VALUE && strstr(ds_last_error(), "importance[0, 4]"), "nan importance: %s", ds_last_error());

    for (int d = 0; d < 2; d++) {
        ds_dtype dt = d == 0 ? DS_F32 : DS_BF16;
        size_t esz = ds_dtype_size(dt);
        weights W;
        make_weights(&W, E, I, H, dt);
        size_t gbytes = (size_t)(E * 2 * I * H) * esz, dbytes = (size_t)(E * H * I) * esz;
        void *g0 = malloc(gbytes), *d0 = malloc(dbytes);
        memcpy(g0, W.gu, gbytes);
        memcpy(d0, W.dn, dbytes);
        size_t ws = ds_permute_workspace_size(&W.w, 2);
        void *wsp = malloc(ws);
        CHECK(ds_permute_neurons(&W.w, perm, 0, wsp, ws, 2) == DS_OK, "permute: %s", ds_last_error());
        int same = 1;
        for (int64_t e = 0; e < E; e++)
            for (int64_t j = 0; j < I; j++) {
                int64_t s = perm[e * I + j];
                same &= memcmp((char *)W.gate[e] + j * H * esz, (char *)g0 + (e * 2 * I + s) * H * esz, H * esz) == 0;
                same &= memcmp((char *)W.up[e] + j * H * esz, (char *)g0 + (e * 2 * I + I + s) * H * esz, H * esz) == 0;
                for (int64_t h = 0; h < H; h++)
                    same &= memcmp((char *)W.down[e] + (h * I + j) * esz, (char *)d0 + ((e * H + h) * I + s) * esz, esz) == 0;
            }
        CHECK(same, "permute moves rows and columns together (%s)", ds_dtype_name(dt));
        CHECK(ds_permute_neurons(&W.w, perm, 1, wsp, ws, 1) == DS_OK, "inverse permute");
        CHECK(memcmp(W.gu, g0, gbytes) == 0 && memcmp(W.dn, d0, dbytes) == 0, "inverse restores (%s)", ds_dtype_name(dt));
        int64_t bad[E * I];
        memcpy(bad, perm, sizeof bad);
        bad[I + 3] = bad[I + 4];
        CHECK(ds_permute_neurons(&W.w, bad, 0, wsp, ws, 2) == DS_ERR_VALUE && strstr(ds_last_error(), "appears twice"), "duplicate: %s", ds_last_error());
        bad[I + 3] = I;
        CHECK(ds_permute_neurons(&W.w, bad, 0, wsp, ws, 2) == DS_ERR_VALUE && strstr(ds_last_error(), "outside"), "range: %s", ds_last_error());
        CHECK(memcmp(W.gu, g0, gbytes) == 0 && memcmp(W.dn, d0, dbytes) == 0, "rejected permutation leaves weights untouched");
        free(wsp); free(g0); free(d0);
        free_weights(&W);
    }
}

/* ------------------------------------------------------------ conversions */

static void test_conversions(void)
{
    int ok = 1;
    for (uint32_t h = 0; h < 65536; h++) {
        float f = ds_f16_to_f32((uint16_t)h);
        uint16_t back = ds_f32_to_f16(f);
        if (isnan(f)) ok &= (back & 0x7c00) == 0x7c00 && (back & 0x3ff) != 0;
        else ok &= back == h;
    }
    CHECK(ok, "every float16 round-trips through float32");
    CHECK(ds_f32_to_f16(65520.0f) == 0x7c00 && ds_f32_to_f16(65519.0f) == 0x7bff, "f16 overflow rounding");
    CHECK(ds_f32_to_f16(2.9802322e-08f) == 0x0000 && ds_f32_to_f16(2.9802326e-08f * 1.5f) == 0x0001, "f16 smallest subnormal rounding");
    CHECK(ds_f32_to_bf16(1.00390625f) == 0x3f80 && ds_f32_to_bf16(1.01171875f) == 0x3f82, "bf16 ties to even");
    CHECK((ds_f32_to_bf16(NAN) & 0x7fc0) == 0x7fc0, "bf16 NaN stays NaN");
}

static void test_parallel_for_errors(void)
{
    CHECK(ds_parallel_for(0, 10, NULL, NULL) == DS_ERR_VALUE, "0 threads rejected");
    CHECK(ds_parallel_for(ds_max_threads() + 1, 10, NULL, NULL) == DS_ERR_VALUE, "too many threads rejected");
}

int main(void)
{
    printf("simd level detected: %s\n", ds_simd_name(ds_simd_detected()));
    test_conversions();
    test_route_levels();
    test_moe_errors();
    test_moe_all_levels();
    test_widened_tiles();
    test_block_gemms();
    test_x_rewritten();
    test_weights_rewritten();
    test_importance();
    test_permutation();
    test_parallel_for_errors();
    printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail == 0 ? 0 : 1;
}
