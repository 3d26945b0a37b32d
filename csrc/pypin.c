/*
 * pypin.c - the pins of ptrbridge.Pinner, in C (CPython API).
 *
 * A pin is a buffer export held on the object (so a bytearray cannot be
 * resized or freed), a PB_REGION_PINNED region in regions.c (so the checker
 * and the scanner know C may hold the memory), and the creation site as an
 * interned id (pysite.c).  pin() is one C call: no Python frame, no string
 * formatting; descriptions and "file.py:12" are made only when a report or
 * ptrbridge.stats.live_resources() asks.
 *
 * Everything here runs with the GIL held.  The GIL can be released in the
 * middle of pin() (the cffi call that makes the returned char *, the Python
 * fallback for cffi cdata), so a pin is built completely before it is added,
 * and the duplicate check is repeated then; unpin() detaches the whole array
 * before releasing anything.
 */
#include "pb_py.h"

#include <string.h>

#include "pb_internal.h"
#include "pb_scan.h"

struct pin {
    PyObject *obj;    /* the object the user pinned (strong) */
    PyObject *keeper; /* cffi cdata pinned through Python (strong), or NULL */
    PyObject *ptr;    /* the char * returned by pin(), or NULL (pin_many) */
    Py_buffer view;   /* held export when keeper is NULL */
    uintptr_t start;
    size_t size;
    uint64_t region;
    uint32_t site;
};

#define INLINE_PINS 2

typedef struct PinnerBase {
    PyObject_HEAD
    struct pin *pins;
    Py_ssize_t n, cap;
    PyObject *weakreflist;
    struct PinnerBase *prev, *next; /* every live pinner */
    struct pin inline_pins[INLINE_PINS]; /* pins is this until more are needed: no malloc for one pin */
} PinnerBase;

static PinnerBase *pinners;
static PyObject *cdata_type; /* ffi.CData */
static PyObject *slow_extent; /* (obj) -> (keeper, address, size); raises for unpinnable */
static PyObject *levels_dict; /* ptrbridge.levels.__dict__: "_level" is the check level */
static PyObject *level_key;   /* "_level" */

static PyObject *pn_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    if ((args != NULL && PyTuple_GET_SIZE(args) != 0) || (kwds != NULL && PyDict_GET_SIZE(kwds) != 0)) {
        PyErr_SetString(PyExc_TypeError, "ptrbridge.Pinner() takes no arguments");
        return NULL;
    }
    PinnerBase *self = (PinnerBase *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->next = pinners;
    if (pinners != NULL)
        pinners->prev = self;
    pinners = self;
    self->pins = self->inline_pins;
    self->cap = INLINE_PINS;
    return (PyObject *)self;
}

static void release_pin(struct pin *p)
{
    if (p->keeper == NULL)
        PyBuffer_Release(&p->view);
    Py_XDECREF(p->keeper);
    Py_XDECREF(p->ptr);
    Py_XDECREF(p->obj);
}

/* Detaches every pin, removes the regions, releases the exports.  A small
 * array is kept for the next pins unless releasing re-entered this Pinner.
 * Inline pins are copied out first: releasing may run Python code that pins
 * into this Pinner again. */
