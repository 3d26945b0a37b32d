/*
 * pyslots.c - the R1 walk's inner loop: read every pointer slot of a C
 * object (or an array of them) and sort out, in one C call, the slots that
 * need no further thought.
 *
 * scan_slots(address, plan, count, level2) (address: an int or a pointer or
 * array cdata) reads `count` consecutive objects
 * laid out as `plan` says (checking.Layout packs it once per C type) and
 * returns None when every slot is settled here, or a flat list
 * [k0, v0, n0, k1, v1, n1, ...] of the slot numbers (element * slots +
 * slot), values and needs (1: in or at the end of a region, classify from
 * the start; 2: in no region and not C memory, look among the call's
 * owners) that the Python checker must classify.  A slot is settled when its
 * value is
 *
 *   - NULL;
 *   - inside (or one past the end of) a pinned region, and its pointee type
 *     has no pointer slots to walk on;
 *   - the start of a block of ptrbridge's tracked allocator (C memory);
 *   - at level 2, inside a live block an interposed C library got from
 *     malloc, not marked as Python memory (C memory).
 *
 * Everything else - managed or lent regions, pinned targets to walk on,
 * unknown addresses - goes back to Python, which knows the messages.  The
 * caller guarantees that the memory is readable (the checker only walks
 * memory it knows: Python objects, pinned regions, tracked C blocks).
 */
#include "pb_slots.h"

#include <string.h>

#include "pb_internal.h"
#include "pb_interpose.h"
#include "ptrbridge.h"

struct plan_head {
    uint32_t size;
    uint32_t nslots;
};

struct plan_slot {
    uint32_t offset;
    uint32_t flags;
};

static int is_pinned(uint64_t packed)
{
    return (packed & 3u) == (uint64_t)PB_REGION_PINNED;
}

/* 0 if the value is settled; else NEEDS_REGION (a region or a pin's end:
 * Python classifies it from the start) or NEEDS_OWNER (in no region, not C
 * memory: Python goes straight to the call's owners). */
enum { SETTLED = 0, NEEDS_REGION = 1, NEEDS_OWNER = 2 };

/* The need of a non-NULL slot `value`, given the region holding it (`at`)
 * and, if none, the one holding the byte before (`before`). */
static int needs_python(uintptr_t value, uint64_t at, uint64_t before, uint32_t flags, int level2)
{
    if (at)
        return is_pinned(at) && !(flags & PB_SLOT_WALKABLE) ? SETTLED : NEEDS_REGION;
    /* Not in a region but the byte before is: the value is that region's end
     * (C keeps end pointers, zlib's next_in).  One past a pin is the pin's. */
    if (before && is_pinned(before))
        return (flags & PB_SLOT_WALKABLE) ? NEEDS_REGION : SETTLED;
    if (before)
        return NEEDS_REGION;
    if (pb__alloc_block_size(value))
        return SETTLED;
    if (level2) {
        struct pb_iblock block;
        if (pb__interpose_find(value, &block) && !block.python)
            return SETTLED;
    }
    return NEEDS_OWNER;
}

static int append_hit(PyObject **out, Py_ssize_t k, uintptr_t value, int need)
{
    if (*out == NULL && (*out = PyList_New(0)) == NULL)
        return -1;
    PyObject *key = PyLong_FromSsize_t(k);
    PyObject *val = PyLong_FromUnsignedLongLong((unsigned long long)value);
    PyObject *how = PyLong_FromLong(need);
    int rc = -1;
    if (key != NULL && val != NULL && how != NULL && PyList_Append(*out, key) == 0 &&
        PyList_Append(*out, val) == 0 && PyList_Append(*out, how) == 0)
        rc = 0;
    Py_XDECREF(key);
    Py_XDECREF(val);
    Py_XDECREF(how);
    return rc;
}

/* cffi's exported C API (_cffi_backend._C_API, the table cffi-generated
 * modules use): entry 11 converts an argument to a C pointer of a ctype, as
 * a compiled call does.  With "void *" it is the address of any pointer or
 * array cdata, without the Python-level ffi.cast. */
static char *(*to_c_pointer)(PyObject *, PyObject *);
static PyObject *voidp_ctype;

