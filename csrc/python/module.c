/* dualsparse._C: the CPython binding of csrc/core.
 *
 * Each function follows one order: parse -> convert every argument to a view
 * (NumPy arrays through the NumPy C API, anything else through DLPack) ->
 * cross-check shapes, dtypes, devices and overlaps -> get workspace ->
 * release the GIL -> compute -> reacquire -> map the status to an exception.
 * A single fail path releases every reference taken. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "../core/ds_core.h"
#include "ds_dlpack.h"

#define NPY_NO_DEPRECATED_API NPY_1_20_API_VERSION
#define PY_ARRAY_UNIQUE_SYMBOL ds_ARRAY_API
#include <numpy/arrayobject.h>
/* <complex.h>, pulled in by NumPy, defines I; the engine names the
 * intermediate size I. */
#undef I

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#ifndef DS_BUILD_CFLAGS
#define DS_BUILD_CFLAGS "unknown"
#endif
#ifndef DS_BUILD_COMPILER
#define DS_BUILD_COMPILER "unknown"
#endif
#ifndef DS_CUDA_BUILD_STATUS
#define DS_CUDA_BUILD_STATUS "not built: unknown"
#endif

#define DS_MAX_DIMS 8

/* ------------------------------------------------------------------ views */

typedef struct {
    PyObject *keep;          /* capsule or array that keeps the memory alive */
    char *data;
    ds_dtype dtype;
    int ndim;
    int64_t shape[DS_MAX_DIMS];
    int64_t strides[DS_MAX_DIMS]; /* elements */
    int device_type;
    int device_id;
    int readonly;
} view_t;

static void view_release(view_t *v)
{
    Py_CLEAR(v->keep);
}

static int dl_to_dtype(ds_dl_dtype d, ds_dtype *out)
{
    if (d.lanes != 1)
        return 0;
    switch (d.code) {
    case DS_DL_FLOAT:
        if (d.bits == 32) { *out = DS_F32; return 1; }
        if (d.bits == 16) { *out = DS_F16; return 1; }
        if (d.bits == 64) { *out = DS_F64; return 1; }
        return 0;
    case DS_DL_BFLOAT:
        if (d.bits == 16) { *out = DS_BF16; return 1; }
        return 0;
    case DS_DL_INT:
        if (d.bits == 8) { *out = DS_I8; return 1; }
        if (d.bits == 16) { *out = DS_I16; return 1; }
        if (d.bits == 32) { *out = DS_I32; return 1; }
        if (d.bits == 64) { *out = DS_I64; return 1; }
        return 0;
    case DS_DL_UINT:
        if (d.bits == 8) { *out = DS_U8; return 1; }
        return 0;
    }
    return 0;
}

static int npy_to_dtype(int type_num, ds_dtype *out)
{
    switch (type_num) {
    case NPY_FLOAT32: *out = DS_F32; return 1;
    case NPY_FLOAT16: *out = DS_F16; return 1;
    case NPY_FLOAT64: *out = DS_F64; return 1;
    case NPY_INT8: *out = DS_I8; return 1;
    case NPY_UINT8: *out = DS_U8; return 1;
    case NPY_INT16: *out = DS_I16; return 1;
    case NPY_INT32: *out = DS_I32; return 1;
    case NPY_INT64: *out = DS_I64; return 1;
    default:
        if (type_num == NPY_LONG && sizeof(long) == 8) { *out = DS_I64; return 1; }
        if (type_num == NPY_LONGLONG) { *out = DS_I64; return 1; }
        if (type_num == NPY_INT && sizeof(int) == 4) { *out = DS_I32; return 1; }
        return 0;
    }
}

static const char *dev_name(int t)
{
    switch (t) {
    case DS_DL_CPU: return "cpu";
    case DS_DL_CUDA: return "cuda";
    case DS_DL_CUDA_HOST: return "cuda_host";
    case DS_DL_CUDA_MANAGED: return "cuda_managed";
    default: return "an unsupported device";
    }
}

static const char *type_name(PyObject *o) { return Py_TYPE(o)->tp_name; }

/* A torch tensor with the negative bit set is a lazy view: its memory holds
 * the un-negated values, and DLPack exports that memory without the flag.
 * Returns 1 and sets *which for such a tensor, 0 otherwise (errors of the
 * query are cleared: an object without is_neg() has no such bit).  The
 * conjugate bit needs no check: it exists only on complex tensors, whose
 * dtype the engine refuses by name. */
