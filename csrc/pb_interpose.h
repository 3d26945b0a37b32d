/*
 * pb_interpose.h - private interface of the malloc-family interposer
 * (interpose.c), used at check level 2.
 *
 * The interposer rewrites the GOT entries of malloc, calloc, realloc,
 * reallocarray, free, posix_memalign, aligned_alloc, memalign, valloc,
 * strdup and strndup in every loaded non-system shared object (no
 * LD_PRELOAD, no rebuild), so every block those libraries allocate is known
 * with its size and the return address of the allocating call.  It also
 * rewrites dlopen/dlclose in every object but libc and the loader, so
 * libraries loaded later are patched as they load and forgotten as they
 * unload.  The interposed blocks and the writable segments (.data/.bss) of
 * the non-system objects are scan roots (scan.c).
 *
 * System objects, never patched for the malloc family and whose globals
 * are not roots: the main executable (CPython), libpython, CPython's own
 * extension modules (lib-dynload), libc and its companions (libm, libpthread,
 * libdl, librt, libutil, libresolv, libgcc_s), the loader, the vDSO, libffi,
 * numpy's core (its array data is Python memory, seen by the heap map) and
 * ptrbridge's own module.  _cffi_backend is patched separately: its blocks
 * (ffi.new) are Python memory, recorded as such and never roots.
 */
#ifndef PB_INTERPOSE_H
#define PB_INTERPOSE_H

#include "ptrbridge.h"

/* PB_CDEF_BEGIN */

/* Classes of loaded objects (pb__interpose_object). */
enum pb_object_class {
    PB_OBJ_PATCHED = 0, /* malloc family interposed, globals scanned */
    PB_OBJ_SYSTEM = 1,  /* only dlopen/dlclose interposed */
    PB_OBJ_CFFI = 2,    /* _cffi_backend: blocks recorded as Python memory */
    PB_OBJ_SKIPPED = 3  /* never touched (libc, the loader, ptrbridge, vDSO) */
};

/* One interposed block (pb__interpose_blocks). */
struct pb_iblock {
    uintptr_t ptr;
    size_t size;
    uintptr_t caller; /* return address of the allocating call */
    int python;       /* 1: Python memory (_cffi_backend, ffi.new) */
};

struct pb_interpose_stats {
    uint64_t objects_patched;  /* objects whose malloc family is interposed */
    uint64_t slots_patched;    /* GOT entries rewritten (all kinds) */
    uint64_t live_blocks;      /* blocks in the table */
    uint64_t live_bytes;
    uint64_t python_blocks;    /* of which Python memory (_cffi_backend) */
    uint64_t allocations;      /* interposed allocations since enabled */
    uint64_t frees;            /* frees of blocks the table knew */
    uint64_t foreign_frees;    /* frees of blocks it never saw (straight to libc) */
    uint64_t rewalks;          /* times the loaded-object list was re-read */
    uint64_t held_blocks;      /* freed ffi.new blocks held back from libc (poisoned) */
    uint64_t held_bytes;       /* their bytes: at most PB_HEAPMAP_HOLD_BYTES */
    int enabled;
};

/* Patches every loaded object (see above) and starts recording.  Returns 0
 * (enabled), 1 (already enabled) or PB_ERR_NOMEM.  Thread-safe; takes no
 * GIL. */
int pb__interpose_enable(void);

/* Restores every GOT entry it rewrote (in objects still loaded) and forgets
 * the table.  The hook functions stay valid for ever (a pointer to one kept
 * by C keeps working, as plain libc).  Returns 0 or 1 (was not enabled). */
int pb__interpose_disable(void);

/* Re-reads the loaded objects if any was loaded or unloaded since the last
 * look (dl_iterate_phdr's adds/subs counters): patches new ones, forgets
 * unloaded ones.  Cheap when nothing changed.  Returns 1 if it re-read. */
int pb__interpose_refresh(void);

/* Copies up to cap blocks of the table into out[] and returns the number of
 * live blocks (may exceed cap).  Thread-safe. */
size_t pb__interpose_blocks(struct pb_iblock *out, size_t cap);

/* The live interposed block containing addr: fills *out and returns 1, or 0. */
int pb__interpose_find(uintptr_t addr, struct pb_iblock *out);

