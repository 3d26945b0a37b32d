/*
 * heapmap_freed.c - freed Python blocks: the history, the hold, the
 * scanner's view, and foreign blocks (see pb_heapmap_internal.h).
 *
 * History.  Every free is appended to a ring of PB_HEAPMAP_FREED_HISTORY
 * entries (one ring per path, so the GIL path never locks; readers validate
 * what they copy with a claim counter).  The scanner takes them through
 * cursors; use-after-free lookups use a table built lazily from the rings
 * when asked, so a free costs only the append.  An entry's "serial" is its
 * ring sequence number << 1 | ring: exact order within a path, and unique.
 *
 * Hold.  A per-domain hold (the quarantine of memory sanitizers) keeps the
 * latest freed blocks back from their allocator for a while, so that the
 * scanner can still find pointers into them before the memory is reused.
 * A held block must not mask a use after free: it is filled with
 * POISON_BYTE (0xDD, like PYTHONMALLOC=debug) and the whole pages inside a
 * block of a page or more are made PROT_NONE, so a stale read sees garbage
 * or faults - at least as visibly as without ptrbridge, where the memory
 * would be reused.  Protection is lifted just before a block is given back.
 * Nothing in ptrbridge reads held memory: the scanner treats freed blocks as
 * targets (addresses), never as roots.  A domain's held blocks are released
 * by later calls into that domain, by set_hold, or by uninstall (with the
 * GIL), so the domain's GIL rules are kept.
 */
#include "pb_heapmap_internal.h"

#include <sys/mman.h>
#include <unistd.h>

#include "pb_interpose.h"
#include "pb_scan.h"

_Atomic uint64_t hm_gil_ring[PB_HEAPMAP_FREED_HISTORY];
counter_t hm_gil_ring_claim, hm_gil_ring_done;

/* The locked path's ring: (start, size | domain << 61), under the lock. */
static struct {
    uintptr_t start;
    uint64_t val;
} lock_ring[PB_HEAPMAP_FREED_HISTORY];
static uint64_t lock_ring_seq;
/* The free clock (pb_heapmap_clock): lock_ring_seq published for readers
 * without the lock, and the history's epoch, a sequence lock (odd while
 * the history is being forgotten). */
counter_t hm_lock_ring_pub, hm_freed_epoch = 2;

/* Readers' state, under the lock: the scanner's cursors and drop counts. */
static uint64_t gil_taken, lock_taken, freed_dropped;

void hm_lock_ring_append(uintptr_t start, uint64_t val)
{
    lock_ring[lock_ring_seq & RING_MASK].start = start;
    lock_ring[lock_ring_seq & RING_MASK].val = val;
    lock_ring_seq++;
    atomic_store_explicit(&hm_lock_ring_pub, lock_ring_seq, memory_order_release);
}

void pb_heapmap_clock(struct pb_heapmap_clock *out)
{
    hm_clock_read(out);
}


/* Reads GIL-ring entry seq (< hm_gil_ring_done): 1 and (start, size|domain<<61)
 * if it was not overwritten, else 0. */
static int gil_ring_read(uint64_t seq, uintptr_t *start, uint64_t *val)
{
    uint64_t e = atomic_load_explicit(&hm_gil_ring[seq & RING_MASK], memory_order_relaxed);
    atomic_thread_fence(memory_order_acquire);
    if (atomic_load_explicit(&hm_gil_ring_claim, memory_order_relaxed) - seq > PB_HEAPMAP_FREED_HISTORY)
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
        if (seq >= atomic_load_explicit(&hm_gil_ring_done, memory_order_acquire))
            return 0;
        return gil_ring_read(seq, start, val);
    }
    if (seq >= lock_ring_seq || seq < oldest_of(lock_ring_seq))
        return 0;
    *start = lock_ring[seq & RING_MASK].start;
    *val = lock_ring[seq & RING_MASK].val;
    return 1;
}

/* ---- the lazy index of freed blocks (for use-after-free hm_lookups) ----------------- */

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
    if (hm_table_put(&freed_starts, start, tag, &old) < 0)
        return;
    if (size > SMALL_MAX || (start & (GRANULE - 1)) != 0)
        for (uintptr_t c = start >> CHUNK_SHIFT; c <= (start + size - 1) >> CHUNK_SHIFT; c++)
            if (hm_table_add(&freed_chunks, c + 1, tag) < 0)
                return;
}

