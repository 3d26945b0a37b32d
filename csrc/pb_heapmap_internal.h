/*
 * pb_heapmap_internal.h - private to the heap map's files (heapmap_*.c).
 *
 * The heap map is split by concept:
 *   heapmap_index.c  - the block index: lock, shadow map, tables, page bitmap,
 *                      recording and forgetting blocks, lookups of live blocks;
 *   heapmap_freed.c  - freed blocks: the history rings and their lazy index,
 *                      the hold (poisoned, partly protected), the scanner's
 *                      view, foreign blocks (pb_heapmap_record_block);
 *   heapmap_hooks.c  - the PyMem hooks (one instance per hooking, the
 *                      allocator it wraps in its ctx), install, uninstall,
 *                      verify, fork handlers, counters;
 *   heapmap_numpy.c  - numpy's NEP 49 default handler.
 *
 * What the hot path (a hooked malloc/free of a small mem/obj block, GIL
 * held) needs is here, inline: the shadow map's cells, the GIL path's record
 * and forget, the GIL ring append and the hold's steady-state swap.
 * Everything declared here has hidden visibility (not exported from the
 * module).
 *
 * Which lock guards what:
 *   the spinlock (hm_lock)   - the tables, the bitmap, the locked ring, the
 *                              lazy freed index, the scanner's cursors,
 *                              lock_counters, lock_held[], hm_freed_dropped;
 *   the GIL                  - gil_counters (single writer), the GIL ring
 *                              (single writer, readers validate), gil_held[],
 *                              the hook instances' creation, install state;
 *   atomics                  - everything else (recording, bounds, cells, the
 *                              hold's limits, probe state).
 * Counters are atomics written by their single writer with a plain
 * load+store, so a reader under any lock (or none) sees whole values.
 */
#ifndef PB_HEAPMAP_INTERNAL_H
#define PB_HEAPMAP_INTERNAL_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "pb_heapmap.h"
#include "pb_heapmap_clock.h"

#if defined(__GNUC__)
#define LIKELY(x) __builtin_expect(!!(x), 1)
#define UNLIKELY(x) __builtin_expect(!!(x), 0)
#define HOT inline __attribute__((always_inline))
#define COLD __attribute__((noinline))
#else
#define LIKELY(x) (x)
#define UNLIKELY(x) (x)
#define HOT inline
#define COLD
#endif

#if PB_HEAPMAP_FREED_HISTORY & (PB_HEAPMAP_FREED_HISTORY - 1)
#error "PB_HEAPMAP_FREED_HISTORY must be a power of two"
#endif

#define SMALL_MAX 512u             /* largest block kept in the shadow map */
#define GRANULE_SHIFT 4            /* 16-byte granules */
#define GRANULE ((uintptr_t)1 << GRANULE_SHIFT)
#define CELL_LARGE 0xFFFFu         /* cell of a block kept in the table */
#define CELL_SIZE_MASK 0x3FFu      /* cell: size (1..512) | domain << 10 */
#define CELL_DOMAIN_SHIFT 10
#define SHADOW_ADDR_BITS 48        /* addresses above are kept in the table */
#define SHADOW_LEAF_SHIFT 30       /* one leaf per GiB of address space */
#define SHADOW_TOP ((size_t)1 << (SHADOW_ADDR_BITS - SHADOW_LEAF_SHIFT))
#define SHADOW_CELLS ((size_t)1 << (SHADOW_LEAF_SHIFT - GRANULE_SHIFT))
#define SHADOW_LEAF_BYTES (SHADOW_CELLS * sizeof(uint16_t))
#define CHUNK_SHIFT 16             /* 64 KiB chunks in the chunk multimap */
#define PAGE_SHIFT 12              /* bitmap granularity */
#define BITMAP_LEAF_PAGES_SHIFT 20 /* pages per bitmap leaf (4 GiB of address space) */
#define BITMAP_TOP ((size_t)1 << (SHADOW_ADDR_BITS - PAGE_SHIFT - BITMAP_LEAF_PAGES_SHIFT))
#define BITMAP_LEAF_WORDS (((size_t)1 << BITMAP_LEAF_PAGES_SHIFT) / 64)
#define MIN_BITS 10                /* smallest hash table: 1024 slots */
#define RING_MASK ((uint64_t)PB_HEAPMAP_FREED_HISTORY - 1)
#define DOMAINS 5                  /* raw, mem, obj, numpy, cffi */
#define PYMEM_DOMAINS 3
#define SIZE_SHIFT 61              /* table values: size | domain << 61 */
#define SIZE_MASK (((uint64_t)1 << SIZE_SHIFT) - 1)
#define HOLD_MASK (PB_HEAPMAP_HOLD_MAX - 1)
#define EVICT_MAX 4
#define POISON_BYTE 0xDD           /* what freed, held memory reads as (PYTHONMALLOC=debug's) */
#define REALLOC_COPY_MAX 4096      /* a realloc of a block up to this size is a malloc + copy + hold */

