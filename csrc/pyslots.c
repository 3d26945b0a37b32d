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

static int needs_python(uintptr_t value, uint32_t flags, int level2)
{
    uint64_t packed = pb__region_lookup(value);
    if (packed)
        return is_pinned(packed) && !(flags & PB_SLOT_WALKABLE) ? SETTLED : NEEDS_REGION;
    /* Not in a region but the byte before is: the value is that region's end
     * (C keeps end pointers, zlib's next_in).  One past a pin is the pin's. */
    packed = pb__region_lookup(value - 1);
    if (packed && is_pinned(packed))
        return (flags & PB_SLOT_WALKABLE) ? NEEDS_REGION : SETTLED;
    if (packed)
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

static PyObject *m_scan_slots(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 4 || !PyBytes_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "scan_slots(address, plan: bytes, count, level2)");
        return NULL;
    }
    uintptr_t base;
    if (address_arg(args[0], &base) < 0)
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
            int need = value == 0 ? SETTLED : needs_python(value, slot.flags, level2);
            if (need == SETTLED)
                continue;
            if (append_hit(&out, e * (Py_ssize_t)head.nslots + s, value, need) < 0) {
                Py_XDECREF(out);
                return NULL;
            }
        }
    }
    if (out == NULL)
        Py_RETURN_NONE;
    return out;
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
