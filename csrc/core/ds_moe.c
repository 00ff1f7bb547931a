/* Expert computation with prefix partitions, and neuron importance.
 *
 * A routing plan first: every (token, slot) pair with level > 0 becomes a
 * row; rows are grouped by expert and, inside an expert, ordered by level
 * (highest first, then token order), so the rows that need partition q form
 * a prefix of the expert's rows.  Then three parallel phases:
 *   1. gate/up: for (expert, neuron chunk) items, the fused SwiGLU
 *      activations A[row, neuron] of the rows whose prefix covers the chunk;
 *   2. down:    for (expert, hidden chunk) items, Y[row, h] = A[row, :n] .
 *      down[e][h, :n] with n the row's prefix length, summed in segments
 *      that end where a level's prefix ends (each read once by all the rows
 *      that reach it) and block by block where down is stored in column
 *      blocks (ds_experts.down_parts);
 *      partitions narrower than DS_SEG_MIN neurons are too small for that:
 *      there gate/up covers every partition some row needs for all the
 *      expert's rows (one item range, not one per level), and each level's
 *      rows sum down over their own prefix (measured on the built-in
 *      models' 40- and 160-neuron experts: 2T-Drop at 10% went from 1.07-
 *      1.17x the time of no drop to 0.96-1.01x; benchmarks/README.md);
 *   3. combine: for token blocks, out[t] = sum_k w[t,k] * Y[row(t,k)] in k
 *      order.
 * An expert of more rows than one block, all of them on a block GEMM that
 * keeps its weight copies (AVX-512), takes its blocks K block by K block
 * (each block's sums in the same order as block by block), so that
 * consecutive GEMM calls name the same weight rows and the GEMM's copy of
 * them serves every block (ds_gemm_reuse_w).
 * Each item writes a region no other item touches and the split into items
 * depends only on the problem, so any thread count gives the same bits. */
#include "ds_internal.h"

#include <time.h>

#define NC 128   /* neurons per phase-1 item */
#define HC 128   /* hidden rows per phase-2 item */
#define MB 64    /* rows per block inside an item (tiles) */
#define TB 8     /* tokens per combine item */
/* partitions of fewer neurons than this: one gate/up range, down per level
 * (0 at build time: segments everywhere, for benchmarks/bench_partitions.py) */
#ifndef DS_SEG_MIN
#define DS_SEG_MIN 64
#endif
/* an expert's blocks of rows K block by K block on the GEMM's kept weight
 * copies (0 at build time: block by block, for the before/after in
 * benchmarks/README.md) */
#ifndef DS_GEMM_KEEP_W
#define DS_GEMM_KEEP_W 1
#endif

_Static_assert(MB <= DS_GEMM_MAX_ROWS, "a block of rows must fit the GEMM's panels");

/* Rows per block: MB for the tiles; up to DS_GEMM_MAX_ROWS where the level
 * has a block GEMM, split evenly (130 rows: 65 + 65, not 128 + 2, since
 * every block reads the item's weights once more), unless the even blocks
 * would fall below the GEMM's rows while full ones would not (AVX-512
 * float32, whose GEMM starts at 96 rows: 140 rows as 128 on the GEMM and 12
 * on the tiles, not 70 + 70 on the tiles). */
static int64_t block_rows(const ds_kernels *kn, int64_t m)
{
    if (kn->gemm == NULL || m <= MB)
        return MB;
    const int64_t nb = (m + DS_GEMM_MAX_ROWS - 1) / DS_GEMM_MAX_ROWS;
    const int64_t even = (m + nb - 1) / nb;
    if (nb > 1 && even < kn->gemm_rows)
        return DS_GEMM_MAX_ROWS;
    return even;
}

typedef struct {
    int64_t e, q, j0, j1; /* q = 0: importance (all rows, no levels) */
} item1_t;

typedef struct {
    int64_t e, h0, h1;
} item2_t;

typedef struct {
    const ds_experts *w;
    const ds_kernels *kern; /* &kern_copy */
    ds_kernels kern_copy;   /* the level's kernels, without gemm when it is switched off */
    int rows_four;          /* DS_ROWS_FOUR where the rows kernel takes every row four at a time */
    int64_t T, K, P;
    const void *x;
    int64_t ldx;
    /* plan */
    int64_t R;
    int64_t *row_tok;   /* R: token of each row */
    int64_t *row_pair;  /* R: t*K + k of each row */
    int64_t *pos;       /* T*K: row of each pair, -1 when dropped */
    int64_t *e_row0;    /* E+1 */
    int64_t *e_m;       /* E*(P+2): rows of e with level >= q, e_m[.., P+1] = 0 */
    item1_t *items1;
    int64_t n1;
    item2_t *items2;
    int64_t n2;
    /* buffers */
    char *A;            /* R x I activations, dtype of the weights */
    size_t act_esz;
    float *Y;           /* R x H */
    float *scratch;     /* per thread */
    int64_t scratch_len;
    int64_t s_rows;     /* rows S holds (at least DS_GEMM_MAX_ROWS) */
    float *pack;        /* per thread: DS_GEMM_PACK_FLOATS */
    const float **cmb_rows; /* per thread: K row pointers for the combine */
    float *cmb_w;           /* per thread: K weights */
    /* moe outputs */
    const ds_moe_args *a;
    /* importance */
    const ds_importance_args *imp;
} moe_ctx;

/* The level's kernels for this call, without the block GEMM when it is
 * switched off (read once, so that a call never mixes paths). */
