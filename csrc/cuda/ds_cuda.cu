// dualsparse CUDA module: errors, device queries, the self-test and the
// run-time loader of cuBLAS.  The expert kernels live in ds_cuda_moe.cu.
#include "ds_cuda_internal.h"

#include <dlfcn.h>
#include <mutex>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#ifndef DS_CUDA_ARCHS
#define DS_CUDA_ARCHS "unknown"
#endif

static thread_local char ds_cuda_msg[2048];

ds_status ds_cuda_error(ds_status code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(ds_cuda_msg, sizeof ds_cuda_msg, fmt, ap);
    va_end(ap);
    return code;
}

ds_status ds_cuda_rt_error(const char *what, cudaError_t err)
{
    (void)cudaGetLastError(); /* reported here: not again by the next call */
    return ds_cuda_error(DS_ERR_INTERNAL, "%s: %s (%s)", what, cudaGetErrorString(err),
                         cudaGetErrorName(err));
}

extern "C" const char *ds_cuda_last_error(void) { return ds_cuda_msg; }

void ds_cuda_explain_no_device(cudaError_t err)
{
    int runtime = 0;
    cudaRuntimeGetVersion(&runtime);
    if (err == cudaErrorNoDevice) {
        ds_cuda_error(DS_ERR_UNSUPPORTED, "no CUDA device: the NVIDIA driver is loaded but sees no GPU "
                      "(check CUDA_VISIBLE_DEVICES) (%s)", cudaGetErrorName(err));
        return;
    }
    if (err == cudaErrorInsufficientDriver) {
        /* The runtime says this both when there is no driver at all and when
         * the driver is older than the runtime: tell the two apart. */
        char why[512] = "";
        int driver = 0;
        if (!ds_cuda_probe_driver(&driver, why, sizeof why)) {
            ds_cuda_error(DS_ERR_UNSUPPORTED, "no NVIDIA driver: the driver library libcuda.so.1 cannot be "
                          "loaded (%s)", why);
            return;
        }
        ds_cuda_error(DS_ERR_UNSUPPORTED, "the NVIDIA driver supports CUDA up to %d.%d, but this module was "
                      "built with the CUDA %d.%d runtime: update the driver, or rebuild dualsparse with the "
                      "CUDA toolkit of torch.version.cuda (%s)", driver / 1000, driver % 1000 / 10,
                      runtime / 1000, runtime % 1000 / 10, cudaGetErrorName(err));
        return;
    }
    ds_cuda_error(DS_ERR_UNSUPPORTED, "cudaGetDeviceCount: %s (%s)", cudaGetErrorString(err), cudaGetErrorName(err));
}

extern "C" int ds_cuda_device_count(void)
{
    int n = 0;
    cudaError_t err = cudaGetDeviceCount(&n);
    if (err != cudaSuccess) {
        ds_cuda_explain_no_device(err);
        cudaGetLastError();
        return 0;
    }
    if (n == 0)
        ds_cuda_explain_no_device(cudaErrorNoDevice);
    return n;
}

ds_status ds_blas_check_handle(const char *fn, void *handle, cudaStream_t stream, ds_blas_handle *out)
{
    const ds_blas_api *api = ds_blas();
    if (api == NULL)
        return DS_ERR_UNSUPPORTED;
    if (handle == NULL)
        return ds_cuda_error(DS_ERR_VALUE, "%s: the cuBLAS handle is NULL (pass torch.cuda.current_blas_handle())", fn);
    cudaStream_t bound = NULL;
    int st = api->get_stream((ds_blas_handle)handle, &bound);
    if (st != 0)
        return ds_cuda_error(DS_ERR_VALUE, "%s: cublasGetStream on the given handle failed with status %d", fn, st);
    if (bound != stream)
        return ds_cuda_error(DS_ERR_VALUE, "%s: the cuBLAS handle is bound to stream %p, not to the op's stream "
                             "%p (take the handle with torch.cuda.current_blas_handle() on the op's stream)",
                             fn, (void *)bound, (void *)stream);
    *out = (ds_blas_handle)handle;
    return DS_OK;
}

/* Everything below needs the real runtime and driver; the host emulation of
 * the tests (csrc/cuda/emu) supplies its own. */
#ifndef DS_CUDA_EMULATE

static int ds_cuda_fail(const char *what, cudaError_t err)
{
    ds_cuda_rt_error(what, err);
    return (int)err;
}

int ds_cuda_probe_driver(int *driver_version, char *why, size_t cap)
{
    *driver_version = 0;
    void *lib = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_LOCAL);
    if (lib == NULL) {
        const char *e = dlerror();
        snprintf(why, cap, "%s", e ? e : "dlopen failed");
        return 0;
    }
    int (*get_version)(int *) = NULL;
    *(void **)&get_version = dlsym(lib, "cuDriverGetVersion");
    if (get_version == NULL || get_version(driver_version) != 0)
        *driver_version = 0;
    dlclose(lib);
    return 1;
}

__global__ void ds_iota_kernel(int32_t *out, int n)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n)
        out[i] = i;
}

/* ---- cuBLAS loader --------------------------------------------------------- */

static std::mutex blas_mutex;
static ds_blas_api blas_api;
static int blas_loaded;
static char blas_path[1024];
static int blas_version;

static const char *const blas_system_names[] = {"libcublas.so.13", "libcublas.so.12",
                                                 "libcublas.so.11", "libcublas.so"};

