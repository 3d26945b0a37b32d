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
#include "pb_slots.h"

#if PY_VERSION_HEX >= 0x030B0000 && PY_VERSION_HEX < 0x030D0000
#define PB_INTERNAL_FRAMES 1
#define Py_BUILD_CORE 1
#include "internal/pycore_code.h"
#include "internal/pycore_frame.h"
#undef Py_BUILD_CORE
#elif PY_VERSION_HEX < 0x030B0000
#include <frameobject.h>
#endif

/* Called with each bound variable (borrowed references, valid for the call;
 * a visitor that may run Python code must hold `value` itself).  Returns 0,
 * or -1 with an exception set to stop. */
typedef int (*variable_visitor)(void *ctx, PyObject *name, PyObject *value);

static int append_pair(void *out, PyObject *name, PyObject *value)
{
    PyObject *pair = PyTuple_Pack(2, name, value);
    if (pair == NULL)
        return -1;
    int rc = PyList_Append((PyObject *)out, pair);
    Py_DECREF(pair);
    return rc;
}

static int visit_items(PyObject *mapping, variable_visitor visit, void *ctx)
{
    PyObject *items = PyMapping_Items(mapping); /* a copy: the visitor may change the mapping */
    if (items == NULL)
        return -1;
    Py_ssize_t n = PyList_GET_SIZE(items);
    int rc = 0;
    for (Py_ssize_t i = 0; rc == 0 && i < n; i++) {
        PyObject *pair = PyList_GET_ITEM(items, i);
        if (PyTuple_Check(pair) && PyTuple_GET_SIZE(pair) == 2)
            rc = visit(ctx, PyTuple_GET_ITEM(pair, 0), PyTuple_GET_ITEM(pair, 1));
    }
    Py_DECREF(items);
    return rc;
}

/* Visits the frame's bound variables without building anything for a fast frame. */
static int read_variables(PyFrameObject *frame, variable_visitor visit, void *out)
{
#if PY_VERSION_HEX >= 0x030D0000
    PyObject *view = PyFrame_GetLocals(frame); /* a write-through view: no snapshot */
    if (view == NULL)
        return -1;
    int rc = visit_items(view, visit, out);
    Py_DECREF(view);
    return rc;
#elif defined(PB_INTERNAL_FRAMES)
    _PyInterpreterFrame *f = frame->f_frame;
    PyCodeObject *co = f->f_code;
    if (!(co->co_flags & CO_OPTIMIZED))
        return f->f_locals != NULL ? visit_items(f->f_locals, visit, out) : 0;
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
        if (visit(out, PyTuple_GET_ITEM(co->co_localsplusnames, i), value) < 0)
            return -1;
    }
    return 0;
