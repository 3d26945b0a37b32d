/*
 * pb_heapmap.h - the Python heap map (check level 2): allocator hooks on the
 * raw, mem and object domains (PyMem_SetAllocator, as tracemalloc uses) that
 * delegate to the previous allocators and index every live block, so any
 * address can be classified as "inside a live Python block" and recently
 * freed blocks can be looked for by the retention scanner.
 */
#ifndef PB_HEAPMAP_H
#define PB_HEAPMAP_H

#include "ptrbridge.h"

/* PB_CDEF_BEGIN */

struct pb_heapmap_stats {
    uint64_t live_blocks;
    uint64_t live_bytes;
    uint64_t allocations; /* seen since the first install */
    uint64_t frees;
    uint64_t freed_pending; /* freed blocks not yet taken */
    int installed;
};

/* Installs the hooks (takes the GIL itself).  Returns 0, or -1 if they are
 * installed already. */
int pb__heapmap_install(void);

/* Removes the hooks and forgets the index (takes the GIL).  Returns 0, -1 if
 * not installed, or -2 if another allocator was installed on top of ours
 * (it must be removed first: uninstalling would cut it out of the chain). */
int pb__heapmap_uninstall(void);

/* The live block containing addr: 1 and *start, *size if found, else 0. */
int pb__heapmap_find(uintptr_t addr, uintptr_t *start, size_t *size);

/* Moves up to cap freed blocks (oldest first) into starts[]/sizes[] and
 * returns how many.  At most PB_HEAPMAP_FREED blocks are kept; older ones
 * are dropped (counted in *dropped). */
size_t pb__heapmap_take_freed(uintptr_t *starts, size_t *sizes, size_t cap, uint64_t *dropped);

void pb__heapmap_get_stats(struct pb_heapmap_stats *out);

/* numpy (NEP 49): wraps the current data-memory handler, got and set with
 * numpy's PyDataMem_GetHandler/PyDataMem_SetHandler (passed in as function
 * pointers from numpy's C-API table), so array data is indexed too.  Takes
 * the GIL.  Returns 0, 1 if already installed, or -1 on error (a Python
 * error is printed).  Uninstall restores the handler that was wrapped. */
int pb__heapmap_numpy_install(void *set_handler, void *get_handler);
int pb__heapmap_numpy_uninstall(void *set_handler);

/* Takes freed blocks (oldest first) and queues those not live again as
 * retention-scan targets with ids first_id, first_id + 1, ...; their starts
 * and sizes go to starts[]/sizes[].  Returns how many were queued (<= cap). */
size_t pb__heapmap_retire_freed(uint64_t first_id, uintptr_t *starts, size_t *sizes, size_t cap);

/* PB_CDEF_END */

#endif /* PB_HEAPMAP_H */