#if PB_HEAPMAP_HOLD_MAX & HOLD_MASK
#error "PB_HEAPMAP_HOLD_MAX must be a power of two"
#endif

/* The lock-free path needs the GIL to serialise the mem and obj domains. */
#if defined(Py_GIL_DISABLED) || UINTPTR_MAX <= 0xFFFFFFFFu
#define GIL_PATH 0
#else
#define GIL_PATH 1
#endif

#pragma GCC visibility push(hidden)

typedef _Atomic uint64_t counter_t;
typedef _Atomic uint16_t cell_t;

/* ---- lock (heapmap_index.c) ------------------------------------------------ */

extern atomic_int hm_spin;
extern atomic_uintptr_t hm_spin_owner; /* pthread_self() of the holder, 0 when free */
void hm_lock_slow(void);

static inline void hm_lock(void)
{
    if (UNLIKELY(atomic_exchange_explicit(&hm_spin, 1, memory_order_acquire)))
        hm_lock_slow();
    atomic_store_explicit(&hm_spin_owner, (uintptr_t)pthread_self(), memory_order_relaxed);
}

static inline void hm_unlock(void)
{
    atomic_store_explicit(&hm_spin_owner, 0, memory_order_relaxed);
    atomic_store_explicit(&hm_spin, 0, memory_order_release);
}

/* 1 if this thread holds the lock (a re-entrant call must not take it). */
static inline int hm_lock_held_here(void)
{
    return atomic_load_explicit(&hm_spin_owner, memory_order_relaxed) == (uintptr_t)pthread_self();
}

/* ---- counters ---------------------------------------------------------------- */

/* Counters written by one writer at a time (the GIL or the lock) and read by
 * anyone: a plain load and store, no read-modify-write. */
static inline void bump(counter_t *c, uint64_t delta)
{
    atomic_store_explicit(c, atomic_load_explicit(c, memory_order_relaxed) + delta, memory_order_relaxed);
}

static inline uint64_t get(counter_t *c)
{
    return atomic_load_explicit(c, memory_order_relaxed);
}

struct counters {
    counter_t live_blocks, live_bytes, allocations, frees, untracked;
};

extern struct counters hm_gil_counters;  /* written under the GIL (the lock-free path) */
extern struct counters hm_lock_counters; /* written under the lock */
extern counter_t hm_lookups;
extern atomic_int hm_recording;          /* stable while the GIL is held; re-checked under the lock */

static inline int recording(void)
{
    return atomic_load_explicit(&hm_recording, memory_order_relaxed);
}

/* ---- bounds -------------------------------------------------------------------- */

struct bounds {
    atomic_uintptr_t lo, hi; /* [lo, hi) covers every recorded block (may be wider) */
};

extern struct bounds hm_shadow_bounds, hm_table_bounds;

static inline void bounds_extend(struct bounds *b, uintptr_t start, uintptr_t end)
{
    uintptr_t v = atomic_load_explicit(&b->lo, memory_order_relaxed);
    while (start < v && !atomic_compare_exchange_weak_explicit(&b->lo, &v, start, memory_order_relaxed,
                                                               memory_order_relaxed))
        ;
    v = atomic_load_explicit(&b->hi, memory_order_relaxed);
    while (end > v && !atomic_compare_exchange_weak_explicit(&b->hi, &v, end, memory_order_relaxed,
                                                             memory_order_relaxed))
        ;
}