/* Resolves the symbols from an open library; 0 on success. */
static int blas_resolve(void *lib, ds_blas_api *api, const char **missing)
{
#define DS_SYM(field, name)                                                   \
    do {                                                                       \
        *(void **)&api->field = dlsym(lib, name);                              \
        if (api->field == NULL) {                                              \
            *missing = name;                                                   \
            return -1;                                                         \
        }                                                                      \
    } while (0)
    DS_SYM(get_property, "cublasGetProperty");
    DS_SYM(get_stream, "cublasGetStream_v2");
    DS_SYM(get_math_mode, "cublasGetMathMode");
    DS_SYM(set_math_mode, "cublasSetMathMode");
    DS_SYM(gemm_ex, "cublasGemmEx");
#undef DS_SYM
    *(void **)&api->gemm_grouped = dlsym(lib, "cublasGemmGroupedBatchedEx"); /* optional */
    return 0;
}

/* Appends "name (why); " to the report of what was searched. */
static void note(char *buf, size_t cap, const char *name, const char *why)
{
    size_t len = strlen(buf);
    if (len + 8 < cap)
        snprintf(buf + len, cap - len, "%s%s (%s)", len ? "; " : "", name, why);
}

static int blas_try(const char *name, int flags, char *report, size_t cap)
{
    void *lib = dlopen(name, flags);
    if (lib == NULL) {
        if (!(flags & RTLD_NOLOAD)) {
            const char *e = dlerror();
            note(report, cap, name, e ? e : "dlopen failed");
        }
        return 0;
    }
    ds_blas_api api;
    const char *missing = NULL;
    if (blas_resolve(lib, &api, &missing) != 0) {
        char why[256];
        snprintf(why, sizeof why, "no symbol %s", missing);
        note(report, cap, name, why);
        dlclose(lib);
        return 0;
    }
    blas_api = api;
    snprintf(blas_path, sizeof blas_path, "%s", name);
    int major = 0, minor = 0, patch = 0;
    if (api.get_property(0, &major) == 0 && api.get_property(1, &minor) == 0 && api.get_property(2, &patch) == 0)
        blas_version = major * 10000 + minor * 100 + patch; /* CUBLAS_VERSION's encoding */
    blas_loaded = 1;
    return 1;
}

static ds_status blas_load_locked(const char *const *paths, int n, int system)
{
    if (blas_loaded)
        return DS_OK;
    char report[1536] = "";
    /* The copy torch (or anyone) already loaded wins: same library, same
     * version as the framework the tensors come from. */
    for (int i = 0; i < n; i++)
        if (paths[i] && blas_try(paths[i], RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD, report, sizeof report))
            return DS_OK;
    for (size_t i = 0; i < sizeof blas_system_names / sizeof *blas_system_names; i++)
        if (blas_try(blas_system_names[i], RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD, report, sizeof report))
            return DS_OK;
    for (int i = 0; i < n; i++)
        if (paths[i] && blas_try(paths[i], RTLD_NOW | RTLD_LOCAL, report, sizeof report))
            return DS_OK;
    if (system)
        for (size_t i = 0; i < sizeof blas_system_names / sizeof *blas_system_names; i++)
            if (blas_try(blas_system_names[i], RTLD_NOW | RTLD_LOCAL, report, sizeof report))
                return DS_OK;
    return ds_cuda_error(DS_ERR_UNSUPPORTED,
                         "cuBLAS not found: searched %s. Install torch with its CUDA wheels "
                         "(nvidia-cublas) or put libcublas on LD_LIBRARY_PATH",
                         report[0] ? report : "nothing (no candidate paths)");
}

const ds_blas_api *ds_blas(void)
{
    std::lock_guard<std::mutex> lock(blas_mutex);
    if (!blas_loaded && blas_load_locked(NULL, 0, 1) != DS_OK)
        return NULL;
    return &blas_api;
}

extern "C" {

int ds_cuda_runtime_version(void)
{
    int v = 0;
    cudaRuntimeGetVersion(&v);
    return v;
}

int ds_cuda_driver_version(void)
{
    int v = 0;
    if (cudaDriverGetVersion(&v) != cudaSuccess)
        return 0;
    return v;
}

const char *ds_cuda_arch_list(void) { return DS_CUDA_ARCHS; }

int ds_cuda_selftest(int device, int32_t *host, int n)
{
    int32_t *dev = NULL;
    DeviceGuard guard(device);
    if (guard.err != cudaSuccess)
        return ds_cuda_fail("cudaSetDevice", guard.err);
    cudaError_t err = cudaMalloc((void **)&dev, (size_t)n * sizeof(int32_t));
    if (err != cudaSuccess)
        return ds_cuda_fail("cudaMalloc", err);
    ds_iota_kernel<<<(n + 255) / 256, 256>>>(dev, n);
    err = cudaGetLastError();
    if (err == cudaSuccess)
        err = cudaMemcpy(host, dev, (size_t)n * sizeof(int32_t), cudaMemcpyDeviceToHost);
    cudaFree(dev);
    if (err != cudaSuccess)
        return ds_cuda_fail("self-test kernel", err);
    return 0;
}

ds_status ds_cuda_blas_load(const char *const *paths, int n, int system)
{
    std::lock_guard<std::mutex> lock(blas_mutex);
    return blas_load_locked(paths, n, system);
}

const char *ds_cuda_blas_path(void) { return blas_loaded ? blas_path : ""; }

int ds_cuda_blas_version(void) { return blas_version; }

int ds_cuda_blas_has_grouped(void) { return blas_loaded && blas_api.gemm_grouped != NULL; }

}  // extern "C"

#endif /* DS_CUDA_EMULATE */
