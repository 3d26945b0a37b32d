/*
 * heapmap_index.c - the heap map's index of live blocks (see pb_heapmap.h
 * for the interface and pb_heapmap_internal.h for how the files split).
 *
 * Two paths.  The mem and obj domains are only called with the GIL held, and
 * almost all their blocks are small (pymalloc: <= 512 bytes, 16-byte
 * aligned).  Such a block is recorded without any lock or atomic
 * read-modify-write, in a shadow map: one 16-bit cell per 16-byte granule of
 * address space (size and domain; 0 = no block starts here), mapped lazily
 * per GiB with MAP_NORESERVE, so only the cells of memory Python uses are
 * ever touched (1/8 of it).  Everything else - the raw domain, numpy and
 * foreign blocks (callable without the GIL), large or unaligned blocks -
 * takes the locked path: a spinlock, small blocks in the shadow map, larger
 * ones in a hash table keyed by start plus a multimap from each 64 KiB chunk
 * a block touches to its start; a large block's first cell holds a marker so
 * that a free can tell in one read whether the locked path must look.
 *
 * Lookups.  An interior pointer of a small block is found by reading the
 * cells up to 512 bytes below it (one or two cache lines): the nearest block
 * start decides, since live blocks never overlap.  Large blocks are found
 * through the chunk multimap.  Fast rejects come first, without the lock:
 * global bounds of the recorded blocks, the shadow map's per-GiB leaf, and a
 * page-granular bitmap of the table's blocks (recomputed when the table is
 * resized, guarded by a sequence counter).
 *
 * Locking.  The spinlock is never held while calling an allocator or Python;
 * it yields the CPU after spinning a little.  Fork handlers (heapmap_hooks.c)
 * take it around fork() so that the child never inherits it locked.  The
 * index's own memory comes from libc (calloc, mmap), never from the hooked
 * allocators.
 */
#include "pb_heapmap_internal.h"

#include <sched.h>
#include <sys/mman.h>

/* ---- lock ---------------------------------------------------------------- */

atomic_int hm_spin;
atomic_uintptr_t hm_spin_owner;

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __asm__ __volatile__("pause");
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

void hm_lock_slow(void)
{
    for (;;) {
        for (int n = 0; atomic_load_explicit(&hm_spin, memory_order_relaxed); n++) {
            if (n < 128) {
                cpu_relax();
            } else {
                sched_yield(); /* the holder may be descheduled, or rehashing */
                n = 0;
            }
        }
        if (!atomic_exchange_explicit(&hm_spin, 1, memory_order_acquire))
            return;
    }
}

struct counters hm_gil_counters, hm_lock_counters;
counter_t hm_lookups;
atomic_int hm_recording;
#if PY_VERSION_HEX >= 0x030C0000
PyInterpreterState *hm_main_interp;
#endif

/* ---- bounds ------------------------------------------------------------- */

struct bounds hm_shadow_bounds = {UINTPTR_MAX, 0};
struct bounds hm_table_bounds = {UINTPTR_MAX, 0};

static void bounds_reset(struct bounds *b)
{
    atomic_store_explicit(&b->lo, UINTPTR_MAX, memory_order_relaxed);
    atomic_store_explicit(&b->hi, 0, memory_order_relaxed);
}

/* ---- shadow map ---------------------------------------------------------- */

_Atomic(cell_t *) hm_shadow_top[SHADOW_TOP];
counter_t hm_shadow_leaves;
atomic_int hm_shadow_failed;

COLD cell_t *hm_shadow_new_leaf(_Atomic(cell_t *) *slot)
{
    void *m = mmap(NULL, SHADOW_LEAF_BYTES, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) {
        atomic_store(&hm_shadow_failed, 1);
        return NULL;
    }
    cell_t *expected = NULL;
    if (!atomic_compare_exchange_strong(slot, &expected, (cell_t *)m)) {
        munmap(m, SHADOW_LEAF_BYTES); /* another thread mapped it first */
        return expected;
    }
    atomic_fetch_add(&hm_shadow_leaves, 1);
    return (cell_t *)m;
}