static void unpin_all(PinnerBase *self, PyObject *collect)
{
    struct pin local[INLINE_PINS];
    struct pin *pins = self->pins;
    Py_ssize_t n = self->n, cap = self->cap;
    if (n == 0)
        return;
    if (pins == self->inline_pins) {
        memcpy(local, pins, (size_t)n * sizeof *pins);
        pins = local;
        cap = 0;
    }
    self->pins = self->inline_pins;
    self->cap = INLINE_PINS;
    self->n = 0;
    if (n == 1) {
        pb_region_remove(pins[0].region);
    } else if (n > 1) {
        uint64_t small[64] = {0};
        uint64_t *ids = n <= 64 ? small : malloc((size_t)n * sizeof *ids);
        if (ids != NULL) {
            for (Py_ssize_t i = 0; i < n; i++)
                ids[i] = pins[i].region;
            pb__region_remove_many(ids, (size_t)n);
            if (ids != small)
                free(ids);
        } else {
            for (Py_ssize_t i = n; i-- > 0;)
                pb_region_remove(pins[i].region);
        }
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (collect != NULL) {
            PyObject *t = Py_BuildValue("(OKnk)", pins[i].obj, (unsigned long long)pins[i].start,
                                        (Py_ssize_t)pins[i].size, (unsigned long)pins[i].site);
            if (t == NULL || PyList_Append(collect, t) < 0)
                PyErr_Clear();
            Py_XDECREF(t);
        }
        release_pin(&pins[i]);
    }
    if (pins == local)
        return;
    if (self->pins == self->inline_pins && self->n == 0 && cap <= 64) {
        self->pins = pins;
        self->cap = cap;
    } else {
        free(pins);
    }
}

/* A Pinner dropped with pins held: self._warn_leaks() (PinLeakWarning naming
 * each pin) and self.unpin(), as Python code, at most once. */
static void pn_finalize(PinnerBase *self)
{
    if (self->n == 0)
        return;
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *r = PyObject_CallMethod((PyObject *)self, "_warn_leaks", NULL);
    if (r == NULL)
        PyErr_WriteUnraisable((PyObject *)self);
    Py_XDECREF(r);
    r = PyObject_CallMethod((PyObject *)self, "unpin", NULL);
    if (r == NULL)
        PyErr_WriteUnraisable((PyObject *)self);
    Py_XDECREF(r);
    PyErr_Restore(type, value, tb);
}

