/*
 * heapmap.c - the Python heap map (check level 2): an index of every live
 * Python heap block allocated while the hooks record.
 *
 * Hooks.  Each PyMem domain (raw, mem, obj) gets a hook that calls the
 * allocator installed before it (`orig`) and records the result, so a block
 * is always allocated and freed by the same underlying allocator whether the
 * hooks are on or off when it is freed.  The hook's ctx is the original
 * allocator's ctx and the hook functions never read their ctx argument: a
 * thread that reads a domain's allocator while it is being replaced (the raw
 * domain is called without the GIL) may see any mix of the old and new
 * fields, and every mix works.  numpy's default data-memory handler (NEP 49)
 * is hooked the same way, by pointing numpy's default-handler capsule (which
 * numpy reads at every allocation and every free) at a handler that
 * delegates to numpy's own.
 *
 * Two paths.  The mem and obj domains are only called with the GIL held, and
 * almost all their blocks are small (pymalloc: <= 512 bytes, 16-byte
 * aligned).  Such a block is recorded without any lock or atomic
 * read-modify-write, in a shadow map: one 16-bit cell per 16-byte granule of
 * address space (size and domain; 0 = no block starts here), mapped lazily
 * per GiB with MAP_NORESERVE, so only the cells of memory Python uses are
 * ever touched (1/8 of it).  Everything else - the raw domain and numpy
 * (callable without the GIL), large or unaligned blocks - takes the locked
 * path: a spinlock, small blocks in the shadow map, larger ones in a hash
 * table keyed by start plus a multimap from each 64 KiB chunk a block
 * touches to its start; a large block's first cell holds a marker so that a
 * free can tell in one read whether the locked path must look.
 *
 * Lookups.  An interior pointer of a small block is found by reading the
 * cells up to 512 bytes below it (one or two cache lines): the nearest block
 * start decides, since live blocks never overlap.  Large blocks are found
 * through the chunk multimap.  Fast rejects come first, without the lock:
 * global bounds of the recorded blocks, the shadow map's per-GiB leaf, and a
 * page-granular bitmap of the table's blocks (recomputed when the table is
 * resized, guarded by a sequence counter).
 *
 * Freed blocks.  Every free is appended to a ring of
 * PB_HEAPMAP_FREED_HISTORY entries (one ring per path, so the GIL path never
 * locks; readers validate what they copy with a claim counter).  The scanner
 * takes them through cursors; use-after-free lookups use a table built
 * lazily from the rings when asked, so a free costs only the append.  A
 * per-domain hold (the quarantine of memory sanitizers) keeps the latest
 * freed blocks back from their allocator for a while, so that the scanner
 * can still find pointers into them before the memory is reused.  A
 * domain's held blocks are released only by later calls into that domain
 * (or by uninstall, with the GIL), so the domain's GIL rules are kept.
 *
 * Locking.  The spinlock is never held while calling an allocator or Python;
 * it yields the CPU after spinning a little.  A fork handler takes it around
 * fork() so that the child never inherits it locked.  The index's own memory
 * comes from libc (calloc, mmap), never from the hooked allocators.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "pb_heapmap.h"
#include "pb_scan.h"

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
#define PROBE_SIZE 0x1f1           /* size of the allocations in_chain() sends down a chain */

/* The lock-free path needs the GIL to serialise the mem and obj domains. */
#if defined(Py_GIL_DISABLED) || UINTPTR_MAX <= 0xFFFFFFFFu
#define GIL_PATH 0
#else
#define GIL_PATH 1
#endif

typedef _Atomic uint64_t counter_t;

/* ---- lock ---------------------------------------------------------------- */

static atomic_int spin;
static atomic_uintptr_t spin_owner; /* pthread_self() of the holder, 0 when free */

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __asm__ __volatile__("pause");
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static void lock_slow(void)
{
    for (;;) {
        for (int n = 0; atomic_load_explicit(&spin, memory_order_relaxed); n++) {
            if (n < 128) {
                cpu_relax();
            } else {
                sched_yield(); /* the holder may be descheduled, or rehashing */
                n = 0;
            }
        }
        if (!atomic_exchange_explicit(&spin, 1, memory_order_acquire))
            return;
    }
}

static inline void lock(void)
{
    if (UNLIKELY(atomic_exchange_explicit(&spin, 1, memory_order_acquire)))
        lock_slow();
    atomic_store_explicit(&spin_owner, (uintptr_t)pthread_self(), memory_order_relaxed);
}

static inline void unlock(void)
{
    atomic_store_explicit(&spin_owner, 0, memory_order_relaxed);
    atomic_store_explicit(&spin, 0, memory_order_release);
}

/* 1 if this thread holds the lock (a re-entrant call must not take it). */
static inline int lock_held_here(void)
{
    return atomic_load_explicit(&spin_owner, memory_order_relaxed) == (uintptr_t)pthread_self();
}

static void fork_prepare(void) { lock(); }
static void fork_parent(void) { unlock(); }
static void fork_child(void)
{
    atomic_store_explicit(&spin_owner, 0, memory_order_relaxed);
    atomic_store_explicit(&spin, 0, memory_order_relaxed);
}

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

static struct counters gil_counters;  /* written under the GIL (the lock-free path) */
static struct counters lock_counters; /* written under the lock */
static counter_t lookups;

static atomic_int recording; /* stable while the GIL is held; re-checked under the lock */

/* ---- bounds ------------------------------------------------------------- */

struct bounds {
    atomic_uintptr_t lo, hi; /* [lo, hi) covers every recorded block (may be wider) */
};

static struct bounds shadow_bounds = {UINTPTR_MAX, 0};
static struct bounds table_bounds = {UINTPTR_MAX, 0};

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

static void bounds_reset(struct bounds *b)
{
    atomic_store_explicit(&b->lo, UINTPTR_MAX, memory_order_relaxed);
    atomic_store_explicit(&b->hi, 0, memory_order_relaxed);
}

/* ---- shadow map ---------------------------------------------------------- */

typedef _Atomic uint16_t cell_t;

static _Atomic(cell_t *) shadow_top[SHADOW_TOP];
static counter_t shadow_leaves;
static atomic_int shadow_failed; /* a leaf could not be mapped: its blocks went to the table */

static COLD cell_t *shadow_new_leaf(_Atomic(cell_t *) *slot)
{
    void *m = mmap(NULL, SHADOW_LEAF_BYTES, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) {
        atomic_store(&shadow_failed, 1);
        return NULL;
    }
    cell_t *expected = NULL;
    if (!atomic_compare_exchange_strong(slot, &expected, (cell_t *)m)) {
        munmap(m, SHADOW_LEAF_BYTES); /* another thread mapped it first */
        return expected;
    }
    atomic_fetch_add(&shadow_leaves, 1);
    return (cell_t *)m;
}

/* The cell of the granule at addr, or NULL (no leaf, and create is 0 or
 * mapping failed; or addr is beyond the shadowed range). */
static HOT cell_t *shadow_cell(uintptr_t addr, int create)
{
    if (UNLIKELY((addr >> SHADOW_ADDR_BITS) != 0))
        return NULL;
    _Atomic(cell_t *) *slot = &shadow_top[addr >> SHADOW_LEAF_SHIFT];
    cell_t *leaf = atomic_load_explicit(slot, memory_order_acquire);
    if (UNLIKELY(leaf == NULL)) {
        if (!create)
            return NULL;
        leaf = shadow_new_leaf(slot);
        if (leaf == NULL)
            return NULL;
    }
    return &leaf[(addr >> GRANULE_SHIFT) & (SHADOW_CELLS - 1)];
}

static inline uint16_t cell_load(cell_t *c)
{
    return atomic_load_explicit(c, memory_order_relaxed);
}

static inline void cell_store(cell_t *c, uint16_t v)
{
    atomic_store_explicit(c, v, memory_order_relaxed);
}

static inline uint16_t cell_value(size_t size, int domain)
{
    return (uint16_t)((size ? size : 1) | ((size_t)domain << CELL_DOMAIN_SHIFT));
}

static inline size_t cell_size(uint16_t v) { return v & CELL_SIZE_MASK; }
static inline int cell_domain(uint16_t v) { return v >> CELL_DOMAIN_SHIFT; }
static inline int is_gil_domain(int domain) { return domain == PB_HEAPMAP_MEM || domain == PB_HEAPMAP_OBJ; }

/* Zeroes every leaf (their pages go back to the kernel; the mappings stay,
 * so lock-free readers never fault).  No writers may run. */
static void shadow_clear(void)
{
    for (size_t i = 0; i < SHADOW_TOP; i++) {
        cell_t *leaf = atomic_load_explicit(&shadow_top[i], memory_order_relaxed);
        if (leaf != NULL)
            madvise(leaf, SHADOW_LEAF_BYTES, MADV_DONTNEED);
    }
    bounds_reset(&shadow_bounds);
}

/* ---- hash tables (the locked path) ---------------------------------------- */

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

