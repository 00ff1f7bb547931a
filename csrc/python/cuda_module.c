/* dualsparse._C_cuda: the CPython binding of csrc/cuda.  Importing it never
 * touches the GPU; functions that need a device report clearly when there is
 * none. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <string.h>

#include "../cuda/ds_cuda.h"

static PyObject *py_device_count(PyObject *self, PyObject *args)
{
    (void)self; (void)args;
    int n;
    Py_BEGIN_ALLOW_THREADS
    n = ds_cuda_device_count();
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(n);
}

static PyObject *py_status(PyObject *self, PyObject *args)
{
    (void)self; (void)args;
    int n, rt, drv;
    Py_BEGIN_ALLOW_THREADS
    n = ds_cuda_device_count();
    rt = ds_cuda_runtime_version();
    drv = ds_cuda_driver_version();
    Py_END_ALLOW_THREADS
    return Py_BuildValue("{s:i,s:i,s:i,s:s,s:s}", "device_count", n, "runtime_version", rt,
                         "driver_version", drv, "archs", ds_cuda_arch_list(), "reason",
                         n > 0 ? "" : ds_cuda_last_error());
}

static PyObject *py_selftest(PyObject *self, PyObject *args)
{
    (void)self;
    int device = 0, n = 1000;
    if (!PyArg_ParseTuple(args, "|i", &device))
        return NULL;
    int32_t *buf = PyMem_Malloc((size_t)n * sizeof(int32_t));
    if (buf == NULL)
        return PyErr_NoMemory();
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = ds_cuda_selftest(device, buf, n);
    Py_END_ALLOW_THREADS
    if (rc != 0) {
        PyMem_Free(buf);
        PyErr_Format(PyExc_RuntimeError, "CUDA self-test on device %d failed: %s", device,
                     ds_cuda_last_error());
        return NULL;
    }
    for (int i = 0; i < n; i++)
        if (buf[i] != i) {
            PyMem_Free(buf);
            PyErr_Format(PyExc_RuntimeError, "CUDA self-test on device %d returned %d at %d",
                         device, (int)buf[i], i);
            return NULL;
        }
    PyMem_Free(buf);
    Py_RETURN_TRUE;
}


/* ---- status -> exception (the CPU binding's table) ---------------------- */
static PyObject *exc_for(ds_status st)
{
    switch (st) {
    case DS_ERR_VALUE: return PyExc_ValueError;
    case DS_ERR_SHAPE: return PyExc_ValueError;
    case DS_ERR_TYPE: return PyExc_TypeError;
    case DS_ERR_MEMORY: return PyExc_MemoryError;
    case DS_ERR_UNSUPPORTED: return PyExc_NotImplementedError;
    default: return PyExc_RuntimeError;
    }
}

static PyObject *raise_status(ds_status st)
{
    PyErr_SetString(exc_for(st), ds_cuda_last_error());
    return NULL;
}

