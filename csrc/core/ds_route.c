/* Routing levels: how many importance partitions each (token, expert) pair
 * computes, from its top-K-normalised routing score. */
#include "ds_internal.h"

ds_status ds_check_thresholds(const double *thresholds, int P)
{
    if (P < 1 || P > 127)
        return ds_error(DS_ERR_VALUE, "thresholds must hold 1 to 127 values; got %d", P);
    if (thresholds == NULL)
        return ds_error(DS_ERR_VALUE, "thresholds is NULL");
    for (int j = 0; j < P; j++) {
        if (!isfinite(thresholds[j]))
            return ds_error(DS_ERR_VALUE, "thresholds[%d] = %g is not finite", j, thresholds[j]);
        if (j > 0 && thresholds[j] < thresholds[j - 1])
            return ds_error(DS_ERR_VALUE,
                            "thresholds must be ascending; thresholds[%d] = %.17g < thresholds[%d] = %.17g",
                            j, thresholds[j], j - 1, thresholds[j - 1]);
    }
    return DS_OK;
}

/* Sum of row t times *scale.  *scale is 1 unless the plain float64 sum
 * overflows (float64 weights near DBL_MAX): then the row is scaled by a power
 * of two (exact) that brings its largest value near 1 before summing, so
 * that w * scale / (sum * scale) is the normalised score w / sum. */
static double row_sum(const void *w, ds_dtype dt, int64_t t, int64_t K, int64_t ws0, int64_t ws1,
                      double *scale)
{
    double sum = 0.0, mx = 0.0;
    *scale = 1.0;
    for (int64_t k = 0; k < K; k++)
        sum += ds_load_real(w, dt, t * ws0 + k * ws1);
    if (isfinite(sum))
        return sum;
    for (int64_t k = 0; k < K; k++) {
        double a = fabs(ds_load_real(w, dt, t * ws0 + k * ws1));
        if (a > mx)
            mx = a;
    }
    int e;
    frexp(mx, &e);
    *scale = ldexp(1.0, -e);
    sum = 0.0;
    for (int64_t k = 0; k < K; k++)
        sum += ds_load_real(w, dt, t * ws0 + k * ws1) * *scale;
    return sum;
}

/* topk_weights: T x K, levels: T x K */
ds_status ds_route_levels(const void *topk_weights, ds_dtype w_dtype, int64_t T, int64_t K,
                          int64_t ws0, int64_t ws1, const double *thresholds, int P,
                          int normalize, void *levels, ds_dtype l_dtype, int64_t ls0,
                          int64_t ls1)
{
    ds_status st = ds_check_thresholds(thresholds, P);
    if (st != DS_OK)
        return st;
    if (!ds_is_weight(w_dtype))
        return ds_error(DS_ERR_TYPE, "route_levels: topk_weights must be float32, bfloat16, "
                        "float16 or float64; got %s", ds_dtype_name(w_dtype));
    if (l_dtype != DS_I8 && l_dtype != DS_I32)
        return ds_error(DS_ERR_TYPE, "route_levels: levels must be int8 or int32; got %s",
                        ds_dtype_name(l_dtype));
    if (T < 0 || K < 1)
        return ds_error(DS_ERR_SHAPE, "route_levels: need T >= 0 and K >= 1; got T=%lld K=%lld",
                        (long long)T, (long long)K);
    if (T > 0 && (topk_weights == NULL || levels == NULL))
        return ds_error(DS_ERR_VALUE, "route_levels: topk_weights and levels must not be NULL");
    /* Validate every score before writing any level. */
    for (int64_t t = 0; t < T; t++) {
        for (int64_t k = 0; k < K; k++) {
            double v = ds_load_real(topk_weights, w_dtype, t * ws0 + k * ws1);
            if (!isfinite(v))
                return ds_error(DS_ERR_VALUE, "route_levels: topk_weights[%lld, %lld] = %g is not finite",
                                (long long)t, (long long)k, v);
        }
        double scale;
        if (normalize && row_sum(topk_weights, w_dtype, t, K, ws0, ws1, &scale) == 0.0)
            return ds_error(DS_ERR_VALUE, "route_levels: topk_weights row %lld sums to 0 and cannot "
                            "be normalised (pass normalize=False to use the raw weights)",
                            (long long)t);
    }
    for (int64_t t = 0; t < T; t++) {
        double sum = 0.0, scale = 1.0;
        if (normalize)
            sum = row_sum(topk_weights, w_dtype, t, K, ws0, ws1, &scale);
        for (int64_t k = 0; k < K; k++) {
            double s = ds_load_real(topk_weights, w_dtype, t * ws0 + k * ws1);
            if (normalize)
                s = s * scale / sum;
            int lvl = 0;
            while (lvl < P && s >= thresholds[lvl])
                lvl++;
            if (l_dtype == DS_I8)
                ((int8_t *)levels)[t * ls0 + k * ls1] = (int8_t)lvl;
            else
                ((int32_t *)levels)[t * ls0 + k * ls1] = lvl;
        }
    }
    return DS_OK;
}