/* The address `obj` stands for: an int, or a pointer/array cdata. */
static int address_arg(PyObject *obj, uintptr_t *out)
{
    if (PyLong_Check(obj)) {
        *out = (uintptr_t)PyLong_AsUnsignedLongLong(obj);
        return (*out == (uintptr_t)-1 && PyErr_Occurred()) ? -1 : 0;
    }
    if (to_c_pointer == NULL) {
        PyErr_SetString(PyExc_TypeError, "an address must be an int (slots_init() found no cffi C API)");
        return -1;
    }
    char *p = to_c_pointer(obj, voidp_ctype);
    if (PyErr_Occurred()) /* not a pointer or array (the value returned is then meaningless) */
        return -1;
    *out = (uintptr_t)p;
    return 0;
}

int pb__cdata_address(PyObject *cdata, uintptr_t *out)
{
    return address_arg(cdata, out);
}

static PyObject *m_cdata_address(PyObject *self, PyObject *arg)
{
    (void)self;
    uintptr_t address;
    if (address_arg(arg, &address) < 0)
        return NULL;
    return PyLong_FromUnsignedLongLong((unsigned long long)address);
}

static PyObject *m_slots_init(PyObject *self, PyObject *ctype)
{
    (void)self;
    void **exports = pb__cffi_exports();
    to_c_pointer = NULL;
    Py_XSETREF(voidp_ctype, Py_NewRef(ctype));
    if (exports != NULL)
        to_c_pointer = (char *(*)(PyObject *, PyObject *))exports[11];
    return PyBool_FromLong(to_c_pointer != NULL);
}

/* Checks `plan` (a bytes object, as checking.Layout packs it) and reads its head. */
static int read_plan(PyObject *plan, struct plan_head *head, const char **slots)
{
    if (!PyBytes_Check(plan)) {
        PyErr_SetString(PyExc_TypeError, "scan_slots: plan must be bytes");
        return -1;
    }
    const char *bytes = PyBytes_AS_STRING(plan);
    Py_ssize_t len = PyBytes_GET_SIZE(plan);
    if (len < (Py_ssize_t)sizeof *head) {
        PyErr_SetString(PyExc_ValueError, "scan_slots: plan too short");
        return -1;
    }
    memcpy(head, bytes, sizeof *head);
    if ((size_t)len < sizeof *head + (size_t)head->nslots * sizeof(struct plan_slot)) {
        PyErr_SetString(PyExc_ValueError, "scan_slots: plan truncated");
        return -1;
    }
    *slots = bytes + sizeof *head;
    return 0;
}

/* Slots read but not yet judged: the region index is asked for a batch at a time. */
#define BATCH 64

struct batch {
    size_t n;
    Py_ssize_t k[BATCH];
    uintptr_t value[BATCH];
    uint32_t flags[BATCH];
};

/* Judges the batch (see scan) and empties it. */
static int flush(struct batch *b, int level2, PyObject **out)
{
    uint64_t at[BATCH], before[BATCH];
    size_t n = b->n;
    b->n = 0;
    pb__region_lookup_edges(b->value, n, at, before);
    for (size_t i = 0; i < n; i++) {
        int need = needs_python(b->value[i], at[i], before[i], b->flags[i], level2);
        if (need == SETTLED)
            continue;
        if (out == NULL)
            return 1;
        if (append_hit(out, b->k[i], b->value[i], need) < 0)
            return -1;
    }
    return 0;
}

/* The walk of scan_slots.  With `out` NULL it stops at the first slot that
 * needs Python and returns 1 (0: every slot settled); with `out` it appends
 * every such slot to *out (made on the first) and returns 0.  -1: error set. */
static int scan(uintptr_t base, const struct plan_head *head, const char *slots, Py_ssize_t count, int level2,
                PyObject **out)
{
    if (base == 0 || head->nslots == 0 || count <= 0)
        return 0;
    struct batch b;
    b.n = 0;
    for (Py_ssize_t e = 0; e < count; e++) {
        uintptr_t element = base + (uintptr_t)e * head->size;
        for (uint32_t s = 0; s < head->nslots; s++) {
            struct plan_slot slot;
            memcpy(&slot, slots + (size_t)s * sizeof slot, sizeof slot);
            uintptr_t value;
            memcpy(&value, (const void *)(element + slot.offset), sizeof value);
            if (value == 0)
                continue;
            b.k[b.n] = e * (Py_ssize_t)head->nslots + s;
            b.value[b.n] = value;
            b.flags[b.n] = slot.flags;
            if (++b.n == BATCH) {
                int rc = flush(&b, level2, out);
                if (rc != 0)
                    return rc;
            }
        }
    }
    return b.n ? flush(&b, level2, out) : 0;
}