static int lazy_bit(PyObject *obj, const char **which)
{
    static PyObject *name = NULL;
    if (name == NULL && (name = PyUnicode_InternFromString("is_neg")) == NULL) {
        PyErr_Clear();
        return 0;
    }
    PyObject *argv[1] = {obj};
    PyObject *r = PyObject_VectorcallMethod(name, argv, 1 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    if (r == NULL) {
        PyErr_Clear();
        return 0;
    }
    int set = r == Py_True;
    Py_DECREF(r);
    if (set)
        *which = "negative";
    return set;
}

/* The producer's name of an object's dtype (e.g. "torch.complex64"), as a new
 * reference, or NULL (no error set) when it has none. */
static PyObject *dtype_repr(PyObject *obj)
{
    PyObject *d = PyObject_GetAttrString(obj, "dtype");
    if (d == NULL) {
        PyErr_Clear();
        return NULL;
    }
    PyObject *s = PyObject_Str(d);
    Py_DECREF(d);
    if (s == NULL)
        PyErr_Clear();
    return s;
}

static int view_from_obj(PyObject *obj, view_t *v, const char *fn, const char *arg);

/* Fills v from a NumPy array or any object with __dlpack__.  fn/arg name the
 * argument in messages.  A tensor with the negative bit set is refused (the engine would read the stored, un-negated values); inputs the
 * engine only reads go through view_from_input, which resolves such views. */
static int view_from(PyObject *obj, view_t *v, const char *fn, const char *arg)
{
    memset(v, 0, sizeof *v);
    if (!PyArray_Check(obj)) {
        const char *which = NULL;
        if (lazy_bit(obj, &which) > 0) {
            PyErr_Format(PyExc_ValueError, "%s: %s is a lazy %s view (its memory holds the values "
                         "before negation); the engine writes or reads this argument in place, so "
                         "resolve it once first, e.g. t = t.resolve_neg()", fn, arg, which);
            return -1;
        }
    }
    return view_from_obj(obj, v, fn, arg);
}

/* view_from for an argument the engine only reads: a lazy negative view is
 * resolved into a copy (kept alive by the view). */
static int view_from_input(PyObject *obj, view_t *v, const char *fn, const char *arg)
{
    memset(v, 0, sizeof *v);
    if (!PyArray_Check(obj)) {
        const char *which = NULL;
        if (lazy_bit(obj, &which) > 0) {
            (void)which;
            PyObject *r = PyObject_CallMethod(obj, "resolve_neg", NULL);
            if (r == NULL)
                return -1;
            int rc = view_from(r, v, fn, arg);
            Py_DECREF(r);
            return rc;
        }
    }
    return view_from_obj(obj, v, fn, arg);
}

static int view_from_obj(PyObject *obj, view_t *v, const char *fn, const char *arg)
{
    memset(v, 0, sizeof *v);
    if (PyArray_Check(obj)) {
        PyArrayObject *a = (PyArrayObject *)obj;
        if (!npy_to_dtype(PyArray_TYPE(a), &v->dtype)) {
            PyErr_Format(PyExc_TypeError, "%s: %s has unsupported NumPy dtype %R", fn, arg,
                         (PyObject *)PyArray_DESCR(a));
            return -1;
        }
        if (!PyArray_ISNOTSWAPPED(a)) {
            PyErr_Format(PyExc_TypeError, "%s: %s is not in native byte order", fn, arg);
            return -1;
        }
        int nd = PyArray_NDIM(a);
        if (nd > DS_MAX_DIMS) {
            PyErr_Format(PyExc_ValueError, "%s: %s has %d dimensions; at most %d are supported",
                         fn, arg, nd, DS_MAX_DIMS);
            return -1;
        }
        size_t esz = ds_dtype_size(v->dtype);
        v->data = PyArray_BYTES(a);
        v->ndim = nd;
        for (int i = 0; i < nd; i++) {
            npy_intp st = PyArray_STRIDES(a)[i];
            v->shape[i] = PyArray_DIMS(a)[i];
            if (st % (npy_intp)esz != 0) {
                PyErr_Format(PyExc_ValueError, "%s: %s has a stride of %zd bytes along dimension "
                             "%d, not a multiple of its %zu-byte elements (misaligned)",
                             fn, arg, (Py_ssize_t)st, i, esz);
                return -1;
            }
            v->strides[i] = st / (npy_intp)esz;
        }
        v->device_type = DS_DL_CPU;
        v->readonly = !PyArray_ISWRITEABLE(a);
        Py_INCREF(obj);
        v->keep = obj;
    } else {
        PyObject *meth = PyObject_GetAttrString(obj, "__dlpack__");
        if (meth == NULL) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "%s: %s must be a torch tensor or a NumPy array; got %s",
                         fn, arg, type_name(obj));
            return -1;
        }
        /* Ask where the data lives first (the protocol's __dlpack_device__),
         * so that a tensor on another device is named as such. */
        PyObject *dev = PyObject_CallMethod(obj, "__dlpack_device__", NULL);
        if (dev != NULL) {
            int dt = -1, did = 0;
            if (PyTuple_Check(dev) && PyTuple_GET_SIZE(dev) == 2) {
                dt = (int)PyLong_AsLong(PyTuple_GET_ITEM(dev, 0));
                did = (int)PyLong_AsLong(PyTuple_GET_ITEM(dev, 1));
            }
            Py_DECREF(dev);
            PyErr_Clear();
            if (dt != DS_DL_CPU && dt != DS_DL_CUDA_HOST) {
                PyObject *d = PyObject_GetAttrString(obj, "device");
                if (d == NULL) {
                    PyErr_Clear();
                    PyErr_Format(PyExc_ValueError, "%s: %s is on %s:%d, but this call runs on the CPU "
                                 "engine; move it to the CPU", fn, arg, dev_name(dt), did);
                } else {
                    PyErr_Format(PyExc_ValueError, "%s: %s is on %s:%d (device %S), but this call "
                                 "runs on the CPU engine; move it to the CPU", fn, arg, dev_name(dt),
                                 did, d);
                    Py_DECREF(d);
                }
                Py_DECREF(meth);
                return -1;
            }
        } else {
            PyErr_Clear();
        }
        PyObject *cap = PyObject_CallNoArgs(meth);
        Py_DECREF(meth);
        if (cap == NULL) {
            PyObject *et, *ev, *tb;
            PyErr_Fetch(&et, &ev, &tb);
            PyErr_NormalizeException(&et, &ev, &tb);
            PyErr_Format(PyExc_ValueError, "%s: %s cannot be read by the engine (%s: %S)", fn, arg,
                         et ? ((PyTypeObject *)et)->tp_name : "error", ev ? ev : Py_None);
            Py_XDECREF(et); Py_XDECREF(ev); Py_XDECREF(tb);
            return -1;
        }
        ds_dl_managed *m = (ds_dl_managed *)PyCapsule_GetPointer(cap, "dltensor");
        if (m == NULL) {
            Py_DECREF(cap);
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "%s: %s.__dlpack__() did not return a DLPack capsule",
                         fn, arg);
            return -1;
        }
        /* The capsule keeps the producer's memory alive; it is never
         * consumed, so its destructor calls the deleter when released. */
        v->keep = cap;
        ds_dl_tensor *t = &m->dl_tensor;
        if (!dl_to_dtype(t->dtype, &v->dtype)) {
            PyObject *dn = dtype_repr(obj);
            if (dn != NULL) {
                PyErr_Format(PyExc_TypeError, "%s: %s has unsupported dtype %S (the engine reads "
                             "float32, bfloat16, float16, float64 and integer tensors)", fn, arg, dn);
                Py_DECREF(dn);
            } else {
                PyErr_Format(PyExc_TypeError, "%s: %s has an unsupported dtype (DLPack code %d, "
                             "%d bits)", fn, arg, (int)t->dtype.code, (int)t->dtype.bits);
            }
            goto dl_fail;
        }
        if (t->ndim > DS_MAX_DIMS || t->ndim < 0) {
            PyErr_Format(PyExc_ValueError, "%s: %s has %d dimensions; at most %d are supported", fn,
                         arg, (int)t->ndim, DS_MAX_DIMS);
            goto dl_fail;
        }
        v->ndim = t->ndim;
        v->data = (char *)t->data + t->byte_offset;
        int64_t acc = 1;
        for (int i = t->ndim - 1; i >= 0; i--) {
            v->shape[i] = t->shape[i];
            v->strides[i] = t->strides ? t->strides[i] : acc;
            acc *= t->shape[i];
        }
        v->device_type = t->device.device_type;
        v->device_id = t->device.device_id;
        v->readonly = 0;
    }
    size_t esz = ds_dtype_size(v->dtype);
    if (esz > 1 && ((uintptr_t)v->data % esz) != 0) {
        int64_t n = 1;
        for (int i = 0; i < v->ndim; i++) n *= v->shape[i];
        if (n > 0) {
            PyErr_Format(PyExc_ValueError, "%s: %s data pointer %p is not aligned to its %zu-byte "
                         "elements (misaligned)", fn, arg, (void *)v->data, esz);
            view_release(v);
            return -1;
        }
    }
    return 0;
dl_fail:
    view_release(v);
    return -1;
}

static int64_t view_numel(const view_t *v)
{
    int64_t n = 1;
    for (int i = 0; i < v->ndim; i++) n *= v->shape[i];
    return n;
}

static int view_is_contiguous(const view_t *v)
{
    int64_t acc = 1;
    for (int i = v->ndim - 1; i >= 0; i--) {
        if (v->shape[i] != 1 && v->strides[i] != acc)
            return 0;
        acc *= v->shape[i];
    }
    return 1;
}

/* [lo, hi) byte extent of the elements a view can touch (empty if no elements). */
static void view_extent(const view_t *v, uintptr_t *lo, uintptr_t *hi)
{
    int64_t n = view_numel(v);
    if (n == 0) { *lo = *hi = 0; return; }
    int64_t mn = 0, mx = 0;
    for (int i = 0; i < v->ndim; i++) {
        int64_t span = (v->shape[i] - 1) * v->strides[i];
        if (span < 0) mn += span; else mx += span;
    }
    size_t esz = ds_dtype_size(v->dtype);
    *lo = (uintptr_t)v->data + (intptr_t)(mn * (int64_t)esz);
    *hi = (uintptr_t)v->data + (intptr_t)((mx + 1) * (int64_t)esz);
}

static int views_overlap(const view_t *a, const view_t *b)
{
    uintptr_t alo, ahi, blo, bhi;
    view_extent(a, &alo, &ahi);
    view_extent(b, &blo, &bhi);
    return alo < ahi && blo < bhi && alo < bhi && blo < ahi;
}

static int check_cpu(const view_t *v, const char *fn, const char *arg)
{
    if (v->device_type == DS_DL_CPU || v->device_type == DS_DL_CUDA_HOST)
        return 0;
    PyErr_Format(PyExc_ValueError, "%s: %s is on %s:%d, but this call runs on the CPU engine; "
                 "move it to the CPU (or use a CUDA build of dualsparse for CUDA tensors)",
                 fn, arg, dev_name(v->device_type), v->device_id);
    return -1;
}

static PyObject *shape_tuple(const view_t *v)
{
    PyObject *t = PyTuple_New(v->ndim);
    if (t == NULL) return NULL;
    for (int i = 0; i < v->ndim; i++) {
        PyObject *n = PyLong_FromLongLong(v->shape[i]);
        if (n == NULL) { Py_DECREF(t); return NULL; }
        PyTuple_SET_ITEM(t, i, n);
    }
    return t;
}

static int check_ndim(const view_t *v, int nd, const char *fn, const char *arg, const char *what)
{
    if (v->ndim == nd)
        return 0;
    PyObject *s = shape_tuple(v);
    if (s == NULL) return -1;
    PyErr_Format(PyExc_ValueError, "%s: %s must be %d-D %s; got shape %R", fn, arg, nd, what, s);
    Py_DECREF(s);
    return -1;
}

static int check_weight_dtype(const view_t *v, const char *fn, const char *arg)
{
    if (v->dtype == DS_F32 || v->dtype == DS_BF16 || v->dtype == DS_F16 || v->dtype == DS_F64)
        return 0;
    PyErr_Format(PyExc_TypeError, "%s: %s must be float32, bfloat16, float16 or float64; got %s", fn,
                 arg, ds_dtype_name(v->dtype));
    return -1;
}

static int check_real(const view_t *v, const char *fn, const char *arg)
{
    if (v->dtype == DS_F32 || v->dtype == DS_BF16 || v->dtype == DS_F16)
        return 0;
    PyErr_Format(PyExc_TypeError, "%s: %s must be float32, bfloat16 or float16; got %s", fn, arg,
                 ds_dtype_name(v->dtype));
    return -1;
}

/* 1 when two different indices of the view address overlapping memory (a
 * zero stride along a dimension of size > 1, or strides that interleave). */
static int view_self_overlaps(const view_t *v)
{
    int64_t span[DS_MAX_DIMS], ext[DS_MAX_DIMS];
    int n = 0;
    if (view_numel(v) == 0)
        return 0;
    for (int i = 0; i < v->ndim; i++) {
        if (v->shape[i] == 1)
            continue;
        int64_t st = v->strides[i] < 0 ? -v->strides[i] : v->strides[i];
        if (st == 0)
            return 1;
        /* insert sorted by stride */
        int j = n++;
        while (j > 0 && span[j - 1] > st) {
            span[j] = span[j - 1];
            ext[j] = ext[j - 1];
            j--;
        }
        span[j] = st;
        ext[j] = v->shape[i];
    }
    /* each stride must step past everything the smaller strides reach */
    int64_t reach = 1; /* elements covered by the dimensions so far */
    for (int j = 0; j < n; j++) {
        if (span[j] < reach)
            return 1;
        reach = span[j] * (ext[j] - 1) + reach;
    }
    return 0;
}