static size_t table_bytes(const struct table *t)
{
    return t->slots ? (t->mask + 1) * sizeof(struct slot) : 0;
}

static int table_resize(struct table *t, unsigned bits)
{
    struct slot *slots = calloc((size_t)1 << bits, sizeof *slots);
    if (slots == NULL)
        return -1;
    struct table n = {slots, ((size_t)1 << bits) - 1, t->count, bits, t->keyshift};
    if (t->slots != NULL) {
        for (size_t i = 0; i <= t->mask; i++) {
            if (t->slots[i].key == 0)
                continue;
            size_t j = slot_of(&n, t->slots[i].key);
            while (slots[j].key != 0)
                j = (j + 1) & n.mask;
            slots[j] = t->slots[i];
        }
        free(t->slots);
    }
    *t = n;
    return 0;
}

static void table_clear(struct table *t)
{
    unsigned keyshift = t->keyshift;
    free(t->slots);
    memset(t, 0, sizeof *t);
    t->keyshift = keyshift;
}

/* Room for one more entry at load <= 1/2: 1 if rehashed, 0 if not, -1 out of memory. */
static inline int table_reserve(struct table *t)
{
    if (LIKELY(t->slots != NULL && (t->count + 1) * 2 <= t->mask + 1))
        return 0;
    return table_resize(t, t->slots ? t->bits + 1 : MIN_BITS) == 0 ? 1 : -1;
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

/* Inserts or updates key -> val: 1 new, 0 updated (old value in *old), -1 out of memory. */
static int table_put(struct table *t, uintptr_t key, uint64_t val, uint64_t *old)
{
    if (table_reserve(t) < 0)
        return -1;
    size_t j = slot_of(t, key);
    for (; t->slots[j].key != 0; j = (j + 1) & t->mask) {
        if (t->slots[j].key == key) {
            *old = t->slots[j].val;
            t->slots[j].val = val;
            return 0;
        }
    }
    t->slots[j].key = key;
    t->slots[j].val = val;
    t->count++;
    return 1;
}

/* Multimap insert.  0 or -1. */
static int table_add(struct table *t, uintptr_t key, uint64_t val)
{
    if (table_reserve(t) < 0)
        return -1;
    size_t j = slot_of(t, key);
    while (t->slots[j].key != 0)
        j = (j + 1) & t->mask;
    t->slots[j].key = key;
    t->slots[j].val = val;
    t->count++;
    return 0;
}

/* Backward-shift deletion of the entry at i. */
static void table_remove_at(struct table *t, size_t i)
{
    for (size_t j = i;;) {
        j = (j + 1) & t->mask;
        if (t->slots[j].key == 0)
            break;
        size_t home = slot_of(t, t->slots[j].key);
        int stays = (i <= j) ? (i < home && home <= j) : (i < home || home <= j);
        if (!stays) {
            t->slots[i] = t->slots[j];
            i = j;
        }
    }
    t->slots[i].key = 0;
    t->slots[i].val = 0;
    t->count--;
}

static void table_remove_pair(struct table *t, uintptr_t key, uint64_t val)
{
    if (t->count == 0)
        return;
    for (size_t j = slot_of(t, key); t->slots[j].key != 0; j = (j + 1) & t->mask)
        if (t->slots[j].key == key && t->slots[j].val == val) {
            table_remove_at(t, j);
            return;
        }
}

/* ---- the table's page bitmap (fast reject; written under the lock) ---------- */

static _Atomic(_Atomic uint64_t *) bitmap_top[BITMAP_TOP];
static uint64_t bitmap_leaves; /* under the lock */
static atomic_uint bitmap_gen; /* odd while being rebuilt */
static atomic_int bitmap_failed;

static void bitmap_set(uintptr_t start, uintptr_t last)
{
    if (atomic_load_explicit(&bitmap_failed, memory_order_relaxed) || (last >> SHADOW_ADDR_BITS) != 0)
        return;
    for (uintptr_t page = start >> PAGE_SHIFT; page <= last >> PAGE_SHIFT; page++) {
        _Atomic(_Atomic uint64_t *) *slot = &bitmap_top[page >> BITMAP_LEAF_PAGES_SHIFT];
        _Atomic uint64_t *leaf = atomic_load_explicit(slot, memory_order_relaxed);
        if (UNLIKELY(leaf == NULL)) {
            leaf = calloc(BITMAP_LEAF_WORDS, sizeof *leaf);
            if (leaf == NULL) {
                atomic_store(&bitmap_failed, 1);
                return;
            }
            atomic_store_explicit(slot, leaf, memory_order_release);
            bitmap_leaves++;
        }
        size_t bit = page & (((uintptr_t)1 << BITMAP_LEAF_PAGES_SHIFT) - 1);
        _Atomic uint64_t *w = &leaf[bit >> 6];
        uint64_t m = (uint64_t)1 << (bit & 63);
        uint64_t v = atomic_load_explicit(w, memory_order_relaxed);
        if (!(v & m))
            atomic_store_explicit(w, v | m, memory_order_relaxed);
    }
}

/* 0 if no table block can contain addr, 1 if one may.  Lock-free. */
static int table_may_contain(uintptr_t addr)
{
    unsigned gen = atomic_load_explicit(&bitmap_gen, memory_order_acquire);
    if (gen & 1)
        return 1;
    int maybe;
    if (!bounds_contain(&table_bounds, addr)) {
        maybe = 0;
    } else if (atomic_load_explicit(&bitmap_failed, memory_order_relaxed) || (addr >> SHADOW_ADDR_BITS) != 0) {
        maybe = 1;
    } else {
        uintptr_t page = addr >> PAGE_SHIFT;
        _Atomic uint64_t *leaf =
            atomic_load_explicit(&bitmap_top[page >> BITMAP_LEAF_PAGES_SHIFT], memory_order_acquire);
        size_t bit = page & (((uintptr_t)1 << BITMAP_LEAF_PAGES_SHIFT) - 1);
        maybe = leaf != NULL &&
                ((atomic_load_explicit(&leaf[bit >> 6], memory_order_relaxed) >> (bit & 63)) & 1);
    }
    atomic_thread_fence(memory_order_acquire);
    return atomic_load_explicit(&bitmap_gen, memory_order_relaxed) != gen ? 1 : maybe;
}

/* ---- the locked index ------------------------------------------------------ */

static struct table blocks = {.keyshift = GRANULE_SHIFT}; /* start -> size | domain << 61 */
static struct table chunks = {.keyshift = 0};             /* chunk + 1 -> start (multimap) */

/* Recomputes the table's bounds and bitmap.  Lock held. */
static void bitmap_rebuild(void)
{
    atomic_fetch_add_explicit(&bitmap_gen, 1, memory_order_acq_rel);
    atomic_thread_fence(memory_order_seq_cst);
    for (size_t i = 0; i < BITMAP_TOP; i++) {
        _Atomic uint64_t *leaf = atomic_load_explicit(&bitmap_top[i], memory_order_relaxed);
        if (leaf != NULL)
            for (size_t w = 0; w < BITMAP_LEAF_WORDS; w++)
                atomic_store_explicit(&leaf[w], 0, memory_order_relaxed);
    }
    bounds_reset(&table_bounds);
    atomic_store(&bitmap_failed, 0);
    for (size_t i = 0; blocks.slots != NULL && i <= blocks.mask; i++)
        if (blocks.slots[i].key != 0) {
            uintptr_t s = blocks.slots[i].key;
            uintptr_t size = (uintptr_t)(blocks.slots[i].val & SIZE_MASK);
            bounds_extend(&table_bounds, s, s + size);
            bitmap_set(s, s + size - 1);
        }
    atomic_fetch_add_explicit(&bitmap_gen, 1, memory_order_release);
}

static void chunks_remove(uintptr_t start, size_t size)
{
    for (uintptr_t c = start >> CHUNK_SHIFT; c <= (start + size - 1) >> CHUNK_SHIFT; c++)
        table_remove_pair(&chunks, c + 1, start);
}

/* Removes the table entry at i.  Lock held.  Returns its value. */
/* Forgets a small block whose cell is found in use where a new block starts
 * (its free was not seen: counters are approximate in that case).  Lock held. */
static void drop_stale_cell(cell_t *cell, uint16_t v)
{
    struct counters *c = is_gil_domain(cell_domain(v)) ? &gil_counters : &lock_counters;
    bump(&c->live_blocks, (uint64_t)-1);
    bump(&c->live_bytes, -(uint64_t)cell_size(v));
    cell_store(cell, 0);
}

static uint64_t table_block_remove(size_t i)
{
    uintptr_t start = blocks.slots[i].key;
    uint64_t val = blocks.slots[i].val;
    table_remove_at(&blocks, i);
    chunks_remove(start, (size_t)(val & SIZE_MASK));
    cell_t *cell = (start & (GRANULE - 1)) == 0 ? shadow_cell(start, 0) : NULL;
    if (cell != NULL && cell_load(cell) == CELL_LARGE)
        cell_store(cell, 0);
    bump(&lock_counters.live_blocks, (uint64_t)-1);
    bump(&lock_counters.live_bytes, -(val & SIZE_MASK));
    if (blocks.count * 8 < blocks.mask + 1 && blocks.bits > MIN_BITS && table_resize(&blocks, blocks.bits - 1) == 0)
        bitmap_rebuild();
    return val;
}

/* Enters a block in the table.  Lock held.  An entry already there with the
 * same size is the same block seen by an outer domain (pymalloc passes large
 * requests to the raw domain): it is relabelled.  Anything else there is
 * stale (its free was not seen) and replaced. */
static void table_block_insert(uintptr_t start, size_t size, int domain)
{
    if (size == 0)
        size = 1;
    if (start + (size - 1) < start)
        size = (size_t)(UINTPTR_MAX - start) + 1;
    uint64_t val = (uint64_t)size | ((uint64_t)domain << SIZE_SHIFT);
    size_t i = table_find(&blocks, start);
    if (i != SIZE_MAX) {
        if ((blocks.slots[i].val & SIZE_MASK) == size) {
            blocks.slots[i].val = val;
            return;
        }
        table_block_remove(i);
    }
    size_t cap = blocks.mask;
    uint64_t old;
    if (table_put(&blocks, start, val, &old) < 0) {
        bump(&lock_counters.untracked, 1);
        return;
    }
    for (uintptr_t c = start >> CHUNK_SHIFT; c <= (start + size - 1) >> CHUNK_SHIFT; c++)
        if (table_add(&chunks, c + 1, start) < 0) {
            chunks_remove(start, size);
            table_remove_at(&blocks, table_find(&blocks, start));
            bump(&lock_counters.untracked, 1);
            return;
        }
    cell_t *cell = (start & (GRANULE - 1)) == 0 ? shadow_cell(start, 1) : NULL;
    if (cell != NULL) {
        uint16_t v = cell_load(cell);
        if (v != 0 && v != CELL_LARGE)
            drop_stale_cell(cell, v);
        cell_store(cell, CELL_LARGE); /* frees look in the table */
    }
    bump(&lock_counters.live_blocks, 1);
    bump(&lock_counters.live_bytes, size);
    bump(&lock_counters.allocations, 1);
    if (blocks.mask != cap) {
        bitmap_rebuild(); /* includes this block */
    } else {
        bounds_extend(&table_bounds, start, start + size);
        bitmap_set(start, start + size - 1);
    }
}

/* The table block containing addr.  Lock held. */
static int table_block_find(uintptr_t addr, uintptr_t *start, uint64_t *val)
{
    if (chunks.count == 0)
        return 0;
    uintptr_t key = (addr >> CHUNK_SHIFT) + 1, best = 0;
    int have = 0;
    for (size_t j = slot_of(&chunks, key); chunks.slots[j].key != 0; j = (j + 1) & chunks.mask) {
        uintptr_t s = (uintptr_t)chunks.slots[j].val;
        if (chunks.slots[j].key == key && s <= addr && (!have || s > best)) {
            best = s;
            have = 1;
        }
    }
    if (!have)
        return 0;
    size_t i = table_find(&blocks, best); /* blocks never overlap: the nearest start decides */
    if (i == SIZE_MAX || addr - best >= (blocks.slots[i].val & SIZE_MASK))
        return 0;
    *start = best;
    *val = blocks.slots[i].val;
    return 1;
}

/* ---- freed-block rings ----------------------------------------------------- */

/* The GIL path's ring: 8-byte entries (start >> 4) << 16 | cell value.  One
 * writer (the GIL); `claim` is raised before an entry is written and `done`
 * after, so a reader can tell whether what it copied was overwritten. */
static _Atomic uint64_t gil_ring[PB_HEAPMAP_FREED_HISTORY];
static counter_t gil_ring_claim, gil_ring_done;

/* The locked path's ring: (start, size | domain << 61), under the lock. */
static struct {
    uintptr_t start;
    uint64_t val;
} lock_ring[PB_HEAPMAP_FREED_HISTORY];
static uint64_t lock_ring_seq;

/* Readers' state, under the lock: the scanner's cursors and drop counts. */
static uint64_t gil_taken, lock_taken, freed_dropped;

static HOT void gil_ring_append(uintptr_t start, uint16_t v)
{
    uint64_t s = atomic_load_explicit(&gil_ring_claim, memory_order_relaxed);
    atomic_store_explicit(&gil_ring_claim, s + 1, memory_order_relaxed);
    atomic_thread_fence(memory_order_release);
    atomic_store_explicit(&gil_ring[s & RING_MASK], ((uint64_t)(start >> GRANULE_SHIFT) << 16) | v,
                          memory_order_relaxed);
    atomic_store_explicit(&gil_ring_done, s + 1, memory_order_release);
}

static void lock_ring_append(uintptr_t start, uint64_t val)
{
    lock_ring[lock_ring_seq & RING_MASK].start = start;
    lock_ring[lock_ring_seq & RING_MASK].val = val;
    lock_ring_seq++;
}

/* Reads GIL-ring entry seq (< gil_ring_done): 1 and (start, size|domain<<61)
 * if it was not overwritten, else 0. */
static int gil_ring_read(uint64_t seq, uintptr_t *start, uint64_t *val)
{
    uint64_t e = atomic_load_explicit(&gil_ring[seq & RING_MASK], memory_order_relaxed);
    atomic_thread_fence(memory_order_acquire);
    if (atomic_load_explicit(&gil_ring_claim, memory_order_relaxed) - seq > PB_HEAPMAP_FREED_HISTORY)
        return 0;
    uint16_t v = (uint16_t)e;
    *start = (uintptr_t)(e >> 16) << GRANULE_SHIFT;
    *val = (uint64_t)cell_size(v) | ((uint64_t)cell_domain(v) << SIZE_SHIFT);
    return 1;
}

static inline uint64_t oldest_of(uint64_t seq)
{
    return seq > PB_HEAPMAP_FREED_HISTORY ? seq - PB_HEAPMAP_FREED_HISTORY : 0;
}

/* Reads entry seq of ring r (0 = GIL ring, 1 = locked ring).  Lock held. */
static int ring_read(int r, uint64_t seq, uintptr_t *start, uint64_t *val)
{
    if (r == 0) {
        if (seq >= atomic_load_explicit(&gil_ring_done, memory_order_acquire))
            return 0;
        return gil_ring_read(seq, start, val);
    }
    if (seq >= lock_ring_seq || seq < oldest_of(lock_ring_seq))
        return 0;
    *start = lock_ring[seq & RING_MASK].start;
    *val = lock_ring[seq & RING_MASK].val;
    return 1;
}

/* ---- the lazy index of freed blocks (for use-after-free lookups) ----------------- */

static struct table freed_starts = {.keyshift = GRANULE_SHIFT}; /* start -> tag */
static struct table freed_chunks = {.keyshift = 0};             /* chunk + 1 -> tag (multimap) */
static uint64_t indexed[2];                                     /* next seq to index, per ring */

/* tag = (seq + 1) << 1 | ring */
static void freed_index_add(int r, uint64_t seq)
{
    uintptr_t start;
    uint64_t val, old, tag = ((seq + 1) << 1) | (uint64_t)r;
    if (!ring_read(r, seq, &start, &val))
        return;
    size_t size = (size_t)(val & SIZE_MASK);
    if (table_put(&freed_starts, start, tag, &old) < 0)
        return;
    if (size > SMALL_MAX || (start & (GRANULE - 1)) != 0)
        for (uintptr_t c = start >> CHUNK_SHIFT; c <= (start + size - 1) >> CHUNK_SHIFT; c++)
            if (table_add(&freed_chunks, c + 1, tag) < 0)
                return;
}

/* Brings the lazy index up to date with both rings.  Lock held. */
static void freed_index_update(void)
{
    uint64_t ends[2] = {atomic_load_explicit(&gil_ring_done, memory_order_acquire), lock_ring_seq};
    /* Entries for overwritten ring slots are skipped when read; rebuild when
     * they would make up most of the tables. */
    if (indexed[0] < oldest_of(ends[0]) || indexed[1] < oldest_of(ends[1]) ||
        freed_starts.count > 4 * (size_t)PB_HEAPMAP_FREED_HISTORY ||
        freed_chunks.count > 8 * (size_t)PB_HEAPMAP_FREED_HISTORY) {
        table_clear(&freed_starts);
        table_clear(&freed_chunks);
        indexed[0] = oldest_of(ends[0]);
        indexed[1] = oldest_of(ends[1]);
    }
    for (int r = 0; r < 2; r++)
        for (; indexed[r] < ends[r]; indexed[r]++)
            freed_index_add(r, indexed[r]);
}

/* The freed block a tag names, if still in its ring and containing addr. */
static int freed_tag_contains(uint64_t tag, uintptr_t addr, uintptr_t *start, uint64_t *val)
{
    if (!ring_read((int)(tag & 1), (tag >> 1) - 1, start, val))
        return 0;
    return addr >= *start && addr - *start < (*val & SIZE_MASK);
}

static void freed_clear(void)
{
    table_clear(&freed_starts);
    table_clear(&freed_chunks);
    indexed[0] = indexed[1] = 0;
}

/* ---- quarantine ----------------------------------------------------------- */

struct held_block {
    void *ptr;
    size_t size;
};

struct quarantine {
    struct held_block q[PB_HEAPMAP_HOLD_MAX];
    size_t head, count, bytes;
};

/* One per domain and path: GIL-path blocks (mem, obj) under the GIL, the
 * others under the lock. */
static struct quarantine gil_held[DOMAINS], lock_held[DOMAINS];
static _Atomic size_t q_max_blocks = PB_HEAPMAP_HOLD_BLOCKS, q_max_bytes = PB_HEAPMAP_HOLD_BYTES;

#define EVICT_MAX 4
struct evicted {
    struct held_block b[EVICT_MAX];
    int n;
};

#define HOLD_MASK (PB_HEAPMAP_HOLD_MAX - 1)
#if PB_HEAPMAP_HOLD_MAX & HOLD_MASK
#error "PB_HEAPMAP_HOLD_MAX must be a power of two"
#endif

/* Holds ptr back if the limits allow, evicting the oldest blocks (at most
 * EVICT_MAX; they are freed by the caller).  1 if ptr was taken. */
static COLD int quarantine_put(struct quarantine *q, void *ptr, size_t size, struct evicted *ev)
{
    size_t max_blocks = atomic_load_explicit(&q_max_blocks, memory_order_relaxed);
    size_t max_bytes = atomic_load_explicit(&q_max_bytes, memory_order_relaxed);
    while (q->count > 0 && ev->n < EVICT_MAX && (q->count >= max_blocks || q->bytes + size > max_bytes)) {
        ev->b[ev->n++] = q->q[q->head];
        q->bytes -= q->q[q->head].size;
        q->head = (q->head + 1) & HOLD_MASK;
        q->count--;
    }
    if (q->count >= max_blocks || q->bytes + size > max_bytes)
        return 0;
    q->q[(q->head + q->count) & HOLD_MASK] = (struct held_block){ptr, size};
    q->count++;
    q->bytes += size;
    return 1;
}

/* The steady state, inline: the hold is full, so the oldest block goes and
 * ptr comes in.  Anything else goes to quarantine_put. */
static HOT int quarantine_swap(struct quarantine *q, void *ptr, size_t size, size_t max_blocks,
                               struct evicted *ev)
{
    if (LIKELY(q->count == max_blocks && q->count != 0)) {
        struct held_block old = q->q[q->head];
        size_t bytes = q->bytes - old.size + size;
        if (LIKELY(bytes <= atomic_load_explicit(&q_max_bytes, memory_order_relaxed))) {
            q->q[(q->head + q->count) & HOLD_MASK] = (struct held_block){ptr, size};
            q->head = (q->head + 1) & HOLD_MASK;
            q->bytes = bytes;
            ev->b[0] = old;
            ev->n = 1;
            return 1;
        }
    }
    return quarantine_put(q, ptr, size, ev);
}

static size_t quarantine_take_all(struct quarantine *q, struct held_block *out)
{
    size_t n = 0;
    for (; q->count > 0; n++, q->count--) {
        out[n] = q->q[q->head];
        q->head = (q->head + 1) & HOLD_MASK;
    }
    q->head = 0;
    q->bytes = 0;
    return n;
}

/* ---- domains and the PyMem hooks --------------------------------------------- */

struct domain {
    PyMemAllocatorEx orig;  /* the allocator below ours */
    PyMemAllocatorEx hook;  /* ours (ctx = orig.ctx) */
    atomic_uintptr_t expected_top; /* malloc at the top of the chain when last verified */
    int hooked;             /* ours was put in the chain and not taken out */
    atomic_ulong probe_hits;
};

static struct domain domains[PYMEM_DOMAINS];
static const PyMemAllocatorDomain domain_ids[PYMEM_DOMAINS] = {
    PYMEM_DOMAIN_RAW, PYMEM_DOMAIN_MEM, PYMEM_DOMAIN_OBJ};
static atomic_uintptr_t probing_thread; /* pthread_self() of in_chain(), 0 otherwise */

/* numpy's handler (declared below) */
static void np_release(void *ptr, size_t size);

/* The release function of held foreign blocks (pb_heapmap_release_block). */
static _Atomic(void (*)(void *)) foreign_release;

/* Frees a block through the allocator below the hook of `domain`. */
static void release(int domain, void *ptr, size_t size)
{
    if (domain == PB_HEAPMAP_NUMPY)
        np_release(ptr, size);
    else if (domain == PB_HEAPMAP_CFFI)
        atomic_load(&foreign_release)(ptr);
    else
        domains[domain].orig.free(domains[domain].orig.ctx, ptr);
}

static void release_evicted(int domain, const struct evicted *ev)
{
    for (int i = 0; i < ev->n; i++)
        release(domain, ev->b[i].ptr, ev->b[i].size);
}

#if PY_VERSION_HEX >= 0x030C0000
static PyInterpreterState *main_interp;
#endif

/* May this mem/obj call take the lock-free path?  It needs the one GIL:
 * blocks of subinterpreters with their own GIL (3.12+) are not recorded. */
static inline int on_gil_path(void)
{
#if !GIL_PATH
    return 0;
#elif PY_VERSION_HEX >= 0x030D0000
    PyThreadState *ts = PyThreadState_GetUnchecked();
    return ts != NULL && ts->interp == main_interp;
#elif PY_VERSION_HEX >= 0x030C0000
    PyThreadState *ts = _PyThreadState_UncheckedGet();
    return ts != NULL && ts->interp == main_interp;
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

/* ---- recording (both paths) --------------------------------------------------- */

/* A cell in use where a new block starts: its block was freed unseen (or it is
 * the same block, recorded by an inner domain).  Lock held. */
static int lock_cell_occupied(cell_t *cell, uintptr_t start, size_t size, int domain)
{
    uint16_t v = cell_load(cell);
    if (v == 0)
        return 0;
    if (v == CELL_LARGE) {
        size_t i = table_find(&blocks, start);
        if (i != SIZE_MAX)
            table_block_remove(i);
        return 0;
    }
    if (cell_size(v) == (size ? size : 1) && !is_gil_domain(domain) && !is_gil_domain(cell_domain(v))) {
        cell_store(cell, cell_value(size, domain)); /* the same block, seen by an outer domain */
        return 1;
    }
    drop_stale_cell(cell, v);
    return 0;
}

/* The locked path's record.  Lock taken here. */
static COLD void lock_record(uintptr_t p, size_t size, int domain)
{
    lock();
    if (LIKELY(atomic_load_explicit(&recording, memory_order_relaxed))) {
        cell_t *cell = NULL;
        if (size <= SMALL_MAX && (p & (GRANULE - 1)) == 0)
            cell = shadow_cell(p, 1);
        if (cell != NULL) {
            if (!lock_cell_occupied(cell, p, size, domain)) {
                cell_store(cell, cell_value(size, domain));
                bump(&lock_counters.live_blocks, 1);
                bump(&lock_counters.live_bytes, size ? size : 1);
                bump(&lock_counters.allocations, 1);
                bounds_extend(&shadow_bounds, p, p + (size ? size : 1));
            }
        } else {
            table_block_insert(p, size, domain);
        }
    }
    unlock();
}

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
    bump(&gil_counters.live_blocks, 1);
    bump(&gil_counters.live_bytes, size);
    bump(&gil_counters.allocations, 1);
    if (UNLIKELY(p < atomic_load_explicit(&shadow_bounds.lo, memory_order_relaxed) ||
                 p + size > atomic_load_explicit(&shadow_bounds.hi, memory_order_relaxed)))
        bounds_extend(&shadow_bounds, p, p + size);
    return 1;
}

static HOT void record(int domain, void *ptr, size_t size)
{
    if (is_gil_domain(domain) && on_gil_path() && LIKELY(gil_record((uintptr_t)ptr, size, domain)))
        return;
    lock_record((uintptr_t)ptr, size, domain);
}

/* Where a forgotten block was: which path's ring gets it. */
enum { NOT_FOUND = 0, ON_GIL_PATH = 1, ON_LOCK_PATH = 2 };

struct forgotten {
    int path;
    uint16_t cell; /* GIL path: the cell value */
    uint64_t val;  /* size | domain << 61 */
};

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
        return atomic_load_explicit(&shadow_failed, memory_order_relaxed) ? ON_LOCK_PATH : NOT_FOUND;
    if (v == CELL_LARGE || !is_gil_domain(cell_domain(v)))
        return ON_LOCK_PATH;
    cell_store(cell, 0);
    bump(&gil_counters.live_blocks, (uint64_t)-1);
    bump(&gil_counters.live_bytes, -(uint64_t)cell_size(v));
    bump(&gil_counters.frees, 1);
    f->path = ON_GIL_PATH;
    f->cell = v;
    f->val = (uint64_t)cell_size(v) | ((uint64_t)cell_domain(v) << SIZE_SHIFT);
    return ON_GIL_PATH;
}

