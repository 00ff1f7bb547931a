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
        double sum = 0.0;
        for (int64_t k = 0; k < K; k++) {
            double v = ds_load_real(topk_weights, w_dtype, t * ws0 + k * ws1);
            if (!isfinite(v))
                return ds_error(DS_ERR_VALUE, "route_levels: topk_weights[%lld, %lld] = %g is not finite",
                                (long long)t, (long long)k, v);
            sum += v;
        }
        if (normalize && sum == 0.0)
            return ds_error(DS_ERR_VALUE, "route_levels: topk_weights row %lld sums to 0 and cannot "
                            "be normalised (pass normalize=False to use the raw weights)",
                            (long long)t);
    }
    for (int64_t t = 0; t < T; t++) {
        double sum = 0.0;
        if (normalize)
            for (int64_t k = 0; k < K; k++)
                sum += ds_load_real(topk_weights, w_dtype, t * ws0 + k * ws1);
        for (int64_t k = 0; k < K; k++) {
            double s = ds_load_real(topk_weights, w_dtype, t * ws0 + k * ws1);
            if (normalize)
                s /= sum;
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