static inline int bounds_contain(struct bounds *b, uintptr_t addr)
{
    return addr >= atomic_load_explicit(&b->lo, memory_order_relaxed) &&
           addr < atomic_load_explicit(&b->hi, memory_order_relaxed);
}

/* ---- shadow map ------------------------------------------------------------------ */

extern _Atomic(cell_t *) hm_shadow_top[SHADOW_TOP];
extern counter_t hm_shadow_leaves;
extern atomic_int hm_shadow_failed; /* a leaf could not be mapped: its blocks went to the table */
cell_t *hm_shadow_new_leaf(_Atomic(cell_t *) *slot);

/* The cell of the granule at addr, or NULL (no leaf, and create is 0 or
 * mapping failed; or addr is beyond the shadowed range). */
static HOT cell_t *shadow_cell(uintptr_t addr, int create)
{
    if (UNLIKELY((addr >> SHADOW_ADDR_BITS) != 0))
        return NULL;
    _Atomic(cell_t *) *slot = &hm_shadow_top[addr >> SHADOW_LEAF_SHIFT];
    cell_t *leaf = atomic_load_explicit(slot, memory_order_acquire);
    if (UNLIKELY(leaf == NULL)) {
        if (!create)
            return NULL;
        leaf = hm_shadow_new_leaf(slot);
        if (leaf == NULL)
            return NULL;
    }
    return &leaf[(addr >> GRANULE_SHIFT) & (SHADOW_CELLS - 1)];
}

static inline uint16_t cell_load(cell_t *c) { return atomic_load_explicit(c, memory_order_relaxed); }
static inline void cell_store(cell_t *c, uint16_t v) { atomic_store_explicit(c, v, memory_order_relaxed); }

static inline uint16_t cell_value(size_t size, int domain)
{
    return (uint16_t)((size ? size : 1) | ((size_t)domain << CELL_DOMAIN_SHIFT));
}

static inline size_t cell_size(uint16_t v) { return v & CELL_SIZE_MASK; }
static inline int cell_domain(uint16_t v) { return v >> CELL_DOMAIN_SHIFT; }
static inline int is_gil_domain(int domain) { return domain == PB_HEAPMAP_MEM || domain == PB_HEAPMAP_OBJ; }
static inline int is_foreign_domain(int domain) { return domain == PB_HEAPMAP_CFFI; }

/* ---- the GIL path's eligibility ---------------------------------------------------- */

#if PY_VERSION_HEX >= 0x030C0000
extern PyInterpreterState *hm_main_interp;
#endif

/* May this mem/obj call take the lock-free path?  It needs the one GIL:
 * blocks of subinterpreters with their own GIL (3.12+) are not recorded. */
static inline int on_gil_path(void)
{
#if !GIL_PATH
    return 0;
#elif PY_VERSION_HEX >= 0x030D0000
    PyThreadState *ts = PyThreadState_GetUnchecked();
    return ts != NULL && ts->interp == hm_main_interp;
#elif PY_VERSION_HEX >= 0x030C0000
    PyThreadState *ts = _PyThreadState_UncheckedGet();
    return ts != NULL && ts->interp == hm_main_interp;
#else
    return 1;
#endif
}

static inline int records_domain(int domain)
{
#if GIL_PATH && PY_VERSION_HEX >= 0x030C0000
    return !is_gil_domain(domain) || on_gil_path();
#else
    (void)domain;
    return 1;
#endif
}

/* ---- open-addressing hash tables (heapmap_index.c; the caller locks) -------------------- */

struct slot {
    uintptr_t key; /* 0 = empty */
    uint64_t val;
};

struct table {
    struct slot *slots;
    size_t mask;       /* capacity - 1 (0 before the first insert) */
    size_t count;
    unsigned bits;     /* log2(capacity) */
    unsigned keyshift; /* low key bits that carry no information */
};