#else
    PyCodeObject *co = frame->f_code;
    if (!(co->co_flags & CO_OPTIMIZED))
        return frame->f_locals != NULL ? visit_items(frame->f_locals, visit, out) : 0;
    int nlocals = co->co_nlocals;
    for (int i = 0; i < nlocals; i++) {
        PyObject *value = frame->f_localsplus[i];
        if (value != NULL && visit(out, PyTuple_GET_ITEM(co->co_varnames, i), value) < 0)
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
            if (value != NULL && visit(out, PyTuple_GET_ITEM(groups[g], j), value) < 0)
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
    if (read_variables((PyFrameObject *)arg, append_pair, out) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    return out;
}

/*
 * The owners of one checked call: owner_index(args, frame, nframes, limit).
 *
 * The checker asks "which Python object does this address belong to?" for
 * every slot value it cannot settle otherwise.  The candidates are the
 * call's arguments (and the object a ctypes byref() wraps), the variables of
 * the caller and of the frames above it (`nframes` in all) with the items of
 * the lists, tuples and dicts among them, and what ctypes instances keep
 * alive for their pointer fields (`_objects`).  The index reads them once,
 * keeps (start, end, object, origin) of those that own memory, and answers
 * each address with a scan in insertion order (the first owner wins, as the
 * messages name it); the owner's text is made only for a hit.  The
 * arguments are read at once, the frames one at a time and only when an
 * address is in nothing read so far (usually the caller's own variables
 * answer, and the frames above are never read).
 *
 * What owns memory (the rest owns nothing):
 *   - owning cffi cdata: asked of checking's cdata_extent(obj);
 *   - ctypes instances: their buffer (addressof, sizeof);
 *   - bytes, bytearray, memoryview, array.array, and objects whose *type*
 *     has __array_interface__ (numpy): their buffer, if it can be exported
 *     and is contiguous (a failed export owns nothing).
 * The index holds strong references (to what it met, and to the next frame
 * to read) only while it lives: the call's check, which drops it when the
 * call returns.
 */
enum origin_base { ORIGIN_ARGUMENT, ORIGIN_LOCAL, ORIGIN_ITEM, ORIGIN_KEY };

struct owner_entry {
    uintptr_t start;
    uintptr_t end;
    PyObject *obj;
    PyObject *name;  /* variable name (locals), or NULL */
    PyObject *key;   /* dict key (ORIGIN_KEY), or NULL */
    Py_ssize_t index; /* argument number or list index */
    int base;
    int kept; /* how many "kept alive by" lead the origin */
};

struct origin {
    int base;
    Py_ssize_t index;
    PyObject *name; /* borrowed */
    PyObject *key;  /* borrowed */
    int kept;
};

typedef struct {
    PyObject_HEAD
    struct owner_entry *entries;
    Py_ssize_t n, cap, limit;
    uintptr_t low, high; /* bounds of every entry, for a quick miss */
    PyObject **seen; /* open-addressing set of the objects met (borrowed: `hold` keeps them) */
    size_t seen_cap, seen_n;
    PyObject *hold;  /* list: every object met, referenced while the index lives */
    PyObject *frame; /* the next frame to read, or NULL */
    Py_ssize_t frames_left;
    PyObject *pending; /* list of (name, list/tuple/dict) of the frame read last, items not yet read */
} OwnerIndex;

static struct {
    PyObject *never_owning; /* frozenset of types */
    PyTypeObject *cdata_type;
    PyObject *cdata_extent; /* callable(obj) -> None or (address, size) */
    PyObject *ctypes_bases; /* tuple of the ctypes instance base classes */
    PyObject *ctypes_extent;
    PyTypeObject *carg_type; /* type(ctypes.byref(...)) */
    PyTypeObject *array_type; /* array.array */
    PyObject *str_objects, *str_obj, *str_array_interface;
    PyObject *types_seen; /* type -> enum type_class */
} owners_cfg;

#define MAX_KEPT_DEPTH 8

static void owner_index_dealloc(OwnerIndex *self)
{
    for (Py_ssize_t i = 0; i < self->n; i++) {
        Py_XDECREF(self->entries[i].obj);
        Py_XDECREF(self->entries[i].name);
        Py_XDECREF(self->entries[i].key);
    }
    PyMem_Free(self->entries);
    PyMem_Free(self->seen);
    Py_XDECREF(self->frame);
    Py_XDECREF(self->pending);
    Py_XDECREF(self->hold);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* 1 if obj was not seen before (and is now), 0 if seen, -1 on memory error. */
static int mark_seen(OwnerIndex *self, PyObject *obj)
{
    if ((self->seen_n + 1) * 2 > self->seen_cap) {
        size_t cap = self->seen_cap ? self->seen_cap * 2 : 256;
        PyObject **table = PyMem_Calloc(cap, sizeof *table);
        if (table == NULL)
            return -1;
        for (size_t i = 0; i < self->seen_cap; i++) {
            PyObject *o = self->seen[i];
            if (o == NULL)
                continue;
            size_t h = ((uintptr_t)o >> 4) & (cap - 1);
            while (table[h] != NULL)
                h = (h + 1) & (cap - 1);
            table[h] = o;
        }
        PyMem_Free(self->seen);
        self->seen = table;
        self->seen_cap = cap;
    }
    size_t mask = self->seen_cap - 1;
    size_t h = ((uintptr_t)obj >> 4) & mask;
    while (self->seen[h] != NULL) {
        if (self->seen[h] == obj)
            return 0;
        h = (h + 1) & mask;
    }
    self->seen[h] = obj; /* borrowed: every object seen is referenced by the caller for the build */
    self->seen_n++;
    return 1;
}

/* The buffer of obj: 1 and its extent, 0 if it exports none (or a non-contiguous one). */
static int buffer_extent(PyObject *obj, uintptr_t *start, size_t *size)
{
    Py_buffer view;
    if (PyObject_GetBuffer(obj, &view, PyBUF_FULL_RO) < 0) {
        PyErr_Clear(); /* a failed export: the object owns nothing */
        return 0;
    }
    int ok = PyBuffer_IsContiguous(&view, 'A');
    *start = (uintptr_t)view.buf;
    *size = (size_t)view.len;
    PyBuffer_Release(&view);
    return ok;
}

static int pair_extent(PyObject *result, uintptr_t *start, size_t *size)
{
    if (result == NULL)
        return -1;
    int found = 0;
    if (result != Py_None) {
        if (!PyTuple_Check(result) || PyTuple_GET_SIZE(result) != 2) {
            PyErr_SetString(PyExc_TypeError, "owner_index: an extent function must return None or (address, size)");
            Py_DECREF(result);
            return -1;
        }
        *start = (uintptr_t)PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(result, 0));
        *size = (size_t)PyLong_AsSize_t(PyTuple_GET_ITEM(result, 1));
        found = PyErr_Occurred() ? -1 : 1;
    }
    Py_DECREF(result);
    return found;
}

/* What objects of a type can own, decided once per type (types_seen caches it). */
enum type_class { CLASS_NONE, CLASS_CDATA, CLASS_CTYPES, CLASS_BUFFER };

static int classify_type(PyTypeObject *type)
{
    PyObject *cached = owners_cfg.types_seen != NULL ? PyDict_GetItemWithError(owners_cfg.types_seen, (PyObject *)type)
                                                    : NULL;
    if (cached != NULL)
        return (int)PyLong_AsLong(cached);
    if (PyErr_Occurred())
        return -1;
    int klass = CLASS_NONE;
    if (owners_cfg.cdata_type != NULL && PyType_IsSubtype(type, owners_cfg.cdata_type)) {
        klass = CLASS_CDATA;
    } else if (owners_cfg.ctypes_bases != NULL && PyObject_IsSubclass((PyObject *)type, owners_cfg.ctypes_bases) == 1) {
        klass = CLASS_CTYPES;
    } else if (PyType_IsSubtype(type, &PyBytes_Type) || PyType_IsSubtype(type, &PyByteArray_Type) ||
               PyType_IsSubtype(type, &PyMemoryView_Type) || type == owners_cfg.array_type ||
               PyObject_HasAttr((PyObject *)type, owners_cfg.str_array_interface)) {
        klass = CLASS_BUFFER; /* __array_interface__ is looked up on the type, as numpy defines it */
    }
    PyErr_Clear();
    if (owners_cfg.types_seen != NULL && PyDict_GET_SIZE(owners_cfg.types_seen) < 4096) {
        PyObject *value = PyLong_FromLong(klass);
        if (value == NULL || PyDict_SetItem(owners_cfg.types_seen, (PyObject *)type, value) < 0) {
            Py_XDECREF(value);
            return -1;
        }
        Py_DECREF(value);
    }
    return klass;
}

static int is_ctypes_instance(PyObject *obj)
{
    return classify_type(Py_TYPE(obj)) == CLASS_CTYPES;
}

/* 1 and the extent of the memory obj owns, 0 if none, -1 on error. */
static int extent_of(PyObject *obj, int klass, uintptr_t *start, size_t *size)
{
    switch (klass) {
    case CLASS_CDATA:
        return pair_extent(PyObject_CallOneArg(owners_cfg.cdata_extent, obj), start, size);
    case CLASS_CTYPES:
        if (buffer_extent(obj, start, size))
            return 1;
        return pair_extent(PyObject_CallOneArg(owners_cfg.ctypes_extent, obj), start, size);
    case CLASS_BUFFER:
        return buffer_extent(obj, start, size);
    default:
        return klass < 0 ? -1 : 0;
    }
}

static int add_entry(OwnerIndex *self, PyObject *obj, uintptr_t start, size_t size, const struct origin *o)
{
    if (self->n == self->cap) {
        Py_ssize_t cap = self->cap ? self->cap * 2 : 16;
        struct owner_entry *grown = PyMem_Realloc(self->entries, (size_t)cap * sizeof *grown);
        if (grown == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        self->entries = grown;
        self->cap = cap;
    }
    struct owner_entry *e = &self->entries[self->n++];
    e->start = start;
    e->end = start + size;
    e->obj = Py_NewRef(obj);
    e->name = Py_XNewRef(o->name);
    e->key = Py_XNewRef(o->key);
    e->index = o->index;
    e->base = o->base;
    e->kept = o->kept;
    if (self->n == 1 || start < self->low)
        self->low = start;
    if (self->n == 1 || e->end > self->high)
        self->high = e->end;
    return 0;
}

/* What a ctypes instance keeps alive for its pointer fields, flattened as
 * checking's _ctypes_kept did: dict values, and their own records. */
static int collect_kept(PyObject *obj, PyObject *out, int depth, Py_ssize_t limit)
{
    if (depth > MAX_KEPT_DEPTH || !is_ctypes_instance(obj))
        return 0;
    PyObject *kept = PyObject_GetAttr(obj, owners_cfg.str_objects);
    if (kept == NULL) {
        PyErr_Clear();
        return 0;
    }
    int rc = 0;
    PyObject *stack = PyList_New(0);
    if (stack == NULL || (PyObject_IsTrue(kept) == 1 && PyList_Append(stack, kept) < 0))
        rc = -1;
    while (rc == 0 && stack != NULL && PyList_GET_SIZE(stack) > 0 && PyList_GET_SIZE(out) < limit) {
        Py_ssize_t last = PyList_GET_SIZE(stack) - 1;
        PyObject *item = Py_NewRef(PyList_GET_ITEM(stack, last));
        if (PyList_SetSlice(stack, last, last + 1, NULL) < 0) {
            Py_DECREF(item);
            rc = -1;
            break;
        }
        if (PyDict_Check(item)) {
            PyObject *values = PyDict_Values(item);
            if (values == NULL)
                rc = -1;
            for (Py_ssize_t i = 0; rc == 0 && i < PyList_GET_SIZE(values); i++)
                rc = PyList_Append(stack, PyList_GET_ITEM(values, i));
            Py_XDECREF(values);
        } else if (item != Py_None) {
            rc = PyList_Append(out, item);
            if (rc == 0)
                rc = collect_kept(item, out, depth + 1, limit);
        }
        Py_DECREF(item);
    }
    Py_XDECREF(stack);
    Py_DECREF(kept);
    return rc;
}

static int never_owning(PyObject *obj)
{
    return PySet_Contains(owners_cfg.never_owning, (PyObject *)Py_TYPE(obj)) == 1;
}

static int add_object(OwnerIndex *self, PyObject *obj, const struct origin *o)
{
    if (self->n >= self->limit || never_owning(obj))
        return 0;
    int fresh = mark_seen(self, obj);
    if (fresh <= 0)
        return fresh < 0 ? (PyErr_NoMemory(), -1) : 0;
    int klass = classify_type(Py_TYPE(obj));
    uintptr_t start = 0;
    size_t size = 0;
    int found = extent_of(obj, klass, &start, &size);
    if (found < 0 || (found && add_entry(self, obj, start, size, o) < 0))
        return -1;
    if (klass != CLASS_CTYPES)
        return 0;
    PyObject *kept = PyList_New(0);
    if (kept == NULL || collect_kept(obj, kept, 0, self->limit) < 0) {
        Py_XDECREF(kept);
        return -1;
    }
    struct origin inner = *o;
    inner.kept++;
    int rc = 0;
    for (Py_ssize_t i = 0; rc == 0 && i < PyList_GET_SIZE(kept); i++) {
        PyObject *item = PyList_GET_ITEM(kept, i);
        rc = add_object(self, item, &inner);
    }
    Py_DECREF(kept);
    return rc;
}

static int is_container(PyObject *value)
{
    return PyList_CheckExact(value) || PyTuple_CheckExact(value) || PyDict_CheckExact(value);
}

/* The items of a list, tuple or dict variable (up to the index's limit). */
static int add_items(OwnerIndex *self, PyObject *name, PyObject *value)
{
    if (PyList_CheckExact(value) || PyTuple_CheckExact(value)) {
        PyObject *items = PySequence_Fast(value, "");
        if (items == NULL)
            return -1;
        Py_ssize_t n = PySequence_Fast_GET_SIZE(items);
        if (n > self->limit)
            n = self->limit;
        int rc = 0;
        for (Py_ssize_t j = 0; rc == 0 && j < n && j < PySequence_Fast_GET_SIZE(items); j++) {
            PyObject *item = Py_NewRef(PySequence_Fast_GET_ITEM(items, j));
            struct origin io = {ORIGIN_ITEM, j, name, NULL, 0};
            rc = add_object(self, item, &io);
            Py_DECREF(item);
        }
        Py_DECREF(items);
        return rc;
    }
    if (PyDict_CheckExact(value)) {
        PyObject *items = PyDict_Items(value);
        if (items == NULL)
            return -1;
        Py_ssize_t n = PyList_GET_SIZE(items);
        if (n > self->limit)
            n = self->limit;
        int rc = 0;
        for (Py_ssize_t j = 0; rc == 0 && j < n; j++) {
            PyObject *pair = PyList_GET_ITEM(items, j);
            struct origin io = {ORIGIN_KEY, j, name, PyTuple_GET_ITEM(pair, 0), 0};
            rc = add_object(self, PyTuple_GET_ITEM(pair, 1), &io);
        }
        Py_DECREF(items);
        return rc;
    }
    return 0;
}

static PyTypeObject OwnerIndexType;

struct variable_ctx {
    OwnerIndex *index;
    PyObject *hold;       /* keeps every variable's value referenced while the build runs */
    PyObject *containers; /* (name, list/tuple/dict) of the frame, their items indexed last */
};

static int index_variable(void *arg, PyObject *name, PyObject *value)
{
    struct variable_ctx *ctx = arg;
    if (never_owning(value))
        return 0;
    /* The seen set borrows what it marks, and the visit may run Python code
     * (cdata_extent) that rebinds the variable: hold the value and its name. */
    if (PyList_Append(ctx->hold, value) < 0 || PyList_Append(ctx->hold, name) < 0)
        return -1;
    struct origin o = {ORIGIN_LOCAL, 0, name, NULL, 0};
    if (add_object(ctx->index, value, &o) < 0)
        return -1;
    if (!is_container(value))
        return 0;
    /* Items after every variable of the frame: a list of 500 output chunks read
     * first would fill the index before the buffer a later variable names. */
    PyObject *pair = PyTuple_Pack(2, name, value);
    if (pair == NULL)
        return -1;
    int rc = PyList_Append(ctx->containers, pair);
    Py_DECREF(pair);
    return rc;
}

static PyObject *m_owner_index(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "owner_index(args, frame, nframes, limit)");
        return NULL;
    }
    if (owners_cfg.never_owning == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "owner_index: owners_init() was not called");
        return NULL;
    }
    Py_ssize_t nframes = PyLong_AsSsize_t(args[2]);
    Py_ssize_t limit = PyLong_AsSsize_t(args[3]);
    if ((nframes == -1 || limit == -1) && PyErr_Occurred())
        return NULL;
    PyObject *call_args = PySequence_Fast(args[0], "owner_index: args must be a sequence");
    if (call_args == NULL)
        return NULL;
    OwnerIndex *self = PyObject_New(OwnerIndex, &OwnerIndexType);
    if (self == NULL) {
        Py_DECREF(call_args);
        return NULL;
    }
    self->entries = NULL;
    self->n = self->cap = 0;
    self->limit = limit;
    self->low = self->high = 0;
    self->seen = NULL;
    self->seen_cap = self->seen_n = 0;
    self->frame = NULL;
    self->frames_left = 0;
    self->pending = NULL;
    self->hold = PyList_New(0);
    int rc = self->hold == NULL ? -1 : 0;
    for (Py_ssize_t i = 0; rc == 0 && i < PySequence_Fast_GET_SIZE(call_args); i++) {
        PyObject *arg = PySequence_Fast_GET_ITEM(call_args, i);
        if (owners_cfg.carg_type != NULL && Py_TYPE(arg) == owners_cfg.carg_type) {
            /* ctypes.byref() wraps its object in _obj */
            PyObject *inner = PyObject_GetAttr(arg, owners_cfg.str_obj);
            if (inner == NULL) {
                PyErr_Clear();
            } else {
                rc = PyList_Append(self->hold, inner);
                Py_DECREF(inner);
                arg = inner; /* held by `hold` */
            }
        }
        if (rc == 0)
            rc = PyList_Append(self->hold, arg); /* the seen set borrows it */
        if (rc == 0) {
            struct origin o = {ORIGIN_ARGUMENT, i + 1, NULL, NULL, 0};
            rc = add_object(self, arg, &o);
        }
    }
    Py_DECREF(call_args);
    if (rc < 0) {
        Py_DECREF(self);
        return NULL;
    }
    /* The frames are read one at a time, when an address is found in nothing read so far. */
    if (args[1] != Py_None && PyFrame_Check(args[1]) && nframes > 0) {
        self->frame = Py_NewRef(args[1]);
        self->frames_left = nframes;
    }
    return (PyObject *)self;
}

