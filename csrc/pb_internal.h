/*
 * pb_internal.h - private functions shared by csrc/ C files and the Python
 * bindings.  Not part of the public C API: names start with `pb__` and may
 * change between releases.
 *
 * The lines between PB_CDEF_BEGIN and PB_CDEF_END are read by cffi
 * (build_ffi.py) and become callable from ptrbridge._bindings.
 */
#ifndef PB_INTERNAL_H
#define PB_INTERNAL_H

#include "ptrbridge.h"

/* PB_CDEF_BEGIN */

/* Like pb_free, but writes nothing to stderr: for callers (Python) that turn
 * the status into an exception themselves. */
int pb__free_quiet(void *ptr);

/* Like pb_realloc, but writes nothing to stderr; *status receives the reason
 * when NULL is returned for a nonzero size. */
void *pb__realloc_quiet(void *ptr, size_t size, int *status);

/* pb_alloc_size taking an integer address (no pointer cast from Python). */
size_t pb__alloc_block_size(uintptr_t addr);

/* Marks a live block as handed to C (on=1) or taken back (on=0).  The
 * `transferred` counter follows; pb_free of a transferred block decrements
 * it.  Returns PB_OK or PB_ERR_NOT_OWNED. */
int pb__alloc_set_transferred(void *ptr, int on);

/* Plain calloc/free, not counted by the tracked allocator: backing store for
 * Python-owned memory that ptrbridge manages itself (ptrbridge.new), so that
 * freed blocks can be held in quarantine before they are really freed. */
void *pb__untracked_calloc(size_t size);
void pb__untracked_free(void *ptr);

/* pb_region_find without an out-parameter, for Python's hot path: returns
 * (id << 2) | kind of the region containing addr (a pinned one preferred),
 * or 0 if none. */
uint64_t pb__region_lookup(uintptr_t addr);

/* Allocates a handle slot and returns its token, or 0 when out of memory.
 * Called from Python only (the object lives in a Python dict). */
uintptr_t pb__handle_new(void);

/* The slot index a token names (whatever its generation), or SIZE_MAX for a
 * token that cannot be one of ours. */
size_t pb__handle_slot(uintptr_t token);

/* Deletes a handle from Python: like pb_handle_release but the token is not
 * queued for the Python side (the caller drops the object itself). */
int pb__handle_delete(uintptr_t token);

/* Moves up to `cap` tokens released by C into out[] and returns how many. */
size_t pb__handle_take_released(uintptr_t *out, size_t cap);

/* Address of the count of released tokens not yet taken.  Python reads it
 * (a plain load) to skip pb__handle_take_released when nothing is pending. */
size_t *pb__handle_pending_counter(void);

/* Current live handle count and the highest it has been. */
void pb__handle_get_counts(uint64_t *live, uint64_t *high_water);

/* Creates the buffer exporter type and stores it as
 * ptrbridge._native.BufferBase.  Takes the GIL itself.  Returns 0 or -1. */
int pb__py_init(void);

/* PB_CDEF_END */

/* ---- C-only helpers (not visible to Python) ---- */

/* Writes "ptrbridge: <message>\n" to stderr with one write(2). */
void pb__report(const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 1, 2)))
#endif
    ;

#endif /* PB_INTERNAL_H */
