/*
 * pylends.c - level 2's lends on the checked call's fast path (pycall.c), kept
 * in C with their texts made only when a report asks.
 *
 * A level-2 call that lends bytes, a bytearray or ffi.new memory whose pointer
 * slots are settled (and nothing that needs a walk) runs in C: it adds a lent region, calls C, returns the region and
 * queues the range for the next retention scan (lends.c).  What Python's
 * closure would record with it (scanning.returned) is recorded here instead,
 * as numbers and borrowed-by-reference objects:
 *
 *   - a *pending* record per queued scan target (its id, the range, the
 *     buffer's type or ctype, the function's name, the call site as a pysite.c id),
 *     so that a scan that finds a pointer into the range can name the lend.
 *     scanning.scan() swaps the pending records out before it runs the scan
 *     (pending -> scanning) and drops them after; a target queued by another
 *     thread while the scan runs keeps its record in `pending`, and a lookup
 *     reads both.
 *   - a *history* record in a ring of FL_HISTORY, with the heap map's free
 *     clock at return (pb__heapmap_clock_store), so that a pointer found
 *     later into the freed buffer still names the call that lent it
 *     (scanning._best_lend reads it beside its own records).  The same
 *     buffer lent again by the same call site is the same record, refreshed
 *     (a loop passing one payload does not flush the ring), found through a
 *     direct-mapped index by start address.
 *
 * The Python closure's level-2 lends end here too (lend_return): one C call
 * instead of a target id, a queue call and two dict records in Python; their
 * descriptions and sites are already text.
 *
 * Target ids and lend sequence numbers come from counters here, shared with
 * scanning.py (native.target_ids, native.lend_seqs), so that the scanner's
 * "newest target wins" and the history's "newest lend wins" hold across both
 * paths.  Everything here runs with the GIL held; the arrays are libc memory
 * (never the hooked Python allocators, which would fill the heap map's
 * history with ptrbridge's own blocks).  What was lent (bytes, bytearray, or
 * the ctype of ffi.new memory) and the function's name are strong
 * references, released when a record goes.
 */
#include "pb_py.h"
#include "pb_heapmap.h"
#include "pb_internal.h"

#include <stdlib.h>
#include <string.h>

#define FL_HISTORY 65536u /* as scanning.LENT_HISTORY */
#define FL_INDEX 65536u   /* direct-mapped: start -> history slot + 1 */

struct fl_pending {
    uint64_t target_id;
    uintptr_t start;
    size_t size;
    PyObject *kind;     /* strong: bytes, bytearray, the ctype of ffi.new memory, or the description (str) */
    PyObject *function; /* strong */
    PyObject *where;    /* strong: the site's text, or NULL (then `site`) */
    uint32_t site;
};

struct fl_array {
    struct fl_pending *items;
    size_t n, cap;
};

struct fl_history {
    uintptr_t start;
    size_t size;
    PyObject *kind;     /* strong */
    PyObject *function; /* strong; NULL: an empty slot */
    PyObject *where;    /* strong, or NULL */
    uint32_t site;
    uint64_t seq;
    uint64_t clock[3];
};

static struct fl_array fl_pending_now, fl_scanning;
static struct fl_history *fl_ring; /* FL_HISTORY records, allocated at the first lend */
static uint32_t *fl_index;
static size_t fl_ring_next;
static uint64_t fl_next_target = 1;
static uint64_t fl_next_seq = 1;

uint64_t pb__fl_take_ids(uint64_t n)
{
    uint64_t first = fl_next_target;
    fl_next_target += n;
    return first;
}

static void array_clear(struct fl_array *a)
{
    for (size_t i = 0; i < a->n; i++) {
        Py_DECREF(a->items[i].kind);
        Py_DECREF(a->items[i].function);
        Py_XDECREF(a->items[i].where);
    }
    a->n = 0;
}

static size_t index_of(uintptr_t start)
{
    uint64_t h = (uint64_t)start * 0x9E3779B97F4A7C15ull;
    return (size_t)(h >> 48) & (FL_INDEX - 1);
}

static int same_text(PyObject *a, PyObject *b)
{
    if (a == b)
        return 1;
    if (a == NULL || b == NULL || !PyUnicode_CheckExact(a) || !PyUnicode_CheckExact(b))
        return 0;
    return PyUnicode_Compare(a, b) == 0; /* never fails on two str */
}

static int record(uint64_t target_id, uintptr_t start, size_t size, PyObject *kind, PyObject *function,
                  PyObject *where, uint32_t site);

/* Records a lend the fast path returned and queued as target_id.  0, or -1 with MemoryError set. */
int pb__fl_returned(uint64_t target_id, uintptr_t start, size_t size, PyObject *kind, PyObject *function,
                    uint32_t site)
{
    return record(target_id, start, size, kind, function, NULL, site);
}