static inline size_t slot_of(const struct table *t, uintptr_t key)
{
    return (size_t)((((uint64_t)key >> t->keyshift) * 0x9E3779B97F4A7C15ULL) >> (64 - t->bits));
}

static inline size_t table_find(const struct table *t, uintptr_t key)
{
    if (t->count == 0)
        return SIZE_MAX;
    for (size_t j = slot_of(t, key);; j = (j + 1) & t->mask) {
        if (t->slots[j].key == key)
            return j;
        if (t->slots[j].key == 0)
            return SIZE_MAX;
    }
}

size_t hm_table_bytes(const struct table *t);
void hm_table_clear(struct table *t);
/* Inserts or updates key -> val: 1 new, 0 updated (old value in *old), -1 out of memory. */
int hm_table_put(struct table *t, uintptr_t key, uint64_t val, uint64_t *old);
/* Multimap insert.  0 or -1. */
int hm_table_add(struct table *t, uintptr_t key, uint64_t val);

/* ---- the index (heapmap_index.c) ---------------------------------------------------- */

/* Where a forgotten block was: which path's ring gets it. */
enum { NOT_FOUND = 0, ON_GIL_PATH = 1, ON_LOCK_PATH = 2 };

struct forgotten {
    int path;
    uint16_t cell; /* GIL path: the cell value */
    uint64_t val;  /* size | domain << 61 */
};

void hm_lock_record(uintptr_t p, size_t size, int domain);
int hm_lock_forget(uintptr_t p, int gil, struct forgotten *f); /* lock held */
/* The live block containing addr; `locked`: the caller holds the lock. */
int hm_find_block(uintptr_t addr, int locked, uintptr_t *start, uint64_t *val);
/* Forgets the foreign block that starts at p (CPython's and numpy's blocks
 * are left alone: only their hooks forget them).  Lock held. */
int hm_foreign_forget_locked(uintptr_t p, struct forgotten *f);
void hm_index_clear_locked(void); /* forgets every live block; GIL and lock held */
size_t hm_index_bytes_locked(void);
int hm_chain_unchanged(void);     /* heapmap_hooks.c: the tops of the chains are as last verified */

/* The GIL path's record (mem/obj, GIL held, recording).  0 if the block must
 * take the locked path instead. */
static HOT int gil_record(uintptr_t p, size_t size, int domain)
{
    if (size > SMALL_MAX || (p & (GRANULE - 1)) != 0)
        return 0;
    cell_t *cell = shadow_cell(p, 1);
    if (UNLIKELY(cell == NULL))
        return 0;
    uint16_t v = cell_load(cell);
    if (UNLIKELY(v != 0)) {
        if (!is_gil_domain(cell_domain(v)) && v != CELL_LARGE && cell_size(v) == (size ? size : 1))
            return 1; /* the raw domain recorded it (pymalloc passed it down): keep that */
        return 0;     /* stale: let the locked path sort it out */
    }
    if (size == 0)
        size = 1;
    cell_store(cell, cell_value(size, domain));
    bump(&hm_gil_counters.live_blocks, 1);
    bump(&hm_gil_counters.live_bytes, size);
    bump(&hm_gil_counters.allocations, 1);
    if (UNLIKELY(p < atomic_load_explicit(&hm_shadow_bounds.lo, memory_order_relaxed) ||
                 p + size > atomic_load_explicit(&hm_shadow_bounds.hi, memory_order_relaxed)))
        bounds_extend(&hm_shadow_bounds, p, p + size);
    return 1;
}

static HOT void record(int domain, void *ptr, size_t size)
{
    if (is_gil_domain(domain) && on_gil_path() && LIKELY(gil_record((uintptr_t)ptr, size, domain)))
        return;
    hm_lock_record((uintptr_t)ptr, size, domain);
}

/* The GIL path's forget: a small mem/obj block in the shadow map.  Returns
 * NOT_FOUND when the block is certainly not recorded, ON_LOCK_PATH when the
 * locked path must look. */
