/*
 * pb_heapmap.h - the Python heap map (check level 2).
 *
 * Allocator hooks on CPython's raw, mem and object domains (PyMem_SetAllocator,
 * the mechanism tracemalloc uses) and on numpy's default data-memory handler
 * (NEP 49) delegate every call to the allocator that was installed before
 * them (each hook keeps it in its ctx, so nested and repeated hooking is
 * safe) and index every live block allocated while they record, so that any
 * address can be classified as "inside a live Python block" (interior
 * pointers included).  Foreign Python-owned blocks (ffi.new memory, seen by
 * the interposer) are entered with pb_heapmap_record_block.  Freed blocks go
 * to a bounded history (for use-after-free lookups and the retention
 * scanner) and, optionally, to a per-domain hold that delays their reuse;
 * held blocks are poisoned (0xDD) and the whole pages inside them are
 * PROT_NONE, so they are scan *targets* only: no scanner may read them as
 * roots (a scan root that is a held block faults).
 *
 * The implementation is split by concept: heapmap_index.c, heapmap_freed.c,
 * heapmap_hooks.c, heapmap_numpy.c, with pb_heapmap_internal.h (private).
 *
 * Threading: every function here is thread-safe.  The raw domain is called
 * without the GIL, so the index has its own lock (a spinlock; critical
 * sections are a few hash-table operations).  The functions marked "takes
 * the GIL" call PyGILState_Ensure themselves (cffi releases the GIL around
 * calls), so they must not be called from a thread that holds the heap-map
 * lock or from inside an allocator.
 *
 * Memory: the index's own memory comes from libc calloc/free, never from the
 * hooked allocators.
 */
#ifndef PB_HEAPMAP_H
#define PB_HEAPMAP_H

#include "ptrbridge.h"

/* ---- C-only interface (for the retention scanner; not seen by cffi) ---- */

/* Finds the live Python block that contains `addr` (any byte of it, not only
 * its start).  Returns 1 and stores its first byte and size in *start and
 * *size (either may be NULL), or 0 when `addr` is in no block the heap map
 * knows (C memory, a Python block allocated before the hooks were installed,
 * or the heap map is not installed).  Lock-free fast reject (global bounds,
 * then a page bitmap) before the exact lookup under the lock.  Thread-safe,
 * no GIL needed, never allocates. */
int pb_heapmap_find(uintptr_t addr, uintptr_t *start, size_t *size);

/* Checks that the hooks are still in the allocator chain (tracemalloc.stop()
 * after tracemalloc was started before ptrbridge restores tracemalloc's saved
 * allocators, which cuts the heap map out and would leave it stale).  If the
 * heap map was cut out, its index is cleared and the hooks are installed
 * again on top.  Returns 0 (fine, or not installed) or 1 (repaired).  Takes
 * the GIL; call it once before a scan that relies on pb_heapmap_find. */
int pb_heapmap_verify(void);

/* The free clock: how many frees each path of the freed-block history had
 * recorded when it was read (gil, lock), and the history's epoch (bumped
 * whenever the history is forgotten; 0: the clock was read while that
 * happened and orders nothing).  Another allocator (the interposer) stamps
 * the frees it sees with it, so that they can be ordered against Python's:
 * a Python free whose serial is seq << 1 | path happened before a stamp
 * taken in the same epoch iff the stamp's count for that path is > seq. */
struct pb_heapmap_clock {
    uint64_t epoch;
    uint64_t gil;  /* frees recorded on the GIL path */
    uint64_t lock; /* frees recorded on the locked path */
};

/* Reads the free clock.  Lock-free (a few atomic loads), from any thread,
 * inside an allocator too. */
void pb_heapmap_clock(struct pb_heapmap_clock *out);

