/*
 * pb_scan.h - private interface of the retained-pointer scanner (scan.c).
 *
 * Targets are Python-owned regions C no longer has the right to hold: lent
 * to a call that has returned, unpinned, or freed.  Python retires them into
 * the scanner's queue; pb__scan_run() looks for words in the roots (live
 * blocks of the tracked allocator, registered roots, watched libraries'
 * writable segments) that point into a queued target, reports them, and
 * empties the queue.
 */
#ifndef PB_SCAN_H
#define PB_SCAN_H

#include "ptrbridge.h"

/* PB_CDEF_BEGIN */

/* Where a retained pointer was found. */
enum pb_root_kind {
    PB_ROOT_ALLOCATION = 1, /* a live block of the tracked allocator */
    PB_ROOT_REGISTERED = 2, /* a region added with pb_root_add / ptrbridge.add_root */
    PB_ROOT_LIBRARY = 3,    /* the writable data (.data/.bss) of a library (watched,
                               or any non-system one at level 2: root_id 0) */
    PB_ROOT_INTERPOSED = 4  /* a block an unmodified library got from malloc & co
                               (root_id: return address of the allocating call) */
};

/* Why a root was skipped by a scan (pb__scan_stale). */
enum pb_stale_reason {
    PB_STALE_UNREADABLE = 1, /* (partly) unmapped or unreadable: skipped where so */
    PB_STALE_UNLOADED = 2    /* a watched library's segment after dlclose: skipped */
};

struct pb_stale_root {
    int root_kind;
    int reason;      /* enum pb_stale_reason */
    uint64_t root_id;
    uintptr_t base;
    size_t size;
    size_t readable; /* bytes that could be read */
};

struct pb_finding {
    uint64_t target_id;  /* the id given to pb__scan_retire */
    int root_kind;       /* enum pb_root_kind */
    uint64_t root_id;    /* root or library id (0 for allocations) */
    uintptr_t root_base; /* first byte of the root (block, region or segment) */
    size_t root_size;
    size_t offset;       /* offset of the word inside the root */
    uintptr_t value;     /* the pointer C holds */
};

/* Queues [start, start+size) as a target with the caller's id.  Returns
 * PB_OK or PB_ERR_NOMEM.  Thread-safe. */
int pb__scan_retire(uintptr_t start, size_t size, uint64_t id);

/* Queues n targets at once: [starts[i], starts[i]+sizes[i]) with id
 * first_id + i, in order (as n pb__scan_retire calls, under one lock).  All
 * or none: returns PB_OK or PB_ERR_NOMEM (nothing queued).  Thread-safe. */
int pb__scan_retire_many(const uintptr_t *starts, const size_t *sizes, uint64_t first_id, size_t n);

/* pb__heapmap_clock_store(clocks, slots[i]) for each i: the free clock of now
 * into the lend records of a batch (ptrbridge.scanning.retire_many). */
void pb__scan_clocks_store(uint64_t *clocks, const size_t *slots, size_t n);

/* Drops queued targets overlapping [start, start+size) (the memory is
 * legitimately lent or pinned again).  Returns how many were dropped. */
size_t pb__scan_cancel(uintptr_t start, size_t size);

/* Number of queued targets. */
size_t pb__scan_pending(void);

/* Scans every root for pointers into the queued targets, stores up to `cap`
 * findings in out[] and returns the total number found (may exceed cap).
 * With `keep` nonzero the queue is kept, otherwise it is emptied.  *bytes
 * receives the number of root bytes scanned.  Thread-safe. */
size_t pb__scan_run(struct pb_finding *out, size_t cap, int keep, uint64_t *bytes);

/* Registers the writable PT_LOAD segments of every loaded object whose path
 * contains `name` as library roots under `id`.  Returns the number of
 * segments found (0: no such library loaded) or a negative PB_ERR_*. */
int pb__scan_watch_library(const char *name, uint64_t id);

/* Removes the library roots registered under `id`. */
void pb__scan_unwatch_library(uint64_t id);

/* Path (static storage) of the loaded object containing `addr`, and the
 * nearest symbol name before it, via dladdr.  Returns 1 if found. */
int pb__scan_describe_address(uintptr_t addr, const char **object, const char **symbol,
                              uintptr_t *symbol_addr);

/* Load base (dlpi_addr) of the loaded object with a PT_LOAD segment
 * containing addr, or 0. */
uintptr_t pb__scan_object_base(uintptr_t addr);

/* Benchmark/test entry: scans [base, base+size) as one root against the
 * queued targets without emptying the queue; returns the number of hits.
 * The memory must be readable. */
size_t pb__scan_buffer(const void *base, size_t size);

/* The same through the fault-proof reader: [base, base+size) may be (partly)
 * unmapped.  Benchmark/test entry. */
size_t pb__scan_buffer_safe(const void *base, size_t size);

/* Scans only the interposed roots (blocks and non-system globals) against
 * the queued targets, keeping the queue; *bytes gets the bytes read.
 * Benchmark entry. */
size_t pb__scan_interposed_only(uint64_t *bytes);

/* 1 if every byte of [addr, addr+size) can be read now, else 0 (never
 * faults).  Used to validate pb_root_add / ptrbridge.add_root. */
int pb__scan_readable(uintptr_t addr, size_t size);

/* Roots the last scan found unreadable or unloaded: copies up to cap of them
 * (at most 256 are kept) and returns how many there were; *stale_blocks
 * (may be NULL) gets the number of interposed blocks that could not be read
 * (freed by code that is not interposed and unmapped since). */
size_t pb__scan_stale(struct pb_stale_root *out, size_t cap, uint64_t *stale_blocks);

/* PB_CDEF_END */

#endif /* PB_SCAN_H */