static int check_writable_out(const view_t *v, const char *fn, const char *arg)
{
    if (v->readonly) {
        PyErr_Format(PyExc_ValueError, "%s: %s is read-only", fn, arg);
        return -1;
    }
    return 0;
}

/* An output must not write two results to one place. */
static int check_distinct_out(const view_t *v, const char *fn, const char *arg)
{
    if (view_self_overlaps(v)) {
        PyErr_Format(PyExc_ValueError, "%s: %s has overlapping elements (a zero or interleaved "
                     "stride, e.g. from expand()); pass an output whose elements are distinct", fn, arg);
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------- snapshots */

/* The engine indexes memory with some inputs (expert ids, levels,
 * permutations) and reads routing weights more than once.  Each such input
 * is copied once, before the compute, into memory only this call owns; only
 * the copy is validated and used, so another thread writing to the caller's
 * array during the call can never turn a checked value into a bad index. */
typedef struct {
    void *buf;
    ds_mat m;
} snap_t;

static void snap_release(snap_t *s)
{
    free(s->buf);
    s->buf = NULL;
}

/* (rows, cols) view -> contiguous copy in the same dtype. */
static int snap_2d(const view_t *v, snap_t *s)
{
    int64_t R = v->ndim >= 1 ? v->shape[0] : 1, C = v->ndim >= 2 ? v->shape[1] : 1;
    int64_t s0 = v->ndim >= 1 ? v->strides[0] : 0, s1 = v->ndim >= 2 ? v->strides[1] : 0;
    size_t esz = ds_dtype_size(v->dtype);
    size_t n = (size_t)(R * C);
    s->buf = malloc(n ? n * esz : 1);
    if (s->buf == NULL) {
        PyErr_Format(PyExc_MemoryError, "could not allocate %zu bytes for a copy of the routing data",
                     n * esz);
        return -1;
    }
    char *dst = (char *)s->buf;
    const char *src = v->data;
    if (v->ndim == 2 && s1 == 1 && s0 == C) {
        memcpy(dst, src, n * esz);
    } else {
        for (int64_t r = 0; r < R; r++)
            for (int64_t c = 0; c < C; c++)
                memcpy(dst + (size_t)(r * C + c) * esz, src + (r * s0 + c * s1) * (int64_t)esz, esz);
    }
    s->m = (ds_mat){s->buf, v->dtype, C, 1};
    return 0;
}

/* ------------------------------------------------------------- errors */

static PyObject *status_exc(ds_status st)
{
    switch (st) {
    case DS_ERR_VALUE:
    case DS_ERR_SHAPE: return PyExc_ValueError;
    case DS_ERR_TYPE: return PyExc_TypeError;
    case DS_ERR_MEMORY: return PyExc_MemoryError;
    case DS_ERR_UNSUPPORTED: return PyExc_NotImplementedError;
    default: return PyExc_RuntimeError;
    }
}

static int raise_status(ds_status st, const char *msg)
{
    if (st == DS_OK)
        return 0;
    PyErr_SetString(status_exc(st), msg);
    return -1;
}

/* ------------------------------------------------------------ workspace */

/* One cached buffer reused across calls (no page faults on every call); a
 * caller that finds it in use by another thread gets a private one. */
static struct {
    pthread_mutex_t lock;
    void *buf;
    size_t size;
} ws_cache = {PTHREAD_MUTEX_INITIALIZER, NULL, 0};

typedef struct {
    void *ptr;
    size_t size;
    int cached;
} ws_t;

/* Called with the GIL held. */
static int ws_get(ws_t *w, size_t size)
{
    w->ptr = NULL;
    w->size = size;
    w->cached = 0;
    if (pthread_mutex_trylock(&ws_cache.lock) == 0) {
        if (ws_cache.size < size) {
            free(ws_cache.buf);
            ws_cache.buf = malloc(size);
            ws_cache.size = ws_cache.buf ? size : 0;
        }
        if (ws_cache.buf != NULL) {
            w->ptr = ws_cache.buf;
            w->cached = 1;
            return 0;
        }
        pthread_mutex_unlock(&ws_cache.lock);
    }
    w->ptr = malloc(size);
    if (w->ptr == NULL) {
        PyErr_Format(PyExc_MemoryError, "could not allocate %zu bytes of workspace", size);
        return -1;
    }
    return 0;
}

static void ws_put(ws_t *w)
{
    if (w->cached)
        pthread_mutex_unlock(&ws_cache.lock);
    else
        free(w->ptr);
    w->ptr = NULL;
}

/* Waits for a call in another thread to finish with the buffer: never with
 * the GIL held, since that call needs the GIL back before it can unlock. */
static PyObject *py_release_workspace(PyObject *self, PyObject *args)
{
    (void)self; (void)args;
    void *old;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&ws_cache.lock);
    old = ws_cache.buf;
    ws_cache.buf = NULL;
    ws_cache.size = 0;
    pthread_mutex_unlock(&ws_cache.lock);
    free(old);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* In a child after fork() only the forking thread exists: a lock that
 * another thread of the parent held would never be released, and the cache
 * may have been caught mid-update.  The child starts with a fresh lock and
 * an empty cache (the parent's buffer, if any, is left alone). */
static void ws_after_fork_child(void)
{
    pthread_mutex_init(&ws_cache.lock, NULL);
    ws_cache.buf = NULL;
    ws_cache.size = 0;
}

/* ------------------------------------------------------- argument helpers */

/* An int argument in [lo, hi]: TypeError for a non-integer, ValueError
 * (with the value) for anything out of range, however large. */
static int parse_int_arg(PyObject *o, long lo, long hi, int *out, const char *fn, const char *arg)
{
    if (!PyLong_Check(o) || PyBool_Check(o)) {
        PyErr_Format(PyExc_TypeError, "%s: %s must be an int; got %s", fn, arg, type_name(o));
        return -1;
    }
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (overflow != 0 || v < lo || v > hi) {
        PyErr_Format(PyExc_ValueError, "%s: %s must be in [%ld, %ld]; got %R", fn, arg, lo, hi, o);
        return -1;
    }
    *out = (int)v;
    return 0;
}

static int parse_threads(PyObject *o, int *n, const char *fn)
{
    return parse_int_arg(o, 1, ds_max_threads(), n, fn, "num_threads");
}

/* ---------------------------------------------------- expert weight sets */

typedef struct {
    int split;           /* 0: fused gate_up/down tensors, 1: per-expert lists */
    int n_views;
    view_t *views;       /* fused: [gate_up, down]; split: gates, ups, downs */
    void **ptrs;         /* 3*E pointers: gate, up, down */
    ds_experts w;
} experts_t;

static void experts_release(experts_t *x)
{
    if (x->views) {
        for (int i = 0; i < x->n_views; i++)
            view_release(&x->views[i]);
        PyMem_Free(x->views);
    }
    PyMem_Free(x->ptrs);
    memset(x, 0, sizeof *x);
}

static int weight_view(PyObject *o, view_t *v, const char *fn, const char *arg, int nd)
{
    if (view_from(o, v, fn, arg) < 0)
        return -1;
    if (nd < 0 && v->ndim != 3 && v->ndim != 4) { /* down_proj of the fused layout */
        PyObject *s = shape_tuple(v);
        if (s) {
            PyErr_Format(PyExc_ValueError, "%s: %s must be 3-D (E, H, I) or 4-D partition-major "
                         "(E, D, H, I / D) weights; got shape %R", fn, arg, s);
            Py_DECREF(s);
        }
        goto fail;
    }
    if (check_cpu(v, fn, arg) < 0 || (nd > 0 && check_ndim(v, nd, fn, arg, "weights") < 0) ||
        check_real(v, fn, arg) < 0)
        goto fail;
    if (view_numel(v) == 0) {
        PyObject *sh = shape_tuple(v);
        if (sh) {
            PyErr_Format(PyExc_ValueError, "%s: %s is empty (shape %R); experts need E, I, H >= 1",
                         fn, arg, sh);
            Py_DECREF(sh);
        }
        goto fail;
    }
    if (!view_is_contiguous(v)) {
        PyErr_Format(PyExc_ValueError, "%s: %s must be contiguous (the engine reads weights where "
                     "they lie and never copies them); make it contiguous once, e.g. "
                     "param.data = param.data.contiguous()", fn, arg);
        goto fail;
    }
    return 0;
fail:
    view_release(v);
    return -1;
}

/* Fused layout: gate_up (E, 2I, H), down (E, H, I) or partition-major
 * (E, D, H, I/D); dn may be None (importance reads only gate and up). */
static int experts_fused(PyObject *gu, PyObject *dn, experts_t *x, const char *fn)
{
    memset(x, 0, sizeof *x);
    x->views = PyMem_Calloc(2, sizeof(view_t));
    if (x->views == NULL) { PyErr_NoMemory(); return -1; }
    if (weight_view(gu, &x->views[0], fn, "gate_up_proj", 3) < 0)
        goto fail;
    x->n_views = 1;
    view_t *g = &x->views[0];
    int64_t E = g->shape[0], I2 = g->shape[1], H = g->shape[2];
    if (E < 1 || I2 < 2 || I2 % 2 != 0 || H < 1) {
        PyObject *s = shape_tuple(g);
        if (s) {
            PyErr_Format(PyExc_ValueError, "%s: gate_up_proj must have shape (E, 2*I, H) with E, I, "
                         "H >= 1 and an even middle dimension; got %R", fn, s);
            Py_DECREF(s);
        }
        goto fail;
    }
    int64_t I = I2 / 2;
    view_t *d = NULL;
    int64_t D = 0;
    if (dn != Py_None) {
        /* 3-D (E, H, I), or 4-D (E, D, H, I/D): the partition-major layout
         * of down (ds_core.h) */
        if (weight_view(dn, &x->views[1], fn, "down_proj", -1) < 0)
            goto fail;
        x->n_views = 2;
        d = &x->views[1];
        if (d->ndim == 4) {
            D = d->shape[1];
            if (d->shape[0] != E || d->shape[2] != H || D < 1 || D > 127 || D * d->shape[3] != I) {
                PyObject *s = shape_tuple(d);
                if (s) {
                    PyErr_Format(PyExc_ValueError, "%s: a 4-D down_proj is the partition-major layout "
                                 "(E, D, H, I / D) with D in [1, 127] dividing I = %lld, E = %lld and "
                                 "H = %lld from gate_up_proj; got %R", fn, (long long)I, (long long)E,
                                 (long long)H, s);
                    Py_DECREF(s);
                }
                goto fail;
            }
        } else if (d->shape[0] != E || d->shape[1] != H || d->shape[2] != I) {
            PyObject *s = shape_tuple(d);
            if (s) {
                PyErr_Format(PyExc_ValueError, "%s: down_proj must have shape (E, H, I) = (%lld, %lld, "
                             "%lld) to match gate_up_proj; got %R", fn, (long long)E, (long long)H,
                             (long long)I, s);
                Py_DECREF(s);
            }
            goto fail;
        }
        if (d->dtype != g->dtype) {
            PyErr_Format(PyExc_TypeError, "%s: down_proj is %s but gate_up_proj is %s; they must match",
                         fn, ds_dtype_name(d->dtype), ds_dtype_name(g->dtype));
            goto fail;
        }
        if (views_overlap(g, d)) {
            PyErr_Format(PyExc_ValueError, "%s: gate_up_proj and down_proj share memory", fn);
            goto fail;
        }
    }
    x->ptrs = PyMem_Calloc((size_t)(3 * E), sizeof(void *));
    if (x->ptrs == NULL) { PyErr_NoMemory(); goto fail; }
    size_t esz = ds_dtype_size(g->dtype);
    for (int64_t e = 0; e < E; e++) {
        x->ptrs[e] = g->data + (size_t)(e * 2 * I * H) * esz;
        x->ptrs[E + e] = g->data + (size_t)((e * 2 + 1) * I * H) * esz;
        x->ptrs[2 * E + e] = d ? d->data + (size_t)(e * H * I) * esz : x->ptrs[e];
    }
    x->w.E = E; x->w.I = I; x->w.H = H; x->w.dtype = g->dtype;
    x->w.gate = x->ptrs; x->w.up = x->ptrs + E; x->w.down = x->ptrs + 2 * E;
    x->w.ld_gu = H; x->w.ld_down = I;
    x->w.down_parts = D;
    return 0;
fail:
    experts_release(x);
    return -1;
}

/* Split layout: sequences of E tensors: gate (I, H), up (I, H), down (H, I)
 * (the transformers 4.x nn.Linear weights); downs may be None. */
static int experts_split(PyObject *gates, PyObject *ups, PyObject *downs, experts_t *x,
                         const char *fn)
{
    memset(x, 0, sizeof *x);
    x->split = 1;
    PyObject *seq[3] = {NULL, NULL, NULL};
    const char *names[3] = {"gate_proj", "up_proj", "down_proj"};
    PyObject *src[3] = {gates, ups, downs};
    int nlists = downs == Py_None ? 2 : 3;
    Py_ssize_t E = -1;
    for (int l = 0; l < nlists; l++) {
        seq[l] = PySequence_Fast(src[l], "");
        if (seq[l] == NULL) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "%s: %s must be a list or tuple of per-expert tensors; got %s",
                         fn, names[l], type_name(src[l]));
            goto fail;
        }
        Py_ssize_t n = PySequence_Fast_GET_SIZE(seq[l]);
        if (l == 0) E = n;
        if (n < 1) {
            PyErr_Format(PyExc_ValueError, "%s: %s is empty; pass one weight tensor per expert "
                         "(at least one expert)", fn, names[l]);
            goto fail;
        }
        if (n != E) {
            PyErr_Format(PyExc_ValueError, "%s: %s has %zd experts but gate_proj has %zd (one tensor "
                         "per expert in each list)", fn, names[l], n, E);
            goto fail;
        }
    }
    x->views = PyMem_Calloc((size_t)(3 * E), sizeof(view_t));
    x->ptrs = PyMem_Calloc((size_t)(3 * E), sizeof(void *));
    if (x->views == NULL || x->ptrs == NULL) { PyErr_NoMemory(); goto fail; }
    int64_t I = -1, H = -1;
    ds_dtype dt = DS_F32;
    char argname[64];
    for (int l = 0; l < nlists; l++)
        for (Py_ssize_t e = 0; e < E; e++) {
            view_t *v = &x->views[l * E + e];
            snprintf(argname, sizeof argname, "%s[%zd]", names[l], e);
            if (weight_view(PySequence_Fast_GET_ITEM(seq[l], e), v, fn, argname, 2) < 0)
                goto fail;
            x->n_views = (int)(l * E + e + 1);
            if (I < 0) { I = v->shape[0]; H = v->shape[1]; dt = v->dtype; }
            int64_t want0 = l == 2 ? H : I, want1 = l == 2 ? I : H;
            if (v->shape[0] != want0 || v->shape[1] != want1 || I < 1 || H < 1) {
                PyErr_Format(PyExc_ValueError, "%s: %s must have shape (%lld, %lld); got (%lld, %lld)",
                             fn, argname, (long long)want0, (long long)want1,
                             (long long)v->shape[0], (long long)v->shape[1]);
                goto fail;
            }
            if (v->dtype != dt) {
                PyErr_Format(PyExc_TypeError, "%s: %s is %s but gate_proj[0] is %s; all expert "
                             "weights must share one dtype", fn, argname, ds_dtype_name(v->dtype),
                             ds_dtype_name(dt));
                goto fail;
            }
            x->ptrs[l * E + e] = v->data;
        }
    if (nlists == 2)
        for (Py_ssize_t e = 0; e < E; e++)
            x->ptrs[2 * E + e] = x->ptrs[e];
    x->w.E = E; x->w.I = I; x->w.H = H; x->w.dtype = dt;
    x->w.gate = x->ptrs; x->w.up = x->ptrs + E; x->w.down = x->ptrs + 2 * E;
    x->w.ld_gu = H; x->w.ld_down = I;
    for (int l = 0; l < 3; l++) Py_XDECREF(seq[l]);
    return 0;
fail:
    for (int l = 0; l < 3; l++) Py_XDECREF(seq[l]);
    experts_release(x);
    return -1;
}

static int experts_parse(PyObject *gate_up, PyObject *up, PyObject *down, experts_t *x,
                         const char *fn)
{
    if (up == Py_None)
        return experts_fused(gate_up, down, x, fn);
    return experts_split(gate_up, up, down, x, fn);
}

static int experts_overlap(const experts_t *x, const view_t *v, const char *fn, const char *arg)
{
    for (int i = 0; i < x->n_views; i++)
        if (views_overlap(&x->views[i], v)) {
            PyErr_Format(PyExc_ValueError, "%s: %s shares memory with the expert weights", fn, arg);
            return -1;
        }
    return 0;
}

/* (T, K) routing matrices: ids, weights, levels; any strides. */
static int routing_view(PyObject *o, view_t *v, const char *fn, const char *arg, int64_t T,
                        int64_t K, int input)
{
    if ((input ? view_from_input(o, v, fn, arg) : view_from(o, v, fn, arg)) < 0)
        return -1;
    if (check_cpu(v, fn, arg) < 0 || check_ndim(v, 2, fn, arg, "(tokens, top_k)") < 0)
        goto fail;
    if (T >= 0 && (v->shape[0] != T || v->shape[1] != K)) {
        PyErr_Format(PyExc_ValueError, "%s: %s must have shape (T, K) = (%lld, %lld); got (%lld, %lld)",
                     fn, arg, (long long)T, (long long)K, (long long)v->shape[0],
                     (long long)v->shape[1]);
        goto fail;
    }
    return 0;
fail:
    view_release(v);
    return -1;
}

/* ------------------------------------------------------------ route_levels */

static PyObject *py_route_levels(PyObject *self, PyObject *args)
{
    (void)self;
    static const char fn[] = "route_levels";
    PyObject *w_o, *thr_o, *lv_o;
    int normalize;
    view_t w = {0}, lv = {0};
    PyObject *thr_seq = NULL;
    double *thr = NULL;
    snap_t wsnap = {0};
    if (!PyArg_ParseTuple(args, "OOpO", &w_o, &thr_o, &normalize, &lv_o))
        return NULL;
    if (PyDict_Check(thr_o) || PyAnySet_Check(thr_o) || PyUnicode_Check(thr_o) ||
        PyBytes_Check(thr_o) || (PyMapping_Check(thr_o) && !PySequence_Check(thr_o))) {
        PyErr_Format(PyExc_TypeError, "%s: thresholds must be a list or tuple of numbers (in "
                     "ascending order); got %s", fn, type_name(thr_o));
        return NULL;
    }
    thr_seq = PySequence_Fast(thr_o, "");
    if (thr_seq == NULL) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s: thresholds must be a sequence of floats; got %s", fn,
                     type_name(thr_o));
        goto fail;
    }
    Py_ssize_t P = PySequence_Fast_GET_SIZE(thr_seq);
    if (P < 1 || P > 127) {
        PyErr_Format(PyExc_ValueError, "%s: thresholds must hold 1 to 127 values; got %zd", fn, P);
        goto fail;
    }
    thr = PyMem_Malloc((size_t)P * sizeof(double));
    if (thr == NULL) { PyErr_NoMemory(); goto fail; }
    for (Py_ssize_t j = 0; j < P; j++) {
        PyObject *it = PySequence_Fast_GET_ITEM(thr_seq, j);
        if (PyBool_Check(it) || PyArray_IsScalar(it, Bool)) {
            PyErr_Format(PyExc_TypeError, "%s: thresholds[%zd] is %R, a bool; thresholds are "
                         "numbers (normalised scores lie in [0, 1])", fn, j, it);
            goto fail;
        }
        thr[j] = PyFloat_AsDouble(it);
        if (thr[j] == -1.0 && PyErr_Occurred()) {
            if (PyErr_ExceptionMatches(PyExc_OverflowError)) {
                PyErr_Clear();
                PyErr_Format(PyExc_ValueError, "%s: thresholds[%zd] = %R is too large for a float "
                             "(thresholds must be finite)", fn, j, it);
            } else {
                PyErr_Clear();
                PyErr_Format(PyExc_TypeError, "%s: thresholds[%zd] is not a real number (%s)", fn, j,
                             type_name(it));
            }
            goto fail;
        }
    }
    ds_status st = ds_check_thresholds(thr, (int)P);
    if (st != DS_OK) {
        PyErr_Format(status_exc(st), "%s: %s", fn, ds_last_error());
        goto fail;
    }
    if (routing_view(w_o, &w, fn, "topk_weights", -1, -1, 1) < 0 || check_weight_dtype(&w, fn, "topk_weights") < 0)
        goto fail;
    if (routing_view(lv_o, &lv, fn, "levels", w.shape[0], w.shape[1], 0) < 0 ||
        check_writable_out(&lv, fn, "levels") < 0 || check_distinct_out(&lv, fn, "levels") < 0)
        goto fail;
    if (lv.dtype != DS_I8 && lv.dtype != DS_I32) {
        PyErr_Format(PyExc_TypeError, "%s: levels must be int8 or int32; got %s", fn,
                     ds_dtype_name(lv.dtype));
        goto fail;
    }
    if (w.shape[1] < 1) {
        PyErr_Format(PyExc_ValueError, "%s: topk_weights needs at least one column (K >= 1)", fn);
        goto fail;
    }
    if (views_overlap(&w, &lv)) {
        PyErr_Format(PyExc_ValueError, "%s: levels shares memory with topk_weights", fn);
        goto fail;
    }
    if (snap_2d(&w, &wsnap) < 0)
        goto fail;
    Py_BEGIN_ALLOW_THREADS
    st = ds_route_levels(wsnap.m.data, w.dtype, w.shape[0], w.shape[1], wsnap.m.s0, wsnap.m.s1, thr,
                         (int)P, normalize, lv.data, lv.dtype, lv.strides[0], lv.strides[1]);
    Py_END_ALLOW_THREADS
    if (raise_status(st, ds_last_error()) < 0)
        goto fail;
    snap_release(&wsnap);
    view_release(&w);
    view_release(&lv);
    PyMem_Free(thr);
    Py_DECREF(thr_seq);
    Py_RETURN_NONE;