static void pn_dealloc(PinnerBase *self)
{
    if (PyObject_CallFinalizerFromDealloc((PyObject *)self) < 0)
        return; /* resurrected */
    if (self->weakreflist != NULL)
        PyObject_ClearWeakRefs((PyObject *)self);
    unpin_all(self, NULL);
    if (self->pins != self->inline_pins)
        free(self->pins);
    self->pins = NULL;
    self->n = self->cap = 0;
    if (self->prev != NULL)
        self->prev->next = self->next;
    else if (pinners == self)
        pinners = self->next;
    if (self->next != NULL)
        self->next->prev = self->prev;
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static Py_ssize_t find_pin(PinnerBase *self, PyObject *obj)
{
    for (Py_ssize_t i = self->n; i-- > 0;)
        if (self->pins[i].obj == obj)
            return i;
    return -1;
}

static int reserve(PinnerBase *self, Py_ssize_t more)
{
    if (self->n + more <= self->cap)
        return 0;
    Py_ssize_t cap = self->cap ? self->cap : 4;
    while (cap < self->n + more)
        cap *= 2;
    int was_inline = self->pins == self->inline_pins;
    struct pin *p = realloc(was_inline ? NULL : self->pins, (size_t)cap * sizeof *p);
    if (p == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    if (was_inline)
        memcpy(p, self->inline_pins, (size_t)self->n * sizeof *p);
    self->pins = p;
    self->cap = cap;
    return 0;
}

/* Fills p->obj/keeper/view/start/size for obj.  Returns 0 or -1 (raised). */
static int extent(PyObject *obj, struct pin *p)
{
    memset(p, 0, sizeof *p);
    if (!PyObject_TypeCheck(obj, (PyTypeObject *)cdata_type) &&
        PyObject_GetBuffer(obj, &p->view, PyBUF_ANY_CONTIGUOUS) == 0) {
        p->start = (uintptr_t)p->view.buf;
        p->size = (size_t)p->view.len;
    } else {
        /* cffi cdata, or an error: the Python side explains (or pins cdata). */
        PyErr_Clear();
        PyObject *r = PyObject_CallOneArg(slow_extent, obj);
        if (r == NULL)
            return -1;
        PyObject *keeper;
        unsigned long long start;
        Py_ssize_t size;
        if (!PyArg_ParseTuple(r, "OKn", &keeper, &start, &size)) {
            Py_DECREF(r);
            return -1;
        }
        p->keeper = Py_NewRef(keeper);
        p->start = (uintptr_t)start;
        p->size = (size_t)size;
        Py_DECREF(r);
    }
    p->obj = Py_NewRef(obj);
    return 0;
}

static int register_pins(struct pin *p, Py_ssize_t n, uint32_t site)
{
    if (n == 1) {
        if (pb__scan_pending() > 0)
            pb__scan_cancel(p->start, p->size); /* pinned now: C may hold it */
        if (pb_region_add((const void *)p->start, p->size, PB_REGION_PINNED, &p->region) != PB_OK) {
            PyErr_NoMemory();
            return -1;
        }
        p->site = site;
        return 0;
    }
    uintptr_t sa[64];
    size_t sz[64];
    uint64_t ids[64];
    for (Py_ssize_t done = 0; done < n;) {
        Py_ssize_t k = n - done < 64 ? n - done : 64;
        for (Py_ssize_t i = 0; i < k; i++) {
            sa[i] = p[done + i].start;
            sz[i] = p[done + i].size;
            if (pb__scan_pending() > 0)
                pb__scan_cancel(sa[i], sz[i]); /* pinned now: C may hold it */
        }
        if (pb__region_add_many(sa, sz, (size_t)k, PB_REGION_PINNED, ids) != PB_OK) {
            for (Py_ssize_t i = 0; i < done; i++)
                pb_region_remove(p[i].region);
            PyErr_NoMemory();
            return -1;
        }
        for (Py_ssize_t i = 0; i < k; i++) {
            p[done + i].region = ids[i];
            p[done + i].site = site;
        }
        done += k;
    }
    return 0;
}

static PyObject *make_ptr(uintptr_t start)
{
    return pb__charp_object(start); /* may call cffi (and release the GIL) on the fallback path */
}

/* Stores ptr as the pointer of obj's pin if it has none; returns the pin's pointer. */
static PyObject *settle_ptr(PinnerBase *self, PyObject *obj, PyObject *ptr)
{
    Py_ssize_t i = find_pin(self, obj);
    if (i < 0)
        return ptr; /* unpinned meanwhile (another thread): the pointer is stale already */
    if (self->pins[i].ptr == NULL) {
        self->pins[i].ptr = ptr;
        return Py_NewRef(ptr);
    }
    Py_DECREF(ptr);
    return Py_NewRef(self->pins[i].ptr);
}

static PyObject *pn_pin(PinnerBase *self, PyObject *obj)
{
    Py_ssize_t i = find_pin(self, obj);
    if (i >= 0) {
        if (self->pins[i].ptr != NULL)
            return Py_NewRef(self->pins[i].ptr);
        PyObject *ptr = make_ptr(self->pins[i].start); /* pinned by pin_many */
        return ptr == NULL ? NULL : settle_ptr(self, obj, ptr);
    }
    uint32_t site = pb__site_capture();
    struct pin p;
    if (extent(obj, &p) < 0)
        return NULL;
    if (register_pins(&p, 1, site) < 0) {
        release_pin(&p);
        return NULL;
    }
    PyObject *ptr = make_ptr(p.start); /* the cffi call may release the GIL */
    if (ptr == NULL || find_pin(self, obj) >= 0 || reserve(self, 1) < 0) {
        pb_region_remove(p.region);
        release_pin(&p);
        if (ptr == NULL || PyErr_Occurred()) {
            Py_XDECREF(ptr);
            return NULL;
        }
        return settle_ptr(self, obj, ptr); /* another thread pinned it meanwhile */
    }
    p.ptr = Py_NewRef(ptr);
    self->pins[self->n++] = p;
    return ptr;
}

/* _pin_many(seq, out_address): pins every object of a list/tuple and writes
 * their addresses to the char *[n] at out_address.  All or nothing. */
static PyObject *pn_pin_many(PinnerBase *self, PyObject *args)
{
    PyObject *seq;
    unsigned long long out_addr;
    if (!PyArg_ParseTuple(args, "OK", &seq, &out_addr))
        return NULL;
    char **out = (char **)(uintptr_t)out_addr;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    uint32_t site = pb__site_capture();
    struct pin *fresh = malloc((size_t)(n ? n : 1) * sizeof *fresh);
    if (fresh == NULL)
        return PyErr_NoMemory();
    Py_ssize_t k = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t at = find_pin(self, items[i]);
        if (at >= 0) {
            out[i] = (char *)self->pins[at].start;
            continue;
        }
        Py_ssize_t dup = -1;
        for (Py_ssize_t j = 0; j < k && n <= 256; j++)
            if (fresh[j].obj == items[i])
                dup = j;
        if (dup >= 0) {
            out[i] = (char *)fresh[dup].start;
            continue;
        }
        if (extent(items[i], &fresh[k]) < 0)
            goto fail;
        out[i] = (char *)fresh[k].start;
        k++;
    }
    if (register_pins(fresh, k, site) < 0)
        goto fail;
    if (reserve(self, k) < 0) {
        for (Py_ssize_t j = 0; j < k; j++)
            pb_region_remove(fresh[j].region);
        goto fail;
    }
    memcpy(self->pins + self->n, fresh, (size_t)k * sizeof *fresh);
    self->n += k;
    free(fresh);
    Py_RETURN_NONE;
fail:
    for (Py_ssize_t j = 0; j < k; j++)
        release_pin(&fresh[j]);
    free(fresh);
    return NULL;
}

static PyObject *pn_unpin_all(PinnerBase *self, PyObject *collect)
{
    if (PyObject_IsTrue(collect)) {
        PyObject *out = PyList_New(0);
        if (out == NULL)
            return NULL;
        unpin_all(self, out);
        return out;
    }
    unpin_all(self, NULL);
    Py_RETURN_NONE;
}

/* unpin(): at check level 2 the Python method _unpin_scan() does the work
 * (the scanner looks for the unpinned memory); otherwise all in C. */
static PyObject *pn_unpin(PinnerBase *self, PyObject *unused)
{
    (void)unused;
    PyObject *level = levels_dict ? PyDict_GetItemWithError(levels_dict, level_key) : NULL; /* borrowed */
    if (level == NULL && PyErr_Occurred())
        return NULL;
    if (level != NULL && PyLong_Check(level) && PyLong_AsLong(level) == 2)
        return PyObject_CallMethod((PyObject *)self, "_unpin_scan", NULL);
    unpin_all(self, NULL);
    Py_RETURN_NONE;
}

static PyObject *pn_is_pinned(PinnerBase *self, PyObject *obj)
{
    return PyBool_FromLong(find_pin(self, obj) >= 0);
}

static PyObject *pn_pins(PinnerBase *self, PyObject *unused)
{
    (void)unused;
    PyObject *out = PyList_New(0);
    for (Py_ssize_t i = 0; out != NULL && i < self->n; i++) {
        PyObject *t = Py_BuildValue("(OKnk)", self->pins[i].obj, (unsigned long long)self->pins[i].start,
                                    (Py_ssize_t)self->pins[i].size, (unsigned long)self->pins[i].site);
        if (t == NULL || PyList_Append(out, t) < 0)
            Py_CLEAR(out);
        Py_XDECREF(t);
    }
    return out;
}

static Py_ssize_t pn_length(PinnerBase *self)
{
    return self->n;
}

static PySequenceMethods pn_as_sequence = {
    .sq_length = (lenfunc)pn_length,
};

static PyMethodDef pn_methods[] = {
    {"pin", (PyCFunction)pn_pin, METH_O,
     "pin(obj) -> char *: pin obj (a contiguous buffer or owning cdata) until unpin()."},
    {"_pin_many", (PyCFunction)pn_pin_many, METH_VARARGS, "_pin_many(seq, out_address)"},
    {"unpin", (PyCFunction)pn_unpin, METH_NOARGS,
     "Release every pin of this Pinner; C must not use the pointers afterwards."},
    {"_unpin_all", (PyCFunction)pn_unpin_all, METH_O,
     "_unpin_all(collect) -> [(obj, start, size, site)] if collect else None"},
    {"is_pinned", (PyCFunction)pn_is_pinned, METH_O, "True if this Pinner currently pins obj."},
    {"_pins", (PyCFunction)pn_pins, METH_NOARGS, "_pins() -> [(obj, start, size, site)]"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject PinnerBaseType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "ptrbridge._native.PinnerBase",
    .tp_basicsize = sizeof(PinnerBase),
    .tp_dealloc = (destructor)pn_dealloc,
    .tp_finalize = (destructor)pn_finalize,
    .tp_as_sequence = &pn_as_sequence,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "The pins of a ptrbridge.Pinner.",
    .tp_weaklistoffset = offsetof(PinnerBase, weakreflist),
    .tp_methods = pn_methods,
    .tp_new = pn_new,
};

/* pins_init(ffi.CData, slow_extent, levels.__dict__) */
static PyObject *m_pins_init(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *cd, *slow, *levels;
    if (!PyArg_ParseTuple(args, "O!OO!", &PyType_Type, &cd, &slow, &PyDict_Type, &levels))
        return NULL;
    if (level_key == NULL && (level_key = PyUnicode_InternFromString("_level")) == NULL)
        return NULL;
    Py_XSETREF(cdata_type, Py_NewRef(cd));
    Py_XSETREF(slow_extent, Py_NewRef(slow));
    Py_XSETREF(levels_dict, Py_NewRef(levels));
    Py_RETURN_NONE;
}

/* pinners_live() -> [Pinner] holding at least one pin. */
static PyObject *m_pinners_live(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    PyObject *out = PyList_New(0);
    for (PinnerBase *p = pinners; out != NULL && p != NULL; p = p->next)
        if (p->n > 0 && Py_REFCNT(p) > 0 && PyList_Append(out, (PyObject *)p) < 0)
            Py_CLEAR(out);
    return out;
}

/* pin_region(region id) -> (obj, start, size, site) of the live pin, or None. */
static PyObject *m_pin_region(PyObject *self, PyObject *arg)
{
    (void)self;
    unsigned long long id = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred())
        return NULL;
    for (PinnerBase *p = pinners; p != NULL; p = p->next)
        for (Py_ssize_t i = 0; i < p->n; i++)
            if (p->pins[i].region == id)
                return Py_BuildValue("(OKnk)", p->pins[i].obj, (unsigned long long)p->pins[i].start,
                                     (Py_ssize_t)p->pins[i].size, (unsigned long)p->pins[i].site);
    Py_RETURN_NONE;
}

static PyMethodDef pin_functions[] = {
    {"pins_init", m_pins_init, METH_VARARGS, "pins_init(CData, slow_extent, charp)"},
    {"pinners_live", m_pinners_live, METH_NOARGS, "pinners_live() -> [Pinner]"},
    {"pin_region", m_pin_region, METH_O, "pin_region(id) -> (obj, start, size, site) or None"},
    {NULL, NULL, 0, NULL},
};

int pb__py_pins_init(PyObject *module)
{
    if (PyType_Ready(&PinnerBaseType) < 0)
        return -1;
    if (PyObject_SetAttrString(module, "PinnerBase", (PyObject *)&PinnerBaseType) < 0)
        return -1;
    return pb__add_functions(module, pin_functions);
}