static PyObject *py_blas_load(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *seq;
    int system = 1;
    if (!PyArg_ParseTuple(args, "O|p", &seq, &system))
        return NULL;
    PyObject *fast = PySequence_Fast(seq, "blas_load: paths must be a sequence of str");
    if (fast == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    const char **paths = PyMem_Calloc((size_t)n + 1, sizeof *paths);
    if (paths == NULL) {
        Py_DECREF(fast);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        paths[i] = PyUnicode_AsUTF8(PySequence_Fast_GET_ITEM(fast, i));
        if (paths[i] == NULL) {
            PyMem_Free(paths);
            Py_DECREF(fast);
            return NULL;
        }
    }
    ds_status st;
    Py_BEGIN_ALLOW_THREADS
    st = ds_cuda_blas_load(paths, (int)n, system);
    Py_END_ALLOW_THREADS
    PyMem_Free(paths);
    Py_DECREF(fast);
    if (st != DS_OK) {
        PyErr_SetString(PyExc_RuntimeError, ds_cuda_last_error());
        return NULL;
    }
    return PyUnicode_FromString(ds_cuda_blas_path());
}

static PyObject *py_blas_info(PyObject *self, PyObject *args)
{
    (void)self; (void)args;
    /* grouped_refused: dtype -> the cuBLAS status of the grouped call's
     * refusal (those dtypes run as the cublasGemmEx loop) */
    return Py_BuildValue("{s:s,s:i,s:O,s:{s:i,s:i,s:i}}", "path", ds_cuda_blas_path(), "version",
                         ds_cuda_blas_version(), "grouped_gemm", ds_cuda_blas_has_grouped() ? Py_True : Py_False,
                         "grouped_refused", "float32", ds_cuda_blas_grouped_refusal(DS_F32), "bfloat16",
                         ds_cuda_blas_grouped_refusal(DS_BF16), "float16", ds_cuda_blas_grouped_refusal(DS_F16));
}

static PyObject *py_blas_forget_refusals(PyObject *self, PyObject *args)
{
    (void)self; (void)args;
    ds_cuda_blas_forget_refusals();
    Py_RETURN_NONE;
}

static PyObject *py_route_workspace_size(PyObject *self, PyObject *args)
{
    (void)self; (void)args;
    return PyLong_FromLong(DS_CUDA_ROUTE_WORKSPACE);
}

static PyObject *py_last_sync_seconds(PyObject *self, PyObject *args)
{
    (void)self; (void)args;
    return PyFloat_FromDouble(ds_cuda_last_sync_seconds());
}

static PyObject *py_last_gemm_grouped(PyObject *self, PyObject *args)
{
    (void)self; (void)args;
    return PyBool_FromLong(ds_cuda_last_gemm_grouped());
}

static PyObject *py_last_gemm_counts(PyObject *self, PyObject *args)
{
    (void)self; (void)args;
    long long grouped = 0, loop = 0;
    ds_cuda_last_gemm_counts(&grouped, &loop);
    return Py_BuildValue("{s:L,s:L}", "grouped", grouped, "loop", loop);
}

static void *ptr_of(long long v) { return (void *)(intptr_t)v; }

/* route_levels(device, stream, w_ptr, w_dtype, T, K, ws0, ws1, thresholds,
 *              normalize, lv_ptr, l_dtype, ls0, ls1[, ws_ptr, ws_size]);
 * thresholds: list of float; the workspace (route_workspace_size() bytes of
 * device memory) is needed when T > 0. */
static PyObject *py_route_levels(PyObject *self, PyObject *args)
{
    (void)self;
    int device, wdt, ldt, normalize;
    long long stream, w, T, K, ws0, ws1, lv, ls0, ls1, wsp = 0, wsn = 0;
    PyObject *thr;
    if (!PyArg_ParseTuple(args, "iLLiLLLLOpLiLL|LL", &device, &stream, &w, &wdt, &T, &K, &ws0, &ws1,
                          &thr, &normalize, &lv, &ldt, &ls0, &ls1, &wsp, &wsn))
        return NULL;
    PyObject *fast = PySequence_Fast(thr, "route_levels: thresholds must be a sequence of numbers");
    if (fast == NULL)
        return NULL;
    Py_ssize_t P = PySequence_Fast_GET_SIZE(fast);
    double vals[128];
    if (P > 127)
        P = 128; /* reported by the C check */
    for (Py_ssize_t i = 0; i < P && i < 128; i++) {
        vals[i] = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(fast, i));
        if (vals[i] == -1.0 && PyErr_Occurred()) {
            Py_DECREF(fast);
            return NULL;
        }
    }
    Py_DECREF(fast);
    ds_status st;
    Py_BEGIN_ALLOW_THREADS
    st = ds_cuda_route_levels(device, ptr_of(stream), ptr_of(w), (ds_dtype)wdt, T, K, ws0, ws1, vals,
                              (int)P, normalize, ptr_of(lv), (ds_dtype)ldt, ls0, ls1, ptr_of(wsp),
                              (size_t)wsn);
    Py_END_ALLOW_THREADS
    if (st != DS_OK)
        return raise_status(st);
    Py_RETURN_NONE;
}

/* The expert arguments as one tuple of 25 ints:
 * (T, K, E, I, H, P, dtype, x, ldx, ids, ids_dtype, ids_s0, ids_s1,
 *  tw, tw_dtype, tw_s0, tw_s1, lv, lv_dtype, lv_s0, lv_s1, gate_up, down, out, ldo)
 * Pointers are device addresses (tensor.data_ptr()); 0 for none. */