/* Brings the lazy index up to date with both rings.  Lock held. */
static void freed_index_update(void)
{
    uint64_t ends[2] = {atomic_load_explicit(&hm_gil_ring_done, memory_order_acquire), lock_ring_seq};
    /* Entries for overwritten ring slots are skipped when read; rebuild when
     * they would make up most of the tables. */
    if (indexed[0] < oldest_of(ends[0]) || indexed[1] < oldest_of(ends[1]) ||
        freed_starts.count > 4 * (size_t)PB_HEAPMAP_FREED_HISTORY ||
        freed_chunks.count > 8 * (size_t)PB_HEAPMAP_FREED_HISTORY) {
        hm_table_clear(&freed_starts);
        hm_table_clear(&freed_chunks);
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

void hm_freed_clear_locked(void)
{
    uint64_t e = atomic_load_explicit(&hm_freed_epoch, memory_order_relaxed);
    atomic_store_explicit(&hm_freed_epoch, e + 1, memory_order_relaxed);
    atomic_thread_fence(memory_order_release);
    atomic_store_explicit(&hm_lock_ring_pub, 0, memory_order_relaxed);
    hm_table_clear(&freed_starts);
    hm_table_clear(&freed_chunks);
    indexed[0] = indexed[1] = 0;
    atomic_store(&hm_gil_ring_claim, 0);
    atomic_store(&hm_gil_ring_done, 0);
    lock_ring_seq = gil_taken = lock_taken = 0;
    atomic_store_explicit(&hm_freed_epoch, e + 2, memory_order_release);
}

struct pb_heapmap_block pb__heapmap_find_freed(uintptr_t addr)
{
    struct pb_heapmap_block out = {0, 0, 0, 0, 0};
    uintptr_t s = 0;
    uint64_t v = 0;
    atomic_fetch_add_explicit(&hm_lookups, 1, memory_order_relaxed);
    hm_lock();
    if (!hm_find_block(addr, 1, &s, &v)) {
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
            out.serial = best - 2; /* seq << 1 | ring */
        }
    }
    hm_unlock();
    return out;
}

/* Folds a freed block's tag into need (newest seq + 1 per path) if it
 * contains addr. */
static size_t clock_fold(uint64_t tag, uintptr_t addr, struct pb_heapmap_clock *need)
{
    uintptr_t s;
    uint64_t v;
    if (tag == 0 || !freed_tag_contains(tag, addr, &s, &v))
        return 0;
    uint64_t after = tag >> 1; /* seq + 1 */
    uint64_t *path = (tag & 1) ? &need->lock : &need->gil;
    if (after > *path)
        *path = after;
    return 1;
}

size_t pb_heapmap_freed_clock_at(uintptr_t addr, struct pb_heapmap_clock *need)
{
    size_t n = 0;
    need->gil = need->lock = 0;
    hm_lock();
    need->epoch = atomic_load_explicit(&hm_freed_epoch, memory_order_relaxed); /* even: cleared under the lock */
    freed_index_update();
    /* The same walk as pb__heapmap_find_freed: small blocks by their start,
     * larger ones through their chunks. */
    uintptr_t g = addr & ~(GRANULE - 1);
    for (uintptr_t k = 0; freed_starts.count != 0 && k <= SMALL_MAX && k <= g; k += GRANULE) {
        size_t i = table_find(&freed_starts, g - k);
        n += clock_fold(i == SIZE_MAX ? 0 : freed_starts.slots[i].val, addr, need);
    }
    uintptr_t key = (addr >> CHUNK_SHIFT) + 1;
    for (size_t j = freed_chunks.count ? slot_of(&freed_chunks, key) : 0;
         freed_chunks.count != 0 && freed_chunks.slots[j].key != 0; j = (j + 1) & freed_chunks.mask)
        if (freed_chunks.slots[j].key == key)
            n += clock_fold(freed_chunks.slots[j].val, addr, need);
    hm_unlock();
    return n;
}

/* ---- the scanner's view of freed blocks ------------------------------------------- */

/* Next freed block not yet taken (GIL ring first, then the locked ring).
 * Lock held.  0 when there is none. */
static int take_next(uintptr_t *start, uint64_t *val, uint64_t *serial)
{
    uint64_t done = atomic_load_explicit(&hm_gil_ring_done, memory_order_acquire);
    while (gil_taken < done) {
        uint64_t seq = gil_taken++;
        if (seq < oldest_of(atomic_load_explicit(&hm_gil_ring_claim, memory_order_relaxed))) {
            freed_dropped += oldest_of(atomic_load(&hm_gil_ring_claim)) - seq;
            gil_taken = oldest_of(atomic_load(&hm_gil_ring_claim));
            continue;
        }
        if (gil_ring_read(seq, start, val)) {
            *serial = seq << 1;
            return 1;
        }
        freed_dropped++;
    }
    if (lock_taken < oldest_of(lock_ring_seq)) {
        freed_dropped += oldest_of(lock_ring_seq) - lock_taken;
        lock_taken = oldest_of(lock_ring_seq);
    }
    if (lock_taken < lock_ring_seq) {
        *start = lock_ring[lock_taken & RING_MASK].start;
        *val = lock_ring[lock_taken & RING_MASK].val;
        *serial = (lock_taken << 1) | 1;
        lock_taken++;
        return 1;
    }
    return 0;
}

size_t pb__heapmap_take_freed(uintptr_t *starts, size_t *sizes, size_t cap, uint64_t *dropped)
{
    size_t n = 0;
    uintptr_t s;
    uint64_t v, serial;
    hm_lock();
    for (; n < cap && take_next(&s, &v, &serial); n++) {
        starts[n] = s;
        sizes[n] = (size_t)(v & SIZE_MASK);
    }
    if (dropped != NULL)
        *dropped = freed_dropped;
    hm_unlock();
    return n;
}

size_t pb__heapmap_take_freed_blocks(struct pb_heapmap_block *out, size_t cap, uint64_t *dropped)
{
    size_t n = 0;
    uintptr_t s;
    uint64_t v, serial;
    hm_lock();
    for (; n < cap && take_next(&s, &v, &serial); n++)
        out[n] = (struct pb_heapmap_block){s, v & SIZE_MASK, (int)(v >> SIZE_SHIFT), 1, serial};
    if (dropped != NULL)
        *dropped = freed_dropped;
    hm_unlock();
    return n;
}

/* When more than cap freed blocks are pending, skips the oldest ones (they
 * count as dropped) so that the newest cap remain, shared between the rings
 * (the locked ring gets at least half of cap if it has that many).  The
 * newest frees matter most to an end-of-test scan: they are the test's own.
 * Lock held. */
static void keep_newest(size_t cap)
{
    uint64_t gdone = atomic_load_explicit(&hm_gil_ring_done, memory_order_acquire);
    if (gil_taken < oldest_of(gdone)) {
        freed_dropped += oldest_of(gdone) - gil_taken;
        gil_taken = oldest_of(gdone);
    }
    if (lock_taken < oldest_of(lock_ring_seq)) {
        freed_dropped += oldest_of(lock_ring_seq) - lock_taken;
        lock_taken = oldest_of(lock_ring_seq);
    }
    uint64_t g = gdone - gil_taken, l = lock_ring_seq - lock_taken;
    if (g + l <= cap)
        return;
    uint64_t keep_l = l < cap / 2 ? l : (g < cap - cap / 2 ? (l < cap - g ? l : cap - g) : cap / 2);
    uint64_t keep_g = g < cap - keep_l ? g : cap - keep_l;
    freed_dropped += (g - keep_g) + (l - keep_l);
    gil_taken += g - keep_g;
    lock_taken += l - keep_l;
}

/* Blocks whose memory came from libc's malloc (raw, numpy, and the mem and
 * object domains above pymalloc's limit): once given back, libc may hand the
 * memory to anyone, C code the interposer does not see included. */
static int libc_backed(int domain, size_t size)
{
    return domain == PB_HEAPMAP_RAW || domain == PB_HEAPMAP_NUMPY ||
           ((domain == PB_HEAPMAP_MEM || domain == PB_HEAPMAP_OBJ) && size > SMALL_MAX);
}

static int cmp_uintptr(const void *a, const void *b)
{
    uintptr_t x = *(const uintptr_t *)a, y = *(const uintptr_t *)b;
    return (x > y) - (x < y);
}

/* Lock held.  The starts of the blocks held on the locked path (every
 * libc-backed block the hold has), sorted into `out` (room for DOMAINS *
 * PB_HEAPMAP_HOLD_MAX); returns how many. */
static size_t locked_held_starts(uintptr_t *out)
{
    size_t n = 0;
    for (int d = 0; d < DOMAINS; d++) {
        const struct quarantine *q = &hm_lock_held[d];
        for (size_t i = 0; i < q->count; i++)
            out[n++] = (uintptr_t)q->q[(q->head + i) & HOLD_MASK].ptr;
    }
    qsort(out, n, sizeof *out, cmp_uintptr);
    return n;
}

static int sorted_has(const uintptr_t *a, size_t n, uintptr_t key)
{
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (a[mid] < key)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < n && a[lo] == key;
}

size_t pb__heapmap_retire_freed(uint64_t first_id, uintptr_t *starts, size_t *sizes, size_t cap)
{
    /* Filter under the heap-map lock, queue outside it: the scanner takes its
     * own lock, and may look addresses up here while holding it.  Freed
     * Python memory that a loaded object is mapped over now (pymalloc gave an
     * arena back, then dlopen mapped a library there) is not Python's any
     * more: the library's own pointers into its image would be reported as
     * C keeping pointers into freed Python memory.  The segments are read
     * before the lock (dl_iterate_phdr takes the loader's). */
    size_t n = 0, nseg = 0;
    uintptr_t s, ls;
    uint64_t v, lv, serial;
    uintptr_t *seg = pb__loaded_segments_alloc(&nseg);
    /* ffi.new memory the interposer records is queued by the interposer, naming it
     * (pb__interpose_take_freed): not twice. */
    int cffi_queued_elsewhere = pb_interpose_enabled();
    /* Room for the starts of every block the locked path holds (libc-backed ones among them). */
    uintptr_t *held = malloc((size_t)DOMAINS * PB_HEAPMAP_HOLD_MAX * sizeof *held);
    hm_lock();
    size_t nheld = held != NULL ? locked_held_starts(held) : 0;
    keep_newest(cap);
    while (n < cap && take_next(&s, &v, &serial)) {
        if (hm_find_block(s, 1, &ls, &lv))
            continue; /* reused: the memory is live again */
        if (seg != NULL && pb__segments_overlap(seg, nseg, s, (size_t)(v & SIZE_MASK)))
            continue; /* reused: a loaded object is mapped there */
        int domain = (int)(v >> SIZE_SHIFT);
        if (cffi_queued_elsewhere && domain == PB_HEAPMAP_CFFI)
            continue;
        starts[n] = s;
        sizes[n] = (size_t)(v & SIZE_MASK);
        if (held != NULL && libc_backed(domain, sizes[n]) && !sorted_has(held, nheld, s))
            sizes[n] |= PB_HEAPMAP_GIVEN_BACK;
        n++;
    }
    hm_unlock();
    free(held);
    free(seg);
    for (size_t i = 0; i < n; i++)
        if (pb__scan_retire(starts[i], sizes[i] & ~(size_t)PB_HEAPMAP_GIVEN_BACK, first_id + i) != PB_OK)
            return i;
    return n;
}


/* ---- the hold ----------------------------------------------------------------------------- */

struct quarantine hm_gil_held[DOMAINS], hm_lock_held[DOMAINS];
_Atomic size_t hm_hold_max_blocks = PB_HEAPMAP_HOLD_BLOCKS, hm_hold_max_bytes = PB_HEAPMAP_HOLD_BYTES;
atomic_int hm_poison = 1;
uintptr_t hm_page_size = 4096; /* set by install */

/* The whole pages inside a block: [*first, *last), empty if none. */
static void inner_pages(const struct held_block *b, uintptr_t *first, uintptr_t *last)
{
    uintptr_t p = (uintptr_t)b->ptr, end = p + b->size;
    *first = (p + hm_page_size - 1) & ~(hm_page_size - 1);
    *last = end & ~(hm_page_size - 1);
    if (b->size < hm_page_size || *last < *first)
        *last = *first;
}

void hm_poison_block(struct held_block *b)
{
    b->prot = 0;
    /* The index records a 0-byte request as 1 byte (so its address is found),
     * but that byte may not be the block's: PYTHONMALLOC=debug (-X dev) below
     * the hook keeps its guard bytes right after a 0-byte request.  A 1-byte
     * block is never poisoned, so nothing outside a request is written. */
    if (b->size <= 1 || !atomic_load_explicit(&hm_poison, memory_order_relaxed))
        return;
    uintptr_t p = (uintptr_t)b->ptr, end = p + b->size, first, last;
    inner_pages(b, &first, &last);
    if (last > first) {
        /* Only the whole pages inside the block: the bytes around them may
         * share a page with the allocator's headers or other blocks. */
        memset(b->ptr, POISON_BYTE, first - p);
        memset((void *)last, POISON_BYTE, end - last);
        memset((void *)first, POISON_BYTE, last - first); /* what a read sees if mprotect fails */
        if (mprotect((void *)first, last - first, PROT_NONE) == 0)
            b->prot = 1;
        return;
    }
    memset(b->ptr, POISON_BYTE, b->size);
}

/* Holds b back if the limits allow (poisoning it), evicting the oldest
 * blocks (at most EVICT_MAX; the caller releases them).  1 if b was taken.
 *
 * A block larger than what EVICT_MAX evictions give back (a 60 KiB bytes
 * freed after thousands of small blocks filled the byte limit) is held all
 * the same while the total stays within twice the limit: refusing it would
 * hand exactly the large buffers C keeps pointers to back unpoisoned, and a
 * stale read through them would return the old bytes.  The small frees that
 * follow evict up to EVICT_MAX blocks each and bring the total back within
 * the limit. */
COLD int hm_quarantine_put(struct quarantine *q, const struct held_block *b, struct evicted *ev)
{
    size_t max_blocks = atomic_load_explicit(&hm_hold_max_blocks, memory_order_relaxed);
    size_t max_bytes = atomic_load_explicit(&hm_hold_max_bytes, memory_order_relaxed);
    size_t size = b->size;
    while (q->count > 0 && ev->n < EVICT_MAX && (q->count >= max_blocks || q->bytes + size > max_bytes)) {
        ev->b[ev->n++] = q->q[q->head];
        q->bytes -= q->q[q->head].size;
        q->head = (q->head + 1) & HOLD_MASK;
        q->count--;
    }
    if (max_blocks == 0 || q->count >= max_blocks || size > max_bytes || q->bytes + size > 2 * max_bytes)
        return 0;
    struct held_block *slot = &q->q[(q->head + q->count) & HOLD_MASK];
    *slot = *b;
    hm_poison_block(slot);
    q->count++;
    q->bytes += size;
    return 1;
}

/* Takes the oldest blocks out until q is within the limits (all with 0). */
static size_t quarantine_trim(struct quarantine *q, size_t max_blocks, size_t max_bytes, struct held_block *out)
{
    size_t n = 0;
    while (q->count > 0 && (q->count > max_blocks || q->bytes > max_bytes)) {
        out[n++] = q->q[q->head];
        q->bytes -= q->q[q->head].size;
        q->head = (q->head + 1) & HOLD_MASK;
        q->count--;
    }
    if (q->count == 0)
        q->head = q->bytes = 0;
    return n;
}

void hm_release_held(int domain, const struct held_block *b)
{
    if (b->prot) {
        uintptr_t first, last;
        inner_pages(b, &first, &last);
        mprotect((void *)first, last - first, PROT_READ | PROT_WRITE);
    }
    if (b->via != NULL)
        hook_free_prev(b->via, b->ptr);
    else if (domain == PB_HEAPMAP_NUMPY)
        hm_numpy_release(b->ptr, b->size);
    else if (domain == PB_HEAPMAP_CFFI)
        atomic_load(&hm_foreign_release)(b->ptr);
}

void hm_release_evicted(int domain, const struct evicted *ev)
{
    for (int i = 0; i < ev->n; i++)
        hm_release_held(domain, &ev->b[i]);
}

static struct held_block drain[2 * PB_HEAPMAP_HOLD_MAX]; /* under the GIL */

/* Releases what is held beyond the limits, every domain.  GIL held (mem,
 * obj and numpy frees need it). */
static void release_beyond_gil(size_t max_blocks, size_t max_bytes)
{
    for (int domain = 0; domain < DOMAINS; domain++) {
        size_t n = quarantine_trim(&hm_gil_held[domain], max_blocks, max_bytes, drain);
        hm_lock();
        n += quarantine_trim(&hm_lock_held[domain], max_blocks, max_bytes, drain + n);
        hm_unlock();
        for (size_t i = 0; i < n; i++)
            hm_release_held(domain, &drain[i]);
    }
}

void hm_release_hold_gil(void)
{
    release_beyond_gil(0, 0);
}

int hm_forget_for_free_locked(int domain, void *ptr, size_t release_size, const struct hm_hook *via,
                              struct evicted *ev)
{
    uintptr_t p = (uintptr_t)ptr;
    struct forgotten f = {NOT_FOUND, 0, 0};
    int hold = 0;
    ev->n = 0;
    if (!is_gil_domain(domain) && (p & (GRANULE - 1)) == 0 &&
        !atomic_load_explicit(&hm_shadow_failed, memory_order_relaxed)) {
        /* Lock-free exit for blocks that are certainly not recorded. */
        cell_t *cell = shadow_cell(p, 0);
        if (cell != NULL && cell_load(cell) == 0)
            return 0;
    }
    hm_lock();
    if (LIKELY(recording()) &&
        hm_lock_forget(p, is_gil_domain(domain) || domain == PB_HEAPMAP_NUMPY, &f) != NOT_FOUND) {
        hm_lock_ring_append(p, f.val);
        if (atomic_load_explicit(&hm_hold_max_blocks, memory_order_relaxed) != 0) {
            size_t size = domain == PB_HEAPMAP_NUMPY ? release_size : (size_t)(f.val & SIZE_MASK);
            struct held_block b = {ptr, size, 0, via};
            hold = hm_quarantine_put(&hm_lock_held[domain], &b, ev);
        }
    }
    hm_unlock();
    return hold;
}

int hm_hold_forgotten(int domain, void *ptr, const struct forgotten *f, const struct hm_hook *via,
                      struct evicted *ev)
{
    size_t size = (size_t)(f->val & SIZE_MASK);
    size_t max_blocks = atomic_load_explicit(&hm_hold_max_blocks, memory_order_relaxed);
    int hold = 0;
    ev->n = 0;
    if (f->path == ON_GIL_PATH) { /* GIL held: the GIL path's ring and hold */
        gil_ring_append((uintptr_t)ptr, f->cell);
        return max_blocks != 0 ? quarantine_swap(&hm_gil_held[domain], ptr, size, via, max_blocks, ev) : 0;
    }
    hm_lock();
    if (recording()) {
        hm_lock_ring_append((uintptr_t)ptr, f->val);
        if (max_blocks != 0) {
            struct held_block b = {ptr, size, 0, via};
            hold = hm_quarantine_put(&hm_lock_held[domain], &b, ev);
        }
    }
    hm_unlock();
    return hold;
}

int pb__heapmap_set_hold(size_t max_blocks, size_t max_bytes)
{
    if (max_blocks > PB_HEAPMAP_HOLD_MAX)
        return PB_ERR_INVALID;
    if (max_blocks == 0 || max_bytes == 0)
        max_blocks = max_bytes = 0;
    PyGILState_STATE gil = PyGILState_Ensure();
    atomic_store(&hm_hold_max_bytes, max_bytes);
    atomic_store(&hm_hold_max_blocks, max_blocks);
    release_beyond_gil(max_blocks, max_bytes); /* what is held beyond the new limits goes back now */
    PyGILState_Release(gil);
    return PB_OK;
}

int pb__heapmap_held_large(uintptr_t addr)
{
    /* Blocks over SMALL_MAX are held on the locked path only. */
    int found = 0;
    hm_lock();
    for (int d = 0; d < DOMAINS && !found; d++) {
        const struct quarantine *q = &hm_lock_held[d];
        for (size_t i = 0; i < q->count; i++) {
            const struct held_block *b = &q->q[(q->head + i) & HOLD_MASK];
            if (addr - (uintptr_t)b->ptr < b->size) {
                found = 1;
                break;
            }
        }
    }
    hm_unlock();
    return found;
}

int pb__heapmap_set_poison(int on)
{
    return atomic_exchange(&hm_poison, on ? 1 : 0);
}

/* ---- foreign blocks (pb_heapmap_record_block, for the interposer) ------------------- */

_Atomic(void (*)(void *)) hm_foreign_release;

void pb_heapmap_record_block(void *ptr, size_t size, int domain)
{
    if (ptr == NULL || !is_foreign_domain(domain) || !recording() || hm_lock_held_here())
        return;
    hm_lock_record((uintptr_t)ptr, size, domain); /* re-checks `recording` under the lock */
}

/* Forgets ptr and, with rel, holds it back.  1 if held; ev gets blocks the
 * caller must release now. */
static int foreign_free(void *ptr, void (*rel)(void *), struct evicted *ev)
{
    ev->n = 0;
    if (ptr == NULL || !recording() || hm_lock_held_here())
        return 0;
    uintptr_t p = (uintptr_t)ptr;
    struct forgotten f = {NOT_FOUND, 0, 0};
    int hold = 0;
    hm_lock();
    if (recording() && hm_foreign_forget_locked(p, &f) != NOT_FOUND) {
        hm_lock_ring_append(p, f.val);
        if (rel != NULL && atomic_load_explicit(&hm_hold_max_blocks, memory_order_relaxed) != 0) {
            void (*cur)(void *) = NULL;
            if (atomic_compare_exchange_strong(&hm_foreign_release, &cur, rel) || cur == rel) {
                struct held_block b = {ptr, (size_t)(f.val & SIZE_MASK), 0, NULL};
                hold = hm_quarantine_put(&hm_lock_held[PB_HEAPMAP_CFFI], &b, ev);
            }
        }
    }
    hm_unlock();
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
    hm_release_evicted(PB_HEAPMAP_CFFI, &ev);
    return hold;
}

/* ---- counters ------------------------------------------------------------------------------ */

size_t hm_freed_bytes_locked(void)
{
    return hm_table_bytes(&freed_starts) + hm_table_bytes(&freed_chunks) + sizeof hm_gil_ring + sizeof lock_ring;
}

void hm_freed_stats_locked(struct pb_heapmap_stats *out)
{
    uint64_t gdone = atomic_load(&hm_gil_ring_done);
    out->freed_history = (gdone - oldest_of(gdone)) + (lock_ring_seq - oldest_of(lock_ring_seq));
    out->freed_pending = (gdone - (gil_taken > oldest_of(gdone) ? gil_taken : oldest_of(gdone))) +
                         (lock_ring_seq - (lock_taken > oldest_of(lock_ring_seq) ? lock_taken : oldest_of(lock_ring_seq)));
    out->freed_dropped = freed_dropped + (oldest_of(gdone) > gil_taken ? oldest_of(gdone) - gil_taken : 0) +
                         (oldest_of(lock_ring_seq) > lock_taken ? oldest_of(lock_ring_seq) - lock_taken : 0);
    /* hm_lock_held is written under the lock, hm_gil_held under the GIL: the
     * caller holds both (pb__heapmap_get_stats). */
    for (int domain = 0; domain < DOMAINS; domain++) {
        out->held_blocks += hm_gil_held[domain].count + hm_lock_held[domain].count;
        out->held_bytes += hm_gil_held[domain].bytes + hm_lock_held[domain].bytes;
    }
}

/* ---- ordering records against frees (pb__heapmap_frees_since) ------------------------ */

void pb__heapmap_clock_store(uint64_t *clocks, size_t slot)
{
    struct pb_heapmap_clock c;
    pb_heapmap_clock(&c);
    clocks[3 * slot] = c.epoch;
    clocks[3 * slot + 1] = c.gil;
    clocks[3 * slot + 2] = c.lock;
}

long long pb__heapmap_frees_since(uintptr_t addr, const uint64_t since[3])
{
    long long n = 0;
    hm_lock();
    uint64_t epoch = atomic_load_explicit(&hm_freed_epoch, memory_order_relaxed); /* even under the lock */
    uint64_t gil_end = atomic_load_explicit(&hm_gil_ring_done, memory_order_acquire);
    if (since[0] == 0 || since[0] != epoch || since[1] < oldest_of(gil_end) ||
        since[2] < oldest_of(lock_ring_seq)) {
        hm_unlock();
        return -1;
    }
    for (int r = 0; r < 2; r++) {
        uint64_t end = r == 0 ? gil_end : lock_ring_seq;
        for (uint64_t seq = since[1 + r]; seq < end; seq++) {
            uintptr_t start;
            uint64_t val;
            if (!ring_read(r, seq, &start, &val)) {
                if (r == 0) { /* overwritten while read: the free is lost, so nothing is known */
                    hm_unlock();
                    return -1;
                }
                continue;
            }
            if (addr >= start && addr - start < (val & SIZE_MASK))
                n++;
        }
    }
    hm_unlock();
    return n;
}