static void use_kernels(moe_ctx *c, const ds_kernels *kern)
{
    c->kern_copy = *kern;
    if (!ds_block_gemm_enabled())
        c->kern_copy.gemm = NULL;
    c->rows_four = ds_rows_four_rule() ? DS_ROWS_FOUR : 0;
    c->kern = &c->kern_copy;
}

static int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

/* K block for a block of mb rows (whole K for up to three rows, which run the
 * GEMV-shaped kernel; the level's own block for its block GEMM).  Two
 * limits: a weight group and a row
 * tile of the kernel (10 rows x kc) must stay in L1 (48 KiB; a 4x6 bf16 tile
 * loses half its speed beyond about 2560), and the block's rows (mb x kc)
 * in L2.  K is split into equal blocks (multiples of 64) so that no block is
 * a short remainder: every block pays one reduction per output, and short
 * blocks pay it more often. */
#define L1_TILE_BUDGET (40 * 1024)
#define L2_BUDGET (384 * 1024)
static int uses_gemm(const ds_kernels *kn, int64_t mb)
{
    return kn->gemm != NULL && mb >= kn->gemm_rows && mb <= DS_GEMM_MAX_ROWS;
}

static int64_t k_block(const ds_kernels *kn, int64_t mb, size_t esz, int64_t K)
{
    if (mb <= 3 && !uses_gemm(kn, mb))
        return K; /* GEMV-shaped: each weight row read once, as one stream */
    int64_t kmax;
    if (uses_gemm(kn, mb)) {
        kmax = kn->gemm_kmax ? kn->gemm_kmax : DS_GEMM_KMAX; /* a packed weight group in L1, the x panels in L2 */
    } else {
        kmax = L1_TILE_BUDGET / ((int64_t)(DS_MAX_MR + 6) * (int64_t)esz);
        int64_t k2 = L2_BUDGET / (mb * (int64_t)esz);
        if (k2 < kmax)
            kmax = k2;
        kmax = kmax < 256 ? 256 : kmax & ~(int64_t)63;
    }
    if (K <= kmax)
        return K;
    int64_t nblocks = (K + kmax - 1) / kmax;
    int64_t kc = (K + nblocks - 1) / nblocks;
    return (kc + 63) & ~(int64_t)63;
}

