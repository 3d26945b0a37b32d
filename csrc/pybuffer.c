/*
 * pybuffer.c - a minimal buffer-protocol exporter for C memory.
 *
 * Python classes cannot export the buffer protocol before Python 3.12, and
 * cffi's buffer type cannot be subclassed, so ptrbridge.CBuffer derives from
 * this small type.  It exports [address, address + size) and counts the
 * exports, so that the memory is never given away (freed or transferred to
 * C) while a memoryview still points at it: _detach() refuses with
 * BufferError, the way bytearray refuses to resize while exported.
 *
 * With pyhandles.c and heapmap.c, the files that use the CPython C API.  pb__py_init() registers
 * the type as ptrbridge._native.BufferBase, and write_unraisable (reporting an
 * exception through sys.unraisablehook) as ptrbridge._native.write_unraisable.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <string.h>

#include "pb_internal.h"

int pb__py_handles_init(PyObject *module); /* pyhandles.c */

typedef struct {
    PyObject_HEAD
    char *ptr;
    Py_ssize_t size;
    int readonly;
    int detached;
    int owns; /* frees ptr with pb_free when released or deallocated */
    Py_ssize_t exports;
    PyObject *weakreflist;
} BufferBase;

static PyObject *bb_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"address", "size", "readonly", NULL};
    unsigned long long address = 0;
    Py_ssize_t size = 0;
    int readonly = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Kn|p", kwlist, &address, &size, &readonly))
        return NULL;
    if (size < 0) {
        PyErr_SetString(PyExc_ValueError, "ptrbridge: buffer size must not be negative");
        return NULL;
    }
    if (address == 0 && size != 0) {
        PyErr_SetString(PyExc_ValueError, "ptrbridge: NULL address with a nonzero size");
        return NULL;
    }
    BufferBase *self = (BufferBase *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->ptr = (char *)(uintptr_t)address;
    self->size = size;
    self->readonly = readonly;
    self->detached = 0;
    self->owns = 0;
    self->exports = 0;
    self->weakreflist = NULL;
    return (PyObject *)self;
}

static void bb_dealloc(BufferBase *self)
{
    if (self->weakreflist != NULL)
        PyObject_ClearWeakRefs((PyObject *)self);
    if (self->owns && self->ptr != NULL)
        pb__free_quiet(self->ptr);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int bb_getbuffer(BufferBase *self, Py_buffer *view, int flags)
{
    if (self->detached) {
        PyErr_SetString(PyExc_BufferError,
                        "ptrbridge: CBuffer is no longer usable from Python: its memory was "
                        "transferred to C or freed");
        view->obj = NULL;
        return -1;
    }
    if (PyBuffer_FillInfo(view, (PyObject *)self, self->ptr, self->size, self->readonly, flags) < 0)
        return -1;
    self->exports++;
    return 0;
}

static void bb_releasebuffer(BufferBase *self, Py_buffer *view)
{
    (void)view;
    self->exports--;
}

/* The memory of a BufferBase made by _alloc/_copy belongs to it (tracked
 * allocator) until _release_memory() frees it, _detach() gives it away, or
 * the object is deallocated. */
static PyObject *bb_adopt(PyTypeObject *type, char *ptr, Py_ssize_t size)
{
    BufferBase *self = (BufferBase *)type->tp_alloc(type, 0);
    if (self == NULL) {
        pb__free_quiet(ptr);
        return NULL;
    }
    self->ptr = ptr;
    self->size = size;
    self->readonly = 0;
    self->detached = 0;
    self->owns = 1;
    self->exports = 0;
    self->weakreflist = NULL;
    return (PyObject *)self;
}

static PyObject *bb_alloc(PyObject *cls, PyObject *arg)
{
    Py_ssize_t size = PyLong_AsSsize_t(arg);
    if (size < 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "ptrbridge: buffer size must not be negative");
        return NULL;
    }
    char *p = pb_calloc(1, (size_t)size);
    if (p == NULL)
        return PyErr_NoMemory();
    return bb_adopt((PyTypeObject *)cls, p, size);
}

static PyObject *bb_copy(PyObject *cls, PyObject *arg)
{
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_ANY_CONTIGUOUS) < 0)
        return NULL;
    char *p = pb_malloc((size_t)view.len);
    if (p == NULL) {
        PyBuffer_Release(&view);
        return PyErr_NoMemory();
    }
    memcpy(p, view.buf, (size_t)view.len);
    Py_ssize_t size = view.len;
    PyBuffer_Release(&view);
    return bb_adopt((PyTypeObject *)cls, p, size);
}

static PyObject *bb_release_memory(BufferBase *self, PyObject *unused)
{
    (void)unused;
    if (self->exports > 0) {
        PyErr_Format(PyExc_BufferError,
                     "ptrbridge: cannot free a CBuffer while %zd memoryview(s) or other exports "
                     "still point at it; release them first",
                     self->exports);
        return NULL;
    }
    char *p = self->owns ? self->ptr : NULL;
    self->owns = 0;
    self->detached = 1;
    self->ptr = NULL;
    self->size = 0;
    if (p != NULL)
        pb__free_quiet(p);
    Py_RETURN_NONE;
}