fail:
    snap_release(&wsnap);
    view_release(&w);
    view_release(&lv);
    PyMem_Free(thr);
    Py_XDECREF(thr_seq);
    return NULL;
}

/* ------------------------------------------------------------- moe_experts */

/* moe_experts(x, topk_ids, topk_weights, gate_up_or_gates, ups_or_None,
 *             down_or_downs, levels_or_None, num_partitions, out, num_threads)
 * x: T x H, topk_ids/topk_weights/levels: T x K, out: T x H */
static PyObject *py_moe_experts(PyObject *self, PyObject *args)
{
    (void)self;
    static const char fn[] = "moe_experts";
    PyObject *x_o, *ids_o, *tw_o, *gu_o, *up_o, *dn_o, *lv_o, *P_o, *out_o, *nt_o, *tm_o = Py_None;
    int P;
    int n_threads;
    view_t x = {0}, ids = {0}, tw = {0}, lv = {0}, out = {0}, tm = {0};
    snap_t ids_s = {0}, tw_s = {0}, lv_s = {0};
    experts_t ex = {0};
    ws_t ws = {0};
    if (!PyArg_ParseTuple(args, "OOOOOOOOOO|O", &x_o, &ids_o, &tw_o, &gu_o, &up_o, &dn_o, &lv_o,
                          &P_o, &out_o, &nt_o, &tm_o))
        return NULL;
    if (!PyLong_Check(P_o) || PyBool_Check(P_o)) {
        PyErr_Format(PyExc_TypeError, "%s: num_partitions must be an int; got %s", fn, type_name(P_o));
        return NULL;
    }
    {
        /* range-checked below, once I is known; out-of-range sizes become 0 */
        int overflow = 0;
        long long v = PyLong_AsLongLongAndOverflow(P_o, &overflow);
        if (v == -1 && PyErr_Occurred())
            return NULL;
        P = (overflow || v < 1 || v > 127) ? 0 : (int)v;
    }
    if (dn_o == Py_None) {
        PyErr_Format(PyExc_TypeError, "%s: down_proj is required", fn);
        return NULL;
    }
    if (parse_threads(nt_o, &n_threads, fn) < 0)
        return NULL;
    if (experts_parse(gu_o, up_o, dn_o, &ex, fn) < 0)
        return NULL;
    const int64_t H = ex.w.H, I = ex.w.I, E = ex.w.E;

    if (view_from_input(x_o, &x, fn, "x") < 0)
        goto fail;
    if (check_cpu(&x, fn, "x") < 0 || check_ndim(&x, 2, fn, "x", "(tokens, hidden)") < 0)
        goto fail;
    if (x.dtype != ex.w.dtype) {
        PyErr_Format(PyExc_TypeError, "%s: x is %s but the expert weights are %s; they must match",
                     fn, ds_dtype_name(x.dtype), ds_dtype_name(ex.w.dtype));
        goto fail;
    }
    if (x.shape[1] != H) {
        PyErr_Format(PyExc_ValueError, "%s: x has hidden size %lld but the expert weights expect H=%lld",
                     fn, (long long)x.shape[1], (long long)H);
        goto fail;
    }
    const int64_t T = x.shape[0];
    if (T > 0 && H > 1 && x.strides[1] != 1) {
        PyErr_Format(PyExc_ValueError, "%s: x must have unit stride along the hidden dimension; got "
                     "stride %lld", fn, (long long)x.strides[1]);
        goto fail;
    }
    if (T > 1 && x.strides[0] < H) {
        PyErr_Format(PyExc_ValueError, "%s: x rows overlap (row stride %lld < H=%lld)", fn,
                     (long long)x.strides[0], (long long)H);
        goto fail;
    }
    if (view_from_input(ids_o, &ids, fn, "topk_ids") < 0)
        goto fail;
    if (check_cpu(&ids, fn, "topk_ids") < 0 || check_ndim(&ids, 2, fn, "topk_ids", "(tokens, top_k)") < 0)
        goto fail;
    if (ids.dtype != DS_I32 && ids.dtype != DS_I64) {
        PyErr_Format(PyExc_TypeError, "%s: topk_ids must be int32 or int64; got %s", fn,
                     ds_dtype_name(ids.dtype));
        goto fail;
    }
    if (ids.shape[0] != T) {
        PyErr_Format(PyExc_ValueError, "%s: topk_ids has %lld rows but x has T=%lld tokens", fn,
                     (long long)ids.shape[0], (long long)T);
        goto fail;
    }
    const int64_t K = ids.shape[1];
    if (K < 1) {
        PyErr_Format(PyExc_ValueError, "%s: topk_ids must have at least one column (K >= 1)", fn);
        goto fail;
    }
    if (K > E) {
        PyErr_Format(PyExc_ValueError, "%s: topk_ids has K=%lld columns but there are only E=%lld "
                     "experts (K must be <= E)", fn, (long long)K, (long long)E);
        goto fail;
    }
    if (routing_view(tw_o, &tw, fn, "topk_weights", T, K, 1) < 0 || check_weight_dtype(&tw, fn, "topk_weights") < 0)
        goto fail;
    if (lv_o != Py_None) {
        if (routing_view(lv_o, &lv, fn, "levels", T, K, 1) < 0)
            goto fail;
        if (!(lv.dtype == DS_I8 || lv.dtype == DS_U8 || lv.dtype == DS_I16 || lv.dtype == DS_I32 ||
              lv.dtype == DS_I64)) {
            PyErr_Format(PyExc_TypeError, "%s: levels must be an integer array; got %s", fn,
                         ds_dtype_name(lv.dtype));
            goto fail;
        }
    }
    if (P < 1 || P > I) {
        PyErr_Format(PyExc_ValueError, "%s: num_partitions must be in [1, min(127, I=%lld)]; got %R",
                     fn, (long long)I, P_o);
        goto fail;
    }
    if (view_from(out_o, &out, fn, "out") < 0)
        goto fail;
    if (check_cpu(&out, fn, "out") < 0 || check_ndim(&out, 2, fn, "out", "(tokens, hidden)") < 0 ||
        check_writable_out(&out, fn, "out") < 0)
        goto fail;
    if (out.shape[0] != T || out.shape[1] != H) {
        PyErr_Format(PyExc_ValueError, "%s: out must have shape (T, H) = (%lld, %lld); got (%lld, %lld)",
                     fn, (long long)T, (long long)H, (long long)out.shape[0], (long long)out.shape[1]);
        goto fail;
    }
    if (out.dtype != x.dtype) {
        PyErr_Format(PyExc_TypeError, "%s: out is %s but x is %s; they must match", fn,
                     ds_dtype_name(out.dtype), ds_dtype_name(x.dtype));
        goto fail;
    }
    if (T > 0 && ((H > 1 && out.strides[1] != 1) || (T > 1 && out.strides[0] < H))) {
        PyErr_Format(PyExc_ValueError, "%s: out must have unit stride along H and non-overlapping rows; "
                     "got strides (%lld, %lld)", fn, (long long)out.strides[0], (long long)out.strides[1]);
        goto fail;
    }
    if (check_distinct_out(&out, fn, "out") < 0)
        goto fail;
    if (views_overlap(&out, &x) || views_overlap(&out, &ids) || views_overlap(&out, &tw) ||
        (lv.keep && views_overlap(&out, &lv))) {
        PyErr_Format(PyExc_ValueError, "%s: out shares memory with an input (x, topk_ids, "
                     "topk_weights or levels); pass a separate output tensor", fn);
        goto fail;
    }
    if (experts_overlap(&ex, &out, fn, "out") < 0)
        goto fail;
    if (tm_o != Py_None) {
        if (view_from(tm_o, &tm, fn, "timings") < 0)
            goto fail;
        if (tm.dtype != DS_F64 || tm.ndim != 1 || tm.shape[0] != 4 || tm.strides[0] != 1 ||
            tm.readonly || check_cpu(&tm, fn, "timings") < 0) {
            if (!PyErr_Occurred())
                PyErr_Format(PyExc_ValueError, "%s: timings must be a writable contiguous float64 "
                             "array of 4 values", fn);
            goto fail;
        }
        if (views_overlap(&tm, &out) || views_overlap(&tm, &x) || views_overlap(&tm, &ids) ||
            views_overlap(&tm, &tw) || (lv.keep && views_overlap(&tm, &lv))) {
            PyErr_Format(PyExc_ValueError, "%s: timings shares memory with another argument (out, x, "
                         "topk_ids, topk_weights or levels); pass a separate float64 array of 4", fn);
            goto fail;
        }
        if (experts_overlap(&ex, &tm, fn, "timings") < 0)
            goto fail;
    }

    /* routing data: one read into memory this call owns */
    if (snap_2d(&ids, &ids_s) < 0 || snap_2d(&tw, &tw_s) < 0 || (lv.keep && snap_2d(&lv, &lv_s) < 0))
        goto fail;
    ds_moe_args a;
    memset(&a, 0, sizeof a);
    a.T = T; a.K = K; a.P = P;
    a.x = x.data; a.ldx = T > 1 ? x.strides[0] : H;
    a.topk_ids = ids_s.m;
    a.topk_weights = tw_s.m;
    a.levels = lv.keep ? lv_s.m : (ds_mat){NULL, lv.dtype, 0, 0};
    a.out = out.data; a.ldo = T > 1 ? out.strides[0] : H;
    a.timings = tm.keep ? (double *)tm.data : NULL;
    ds_status st = DS_OK;
    if (T > 0) {
        size_t need = ds_moe_workspace_size(&ex.w, &a, n_threads);
        if (ws_get(&ws, need) < 0)
            goto fail;
        Py_BEGIN_ALLOW_THREADS
        st = ds_moe_experts(&ex.w, &a, ws.ptr, ws.size, n_threads);
        Py_END_ALLOW_THREADS
        ws_put(&ws);
    }
    if (raise_status(st, ds_last_error()) < 0)
        goto fail;
    view_release(&x); view_release(&ids); view_release(&tw); view_release(&lv); view_release(&out);
    view_release(&tm);
    snap_release(&ids_s); snap_release(&tw_s); snap_release(&lv_s);
    experts_release(&ex);
    Py_RETURN_NONE;
fail:
    view_release(&x); view_release(&ids); view_release(&tw); view_release(&lv); view_release(&out);
    view_release(&tm);
    snap_release(&ids_s); snap_release(&tw_s); snap_release(&lv_s);
    experts_release(&ex);
    return NULL;
}

