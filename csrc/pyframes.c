/*
 * pyframes.c - a frame's variables, read without touching the frame.
 *
 * A checked call looks for the Python objects its pointers reach among the
 * caller's variables.  `frame.f_locals` would do that, but before CPython
 * 3.13 it builds a dict snapshot that the frame keeps: every variable the
 * snapshot saw stays referenced after the program drops it (`del buf` no
 * longer frees `buf`) until something refreshes the snapshot.  A sanitizer
 * that delays frees hides the very use-after-free it looks for, and changes
 * what the program does.
 *
 * frame_variables(frame) reads the fast locals, cells and free variables
 * directly (the same fields a debugger's locals view reads) and returns a
 * list of (name, value) pairs, owning nothing after it returns.  A frame
 * without fast locals (module or class body) has a real namespace dict,
 * which is read as is.  From 3.13 on, f_locals is a view (PEP 667) and is
 * used.  Needs the GIL; the frame must belong to the calling thread or be
 * suspended.
 */
#include "pb_py.h"

#if PY_VERSION_HEX >= 0x030B0000 && PY_VERSION_HEX < 0x030D0000
#define PB_INTERNAL_FRAMES 1
#define Py_BUILD_CORE 1
#include "internal/pycore_code.h"
#include "internal/pycore_frame.h"
#undef Py_BUILD_CORE
#elif PY_VERSION_HEX < 0x030B0000
#include <frameobject.h>
#endif

#if PY_VERSION_HEX < 0x030D0000
static int append_pair(PyObject *out, PyObject *name, PyObject *value)
{
    PyObject *pair = PyTuple_Pack(2, name, value);
    if (pair == NULL)
        return -1;
    int rc = PyList_Append(out, pair);
    Py_DECREF(pair);
    return rc;
}
#endif

static int append_items(PyObject *out, PyObject *mapping)
{
    PyObject *items = PyMapping_Items(mapping);
    if (items == NULL)
        return -1;
    Py_ssize_t n = PyList_GET_SIZE(items);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (PyList_Append(out, PyList_GET_ITEM(items, i)) < 0) {
            Py_DECREF(items);
            return -1;
        }
    }
    Py_DECREF(items);
    return 0;
}

static int read_variables(PyFrameObject *frame, PyObject *out)
{
#if PY_VERSION_HEX >= 0x030D0000
    PyObject *view = PyFrame_GetLocals(frame); /* a write-through view: no snapshot */
    if (view == NULL)
        return -1;
    int rc = append_items(out, view);
    Py_DECREF(view);
    return rc;
#elif defined(PB_INTERNAL_FRAMES)
    _PyInterpreterFrame *f = frame->f_frame;
    PyCodeObject *co = f->f_code;
    if (!(co->co_flags & CO_OPTIMIZED))
        return f->f_locals != NULL ? append_items(out, f->f_locals) : 0;
    for (int i = 0; i < co->co_nlocalsplus; i++) {
        PyObject *value = f->localsplus[i];
        if (value == NULL)
            continue;
        _PyLocals_Kind kind = _PyLocals_GetKind(co->co_localspluskinds, i);
        if ((kind & (CO_FAST_CELL | CO_FAST_FREE)) && PyCell_Check(value)) {
            value = PyCell_GET(value);
            if (value == NULL)
                continue;
        }
        if (append_pair(out, PyTuple_GET_ITEM(co->co_localsplusnames, i), value) < 0)
            return -1;
    }
    return 0;
#else
    PyCodeObject *co = frame->f_code;
    if (!(co->co_flags & CO_OPTIMIZED))
        return frame->f_locals != NULL ? append_items(out, frame->f_locals) : 0;
    int nlocals = co->co_nlocals;
    for (int i = 0; i < nlocals; i++) {
        PyObject *value = frame->f_localsplus[i];
        if (value != NULL && append_pair(out, PyTuple_GET_ITEM(co->co_varnames, i), value) < 0)
            return -1;
    }
    /* Cell variables, then free variables, follow the locals; each slot holds a cell. */
    PyObject *groups[2] = {co->co_cellvars, co->co_freevars};
    int slot = nlocals;
    for (int g = 0; g < 2; g++) {
        Py_ssize_t n = PyTuple_GET_SIZE(groups[g]);
        for (Py_ssize_t j = 0; j < n; j++, slot++) {
            PyObject *cell = frame->f_localsplus[slot];
            PyObject *value = cell != NULL && PyCell_Check(cell) ? PyCell_GET(cell) : NULL;
            if (value != NULL && append_pair(out, PyTuple_GET_ITEM(groups[g], j), value) < 0)
                return -1;
        }
    }
    return 0;
#endif
}

static PyObject *m_frame_variables(PyObject *self, PyObject *arg)
{
    (void)self;
    if (!PyFrame_Check(arg)) {
        PyErr_Format(PyExc_TypeError, "frame_variables() takes a frame object, not %.100s",
                     Py_TYPE(arg)->tp_name);
        return NULL;
    }
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    if (read_variables((PyFrameObject *)arg, out) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    return out;
}

static PyMethodDef frame_functions[] = {
    {"frame_variables", m_frame_variables, METH_O,
     "frame_variables(frame) -> [(name, value)]: the frame's bound variables, without the\n"
     "f_locals snapshot that would keep them alive (CPython < 3.13)"},
    {NULL, NULL, 0, NULL},
};

int pb__py_frames_init(PyObject *module)
{
    return pb__add_functions(module, frame_functions);
}