/* The locked path's forget.  Lock held.  A GIL-path block is left alone
 * unless `gil` (the caller holds the GIL). */
static int lock_forget(uintptr_t p, int gil, struct forgotten *f)
{
    cell_t *cell = (p & (GRANULE - 1)) == 0 ? shadow_cell(p, 0) : NULL;
    uint16_t v = cell != NULL ? cell_load(cell) : 0;
    if (v != 0 && v != CELL_LARGE) {
        if (is_gil_domain(cell_domain(v)) && !gil)
            return NOT_FOUND; /* freed through the wrong domain: not ours to touch */
        struct counters *c = is_gil_domain(cell_domain(v)) ? &gil_counters : &lock_counters;
        cell_store(cell, 0);
        bump(&c->live_blocks, (uint64_t)-1);
        bump(&c->live_bytes, -(uint64_t)cell_size(v));
        bump(&c->frees, 1);
        f->path = ON_LOCK_PATH;
        f->cell = v;
        f->val = (uint64_t)cell_size(v) | ((uint64_t)cell_domain(v) << SIZE_SHIFT);
        return ON_LOCK_PATH;
    }
    if (v == 0 && cell != NULL && !atomic_load_explicit(&shadow_failed, memory_order_relaxed))
        return NOT_FOUND;
    size_t i = table_find(&blocks, p);
    if (i == SIZE_MAX)
        return NOT_FOUND;
    f->path = ON_LOCK_PATH;
    f->val = table_block_remove(i);
    f->cell = CELL_LARGE;
    bump(&lock_counters.frees, 1);
    return ON_LOCK_PATH;
}

