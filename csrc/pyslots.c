/*
 * pyslots.c - the R1 walk's inner loop: read every pointer slot of a C
 * object (or an array of them) and sort out, in one C call, the slots that
 * need no further thought.
 *
 * scan_slots(address, plan, count, level2) reads `count` consecutive objects
 * laid out as `plan` says (checking.Layout packs it once per C type) and
 * returns None when every slot is settled here, or a flat list
 * [k0, v0, k1, v1, ...] of the slot numbers (element * slots + slot) and
 * values that the Python checker must classify.  A slot is settled when its
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

/* 1 if the value needs Python's attention, 0 if settled. */
static int needs_python(uintptr_t value, uint32_t flags, int level2)
{
    uint64_t packed = pb__region_lookup(value);
    if (packed)
        return !(is_pinned(packed) && !(flags & PB_SLOT_WALKABLE));
    /* Not in a region but the byte before is: the value is that region's end
     * (C keeps end pointers, zlib's next_in).  One past a pin is the pin's. */
    packed = pb__region_lookup(value - 1);
    if (packed && is_pinned(packed))
        return (flags & PB_SLOT_WALKABLE) != 0;
    if (pb__alloc_block_size(value))
        return 0;
    if (level2) {
        struct pb_iblock block;
        if (pb__interpose_find(value, &block) && !block.python)
            return 0;
    }
    return 1;
}

static int append_pair(PyObject **out, Py_ssize_t k, uintptr_t value)
{
    if (*out == NULL && (*out = PyList_New(0)) == NULL)
        return -1;
    PyObject *key = PyLong_FromSsize_t(k);
    PyObject *val = PyLong_FromUnsignedLongLong((unsigned long long)value);
    int rc = -1;
    if (key != NULL && val != NULL && PyList_Append(*out, key) == 0 && PyList_Append(*out, val) == 0)
        rc = 0;
    Py_XDECREF(key);
    Py_XDECREF(val);
    return rc;
}

static PyObject *m_scan_slots(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 4 || !PyBytes_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "scan_slots(address, plan: bytes, count, level2)");
        return NULL;
    }
    uintptr_t base = (uintptr_t)PyLong_AsUnsignedLongLong(args[0]);
    if (base == (uintptr_t)-1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t count = PyLong_AsSsize_t(args[2]);
    if (count == -1 && PyErr_Occurred())
        return NULL;
    int level2 = PyObject_IsTrue(args[3]);
    if (level2 < 0)
        return NULL;
    const char *plan = PyBytes_AS_STRING(args[1]);
    Py_ssize_t plan_len = PyBytes_GET_SIZE(args[1]);
    struct plan_head head;
    if (plan_len < (Py_ssize_t)sizeof head) {
        PyErr_SetString(PyExc_ValueError, "scan_slots: plan too short");
        return NULL;
    }
    memcpy(&head, plan, sizeof head);
    if ((size_t)plan_len < sizeof head + (size_t)head.nslots * sizeof(struct plan_slot)) {
        PyErr_SetString(PyExc_ValueError, "scan_slots: plan truncated");
        return NULL;
    }
    const char *slots = plan + sizeof head;
    PyObject *out = NULL;
    if (base == 0 || head.nslots == 0 || count <= 0)
        Py_RETURN_NONE;
    for (Py_ssize_t e = 0; e < count; e++) {
        uintptr_t element = base + (uintptr_t)e * head.size;
        for (uint32_t s = 0; s < head.nslots; s++) {
            struct plan_slot slot;
            memcpy(&slot, slots + (size_t)s * sizeof slot, sizeof slot);
            uintptr_t value;
            memcpy(&value, (const void *)(element + slot.offset), sizeof value);
            if (value == 0 || !needs_python(value, slot.flags, level2))
                continue;
            if (append_pair(&out, e * (Py_ssize_t)head.nslots + s, value) < 0) {
                Py_XDECREF(out);
                return NULL;
            }
        }
    }
    if (out == NULL)
        Py_RETURN_NONE;
    return out;
}

static PyMethodDef slot_functions[] = {
    {"scan_slots", (PyCFunction)(void (*)(void))m_scan_slots, METH_FASTCALL,
     "scan_slots(address, plan, count, level2) -> None or [k, value, ...]: the pointer slots\n"
     "of `count` objects laid out as `plan` that the checker must classify in Python"},
    {NULL, NULL, 0, NULL},
};

int pb__py_slots_init(PyObject *module)
{
    return pb__add_functions(module, slot_functions);
}