static HOT int gil_forget(uintptr_t p, struct forgotten *f)
{
    if ((p & (GRANULE - 1)) != 0)
        return ON_LOCK_PATH;
    cell_t *cell = shadow_cell(p, 0);
    if (UNLIKELY(cell == NULL))
        return ON_LOCK_PATH;
    uint16_t v = cell_load(cell);
    if (v == 0) /* a block in the table has a marker, unless its leaf failed */
        return atomic_load_explicit(&hm_shadow_failed, memory_order_relaxed) ? ON_LOCK_PATH : NOT_FOUND;
    if (v == CELL_LARGE || !is_gil_domain(cell_domain(v)))
        return ON_LOCK_PATH;
    cell_store(cell, 0);
    bump(&hm_gil_counters.live_blocks, (uint64_t)-1);
    bump(&hm_gil_counters.live_bytes, -(uint64_t)cell_size(v));
    bump(&hm_gil_counters.frees, 1);
    f->path = ON_GIL_PATH;
    f->cell = v;
    f->val = (uint64_t)cell_size(v) | ((uint64_t)cell_domain(v) << SIZE_SHIFT);
    return ON_GIL_PATH;
}

/* ---- freed blocks (heapmap_freed.c) --------------------------------------------------- */

/* The GIL path's ring: 8-byte entries (start >> 4) << 16 | cell value.  One
 * writer (the GIL); `claim` is raised before an entry is written and `done`
 * after, so a reader can tell whether what it copied was overwritten. */
extern _Atomic uint64_t hm_gil_ring[PB_HEAPMAP_FREED_HISTORY];
extern counter_t hm_gil_ring_claim, hm_gil_ring_done;

static HOT void gil_ring_append(uintptr_t start, uint16_t v)
{
    uint64_t s = atomic_load_explicit(&hm_gil_ring_claim, memory_order_relaxed);
    atomic_store_explicit(&hm_gil_ring_claim, s + 1, memory_order_relaxed);
    atomic_thread_fence(memory_order_release);
    atomic_store_explicit(&hm_gil_ring[s & RING_MASK], ((uint64_t)(start >> GRANULE_SHIFT) << 16) | v,
                          memory_order_relaxed);
    atomic_store_explicit(&hm_gil_ring_done, s + 1, memory_order_release);
}

void hm_lock_ring_append(uintptr_t start, uint64_t val); /* lock held */

struct hm_hook; /* a hook instance (heapmap_hooks.c) */

/* A held block: given back through `via` (a PyMem hook instance), or, for
 * numpy and foreign blocks (via == NULL), by domain.  `prot`: the whole
 * pages inside it are PROT_NONE (which pages follows from ptr and size). */
struct held_block {
    void *ptr;
    size_t size : 63;
    size_t prot : 1;
    const struct hm_hook *via;
};

struct quarantine {
    struct held_block q[PB_HEAPMAP_HOLD_MAX];
    size_t head, count, bytes;
};

struct evicted {
    struct held_block b[EVICT_MAX];
    int n;
};

/* One per domain and path: GIL-path blocks (mem, obj) under the GIL, the
 * others under the lock. */
extern struct quarantine hm_gil_held[DOMAINS], hm_lock_held[DOMAINS];
extern _Atomic size_t hm_hold_max_blocks, hm_hold_max_bytes;
extern atomic_int hm_poison; /* 1: held blocks are poisoned and their inner pages protected */

/* Poisons a block taken into the hold and protects the whole pages inside
 * it (blocks of a page or more); fills b->prot_*. */
void hm_poison_block(struct held_block *b);
int hm_quarantine_put(struct quarantine *q, const struct held_block *b, struct evicted *ev);
/* Gives a held (or evicted) block back to its allocator: unprotects first. */
void hm_release_held(int domain, const struct held_block *b);
void hm_release_evicted(int domain, const struct evicted *ev);
void hm_release_hold_gil(void);   /* every held block back to its allocator; GIL held */
void hm_freed_clear_locked(void); /* forgets the history; lock held */
size_t hm_freed_bytes_locked(void);
void hm_freed_stats_locked(struct pb_heapmap_stats *out);
extern uintptr_t hm_page_size;