/* ---- the hooks ----------------------------------------------------------------- */

static inline uintptr_t self_id(void)
{
    return (uintptr_t)pthread_self();
}

/* An allocation of PROBE_SIZE by in_chain(): counted, not recorded. */
static inline int is_probe(int domain)
{
    if (atomic_load_explicit(&probing_thread, memory_order_relaxed) != self_id())
        return 0;
    atomic_fetch_add_explicit(&domains[domain].probe_hits, 1, memory_order_relaxed);
    return 1;
}

/* The free path when the GIL path does not settle it: forgets ptr under the
 * lock and holds it in quarantine if configured.  Returns 1 if the caller
 * must not free ptr now; ev gets blocks to free now. */
static COLD int forget_for_free_locked(int domain, void *ptr, size_t release_size, struct evicted *ev)
{
    uintptr_t p = (uintptr_t)ptr;
    struct forgotten f = {NOT_FOUND, 0, 0};
    int hold = 0;
    if (!is_gil_domain(domain) && (p & (GRANULE - 1)) == 0 &&
        !atomic_load_explicit(&shadow_failed, memory_order_relaxed)) {
        /* Lock-free exit for blocks that are certainly not recorded. */
        cell_t *cell = shadow_cell(p, 0);
        if (cell != NULL && cell_load(cell) == 0)
            return 0;
    }
    lock();
    if (LIKELY(atomic_load_explicit(&recording, memory_order_relaxed)) &&
        lock_forget(p, is_gil_domain(domain) || domain == PB_HEAPMAP_NUMPY, &f) != NOT_FOUND) {
        lock_ring_append(p, f.val);
        if (atomic_load_explicit(&q_max_blocks, memory_order_relaxed) != 0)
            hold = quarantine_put(&lock_held[domain], ptr,
                                  domain == PB_HEAPMAP_NUMPY ? release_size : (size_t)(f.val & SIZE_MASK), ev);
    }
    unlock();
    return hold;
}