/* The clock a stamp must exceed to be later than every Python free in the
 * history whose block contained `addr`: *need gets, per path, the newest
 * such free's seq + 1 (0: none on that path), and the current epoch.
 * Returns how many such frees the history holds (0: none - nothing can be
 * ordered after them).  Takes the heap map's lock; no GIL. */
size_t pb_heapmap_freed_clock_at(uintptr_t addr, struct pb_heapmap_clock *need);

/* PB_CDEF_BEGIN */

/* Allocator domains of the blocks in the heap map. */
enum pb_heapmap_domain {
    PB_HEAPMAP_RAW = 0,   /* PyMem_RawMalloc (may be called without the GIL) */
    PB_HEAPMAP_MEM = 1,   /* PyMem_Malloc */
    PB_HEAPMAP_OBJ = 2,   /* PyObject_Malloc (objects) */
    PB_HEAPMAP_NUMPY = 3, /* numpy array data (NEP 49 default handler) */
    PB_HEAPMAP_CFFI = 4,  /* foreign Python-owned blocks entered with pb_heapmap_record_block
                             (memory _cffi_backend mallocs for ffi.new) */
    PB_HEAPMAP_DOMAIN_CFFI = 4 /* the same, under the name the interposer uses */
};

/* Foreign Python-owned blocks: memory that Python objects own but that does
 * not come from CPython's allocators or numpy's handler (the interposer in
 * interpose.c sees _cffi_backend's malloc/free for ffi.new and calls these).
 * A recorded block is like any other heap-map block: lookups find it, and
 * its free enters the freed-block history (and, through
 * pb_heapmap_release_block, the hold).
 *
 * All three are safe from any thread, with or without the GIL, never call
 * Python or a hooked allocator, never block on anything but the heap map's
 * own short spinlock, and are re-entrant-safe: a call made while the same
 * thread holds the heap map's lock (impossible today: the heap map's own
 * memory comes from libc and ptrbridge's module is never interposed) is
 * ignored instead of deadlocking.  They do nothing while the heap map is not
 * installed.  Ownership of the memory stays with the caller (except for a
 * block pb_heapmap_release_block holds back).  No error codes: a block that
 * cannot be indexed for lack of memory is counted in `untracked`. */

/* Enters [ptr, ptr + size) (size 0 counts as 1) as a live block of `domain`,
 * which must be PB_HEAPMAP_DOMAIN_CFFI (other domains are ignored: their
 * blocks are recorded by the hooks).  A block already recorded at ptr is
 * replaced (its free was not seen).  ptr == NULL is ignored. */
PB_API void pb_heapmap_record_block(void *ptr, size_t size, int domain);

/* Removes the foreign block that starts at ptr (its memory is about to be
 * freed by the caller) and appends it to the freed-block history.  Blocks
 * that were not entered with pb_heapmap_record_block (unknown addresses,
 * CPython's blocks) are left alone.  ptr == NULL is ignored. */
PB_API void pb_heapmap_forget_block(void *ptr);

/* pb_heapmap_forget_block, plus the hold: returns 1 if the heap map took the
 * block (it is held back and given to release(ptr) later: when
 * pushed out of the hold, by set_hold, or by uninstall - from whichever
 * thread does that, never with the heap map's lock held), or 0 if the caller
 * must free ptr now (not a recorded block, the hold is off or full, or a
 * different `release` than the first one seen for the domain).  release
 * must be callable from any thread without the GIL (libc free is). */
PB_API int pb_heapmap_release_block(void *ptr, void (*release)(void *ptr));

/* Result of a lookup: status 0 = not found, 1 = found (start, size, domain
 * are set), 2 = found but the allocator chain changed since it was last
 * checked: call pb__heapmap_verify() and look again. */
struct pb_heapmap_block {
    uintptr_t start;
    uint64_t size;
    int domain;
    int status;
    uint64_t serial; /* freed blocks: the free's order, seq << 1 | path (0 = GIL path, 1 = locked
                        path); exact order within a path, unique while the map is installed */
};

