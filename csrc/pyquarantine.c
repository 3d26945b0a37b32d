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
 * lives is a kept read), QL_MUTABLE_BLOCK (a mutable original: if the heap
 * map has the live block holding it, a read while that block lives is a kept
 * read too).  Returns (slot, shadow address), or None when the
 * buffer is pinned or no shadow is free.
 *
 * quarantine_lend_arg(obj, address, size, flags, text, function, frame,
 * target) is the same for an argument passed directly (QL_WRITABLE: copied
 * back after the call), and makes what Python needs next in the same call:
 * the argument to pass, a `target` cdata (a pointer ctype) for the shadow
 * (None if cffi exports no C API: Python casts), and the record
 * quarantine.finish takes, (slot, copy-back address or None, (obj, ()),
 * shadow, size, text, the original's address).  Returns (argument, record)
 * or None.
 *
 * Everything else about the lend (which arguments, the slot path) stays in
 * quarantine.py.
 */
#include "pb_py.h"

#include <stdint.h>

#include "pb_heapmap.h"
#include "pb_internal.h"
#include "pb_quarantine.h"
#include "ptrbridge.h"

enum { QL_CHECK_PINNED = 1, QL_HELD = 2, QL_IMMUTABLE = 4, QL_WRITABLE = 8, QL_MUTABLE_BLOCK = 16 };

#define STACK_FRAMES 8 /* as quarantine.STACK_FRAMES */
#define COPY_WITHOUT_GIL ((size_t)64 << 10) /* larger copies let other threads run */

/* cffi's exported C API: entry 10 makes a cdata of a pointer ctype for an
 * address, as a compiled call returning a pointer does. */
static PyObject *(*from_c_pointer)(char *, PyObject *);
static int exports_read;

struct lent {
    int slot;
    uintptr_t address, shadow;
    size_t size;
};

/* The lend itself.  1 and *out, 0 (pinned, or no free shadow), -1 (error). */
static int lend_arg(PyObject *const *args, struct lent *out)
{
    PyObject *obj = args[0];
    uintptr_t address = (uintptr_t)PyLong_AsUnsignedLongLong(args[1]);
    size_t size = PyLong_AsSize_t(args[2]);
    long flags = PyLong_AsLong(args[3]);
    if (PyErr_Occurred())
        return -1;
    Py_ssize_t text_len, function_len;
    const char *text = PyUnicode_AsUTF8AndSize(args[4], &text_len);
    if (text == NULL)
        return -1;
    const char *function = PyUnicode_AsUTF8AndSize(args[5], &function_len);
    if (function == NULL)
        return -1;
    if (address == 0 && PyBytes_CheckExact(obj)) {
        address = (uintptr_t)PyBytes_AS_STRING(obj);
        size = (size_t)PyBytes_GET_SIZE(obj) + 1;
    }
    if (address == 0 && size != 0) {
        PyErr_SetString(PyExc_ValueError, "quarantine_lend: no address");
        return -1;
    }
    if (flags & QL_CHECK_PINNED) {
        uint64_t packed = pb__region_lookup(address);
        if (packed != 0 && (packed & 3u) == (uint64_t)PB_REGION_PINNED)
            return 0; /* C may keep a pinned buffer: never moved */
    }
    uint32_t ids[STACK_FRAMES];
    int nids = pb__site_capture_stack(args[6], ids, STACK_FRAMES);
    uintptr_t owner = (flags & QL_IMMUTABLE) ? (uintptr_t)obj : 0;
    int held = (flags & QL_HELD) ? PB_QOWNER_HELD : 0;
    if ((flags & QL_MUTABLE_BLOCK) && owner == 0) {
        struct pb_heapmap_block b = pb__heapmap_lookup(address);
        if (b.status != 0 && b.start != 0 && address + size <= b.start + b.size) {
            owner = b.start; /* watched: the heap map's free hook says when it goes */
            held = PB_QOWNER_MUTABLE;
        }
    }
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
        return 0; /* no free shadow: the buffer is passed as it is */
    out->slot = slot;
    out->address = address;
    out->shadow = shadow;
    out->size = size;
    return 1;
}

static PyObject *m_quarantine_lend(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "quarantine_lend(obj, address, size, flags, text, function, frame)");
        return NULL;
    }
    struct lent l;
    int rc = lend_arg(args, &l);
    if (rc <= 0) {
        if (rc < 0)
            return NULL;
        Py_RETURN_NONE;
    }
    return Py_BuildValue("(iK)", l.slot, (unsigned long long)l.shadow);
}