/* Forgets ptr for a free (see forget_for_free_locked).  The GIL path inline. */
static HOT int forget_for_free(int domain, void *ptr, size_t release_size, struct evicted *ev)
{
    ev->n = 0;
    if (is_gil_domain(domain) && on_gil_path()) {
        struct forgotten f;
        int where = gil_forget((uintptr_t)ptr, &f);
        if (where == ON_GIL_PATH) {
            gil_ring_append((uintptr_t)ptr, f.cell);
            size_t max_blocks = atomic_load_explicit(&q_max_blocks, memory_order_relaxed);
            if (max_blocks == 0)
                return 0;
            return quarantine_swap(&gil_held[domain], ptr, cell_size(f.cell), max_blocks, ev);
        }
        if (where == NOT_FOUND)
            return 0;
    }
    return forget_for_free_locked(domain, ptr, release_size, ev);
}

/* realloc, before calling the allocator: forget the old block (once the
 * allocator has it back, another thread may be handed its address). */
static struct forgotten realloc_before(int domain, void *ptr)
{
    struct forgotten f = {NOT_FOUND, 0, 0};
    if (ptr == NULL)
        return f;
    if (is_gil_domain(domain) && on_gil_path()) {
        int where = gil_forget((uintptr_t)ptr, &f);
        if (where != ON_LOCK_PATH)
            return f;
    }
    lock();
    if (atomic_load_explicit(&recording, memory_order_relaxed))
        lock_forget((uintptr_t)ptr, is_gil_domain(domain) || domain == PB_HEAPMAP_NUMPY, &f);
    unlock();
    return f;
}

/* realloc, after: record the result.  q == NULL: the old block is still valid. */
static void realloc_after(int domain, void *ptr, const struct forgotten *old, void *q, size_t size)
{
    if (q == NULL) {
        if (old->path != NOT_FOUND)
            record((int)(old->val >> SIZE_SHIFT), ptr, (size_t)(old->val & SIZE_MASK));
        return;
    }
    if (q != ptr && old->path == ON_GIL_PATH) {
        gil_ring_append((uintptr_t)ptr, old->cell);
    } else if (q != ptr && old->path == ON_LOCK_PATH) {
        lock();
        if (atomic_load_explicit(&recording, memory_order_relaxed))
            lock_ring_append((uintptr_t)ptr, old->val);
        unlock();
    }
    record(domain, q, size);
}

static HOT void *hook_malloc(int domain, size_t size)
{
    struct domain *d = &domains[domain];
    void *p = d->orig.malloc(d->orig.ctx, size);
    if (UNLIKELY(size == PROBE_SIZE) && is_probe(domain))
        return p;
    if (p != NULL && atomic_load_explicit(&recording, memory_order_relaxed) && records_domain(domain))
        record(domain, p, size);
    return p;
}

static inline void *hook_calloc(int domain, size_t n, size_t elsize)
{
    struct domain *d = &domains[domain];
    void *p = d->orig.calloc(d->orig.ctx, n, elsize);
    if (p != NULL && atomic_load_explicit(&recording, memory_order_relaxed) && records_domain(domain))
        record(domain, p, n * elsize); /* no overflow: the allocator checked */
    return p;
}

static inline void *hook_realloc(int domain, void *ptr, size_t size)
{
    struct domain *d = &domains[domain];
    if (!atomic_load_explicit(&recording, memory_order_relaxed) || !records_domain(domain))
        return d->orig.realloc(d->orig.ctx, ptr, size);
    struct forgotten old = realloc_before(domain, ptr);
    void *q = d->orig.realloc(d->orig.ctx, ptr, size);
    realloc_after(domain, ptr, &old, q, size);
    return q;
}

static HOT void hook_free(int domain, void *ptr)
{
    struct domain *d = &domains[domain];
    if (ptr == NULL || !atomic_load_explicit(&recording, memory_order_relaxed) || !records_domain(domain)) {
        d->orig.free(d->orig.ctx, ptr);
        return;
    }
    struct evicted ev;
    int hold = forget_for_free(domain, ptr, 0, &ev);
    if (hold) {
        if (LIKELY(ev.n == 1))
            d->orig.free(d->orig.ctx, ev.b[0].ptr);
        else
            release_evicted(domain, &ev);
        return;
    }
    if (UNLIKELY(ev.n != 0))
        release_evicted(domain, &ev);
    d->orig.free(d->orig.ctx, ptr);
}

/* One set of functions per domain, so that no hook depends on its ctx. */
#define DEFINE_HOOKS(NAME, DOMAIN)                                           \
    static void *NAME##_malloc(void *ctx, size_t size)                       \
    {                                                                        \
        (void)ctx;                                                           \
        return hook_malloc(DOMAIN, size);                                    \
    }                                                                        \
    static void *NAME##_calloc(void *ctx, size_t n, size_t elsize)           \
    {                                                                        \
        (void)ctx;                                                           \
        return hook_calloc(DOMAIN, n, elsize);                               \
    }                                                                        \
    static void *NAME##_realloc(void *ctx, void *ptr, size_t size)           \
    {                                                                        \
        (void)ctx;                                                           \
        return hook_realloc(DOMAIN, ptr, size);                              \
    }                                                                        \
    static void NAME##_free(void *ctx, void *ptr)                            \
    {                                                                        \
        (void)ctx;                                                           \
        hook_free(DOMAIN, ptr);                                              \
    }