/* -------------------------------------------------------------- importance */

/* importance(x, topk_ids, topk_weights_or_None, gate_up_or_gates,
 *            ups_or_None, accum, counts_or_None, num_threads)
 * accum: 4 x E x I float64 (gate, abs_gate, gate_up, abs_gate_up) */
static PyObject *py_importance(PyObject *self, PyObject *args)
{
    (void)self;
    static const char fn[] = "importance";
    PyObject *x_o, *ids_o, *tw_o, *gu_o, *up_o, *acc_o, *cnt_o, *nt_o;
    int n_threads;
    view_t x = {0}, ids = {0}, tw = {0}, acc = {0}, cnt = {0};
    snap_t ids_s = {0}, tw_s = {0};
    experts_t ex = {0};
    ws_t ws = {0};
    if (!PyArg_ParseTuple(args, "OOOOOOOO", &x_o, &ids_o, &tw_o, &gu_o, &up_o, &acc_o, &cnt_o, &nt_o))
        return NULL;
    if (parse_threads(nt_o, &n_threads, fn) < 0)
        return NULL;
    if (experts_parse(gu_o, up_o, Py_None, &ex, fn) < 0)
        return NULL;
    const int64_t H = ex.w.H, I = ex.w.I, E = ex.w.E;
    if (view_from_input(x_o, &x, fn, "x") < 0)
        goto fail;
    if (check_cpu(&x, fn, "x") < 0 || check_ndim(&x, 2, fn, "x", "(tokens, hidden)") < 0)
        goto fail;
    if (x.dtype != ex.w.dtype) {
        PyErr_Format(PyExc_TypeError, "%s: x is %s but the expert weights are %s; they must match",
                     fn, ds_dtype_name(x.dtype), ds_dtype_name(ex.w.dtype));
        goto fail;
    }
    if (x.shape[1] != H) {
        PyErr_Format(PyExc_ValueError, "%s: x has hidden size %lld but the expert weights expect H=%lld",
                     fn, (long long)x.shape[1], (long long)H);
        goto fail;
    }
    const int64_t T = x.shape[0];
    if (T > 0 && ((H > 1 && x.strides[1] != 1) || (T > 1 && x.strides[0] < H))) {
        PyErr_Format(PyExc_ValueError, "%s: x must have unit stride along H and non-overlapping rows",
                     fn);
        goto fail;
    }
    if (view_from_input(ids_o, &ids, fn, "topk_ids") < 0)
        goto fail;
    if (check_cpu(&ids, fn, "topk_ids") < 0 || check_ndim(&ids, 2, fn, "topk_ids", "(tokens, top_k)") < 0)
        goto fail;
    if (ids.dtype != DS_I32 && ids.dtype != DS_I64) {
        PyErr_Format(PyExc_TypeError, "%s: topk_ids must be int32 or int64; got %s", fn,
                     ds_dtype_name(ids.dtype));
        goto fail;
    }
    if (ids.shape[0] != T || ids.shape[1] < 1 || ids.shape[1] > E) {
        PyErr_Format(PyExc_ValueError, "%s: topk_ids must have shape (T=%lld, K) with 1 <= K <= E=%lld; "
                     "got (%lld, %lld)", fn, (long long)T, (long long)E, (long long)ids.shape[0],
                     (long long)ids.shape[1]);
        goto fail;
    }
    const int64_t K = ids.shape[1];
    if (tw_o != Py_None &&
        (routing_view(tw_o, &tw, fn, "topk_weights", T, K, 1) < 0 || check_weight_dtype(&tw, fn, "topk_weights") < 0))
        goto fail;
    if (view_from(acc_o, &acc, fn, "accum") < 0)
        goto fail;
    if (check_cpu(&acc, fn, "accum") < 0 || check_writable_out(&acc, fn, "accum") < 0)
        goto fail;
    if (acc.dtype != DS_F64) {
        PyErr_Format(PyExc_TypeError, "%s: accum must be float64; got %s", fn, ds_dtype_name(acc.dtype));
        goto fail;
    }
    if (acc.ndim != 3 || acc.shape[0] != DS_NUM_METRICS || acc.shape[1] != E || acc.shape[2] != I ||
        !view_is_contiguous(&acc)) {
        PyObject *sh = shape_tuple(&acc);
        if (sh) {
            PyErr_Format(PyExc_ValueError, "%s: accum must be a contiguous array of shape (4, E, I) = "
                         "(4, %lld, %lld); got shape %R%s", fn, (long long)E, (long long)I, sh,
                         view_is_contiguous(&acc) ? "" : " (not contiguous)");
            Py_DECREF(sh);
        }
        goto fail;
    }
    if (cnt_o != Py_None) {
        if (view_from(cnt_o, &cnt, fn, "counts") < 0)
            goto fail;
        if (check_cpu(&cnt, fn, "counts") < 0 || check_writable_out(&cnt, fn, "counts") < 0)
            goto fail;
        if (cnt.dtype != DS_F64) {
            PyErr_Format(PyExc_TypeError, "%s: counts must be float64; got %s", fn,
                         ds_dtype_name(cnt.dtype));
            goto fail;
        }
        if (cnt.ndim != 1 || cnt.shape[0] != E || !view_is_contiguous(&cnt)) {
            PyObject *sh = shape_tuple(&cnt);
            if (sh) {
                PyErr_Format(PyExc_ValueError, "%s: counts must be a contiguous array of shape (E,) = "
                             "(%lld,); got shape %R", fn, (long long)E, sh);
                Py_DECREF(sh);
            }
            goto fail;
        }
        if (views_overlap(&cnt, &acc)) {
            PyErr_Format(PyExc_ValueError, "%s: counts shares memory with accum", fn);
            goto fail;
        }
    }
    if (views_overlap(&acc, &x) || views_overlap(&acc, &ids) || (tw.keep && views_overlap(&acc, &tw)) ||
        experts_overlap(&ex, &acc, fn, "accum") < 0) {
        if (!PyErr_Occurred())
            PyErr_Format(PyExc_ValueError, "%s: accum shares memory with an input", fn);
        goto fail;
    }
    if (cnt.keep && (views_overlap(&cnt, &x) || views_overlap(&cnt, &ids) ||
                     (tw.keep && views_overlap(&cnt, &tw)) || experts_overlap(&ex, &cnt, fn, "counts") < 0)) {
        if (!PyErr_Occurred())
            PyErr_Format(PyExc_ValueError, "%s: counts shares memory with an input", fn);
        goto fail;
    }
    /* routing data: one read into memory this call owns */
    if (snap_2d(&ids, &ids_s) < 0 || (tw.keep && snap_2d(&tw, &tw_s) < 0))
        goto fail;
    ds_importance_args a;
    memset(&a, 0, sizeof a);
    a.T = T; a.K = K; a.x = x.data; a.ldx = T > 1 ? x.strides[0] : H;
    a.topk_ids = ids_s.m;
    a.topk_weights = tw.keep ? tw_s.m : (ds_mat){NULL, tw.dtype, 0, 0};
    a.weighted = tw.keep != NULL;
    a.accum = (double *)acc.data;
    a.counts = cnt.keep ? (double *)cnt.data : NULL;
    ds_status st = DS_OK;
    if (T > 0) {
        size_t need = ds_importance_workspace_size(&ex.w, &a, n_threads);
        if (ws_get(&ws, need) < 0)
            goto fail;
        Py_BEGIN_ALLOW_THREADS
        st = ds_importance_accumulate(&ex.w, &a, ws.ptr, ws.size, n_threads);
        Py_END_ALLOW_THREADS
        ws_put(&ws);
    }
    if (raise_status(st, ds_last_error()) < 0)
        goto fail;
    view_release(&x); view_release(&ids); view_release(&tw); view_release(&acc); view_release(&cnt);
    snap_release(&ids_s); snap_release(&tw_s);
    experts_release(&ex);
    Py_RETURN_NONE;
fail:
    view_release(&x); view_release(&ids); view_release(&tw); view_release(&acc); view_release(&cnt);
    snap_release(&ids_s); snap_release(&tw_s);
    experts_release(&ex);
    return NULL;
}

