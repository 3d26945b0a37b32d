/*
 * pyhandles.c - the Python side of the handle table, in C (CPython API).
 *
 * handles.c owns slot states and generations (mutex; C threads release
 * there without the GIL).  This file keeps, per slot, the token it was last
 * issued for and strong references to the object and its bounded table
 * (owner), all touched only with the GIL held.  A lookup is then a load of
 * the pending-release counter and an array read: no lock, no cffi call.
 * Releases from C are taken (and their objects dropped) on a Python thread at
 * the next handle operation, or by ptrbridge.collect().
 *
 * HandleBase is the base type of ptrbridge.Handle; pb__py_init registers it
 * and the module functions below on ptrbridge._native.
 */
#include "pb_py.h"

#include <stdlib.h>
#include <string.h>

#include "pb_internal.h"

struct entry {
    uintptr_t token;
    PyObject *obj;
    PyObject *owner; /* the HandleTable, or NULL */
    uint32_t site;   /* where the handle was created (pysite.c) */
};

static struct entry *entries;
static size_t entries_cap;
static PyObject *invalid_factory; /* (token, where) -> InvalidHandleError */

typedef struct {
    PyObject_HEAD
    uintptr_t token;
} HandleObject;

static PyTypeObject HandleType;

static PyObject *raise_invalid(uintptr_t token, const char *where)
{
    if (invalid_factory == NULL) {
        PyErr_SetString(PyExc_ValueError, "ptrbridge: misuse of an invalid Handle");
        return NULL;
    }
    PyObject *exc = PyObject_CallFunction(invalid_factory, "Ks", (unsigned long long)token, where);
    if (exc != NULL) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
    return NULL;
}

static int ensure_slot(size_t slot)
{
    if (slot < entries_cap)
        return 0;
    size_t cap = entries_cap ? entries_cap : 256;
    while (cap <= slot)
        cap *= 2;
    struct entry *e = realloc(entries, cap * sizeof *e);
    if (e == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    memset(e + entries_cap, 0, (cap - entries_cap) * sizeof *e);
    entries = e;
    entries_cap = cap;
    return 0;
}

/* Clears a slot's entry and returns its references (owned by the caller). */
static void take_entry(size_t slot, PyObject **obj, PyObject **owner)
{
    *obj = entries[slot].obj;
    *owner = entries[slot].owner;
    entries[slot].token = 0;
    entries[slot].obj = NULL;
    entries[slot].owner = NULL;
}

static void drop(uintptr_t token, PyObject *obj, PyObject *owner)
{
    if (owner != NULL) {
        PyObject *r = PyObject_CallMethod(owner, "_forget", "K", (unsigned long long)token);
        if (r == NULL)
            PyErr_WriteUnraisable(owner);
        Py_XDECREF(r);
    }
    Py_XDECREF(obj);
    Py_XDECREF(owner);
}

/* Drops the objects of handles C released.  Returns how many.  The slots of
 * a batch stay reserved (TAKEN) until every object of the batch is dropped:
 * dropping may run __del__ or weakref callbacks that create handles, which
 * must get other slots than the entries still being emptied. */
static Py_ssize_t drain(void)
{
    Py_ssize_t dropped = 0;
    uintptr_t batch[256];
    for (;;) {
        size_t n = pb__handle_take_released(batch, 256);
        for (size_t i = 0; i < n; i++) {
            size_t slot = pb__handle_slot(batch[i]);
            if (slot >= entries_cap || entries[slot].token != batch[i])
                continue;
            PyObject *obj, *owner;
            take_entry(slot, &obj, &owner);
            drop(batch[i], obj, owner); /* may run __del__, even handle code: entries re-read */
            dropped++;
        }
        pb__handle_recycle(batch, n);
        if (n < 256)
            return dropped;
    }
}

#define DRAIN_IF_PENDING()           \
    do {                             \
        if (pb__handle_pending())    \
            drain();                 \
    } while (0)

static PyObject *new_handle(PyTypeObject *type, PyObject *obj, PyObject *owner)
{
    DRAIN_IF_PENDING();
    HandleObject *self = (HandleObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    uintptr_t token = pb__handle_new();
    if (token == 0) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    size_t slot = pb__handle_slot(token);
    if (ensure_slot(slot) != 0) {
        pb__handle_delete(token);
        Py_DECREF(self);
        return NULL;
    }
    Py_INCREF(obj);
    Py_XINCREF(owner);
    entries[slot].token = token;
    entries[slot].obj = obj;
    entries[slot].owner = owner;
    entries[slot].site = pb__site_capture();
    self->token = token;
    return (PyObject *)self;
}

static PyObject *handle_tp_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"obj", NULL};
    PyObject *obj;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O", kwlist, &obj))
        return NULL;
    return new_handle(type, obj, NULL);
}

static PyObject *lookup(uintptr_t token, const char *where)
{
    DRAIN_IF_PENDING();
    size_t slot = pb__handle_slot(token);
    if (slot < entries_cap && entries[slot].token == token && entries[slot].obj != NULL) {
        Py_INCREF(entries[slot].obj);
        return entries[slot].obj;
    }
    return raise_invalid(token, where);
}

static PyObject *handle_value(HandleObject *self, PyObject *unused)
{
    (void)unused;
    return lookup(self->token, " in Handle.value()");
}

static PyObject *handle_delete(HandleObject *self, PyObject *unused)
{
    (void)unused;
    uintptr_t token = self->token;
    if (pb__handle_delete(token) != PB_OK)
        return raise_invalid(token, " in Handle.delete() (double delete?)");
    size_t slot = pb__handle_slot(token);
    if (slot < entries_cap && entries[slot].token == token) {
        PyObject *obj, *owner;
        take_entry(slot, &obj, &owner);
        drop(token, obj, owner);
    }
    Py_RETURN_NONE;
}