DEFINE_HOOKS(raw, PB_HEAPMAP_RAW)
DEFINE_HOOKS(mem, PB_HEAPMAP_MEM)
DEFINE_HOOKS(obj, PB_HEAPMAP_OBJ)

static void set_hook_functions(void)
{
    domains[PB_HEAPMAP_RAW].hook = (PyMemAllocatorEx){NULL, raw_malloc, raw_calloc, raw_realloc, raw_free};
    domains[PB_HEAPMAP_MEM].hook = (PyMemAllocatorEx){NULL, mem_malloc, mem_calloc, mem_realloc, mem_free};
    domains[PB_HEAPMAP_OBJ].hook = (PyMemAllocatorEx){NULL, obj_malloc, obj_calloc, obj_realloc, obj_free};
}

/* ---- numpy (NEP 49) --------------------------------------------------------------- */

/* numpy's PyDataMemAllocator / PyDataMem_Handler (version 1), declared here
 * so that building ptrbridge does not need numpy's headers. */
struct np_allocator {
    void *ctx;
    void *(*malloc)(void *ctx, size_t size);
    void *(*calloc)(void *ctx, size_t nelem, size_t elsize);
    void *(*realloc)(void *ctx, void *ptr, size_t new_size);
    void (*free)(void *ctx, void *ptr, size_t size);
};

struct np_handler {
    char name[127];
    uint8_t version;
    struct np_allocator allocator;
};

#define NP_FEATURE_1_22 0x0000000fu /* NEP 49 handlers appeared in numpy 1.22 */
#define NP_SLOT_FEATURE_VERSION 211 /* PyArray_GetNDArrayCFeatureVersion */
#define NP_SLOT_DEFAULT_HANDLER 306 /* &PyDataMem_DefaultHandler */

static struct np_handler np_ours;
static const struct np_handler *np_orig; /* numpy's default handler (static storage in numpy) */
static PyObject *np_capsule;             /* numpy's default-handler capsule, while hooked */

static void np_release(void *ptr, size_t size)
{
    np_orig->allocator.free(np_orig->allocator.ctx, ptr, size);
}

static void *np_malloc(void *ctx, size_t size)
{
    (void)ctx;
    void *p = np_orig->allocator.malloc(np_orig->allocator.ctx, size);
    if (p != NULL && atomic_load_explicit(&recording, memory_order_relaxed))
        lock_record((uintptr_t)p, size, PB_HEAPMAP_NUMPY);
    return p;
}

static void *np_calloc(void *ctx, size_t n, size_t elsize)
{
    (void)ctx;
    void *p = np_orig->allocator.calloc(np_orig->allocator.ctx, n, elsize);
    if (p != NULL && atomic_load_explicit(&recording, memory_order_relaxed))
        lock_record((uintptr_t)p, n * elsize, PB_HEAPMAP_NUMPY);
    return p;
}

static void *np_realloc(void *ctx, void *ptr, size_t size)
{
    (void)ctx;
    if (!atomic_load_explicit(&recording, memory_order_relaxed))
        return np_orig->allocator.realloc(np_orig->allocator.ctx, ptr, size);
    struct forgotten old = realloc_before(PB_HEAPMAP_NUMPY, ptr);
    void *q = np_orig->allocator.realloc(np_orig->allocator.ctx, ptr, size);
    realloc_after(PB_HEAPMAP_NUMPY, ptr, &old, q, size);
    return q;
}

static void np_free(void *ctx, void *ptr, size_t size)
{
    (void)ctx;
    if (ptr == NULL || !atomic_load_explicit(&recording, memory_order_relaxed)) {
        np_release(ptr, size);
        return;
    }
    struct evicted ev;
    int hold = forget_for_free(PB_HEAPMAP_NUMPY, ptr, size, &ev);
    release_evicted(PB_HEAPMAP_NUMPY, &ev);
    if (!hold)
        np_release(ptr, size);
}

/* GIL held.  1 hooked (now or before), 0 numpy's core not imported, -1 unsupported. */
static int numpy_attach_gil(void)
{
    if (np_capsule != NULL && PyCapsule_GetPointer(np_capsule, "mem_handler") == (void *)&np_ours)
        return 1;
    PyErr_Clear();
    PyObject *modules = PyImport_GetModuleDict(); /* borrowed */
    PyObject *core = PyDict_GetItemString(modules, "numpy._core._multiarray_umath");
    if (core == NULL)
        core = PyDict_GetItemString(modules, "numpy.core._multiarray_umath");
    if (core == NULL)
        return 0;
    /* The module is in sys.modules while it is still being initialised (and
     * imports other modules): until its C-API table and default handler
     * exist, the answer is "not yet" (0). */
    int rc = 0;
    PyObject *api_capsule = PyObject_GetAttrString(core, "_ARRAY_API");
    if (api_capsule == NULL || !PyCapsule_CheckExact(api_capsule))
        goto out;
    void **api = PyCapsule_GetPointer(api_capsule, NULL);
    if (api == NULL)
        goto out;
    unsigned int (*feature_version)(void);
    memcpy(&feature_version, &api[NP_SLOT_FEATURE_VERSION], sizeof feature_version);
    rc = -1;
    if (feature_version() < NP_FEATURE_1_22)
        goto out;
    PyObject *capsule = *(PyObject **)api[NP_SLOT_DEFAULT_HANDLER];
    rc = 0;
    if (capsule == NULL || !PyCapsule_IsValid(capsule, "mem_handler"))
        goto out;
    rc = -1;
    const struct np_handler *orig = PyCapsule_GetPointer(capsule, "mem_handler");
    if (orig == &np_ours) {
        rc = 1;
        goto out;
    }
    /* np_orig is set once: arrays allocated through ours free through it
     * for as long as they live, hooked or not. */
    if (orig == NULL || orig->version != 1 || (np_orig != NULL && np_orig != orig))
        goto out;
    np_orig = orig;
    memcpy(np_ours.name, orig->name, sizeof np_ours.name); /* transparent: numpy's name */
    np_ours.version = 1;
    np_ours.allocator = (struct np_allocator){NULL, np_malloc, np_calloc, np_realloc, np_free};
    if (PyCapsule_SetPointer(capsule, &np_ours) != 0)
        goto out;
    Py_INCREF(capsule);
    Py_XSETREF(np_capsule, capsule);
    rc = 1;
out:
    Py_XDECREF(api_capsule);
    PyErr_Clear();
    return rc;
}

/* GIL held.  Points numpy's default capsule back at numpy's handler. */
static void numpy_detach_gil(void)
{
    if (np_capsule == NULL)
        return;
    if (PyCapsule_GetPointer(np_capsule, "mem_handler") == (void *)&np_ours)
        PyCapsule_SetPointer(np_capsule, (void *)np_orig);
    /* else someone wrapped ours: it stays, passing every call through */
    PyErr_Clear();
    Py_CLEAR(np_capsule);
}

/* ---- install / uninstall / verify ------------------------------------------------- */

static void *probe_alloc(int domain)
{
    switch (domain) {
    case PB_HEAPMAP_RAW:
        return PyMem_RawMalloc(PROBE_SIZE);
    case PB_HEAPMAP_MEM:
        return PyMem_Malloc(PROBE_SIZE);
    default:
        return PyObject_Malloc(PROBE_SIZE);
    }
}

static void probe_free(int domain, void *p)
{
    switch (domain) {
    case PB_HEAPMAP_RAW:
        PyMem_RawFree(p);
        break;
    case PB_HEAPMAP_MEM:
        PyMem_Free(p);
        break;
    default:
        PyObject_Free(p);
        break;
    }
}

/* GIL held.  Does an allocation in this domain reach our hook? */
static int in_chain_gil(int domain)
{
    PyMemAllocatorEx cur;
    PyMem_GetAllocator(domain_ids[domain], &cur);
    if (cur.malloc == domains[domain].hook.malloc)
        return 1;
    unsigned long before = atomic_load(&domains[domain].probe_hits);
    atomic_store(&probing_thread, self_id());
    void *p = probe_alloc(domain);
    atomic_store(&probing_thread, (uintptr_t)0);
    unsigned long after = atomic_load(&domains[domain].probe_hits);
    if (p != NULL)
        probe_free(domain, p);
    return after != before;
}

/* GIL held.  Puts our hook on top of the domain's chain. */
static void hook_domain_gil(int domain)
{
    struct domain *d = &domains[domain];
    PyMemAllocatorEx cur;
    PyMem_GetAllocator(domain_ids[domain], &cur);
    /* orig is rewritten only when it changes, so that a raw call still
     * running through an old hook reads stable values. */
    if (memcmp(&cur, &d->orig, sizeof cur) != 0)
        d->orig = cur;
    d->hook.ctx = cur.ctx;
    PyMem_SetAllocator(domain_ids[domain], &d->hook);
    d->hooked = 1;
    atomic_store(&d->expected_top, (uintptr_t)d->hook.malloc);
}