/* Whether the memory at addr belongs to C now, although Python may have
 * freed a block there: 1 if a live interposed C block contains it, 2 if an
 * interposed library freed a block containing it after every Python free
 * of it that the heap map's history holds (libc handed the memory to C
 * after Python gave it back, and C freed it in turn: a pointer into it is
 * C's own stale pointer), 0 otherwise - also when the history holds no
 * Python free of it, or C's free is too old to be remembered (the last
 * 131072 C frees are).  Takes the table's and the heap map's locks; linear
 * in the table and the C frees remembered: for findings, not hot paths. */
int pb__interpose_c_reused(uintptr_t addr);

/* 1 if an interposed library freed a block containing addr before the
 * newest Python free of it that the heap map's history holds: the memory
 * was C's before it was that Python block's, so a word pointing into it may
 * be C's own pointer left from then (a stale field, a free list), not one
 * into Python memory.  0 otherwise, or when nothing can be ordered (as
 * pb__interpose_c_reused; same locks and cost: for findings only). */
int pb__interpose_c_before(uintptr_t addr);

/* 1 if addr lies in the loader's own record of a loaded object: a live
 * link_map of the base namespace (what dlopen() returns and libraries such
 * as libsasl2 keep), taken as PB_LINK_MAP_SPAN bytes from its start - glibc's
 * internal struct link_map and the name copy allocated with it, ~1.2 KiB on
 * x86-64 - or its l_name string.  ld.so allocates these with libc malloc
 * outside the interposer, often where Python freed a block before: a pointer
 * to one is C memory, not freed Python memory.  Walks the list under the
 * loader's lock (inside dl_iterate_phdr); for findings, not hot paths. */
int pb__interpose_in_link_map(uintptr_t addr);

/* Loaded object number i (in dl_iterate_phdr order at the last refresh):
 * its path (static storage until the next refresh; "" for the executable)
 * and class.  Returns 0 past the end. */
int pb__interpose_object(size_t i, const char **path, int *klass, uintptr_t *base);

void pb__interpose_get_stats(struct pb_interpose_stats *out);

/* Moves up to cap Python blocks (_cffi_backend, i.e. ffi.new memory) freed
 * since the last take into starts[]/sizes[] (oldest first) and returns how
 * many; *dropped (may be NULL) gets how many were overwritten unseen (the
 * ring holds 65536).  Thread-safe. */
size_t pb__interpose_take_freed(uintptr_t *starts, size_t *sizes, size_t cap, uint64_t *dropped);
/* Whether `address` lies in a freed ffi.new block still held back (poisoned,
 * not yet given back to libc, so certainly not reused by anyone): 1 and the
 * block's start and size, or 0.  Thread-safe; linear in the hold (at most
 * 4096 blocks and PB_HEAPMAP_HOLD_BYTES bytes, the oldest given back first). */
int pb__interpose_find_held(uintptr_t address, uintptr_t *start, size_t *size);

/* The class the interposer gives an object path (see the list above). */
int pb__interpose_classify(const char *path);

/* PB_CDEF_END */

/* 1 while the malloc family is interposed (pb__interpose_enable), else 0.
 * Lock-free. */
int pb_interpose_enabled(void);

/* ---- C only: scan.c's view ---- */

/* Calls visit(base, size, path, ctx) for each writable PT_LOAD segment of
 * each loaded PB_OBJ_PATCHED object, under the interposer's object lock.
 * Does nothing when not enabled.  Returns the number of segments. */
size_t pb__interpose_foreach_segment(void (*visit)(uintptr_t base, size_t size, const char *path, void *ctx),
                                     void *ctx);

/* 1 if [base, base+size) lies inside a PT_LOAD segment of a loaded object. */
int pb__interpose_is_loaded(uintptr_t base, size_t size);

/* The PT_LOAD segments of every loaded object (the interposer need not be
 * enabled) as *n [start, end) ranges, ranges[2*i] and ranges[2*i+1], sorted
 * by start and merged where they overlap, in an array the caller frees; NULL
 * if out of memory.  Takes the loader's lock (dl_iterate_phdr): not with a
 * lock a library constructor could need. */
uintptr_t *pb__loaded_segments_alloc(size_t *n);

/* Whether [start, start+size) overlaps one of n ranges from pb__loaded_segments_alloc. */
int pb__segments_overlap(const uintptr_t *ranges, size_t n, uintptr_t start, size_t size);

#endif /* PB_INTERPOSE_H */
