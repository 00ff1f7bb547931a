/* Reconstruction: importance order and in-place neuron permutation. */
#include "ds_internal.h"

#include <stdlib.h>

/* Stable merge sort of idx[0..n) by key descending (ties by index
 * ascending, which stability gives for free). */
static void merge_desc(const double *key, int64_t *idx, int64_t *tmp, int64_t n)
{
    for (int64_t width = 1; width < n; width *= 2) {
        for (int64_t lo = 0; lo < n; lo += 2 * width) {
            int64_t mid = lo + width < n ? lo + width : n;
            int64_t hi = lo + 2 * width < n ? lo + 2 * width : n;
            int64_t i = lo, j = mid, o = lo;
            while (i < mid && j < hi)
                tmp[o++] = key[idx[j]] > key[idx[i]] ? idx[j++] : idx[i++];
            while (i < mid)
                tmp[o++] = idx[i++];
            while (j < hi)
                tmp[o++] = idx[j++];
        }
        memcpy(idx, tmp, (size_t)n * sizeof *idx);
    }
}

/* importance: E x I, perm: E x I */
ds_status ds_importance_order(const double *importance, int64_t E, int64_t I, int64_t *perm)
{
    if (E < 1 || I < 1)
        return ds_error(DS_ERR_SHAPE, "importance_order: need E, I >= 1; got E=%lld I=%lld",
                        (long long)E, (long long)I);
    if (importance == NULL || perm == NULL)
        return ds_error(DS_ERR_VALUE, "importance_order: importance and perm must not be NULL");
    for (int64_t i = 0; i < E * I; i++)
        if (!isfinite(importance[i]))
            return ds_error(DS_ERR_VALUE, "importance_order: importance[%lld, %lld] = %g is not finite",
                            (long long)(i / I), (long long)(i % I), importance[i]);
    int64_t *tmp = (int64_t *)malloc((size_t)I * sizeof *tmp);
    if (tmp == NULL)
        return ds_error(DS_ERR_MEMORY, "importance_order: out of memory for %lld indices",
                        (long long)I);
    for (int64_t e = 0; e < E; e++) {
        int64_t *p = perm + e * I;
        for (int64_t j = 0; j < I; j++)
            p[j] = j;
        merge_desc(importance + e * I, p, tmp, I);
    }
    free(tmp);
    return DS_OK;
}

ds_status ds_check_permutation(const int64_t *perm, int64_t E, int64_t I)
{
    if (perm == NULL)
        return ds_error(DS_ERR_VALUE, "perm is NULL");
    unsigned char *seen = (unsigned char *)malloc((size_t)I);
    if (seen == NULL)
        return ds_error(DS_ERR_MEMORY, "out of memory checking a permutation of %lld", (long long)I);
    for (int64_t e = 0; e < E; e++) {
        memset(seen, 0, (size_t)I);
        for (int64_t j = 0; j < I; j++) {
            int64_t v = perm[e * I + j];
            if (v < 0 || v >= I || seen[v]) {
                free(seen);
                if (v < 0 || v >= I)
                    return ds_error(DS_ERR_VALUE, "perm[%lld, %lld] = %lld is outside [0, I=%lld)",
                                    (long long)e, (long long)j, (long long)v, (long long)I);
                return ds_error(DS_ERR_VALUE, "perm[%lld] is not a permutation: %lld appears twice",
                                (long long)e, (long long)v);
            }
            seen[v] = 1;
        }
    }
    free(seen);
    return DS_OK;
}

typedef struct {
    const ds_experts *w;
    const int64_t *perm;
    int inverse;
    char *scratch;
    size_t scratch_len;
} perm_ctx;

/* new row j = old row p[j], following cycles with one row of scratch per
 * matrix; p is the forward permutation of one expert. */
static void permute_rows(char *m1, char *m2, int64_t ld_bytes, size_t row_bytes,
                         const int64_t *p, int64_t I, unsigned char *done, char *t1, char *t2)
{
    if (I <= 0)
        return;
    memset(done, 0, (size_t)I);
    for (int64_t s = 0; s < I; s++) {
        if (done[s] || p[s] == s) {
            done[s] = 1;
            continue;
        }
        memcpy(t1, m1 + s * ld_bytes, row_bytes);
        memcpy(t2, m2 + s * ld_bytes, row_bytes);
        int64_t j = s;
        for (;;) {
            int64_t src = p[j];
            done[j] = 1;
            if (src == s) {
                memcpy(m1 + j * ld_bytes, t1, row_bytes);
                memcpy(m2 + j * ld_bytes, t2, row_bytes);
                break;
            }
            memcpy(m1 + j * ld_bytes, m1 + src * ld_bytes, row_bytes);
            memcpy(m2 + j * ld_bytes, m2 + src * ld_bytes, row_bytes);
            j = src;
        }
    }
}