static PyObject *m_quarantine_lend_arg(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError,
                        "quarantine_lend_arg(obj, address, size, flags, text, function, frame, target)");
        return NULL;
    }
    if (!exports_read) {
        void **exports = pb__cffi_exports();
        if (exports != NULL)
            from_c_pointer = (PyObject * (*)(char *, PyObject *)) exports[10];
        exports_read = 1;
    }
    struct lent l;
    int rc = lend_arg(args, &l);
    if (rc <= 0) {
        if (rc < 0)
            return NULL;
        Py_RETURN_NONE;
    }
    int writable = (PyLong_AsLong(args[3]) & QL_WRITABLE) != 0;
    PyObject *arg = from_c_pointer != NULL ? from_c_pointer((char *)l.shadow, args[7]) : Py_NewRef(Py_None);
    if (arg == NULL) {
        pb__quarantine_finish(l.slot, NULL); /* not lent after all: closed at once */
        return NULL;
    }
    PyObject *record = writable ? Py_BuildValue("(iK(O())KnOK)", l.slot, (unsigned long long)l.address, args[0],
                                                (unsigned long long)l.shadow, (Py_ssize_t)l.size, args[4],
                                                (unsigned long long)l.address)
                                : Py_BuildValue("(iO(O())KnOK)", l.slot, Py_None, args[0],
                                                (unsigned long long)l.shadow, (Py_ssize_t)l.size, args[4],
                                                (unsigned long long)l.address);
    if (record == NULL) {
        Py_DECREF(arg);
        pb__quarantine_finish(l.slot, NULL);
        return NULL;
    }
    PyObject *out = PyTuple_Pack(2, arg, record);
    Py_DECREF(arg);
    Py_DECREF(record);
    if (out == NULL)
        pb__quarantine_finish(l.slot, NULL);
    return out;
}

static PyObject *m_quarantine_trap(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "quarantine_trap(size, text, function, frame)");
        return NULL;
    }
    size_t size = PyLong_AsSize_t(args[0]);
    if (size == (size_t)-1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t text_len, function_len;
    const char *text = PyUnicode_AsUTF8AndSize(args[1], &text_len);
    if (text == NULL)
        return NULL;
    const char *function = PyUnicode_AsUTF8AndSize(args[2], &function_len);
    if (function == NULL)
        return NULL;
    uint32_t ids[STACK_FRAMES];
    int nids = pb__site_capture_stack(args[3], ids, STACK_FRAMES);
    uintptr_t shadow = 0;
    int slot = pb__quarantine_trap_sites(size, text, (size_t)text_len, function, (size_t)function_len, ids, nids,
                                         &shadow);
    if (slot < 0)
        Py_RETURN_NONE; /* no free slot, or it could not be closed: no trap */
    return Py_BuildValue("(iK)", slot, (unsigned long long)shadow);
}

static PyMethodDef quarantine_functions[] = {
    {"quarantine_lend", (PyCFunction)(void (*)(void))m_quarantine_lend, METH_FASTCALL,
     "quarantine_lend(obj, address, size, flags, text, function, frame) -> (slot, shadow) or None"},
    {"quarantine_lend_arg", (PyCFunction)(void (*)(void))m_quarantine_lend_arg, METH_FASTCALL,
     "quarantine_lend_arg(obj, address, size, flags, text, function, frame, target)\n"
     "-> (argument, (slot, copy_back, (obj, ()), shadow, size, text, origin)) or None"},
    {"quarantine_trap", (PyCFunction)(void (*)(void))m_quarantine_trap, METH_FASTCALL,
     "quarantine_trap(size, text, function, frame) -> (slot, trap address) or None"},
    {NULL, NULL, 0, NULL},
};

int pb__py_quarantine_init(PyObject *module)
{
    return pb__add_functions(module, quarantine_functions);
}