struct pb_heapmap_stats {
    uint64_t live_blocks;        /* blocks in the index */
    uint64_t live_bytes;
    uint64_t allocations;        /* blocks entered since the first install */
    uint64_t frees;              /* blocks removed (freed, or moved by realloc) */
    uint64_t lookups;            /* pb_heapmap_find / lookup calls */
    uint64_t untracked;          /* blocks not indexed for lack of memory */
    uint64_t freed_history;      /* freed blocks remembered (<= PB_HEAPMAP_FREED_HISTORY) */
    uint64_t freed_pending;      /* freed blocks not yet taken by the scanner */
    uint64_t freed_dropped;      /* freed blocks forgotten before the scanner took them */
    uint64_t held_blocks;        /* freed blocks held back from their allocator */
    uint64_t held_bytes;
    uint64_t index_bytes;        /* memory of the tables, rings and bitmap */
    uint64_t shadow_leaves;      /* GiB regions with a shadow map (128 MiB reserved, 1/8 of
                                    the memory Python uses in them touched) */
    int installed;               /* 1 while recording */
    int hooked;                  /* PyMem domains whose hook is in the chain (bit mask) */
    int numpy;                   /* 1 while numpy's default handler is hooked */
};

/* Capacity of the freed-block history, per path (the oldest entries are
 * dropped): the last 262144 frees of small mem/object blocks made with the
 * GIL, and as many of every other block.  Sized on this project's own
 * suite at level 2: 170 tests of the C-heavy files, median 1 839 frees per
 * test, 95th percentile 16 362, and only 3 stress tests (0.9 to 2.3 million
 * frees each) beyond this capacity (with 65536, 5 tests lost 86% of all
 * frees).  2 MiB + 4 MiB of memory, touched as it fills. */
#define PB_HEAPMAP_FREED_HISTORY 262144
/* Most freed blocks held back per domain (pb__heapmap_set_hold), and the
 * default hold: blocks and bytes per domain. */
#define PB_HEAPMAP_HOLD_MAX 8192
#define PB_HEAPMAP_HOLD_BLOCKS 8192
#define PB_HEAPMAP_HOLD_BYTES 4194304
#define PB_HEAPMAP_GIVEN_BACK 4611686018427387904 /* 1 << 62, a flag in retire_freed's sizes */

/* Installs the hooks and starts recording (takes the GIL).  numpy's handler
 * is hooked too if numpy is already imported.  Returns 0 (installed), 1
 * (already installed) or PB_ERR_NOMEM. */
int pb__heapmap_install(void);

/* Stops recording, releases quarantined blocks, clears the index and removes
 * the hooks (takes the GIL).  Returns 0 (removed), 1 (was not installed) or
 * 2 (recording stopped, but another hook - e.g. tracemalloc - was installed
 * on top of ours, so ours stay in the chain passing every call through
 * until they can be removed: removing them would cut the other one out;
 * a later uninstall, or install, takes them out or reuses them). */
int pb__heapmap_uninstall(void);

/* pb_heapmap_verify for Python (takes the GIL).  0 or 1 (repaired). */
int pb__heapmap_verify(void);

/* Hooks numpy's default data-memory handler if numpy's core is imported
 * (takes the GIL).  Returns 1 (hooked now or already), 0 (numpy is not
 * imported, or the heap map is not installed) or -1 (numpy older than 1.22:
 * no NEP 49 handlers). */
int pb__heapmap_numpy_attach(void);

/* The live block containing addr (see struct pb_heapmap_block).  No GIL. */
struct pb_heapmap_block pb__heapmap_lookup(uintptr_t addr);

/* The most recently freed block (among the last PB_HEAPMAP_FREED_HISTORY
 * frees of each path) that contained addr, with its serial; status 0 if
 * none, or if addr is inside a live block now (its memory was reused).
 * No GIL. */
struct pb_heapmap_block pb__heapmap_find_freed(uintptr_t addr);