static double now_seconds(void)
{
    struct timespec ts;
    timespec_get(&ts, TIME_UTC);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* rows of one expert whose gate/up outputs S holds at once (1024: 1 MiB per thread) */
#define S_ROWS_MAX 1024

/* ---- validation ---------------------------------------------------------- */

static ds_status check_experts(const char *fn, const ds_experts *w)
{
    if (w == NULL)
        return ds_error(DS_ERR_VALUE, "%s: experts descriptor is NULL", fn);
    if (w->E < 1 || w->I < 1 || w->H < 1)
        return ds_error(DS_ERR_SHAPE, "%s: experts need E, I, H >= 1; got E=%lld I=%lld H=%lld",
                        fn, (long long)w->E, (long long)w->I, (long long)w->H);
    if (!ds_is_real(w->dtype))
        return ds_error(DS_ERR_TYPE, "%s: weights must be float32, bfloat16 or float16; got %s",
                        fn, ds_dtype_name(w->dtype));
    if (w->down_parts < 0 || w->down_parts > 127 || w->down_parts > w->I)
        return ds_error(DS_ERR_VALUE, "%s: down_parts must be in [0, min(127, I=%lld)]; got %lld", fn,
                        (long long)w->I, (long long)w->down_parts);
    if (w->ld_gu < w->H || w->ld_down < w->I)
        return ds_error(DS_ERR_SHAPE, "%s: weight row strides too small (ld_gu=%lld < H=%lld or "
                        "ld_down=%lld < I=%lld)", fn, (long long)w->ld_gu, (long long)w->H,
                        (long long)w->ld_down, (long long)w->I);
    if (w->gate == NULL || w->up == NULL || w->down == NULL)
        return ds_error(DS_ERR_VALUE, "%s: weight pointer tables are NULL", fn);
    for (int64_t e = 0; e < w->E; e++)
        if (w->gate[e] == NULL || w->up[e] == NULL || w->down[e] == NULL)
            return ds_error(DS_ERR_VALUE, "%s: weights of expert %lld are NULL", fn, (long long)e);
    return DS_OK;
}

static ds_status check_ids(const char *fn, const ds_mat *ids, int64_t T, int64_t K, int64_t E)
{
    if (ids->dtype != DS_I32 && ids->dtype != DS_I64)
        return ds_error(DS_ERR_TYPE, "%s: topk_ids must be int32 or int64; got %s", fn,
                        ds_dtype_name(ids->dtype));
    if (T > 0 && ids->data == NULL)
        return ds_error(DS_ERR_VALUE, "%s: topk_ids is NULL", fn);
    for (int64_t t = 0; t < T; t++)
        for (int64_t k = 0; k < K; k++) {
            int64_t v = ds_load_int(ids->data, ids->dtype, t * ids->s0 + k * ids->s1);
            if (v < 0 || v >= E)
                return ds_error(DS_ERR_VALUE,
                                "%s: topk_ids[%lld, %lld] = %lld is outside [0, %lld) (E = %lld experts)",
                                fn, (long long)t, (long long)k, (long long)v, (long long)E,
                                (long long)E);
        }
    return DS_OK;
}

/* ---- plan ---------------------------------------------------------------- */

/* Rows grouped by expert, levels descending, pairs in (t, k) order inside a
 * level; cnt is E*P scratch. */
static void build_plan(moe_ctx *c, const ds_mat *ids, const ds_mat *levels, int64_t *cnt)
{
    const int64_t E = c->w->E, P = c->P, T = c->T, K = c->K;
    memset(cnt, 0, (size_t)(E * P) * sizeof *cnt);
    for (int64_t t = 0; t < T; t++)
        for (int64_t k = 0; k < K; k++) {
            int64_t e = ds_load_int(ids->data, ids->dtype, t * ids->s0 + k * ids->s1);
            int64_t l = levels && levels->data
                            ? ds_load_int(levels->data, levels->dtype, t * levels->s0 + k * levels->s1)
                            : P;
            if (l > 0)
                cnt[e * P + (P - l)]++;
        }
    /* e_m[e][q] = rows of e with level >= q */
    int64_t total = 0;
    for (int64_t e = 0; e < E; e++) {
        c->e_row0[e] = total;
        int64_t *m = c->e_m + e * (P + 2);
        m[P + 1] = 0;
        for (int64_t q = P; q >= 1; q--)
            m[q] = m[q + 1] + cnt[e * P + (P - q)];
        m[0] = m[1];
        for (int64_t key = e * P; key < (e + 1) * P; key++) {
            int64_t n = cnt[key];
            cnt[key] = total;
            total += n;
        }
    }
    c->e_row0[E] = total;
    c->R = total;
    for (int64_t t = 0; t < T; t++)
        for (int64_t k = 0; k < K; k++) {
            int64_t e = ds_load_int(ids->data, ids->dtype, t * ids->s0 + k * ids->s1);
            int64_t l = levels && levels->data
                            ? ds_load_int(levels->data, levels->dtype, t * levels->s0 + k * levels->s1)
                            : P;
            if (l > 0) {
                int64_t r = cnt[e * P + (P - l)]++;
                c->row_tok[r] = t;
                c->row_pair[r] = t * K + k;
                c->pos[t * K + k] = r;
            } else {
                c->pos[t * K + k] = -1;
            }
        }
}

/* Neuron chunks never straddle a boundary between partitions with different
 * row counts, so every chunk has one row count: the rows whose level reaches
 * its partition.  Consecutive partitions that the same rows need are merged
 * into one range, so an expert with no partial rows is computed exactly as
 * with num_partitions = 1 (2T-Drop with equal thresholds is bitwise 1T-Drop).
 * Narrow partitions (I / P < DS_SEG_MIN) are merged as long as any row needs
 * the next one, and the range runs for the rows of its first partition: the
 * rows of lower levels get activations they never read, which costs less
 * than one more item per level at these sizes. */
static void build_items1(moe_ctx *c, int importance)
{
    const ds_experts *w = c->w;
    const int64_t P = importance ? 1 : c->P;
    const int narrow = w->I / P < DS_SEG_MIN;
    int64_t n = 0;
    for (int64_t e = 0; e < w->E; e++) {
        const int64_t *m = c->e_m + e * (c->P + 2);
        for (int64_t q = 1; q <= P;) {
            int64_t q1 = q;
            while (q1 < P && (m[q1 + 1] == m[q] || (narrow && m[q1 + 1] > 0)))
                q1++;
            const int64_t lo = ((q - 1) * w->I) / P, hi = (q1 * w->I) / P;
            if (m[q] > 0)
                for (int64_t j = lo; j < hi; j += NC) {
                    item1_t *it = &c->items1[n++];
                    it->e = e;
                    it->q = importance ? 0 : q;
                    it->j0 = j;
                    it->j1 = j + NC < hi ? j + NC : hi;
                }
            q = q1 + 1;
        }
    }
    c->n1 = n;
}

static void build_items2(moe_ctx *c)
{
    const ds_experts *w = c->w;
    int64_t n = 0;
    for (int64_t e = 0; e < w->E; e++) {
        if (c->e_row0[e + 1] == c->e_row0[e])
            continue;
        for (int64_t h = 0; h < w->H; h += HC) {
            item2_t *it = &c->items2[n++];
            it->e = e;
            it->h0 = h;
            it->h1 = h + HC < w->H ? h + HC : w->H;
        }
    }
    c->n2 = n;
}

/* ---- phase 1: fused gate/up ---------------------------------------------- */

/* Rows [0, mb) of x (row pointers xrow(i)) against the weight rows
 * wrow(0 .. nw): c[i*ldc + q] (+)= x_i . w_q over K, tiled for the kernel.
 * Every weight group of the tile width is used by all row tiles before the
 * next group. */
typedef struct {
    const ds_kernels *kn;
    const void *const *xr;   /* mb row pointers, at k0 */
    int64_t mb;
    const void *const *wr;   /* nw row pointers, at k0 */
    int64_t nw;
    int64_t K;
    float *c;
    int64_t ldc;
    int accumulate;
    float *pack;             /* the thread's panel buffer for kn->gemm */
    int whole;               /* DS_ROWS_WHOLE: K is the weight matrix's whole row length; DS_ROWS_FOUR */
} tile_job;

/* The tiles copy a block's x rows into the pack (the old 256 KiB area) */
#define TILE_COPY_BYTES ((32 * 2048 + 16) * 4)
_Static_assert(TILE_COPY_BYTES <= DS_GEMM_PACK_USED * 4, "the tiles' copies of x must fit DS_GEMM_PACK_USED");

/* Before each phase: the keys of x and weight copies that block GEMMs left
 * in the threads' packs no longer vouch for them (the rows' contents may
 * differ from the last call's, at the same addresses). */
static void forget_x(moe_ctx *c, int n_threads)
{
    for (int t = 0; t < n_threads; t++) {
        ds_gemm_forget(c->pack + (int64_t)t * DS_GEMM_PACK_FLOATS);
        ds_gemm_reuse_w(c->pack + (int64_t)t * DS_GEMM_PACK_FLOATS, 0);
    }
}

static void run_tiles(const tile_job *j)
{
    const ds_kernels *kn = j->kn;
    /* Up to three rows (decode, and most experts at small batch sizes): the
     * weight rows one after another, each a single long stream that the
     * hardware prefetcher follows.  From four rows on, the GEMV shape runs
     * out of issue slots (measured: 4 rows x 1 weight row streams at half
     * the speed of 4 x 6 tiles), so tiles take over.  A level whose block
     * GEMM starts below four rows (AMX: from one) takes them there. */
    if (j->mb <= 3 && !uses_gemm(kn, j->mb)) {
        kn->rows((int)j->mb, j->nw, j->xr, j->wr, j->K, j->c, j->ldc, j->accumulate, j->whole);
        return;
    }
    /* Many rows, where the level has one: a block GEMM. */
    if (uses_gemm(kn, j->mb)) {
        kn->gemm(j->mb, j->nw, j->xr, j->wr, j->K, j->c, j->ldc, j->accumulate, j->pack);
        return;
    }
    /* More rows: full tiles; row tile i prefetches share i of the next
     * weight group while the current one is in use. */
    const int mr = kn->mr, nr = kn->nr;
    const int n_row_tiles = (int)cdiv(j->mb, mr);
    /* The block's x rows copied once into the thread's pack area (float32,
     * or bfloat16 widened, or bfloat16 as it is for the BF16 dot product),
     * where the level has tiles for that: the same bits as the tiles that read
     * them in place (and widen them again for each weight group); blocks
     * beyond the pack area keep those. */
    const void *const *xr = j->xr;
    ds_dot_tile_fn dot = kn->dot;
    const void *xw[MB];
    const int64_t xesz = kn->xw_esz ? kn->xw_esz : 4;
    if (kn->dotw != NULL && j->mb <= MB && j->mb * j->K * xesz <= TILE_COPY_BYTES) {
        ds_gemm_forget(j->pack); /* a gemm's copy of x overwritten */
        kn->widen(j->mb, j->xr, j->K, j->pack, j->K);
        for (int64_t i = 0; i < j->mb; i++)
            xw[i] = (const char *)j->pack + i * j->K * xesz;
        xr = xw;
        dot = kn->dotw;
    }
    for (int64_t q = 0; q < j->nw; q += nr) {
        const int nq = (int)(j->nw - q < nr ? j->nw - q : nr);
        const void *next[DS_MAX_NR];
        ds_prefetch pf = {next, 0, n_row_tiles};
        const int64_t nn = j->nw - (q + nr) < nr ? j->nw - (q + nr) : nr;
        for (int jj = 0; nn > 0 && jj < nq; jj++)
            next[jj] = j->wr[q + nr + (jj < nn ? jj : nn - 1)];
        for (int64_t i = 0; i < j->mb; i += mr) {
            const int ni = (int)(j->mb - i < mr ? j->mb - i : mr);
            pf.part = (int)(i / mr);
            dot(ni, nq, xr + i, j->wr + q, j->K, j->c + i * j->ldc + q, j->ldc, j->accumulate,
                nn > 0 ? &pf : NULL);
        }
    }
}

/* The activations (or importance sums) of rows [r0, r1) of an item from S. */
static void gate_up_epilogue(moe_ctx *c, const item1_t *it, const float *S, int64_t ldS,
                             int64_t r0, int64_t r1)
{
    const ds_experts *w = c->w;
    const int64_t e = it->e, j0 = it->j0, nj = it->j1 - it->j0, row0 = c->e_row0[e];
    if (c->imp) {
        const ds_importance_args *ia = c->imp;
        for (int64_t i = r0; i < r1; i++) {
            double cw = 1.0;
            if (ia->weighted) {
                int64_t pr = c->row_pair[row0 + i];
                int64_t t = pr / c->K, k = pr % c->K;
                cw = ds_load_real(ia->topk_weights.data, ia->topk_weights.dtype,
                                  t * ia->topk_weights.s0 + k * ia->topk_weights.s1);
            }
            ds_importance_epilogue(S + (i - r0) * ldS, nj, cw, ia->accum + e * w->I + j0, w->E * w->I);
        }
    } else {
        for (int64_t i = r0; i < r1; i++)
            c->kern->act(S + (i - r0) * ldS, nj, c->A + ((row0 + i) * w->I + j0) * (int64_t)c->act_esz);
    }
}

/* Whether an expert's m rows, in blocks of bm, are more than one block and
 * all run a block GEMM that keeps its weight copies (their K blocks then do
 * not depend on the rows, so the blocks can take each K block in turn, on
 * the weights the GEMM copied for the first of them).  GEMMs that keep no
 * copies stay block by block (the AVX2 GEMMs measured 0.97-0.99x the
 * other way round). */
static int gemm_blocks(const ds_kernels *kn, int64_t m, int64_t bm)
{
    const int64_t last = m - (m - 1) / bm * bm;
    return DS_GEMM_KEEP_W && kn->gemm_keeps_w && m > bm && uses_gemm(kn, bm) && uses_gemm(kn, last);
}

static void gate_up_item(void *vctx, int64_t item, int tid)
{
    moe_ctx *c = (moe_ctx *)vctx;
    const ds_experts *w = c->w;
    const item1_t *it = &c->items1[item];
    const int64_t e = it->e, j0 = it->j0, nj = it->j1 - it->j0;
    const int64_t row0 = c->e_row0[e];
    const int64_t m = it->q ? c->e_m[e * (c->P + 2) + it->q] : c->e_row0[e + 1] - row0;
    const size_t esz = ds_dtype_size(w->dtype);
    const int64_t H = w->H, ldS = 2 * NC;
    float *S = c->scratch + (int64_t)tid * c->scratch_len;
    float *pack = c->pack + (int64_t)tid * DS_GEMM_PACK_FLOATS;
    const char *gate = (const char *)w->gate[e], *up = (const char *)w->up[e];
    const void *xr[DS_GEMM_MAX_ROWS], *wr[2 * NC];
    const int64_t bm = block_rows(c->kern, m);
    /* K blocks outermost where every block of rows runs the GEMM and S holds
     * all the rows: the blocks then follow one another on the same weight
     * rows, which the GEMM copies once (same products and sums per output) */
    const int kouter = gemm_blocks(c->kern, m, bm) && m <= c->s_rows;
    const int64_t nrb = kouter ? cdiv(m, bm) : 1;

    for (int64_t rb0 = 0; rb0 < m; rb0 += nrb * bm) {
        const int64_t mb0 = m - rb0 < bm ? m - rb0 : bm;
        const int64_t kc = k_block(c->kern, mb0, esz, H);
        for (int64_t k0 = 0; k0 < H; k0 += kc) {
            /* weight rows interleaved (gate j, up j, ...) so that S holds
             * (a, b) pairs per neuron */
            for (int64_t jj = 0; jj < nj; jj++) {
                int64_t off = ((j0 + jj) * w->ld_gu + k0) * (int64_t)esz;
                wr[2 * jj] = gate + off;
                wr[2 * jj + 1] = up + off;
            }
            const int64_t kl = H - k0 < kc ? H - k0 : kc;
            ds_gemm_reuse_w(pack, nrb > 1);
            for (int64_t b = 0; b < nrb; b++) {
                const int64_t rb = rb0 + b * bm, mb = m - rb < bm ? m - rb : bm;
                for (int64_t i = 0; i < mb; i++)
                    xr[i] = (const char *)c->x + (c->row_tok[row0 + rb + i] * c->ldx + k0) * (int64_t)esz;
                tile_job tj = {c->kern, xr, mb, wr, 2 * nj, kl, S + (rb - rb0) * ldS, ldS, k0 > 0,
                               pack, (kl == H) | c->rows_four};
                run_tiles(&tj);
            }
        }
        ds_gemm_reuse_w(pack, 0);
        const int64_t r1 = rb0 + nrb * bm < m ? rb0 + nrb * bm : m;
        gate_up_epilogue(c, it, S, ldS, rb0, r1);
    }
}

/* ---- phase 2: down projection over each row's prefix ---------------------- */

/* The rows of one level end their prefix where the next level's rows go on,
 * so the prefix of the highest level is cut at the ends of the levels
 * present into segments, and segment [s0, s1) is summed for every row whose
 * prefix reaches s1: the expert's rows [r0, m) (levels descending; r0 = 0,
 * except for narrow partitions, where a level's rows [r0, m) take their
 * whole prefix [0, s1) in one call).  Each
 * segment reads its part of down once, for all the rows that need it (2T-Drop
 * read the major half twice, once for the full rows and once for the half
 * rows).  Each piece of a segment in one stored column block of down (one
 * block for the row layout) reads a range of that block's rows; every piece
 * after a row's first adds to Y.  A row sums its segments, pieces and K
 * blocks in ascending order; an expert whose rows are all at one level has
 * one segment, so at level P it is computed exactly as with
 * num_partitions = 1 (levels = P everywhere is bitwise no drop). */
static void down_segment(moe_ctx *c, const item2_t *it, int tid, int64_t r0, int64_t m, int64_t s0,
                         int64_t s1)
{
    const ds_experts *w = c->w;
    const int64_t I = w->I, H = w->H, nh = it->h1 - it->h0, row0 = c->e_row0[it->e];
    const int64_t D = w->down_parts > 1 ? w->down_parts : 1;
    const size_t esz = ds_dtype_size(w->dtype);
    const int64_t bm = block_rows(c->kern, m - r0);
    const void *ab[DS_GEMM_MAX_ROWS], *wr[HC];
    for (int64_t b = 0; b < D; b++) {
        const int64_t lo = (b * I) / D, hi = ((b + 1) * I) / D;
        const int64_t p0 = s0 > lo ? s0 : lo, p1 = s1 < hi ? s1 : hi; /* the piece [p0, p1) */
        if (p0 >= p1)
            continue;
        const int64_t len = p1 - p0, ld = D > 1 ? hi - lo : w->ld_down;
        const char *blk = (const char *)w->down[it->e] + ((D > 1 ? H * lo : 0) + (p0 - lo)) * (int64_t)esz;
        /* K blocks outermost where every block of rows runs the GEMM (as in
         * gate_up_item; Y holds every row) */
        const int64_t nrb = gemm_blocks(c->kern, m - r0, bm) ? cdiv(m - r0, bm) : 1;
        for (int64_t rb0 = r0; rb0 < m; rb0 += nrb * bm) {
            const int64_t mb0 = m - rb0 < bm ? m - rb0 : bm;
            const int64_t kc = k_block(c->kern, mb0, c->act_esz, len);
            for (int64_t k0 = 0; k0 < len; k0 += kc) {
                for (int64_t h = 0; h < nh; h++)
                    wr[h] = blk + ((it->h0 + h) * ld + k0) * (int64_t)esz;
                const int64_t kl = len - k0 < kc ? len - k0 : kc;
                ds_gemm_reuse_w(c->pack + (int64_t)tid * DS_GEMM_PACK_FLOATS, nrb > 1);
                for (int64_t b = 0; b < nrb; b++) {
                    const int64_t rb = rb0 + b * bm, mb = m - rb < bm ? m - rb : bm;
                    for (int64_t i = 0; i < mb; i++)
                        ab[i] = c->A + ((row0 + rb + i) * I + p0 + k0) * (int64_t)c->act_esz;
                    tile_job tj = {c->kern, ab, mb, wr, nh, kl, c->Y + (row0 + rb) * H + it->h0, H,
                                   p0 + k0 > 0, c->pack + (int64_t)tid * DS_GEMM_PACK_FLOATS,
                                   (kl == hi - lo) | c->rows_four};
                    run_tiles(&tj);
                }
            }
            ds_gemm_reuse_w(c->pack + (int64_t)tid * DS_GEMM_PACK_FLOATS, 0);
        }
    }
}

static void down_item(void *vctx, int64_t item, int tid)
{
    moe_ctx *c = (moe_ctx *)vctx;
    const item2_t *it = &c->items2[item];
    const int64_t P = c->P, I = c->w->I;
    const int64_t *em = c->e_m + it->e * (P + 2);
    if (I / P < DS_SEG_MIN) { /* narrow partitions: each level's rows over their own prefix */
        for (int64_t q = P; q >= 1; q--)
            if (em[q] > em[q + 1])
                down_segment(c, it, tid, em[q + 1], em[q], 0, (q * I) / P);
        return;
    }
    int64_t s0 = 0;
    for (int64_t q = 1; q <= P; q++)
        if (em[q] > em[q + 1]) { /* rows of level q: their prefix ends here */
            const int64_t s1 = (q * I) / P;
            down_segment(c, it, tid, 0, em[q], s0, s1);
            s0 = s1;
        }
}

/* ---- phase 3: weighted combine in token order ------------------------------ */

static void combine_item(void *vctx, int64_t item, int tid)
{
    moe_ctx *c = (moe_ctx *)vctx;
    const ds_moe_args *a = c->a;
    const int64_t H = c->w->H, K = c->K;
    const size_t esz = ds_dtype_size(c->w->dtype);
    const float **ys = c->cmb_rows + (int64_t)tid * K;
    float *ws = c->cmb_w + (int64_t)tid * K;
    const int64_t t1 = (item + 1) * TB < c->T ? (item + 1) * TB : c->T;
    for (int64_t t = item * TB; t < t1; t++) {
        int nk = 0;
        for (int64_t k = 0; k < K; k++) {
            int64_t r = c->pos[t * K + k];
            if (r < 0)
                continue;
            ys[nk] = c->Y + r * H;
            ws[nk++] = (float)ds_load_real(a->topk_weights.data, a->topk_weights.dtype,
                                           t * a->topk_weights.s0 + k * a->topk_weights.s1);
        }
        c->kern->combine(ys, ws, nk, H, (char *)a->out + t * a->ldo * (int64_t)esz);
    }
}

/* ---- workspace ----------------------------------------------------------- */

static int carve(moe_ctx *c, ds_arena *ar, const ds_experts *w, int64_t T, int64_t K,
                 int64_t P, int n_threads, int importance, int64_t **cnt)
{
    const int64_t TK = T * K, E = w->E;
    c->pos = ds_arena_take(ar, (size_t)TK * 8);
    c->row_tok = ds_arena_take(ar, (size_t)TK * 8);
    c->row_pair = ds_arena_take(ar, (size_t)TK * 8);
    c->e_row0 = ds_arena_take(ar, (size_t)(E + 1) * 8);
    c->e_m = ds_arena_take(ar, (size_t)(E * (P + 2)) * 8);
    *cnt = ds_arena_take(ar, (size_t)(E * P) * 8);
    c->items1 = ds_arena_take(ar, (size_t)(E * (P + cdiv(w->I, NC))) * sizeof(item1_t));
    c->s_rows = T < S_ROWS_MAX ? T : S_ROWS_MAX;
    if (c->s_rows < DS_GEMM_MAX_ROWS)
        c->s_rows = DS_GEMM_MAX_ROWS;
    c->scratch_len = c->s_rows * 2 * NC;
    c->scratch = ds_arena_take(ar, (size_t)(n_threads * c->scratch_len) * sizeof(float));
    /* reserved whatever the level, so that the size does not depend on it */
    c->pack = ds_arena_take(ar, (size_t)n_threads * DS_GEMM_PACK_FLOATS * sizeof(float));
    if (!importance) {
        c->items2 = ds_arena_take(ar, (size_t)(E * cdiv(w->H, HC)) * sizeof(item2_t));
        c->act_esz = ds_dtype_size(w->dtype);
        c->A = ds_arena_take(ar, (size_t)TK * (size_t)w->I * c->act_esz);
        c->Y = ds_arena_take(ar, (size_t)TK * (size_t)w->H * sizeof(float));
        c->cmb_rows = ds_arena_take(ar, (size_t)(n_threads * K) * sizeof(float *));
        c->cmb_w = ds_arena_take(ar, (size_t)(n_threads * K) * sizeof(float));
    }
    return ar->base == NULL || ar->used <= ar->size;
}

static size_t workspace_bytes(const ds_experts *w, int64_t T, int64_t K, int64_t P,
                              int n_threads, int importance)
{
    moe_ctx c;
    int64_t *cnt;
    ds_arena ar = {NULL, 0, 0};
    memset(&c, 0, sizeof c);
    if (n_threads < 1)
        n_threads = 1;
    if (T < 0 || K < 1 || P < 1 || w == NULL || w->E < 1 || w->I < 1 || w->H < 1)
        return 64;
    carve(&c, &ar, w, T, K, P, n_threads, importance, &cnt);
    return ar.used + 64;
}

static int arena_open(ds_arena *ar, void *workspace, size_t size)
{
    uintptr_t p = (uintptr_t)workspace, q = (p + 63u) & ~(uintptr_t)63u;
    if (workspace == NULL || size < (q - p))
        return 0;
    ar->base = (char *)q;
    ar->used = 0;
    ar->size = size - (q - p);
    return 1;
}

size_t ds_moe_workspace_size(const ds_experts *w, const ds_moe_args *a, int n_threads)
{
    if (a == NULL)
        return 64;
    return workspace_bytes(w, a->T, a->K, a->P, n_threads, 0);
}

size_t ds_importance_workspace_size(const ds_experts *w, const ds_importance_args *a,
                                    int n_threads)
{
    if (a == NULL)
        return 64;
    return workspace_bytes(w, a->T, a->K, 1, n_threads, 1);
}

/* ---- entry points ---------------------------------------------------------- */

ds_status ds_moe_experts(const ds_experts *w, const ds_moe_args *a, void *workspace,
                         size_t workspace_size, int n_threads)
{
    static const char fn[] = "moe_experts";
    ds_status st = check_experts(fn, w);
    if (st != DS_OK)
        return st;
    if (a == NULL)
        return ds_error(DS_ERR_VALUE, "%s: arguments are NULL", fn);
    if (a->T < 0 || a->K < 1)
        return ds_error(DS_ERR_SHAPE, "%s: need T >= 0 and K >= 1; got T=%lld K=%lld", fn,
                        (long long)a->T, (long long)a->K);
    if (a->K > w->E)
        return ds_error(DS_ERR_SHAPE, "%s: topk_ids has K=%lld slots but there are only E=%lld "
                        "experts (K must be <= E)", fn, (long long)a->K, (long long)w->E);
    if (a->P < 1 || a->P > 127 || a->P > w->I)
        return ds_error(DS_ERR_VALUE, "%s: num_partitions must be in [1, min(127, I=%lld)]; got %d",
                        fn, (long long)w->I, a->P);
    if (n_threads < 1 || n_threads > ds_max_threads())
        return ds_error(DS_ERR_VALUE, "%s: num_threads must be in [1, %d]; got %d", fn,
                        ds_max_threads(), n_threads);
    if (!ds_is_weight(a->topk_weights.dtype))
        return ds_error(DS_ERR_TYPE, "%s: topk_weights must be float32, bfloat16, float16 or float64; got %s",
                        fn, ds_dtype_name(a->topk_weights.dtype));
    if (a->levels.data != NULL && !ds_is_int(a->levels.dtype))
        return ds_error(DS_ERR_TYPE, "%s: levels must be an integer array; got %s", fn,
                        ds_dtype_name(a->levels.dtype));
    if (a->T > 0 && (a->x == NULL || a->out == NULL || a->topk_weights.data == NULL))
        return ds_error(DS_ERR_VALUE, "%s: x, topk_weights and out must not be NULL", fn);
    if (a->ldx < w->H || a->ldo < w->H)
        return ds_error(DS_ERR_SHAPE, "%s: row strides of x (%lld) and out (%lld) must be >= H=%lld",
                        fn, (long long)a->ldx, (long long)a->ldo, (long long)w->H);
    if ((st = check_ids(fn, &a->topk_ids, a->T, a->K, w->E)) != DS_OK)
        return st;
    if (a->levels.data != NULL)
        for (int64_t t = 0; t < a->T; t++)
            for (int64_t k = 0; k < a->K; k++) {
                int64_t v = ds_load_int(a->levels.data, a->levels.dtype,
                                        t * a->levels.s0 + k * a->levels.s1);
                if (v < 0 || v > a->P)
                    return ds_error(DS_ERR_VALUE,
                                    "%s: levels[%lld, %lld] = %lld is outside [0, num_partitions=%d]",
                                    fn, (long long)t, (long long)k, (long long)v, a->P);
            }
    if (a->T == 0)
        return DS_OK;
    const ds_kernels *kern = ds_kernels_get(w->dtype);
    if (kern == NULL)
        return ds_error(DS_ERR_UNSUPPORTED, "%s: no kernel for %s", fn, ds_dtype_name(w->dtype));

    moe_ctx c;
    memset(&c, 0, sizeof c);
    c.w = w;
    use_kernels(&c, kern);
    c.T = a->T;
    c.K = a->K;
    c.P = a->P;
    c.x = a->x;
    c.ldx = a->ldx;
    c.a = a;
    ds_arena ar;
    int64_t *cnt;
    size_t need = workspace_bytes(w, a->T, a->K, a->P, n_threads, 0);
    if (workspace_size < need || !arena_open(&ar, workspace, workspace_size) ||
        !carve(&c, &ar, w, a->T, a->K, a->P, n_threads, 0, &cnt))
        return ds_error(DS_ERR_VALUE, "%s: workspace of %zu bytes is too small; need %zu", fn,
                        workspace_size, need);
    double t0 = a->timings ? now_seconds() : 0.0, t1 = 0.0, t2 = 0.0, t3 = 0.0;
    build_plan(&c, &a->topk_ids, &a->levels, cnt);
    build_items1(&c, 0);
    build_items2(&c);
    if (a->timings)
        t1 = now_seconds();
    forget_x(&c, n_threads);
    if ((st = ds_parallel_for(n_threads, c.n1, gate_up_item, &c)) != DS_OK)
        return st;
    if (a->timings)
        t2 = now_seconds();
    forget_x(&c, n_threads);
    if ((st = ds_parallel_for(n_threads, c.n2, down_item, &c)) != DS_OK)
        return st;
    if (a->timings)
        t3 = now_seconds();
    st = ds_parallel_for(n_threads, cdiv(a->T, TB), combine_item, &c);
    if (a->timings) {
        double t4 = now_seconds();
        a->timings[0] = t1 - t0;
        a->timings[1] = t2 - t1;
        a->timings[2] = t3 - t2;
        a->timings[3] = t4 - t3;
    }
    return st;
}

ds_status ds_importance_accumulate(const ds_experts *w, const ds_importance_args *a,
                                   void *workspace, size_t workspace_size, int n_threads)
{
    static const char fn[] = "importance";
    ds_status st = check_experts(fn, w);
    if (st != DS_OK)
        return st;
    if (a == NULL)
        return ds_error(DS_ERR_VALUE, "%s: arguments are NULL", fn);
    if (a->T < 0 || a->K < 1)
        return ds_error(DS_ERR_SHAPE, "%s: need T >= 0 and K >= 1; got T=%lld K=%lld", fn,
                        (long long)a->T, (long long)a->K);
    if (a->K > w->E)
        return ds_error(DS_ERR_SHAPE, "%s: topk_ids has K=%lld slots but there are only E=%lld "
                        "experts (K must be <= E)", fn, (long long)a->K, (long long)w->E);
    if (n_threads < 1 || n_threads > ds_max_threads())
        return ds_error(DS_ERR_VALUE, "%s: num_threads must be in [1, %d]; got %d", fn,
                        ds_max_threads(), n_threads);
    if (a->accum == NULL)
        return ds_error(DS_ERR_VALUE, "%s: accum is NULL", fn);
    if (a->weighted && (a->topk_weights.data == NULL || !ds_is_weight(a->topk_weights.dtype)))
        return ds_error(DS_ERR_TYPE, "%s: weighted importance needs float topk_weights", fn);
    if (a->T > 0 && a->x == NULL)
        return ds_error(DS_ERR_VALUE, "%s: x is NULL", fn);
    if (a->ldx < w->H)
        return ds_error(DS_ERR_SHAPE, "%s: row stride of x (%lld) must be >= H=%lld", fn,
                        (long long)a->ldx, (long long)w->H);
    if ((st = check_ids(fn, &a->topk_ids, a->T, a->K, w->E)) != DS_OK)
        return st;
    if (a->T == 0)
        return DS_OK;
    const ds_kernels *kern = ds_kernels_get(w->dtype);
    if (kern == NULL)
        return ds_error(DS_ERR_UNSUPPORTED, "%s: no kernel for %s", fn, ds_dtype_name(w->dtype));

    moe_ctx c;
    memset(&c, 0, sizeof c);
    c.w = w;
    use_kernels(&c, kern);
    c.T = a->T;
    c.K = a->K;
    c.P = 1;
    c.x = a->x;
    c.ldx = a->ldx;
    c.imp = a;
    ds_arena ar;
    int64_t *cnt;
    size_t need = workspace_bytes(w, a->T, a->K, 1, n_threads, 1);
    if (workspace_size < need || !arena_open(&ar, workspace, workspace_size) ||
        !carve(&c, &ar, w, a->T, a->K, 1, n_threads, 1, &cnt))
        return ds_error(DS_ERR_VALUE, "%s: workspace of %zu bytes is too small; need %zu", fn,
                        workspace_size, need);
    build_plan(&c, &a->topk_ids, NULL, cnt);
    if (a->counts != NULL)
        for (int64_t r = 0; r < c.R; r++) {
            int64_t pr = c.row_pair[r], t = pr / a->K, k = pr % a->K;
            int64_t e = ds_load_int(a->topk_ids.data, a->topk_ids.dtype,
                                    t * a->topk_ids.s0 + k * a->topk_ids.s1);
            a->counts[e] += a->weighted ? ds_load_real(a->topk_weights.data, a->topk_weights.dtype,
                                                       t * a->topk_weights.s0 + k * a->topk_weights.s1)
                                        : 1.0;
        }
    build_items1(&c, 1);
    forget_x(&c, n_threads);
    return ds_parallel_for(n_threads, c.n1, gate_up_item, &c);
}