/* Forgets every block and freed block.  GIL and lock held. */
static void clear_all_locked(void)
{
    shadow_clear();
    table_clear(&blocks);
    table_clear(&chunks);
    bitmap_rebuild();
    freed_clear();
    atomic_store(&gil_ring_claim, 0);
    atomic_store(&gil_ring_done, 0);
    lock_ring_seq = gil_taken = lock_taken = 0;
    atomic_store(&gil_counters.live_blocks, 0);
    atomic_store(&gil_counters.live_bytes, 0);
    atomic_store(&lock_counters.live_blocks, 0);
    atomic_store(&lock_counters.live_bytes, 0);
    atomic_store(&shadow_failed, 0);
}

static struct held_block drain[2 * PB_HEAPMAP_HOLD_MAX];

/* Gives every quarantined block back to its allocator.  GIL held (mem, obj
 * and numpy frees need it). */
static void release_quarantine_gil(void)
{
    for (int domain = 0; domain < DOMAINS; domain++) {
        size_t n = quarantine_take_all(&gil_held[domain], drain);
        lock();
        n += quarantine_take_all(&lock_held[domain], drain + n);
        unlock();
        for (size_t i = 0; i < n; i++)
            release(domain, drain[i].ptr, drain[i].size);
    }
}

int pb__heapmap_install(void)
{
    static int atfork_registered;
    PyGILState_STATE gil = PyGILState_Ensure();
    int rc = 1;
    if (!atomic_load(&recording)) {
        if (!atfork_registered)
            atfork_registered = pthread_atfork(fork_prepare, fork_parent, fork_child) == 0;
#if PY_VERSION_HEX >= 0x030C0000
        main_interp = PyInterpreterState_Main();
#endif
        set_hook_functions();
        lock();
        clear_all_locked();
        atomic_store(&recording, 1);
        unlock();
        for (int domain = 0; domain < PYMEM_DOMAINS; domain++) {
            struct domain *d = &domains[domain];
            /* Ours may still be in the chain below another hook (uninstall
             * returned 2): reuse it rather than hook twice. */
            if (d->hooked && in_chain_gil(domain)) {
                PyMemAllocatorEx cur;
                PyMem_GetAllocator(domain_ids[domain], &cur);
                atomic_store(&d->expected_top, (uintptr_t)cur.malloc);
            } else {
                hook_domain_gil(domain);
            }
        }
        numpy_attach_gil();
        rc = 0;
    }
    PyGILState_Release(gil);
    return rc;
}

int pb__heapmap_uninstall(void)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    int rc = 1;
    if (atomic_load(&recording)) {
        lock();
        atomic_store(&recording, 0);
        unlock();
        release_quarantine_gil();
        numpy_detach_gil();
        lock();
        clear_all_locked();
        unlock();
        rc = 0;
        for (int domain = 0; domain < PYMEM_DOMAINS; domain++) {
            struct domain *d = &domains[domain];
            if (!d->hooked)
                continue;
            PyMemAllocatorEx cur;
            PyMem_GetAllocator(domain_ids[domain], &cur);
            if (cur.malloc == d->hook.malloc) {
                PyMem_SetAllocator(domain_ids[domain], &d->orig);
                d->hooked = 0;
            } else if (in_chain_gil(domain)) {
                rc = 2; /* another hook on top: ours stays, passing through */
            } else {
                d->hooked = 0; /* someone already took ours out */
            }
        }
    }
    PyGILState_Release(gil);
    return rc;
}

int pb_heapmap_verify(void)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    int rc = 0;
    for (int domain = 0; domain < PYMEM_DOMAINS && atomic_load(&recording); domain++) {
        struct domain *d = &domains[domain];
        PyMemAllocatorEx cur;
        PyMem_GetAllocator(domain_ids[domain], &cur);
        if ((uintptr_t)cur.malloc == atomic_load(&d->expected_top))
            continue;
        if (in_chain_gil(domain)) {
            atomic_store(&d->expected_top, (uintptr_t)cur.malloc);
            continue;
        }
        /* Cut out of the chain: frees went unseen, so the index is stale. */
        release_quarantine_gil();
        lock();
        clear_all_locked();
        unlock();
        hook_domain_gil(domain);
        rc = 1;
    }
    PyGILState_Release(gil);
    return rc;
}

int pb__heapmap_verify(void)
{
    return pb_heapmap_verify();
}

int pb__heapmap_numpy_attach(void)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    int rc = atomic_load(&recording) ? numpy_attach_gil() : 0;
    PyGILState_Release(gil);
    return rc;
}

/* 1 if the top of every chain is what it was when last verified.  No GIL. */
static int chain_unchanged(void)
{
    for (int domain = 0; domain < PYMEM_DOMAINS; domain++) {
        PyMemAllocatorEx cur;
        PyMem_GetAllocator(domain_ids[domain], &cur);
        if ((uintptr_t)cur.malloc != atomic_load_explicit(&domains[domain].expected_top, memory_order_relaxed))
            return 0;
    }
    return 1;
}

/* ---- lookups ----------------------------------------------------------------------- */

/* The live block containing addr.  Lock-free for blocks in the shadow map;
 * the table part takes the lock (or, with `locked`, expects it held). */
static int find_block(uintptr_t addr, int locked, uintptr_t *start, uint64_t *val)
{
    if (bounds_contain(&shadow_bounds, addr)) {
        /* The nearest cell in use at or below addr, up to SMALL_MAX bytes down:
         * live blocks do not overlap, so that block decides. */
        uintptr_t g = addr & ~(GRANULE - 1);
        for (uintptr_t k = 0; k <= SMALL_MAX && k <= g; k += GRANULE) {
            cell_t *cell = shadow_cell(g - k, 0);
            uint16_t v = cell != NULL ? cell_load(cell) : 0;
            if (v == 0)
                continue;
            if (v == CELL_LARGE)
                break; /* a table block starts there */
            if (addr - (g - k) < cell_size(v)) {
                *start = g - k;
                *val = (uint64_t)cell_size(v) | ((uint64_t)cell_domain(v) << SIZE_SHIFT);
                return 1;
            }
            break; /* an unaligned table block might still start in between */
        }
    }
    if (!table_may_contain(addr))
        return 0;
    if (!locked)
        lock();
    int found = table_block_find(addr, start, val);
    if (!locked)
        unlock();
    return found;
}

int pb_heapmap_find(uintptr_t addr, uintptr_t *start, size_t *size)
{
    uintptr_t s = 0;
    uint64_t v = 0;
    atomic_fetch_add_explicit(&lookups, 1, memory_order_relaxed);
    if (!find_block(addr, 0, &s, &v))
        return 0;
    if (start != NULL)
        *start = s;
    if (size != NULL)
        *size = (size_t)(v & SIZE_MASK);
    return 1;
}

struct pb_heapmap_block pb__heapmap_lookup(uintptr_t addr)
{
    struct pb_heapmap_block out = {0, 0, 0, 0};
    uintptr_t s = 0;
    uint64_t v = 0;
    atomic_fetch_add_explicit(&lookups, 1, memory_order_relaxed);
    if (find_block(addr, 0, &s, &v)) {
        out.start = s;
        out.size = v & SIZE_MASK;
        out.domain = (int)(v >> SIZE_SHIFT);
        out.status = chain_unchanged() ? 1 : 2;
    }
    return out;
}

struct pb_heapmap_block pb__heapmap_find_freed(uintptr_t addr)
{
    struct pb_heapmap_block out = {0, 0, 0, 0};
    uintptr_t s = 0;
    uint64_t v = 0;
    atomic_fetch_add_explicit(&lookups, 1, memory_order_relaxed);
    lock();
    if (!find_block(addr, 1, &s, &v)) {
        freed_index_update();
        /* The most recent freed block containing addr: small ones by their
         * start (up to SMALL_MAX below), larger ones through their chunks.
         * Each path's ring has its own sequence numbers, so between a block
         * freed on the GIL path and one freed on the locked path (pymalloc
         * arena memory reused by malloc) "most recent" is approximate. */
        uint64_t best = 0;
        uintptr_t g = addr & ~(GRANULE - 1), bs = 0;
        uint64_t bv = 0;
        for (uintptr_t k = 0; freed_starts.count != 0 && k <= SMALL_MAX && k <= g; k += GRANULE) {
            size_t i = table_find(&freed_starts, g - k);
            uint64_t tag = i == SIZE_MAX ? 0 : freed_starts.slots[i].val;
            if ((tag >> 1) > (best >> 1) && freed_tag_contains(tag, addr, &s, &v)) {
                best = tag;
                bs = s;
                bv = v;
            }
        }
        uintptr_t key = (addr >> CHUNK_SHIFT) + 1;
        for (size_t j = freed_chunks.count ? slot_of(&freed_chunks, key) : 0;
             freed_chunks.count != 0 && freed_chunks.slots[j].key != 0; j = (j + 1) & freed_chunks.mask) {
            uint64_t tag = freed_chunks.slots[j].val;
            if (freed_chunks.slots[j].key == key && (tag >> 1) > (best >> 1) &&
                freed_tag_contains(tag, addr, &s, &v)) {
                best = tag;
                bs = s;
                bv = v;
            }
        }
        if (best != 0) {
            out.start = bs;
            out.size = bv & SIZE_MASK;
            out.domain = (int)(bv >> SIZE_SHIFT);
            out.status = 1;
        }
    }
    unlock();
    return out;
}