static int parse_moe(PyObject *tup, ds_cuda_moe_args *a)
{
    long long T, K, E, I, H, x, ldx, ids, is0, is1, tw, ts0, ts1, lv, ls0, ls1, gu, dn, out, ldo;
    int P, dt, idt, tdt, ldt;
    if (!PyArg_ParseTuple(tup, "LLLLLiiLLLiLLLiLLLiLLLLLL", &T, &K, &E, &I, &H, &P, &dt, &x, &ldx,
                          &ids, &idt, &is0, &is1, &tw, &tdt, &ts0, &ts1, &lv, &ldt, &ls0, &ls1,
                          &gu, &dn, &out, &ldo))
        return -1;
    memset(a, 0, sizeof *a);
    a->T = T; a->K = K; a->E = E; a->I = I; a->H = H; a->P = P; a->dtype = (ds_dtype)dt;
    a->x = ptr_of(x); a->ldx = ldx;
    a->topk_ids.data = ptr_of(ids); a->topk_ids.dtype = (ds_dtype)idt;
    a->topk_ids.s0 = is0; a->topk_ids.s1 = is1;
    a->topk_weights.data = ptr_of(tw); a->topk_weights.dtype = (ds_dtype)tdt;
    a->topk_weights.s0 = ts0; a->topk_weights.s1 = ts1;
    a->levels.data = ptr_of(lv); a->levels.dtype = (ds_dtype)ldt;
    a->levels.s0 = ls0; a->levels.s1 = ls1;
    a->gate_up = ptr_of(gu); a->down = ptr_of(dn); a->out = ptr_of(out); a->ldo = ldo;
    return 0;
}

static PyObject *py_moe_check(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *tup;
    ds_cuda_moe_args a;
    if (!PyArg_ParseTuple(args, "O!", &PyTuple_Type, &tup) || parse_moe(tup, &a) != 0)
        return NULL;
    ds_status st = ds_cuda_moe_check(&a);
    if (st != DS_OK)
        return raise_status(st);
    return PyLong_FromSize_t(ds_cuda_moe_workspace_size(&a));
}

static PyObject *py_moe_experts(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *tup;
    int device;
    long long stream, handle, ws, ws_size;
    ds_cuda_moe_args a;
    if (!PyArg_ParseTuple(args, "iLLO!LL", &device, &stream, &handle, &PyTuple_Type, &tup, &ws, &ws_size) ||
        parse_moe(tup, &a) != 0)
        return NULL;
    ds_status st;
    Py_BEGIN_ALLOW_THREADS
    st = ds_cuda_moe_experts(device, ptr_of(stream), ptr_of(handle), &a, ptr_of(ws), (size_t)ws_size);
    Py_END_ALLOW_THREADS
    if (st != DS_OK)
        return raise_status(st);
    Py_RETURN_NONE;
}

static int parse_importance(PyObject *args, int *device, long long *stream, long long *ws,
                            long long *ws_size, ds_cuda_importance_args *a)
{
    PyObject *tup;
    int weighted;
    long long accum, counts;
    if (!PyArg_ParseTuple(args, "iLO!pLLLL", device, stream, &PyTuple_Type, &tup, &weighted, &accum,
                          &counts, ws, ws_size) ||
        parse_moe(tup, &a->m) != 0)
        return -1;
    a->weighted = weighted;
    a->accum = ptr_of(accum);
    a->counts = ptr_of(counts);
    return 0;
}

/* importance_check(device, stream, moe_tuple, weighted, accum, counts, 0, 0)
 * -> workspace size */
static PyObject *py_importance_check(PyObject *self, PyObject *args)
{
    (void)self;
    int device;
    long long stream, ws, ws_size;
    ds_cuda_importance_args a;
    if (parse_importance(args, &device, &stream, &ws, &ws_size, &a) != 0)
        return NULL;
    ds_status st = ds_cuda_importance_check(&a);
    if (st != DS_OK)
        return raise_status(st);
    return PyLong_FromSize_t(ds_cuda_importance_workspace_size(&a));
}