/* --------------------------------------------------------- reconstruction */

/* importance_order(importance (E, I) float64, perm_out (E, I) int64) */
static PyObject *py_importance_order(PyObject *self, PyObject *args)
{
    (void)self;
    static const char fn[] = "importance_order";
    PyObject *imp_o, *perm_o;
    view_t imp = {0}, perm = {0};
    snap_t imp_s = {0};
    if (!PyArg_ParseTuple(args, "OO", &imp_o, &perm_o))
        return NULL;
    if (view_from_input(imp_o, &imp, fn, "importance") < 0)
        goto fail;
    if (check_cpu(&imp, fn, "importance") < 0 || check_ndim(&imp, 2, fn, "importance", "(experts, neurons)") < 0)
        goto fail;
    if (imp.dtype != DS_F64 || !view_is_contiguous(&imp) || imp.shape[0] < 1 || imp.shape[1] < 1) {
        PyErr_Format(PyExc_ValueError, "%s: importance must be a non-empty contiguous float64 (E, I) "
                     "array; got %s", fn, ds_dtype_name(imp.dtype));
        goto fail;
    }
    if (view_from(perm_o, &perm, fn, "perm") < 0)
        goto fail;
    if (check_cpu(&perm, fn, "perm") < 0 || check_writable_out(&perm, fn, "perm") < 0)
        goto fail;
    if (perm.dtype != DS_I64 || perm.ndim != 2 || perm.shape[0] != imp.shape[0] ||
        perm.shape[1] != imp.shape[1] || !view_is_contiguous(&perm) || views_overlap(&perm, &imp)) {
        PyErr_Format(PyExc_ValueError, "%s: perm must be a separate contiguous int64 array of shape "
                     "(%lld, %lld)", fn, (long long)imp.shape[0], (long long)imp.shape[1]);
        goto fail;
    }
    /* one read of the keys into memory this call owns */
    if (snap_2d(&imp, &imp_s) < 0)
        goto fail;
    ds_status st;
    Py_BEGIN_ALLOW_THREADS
    st = ds_importance_order((const double *)imp_s.buf, imp.shape[0], imp.shape[1], (int64_t *)perm.data);
    Py_END_ALLOW_THREADS
    if (st != DS_OK) {
        PyErr_Format(status_exc(st), "%s", ds_last_error());
        goto fail;
    }
    snap_release(&imp_s);
    view_release(&imp); view_release(&perm);
    Py_RETURN_NONE;
fail:
    snap_release(&imp_s);
    view_release(&imp); view_release(&perm);
    return NULL;
}

