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

#endif /* PB_SLOTS_H */
