/*
 * cextkeep.c - a plain CPython C-API extension (no ptrbridge) that keeps the
 * pointer PyBytes_AsString returned in a static, and its correct twin that
 * copies.  Built by tests/test_interposition.py as module `_cextkeep`.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdlib.h>
#include <string.h>

static const char *g_name;  /* BUG: borrowed from a bytes object */
static char *g_name_copy;

static PyObject *keep(PyObject *self, PyObject *arg)
{
    (void)self;
    const char *s = PyBytes_AsString(arg);
    if (s == NULL)
        return NULL;
    g_name = s;
    Py_RETURN_NONE;
}

static PyObject *keep_copy(PyObject *self, PyObject *arg)
{
    (void)self;
    const char *s = PyBytes_AsString(arg);
    if (s == NULL)
        return NULL;
    char *copy = strdup(s);
    if (copy == NULL)
        return PyErr_NoMemory();
    free(g_name_copy);
    g_name_copy = copy;
    g_name = copy;
    Py_RETURN_NONE;
}

static PyObject *name_len(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyLong_FromSize_t(g_name ? strlen(g_name) : 0);
}

static PyMethodDef methods[] = {
    {"keep", keep, METH_O, "keep the bytes' buffer pointer (a bug)"},
    {"keep_copy", keep_copy, METH_O, "keep a copy (correct)"},
    {"name_len", name_len, METH_NOARGS, "strlen of what is kept"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cextkeep", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__cextkeep(void)
{
    return PyModule_Create(&module);
}