/* Reads more candidates into the index: the items of the containers among the
 * variables of the frame read last, else the next frame's variables (its
 * containers' items wait for the next read: most pointers are found among the
 * variables, and a list of 500 output chunks would cost more than the search).
 * 1 if it read something, 0 if nothing is left, -1 on error. */
static int read_next_frame(OwnerIndex *self)
{
    PyObject *pending = self->pending;
    if (pending != NULL) {
        self->pending = NULL;
        int rc = 0;
        for (Py_ssize_t i = 0; rc == 0 && i < PyList_GET_SIZE(pending); i++) {
            PyObject *pair = PyList_GET_ITEM(pending, i);
            rc = add_items(self, PyTuple_GET_ITEM(pair, 0), PyTuple_GET_ITEM(pair, 1));
        }
        Py_DECREF(pending);
        return rc < 0 ? -1 : 1;
    }
    PyObject *frame = self->frame;
    if (frame == NULL)
        return 0;
    self->frame = NULL;
    struct variable_ctx ctx = {self, self->hold, PyList_New(0)};
    int rc = ctx.containers == NULL ? -1 : read_variables((PyFrameObject *)frame, index_variable, &ctx);
    if (rc == 0 && PyList_GET_SIZE(ctx.containers) > 0)
        self->pending = Py_NewRef(ctx.containers);
    Py_XDECREF(ctx.containers);
    if (rc == 0 && --self->frames_left > 0) {
        PyObject *back = (PyObject *)PyFrame_GetBack((PyFrameObject *)frame);
        if (back != NULL && !PyFrame_Check(back))
            Py_CLEAR(back);
        self->frame = back;
    }
    Py_DECREF(frame);
    return rc < 0 ? -1 : 1;
}