/* Zeroes every leaf (their pages go back to the kernel; the mappings stay,
 * so lock-free readers never fault).  No writers may run. */
static void shadow_clear(void)
{
    for (size_t i = 0; i < SHADOW_TOP; i++) {
        cell_t *leaf = atomic_load_explicit(&hm_shadow_top[i], memory_order_relaxed);
        if (leaf != NULL)
            madvise(leaf, SHADOW_LEAF_BYTES, MADV_DONTNEED);
    }
    bounds_reset(&hm_shadow_bounds);
}

/* ---- hash tables ------------------------------------------------------------ */

size_t hm_table_bytes(const struct table *t)
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

void hm_table_clear(struct table *t)
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

int hm_table_put(struct table *t, uintptr_t key, uint64_t val, uint64_t *old)
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
int hm_table_add(struct table *t, uintptr_t key, uint64_t val)
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
    if (!bounds_contain(&hm_table_bounds, addr)) {
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
    bounds_reset(&hm_table_bounds);
    atomic_store(&bitmap_failed, 0);
    for (size_t i = 0; blocks.slots != NULL && i <= blocks.mask; i++)
        if (blocks.slots[i].key != 0) {
            uintptr_t s = blocks.slots[i].key;
            uintptr_t size = (uintptr_t)(blocks.slots[i].val & SIZE_MASK);
            bounds_extend(&hm_table_bounds, s, s + size);
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
    struct counters *c = is_gil_domain(cell_domain(v)) ? &hm_gil_counters : &hm_lock_counters;
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
    bump(&hm_lock_counters.live_blocks, (uint64_t)-1);
    bump(&hm_lock_counters.live_bytes, -(val & SIZE_MASK));
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
    if (hm_table_put(&blocks, start, val, &old) < 0) {
        bump(&hm_lock_counters.untracked, 1);
        return;
    }
    for (uintptr_t c = start >> CHUNK_SHIFT; c <= (start + size - 1) >> CHUNK_SHIFT; c++)
        if (hm_table_add(&chunks, c + 1, start) < 0) {
            chunks_remove(start, size);
            table_remove_at(&blocks, table_find(&blocks, start));
            bump(&hm_lock_counters.untracked, 1);
            return;
        }
    cell_t *cell = (start & (GRANULE - 1)) == 0 ? shadow_cell(start, 1) : NULL;
    if (cell != NULL) {
        uint16_t v = cell_load(cell);
        if (v != 0 && v != CELL_LARGE)
            drop_stale_cell(cell, v);
        cell_store(cell, CELL_LARGE); /* frees look in the table */
    }
    bump(&hm_lock_counters.live_blocks, 1);
    bump(&hm_lock_counters.live_bytes, size);
    bump(&hm_lock_counters.allocations, 1);
    if (blocks.mask != cap) {
        bitmap_rebuild(); /* includes this block */
    } else {
        bounds_extend(&hm_table_bounds, start, start + size);
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

/* ---- recording and forgetting on the locked path ------------------------------- */

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
COLD void hm_lock_record(uintptr_t p, size_t size, int domain)
{
    hm_lock();
    if (LIKELY(recording())) {
        cell_t *cell = NULL;
        if (size <= SMALL_MAX && (p & (GRANULE - 1)) == 0)
            cell = shadow_cell(p, 1);
        if (cell != NULL) {
            if (!lock_cell_occupied(cell, p, size, domain)) {
                cell_store(cell, cell_value(size, domain));
                bump(&hm_lock_counters.live_blocks, 1);
                bump(&hm_lock_counters.live_bytes, size ? size : 1);
                bump(&hm_lock_counters.allocations, 1);
                bounds_extend(&hm_shadow_bounds, p, p + (size ? size : 1));
            }
        } else {
            table_block_insert(p, size, domain);
        }
    }
    hm_unlock();
}

/* The GIL path's record (mem/obj, GIL held, recording).  0 if the block must
 * take the locked path instead. */
/* The locked path's forget.  Lock held.  A GIL-path block is left alone
 * unless `gil` (the caller holds the GIL). */
int hm_lock_forget(uintptr_t p, int gil, struct forgotten *f)
{
    cell_t *cell = (p & (GRANULE - 1)) == 0 ? shadow_cell(p, 0) : NULL;
    uint16_t v = cell != NULL ? cell_load(cell) : 0;
    if (v != 0 && v != CELL_LARGE) {
        if (is_gil_domain(cell_domain(v)) && !gil)
            return NOT_FOUND; /* freed through the wrong domain: not ours to touch */
        struct counters *c = is_gil_domain(cell_domain(v)) ? &hm_gil_counters : &hm_lock_counters;
        cell_store(cell, 0);
        bump(&c->live_blocks, (uint64_t)-1);
        bump(&c->live_bytes, -(uint64_t)cell_size(v));
        bump(&c->frees, 1);
        f->path = ON_LOCK_PATH;
        f->cell = v;
        f->val = (uint64_t)cell_size(v) | ((uint64_t)cell_domain(v) << SIZE_SHIFT);
        return ON_LOCK_PATH;
    }
    if (v == 0 && cell != NULL && !atomic_load_explicit(&hm_shadow_failed, memory_order_relaxed))
        return NOT_FOUND;
    size_t i = table_find(&blocks, p);
    if (i == SIZE_MAX)
        return NOT_FOUND;
    f->path = ON_LOCK_PATH;
    f->val = table_block_remove(i);
    f->cell = CELL_LARGE;
    bump(&hm_lock_counters.frees, 1);
    return ON_LOCK_PATH;
}

/* ---- hm_lookups ----------------------------------------------------------------------- */

/* The live block containing addr.  Lock-free for blocks in the shadow map;
 * the table part takes the lock (or, with `locked`, expects it held). */
int hm_find_block(uintptr_t addr, int locked, uintptr_t *start, uint64_t *val)
{
    if (bounds_contain(&hm_shadow_bounds, addr)) {
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
        hm_lock();
    int found = table_block_find(addr, start, val);
    if (!locked)
        hm_unlock();
    return found;
}

int pb_heapmap_find(uintptr_t addr, uintptr_t *start, size_t *size)
{
    uintptr_t s = 0;
    uint64_t v = 0;
    atomic_fetch_add_explicit(&hm_lookups, 1, memory_order_relaxed);
    if (!hm_find_block(addr, 0, &s, &v))
        return 0;
    if (start != NULL)
        *start = s;
    if (size != NULL)
        *size = (size_t)(v & SIZE_MASK);
    return 1;
}

struct pb_heapmap_block pb__heapmap_lookup(uintptr_t addr)
{
    struct pb_heapmap_block out = {0, 0, 0, 0, 0};
    uintptr_t s = 0;
    uint64_t v = 0;
    atomic_fetch_add_explicit(&hm_lookups, 1, memory_order_relaxed);
    if (hm_find_block(addr, 0, &s, &v)) {
        out.start = s;
        out.size = v & SIZE_MASK;
        out.domain = (int)(v >> SIZE_SHIFT);
        out.status = hm_chain_unchanged() ? 1 : 2;
    }
    return out;
}


/* ---- foreign blocks, clearing, sizes ----------------------------------------------------- */

int hm_foreign_forget_locked(uintptr_t p, struct forgotten *f)
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
    return hm_lock_forget(p, 0, f);
}

void hm_index_clear_locked(void)
{
    shadow_clear();
    hm_table_clear(&blocks);
    hm_table_clear(&chunks);
    bitmap_rebuild();
    atomic_store(&hm_gil_counters.live_blocks, 0);
    atomic_store(&hm_gil_counters.live_bytes, 0);
    atomic_store(&hm_lock_counters.live_blocks, 0);
    atomic_store(&hm_lock_counters.live_bytes, 0);
    atomic_store(&hm_shadow_failed, 0);
}

size_t hm_index_bytes_locked(void)
{
    return hm_table_bytes(&blocks) + hm_table_bytes(&chunks) + bitmap_leaves * BITMAP_LEAF_WORDS * sizeof(uint64_t);
}
