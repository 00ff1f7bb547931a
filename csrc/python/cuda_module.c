/* dualsparse._C_cuda: the CPython binding of csrc/cuda.  Importing it never
 * touches the GPU; functions that need a device report clearly when there is
 * none. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

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

static PyMethodDef methods[] = {
    {"device_count", py_device_count, METH_NOARGS, "visible CUDA devices (0 without a driver)"},
    {"status", py_status, METH_NOARGS, "runtime, driver, archs and why no device is usable"},
    {"selftest", py_selftest, METH_VARARGS, "run a small kernel on a device and check its output"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "dualsparse._C_cuda",
                                       "dualsparse CUDA module", -1, methods,
                                       NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__C_cuda(void) { return PyModule_Create(&moduledef); }