static PyObject *handle_int(HandleObject *self)
{
    return PyLong_FromUnsignedLongLong((unsigned long long)self->token);
}

static PyObject *handle_token(HandleObject *self, void *closure)
{
    (void)closure;
    return handle_int(self);
}

static Py_hash_t handle_hash(HandleObject *self)
{
    Py_hash_t h = (Py_hash_t)(self->token ^ (self->token >> 29));
    return h == -1 ? -2 : h;
}

static PyObject *handle_richcompare(PyObject *a, PyObject *b, int op)
{
    if (!PyObject_TypeCheck(b, &HandleType) || (op != Py_EQ && op != Py_NE))
        Py_RETURN_NOTIMPLEMENTED;
    int same = ((HandleObject *)a)->token == ((HandleObject *)b)->token;
    return PyBool_FromLong(op == Py_EQ ? same : !same);
}

static PyMethodDef handle_methods[] = {
    {"value", (PyCFunction)handle_value, METH_NOARGS,
     "Return the object; InvalidHandleError if the handle was deleted or released."},
    {"delete", (PyCFunction)handle_delete, METH_NOARGS,
     "Delete the handle; InvalidHandleError if it was already deleted or released by C."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef handle_getset[] = {
    {"token", (getter)handle_token, NULL, "The nonzero integer token (same as int(h)).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyNumberMethods handle_as_number = {
    .nb_int = (unaryfunc)handle_int,
    .nb_index = (unaryfunc)handle_int,
};

static PyTypeObject HandleType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "ptrbridge._native.HandleBase",
    .tp_basicsize = sizeof(HandleObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "A token for a Python object (base of ptrbridge.Handle).",
    .tp_new = handle_tp_new,
    .tp_methods = handle_methods,
    .tp_getset = handle_getset,
    .tp_as_number = &handle_as_number,
    .tp_hash = (hashfunc)handle_hash,
    .tp_richcompare = handle_richcompare,
};

/* ---- module functions ------------------------------------------------------- */

static PyObject *m_handle_new_owned(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *cls, *obj, *owner;
    if (!PyArg_ParseTuple(args, "O!OO", &PyType_Type, &cls, &obj, &owner))
        return NULL;
    if (!PyType_IsSubtype((PyTypeObject *)cls, &HandleType)) {
        PyErr_SetString(PyExc_TypeError, "handle_new_owned: cls must derive from HandleBase");
        return NULL;
    }
    return new_handle((PyTypeObject *)cls, obj, owner == Py_None ? NULL : owner);
}

static PyObject *m_handle_lookup(PyObject *self, PyObject *args)
{
    (void)self;
    unsigned long long token;
    const char *where;
    if (!PyArg_ParseTuple(args, "Ks", &token, &where))
        return NULL;
    return lookup((uintptr_t)token, where);
}

static PyObject *m_handle_attach(PyObject *self, PyObject *args)
{
    /* A new Handle object for a live token (from C), without a new slot. */
    (void)self;
    PyObject *cls;
    unsigned long long token;
    const char *where;
    if (!PyArg_ParseTuple(args, "O!Ks", &PyType_Type, &cls, &token, &where))
        return NULL;
    PyObject *obj = lookup((uintptr_t)token, where);
    if (obj == NULL)
        return NULL;
    Py_DECREF(obj);
    HandleObject *h = (HandleObject *)((PyTypeObject *)cls)->tp_alloc((PyTypeObject *)cls, 0);
    if (h != NULL)
        h->token = (uintptr_t)token;
    return (PyObject *)h;
}

static PyObject *m_handles_drain(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyLong_FromSsize_t(drain());
}

static PyObject *m_handles_init(PyObject *self, PyObject *factory)
{
    (void)self;
    Py_XINCREF(factory);
    Py_XSETREF(invalid_factory, factory);
    Py_RETURN_NONE;
}

/* handles_live() -> [(token, obj, site id)] of every live handle. */
static PyObject *m_handles_live(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    DRAIN_IF_PENDING();
    PyObject *out = PyList_New(0);
    for (size_t i = 0; out != NULL && i < entries_cap; i++) {
        if (entries[i].obj == NULL || !pb_handle_is_valid(entries[i].token))
            continue;
        PyObject *t = Py_BuildValue("(KOk)", (unsigned long long)entries[i].token, entries[i].obj,
                                    (unsigned long)entries[i].site);
        if (t == NULL || PyList_Append(out, t) < 0)
            Py_CLEAR(out);
        Py_XDECREF(t);
    }
    return out;
}

static PyMethodDef module_functions[] = {
    {"handles_live", m_handles_live, METH_NOARGS, "handles_live() -> [(token, obj, site)]"},
    {"handle_new_owned", m_handle_new_owned, METH_VARARGS, "handle_new_owned(cls, obj, owner)"},
    {"handle_lookup", m_handle_lookup, METH_VARARGS, "handle_lookup(token, where) -> obj"},
    {"handle_attach", m_handle_attach, METH_VARARGS, "handle_attach(cls, token, where) -> handle"},
    {"handles_drain", m_handles_drain, METH_NOARGS, "Drop objects of handles C released."},
    {"handles_init", m_handles_init, METH_O, "handles_init(invalid_factory)"},
    {NULL, NULL, 0, NULL},
};

int pb__py_handles_init(PyObject *module)
{
    if (PyType_Ready(&HandleType) < 0)
        return -1;
    if (PyObject_SetAttrString(module, "HandleBase", (PyObject *)&HandleType) < 0)
        return -1;
    return pb__add_functions(module, module_functions);
}
