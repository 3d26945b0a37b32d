/*
 * capi_ext.c - a CPython extension module written the way a user of
 * ptrbridge's C API writes one: it includes the *installed* header
 * (#include <ptrbridge.h> found through ptrbridge.get_include()), does not
 * link against anything, and calls pb_* by name.  The symbols resolve when
 * the module is imported after `import ptrbridge`.
 *
 *   copy_to_c(bytes) -> int   a pb_malloc'd copy; Python frees it
 *                              (ptrbridge.free) or C does (release_block)
 *   release_block(int) -> int pb_free status (PB_OK, PB_ERR_DOUBLE_FREE, ...)
 *   block_size(int) -> int    pb_alloc_size
 *   release_handle(int) -> int pb_handle_release status
 *   strerror(int) -> str      pb_strerror
 *   versions() -> (int, int)  (PB_API_VERSION compiled in, pb_api_version())
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <string.h>

#include <ptrbridge.h>

static PyObject *copy_to_c(PyObject *self, PyObject *arg)
{
    (void)self;
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    void *block = pb_malloc(view.len > 0 ? (size_t)view.len : 1);
    if (block == NULL) {
        PyBuffer_Release(&view);
        return PyErr_NoMemory();
    }
    if (view.len > 0)
        memcpy(block, view.buf, (size_t)view.len);
    PyBuffer_Release(&view);
    return PyLong_FromVoidPtr(block);
}

static PyObject *release_block(PyObject *self, PyObject *arg)
{
    (void)self;
    void *block = PyLong_AsVoidPtr(arg);
    if (block == NULL && PyErr_Occurred())
        return NULL;
    return PyLong_FromLong(pb_free(block));
}

static PyObject *block_size(PyObject *self, PyObject *arg)
{
    (void)self;
    void *block = PyLong_AsVoidPtr(arg);
    if (block == NULL && PyErr_Occurred())
        return NULL;
    return PyLong_FromSize_t(pb_alloc_size(block));
}

static PyObject *release_handle(PyObject *self, PyObject *arg)
{
    (void)self;
    unsigned long long token = PyLong_AsUnsignedLongLong(arg);
    if (token == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    int status;
    Py_BEGIN_ALLOW_THREADS /* pb_* never needs the GIL */
    status = pb_handle_release((uintptr_t)token);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(status);
}

static PyObject *strerror_(PyObject *self, PyObject *arg)
{
    (void)self;
    long status = PyLong_AsLong(arg);
    if (status == -1 && PyErr_Occurred())
        return NULL;
    return PyUnicode_FromString(pb_strerror((int)status));
}

static PyObject *versions(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return Py_BuildValue("(ii)", PB_API_VERSION, pb_api_version());
}

static PyMethodDef methods[] = {
    {"copy_to_c", copy_to_c, METH_O, "Copy a buffer into a pb_malloc'd block; return its address."},
    {"release_block", release_block, METH_O, "pb_free(address); return the status."},
    {"block_size", block_size, METH_O, "pb_alloc_size(address)."},
    {"release_handle", release_handle, METH_O, "pb_handle_release(token) without the GIL."},
    {"strerror", strerror_, METH_O, "pb_strerror(status)."},
    {"versions", versions, METH_NOARGS, "(PB_API_VERSION, pb_api_version())."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_capi_ext", "Uses ptrbridge's installed C header.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__capi_ext(void)
{
    return PyModule_Create(&module);
}
