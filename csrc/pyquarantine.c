/*
 * pyquarantine.c - a quarantined lend of a buffer passed directly, in one C
 * call from Python.
 *
 * quarantine_lend(obj, address, size, flags, text, function, frame) takes a
 * shadow slot, copies the buffer into it and records what a fault report
 * needs: the object's text and the function name (copied), and the Python
 * stack of the lending call as site ids (pysite.c), whose text is made once
 * per call site, not per lend.  A `bytes` is passed with address 0: its data
 * and length + 1 (cffi passes it NUL-terminated) are read here.  flags:
 * QL_CHECK_PINNED (a pinned buffer is not moved: None), QL_HELD (Python
 * holds the original for the slot, no heap map sees its free), QL_IMMUTABLE
 * (obj is the original, a bytes: a later read of the closed shadow while it
 * lives is a kept read).  Returns (slot, shadow address), or None when the
 * buffer is pinned or no shadow is free.  Everything else about the lend
 * (which arguments, copy-back, the slot path) stays in quarantine.py.
 */
#include "pb_py.h"

#include <stdint.h>

#include "pb_internal.h"
#include "pb_quarantine.h"
#include "ptrbridge.h"

enum { QL_CHECK_PINNED = 1, QL_HELD = 2, QL_IMMUTABLE = 4 };

#define STACK_FRAMES 8 /* as quarantine.STACK_FRAMES */
#define COPY_WITHOUT_GIL ((size_t)64 << 10) /* larger copies let other threads run */

static PyObject *m_quarantine_lend(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "quarantine_lend(obj, address, size, flags, text, function, frame)");
        return NULL;
    }
    PyObject *obj = args[0];
    uintptr_t address = (uintptr_t)PyLong_AsUnsignedLongLong(args[1]);
    size_t size = PyLong_AsSize_t(args[2]);
    long flags = PyLong_AsLong(args[3]);
    if (PyErr_Occurred())
        return NULL;
    Py_ssize_t text_len, function_len;
    const char *text = PyUnicode_AsUTF8AndSize(args[4], &text_len);
    if (text == NULL)
        return NULL;
    const char *function = PyUnicode_AsUTF8AndSize(args[5], &function_len);
    if (function == NULL)
        return NULL;
    if (address == 0 && PyBytes_CheckExact(obj)) {
        address = (uintptr_t)PyBytes_AS_STRING(obj);
        size = (size_t)PyBytes_GET_SIZE(obj) + 1;
    }
    if (address == 0 && size != 0) {
        PyErr_SetString(PyExc_ValueError, "quarantine_lend: no address");
        return NULL;
    }
    if (flags & QL_CHECK_PINNED) {
        uint64_t packed = pb__region_lookup(address);
        if (packed != 0 && (packed & 3u) == (uint64_t)PB_REGION_PINNED)
            Py_RETURN_NONE; /* C may keep a pinned buffer: never moved */
    }
    uint32_t ids[STACK_FRAMES];
    int nids = pb__site_capture_stack(args[6], ids, STACK_FRAMES);
    uintptr_t owner = (flags & QL_IMMUTABLE) ? (uintptr_t)obj : 0;
    int held = (flags & QL_HELD) != 0;
    uintptr_t shadow = 0;
    int slot;
    if (size > COPY_WITHOUT_GIL) {
        Py_BEGIN_ALLOW_THREADS
        slot = pb__quarantine_lend_sites((const void *)address, size, owner, held, text, (size_t)text_len, function,
                                         (size_t)function_len, ids, nids, &shadow);
        Py_END_ALLOW_THREADS
    } else {
        slot = pb__quarantine_lend_sites((const void *)address, size, owner, held, text, (size_t)text_len, function,
                                         (size_t)function_len, ids, nids, &shadow);
    }
    if (slot < 0)
        Py_RETURN_NONE; /* no free shadow: the buffer is passed as it is */
    PyObject *slot_obj = PyLong_FromLong(slot);
    PyObject *shadow_obj = PyLong_FromUnsignedLongLong((unsigned long long)shadow);
    PyObject *out = slot_obj != NULL && shadow_obj != NULL ? PyTuple_Pack(2, slot_obj, shadow_obj) : NULL;
    Py_XDECREF(slot_obj);
    Py_XDECREF(shadow_obj);
    return out;
}

static PyMethodDef quarantine_functions[] = {
    {"quarantine_lend", (PyCFunction)(void (*)(void))m_quarantine_lend, METH_FASTCALL,
     "quarantine_lend(obj, address, size, flags, text, function, frame) -> (slot, shadow) or None"},
    {NULL, NULL, 0, NULL},
};

int pb__py_quarantine_init(PyObject *module)
{
    return pb__add_functions(module, quarantine_functions);
}
