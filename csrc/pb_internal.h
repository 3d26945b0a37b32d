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

/* Frees a block that backs a live Python CBuffer (made by pb__alloc_owned).
 * Returns PB_OK, or PB_ERR_NOT_OWNED if `ptr` is not such a block (nothing is
 * freed).  Called by the CBuffer itself only. */
int pb__free_owned(void *ptr);

/* Allocates a block owned by a Python CBuffer (zeroed if `zero`), recorded
 * with creation-site id `site`.  pb_free refuses it (PB_ERR_PY_OWNED) until
 * pb__alloc_set_transferred(ptr, 1).  NULL if out of memory. */
void *pb__alloc_owned(size_t size, int zero, uint32_t site);

/* Who owns the live block starting at addr: 0 none (not a live block), 1 a
 * Python CBuffer, 2 C (pb_malloc), 3 C after a transfer. */
int pb__alloc_owner(uintptr_t addr);

/* Copies up to `cap` transferred blocks (address, size, creation site) into
 * the arrays and returns how many there are in all. */
size_t pb__alloc_transferred(uintptr_t *addr, size_t *size, uint32_t *site, size_t cap);

/* Like pb_realloc, but writes nothing to stderr; *status receives the reason
 * when NULL is returned for a nonzero size. */
void *pb__realloc_quiet(void *ptr, size_t size, int *status);

/* pb_alloc_size taking an integer address (no pointer cast from Python). */
size_t pb__alloc_block_size(uintptr_t addr);

/* Marks a live block as handed to C (on=1: no longer Python-owned) or taken
 * back (on=0: Python-owned again).  The `transferred` counter follows; pb_free
 * of a transferred block decrements it.  Returns PB_OK or PB_ERR_NOT_OWNED. */
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

/* pb__region_lookup of each of n addresses (at[i]), and in before[i], when
 * no region holds a[i], the region holding a[i] - 1 (an end pointer's): one
 * lock for all. */
void pb__region_lookup_edges(const uintptr_t *a, size_t n, uint64_t *at, uint64_t *before);

/* Records n regions of one kind with one lock acquisition; ids[i] receives
 * each id.  Returns PB_OK, PB_ERR_INVALID or PB_ERR_NOMEM (nothing added). */
int pb__region_add_many(const uintptr_t *addr, const size_t *size, size_t n, int kind, uint64_t *ids);

/* Forgets n regions (unknown ids are ignored), newest first. */
void pb__region_remove_many(const uint64_t *ids, size_t n);

/* Removes region `id` and answers whether a pinned region contains addr
 * (1) or not (0), under one lock: the end of a lend. */
int pb__region_remove_then_pinned(uint64_t id, uintptr_t addr);

/* lends.c: a level-2 call lends [start, start + size) to C: drops the scan
 * targets the range had (lent again) and adds a PB_REGION_LENT region.
 * Returns its id, or 0 when out of memory. */
uint64_t pb__lend_add(uintptr_t start, size_t size);

/* The call returned: removes the region and, unless a pinned region covers
 * start, queues the range for the next scan as target_id.  Returns 1 if
 * queued, 0 if pinned, or a negative PB_ERR_* code. */
int pb__lend_return(uint64_t region, uintptr_t start, size_t size, uint64_t target_id);

/* Allocates a handle slot and returns its token, or 0 when out of memory.
 * Called from Python only (the object lives in a Python dict). */
uintptr_t pb__handle_new(void);

/* The slot index a token names (whatever its generation), or SIZE_MAX for a
 * token that cannot be one of ours. */
size_t pb__handle_slot(uintptr_t token);

/* Deletes a handle from Python: like pb_handle_release but the token is not
 * queued for the Python side (the caller drops the object itself). */
int pb__handle_delete(uintptr_t token);

/* Moves up to `cap` tokens released by C into out[] and returns how many.
 * Their slots stay reserved until pb__handle_recycle: Python drops the
 * objects first (which may create handles) and then recycles the slots. */
size_t pb__handle_take_released(uintptr_t *out, size_t cap);

/* Makes the slots of tokens taken by pb__handle_take_released free again. */
void pb__handle_recycle(const uintptr_t *tokens, size_t n);

/* Count of released tokens not yet taken (an atomic load; no lock). */
size_t pb__handle_pending(void);

/* Test hook: sets the highest generation a slot may reach before it is
 * retired (1..2^32-1 on 64-bit) and returns the previous limit; with
 * limit 0 changes nothing and returns the number of retired slots. */
uint64_t pb__handle_test_gen_limit(uint64_t limit);

/* Current live handle count and the highest it has been. */
void pb__handle_get_counts(uint64_t *live, uint64_t *high_water);

/* A cffi `char *` for an address (the cffi wrapper makes the cdata). */
char *pb__charp(uintptr_t addr);

/* Creates the buffer exporter type and stores it as
 * ptrbridge._native.BufferBase.  Takes the GIL itself.  Returns 0 or -1. */
int pb__py_init(void);

/* PB_CDEF_END */

/* ---- C-only helpers (not visible to Python) ---- */

/* Creation sites (pysite.c): the first Python frame outside ptrbridge as
 * (code object, instruction offset), interned as a small nonzero id; the
 * text "file.py:12" is only made when a report needs it.  GIL held. */
uint32_t pb__site_capture(void);

/* The frame line of a site a quarantined lend captured (pysite.c),
 * "/path/file.py:12 in name\n", with the length of its "/path/file.py:12"
 * part in *where_len; NULL if it has none.  Async-signal-safe: the fault
 * handler prints it. */
const char *pb__site_line(uint32_t site, size_t *where_len);

/* Writes "ptrbridge: <message>\n" to stderr with one write(2). */
void pb__report(const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 1, 2)))
#endif
    ;

/* Fork safety for a file's one mutex: PB_FORK_SAFE_LOCK(lock) at file scope
 * defines pthread_atfork handlers that hold `lock` across fork() and give the
 * child a fresh one (the thread that held it does not exist there), and
 * registers them when the library loads.  The file must include <pthread.h>. */
#define PB_FORK_SAFE_LOCK(lock)                                                            \
    static void pb__fork_prepare_##lock(void) { pthread_mutex_lock(&lock); }               \
    static void pb__fork_parent_##lock(void) { pthread_mutex_unlock(&lock); }              \
    static void pb__fork_child_##lock(void) { pthread_mutex_init(&lock, NULL); }           \
    __attribute__((constructor)) static void pb__fork_register_##lock(void)                \
    {                                                                                      \
        pthread_atfork(pb__fork_prepare_##lock, pb__fork_parent_##lock, pb__fork_child_##lock); \
    }                                                                                      \
    typedef int pb__fork_safe_##lock##_defined /* swallow the caller's semicolon */

#endif /* PB_INTERNAL_H */
