/* The DLPack ABI (v0.x "dltensor" capsules), declared here for the binding.
 * Only the fields the engine reads are used. */
#ifndef DS_DLPACK_H
#define DS_DLPACK_H

#include <stdint.h>

typedef enum {
    DS_DL_CPU = 1,
    DS_DL_CUDA = 2,
    DS_DL_CUDA_HOST = 3,
    DS_DL_CUDA_MANAGED = 13
} ds_dl_device_type;

typedef enum { DS_DL_INT = 0, DS_DL_UINT = 1, DS_DL_FLOAT = 2, DS_DL_BFLOAT = 4 } ds_dl_type_code;

typedef struct {
    int32_t device_type;
    int32_t device_id;
} ds_dl_device;

typedef struct {
    uint8_t code;
    uint8_t bits;
    uint16_t lanes;
} ds_dl_dtype;

typedef struct {
    void *data;
    ds_dl_device device;
    int32_t ndim;
    ds_dl_dtype dtype;
    int64_t *shape;
    int64_t *strides; /* in elements; NULL means compact row-major */
    uint64_t byte_offset;
} ds_dl_tensor;

typedef struct ds_dl_managed {
    ds_dl_tensor dl_tensor;
    void *manager_ctx;
    void (*deleter)(struct ds_dl_managed *self);
} ds_dl_managed;

#endif
