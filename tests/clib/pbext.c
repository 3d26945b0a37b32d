/*
 * pbext.c - a small CPython extension module (plain C API, not cffi) used to
 * test ptrbridge as a harness.  Three functions: one correct, one that leaks
 * a tracked allocation, one that keeps a pointer to a buffer it was given.
 * The pb_* symbols resolve from ptrbridge, which must be imported first.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "ptrbridge.h"

/* Where keep() stores the pointer: a global, as careless C code does. */
const unsigned char *kept_buffer;

static PyObject *checksum(PyObject *self, PyObject *arg)
{
    (void)self;
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    unsigned long sum = 0;
    const unsigned char *p = view.buf;
    for (Py_ssize_t i = 0; i < view.len; i++)
        sum += p[i];
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLong(sum);
}

static PyObject *scratch(PyObject *self, PyObject *arg)
{
    (void)self;
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    if (n < 0 && PyErr_Occurred())
        return NULL;
    void *p = pb_malloc((size_t)n); /* BUG: nothing here frees it */
    if (p == NULL)
        return PyErr_NoMemory();
    return PyLong_FromVoidPtr(p); /* so a test can clean up after proving the leak */
}

static PyObject *keep(PyObject *self, PyObject *arg)
{
    (void)self;
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    kept_buffer = view.buf; /* BUG: kept after the buffer is released */
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

static PyObject *forget(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    kept_buffer = NULL;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"checksum", checksum, METH_O, "Sum of the bytes of a buffer (correct)."},
    {"scratch", scratch, METH_O, "Allocate tracked C memory and never free it (leak)."},
    {"keep", keep, METH_O, "Keep a pointer to the buffer's bytes in a global (retention)."},
    {"forget", forget, METH_NOARGS, "Drop the kept pointer."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_pbext", "ptrbridge harness test extension", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__pbext(void)
{
    return PyModule_Create(&module);
}