/* importance(device, stream, blas_handle, moe_tuple, weighted, accum, counts, ws, ws_size) */
static PyObject *py_importance(PyObject *self, PyObject *args)
{
    (void)self;
    int device;
    long long stream, handle, ws, ws_size;
    ds_cuda_importance_args a;
    PyObject *rest = NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(args);
    if (n != 9) {
        PyErr_SetString(PyExc_TypeError, "importance(device, stream, blas_handle, args, weighted, accum, "
                        "counts, ws, ws_size) takes 9 arguments");
        return NULL;
    }
    if (!PyArg_Parse(PyTuple_GET_ITEM(args, 2), "L", &handle))
        return NULL;
    /* the rest parses like importance_check's arguments, less the handle */
    rest = PyTuple_New(n - 1);
    if (rest == NULL)
        return NULL;
    for (Py_ssize_t i = 0, j = 0; i < n; i++) {
        if (i == 2)
            continue;
        PyObject *o = PyTuple_GET_ITEM(args, i);
        Py_INCREF(o);
        PyTuple_SET_ITEM(rest, j++, o);
    }
    int rc = parse_importance(rest, &device, &stream, &ws, &ws_size, &a);
    Py_DECREF(rest);
    if (rc != 0)
        return NULL;
    ds_status st;
    Py_BEGIN_ALLOW_THREADS
    st = ds_cuda_importance(device, ptr_of(stream), ptr_of(handle), &a, ptr_of(ws), (size_t)ws_size);
    Py_END_ALLOW_THREADS
    if (st != DS_OK)
        return raise_status(st);
    Py_RETURN_NONE;
}

#ifdef DS_CUDA_EMULATE
/* ---- the host emulation's test hooks (never in the real module) --------- */
#include "../cuda/emu/cuda_emu_hooks.h"

static PyObject *py_emu_blas_handle(PyObject *self, PyObject *args)
{
    (void)self;
    long long stream = 0;
    if (!PyArg_ParseTuple(args, "|L", &stream))
        return NULL;
    return PyLong_FromVoidPtr(ds_emu_blas_handle(ptr_of(stream)));
}

static PyObject *py_emu_blas_handle_calls(PyObject *self, PyObject *args)
{
    (void)self;
    long long h;
    if (!PyArg_ParseTuple(args, "L", &h))
        return NULL;
    return PyLong_FromLongLong(ds_emu_blas_handle_calls(ptr_of(h)));
}

/* emu_blas_state(handle[, math_mode]) -> {'math_mode', 'reduced_calls'} */
static PyObject *py_emu_blas_state(PyObject *self, PyObject *args)
{
    (void)self;
    long long h;
    int mode = -1;
    if (!PyArg_ParseTuple(args, "L|i", &h, &mode))
        return NULL;
    int m = ds_emu_blas_math_mode(ptr_of(h), mode >= 0, mode);
    return Py_BuildValue("{s:i,s:L}", "math_mode", m, "reduced_calls", ds_emu_blas_reduced_calls(ptr_of(h)));
}

static PyObject *py_emu_faults(PyObject *self, PyObject *args)
{
    (void)self; (void)args;
    return PyLong_FromLong(ds_emu_faults());
}

/* emu_grouped_probe(atype, btype, ctype, compute, k, offset_bytes) ->
 * (cuBLAS status, faulted): one 8 x 8 x k grouped problem, A, B and C
 * offset_bytes past 256-byte aligned buffers */
static PyObject *py_emu_grouped_probe(PyObject *self, PyObject *args)
{
    (void)self;
    int at, bt, ct, compute, k, off;
    if (!PyArg_ParseTuple(args, "iiiiii", &at, &bt, &ct, &compute, &k, &off))
        return NULL;
    int faulted = 0;
    int st = ds_emu_grouped_probe(at, bt, ct, compute, k, off, &faulted);
    return Py_BuildValue("(iO)", st, faulted ? Py_True : Py_False);
}

static PyObject *py_emu_gemm_ex_probe(PyObject *self, PyObject *args)
{
    (void)self;
    int at, bt, ct, compute;
    if (!PyArg_ParseTuple(args, "iiii", &at, &bt, &ct, &compute))
        return NULL;
    return PyLong_FromLong(ds_emu_gemm_ex_probe(at, bt, ct, compute));
}
#endif