static void permute_item(void *vctx, int64_t e, int tid)
{
    perm_ctx *c = (perm_ctx *)vctx;
    const ds_experts *w = c->w;
    const int64_t I = w->I, H = w->H;
    const size_t esz = ds_dtype_size(w->dtype);
    char *base = c->scratch + (size_t)tid * c->scratch_len;
    int64_t *p = (int64_t *)base;
    unsigned char *done = (unsigned char *)(p + I);
    /* r1/r2 hold one gate/up row each (H elements); tr one down row (I). */
    char *area = (char *)(((uintptr_t)(done + I) + 63u) & ~(uintptr_t)63u);
    char *r1 = area, *r2 = area + ds_align_up((size_t)H * esz);
    char *tr = r2 + ds_align_up((size_t)H * esz);

    const int64_t *fw = c->perm + e * I;
    if (c->inverse)
        for (int64_t j = 0; j < I; j++)
            p[fw[j]] = j;
    else
        memcpy(p, fw, (size_t)I * sizeof *p);

    permute_rows((char *)w->gate[e], (char *)w->up[e], w->ld_gu * (int64_t)esz, (size_t)H * esz,
                 p, I, done, r1, r2);
    char *down = (char *)w->down[e];
    for (int64_t h = 0; h < H; h++) {
        char *row = down + h * w->ld_down * (int64_t)esz;
        if (esz == 4) {
            const uint32_t *src = (const uint32_t *)row;
            uint32_t *dst = (uint32_t *)tr;
            for (int64_t j = 0; j < I; j++)
                dst[j] = src[p[j]];
        } else {
            const uint16_t *src = (const uint16_t *)row;
            uint16_t *dst = (uint16_t *)tr;
            for (int64_t j = 0; j < I; j++)
                dst[j] = src[p[j]];
        }
        memcpy(row, tr, (size_t)I * esz);
    }
}

static size_t perm_scratch_len(const ds_experts *w)
{
    size_t esz = ds_dtype_size(w->dtype);
    return ds_align_up((size_t)w->I * 8) + ds_align_up((size_t)w->I) + 64 +
           2 * ds_align_up((size_t)w->H * esz) + ds_align_up((size_t)w->I * esz);
}

size_t ds_permute_workspace_size(const ds_experts *w, int n_threads)
{
    if (w == NULL || w->I < 1 || w->H < 1)
        return 64;
    if (n_threads < 1)
        n_threads = 1;
    return (size_t)n_threads * perm_scratch_len(w) + 64;
}

ds_status ds_permute_neurons(const ds_experts *w, const int64_t *perm, int inverse,
                             void *workspace, size_t workspace_size, int n_threads)
{
    if (w == NULL || w->E < 1 || w->I < 1 || w->H < 1)
        return ds_error(DS_ERR_SHAPE, "permute_neurons: experts need E, I, H >= 1");
    if (!ds_is_real(w->dtype))
        return ds_error(DS_ERR_TYPE, "permute_neurons: weights must be float32, bfloat16 or "
                        "float16; got %s", ds_dtype_name(w->dtype));
    if (w->gate == NULL || w->up == NULL || w->down == NULL)
        return ds_error(DS_ERR_VALUE, "permute_neurons: weight pointer tables are NULL");
    for (int64_t e = 0; e < w->E; e++)
        if (w->gate[e] == NULL || w->up[e] == NULL || w->down[e] == NULL)
            return ds_error(DS_ERR_VALUE, "permute_neurons: weights of expert %lld are NULL",
                            (long long)e);
    if (w->ld_gu < w->H || w->ld_down < w->I)
        return ds_error(DS_ERR_SHAPE, "permute_neurons: weight row strides too small");
    if (w->down_parts > 1)
        return ds_error(DS_ERR_UNSUPPORTED, "permute_neurons: down_proj is stored in %lld column "
                        "blocks (down_parts); permute the row layout (E, H, I) and store the blocks "
                        "afterwards", (long long)w->down_parts);
    if (n_threads < 1 || n_threads > ds_max_threads())
        return ds_error(DS_ERR_VALUE, "permute_neurons: num_threads must be in [1, %d]; got %d",
                        ds_max_threads(), n_threads);
    ds_status st = ds_check_permutation(perm, w->E, w->I);
    if (st != DS_OK)
        return st;
    size_t need = ds_permute_workspace_size(w, n_threads);
    if (workspace == NULL || workspace_size < need)
        return ds_error(DS_ERR_VALUE, "permute_neurons: workspace of %zu bytes is too small; need %zu",
                        workspace_size, need);
    perm_ctx c;
    c.w = w;
    c.perm = perm;
    c.inverse = inverse;
    c.scratch = (char *)(((uintptr_t)workspace + 63u) & ~(uintptr_t)63u);
    c.scratch_len = perm_scratch_len(w);
    return ds_parallel_for(n_threads, w->E, permute_item, &c);
}