/* The hold's steady state, inline for small blocks: poison, then, the hold
 * being full, the oldest block goes and this one comes in.  Anything else
 * goes to hm_quarantine_put.  1 if the block was taken. */
static HOT int quarantine_swap(struct quarantine *q, void *ptr, size_t size, const struct hm_hook *via,
                               size_t max_blocks, struct evicted *ev)
{
    struct held_block b = {ptr, size, 0, via};
    if (LIKELY(size <= SMALL_MAX && q->count == max_blocks && q->count != 0)) {
        struct held_block old = q->q[q->head];
        size_t bytes = q->bytes - old.size + size;
        if (LIKELY(bytes <= atomic_load_explicit(&hm_hold_max_bytes, memory_order_relaxed))) {
            if (size > 1 && atomic_load_explicit(&hm_poison, memory_order_relaxed))
                memset(ptr, POISON_BYTE, size); /* see hm_poison_block on size 1 */
            q->q[(q->head + q->count) & HOLD_MASK] = b;
            q->head = (q->head + 1) & HOLD_MASK;
            q->bytes = bytes;
            ev->b[0] = old;
            ev->n = 1;
            return 1;
        }
    }
    return hm_quarantine_put(q, &b, ev);
}

/* ---- hooks (heapmap_hooks.c) ---------------------------------------------------------- */

/* A PyMem hook instance: what one PyMem_SetAllocator call put in the chain.
 * Its ctx is the instance, so it knows what it wraps (`prev`, never changed
 * once set).  Instances are never freed (something above may still call
 * through them); a domain reuses an instance whose prev is the allocator
 * being wrapped again. */
struct hm_hook {
    PyMemAllocatorEx prev; /* the allocator below this instance; first, so that a hook that
                              reads a torn {our ctx, its function} pair (raw domain, no GIL)
                              and treats its ctx as a PyMemAllocatorEx, as tracemalloc
                              does, still reaches the right allocator */
    int domain;            /* PB_HEAPMAP_RAW, _MEM or _OBJ */
    atomic_int active;     /* records (the domain's current instance while installed) */
    atomic_ulong probe_hits;
};

static inline void hook_free_prev(const struct hm_hook *h, void *ptr)
{
    h->prev.free(h->prev.ctx, ptr);
}

/* The free path of a block: forgets it, puts it in the history and in the
 * hold if configured.  1 if the caller must not free ptr now; ev gets blocks
 * to release now.  release_size: numpy's size argument. */
int hm_forget_for_free_locked(int domain, void *ptr, size_t release_size, const struct hm_hook *via,
                              struct evicted *ev);
/* realloc, before calling the allocator: forgets the old block (once the
 * allocator has it back, another thread may be handed its address). */
struct forgotten hm_realloc_before(int domain, void *ptr);
/* realloc, after: records the result.  q == NULL: the old block is still valid. */
void hm_realloc_after(int domain, void *ptr, const struct forgotten *old, void *q, size_t size);
/* Should this realloc be a malloc + copy + hold of the old block? */
int hm_realloc_copies(const struct forgotten *old);
/* A block forgotten by hm_realloc_before and replaced by a copy: into the
 * history and, if it fits, the hold.  1 if held; ev gets blocks to release. */
int hm_hold_forgotten(int domain, void *ptr, const struct forgotten *f, const struct hm_hook *via,
                      struct evicted *ev);

/* ---- numpy (heapmap_numpy.c) ------------------------------------------------------------ */

void hm_numpy_release(void *ptr, size_t size);
int hm_numpy_attach_gil(void);
void hm_numpy_detach_gil(void);
int hm_numpy_hooked(void);

/* ---- foreign blocks (heapmap_freed.c) ------------------------------------------------------ */

extern _Atomic(void (*)(void *)) hm_foreign_release;

#pragma GCC visibility pop

#endif /* PB_HEAPMAP_INTERNAL_H */