int pb__slots_settled_at(uintptr_t base, PyObject *plan, Py_ssize_t count, int level2)
{
    struct plan_head head;
    const char *slots;
    if (read_plan(plan, &head, &slots) < 0)
        return -1;
    int rc = scan(base, &head, slots, count, level2, NULL);
    return rc < 0 ? -1 : !rc;
}

int pb__slots_settled(PyObject *where, PyObject *plan, Py_ssize_t count, int level2)
{
    uintptr_t base;
    if (address_arg(where, &base) < 0)
        return -1;
    return pb__slots_settled_at(base, plan, count, level2);
}

static PyObject *m_scan_slots(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "scan_slots(address, plan: bytes, count, level2)");
        return NULL;
    }
    struct plan_head head;
    const char *slots;
    uintptr_t base;
    if (read_plan(args[1], &head, &slots) < 0 || address_arg(args[0], &base) < 0)
        return NULL;
    Py_ssize_t count = PyLong_AsSsize_t(args[2]);
    if (count == -1 && PyErr_Occurred())
        return NULL;
    int level2 = PyObject_IsTrue(args[3]);
    if (level2 < 0)
        return NULL;
    PyObject *out = NULL;
    if (scan(base, &head, slots, count, level2, &out) < 0) {
        Py_XDECREF(out);
        return NULL;
    }
    if (out == NULL)
        Py_RETURN_NONE;
    return out;
}

/* Whether a call converts `obj` for a parameter of pointer type `ctype` as
 * cffi does (its _cffi_to_c_pointer; cdata arguments only: bytes, lists and
 * the like go through another path of cffi's). */
static PyObject *m_pointer_accepts(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "pointer_accepts(ctype, cdata)");
        return NULL;
    }
    if (to_c_pointer == NULL) {
        PyErr_SetString(PyExc_TypeError, "pointer_accepts: slots_init() found no cffi C API");
        return NULL;
    }
    (void)to_c_pointer(args[1], args[0]);
    if (PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_TypeError))
            return NULL;
        PyErr_Clear();
        Py_RETURN_FALSE;
    }
    Py_RETURN_TRUE;
}

static PyObject *m_in_c_heap(PyObject *self, PyObject *arg)
{
    (void)self;
    uintptr_t address;
    if (address_arg(arg, &address) < 0)
        return NULL;
    struct pb_iblock block;
    return PyBool_FromLong(pb__interpose_find(address, &block) && !block.python);
}

static PyMethodDef slot_functions[] = {
    {"in_c_heap", m_in_c_heap, METH_O,
     "in_c_heap(address) -> bool: inside a live block an interposed C library got from malloc\n"
     "(not one the interposer marks as Python memory)"},
    {"pointer_accepts", (PyCFunction)(void (*)(void))m_pointer_accepts, METH_FASTCALL,
     "pointer_accepts(ctype, cdata) -> bool: a call converts the cdata for a parameter of that pointer type"},
    {"cdata_address", m_cdata_address, METH_O,
     "cdata_address(p) -> int: the address of a pointer or array cdata (an int as is)"},
    {"slots_init", m_slots_init, METH_O,
     "slots_init(ffi.typeof('void *')) -> bool: use cffi's C API for cdata addresses"},
    {"scan_slots", (PyCFunction)(void (*)(void))m_scan_slots, METH_FASTCALL,
     "scan_slots(address, plan, count, level2) -> None or [k, value, need, ...]: the pointer slots\n"
     "of `count` objects laid out as `plan` that the checker must classify in Python"},
    {NULL, NULL, 0, NULL},
};

int pb__py_slots_init(PyObject *module)
{
    return pb__add_functions(module, slot_functions);
}