/* 1 if addr is inside a freed block over 512 bytes that the hold still keeps
 * back from its allocator (so nothing can have reused it), else 0.  A walk of
 * the held blocks: for reports only.  No GIL. */
int pb__heapmap_held_large(uintptr_t addr);

/* Moves up to cap freed blocks not yet taken (oldest first) into
 * starts[]/sizes[] and returns how many.  *dropped (may be NULL) receives
 * how many were dropped from the history before being taken, in total. */
size_t pb__heapmap_take_freed(uintptr_t *starts, size_t *sizes, size_t cap, uint64_t *dropped);

/* Takes freed blocks and queues those not live again as retention-scan
 * targets with ids first_id, first_id + 1, ...; their starts and sizes go to
 * starts[]/sizes[], each size with PB_HEAPMAP_GIVEN_BACK added when the block
 * came from libc's malloc (raw, numpy, mem/obj above pymalloc's limit) and the
 * hold has given it back: libc may have handed that memory to C code no hook
 * sees (a constructor run by dlopen, libc's own fopen or getaddrinfo), so a C
 * pointer into it says nothing unless a checked call lent it.  Returns how
 * many were queued (<= cap).  When more than
 * cap are pending, the newest cap are taken (an end-of-test scan wants the
 * test's own frees) and the older ones count as dropped: pass a cap of
 * 2 * PB_HEAPMAP_FREED_HISTORY to take everything the history holds. */
size_t pb__heapmap_retire_freed(uint64_t first_id, uintptr_t *starts, size_t *sizes, size_t cap);

/* Sets the hold of freed blocks (a quarantine, as memory sanitizers call
 * it): up to max_blocks (<= PB_HEAPMAP_HOLD_MAX) freed blocks and max_bytes
 * bytes per domain are held back from their allocator, oldest released
 * first, so their memory is not reused before the retention scanner has
 * looked for pointers into them.  0 turns it off.  Blocks held beyond the
 * new limits are given back at once.  Takes the GIL.  Returns PB_OK or
 * PB_ERR_INVALID. */
int pb__heapmap_set_hold(size_t max_blocks, size_t max_bytes);

/* Whether held blocks are poisoned (filled with 0xDD, the whole pages inside
 * blocks of a page or more made PROT_NONE until they are given back), so
 * that a use after free misbehaves visibly instead of reading the old bytes.
 * On by default; applies to blocks held from now on.  Returns the previous
 * setting.  Thread-safe. */
int pb__heapmap_set_poison(int on);

/* Like pb__heapmap_take_freed, with each block's domain and serial (status 1). */
size_t pb__heapmap_take_freed_blocks(struct pb_heapmap_block *out, size_t cap, uint64_t *dropped);

/* A snapshot of the counters (takes the GIL, then the heap map's lock). */
void pb__heapmap_get_stats(struct pb_heapmap_stats *out);

/* 1 while the hooks record, else 0.  Cheap. */
int pb__heapmap_installed(void);

/* The free clock (see pb_heapmap_clock) into clocks[3 * slot ..]: epoch,
 * gil, lock.  One call for a table of stamps kept in C memory
 * (ptrbridge.scanning's lend records).  Lock-free; any thread. */
void pb__heapmap_clock_store(uint64_t *clocks, size_t slot);

/* How many frees of blocks containing addr the history holds since the
 * clock since[3] (as pb__heapmap_clock_store writes it) was read, or -1 if
 * that is not known: the history was forgotten since (another epoch), or
 * has already dropped frees made after it.  For use-after-free reports: a
 * record made while an object was alive names a freed block only if
 * exactly one free of its address came after it.  Linear in the history
 * newer than since; takes the heap map's lock; no GIL. */
long long pb__heapmap_frees_since(uintptr_t addr, const uint64_t since[3]);

/* PB_CDEF_END */

#endif /* PB_HEAPMAP_H */