static PyObject *origin_text(const struct owner_entry *e)
{
    PyObject *text;
    switch (e->base) {
    case ORIGIN_ARGUMENT:
        text = PyUnicode_FromFormat("argument %zd", e->index);
        break;
    case ORIGIN_LOCAL:
        text = PyUnicode_FromFormat("local variable '%U'", e->name);
        break;
    case ORIGIN_ITEM:
        text = PyUnicode_FromFormat("local variable '%U[%zd]'", e->name, e->index);
        break;
    default:
        text = PyUnicode_FromFormat("local variable '%U[%R]'", e->name, e->key);
        break;
    }
    for (int k = 0; text != NULL && k < e->kept; k++) {
        PyObject *longer = PyUnicode_FromFormat("kept alive by %U", text);
        Py_DECREF(text);
        text = longer;
    }
    return text;
}

static PyObject *owner_index_find(OwnerIndex *self, PyObject *arg)
{
    uintptr_t address = (uintptr_t)PyLong_AsUnsignedLongLong(arg);
    if (address == (uintptr_t)-1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t from = 0;
    for (;;) {
        int complete = self->frame == NULL && self->pending == NULL;
        if (!complete || !(self->n == 0 || address < self->low || address > self->high)) {
            for (Py_ssize_t i = from; i < self->n; i++) {
                const struct owner_entry *e = &self->entries[i];
                if ((e->start <= address && address < e->end) || address == e->start) {
                    PyObject *origin = origin_text(e);
                    if (origin == NULL)
                        return NULL;
                    return Py_BuildValue("(KnON)", (unsigned long long)e->start,
                                         (Py_ssize_t)(e->end - e->start), e->obj, origin);
                }
            }
        }
        /* Not among the owners read so far: read the next frame (its owners come after). */
        from = self->n;
        int more = read_next_frame(self);
        if (more < 0)
            return NULL;
        if (more == 0)
            Py_RETURN_NONE;
    }
}

static Py_ssize_t owner_index_len(OwnerIndex *self)
{
    return self->n;
}

static PyMethodDef owner_index_methods[] = {
    {"find", (PyCFunction)owner_index_find, METH_O,
     "find(address) -> None or (start, size, object, origin): the first owner containing address"},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods owner_index_as_sequence = {
    .sq_length = (lenfunc)owner_index_len,
};

static PyTypeObject OwnerIndexType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "ptrbridge._native.OwnerIndex",
    .tp_basicsize = sizeof(OwnerIndex),
    .tp_dealloc = (destructor)owner_index_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The Python objects one checked call can reach, by address (see owner_index).",
    .tp_methods = owner_index_methods,
    .tp_as_sequence = &owner_index_as_sequence,
};

static PyObject *m_owners_init(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 7 || !PyAnySet_Check(args[0]) || !PyType_Check(args[1]) || !PyTuple_Check(args[3]) ||
        !PyType_Check(args[5]) || !PyType_Check(args[6])) {
        PyErr_SetString(PyExc_TypeError,
                        "owners_init(never_owning: frozenset, cdata_type, cdata_extent, ctypes_bases: tuple, "
                        "ctypes_extent, byref_type, array_type)");
        return NULL;
    }
    if (owners_cfg.str_objects == NULL) {
        owners_cfg.str_objects = PyUnicode_InternFromString("_objects");
        owners_cfg.str_obj = PyUnicode_InternFromString("_obj");
        owners_cfg.str_array_interface = PyUnicode_InternFromString("__array_interface__");
        if (owners_cfg.str_objects == NULL || owners_cfg.str_obj == NULL || owners_cfg.str_array_interface == NULL)
            return NULL;
    }
    Py_XSETREF(owners_cfg.never_owning, Py_NewRef(args[0]));
    Py_XSETREF(owners_cfg.cdata_type, (PyTypeObject *)Py_NewRef(args[1]));
    Py_XSETREF(owners_cfg.cdata_extent, Py_NewRef(args[2]));
    Py_XSETREF(owners_cfg.ctypes_bases, Py_NewRef(args[3]));
    Py_XSETREF(owners_cfg.ctypes_extent, Py_NewRef(args[4]));
    Py_XSETREF(owners_cfg.carg_type, (PyTypeObject *)Py_NewRef(args[5]));
    Py_XSETREF(owners_cfg.array_type, (PyTypeObject *)Py_NewRef(args[6]));
    Py_XSETREF(owners_cfg.types_seen, PyDict_New());
    if (owners_cfg.types_seen == NULL)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *m_buffer_extent(PyObject *self, PyObject *obj)
{
    (void)self;
    uintptr_t start;
    size_t size;
    if (!buffer_extent(obj, &start, &size))
        Py_RETURN_NONE;
    return Py_BuildValue("(Kn)", (unsigned long long)start, (Py_ssize_t)size);
}

static PyMethodDef frame_functions[] = {
    {"buffer_extent", m_buffer_extent, METH_O,
     "buffer_extent(obj) -> None or (address, size): obj's buffer, if it exports a contiguous one"},
    {"frame_variables", m_frame_variables, METH_O,
     "frame_variables(frame) -> [(name, value)]: the frame's bound variables, without the\n"
     "f_locals snapshot that would keep them alive (CPython < 3.13)"},
    {"owner_index", (PyCFunction)(void (*)(void))m_owner_index, METH_FASTCALL,
     "owner_index(args, frame, nframes, limit) -> OwnerIndex: the Python objects a checked\n"
     "call reaches (arguments, the variables of nframes frames from frame), by address"},
    {"owners_init", (PyCFunction)(void (*)(void))m_owners_init, METH_FASTCALL,
     "owners_init(never_owning, cdata_type, cdata_extent, ctypes_bases, ctypes_extent,\n"
     "byref_type, array_type): what owner_index needs to know (called once by checking)"},
    {NULL, NULL, 0, NULL},
};

int pb__py_frames_init(PyObject *module)
{
    if (PyType_Ready(&OwnerIndexType) < 0)
        return -1;
    if (pb__add_functions(module, frame_functions) < 0)
        return -1;
    return pb__py_slots_init(module);
}