static PyObject *bb_detach(BufferBase *self, PyObject *unused)
{
    (void)unused;
    if (self->exports > 0) {
        PyErr_Format(PyExc_BufferError,
                     "ptrbridge: cannot give up the memory of a CBuffer while %zd "
                     "memoryview(s) or other exports still point at it; release them first",
                     self->exports);
        return NULL;
    }
    self->detached = 1;
    self->owns = 0;
    self->ptr = NULL;
    self->size = 0;
    Py_RETURN_NONE;
}

static PyObject *bb_get_exports(BufferBase *self, void *closure)
{
    (void)closure;
    return PyLong_FromSsize_t(self->exports);
}

static PyObject *bb_get_detached(BufferBase *self, void *closure)
{
    (void)closure;
    return PyBool_FromLong(self->detached);
}

static PyObject *bb_get_address(BufferBase *self, void *closure)
{
    (void)closure;
    return PyLong_FromVoidPtr(self->ptr);
}

static PyObject *bb_get_owns(BufferBase *self, void *closure)
{
    (void)closure;
    return PyBool_FromLong(self->owns);
}

static Py_ssize_t bb_length(BufferBase *self)
{
    return self->size;
}

static PySequenceMethods bb_as_sequence = {
    .sq_length = (lenfunc)bb_length,
};

static PyMethodDef bb_methods[] = {
    {"_detach", (PyCFunction)bb_detach, METH_NOARGS,
     "Stop exporting the memory and give it up (to C); BufferError while any export is alive."},
    {"_alloc", (PyCFunction)bb_alloc, METH_O | METH_CLASS,
     "A new instance owning `size` zeroed bytes of tracked C memory."},
    {"_copy", (PyCFunction)bb_copy, METH_O | METH_CLASS,
     "A new instance owning a tracked C copy of a contiguous buffer."},
    {"_release_memory", (PyCFunction)bb_release_memory, METH_NOARGS,
     "Free owned memory now; BufferError while any export is alive."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef bb_getset[] = {
    {"_exports", (getter)bb_get_exports, NULL, "Number of live buffer exports.", NULL},
    {"_detached", (getter)bb_get_detached, NULL, "True once the memory was given up.", NULL},
    {"_address", (getter)bb_get_address, NULL, "Address of the memory (0 once given up).", NULL},
    {"_owns", (getter)bb_get_owns, NULL, "True while the object owns (and will free) its memory.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyBufferProcs bb_as_buffer = {
    (getbufferproc)bb_getbuffer,
    (releasebufferproc)bb_releasebuffer,
};

static PyTypeObject BufferBaseType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "ptrbridge._native.BufferBase",
    .tp_basicsize = sizeof(BufferBase),
    .tp_dealloc = (destructor)bb_dealloc,
    .tp_as_buffer = &bb_as_buffer,
    .tp_as_sequence = &bb_as_sequence,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "Exports C memory through the buffer protocol (base of ptrbridge.CBuffer).",
    .tp_weaklistoffset = offsetof(BufferBase, weakreflist),
    .tp_methods = bb_methods,
    .tp_getset = bb_getset,
    .tp_new = bb_new,
};

/* write_unraisable(exc, obj): report an exception the way CPython reports
 * one it cannot raise (sys.unraisablehook), e.g. from a callback that C
 * called outside any checked call. */
static PyObject *write_unraisable(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *exc, *obj;
    if (!PyArg_ParseTuple(args, "OO", &exc, &obj))
        return NULL;
    if (!PyExceptionInstance_Check(exc)) {
        PyErr_SetString(PyExc_TypeError, "write_unraisable: exc must be an exception instance");
        return NULL;
    }
    PyObject *tb = PyException_GetTraceback(exc); /* new reference or NULL */
    Py_INCREF(exc);
    Py_INCREF((PyObject *)Py_TYPE(exc));
    PyErr_Restore((PyObject *)Py_TYPE(exc), exc, tb); /* steals all three */
    PyErr_WriteUnraisable(obj);
    Py_RETURN_NONE;
}

static PyMethodDef write_unraisable_def = {
    "write_unraisable", write_unraisable, METH_VARARGS,
    "Report an exception through sys.unraisablehook.",
};

int pb__py_init(void)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    int rc = -1;
    PyObject *module = NULL;
    if (PyType_Ready(&BufferBaseType) < 0)
        goto out;
    {
        PyObject *name = PyUnicode_FromString("ptrbridge._native");
        if (name == NULL)
            goto out;
        module = PyImport_GetModule(name);
        Py_DECREF(name);
    }
    if (module == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ImportError, "ptrbridge._native is not imported");
        goto out;
    }
    if (PyObject_SetAttrString(module, "BufferBase", (PyObject *)&BufferBaseType) < 0)
        goto out;
    if (pb__py_handles_init(module) < 0)
        goto out;
    {
        PyObject *fn = PyCFunction_New(&write_unraisable_def, NULL);
        if (fn == NULL)
            goto out;
        int set = PyObject_SetAttrString(module, "write_unraisable", fn);
        Py_DECREF(fn);
        if (set < 0)
            goto out;
    }
    rc = 0;
out:
    if (rc != 0)
        PyErr_Print();
    Py_XDECREF(module);
    PyGILState_Release(gil);
    return rc;
}
