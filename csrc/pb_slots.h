/*
 * pb_slots.h - the checker's C helpers (pyslots.c, pyframes.c).  Not read by
 * cffi (no PB_CDEF block): these take PyObject and need the GIL.
 */
#ifndef PB_SLOTS_H
#define PB_SLOTS_H

#include "pb_py.h"

/* A walk plan, as checking.Layout packs it (native byte order):
 * uint32 element size, uint32 slot count, then per slot uint32 offset and
 * uint32 flags. */
#define PB_SLOT_WALKABLE 1u /* the slot's pointee type has pointer slots of its own */

int pb__py_slots_init(PyObject *module); /* pyslots.c, called by pb__py_frames_init */

/* scan_slots' question without the list: 1 when every pointer slot of the
 * `count` objects at `where` (a pointer or array cdata, or an int) laid out
 * as `plan` is settled in C (scan_slots would return None), 0 when one needs
 * the Python checker, -1 with an exception set (a bad plan or address). */
int pb__slots_settled(PyObject *where, PyObject *plan, Py_ssize_t count, int level2);
int pb__slots_settled_at(uintptr_t base, PyObject *plan, Py_ssize_t count, int level2); /* at an address */

/* The address a pointer or array cdata holds (cffi's C API): 0, or -1 with an exception set. */
int pb__cdata_address(PyObject *cdata, uintptr_t *out);

#endif /* PB_SLOTS_H */
