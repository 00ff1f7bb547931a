/* dualsparse CUDA entry points: plain C declarations, implemented by nvcc.
 * Every function returns a ds_status and puts detail in a message buffer
 * read with ds_cuda_last_error(); nothing throws across this boundary. */
#ifndef DS_CUDA_H
#define DS_CUDA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

const char *ds_cuda_last_error(void);

/* Number of visible devices; 0 with a reason in ds_cuda_last_error() when
 * there is no driver or no device. */
int ds_cuda_device_count(void);

/* CUDA runtime version this module was linked with (e.g. 13000). */
int ds_cuda_runtime_version(void);

/* Driver version, 0 when no driver is loaded. */
int ds_cuda_driver_version(void);

/* Compute capabilities the module carries code for, e.g. "sm_80 sm_90 compute_90". */
const char *ds_cuda_arch_list(void);

/* Runs a one-block kernel on `device` that writes 0..n-1 into a device
 * buffer and copies it back into host[0..n): proves the module's device code
 * loads and runs.  Returns 0 on success. */
int ds_cuda_selftest(int device, int32_t *host, int n);

#ifdef __cplusplus
}
#endif
#endif