/* permute_neurons(gate_up_or_gates, ups_or_None, down_or_downs, perm, inverse, num_threads) */
static PyObject *py_permute_neurons(PyObject *self, PyObject *args)
{
    (void)self;
    static const char fn[] = "permute_neurons";
    PyObject *gu_o, *up_o, *dn_o, *perm_o, *nt_o;
    int inverse, n_threads;
    view_t perm = {0};
    snap_t perm_s = {0};
    experts_t ex = {0};
    if (!PyArg_ParseTuple(args, "OOOOpO", &gu_o, &up_o, &dn_o, &perm_o, &inverse, &nt_o))
        return NULL;
    if (dn_o == Py_None) {
        PyErr_Format(PyExc_TypeError, "%s: down_proj is required", fn);
        return NULL;
    }
    if (parse_threads(nt_o, &n_threads, fn) < 0)
        return NULL;
    if (experts_parse(gu_o, up_o, dn_o, &ex, fn) < 0)
        return NULL;
    for (int i = 0; i < ex.n_views; i++)
        if (ex.views[i].readonly) {
            PyErr_Format(PyExc_ValueError, "%s: the expert weights are read-only", fn);
            goto fail;
        }
    if (ex.split) {
        /* every per-expert matrix must be distinct memory, or a permutation
         * would be applied twice */
        for (int i = 0; i < ex.n_views; i++)
            for (int j = i + 1; j < ex.n_views; j++)
                if (views_overlap(&ex.views[i], &ex.views[j])) {
                    PyErr_Format(PyExc_ValueError, "%s: two expert weight matrices share memory "
                                 "(entries %d and %d); cannot permute them independently", fn, i, j);
                    goto fail;
                }
    }
    if (view_from_input(perm_o, &perm, fn, "perm") < 0)
        goto fail;
    if (check_cpu(&perm, fn, "perm") < 0)
        goto fail;
    if (perm.dtype != DS_I64 || perm.ndim != 2 || perm.shape[0] != ex.w.E || perm.shape[1] != ex.w.I ||
        !view_is_contiguous(&perm)) {
        PyErr_Format(PyExc_ValueError, "%s: perm must be a contiguous int64 array of shape (E, I) = "
                     "(%lld, %lld)", fn, (long long)ex.w.E, (long long)ex.w.I);
        goto fail;
    }
    if (experts_overlap(&ex, &perm, fn, "perm") < 0)
        goto fail;
    /* one read of perm into memory this call owns; only the copy is checked
     * and used */
    if (snap_2d(&perm, &perm_s) < 0)
        goto fail;
    ds_status st = ds_check_permutation((const int64_t *)perm_s.buf, ex.w.E, ex.w.I);
    if (st != DS_OK) {
        PyErr_Format(status_exc(st), "%s: %s", fn, ds_last_error());
        goto fail;
    }
    size_t need = ds_permute_workspace_size(&ex.w, n_threads);
    void *wsp = malloc(need);
    if (wsp == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    Py_BEGIN_ALLOW_THREADS
    st = ds_permute_neurons(&ex.w, (const int64_t *)perm_s.buf, inverse, wsp, need, n_threads);
    Py_END_ALLOW_THREADS
    free(wsp);
    if (st != DS_OK) {
        PyErr_Format(status_exc(st), "%s", ds_last_error());
        goto fail;
    }
    snap_release(&perm_s);
    view_release(&perm);
    experts_release(&ex);
    Py_RETURN_NONE;
fail:
    snap_release(&perm_s);
    view_release(&perm);
    experts_release(&ex);
    return NULL;
}

/* ------------------------------------------------------------ information */

static PyObject *py_simd_level(PyObject *self, PyObject *args)
{
    (void)self; (void)args;
    return PyUnicode_FromString(ds_simd_name(ds_simd_active()));
}

static PyObject *py_simd_levels(PyObject *self, PyObject *args)
{
    (void)self; (void)args;
    PyObject *d = PyDict_New();
    if (d == NULL) return NULL;
    ds_simd_level best = ds_simd_detected();
    for (int l = DS_SIMD_GENERIC; l <= DS_SIMD_AMX_BF16; l++) {
        PyObject *avail = PyBool_FromLong(ds_simd_compiled((ds_simd_level)l) && l <= (int)best);
        if (avail == NULL || PyDict_SetItemString(d, ds_simd_name((ds_simd_level)l), avail) < 0) {
            Py_XDECREF(avail);
            Py_DECREF(d);
            return NULL;
        }
        Py_DECREF(avail);
    }
    return d;
}

static PyObject *py_block_gemm(PyObject *self, PyObject *args)
{
    (void)self; (void)args;
    return PyBool_FromLong(ds_block_gemm_enabled());
}

static PyObject *py_set_block_gemm(PyObject *self, PyObject *arg)
{
    (void)self;
    if (!PyBool_Check(arg)) {
        PyErr_Format(PyExc_TypeError, "set_block_gemm: enabled must be True or False; got %s",
                     Py_TYPE(arg)->tp_name);
        return NULL;
    }
    ds_block_gemm_set(arg == Py_True);
    Py_RETURN_NONE;
}

static PyObject *py_rows_four(PyObject *self, PyObject *args)
{
    (void)self; (void)args;
    return PyBool_FromLong(ds_rows_four_rule());
}

static PyObject *py_set_rows_four(PyObject *self, PyObject *arg)
{
    (void)self;
    if (arg != Py_None && !PyBool_Check(arg)) {
        PyErr_Format(PyExc_TypeError, "set_rows_four: four must be True, False or None; got %s",
                     Py_TYPE(arg)->tp_name);
        return NULL;
    }
    ds_rows_four_set(arg == Py_None ? -1 : arg == Py_True);
    Py_RETURN_NONE;
}

static PyObject *py_set_simd_level(PyObject *self, PyObject *args)
{
    (void)self;
    const char *name;
    if (!PyArg_ParseTuple(args, "s", &name))
        return NULL;
    for (int l = DS_SIMD_GENERIC; l <= DS_SIMD_AMX_BF16; l++)
        if (strcmp(name, ds_simd_name((ds_simd_level)l)) == 0) {
            ds_status st = ds_simd_set((ds_simd_level)l);
            if (st != DS_OK) {
                PyErr_Format(status_exc(st), "set_simd_level: %s", ds_last_error());
                return NULL;
            }
            Py_RETURN_NONE;
        }
    PyErr_Format(PyExc_ValueError, "set_simd_level: level must be one of 'generic', 'avx2', "
                 "'avx512', 'avx512_bf16', 'amx_bf16'; got %R", PyTuple_GET_ITEM(args, 0));
    return NULL;
}

static PyObject *py_build_info(PyObject *self, PyObject *args)
{
    (void)self; (void)args;
    return Py_BuildValue("{s:s,s:s,s:s,s:s,s:i,s:I}", "version", DS_VERSION_STRING, "compiler",
                         DS_BUILD_COMPILER, "cflags", DS_BUILD_CFLAGS, "cuda", DS_CUDA_BUILD_STATUS,
                         "max_threads", ds_max_threads(), "numpy_feature_version",
                         (unsigned)NPY_FEATURE_VERSION);
}

static PyMethodDef methods[] = {
    {"route_levels", py_route_levels, METH_VARARGS, "route_levels(topk_weights, thresholds, normalize, levels_out)"},
    {"moe_experts", py_moe_experts, METH_VARARGS,
     "moe_experts(x, topk_ids, topk_weights, gate_up_or_gates, ups_or_None, down_or_downs, levels, num_partitions, out, num_threads[, timings])"},
    {"importance", py_importance, METH_VARARGS,
     "importance(x, topk_ids, topk_weights_or_None, gate_up_or_gates, ups_or_None, accum, counts_or_None, num_threads)"},
    {"importance_order", py_importance_order, METH_VARARGS, "importance_order(importance, perm_out)"},
    {"permute_neurons", py_permute_neurons, METH_VARARGS,
     "permute_neurons(gate_up_or_gates, ups_or_None, down_or_downs, perm, inverse, num_threads)"},
    {"simd_level", py_simd_level, METH_NOARGS, "the SIMD level in use"},
    {"simd_levels", py_simd_levels, METH_NOARGS, "{level: usable here}"},
    {"set_simd_level", py_set_simd_level, METH_VARARGS, "force a SIMD level at or below the detected one"},
    {"block_gemm", py_block_gemm, METH_NOARGS, "whether levels with a block GEMM use it"},
    {"set_block_gemm", py_set_block_gemm, METH_O, "use (True) or bypass (False) the block GEMM"},
    {"rows_four", py_rows_four, METH_NOARGS, "whether the GEMV-shaped kernel takes weight rows four at a time"},
    {"set_rows_four", py_set_rows_four, METH_O, "weight rows four at a time (True), one (False), the CPU's rule (None)"},
    {"build_info", py_build_info, METH_NOARGS, "how this extension was built"},
    {"release_workspace", py_release_workspace, METH_NOARGS, "free the cached workspace buffer"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "dualsparse._C",
                                       "dualsparse C engine (csrc/core) binding", -1, methods,
                                       NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__C(void)
{
    static int atfork_registered = 0;
    import_array();
    if (!atfork_registered) {
        if (pthread_atfork(NULL, NULL, ws_after_fork_child) != 0) {
            PyErr_SetString(PyExc_RuntimeError, "dualsparse._C: pthread_atfork failed");
            return NULL;
        }
        atfork_registered = 1;
    }
    return PyModule_Create(&moduledef);
}