/* ---- the scanner's view of freed blocks ------------------------------------------- */

/* Next freed block not yet taken (GIL ring first, then the locked ring).
 * Lock held.  0 when there is none. */
static int take_next(uintptr_t *start, uint64_t *val)
{
    uint64_t done = atomic_load_explicit(&gil_ring_done, memory_order_acquire);
    while (gil_taken < done) {
        uint64_t seq = gil_taken++;
        if (seq < oldest_of(atomic_load_explicit(&gil_ring_claim, memory_order_relaxed))) {
            freed_dropped += oldest_of(atomic_load(&gil_ring_claim)) - seq;
            gil_taken = oldest_of(atomic_load(&gil_ring_claim));
            continue;
        }
        if (gil_ring_read(seq, start, val))
            return 1;
        freed_dropped++;
    }
    if (lock_taken < oldest_of(lock_ring_seq)) {
        freed_dropped += oldest_of(lock_ring_seq) - lock_taken;
        lock_taken = oldest_of(lock_ring_seq);
    }
    if (lock_taken < lock_ring_seq) {
        *start = lock_ring[lock_taken & RING_MASK].start;
        *val = lock_ring[lock_taken & RING_MASK].val;
        lock_taken++;
        return 1;
    }
    return 0;
}

size_t pb__heapmap_take_freed(uintptr_t *starts, size_t *sizes, size_t cap, uint64_t *dropped)
{
    size_t n = 0;
    uintptr_t s;
    uint64_t v;
    lock();
    for (; n < cap && take_next(&s, &v); n++) {
        starts[n] = s;
        sizes[n] = (size_t)(v & SIZE_MASK);
    }
    if (dropped != NULL)
        *dropped = freed_dropped;
    unlock();
    return n;
}

size_t pb__heapmap_retire_freed(uint64_t first_id, uintptr_t *starts, size_t *sizes, size_t cap)
{
    /* Filter under the heap-map lock, queue outside it: the scanner takes its
     * own lock, and may look addresses up here while holding it. */
    size_t n = 0;
    uintptr_t s, ls;
    uint64_t v, lv;
    lock();
    while (n < cap && take_next(&s, &v)) {
        if (find_block(s, 1, &ls, &lv))
            continue; /* reused: the memory is live again */
        starts[n] = s;
        sizes[n] = (size_t)(v & SIZE_MASK);
        n++;
    }
    unlock();
    for (size_t i = 0; i < n; i++)
        if (pb__scan_retire(starts[i], sizes[i], first_id + i) != PB_OK)
            return i;
    return n;
}

/* ---- foreign blocks (pb_heapmap_record_block, for the interposer) ------------------- */

static inline int is_foreign_domain(int domain)
{
    return domain == PB_HEAPMAP_CFFI;
}

void pb_heapmap_record_block(void *ptr, size_t size, int domain)
{
    if (ptr == NULL || !is_foreign_domain(domain) || !atomic_load_explicit(&recording, memory_order_relaxed) ||
        lock_held_here())
        return;
    lock_record((uintptr_t)ptr, size, domain); /* re-checks `recording` under the lock */
}

/* Forgets the foreign block that starts at p.  Lock held.  CPython's and
 * numpy's blocks are left alone: only their hooks forget them. */
static int foreign_forget_locked(uintptr_t p, struct forgotten *f)
{
    cell_t *cell = (p & (GRANULE - 1)) == 0 ? shadow_cell(p, 0) : NULL;
    uint16_t v = cell != NULL ? cell_load(cell) : 0;
    if (v != 0 && v != CELL_LARGE) {
        if (!is_foreign_domain(cell_domain(v)))
            return NOT_FOUND;
    } else {
        size_t i = table_find(&blocks, p);
        if (i == SIZE_MAX || !is_foreign_domain((int)(blocks.slots[i].val >> SIZE_SHIFT)))
            return NOT_FOUND;
    }
    return lock_forget(p, 0, f);
}

/* Forgets ptr and, with rel, holds it back.  1 if held; ev gets blocks the
 * caller must release now. */
static int foreign_free(void *ptr, void (*rel)(void *), struct evicted *ev)
{
    ev->n = 0;
    if (ptr == NULL || !atomic_load_explicit(&recording, memory_order_relaxed) || lock_held_here())
        return 0;
    uintptr_t p = (uintptr_t)ptr;
    struct forgotten f = {NOT_FOUND, 0, 0};
    int hold = 0;
    lock();
    if (atomic_load_explicit(&recording, memory_order_relaxed) && foreign_forget_locked(p, &f) != NOT_FOUND) {
        lock_ring_append(p, f.val);
        if (rel != NULL && atomic_load_explicit(&q_max_blocks, memory_order_relaxed) != 0) {
            void (*cur)(void *) = NULL;
            if (atomic_compare_exchange_strong(&foreign_release, &cur, rel) || cur == rel)
                hold = quarantine_put(&lock_held[PB_HEAPMAP_CFFI], ptr, (size_t)(f.val & SIZE_MASK), ev);
        }
    }
    unlock();
    return hold;
}

void pb_heapmap_forget_block(void *ptr)
{
    struct evicted ev;
    foreign_free(ptr, NULL, &ev);
}

int pb_heapmap_release_block(void *ptr, void (*release_fn)(void *ptr))
{
    struct evicted ev;
    int hold = foreign_free(ptr, release_fn, &ev);
    release_evicted(PB_HEAPMAP_CFFI, &ev);
    return hold;
}

/* ---- configuration and counters ---------------------------------------------------- */

int pb__heapmap_installed(void)
{
    return atomic_load_explicit(&recording, memory_order_relaxed);
}

int pb__heapmap_set_hold(size_t max_blocks, size_t max_bytes)
{
    if (max_blocks > PB_HEAPMAP_HOLD_MAX)
        return PB_ERR_INVALID;
    if (max_blocks == 0 || max_bytes == 0)
        max_blocks = max_bytes = 0;
    atomic_store(&q_max_bytes, max_bytes);
    atomic_store(&q_max_blocks, max_blocks);
    return PB_OK;
}

void pb__heapmap_get_stats(struct pb_heapmap_stats *out)
{
    memset(out, 0, sizeof *out);
    lock();
    struct counters *cs[2] = {&gil_counters, &lock_counters};
    for (int i = 0; i < 2; i++) {
        out->live_blocks += get(&cs[i]->live_blocks);
        out->live_bytes += get(&cs[i]->live_bytes);
        out->allocations += get(&cs[i]->allocations);
        out->frees += get(&cs[i]->frees);
        out->untracked += get(&cs[i]->untracked);
    }
    uint64_t gdone = atomic_load(&gil_ring_done);
    out->freed_history = (gdone - oldest_of(gdone)) + (lock_ring_seq - oldest_of(lock_ring_seq));
    out->freed_pending = (gdone - (gil_taken > oldest_of(gdone) ? gil_taken : oldest_of(gdone))) +
                         (lock_ring_seq - (lock_taken > oldest_of(lock_ring_seq) ? lock_taken : oldest_of(lock_ring_seq)));
    out->freed_dropped = freed_dropped + (oldest_of(gdone) > gil_taken ? oldest_of(gdone) - gil_taken : 0) +
                         (oldest_of(lock_ring_seq) > lock_taken ? oldest_of(lock_ring_seq) - lock_taken : 0);
    for (int domain = 0; domain < DOMAINS; domain++) {
        out->held_blocks += gil_held[domain].count + lock_held[domain].count;
        out->held_bytes += gil_held[domain].bytes + lock_held[domain].bytes;
    }
    out->index_bytes = table_bytes(&blocks) + table_bytes(&chunks) + table_bytes(&freed_starts) +
                       table_bytes(&freed_chunks) + sizeof gil_ring + sizeof lock_ring;
    out->index_bytes += bitmap_leaves * BITMAP_LEAF_WORDS * sizeof(uint64_t);
    out->shadow_leaves = get(&shadow_leaves);
    out->installed = atomic_load(&recording);
    for (int domain = 0; domain < PYMEM_DOMAINS; domain++)
        out->hooked |= domains[domain].hooked << domain;
    out->numpy = np_capsule != NULL;
    unlock();
    out->lookups = atomic_load_explicit(&lookups, memory_order_relaxed);
}