static PyMethodDef methods[] = {
#ifdef DS_CUDA_EMULATE
    {"emu_blas_handle", py_emu_blas_handle, METH_VARARGS,
     "emu_blas_handle(stream=0) -> the emulation's stand-in for torch's cuBLAS handle, bound to stream"},
    {"emu_blas_handle_calls", py_emu_blas_handle_calls, METH_VARARGS, "GEMM calls made on an emulated handle"},
    {"emu_blas_state", py_emu_blas_state, METH_VARARGS,
     "emu_blas_state(handle[, math_mode]) -> {'math_mode', 'reduced_calls'} of an emulated handle"},
    {"emu_faults", py_emu_faults, METH_NOARGS, "misaligned-address faults the emulated device has raised"},
    {"emu_grouped_probe", py_emu_grouped_probe, METH_VARARGS,
     "emu_grouped_probe(atype, btype, ctype, compute, k, offset) -> (status, faulted)"},
    {"emu_gemm_ex_probe", py_emu_gemm_ex_probe, METH_VARARGS,
     "emu_gemm_ex_probe(atype, btype, ctype, compute) -> status of the emulated cublasGemmEx"},
#endif
    {"device_count", py_device_count, METH_NOARGS, "visible CUDA devices (0 without a driver)"},
    {"status", py_status, METH_NOARGS, "runtime, driver, archs and why no device is usable"},
    {"selftest", py_selftest, METH_VARARGS, "run a small kernel on a device and check its output"},
    {"blas_load", py_blas_load, METH_VARARGS,
     "blas_load(paths, system=True) -> path: dlopen cuBLAS (first hit wins; idempotent)"},
    {"last_sync_seconds", py_last_sync_seconds, METH_NOARGS,
     "seconds this thread waited in the last CUDA op's one stream synchronisation"},
    {"last_gemm_grouped", py_last_gemm_grouped, METH_NOARGS,
     "whether every GEMM of this thread's last expert op ran in cublasGemmGroupedBatchedEx calls"},
    {"last_gemm_counts", py_last_gemm_counts, METH_NOARGS,
     "{'grouped', 'loop'}: GEMM problems of this thread's last expert op per path"},
    {"blas_info", py_blas_info, METH_NOARGS, "{'path', 'version'} of the loaded cuBLAS"},
    {"route_levels", py_route_levels, METH_VARARGS, "routing levels on the device (raw pointers)"},
    {"moe_check", py_moe_check, METH_VARARGS,
     "moe_check(args) -> workspace bytes: the host-side argument checks, no device needed"},
    {"moe_experts", py_moe_experts, METH_VARARGS, "moe_experts(device, stream, blas_handle, args, ws, ws_size)"},
    {"importance_check", py_importance_check, METH_VARARGS,
     "importance_check(device, stream, args, weighted, accum, counts, 0, 0) -> workspace bytes"},
    {"importance", py_importance, METH_VARARGS,
     "importance(device, stream, blas_handle, args, weighted, accum, counts, ws, ws_size)"},
    {"blas_forget_refusals", py_blas_forget_refusals, METH_NOARGS,
     "blas_forget_refusals(): try the grouped cuBLAS call again for dtypes it refused"},
    {"route_workspace_size", py_route_workspace_size, METH_NOARGS,
     "route_workspace_size() -> bytes of device workspace route_levels needs"},
    {NULL, NULL, 0, NULL}};

/* The tests build the same binding over the host emulation of csrc/cuda
 * (csrc/cuda/emu) as the module _C_cuda_emu. */
#ifdef DS_CUDA_EMULATE
#define DS_CUDA_MODULE_NAME "_C_cuda_emu"
#define DS_CUDA_MODULE_INIT PyInit__C_cuda_emu
#else
#define DS_CUDA_MODULE_NAME "dualsparse._C_cuda"
#define DS_CUDA_MODULE_INIT PyInit__C_cuda
#endif

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, DS_CUDA_MODULE_NAME,
                                       "dualsparse CUDA module", -1, methods,
                                       NULL, NULL, NULL, NULL};

PyMODINIT_FUNC DS_CUDA_MODULE_INIT(void) { return PyModule_Create(&moduledef); }