static int record(uint64_t target_id, uintptr_t start, size_t size, PyObject *kind, PyObject *function,
                  PyObject *where, uint32_t site)
{
    struct fl_array *a = &fl_pending_now;
    if (a->n == a->cap) {
        size_t cap = a->cap ? 2 * a->cap : 256;
        struct fl_pending *items = realloc(a->items, cap * sizeof *items);
        if (items == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        a->items = items;
        a->cap = cap;
    }
    if (fl_ring == NULL) {
        fl_ring = calloc(FL_HISTORY, sizeof *fl_ring);
        fl_index = calloc(FL_INDEX, sizeof *fl_index);
        if (fl_ring == NULL || fl_index == NULL) {
            free(fl_ring);
            free(fl_index);
            fl_ring = NULL;
            fl_index = NULL;
            PyErr_NoMemory();
            return -1;
        }
    }
    a->items[a->n++] =
        (struct fl_pending){target_id, start, size, Py_NewRef(kind), Py_NewRef(function), Py_XNewRef(where), site};

    size_t at = index_of(start);
    struct fl_history *h = NULL;
    if (fl_index[at] != 0) {
        struct fl_history *old = &fl_ring[fl_index[at] - 1];
        if (old->function != NULL && old->start == start && old->size == size && same_text(old->kind, kind) &&
            old->site == site && same_text(old->where, where) && same_text(old->function, function))
            h = old; /* lent again: a new seq and clock, the same slot */
    }
    PyObject *old_function = NULL, *old_kind = NULL, *old_where = NULL;
    if (h == NULL) {
        size_t slot = fl_ring_next;
        fl_ring_next = (fl_ring_next + 1) % FL_HISTORY;
        h = &fl_ring[slot];
        old_function = h->function;
        old_kind = h->kind;
        old_where = h->where;
        h->function = Py_NewRef(function);
        h->kind = Py_NewRef(kind);
        h->where = Py_XNewRef(where);
        h->start = start;
        h->size = size;
        h->site = site;
        fl_index[at] = (uint32_t)slot + 1;
    }
    h->seq = fl_next_seq++;
    pb__heapmap_clock_store(h->clock, 0);
    /* Released last: a deallocator that ran Python (and lent again) would find the ring whole. */
    Py_XDECREF(old_function);
    Py_XDECREF(old_kind);
    Py_XDECREF(old_where);
    return 0;
}

size_t pb__fl_pending(void)
{
    return fl_pending_now.n + fl_scanning.n;
}

/* -- module functions ---------------------------------------------------- */

PyObject *pb__fl_description(PyObject *kind, size_t size)
{
    if (PyUnicode_Check(kind)) /* the description itself (the closure's lends) */
        return Py_NewRef(kind);
    if (PyType_Check(kind)) { /* ownership.type_text */
        PyObject *name = PyObject_GetAttrString(kind, "__name__");
        if (name == NULL)
            return NULL;
        PyObject *text = PyUnicode_FromFormat("%U(%zu)", name, size);
        Py_DECREF(name);
        return text;
    }
    PyObject *cname = PyObject_GetAttrString(kind, "cname"); /* ownership.cdata_text */
    if (cname == NULL)
        return NULL;
    PyObject *text = PyUnicode_FromFormat("cdata '%U'(%zu)", cname, size);
    Py_DECREF(cname);
    return text;
}

static PyObject *record_tuple(uintptr_t start, size_t size, PyObject *kind, PyObject *function, PyObject *at,
                              uint32_t site)
{
    PyObject *text = pb__fl_description(kind, size);
    PyObject *where = text == NULL ? NULL : at != NULL ? Py_NewRef(at) : pb__site_text(site);
    PyObject *out = where ? Py_BuildValue("(KnOOO)", (unsigned long long)start, (Py_ssize_t)size, text, function,
                                          where)
                          : NULL;
    Py_XDECREF(text);
    Py_XDECREF(where);
    return out;
}

static struct fl_pending *find_target(struct fl_array *a, uint64_t id)
{
    size_t lo = 0, hi = a->n; /* ids grow along the array (taken and appended with the GIL held) */
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (a->items[mid].target_id < id)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < a->n && a->items[lo].target_id == id ? &a->items[lo] : NULL;
}

static PyObject *m_target_ids(PyObject *self, PyObject *arg)
{
    (void)self;
    unsigned long long n = PyLong_AsUnsignedLongLong(arg);
    if (n == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    return PyLong_FromUnsignedLongLong(pb__fl_take_ids(n));
}

static PyObject *m_lend_seqs(PyObject *self, PyObject *arg)
{
    (void)self;
    unsigned long long n = PyLong_AsUnsignedLongLong(arg);
    if (n == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    uint64_t first = fl_next_seq;
    fl_next_seq += n;
    return PyLong_FromUnsignedLongLong(first);
}

static PyObject *m_fast_lends_pending(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyLong_FromSize_t(pb__fl_pending());
}

static PyObject *m_fast_lends_swap(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    array_clear(&fl_scanning); /* a scan that ended without releasing (an exception) */
    struct fl_array t = fl_scanning;
    fl_scanning = fl_pending_now;
    fl_pending_now = t;
    Py_RETURN_NONE;
}

static PyObject *m_fast_lends_release(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    array_clear(&fl_scanning);
    Py_RETURN_NONE;
}

static PyObject *m_fast_lend_target(PyObject *self, PyObject *arg)
{
    (void)self;
    unsigned long long id = PyLong_AsUnsignedLongLong(arg);
    if (id == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    struct fl_pending *p = find_target(&fl_scanning, id);
    if (p == NULL)
        p = find_target(&fl_pending_now, id);
    if (p == NULL)
        Py_RETURN_NONE;
    return record_tuple(p->start, p->size, p->kind, p->function, p->where, p->site);
}

/* fast_lend_best(start, size) -> None or (lent start, size, description, function, site, seq):
 * the newest fast lend overlapping [start, start + size) made while the object freed there was
 * alive (exactly one heap-map free of its address since), as scanning._best_lend asks. */
static PyObject *m_fast_lend_best(PyObject *self, PyObject *args)
{
    (void)self;
    unsigned long long start_arg, size_arg;
    if (!PyArg_ParseTuple(args, "KK", &start_arg, &size_arg))
        return NULL;
    if (fl_ring == NULL)
        Py_RETURN_NONE;
    uintptr_t start = (uintptr_t)start_arg, end = start + (size_arg ? (uintptr_t)size_arg : 1);
    struct fl_history *best = NULL;
    for (size_t i = 0; i < FL_HISTORY; i++) {
        struct fl_history *h = &fl_ring[i];
        if (h->function == NULL || h->start >= end || start >= h->start + (h->size ? h->size : 1))
            continue;
        if (best != NULL && h->seq < best->seq)
            continue;
        if (pb__heapmap_frees_since(h->start, h->clock) != 1)
            continue;
        best = h;
    }
    if (best == NULL)
        Py_RETURN_NONE;
    PyObject *rec = record_tuple(best->start, best->size, best->kind, best->function, best->where, best->site);
    if (rec == NULL)
        return NULL;
    PyObject *out = Py_BuildValue("(OK)", rec, (unsigned long long)best->seq);
    Py_DECREF(rec);
    return out;
}

/* lend_return(region, start, size, description, function, site) -> what pb__lend_return says (1: queued,
 * 0: pinned, < 0: a PB_ERR_* code): the end of a lend the Python closure made (calls._return_lent),
 * recorded here as the fast path's are. */
static PyObject *m_lend_return(PyObject *self, PyObject *args)
{
    (void)self;
    unsigned long long region, start;
    Py_ssize_t size;
    PyObject *description, *function, *where;
    if (!PyArg_ParseTuple(args, "KKnUUU", &region, &start, &size, &description, &function, &where))
        return NULL;
    if (size < 0) {
        PyErr_SetString(PyExc_ValueError, "lend_return: negative size");
        return NULL;
    }
    uint64_t target = pb__fl_take_ids(1);
    int queued = pb__lend_return(region, (uintptr_t)start, (size_t)size, target);
    if (queued == 1 && record(target, (uintptr_t)start, (size_t)size, description, function, where, 0) < 0)
        return NULL;
    return PyLong_FromLong(queued);
}

static PyMethodDef lend_functions[] = {
    {"lend_return", m_lend_return, METH_VARARGS,
     "lend_return(region, start, size, description, function, site) -> 1 queued, 0 pinned, < 0 error"},
    {"target_ids", m_target_ids, METH_O, "target_ids(n) -> the first of n new consecutive scan target ids"},
    {"lend_seqs", m_lend_seqs, METH_O, "lend_seqs(n) -> the first of n new consecutive lend sequence numbers"},
    {"fast_lends_pending", m_fast_lends_pending, METH_NOARGS,
     "fast_lends_pending() -> how many fast-path lends await a scan"},
    {"fast_lends_swap", m_fast_lends_swap, METH_NOARGS, "fast_lends_swap(): before a scan runs"},
    {"fast_lends_release", m_fast_lends_release, METH_NOARGS, "fast_lends_release(): after the scan"},
    {"fast_lend_target", m_fast_lend_target, METH_O,
     "fast_lend_target(id) -> None or (start, size, description, function, site)"},
    {"fast_lend_best", m_fast_lend_best, METH_VARARGS,
     "fast_lend_best(start, size) -> None or ((start, size, description, function, site), seq)"},
    {NULL, NULL, 0, NULL},
};

int pb__py_lends_init(PyObject *module)
{
    return pb__add_functions(module, lend_functions);
}
