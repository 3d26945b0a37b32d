/*
 * interpose.c - the malloc family of unmodified libraries, seen at check
 * level 2 by rewriting their GOT entries (the way memray intercepts
 * allocations: no LD_PRELOAD, no rebuild, works in a running process).
 *
 * For each loaded object the dynamic section gives the relocation tables
 * (DT_JMPREL for PLT calls, DT_RELA for -fno-plt calls and address-taken
 * functions).  Every JUMP_SLOT/GLOB_DAT (and addend-free absolute) relocation
 * naming a function we hook is a slot: its value is saved and replaced by our hook, written with
 * process_vm_writev so a read-only page (full RELRO) is detected instead of
 * faulting, then made writable for the write and read-only again.
 *
 * The hooks call the real function (this module is never patched, so its
 * own malloc is libc's - or whatever allocator the process preloaded) and
 * record the block in a sharded hash table: address, size and the return
 * address of the call (the allocating function, resolved at report time).
 * Frees of blocks the table never saw go straight to libc.  A thread-local
 * flag keeps the hooks from recording their own work.  Each shard has a
 * spin lock (an uncontended pair costs a few ns; cffi releases the GIL, so C
 * threads allocate concurrently); pthread_atfork takes every lock around
 * fork() so a child never inherits one held.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <elf.h>
#include <link.h>
#include <malloc.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>

#include "pb_heapmap.h"
#include "pb_heapmap_clock.h"
#include "pb_interpose.h"
#include "pb_quarantine.h"
#include "pb_internal.h"

#if defined(__x86_64__)
#define PB_R_JUMP_SLOT R_X86_64_JUMP_SLOT
#define PB_R_GLOB_DAT R_X86_64_GLOB_DAT
#define PB_R_ABS R_X86_64_64
#elif defined(__aarch64__)
#define PB_R_JUMP_SLOT R_AARCH64_JUMP_SLOT
#define PB_R_GLOB_DAT R_AARCH64_GLOB_DAT
#define PB_R_ABS R_AARCH64_ABS64
#else
#define PB_NO_INTERPOSE 1
#endif

#if defined(__LP64__)
#define PB_R_SYM ELF64_R_SYM
#define PB_R_TYPE ELF64_R_TYPE
#else
#define PB_R_SYM ELF32_R_SYM
#define PB_R_TYPE ELF32_R_TYPE
#endif

#define TLS_IE __attribute__((tls_model("initial-exec")))

static _Thread_local int in_hook TLS_IE;
static atomic_int enabled;

/* ---- the block table -------------------------------------------------- */

#define NSHARD 64
#define EMPTY ((uintptr_t)0)
#define TOMB ((uintptr_t)1)

struct ent {
    uintptr_t ptr;
    size_t size;
    uintptr_t caller;
    uintptr_t python;
};

struct shard {
    atomic_int lock;
    size_t cap, used, tomb;
    size_t bytes, python;
    uint64_t allocations, frees, foreign;
    size_t cfreed_head; /* next slot of cfreed[shard] to write */
    struct ent *e;
    size_t pcap, pused; /* the page index (see below) */
    struct pent *pg;
} __attribute__((aligned(64)));

static struct shard shards[NSHARD];

/* Blocks C freed (interposed frees and moving reallocs of blocks the table
 * knew, not Python's), newest last, a ring per shard guarded by the shard's
 * lock, each stamped with the heap map's free clock read before libc got
 * the block back.  A block's life never overlaps that of a Python block at
 * the same address, so a block C freed after Python's last free there was
 * handed to C after it: a word pointing into it is C's own (stale) pointer,
 * not a pointer into Python memory (pb__interpose_c_reused). */
#define CFREED_PER_SHARD 2048 /* 131072 in all, 4 MiB, touched as they fill */
#define CFREED_SIZE_BITS 40   /* larger blocks are remembered as 1 TiB - 1: fewer addresses */
#define CFREED_SIZE_MASK (((uint64_t)1 << CFREED_SIZE_BITS) - 1)
/* Four plain words, written whole: no bit-field (whose store would first
 * load the old word of a ring slot that is usually not in the L1 cache - a
 * third of a free's cost when it was one). */
struct cfreed {
    uintptr_t ptr;      /* 0: empty */
    uint64_t size_epoch; /* size | the clock's epoch (truncated; 0: orders nothing) << CFREED_SIZE_BITS */
    uint64_t gil, lock;
};
static struct cfreed cfreed[NSHARD][CFREED_PER_SHARD];

#if CFREED_PER_SHARD & (CFREED_PER_SHARD - 1)
#error "CFREED_PER_SHARD must be a power of two"
#endif

static inline uint64_t epoch_bits(uint64_t epoch)
{
    return epoch & (((uint64_t)1 << (64 - CFREED_SIZE_BITS)) - 1);
}

/* Shard s's lock held. */
static inline void cfreed_push(struct shard *s, const struct ent *e)
{
    struct pb_heapmap_clock c;
    hm_clock_read(&c); /* pb_heapmap_clock, inline */
    size_t i = (size_t)(s - shards);
    uint64_t size = e->size ? e->size : 1;
    if (size > CFREED_SIZE_MASK)
        size = CFREED_SIZE_MASK;
    cfreed[i][s->cfreed_head++ & (CFREED_PER_SHARD - 1)] =
        (struct cfreed){e->ptr, size | (c.epoch ? epoch_bits(c.epoch) : 0) << CFREED_SIZE_BITS, c.gil, c.lock};
    /* The next slot, for writing: the ring (64 KiB per shard) is mostly out
     * of L1, and the shard lock's next exchange would wait for that store. */
    __builtin_prefetch(&cfreed[i][s->cfreed_head & (CFREED_PER_SHARD - 1)], 1, 3);
}

static inline uint64_t hash_ptr(uintptr_t p)
{
    uint64_t h = (uint64_t)(p >> 4) * 0x9E3779B97F4A7C15ULL;
    return h ^ (h >> 29);
}

static inline void shard_lock(struct shard *s)
{
    while (atomic_exchange_explicit(&s->lock, 1, memory_order_acquire)) {
        while (atomic_load_explicit(&s->lock, memory_order_relaxed))
            sched_yield();
    }
}

static inline void shard_unlock(struct shard *s)
{
    atomic_store_explicit(&s->lock, 0, memory_order_release);
}

/* ---- the interior-address index ----------------------------------------
 *
 * "Which live block contains address A" (pb__interpose_find) is a
 * predecessor query: the live block with the greatest start <= A contains A
 * or none does (live blocks do not overlap).  Blocks are sharded by the page
 * (PB_PAGE bytes) of their start, so one shard's lock covers every block
 * starting in a page, and each shard keeps, besides its exact-address table,
 * a page index: page -> a bitmap of the 16-byte granules where a block
 * starts.  A "small" block (16-byte aligned start, size <= PB_SMALL_MAX) is
 * found by looking at the bitmaps of A's page and the PB_SMALL_MAX / PB_PAGE
 * pages before it (at most five lookups); every other block (larger, or an
 * unaligned start, or one whose page entry could not be allocated) is in one
 * sorted array, `big`, under its own lock.  The hooks pay one more probe of a
 * small, cache-hot table per malloc and per free (and a bit flip); page
 * entries are never deleted one by one (a page's bitmap goes to zero and
 * stays for reuse) but dropped when the index is rebuilt on growth.  Lock
 * order: a shard's lock, then big's; a lookup never holds two. */
#define PB_PAGE_SHIFT 12
#define PB_SMALL_MAX ((size_t)4 << PB_PAGE_SHIFT)
#define PB_SMALL_PAGES (PB_SMALL_MAX >> PB_PAGE_SHIFT)

struct pent {
    uintptr_t page; /* page number + 1; 0: empty */
    uint64_t bits[4];
};

static struct {
    atomic_int lock;
    size_t n, cap;
    struct ent *v; /* sorted by ptr */
} big;

static inline uint64_t hash_page(uintptr_t page)
{
    uint64_t h = (uint64_t)page * 0x9E3779B97F4A7C15ULL;
    return h ^ (h >> 31);
}

static inline struct shard *shard_of_addr(uintptr_t p)
{
    return &shards[hash_page(p >> PB_PAGE_SHIFT) >> 58];
}

static inline int is_small(uintptr_t p, size_t size)
{
    return (p & 15) == 0 && size <= PB_SMALL_MAX;
}

static inline int ent_contains(const struct ent *e, uintptr_t addr)
{
    return addr >= e->ptr && addr - e->ptr < (e->size ? e->size : 1);
}

/* Shard lock held.  The entry of page number `page`, or NULL. */
static inline struct pent *page_get(struct shard *s, uintptr_t page)
{
    if (s->pcap == 0)
        return NULL;
    size_t mask = s->pcap - 1;
    for (size_t j = (size_t)hash_page(page) & mask;; j = (j + 1) & mask) {
        if (s->pg[j].page == page + 1)
            return &s->pg[j];
        if (s->pg[j].page == 0)
            return NULL;
    }
}

/* Shard lock held.  Rebuilds the page index keeping only pages with a bit
 * set, in a table with room for one more.  Returns 0 or -1. */
static int page_rebuild(struct shard *s)
{
    size_t live = 0;
    for (size_t i = 0; i < s->pcap; i++) {
        const struct pent *q = &s->pg[i];
        if (q->page && (q->bits[0] | q->bits[1] | q->bits[2] | q->bits[3]))
            live++;
    }
    size_t cap = 64;
    while ((live + 1) * 2 > cap)
        cap *= 2;
    struct pent *n = calloc(cap, sizeof *n);
    if (n == NULL)
        return -1;
    for (size_t i = 0; i < s->pcap; i++) {
        const struct pent *q = &s->pg[i];
        if (!q->page || !(q->bits[0] | q->bits[1] | q->bits[2] | q->bits[3]))
            continue;
        size_t j = (size_t)hash_page(q->page - 1) & (cap - 1);
        while (n[j].page)
            j = (j + 1) & (cap - 1);
        n[j] = *q;
    }
    free(s->pg);
    s->pg = n;
    s->pcap = cap;
    s->pused = live;
    return 0;
}

/* Shard lock held.  Marks a small block's start.  Returns 0 or -1 (no
 * memory: the caller puts the block in `big` instead). */
static inline int page_mark(struct shard *s, uintptr_t p)
{
    uintptr_t page = p >> PB_PAGE_SHIFT;
    unsigned g = (unsigned)(p >> 4) & 255;
    struct pent *q = page_get(s, page);
    if (q == NULL) {
        if ((s->pused + 1) * 4 > s->pcap * 3 && page_rebuild(s) != 0)
            return -1;
        size_t mask = s->pcap - 1, j = (size_t)hash_page(page) & mask;
        while (s->pg[j].page)
            j = (j + 1) & mask;
        q = &s->pg[j];
        *q = (struct pent){page + 1, {0, 0, 0, 0}};
        s->pused++;
    }
    q->bits[g >> 6] |= (uint64_t)1 << (g & 63);
    return 0;
}

/* Shard lock held.  Clears a small block's start; returns 1 if it was set. */
static inline int page_unmark(struct shard *s, uintptr_t p)
{
    struct pent *q = page_get(s, p >> PB_PAGE_SHIFT);
    unsigned g = (unsigned)(p >> 4) & 255;
    uint64_t bit = (uint64_t)1 << (g & 63);
    if (q == NULL || !(q->bits[g >> 6] & bit))
        return 0;
    q->bits[g >> 6] &= ~bit;
    return 1;
}

static inline void big_lock(void)
{
    while (atomic_exchange_explicit(&big.lock, 1, memory_order_acquire)) {
        while (atomic_load_explicit(&big.lock, memory_order_relaxed))
            sched_yield();
    }
}

static inline void big_unlock(void)
{
    atomic_store_explicit(&big.lock, 0, memory_order_release);
}

/* big locked.  The index of the first entry with ptr > p. */
static size_t big_upper(uintptr_t p)
{
    size_t lo = 0, hi = big.n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (big.v[mid].ptr <= p)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* Adds (or replaces) e in big.  On no memory the block stays out of the
 * index: pb__interpose_find does not see its interior. */
static void big_add(const struct ent *e)
{
    big_lock();
    size_t i = big_upper(e->ptr);
    if (i > 0 && big.v[i - 1].ptr == e->ptr) {
        big.v[i - 1] = *e;
    } else {
        if (big.n == big.cap) {
            size_t cap = big.cap ? big.cap * 2 : 64;
            struct ent *v = realloc(big.v, cap * sizeof *v);
            if (v == NULL) {
                big_unlock();
                return;
            }
            big.v = v;
            big.cap = cap;
        }
        memmove(&big.v[i + 1], &big.v[i], (big.n - i) * sizeof *big.v);
        big.v[i] = *e;
        big.n++;
    }
    big_unlock();
}

static void big_del(uintptr_t p)
{
    big_lock();
    size_t i = big_upper(p);
    if (i > 0 && big.v[i - 1].ptr == p) {
        memmove(&big.v[i - 1], &big.v[i], (big.n - i) * sizeof *big.v);
        big.n--;
    }
    big_unlock();
}

/* Shard lock held: e was just put in the table (was: the entry it replaced,
 * ptr EMPTY if none). */
static inline void index_add(struct shard *s, const struct ent *e, const struct ent *was)
{
    if (was->ptr != EMPTY && !is_small(was->ptr, was->size))
        big_del(was->ptr);
    if (is_small(e->ptr, e->size)) {
        if (page_mark(s, e->ptr) == 0)
            return;
    } else if (was->ptr != EMPTY) {
        page_unmark(s, e->ptr);
    }
    big_add(e);
}

/* Shard lock held: e was just taken out of the table. */
static inline void index_remove(struct shard *s, const struct ent *e)
{
    if (!(is_small(e->ptr, e->size) && page_unmark(s, e->ptr)))
        big_del(e->ptr);
}

/* Shard lock held.  The table's entry for exactly p, or NULL. */
static const struct ent *table_get(const struct shard *s, uintptr_t p)
{
    if (s->cap == 0)
        return NULL;
    size_t mask = s->cap - 1;
    for (size_t j = (size_t)hash_ptr(p) & mask;; j = (j + 1) & mask) {
        if (s->e[j].ptr == p)
            return &s->e[j];
        if (s->e[j].ptr == EMPTY)
            return NULL;
    }
}

/* The greatest set bit <= limit in bits[4], or -1. */
static inline int bits_pred(const uint64_t bits[4], unsigned limit)
{
    for (int w = (int)(limit >> 6); w >= 0; w--) {
        uint64_t m = bits[w];
        if ((unsigned)w == limit >> 6 && (limit & 63) != 63)
            m &= ((uint64_t)1 << ((limit & 63) + 1)) - 1;
        if (m)
            return w * 64 + 63 - __builtin_clzll(m);
    }
    return -1;
}

/* 1: *out is the small block containing addr; 0: no small block does. */
static int find_small(uintptr_t addr, struct ent *out)
{
    uintptr_t apage = addr >> PB_PAGE_SHIFT;
    for (uintptr_t k = 0; k <= PB_SMALL_PAGES && k <= apage; k++) {
        uintptr_t page = apage - k;
        struct shard *s = shard_of_addr(page << PB_PAGE_SHIFT);
        int verdict = -1; /* -1: look at the page before */
        shard_lock(s);
        const struct pent *q = page_get(s, page);
        int limit = k == 0 ? (int)((addr >> 4) & 255) : 255;
        while (q != NULL && limit >= 0) {
            int g = bits_pred(q->bits, (unsigned)limit);
            if (g < 0)
                break;
            const struct ent *e = table_get(s, (page << PB_PAGE_SHIFT) | ((uintptr_t)g << 4));
            if (e != NULL) {
                verdict = ent_contains(e, addr);
                if (verdict)
                    *out = *e;
                break;
            }
            limit = g - 1; /* a bit without its entry (cannot happen): the next one */
        }
        shard_unlock(s);
        if (verdict >= 0)
            return verdict;
    }
    return 0;
}

static int find_big(uintptr_t addr, struct ent *out)
{
    int found = 0;
    big_lock();
    size_t i = big_upper(addr);
    if (i > 0 && ent_contains(&big.v[i - 1], addr)) {
        *out = big.v[i - 1];
        found = 1;
    }
    big_unlock();
    return found;
}

/* Rehashes into a table of newcap entries.  Returns 0 or -1 (no memory). */
static int shard_resize(struct shard *s, size_t newcap)
{
    struct ent *n = calloc(newcap, sizeof *n);
    if (n == NULL)
        return -1;
    for (size_t i = 0; i < s->cap; i++) {
        uintptr_t p = s->e[i].ptr;
        if (p == EMPTY || p == TOMB)
            continue;
        size_t j = (size_t)hash_ptr(p) & (newcap - 1);
        while (n[j].ptr != EMPTY)
            j = (j + 1) & (newcap - 1);
        n[j] = s->e[i];
    }
    free(s->e);
    s->e = n;
    s->cap = newcap;
    s->tomb = 0;
    return 0;
}

/* Inline in the hooks (a call and its register saves were a fifth of the
 * hook's instructions). */
static inline __attribute__((always_inline)) void table_insert(uintptr_t p, size_t size, uintptr_t caller,
                                                               int python)
{
    uint64_t h = hash_ptr(p);
    struct shard *s = shard_of_addr(p);
    shard_lock(s);
    if ((s->used + s->tomb + 1) * 4 > s->cap * 3) {
        size_t newcap = s->cap ? ((s->used + 1) * 2 > s->cap ? s->cap * 2 : s->cap) : 256;
        if (shard_resize(s, newcap) != 0) {
            shard_unlock(s);
            return; /* the block stays unknown: its free goes straight to libc */
        }
    }
    size_t mask = s->cap - 1, j = (size_t)h & mask, tomb = SIZE_MAX;
    struct ent was = {EMPTY, 0, 0, 0};
    for (;; j = (j + 1) & mask) {
        uintptr_t q = s->e[j].ptr;
        if (q == p) { /* a free we never saw (by unpatched code): replace it */
            was = s->e[j];
            s->bytes -= s->e[j].size;
            s->python -= s->e[j].python ? 1 : 0;
            s->used--;
            tomb = j;
            break;
        }
        if (q == TOMB && tomb == SIZE_MAX)
            tomb = j;
        if (q == EMPTY)
            break;
    }
    if (tomb != SIZE_MAX && s->e[tomb].ptr == TOMB)
        s->tomb--;
    if (tomb != SIZE_MAX)
        j = tomb;
    s->e[j] = (struct ent){p, size, caller, (uintptr_t)python};
    index_add(s, &s->e[j], &was);
    s->used++;
    s->bytes += size;
    s->python += python ? 1 : 0;
    s->allocations++;
    shard_unlock(s);
}

/* Removes p; fills *out (may be NULL) and returns 1 if it was known. */
static inline __attribute__((always_inline)) int table_remove(uintptr_t p, struct ent *out)
{
    uint64_t h = hash_ptr(p);
    struct shard *s = shard_of_addr(p);
    int found = 0;
    shard_lock(s);
    if (s->cap) {
        size_t mask = s->cap - 1;
        for (size_t j = (size_t)h & mask;; j = (j + 1) & mask) {
            uintptr_t q = s->e[j].ptr;
            if (q == EMPTY)
                break;
            if (q == p) {
                if (out)
                    *out = s->e[j];
                s->bytes -= s->e[j].size;
                s->python -= s->e[j].python ? 1 : 0;
                s->used--;
                s->frees++;
                found = 1;
                index_remove(s, &s->e[j]);
                if (!s->e[j].python)
                    cfreed_push(s, &s->e[j]);
                if (s->e[(j + 1) & mask].ptr == EMPTY) {
                    /* End of a probe chain: empty it, and the tombstones before it,
                     * so repeated malloc/free of one address keeps chains short. */
                    s->e[j].ptr = EMPTY;
                    for (size_t k = (j - 1) & mask; s->e[k].ptr == TOMB; k = (k - 1) & mask) {
                        s->e[k].ptr = EMPTY;
                        s->tomb--;
                    }
                } else {
                    s->e[j].ptr = TOMB;
                    s->tomb++;
                }
                break;
            }
        }
    }
    if (!found)
        s->foreign++;
    shard_unlock(s);
    return found;
}

static void table_clear(void)
{
    for (size_t i = 0; i < NSHARD; i++) {
        struct shard *s = &shards[i];
        shard_lock(s);
        free(s->e);
        s->e = NULL;
        s->cap = s->used = s->tomb = s->bytes = s->python = 0;
        free(s->pg);
        s->pg = NULL;
        s->pcap = s->pused = 0;
        s->allocations = s->frees = s->foreign = 0;
        /* Only the slots written: a full clear would touch (make resident)
         * all 4 MiB at every disable. */
        size_t written = s->cfreed_head < CFREED_PER_SHARD ? s->cfreed_head : CFREED_PER_SHARD;
        memset(cfreed[i], 0, written * sizeof cfreed[i][0]);
        s->cfreed_head = 0;
        shard_unlock(s);
    }
    big_lock();
    free(big.v);
    big.v = NULL;
    big.n = big.cap = 0;
    big_unlock();
}

size_t pb__interpose_blocks(struct pb_iblock *out, size_t cap)
{
    size_t n = 0;
    for (size_t i = 0; i < NSHARD; i++) {
        struct shard *s = &shards[i];
        shard_lock(s);
        for (size_t j = 0; j < s->cap; j++) {
            const struct ent *e = &s->e[j];
            if (e->ptr == EMPTY || e->ptr == TOMB)
                continue;
            if (n < cap)
                out[n] = (struct pb_iblock){e->ptr, e->size, e->caller, (int)e->python};
            n++;
        }
        shard_unlock(s);
    }
    return n;
}

int pb_interpose_enabled(void)
{
    return atomic_load_explicit(&enabled, memory_order_acquire);
}

int pb__interpose_find(uintptr_t addr, struct pb_iblock *out)
{
    struct ent e;
    if (!find_small(addr, &e) && !find_big(addr, &e))
        return 0;
    *out = (struct pb_iblock){e.ptr, e.size, e.caller, (int)e.python};
    return 1;
}

/* Whether a remembered C free of a block containing addr came after (after = 1) or before
 * (after = 0) the newest Python free there, in the epoch of `need`. */
static int cfreed_ordered(uintptr_t addr, const struct pb_heapmap_clock *need, int after)
{
    uint64_t epoch = epoch_bits(need->epoch);
    int found = 0;
    for (size_t i = 0; i < NSHARD && !found; i++) {
        struct shard *s = &shards[i];
        shard_lock(s);
        for (size_t k = 0; k < CFREED_PER_SHARD; k++) {
            const struct cfreed *f = &cfreed[i][k];
            if (f->ptr != 0 && addr >= f->ptr && addr - f->ptr < (f->size_epoch & CFREED_SIZE_MASK) &&
                f->size_epoch >> CFREED_SIZE_BITS == epoch &&
                (f->gil >= need->gil && f->lock >= need->lock) == (after != 0)) {
                found = 1;
                break;
            }
        }
        shard_unlock(s);
    }
    return found;
}

int pb__interpose_c_reused(uintptr_t addr)
{
    struct pb_iblock b;
    if (pb__interpose_find(addr, &b) && !b.python)
        return 1;
    struct pb_heapmap_clock need;
    if (pb_heapmap_freed_clock_at(addr, &need) == 0 || need.epoch == 0)
        return 0; /* no Python free to order C's after: nothing is known */
    return cfreed_ordered(addr, &need, 1) ? 2 : 0;
}

int pb__interpose_c_before(uintptr_t addr)
{
    struct pb_heapmap_clock need;
    if (pb_heapmap_freed_clock_at(addr, &need) == 0 || need.epoch == 0)
        return 0;
    return cfreed_ordered(addr, &need, 0);
}

/* ---- the loader's own memory ------------------------------------------- */

#define PB_LINK_MAP_SPAN 1536

struct in_lm_ctx {
    uintptr_t addr;
    int done, found;
};

static int in_link_map_one(struct dl_phdr_info *info, size_t size, void *data)
{
    (void)info;
    (void)size;
    struct in_lm_ctx *c = data;
    if (c->done)
        return 1;
    c->done = 1; /* the whole list once, under the lock dl_iterate_phdr holds */
    struct link_map *head = _r_debug.r_map;
    for (struct link_map *m = head; m != NULL; m = m->l_next) {
        uintptr_t lm = (uintptr_t)m;
        if (c->addr >= lm && c->addr - lm < PB_LINK_MAP_SPAN) {
            c->found = 1;
            break;
        }
        if (m->l_name != NULL && m->l_name[0] != '\0') {
            uintptr_t name = (uintptr_t)m->l_name;
            if (c->addr >= name && c->addr - name <= strlen(m->l_name)) {
                c->found = 1;
                break;
            }
        }
    }
    return 1;
}

int pb__interpose_in_link_map(uintptr_t addr)
{
    struct in_lm_ctx c = {addr, 0, 0};
    dl_iterate_phdr(in_link_map_one, &c);
    return c.found;
}

/* ---- the hooks -------------------------------------------------------- */

#define CALLER() ((uintptr_t)__builtin_return_address(0))

static inline int recording(void)
{
    return atomic_load_explicit(&enabled, memory_order_relaxed) && !in_hook;
}

static inline __attribute__((always_inline)) void record(void *p, size_t size, uintptr_t caller, int python)
{
    if (p == NULL || !recording())
        return;
    in_hook = 1;
    table_insert((uintptr_t)p, size, caller, python);
    if (python) /* ffi.new memory is Python memory: the heap map indexes it too */
        pb_heapmap_record_block(p, size, PB_HEAPMAP_DOMAIN_CFFI);
    in_hook = 0;
}

#define PB_POISON 0xBE
#define PB_POISON_MAX ((size_t)4 << 20)

/* Python blocks (_cffi_backend's) freed since the last take: the scanner
 * looks for pointers C still holds into them (a ring; the oldest are
 * overwritten). */
#define FREED_RING 65536
static struct {
    uintptr_t ptr;
    size_t size;
} freed_ring[FREED_RING];
static size_t freed_head, freed_tail; /* tail: next to take; head: next to write */
static atomic_int freed_lock;
static uint64_t freed_dropped;

static void push_freed(uintptr_t p, size_t size)
{
    while (atomic_exchange_explicit(&freed_lock, 1, memory_order_acquire))
        sched_yield();
    freed_ring[freed_head % FREED_RING].ptr = p;
    freed_ring[freed_head % FREED_RING].size = size;
    freed_head++;
    if (freed_head - freed_tail > FREED_RING) {
        freed_dropped += freed_head - freed_tail - FREED_RING;
        freed_tail = freed_head - FREED_RING;
    }
    atomic_store_explicit(&freed_lock, 0, memory_order_release);
}

size_t pb__interpose_take_freed(uintptr_t *starts, size_t *sizes, size_t cap, uint64_t *dropped)
{
    while (atomic_exchange_explicit(&freed_lock, 1, memory_order_acquire))
        sched_yield();
    size_t n = 0;
    while (freed_tail != freed_head && n < cap) {
        starts[n] = freed_ring[freed_tail % FREED_RING].ptr;
        sizes[n] = freed_ring[freed_tail % FREED_RING].size;
        freed_tail++;
        n++;
    }
    if (dropped)
        *dropped = freed_dropped;
    atomic_store_explicit(&freed_lock, 0, memory_order_release);
    return n;
}

/* Freed Python blocks are held back (and poisoned) before libc gets them:
 * while held, their memory cannot be reused, so a pointer C keeps into one
 * is certainly stale, and a read through it sees the pattern, not old data.
 * The hold is bounded by blocks and by bytes, like the heap map's hold of a
 * domain (PB_HEAPMAP_HOLD_BYTES by default): the oldest are released until
 * a new block fits.  A count alone let it keep 4096 blocks of any size - a
 * producer freeing one 8 KB pointer array per batch had 32 MiB held, filled
 * only after 4096 batches (a soak's resident memory kept growing that long).
 * Guarded by freed_lock. */
#define HOLD_MAX 4096
#define HOLD_BYTES ((size_t)PB_HEAPMAP_HOLD_BYTES)
#define PB_FREED_POISON 0xDB
static void *held[HOLD_MAX];
static size_t held_size[HOLD_MAX];
static size_t held_head, held_count, held_bytes;

/* Holds p (a block of `size` bytes just removed from the table), first
 * giving libc back the oldest held blocks it does not fit beside; returns
 * the block to give back to libc now: p if it is not held (larger than the
 * byte limit), else NULL. */
static void *hold_freed(void *p, size_t size)
{
    if (size > HOLD_BYTES)
        return p;
    memset(p, PB_FREED_POISON, size);
    for (;;) {
        void *evicted = NULL;
        while (atomic_exchange_explicit(&freed_lock, 1, memory_order_acquire))
            sched_yield();
        if (held_count > 0 && (held_count == HOLD_MAX || held_bytes + size > HOLD_BYTES)) {
            evicted = held[held_head];
            held_bytes -= held_size[held_head];
            held_count--;
            held_head = (held_head + 1) % HOLD_MAX;
        } else {
            held[(held_head + held_count) % HOLD_MAX] = p;
            held_size[(held_head + held_count) % HOLD_MAX] = size;
            held_count++;
            held_bytes += size;
        }
        atomic_store_explicit(&freed_lock, 0, memory_order_release);
        if (evicted == NULL)
            return NULL;
        free(evicted); /* outside the lock; then try again */
    }
}

static void held_counts(uint64_t *blocks, uint64_t *bytes)
{
    while (atomic_exchange_explicit(&freed_lock, 1, memory_order_acquire))
        sched_yield();
    *blocks = held_count;
    *bytes = held_bytes;
    atomic_store_explicit(&freed_lock, 0, memory_order_release);
}

int pb__interpose_find_held(uintptr_t address, uintptr_t *start, size_t *size)
{
    int found = 0;
    while (atomic_exchange_explicit(&freed_lock, 1, memory_order_acquire))
        sched_yield();
    /* Newest first: a block freed twice at one address (reused, freed again)
     * is described by its last life. */
    for (size_t k = held_count; k-- > 0;) {
        size_t i = (held_head + k) % HOLD_MAX;
        uintptr_t p = (uintptr_t)held[i];
        if (address >= p && address - p < (held_size[i] ? held_size[i] : 1)) {
            *start = p;
            *size = held_size[i];
            found = 1;
            break;
        }
    }
    atomic_store_explicit(&freed_lock, 0, memory_order_release);
    return found;
}

static void release_held(void)
{
    for (;;) {
        void *p = NULL;
        while (atomic_exchange_explicit(&freed_lock, 1, memory_order_acquire))
            sched_yield();
        if (held_count) {
            p = held[held_head];
            held_bytes -= held_size[held_head];
            held_head = (held_head + 1) % HOLD_MAX;
            held_count--;
        }
        atomic_store_explicit(&freed_lock, 0, memory_order_release);
        if (p == NULL)
            return;
        free(p);
    }
}

/* Forgets p.  Returns the block the caller must give to libc's free: p
 * itself, or (for a held Python block) an older one, or NULL. */
static inline __attribute__((always_inline)) void *forget(void *p)
{
    /* Not enabled: the table was cleared (a block freed between the two
     * steps of disable is simply not found). */
    if (p == NULL || !atomic_load_explicit(&enabled, memory_order_relaxed) || in_hook)
        return p;
    in_hook = 1;
    struct ent e;
    if (table_remove((uintptr_t)p, &e) && e.python) {
        pb_heapmap_forget_block(p); /* into the heap map's freed history too */
        pb__quarantine_owner_freed(p); /* an ffi.new buffer a quarantine shadow copied dies */
        push_freed(e.ptr, e.size);
        if (atomic_load_explicit(&enabled, memory_order_relaxed) && e.size <= PB_POISON_MAX)
            p = hold_freed(p, e.size);
    }
    in_hook = 0;
    return p;
}

/* Fresh blocks are filled with PB_POISON (like glibc's MALLOC_PERTURB_):
 * what malloc hands out holds whatever the memory held before - often
 * pointers into since-freed Python memory - and a conservative scan would
 * take that garbage for pointers C keeps.  0xBE.. is never a canonical
 * address, and a program reading uninitialised memory sees a pattern rather
 * than plausible old data (so a bug is not masked).  Blocks over
 * PB_POISON_MAX come from mmap in practice (zero pages: nothing to hide) and
 * are left alone, so a huge sparse allocation is not touched page by page. */

static inline void poison(void *p, size_t from, size_t to)
{
    if (p != NULL && to > from && to <= PB_POISON_MAX && atomic_load_explicit(&enabled, memory_order_relaxed))
        memset((char *)p + from, PB_POISON, to - from);
}

static inline size_t forget_size(void *p)
{
    if (p == NULL || !atomic_load_explicit(&enabled, memory_order_relaxed) || in_hook)
        return 0;
    in_hook = 1;
    struct ent e;
    size_t size = table_remove((uintptr_t)p, &e) ? e.size : malloc_usable_size(p);
    in_hook = 0;
    return size;
}

/* The two hook sets differ only in the `python` flag they record. */
#define PB_DEFINE_HOOKS(prefix, PY)                                                      \
    static void *prefix##malloc(size_t n)                                                \
    {                                                                                    \
        void *p = malloc(n);                                                             \
        poison(p, 0, n);                                                                 \
        record(p, n, CALLER(), PY);                                                      \
        return p;                                                                        \
    }                                                                                    \
    static void *prefix##calloc(size_t n, size_t m)                                      \
    {                                                                                    \
        void *p = calloc(n, m);                                                          \
        record(p, n * m, CALLER(), PY);                                                  \
        return p;                                                                        \
    }                                                                                    \
    static void *prefix##realloc(void *old, size_t n)                                    \
    {                                                                                    \
        size_t was = old ? forget_size(old) : 0;                                         \
        void *p = realloc(old, n);                                                       \
        if (p != NULL)                                                                   \
            poison(p, was, n);                                                           \
        if (p != NULL)                                                                   \
            record(p, n, CALLER(), PY);                                                  \
        else if (old != NULL && n != 0)                                                  \
            record(old, malloc_usable_size(old), CALLER(), PY); /* failed: still live */ \
        return p;                                                                        \
    }                                                                                    \
    static void *prefix##reallocarray(void *old, size_t n, size_t m)                     \
    {                                                                                    \
        if (m && n > SIZE_MAX / m)                                                       \
            return reallocarray(old, n, m); /* sets ENOMEM, old untouched */             \
        size_t was = old ? forget_size(old) : 0;                                         \
        void *p = realloc(old, n * m);                                                   \
        if (p != NULL)                                                                   \
            poison(p, was, n * m);                                                       \
        if (p != NULL)                                                                   \
            record(p, n * m, CALLER(), PY);                                              \
        else if (old != NULL && n * m != 0)                                              \
            record(old, malloc_usable_size(old), CALLER(), PY);                          \
        return p;                                                                        \
    }                                                                                    \
    static void prefix##free(void *p)                                                    \
    {                                                                                    \
        free(forget(p));                                                                 \
    }                                                                                    \
    static int prefix##posix_memalign(void **out, size_t align, size_t n)                \
    {                                                                                    \
        int rc = posix_memalign(out, align, n);                                          \
        if (rc == 0)                                                                     \
            poison(*out, 0, n);                                                          \
        if (rc == 0)                                                                     \
            record(*out, n, CALLER(), PY);                                               \
        return rc;                                                                       \
    }                                                                                    \
    static void *prefix##aligned_alloc(size_t align, size_t n)                           \
    {                                                                                    \
        void *p = aligned_alloc(align, n);                                               \
        poison(p, 0, n);                                                         \
        record(p, n, CALLER(), PY);                                                      \
        return p;                                                                        \
    }                                                                                    \
    static void *prefix##memalign(size_t align, size_t n)                                \
    {                                                                                    \
        void *p = memalign(align, n);                                                    \
        poison(p, 0, n);                                                         \
        record(p, n, CALLER(), PY);                                                      \
        return p;                                                                        \
    }                                                                                    \
    static void *prefix##valloc(size_t n)                                                \
    {                                                                                    \
        void *p = valloc(n);                                                             \
        poison(p, 0, n);                                                         \
        record(p, n, CALLER(), PY);                                                      \
        return p;                                                                        \
    }                                                                                    \
    static char *prefix##strdup(const char *s)                                           \
    {                                                                                    \
        char *p = strdup(s);                                                             \
        record(p, p ? strlen(p) + 1 : 0, CALLER(), PY);                                  \
        return p;                                                                        \
    }                                                                                    \
    static char *prefix##strndup(const char *s, size_t n)                                \
    {                                                                                    \
        char *p = strndup(s, n);                                                         \
        record(p, p ? strlen(p) + 1 : 0, CALLER(), PY);                                  \
        return p;                                                                        \
    }

PB_DEFINE_HOOKS(hk_, 0)
PB_DEFINE_HOOKS(hp_, 1)

static void *hk_dlopen(const char *file, int mode)
{
    void *h = dlopen(file, mode);
    if (h != NULL && atomic_load(&enabled))
        pb__interpose_refresh();
    return h;
}

static int hk_dlclose(void *handle)
{
    int rc = dlclose(handle);
    if (atomic_load(&enabled))
        pb__interpose_refresh();
    return rc;
}

enum { HOOK_HEAP = 1, HOOK_DL = 2 };

struct hook {
    const char *name;
    void *c_hook;  /* for PB_OBJ_PATCHED objects */
    void *py_hook; /* for PB_OBJ_CFFI */
    int kind;
};

#define HOOK(name) {#name, (void *)hk_##name, (void *)hp_##name, HOOK_HEAP}
static const struct hook hooks[] = {
    HOOK(malloc),        HOOK(calloc),        HOOK(realloc), HOOK(reallocarray),
    HOOK(free),          HOOK(posix_memalign), HOOK(aligned_alloc), HOOK(memalign),
    HOOK(valloc),        HOOK(strdup),        HOOK(strndup),
    {"dlopen", (void *)hk_dlopen, (void *)hk_dlopen, HOOK_DL},
    {"dlclose", (void *)hk_dlclose, (void *)hk_dlclose, HOOK_DL},
};
#undef HOOK
#define NHOOKS (sizeof hooks / sizeof hooks[0])

static int is_hook_value(uintptr_t v)
{
    for (size_t i = 0; i < NHOOKS; i++)
        if (v == (uintptr_t)hooks[i].c_hook || v == (uintptr_t)hooks[i].py_hook)
            return 1;
    return 0;
}

/* ---- loaded objects and their GOT slots ------------------------------- */

struct obj {
    char *path;
    uintptr_t base;
    int klass;
    const ElfW(Phdr) *phdr;
    int phnum;
};

struct slot {
    uintptr_t addr;
    uintptr_t old;
};

/* Guards objs, slots and the patching itself.  Never taken by the malloc
 * hooks, so a library constructor allocating inside dlopen cannot deadlock
 * with a refresh. */
static pthread_mutex_t obj_lock = PTHREAD_MUTEX_INITIALIZER;
static struct obj *objs;
static size_t nobjs;
static struct slot *slots;
static size_t nslots;
static unsigned long long seen_adds = ~0ULL, seen_subs = ~0ULL;
static uint64_t objects_patched, rewalks;
static const char *own_path;

static const char *base_name(const char *path)
{
    const char *slash = strrchr(path, '/');
    return slash ? slash + 1 : path;
}

static int starts_with(const char *s, const char *prefix)
{
    return strncmp(s, prefix, strlen(prefix)) == 0;
}

int pb__interpose_classify(const char *path)
{
    if (path == NULL || path[0] == '\0')
        return PB_OBJ_SYSTEM; /* the main executable: CPython */
    const char *b = base_name(path);
    if (strstr(path, "linux-vdso") || strstr(path, "linux-gate") || starts_with(b, "ld-linux") ||
        starts_with(b, "ld64.so") || starts_with(b, "ld.so") || starts_with(b, "libc.so") ||
        starts_with(b, "libc-") || (own_path != NULL && strcmp(path, own_path) == 0))
        return PB_OBJ_SKIPPED;
    if (starts_with(b, "_cffi_backend"))
        return PB_OBJ_CFFI;
    static const char *const system_libs[] = {
        "libm.so", "libm-", "libpthread", "libdl.so", "libdl-", "librt.so", "librt-", "libutil.so",
        "libresolv", "libgcc_s", "libpython", "libffi.so", "libnsl", "libanl",
    };
    for (size_t i = 0; i < sizeof system_libs / sizeof system_libs[0]; i++)
        if (starts_with(b, system_libs[i]))
            return PB_OBJ_SYSTEM;
    /* Language runtimes (their constructors allocate while dlopen loads them,
     * before they can be patched, so their globals point to blocks the table
     * never saw) and numpy's core and bundled runtime libraries. */
    static const char *const runtimes[] = {
        "libstdc++", "libgfortran", "libquadmath", "libgomp", "libopenblas", "libscipy_openblas",
    };
    for (size_t i = 0; i < sizeof runtimes / sizeof runtimes[0]; i++)
        if (starts_with(b, runtimes[i]))
            return PB_OBJ_SYSTEM;
    if (strstr(path, "/lib-dynload/") || strstr(path, "_multiarray_umath") || strstr(path, "/numpy.libs/"))
        return PB_OBJ_SYSTEM;
    return PB_OBJ_PATCHED;
}

/* Writes one GOT slot without ever faulting: process_vm_writev refuses a
 * read-only page (EFAULT) and the page is then made writable for the write. */
static int write_slot(uintptr_t addr, uintptr_t value)
{
    struct iovec local = {&value, sizeof value}, remote = {(void *)addr, sizeof value};
    if (process_vm_writev(getpid(), &local, 1, &remote, 1, 0) == (ssize_t)sizeof value)
        return 0;
    long pagesize = sysconf(_SC_PAGESIZE);
    uintptr_t page = addr & ~(uintptr_t)(pagesize - 1);
    size_t len = (addr + sizeof value) - page;
    if (mprotect((void *)page, len, PROT_READ | PROT_WRITE) != 0)
        return -1;
    atomic_store_explicit((_Atomic uintptr_t *)addr, value, memory_order_relaxed);
    mprotect((void *)page, len, PROT_READ); /* a GOT page is never executable */
    return 0;
}

static int read_word(uintptr_t addr, uintptr_t *value)
{
    struct iovec local = {value, sizeof *value}, remote = {(void *)addr, sizeof *value};
    return process_vm_readv(getpid(), &local, 1, &remote, 1, 0) == (ssize_t)sizeof *value ? 0 : -1;
}

static uintptr_t dyn_ptr(uintptr_t base, ElfW(Addr) v)
{
    /* glibc relocates d_ptr in place for most objects (not the vDSO). */
    return v < base ? base + v : v;
}

struct slot_list {
    struct slot *s;
    size_t n, cap;
    int failed;
};

static void add_slot(struct slot_list *l, uintptr_t addr, uintptr_t old)
{
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 64;
        struct slot *s = realloc(l->s, cap * sizeof *s);
        if (s == NULL) {
            l->failed = 1;
            return;
        }
        l->s = s;
        l->cap = cap;
    }
    l->s[l->n++] = (struct slot){addr, old};
}

static uintptr_t previous_old(uintptr_t addr)
{
    for (size_t i = 0; i < nslots; i++)
        if (slots[i].addr == addr)
            return slots[i].old;
    return 0;
}

static void patch_relocs(const struct obj *o, const ElfW(Rela) *rel, size_t count, const ElfW(Sym) *symtab,
                         const char *strtab, struct slot_list *out)
{
    for (size_t i = 0; i < count; i++) {
        unsigned type = (unsigned)PB_R_TYPE(rel[i].r_info);
        /* JUMP_SLOT: PLT calls; GLOB_DAT: -fno-plt calls and &free taken in
         * code; ABS64 with no addend: &free stored in static data (e.g.
         * _cffi_backend's `tp_free = free`). */
        if (type != PB_R_JUMP_SLOT && type != PB_R_GLOB_DAT && !(type == PB_R_ABS && rel[i].r_addend == 0))
            continue;
        size_t symi = PB_R_SYM(rel[i].r_info);
        if (symi == 0)
            continue;
        const char *name = strtab + symtab[symi].st_name;
        for (size_t h = 0; h < NHOOKS; h++) {
            if (strcmp(name, hooks[h].name) != 0)
                continue;
            if (hooks[h].kind == HOOK_HEAP && o->klass != PB_OBJ_PATCHED && o->klass != PB_OBJ_CFFI)
                break;
            uintptr_t addr = o->base + rel[i].r_offset, cur;
            if (read_word(addr, &cur) != 0)
                break;
            uintptr_t want = (uintptr_t)(o->klass == PB_OBJ_CFFI ? hooks[h].py_hook : hooks[h].c_hook);
            uintptr_t old = cur;
            if (is_hook_value(cur)) {
                old = previous_old(addr);
                if (old == 0)
                    old = (uintptr_t)dlsym(RTLD_DEFAULT, name);
            }
            if (cur != want && write_slot(addr, want) != 0)
                break;
            add_slot(out, addr, old);
            break;
        }
    }
}

static void patch_object(const struct obj *o, struct slot_list *out)
{
    const ElfW(Dyn) *dyn = NULL;
    for (int i = 0; i < o->phnum; i++)
        if (o->phdr[i].p_type == PT_DYNAMIC)
            dyn = (const ElfW(Dyn) *)(o->base + o->phdr[i].p_vaddr);
    if (dyn == NULL)
        return;
    const ElfW(Sym) *symtab = NULL;
    const char *strtab = NULL;
    const ElfW(Rela) *jmprel = NULL, *rela = NULL;
    size_t jmpsz = 0, relasz = 0;
    int pltrel = DT_RELA;
    for (const ElfW(Dyn) *d = dyn; d->d_tag != DT_NULL; d++) {
        switch (d->d_tag) {
        case DT_SYMTAB: symtab = (const ElfW(Sym) *)dyn_ptr(o->base, d->d_un.d_ptr); break;
        case DT_STRTAB: strtab = (const char *)dyn_ptr(o->base, d->d_un.d_ptr); break;
        case DT_JMPREL: jmprel = (const ElfW(Rela) *)dyn_ptr(o->base, d->d_un.d_ptr); break;
        case DT_PLTRELSZ: jmpsz = d->d_un.d_val; break;
        case DT_RELA: rela = (const ElfW(Rela) *)dyn_ptr(o->base, d->d_un.d_ptr); break;
        case DT_RELASZ: relasz = d->d_un.d_val; break;
        case DT_PLTREL: pltrel = (int)d->d_un.d_val; break;
        default: break;
        }
    }
    if (symtab == NULL || strtab == NULL || pltrel != DT_RELA)
        return;
    size_t before = out->n;
    if (jmprel)
        patch_relocs(o, jmprel, jmpsz / sizeof *jmprel, symtab, strtab, out);
    if (rela)
        patch_relocs(o, rela, relasz / sizeof *rela, symtab, strtab, out);
    if (out->n > before && (o->klass == PB_OBJ_PATCHED || o->klass == PB_OBJ_CFFI))
        objects_patched++;
}

struct walk {
    struct obj *o;
    size_t n, cap;
    int failed;
    unsigned long long adds, subs;
};

static int collect(struct dl_phdr_info *info, size_t size, void *data)
{
    struct walk *w = data;
    if (size >= offsetof(struct dl_phdr_info, dlpi_subs) + sizeof info->dlpi_subs) {
        w->adds = info->dlpi_adds;
        w->subs = info->dlpi_subs;
    }
    if (w->n == w->cap) {
        size_t cap = w->cap ? w->cap * 2 : 64;
        struct obj *o = realloc(w->o, cap * sizeof *o);
        if (o == NULL) {
            w->failed = 1;
            return 1;
        }
        w->o = o;
        w->cap = cap;
    }
    const char *name = info->dlpi_name ? info->dlpi_name : "";
    char *path = strdup(name);
    if (path == NULL) {
        w->failed = 1;
        return 1;
    }
    w->o[w->n++] = (struct obj){path, (uintptr_t)info->dlpi_addr, pb__interpose_classify(name),
                                info->dlpi_phdr, info->dlpi_phnum};
    return 0;
}

static int counters(struct dl_phdr_info *info, size_t size, void *data)
{
    unsigned long long *c = data;
    if (size >= offsetof(struct dl_phdr_info, dlpi_subs) + sizeof info->dlpi_subs) {
        c[0] = info->dlpi_adds;
        c[1] = info->dlpi_subs;
    }
    return 1;
}

static void free_objs(struct obj *o, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(o[i].path);
    free(o);
}

/* Re-reads the objects and (re)patches them.  obj_lock held. */
static int rewalk_locked(void)
{
    struct walk w = {0};
    dl_iterate_phdr(collect, &w);
    if (w.failed) {
        free_objs(w.o, w.n);
        return PB_ERR_NOMEM;
    }
    struct slot_list list = {0};
    objects_patched = 0;
    for (size_t i = 0; i < w.n; i++)
        if (w.o[i].klass != PB_OBJ_SKIPPED)
            patch_object(&w.o[i], &list);
    free_objs(objs, nobjs);
    objs = w.o;
    nobjs = w.n;
    free(slots);
    slots = list.s;
    nslots = list.n;
    seen_adds = w.adds;
    seen_subs = w.subs;
    rewalks++;
    return list.failed ? PB_ERR_NOMEM : PB_OK;
}

static void fork_prepare(void)
{
    pthread_mutex_lock(&obj_lock);
    for (size_t i = 0; i < NSHARD; i++)
        shard_lock(&shards[i]);
    big_lock();
    while (atomic_exchange_explicit(&freed_lock, 1, memory_order_acquire))
        sched_yield();
}

static void fork_release(void)
{
    atomic_store_explicit(&freed_lock, 0, memory_order_release);
    big_unlock();
    for (size_t i = NSHARD; i-- > 0;)
        shard_unlock(&shards[i]);
    pthread_mutex_unlock(&obj_lock);
}

int pb__interpose_enable(void)
{
#ifdef PB_NO_INTERPOSE
    return PB_ERR_INVALID;
#else
    static int atfork_ok;
    pthread_mutex_lock(&obj_lock);
    if (atomic_load(&enabled)) {
        pthread_mutex_unlock(&obj_lock);
        return 1;
    }
    if (!atfork_ok)
        atfork_ok = pthread_atfork(fork_prepare, fork_release, fork_release) == 0;
    if (own_path == NULL) {
        Dl_info info;
        if (dladdr((void *)pb__interpose_enable, &info) && info.dli_fname)
            own_path = strdup(info.dli_fname);
    }
    atomic_store(&enabled, 1);
    int rc = rewalk_locked();
    pthread_mutex_unlock(&obj_lock);
    if (rc != PB_OK) {
        pb__interpose_disable();
        return rc;
    }
    return 0;
#endif
}

int pb__interpose_disable(void)
{
    pthread_mutex_lock(&obj_lock);
    if (!atomic_load(&enabled)) {
        pthread_mutex_unlock(&obj_lock);
        return 1;
    }
    atomic_store(&enabled, 0);
    /* Restore only slots of objects still loaded (an unloaded one is gone). */
    unsigned long long c[2] = {0, 0};
    dl_iterate_phdr(counters, c);
    if (c[0] != seen_adds || c[1] != seen_subs) {
        /* Something changed since the last walk: keep only slots inside
         * objects loaded now. */
        for (size_t i = 0; i < nslots; i++)
            if (pb__interpose_is_loaded(slots[i].addr, sizeof(uintptr_t)))
                write_slot(slots[i].addr, slots[i].old);
    } else {
        for (size_t i = 0; i < nslots; i++)
            write_slot(slots[i].addr, slots[i].old);
    }
    free(slots);
    slots = NULL;
    nslots = 0;
    free_objs(objs, nobjs);
    objs = NULL;
    nobjs = 0;
    objects_patched = 0;
    seen_adds = seen_subs = ~0ULL;
    pthread_mutex_unlock(&obj_lock);
    table_clear();
    release_held();
    return 0;
}

int pb__interpose_refresh(void)
{
    if (!atomic_load(&enabled))
        return 0;
    unsigned long long c[2] = {0, 0};
    dl_iterate_phdr(counters, c);
    pthread_mutex_lock(&obj_lock);
    int changed = atomic_load(&enabled) && (c[0] != seen_adds || c[1] != seen_subs);
    if (changed)
        rewalk_locked();
    pthread_mutex_unlock(&obj_lock);
    return changed;
}

int pb__interpose_object(size_t i, const char **path, int *klass, uintptr_t *base)
{
    pthread_mutex_lock(&obj_lock);
    int ok = i < nobjs;
    if (ok) {
        *path = objs[i].path;
        *klass = objs[i].klass;
        *base = objs[i].base;
    }
    pthread_mutex_unlock(&obj_lock);
    return ok;
}

void pb__interpose_get_stats(struct pb_interpose_stats *out)
{
    memset(out, 0, sizeof *out);
    for (size_t i = 0; i < NSHARD; i++) {
        struct shard *s = &shards[i];
        shard_lock(s);
        out->live_blocks += s->used;
        out->live_bytes += s->bytes;
        out->python_blocks += s->python;
        out->allocations += s->allocations;
        out->frees += s->frees;
        out->foreign_frees += s->foreign;
        shard_unlock(s);
    }
    pthread_mutex_lock(&obj_lock);
    out->objects_patched = objects_patched;
    out->slots_patched = nslots;
    out->rewalks = rewalks;
    out->enabled = atomic_load(&enabled);
    held_counts(&out->held_blocks, &out->held_bytes);
    pthread_mutex_unlock(&obj_lock);
}

size_t pb__interpose_foreach_segment(void (*visit)(uintptr_t base, size_t size, const char *path, void *ctx),
                                     void *ctx)
{
    size_t n = 0;
    pthread_mutex_lock(&obj_lock);
    for (size_t i = 0; atomic_load(&enabled) && i < nobjs; i++) {
        const struct obj *o = &objs[i];
        if (o->klass != PB_OBJ_PATCHED)
            continue;
        for (int k = 0; k < o->phnum; k++) {
            const ElfW(Phdr) *ph = &o->phdr[k];
            if (ph->p_type != PT_LOAD || !(ph->p_flags & PF_W) || ph->p_memsz == 0)
                continue;
            visit(o->base + ph->p_vaddr, ph->p_memsz, o->path, ctx);
            n++;
        }
    }
    pthread_mutex_unlock(&obj_lock);
    return n;
}

struct loaded_ctx {
    uintptr_t base, end;
    int found;
};

static int loaded_one(struct dl_phdr_info *info, size_t size, void *data)
{
    (void)size;
    struct loaded_ctx *c = data;
    for (int i = 0; i < info->dlpi_phnum; i++) {
        const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
        if (ph->p_type != PT_LOAD)
            continue;
        uintptr_t lo = info->dlpi_addr + ph->p_vaddr, hi = lo + ph->p_memsz;
        if (c->base >= lo && c->end <= hi) {
            c->found = 1;
            return 1;
        }
    }
    return 0;
}

int pb__interpose_is_loaded(uintptr_t base, size_t size)
{
    struct loaded_ctx c = {base, base + size, 0};
    dl_iterate_phdr(loaded_one, &c);
    return c.found;
}

struct segments_ctx {
    uintptr_t *ranges;
    size_t cap, n;
};

static int segments_one(struct dl_phdr_info *info, size_t size, void *data)
{
    (void)size;
    struct segments_ctx *c = data;
    for (int i = 0; i < info->dlpi_phnum; i++) {
        const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
        if (ph->p_type != PT_LOAD || ph->p_memsz == 0)
            continue;
        if (c->n < c->cap) {
            c->ranges[2 * c->n] = info->dlpi_addr + ph->p_vaddr;
            c->ranges[2 * c->n + 1] = info->dlpi_addr + ph->p_vaddr + ph->p_memsz;
        }
        c->n++;
    }
    return 0;
}

/* Up to cap ranges into ranges[] (see pb__loaded_segments_alloc); returns
 * how many there are, which may exceed cap. */
static size_t loaded_segments(uintptr_t *ranges, size_t cap)
{
    struct segments_ctx c = {ranges, cap, 0};
    dl_iterate_phdr(segments_one, &c);
    if (c.n > cap)
        return c.n;
    /* Insertion sort by start (a few hundred segments, mostly in order already), then merge. */
    for (size_t i = 1; i < c.n; i++) {
        uintptr_t a = ranges[2 * i], b = ranges[2 * i + 1];
        size_t j = i;
        for (; j > 0 && ranges[2 * (j - 1)] > a; j--) {
            ranges[2 * j] = ranges[2 * (j - 1)];
            ranges[2 * j + 1] = ranges[2 * (j - 1) + 1];
        }
        ranges[2 * j] = a;
        ranges[2 * j + 1] = b;
    }
    size_t m = 0;
    for (size_t i = 0; i < c.n; i++) {
        if (m > 0 && ranges[2 * i] <= ranges[2 * (m - 1) + 1]) {
            if (ranges[2 * i + 1] > ranges[2 * (m - 1) + 1])
                ranges[2 * (m - 1) + 1] = ranges[2 * i + 1];
            continue;
        }
        ranges[2 * m] = ranges[2 * i];
        ranges[2 * m + 1] = ranges[2 * i + 1];
        m++;
    }
    return m;
}

uintptr_t *pb__loaded_segments_alloc(size_t *n)
{
    size_t cap = 512;
    for (;;) {
        uintptr_t *r = malloc(2 * cap * sizeof *r);
        if (r == NULL)
            return NULL;
        size_t got = loaded_segments(r, cap);
        if (got <= cap) {
            *n = got;
            return r;
        }
        free(r); /* a library was loaded in between: room for it and a few more */
        cap = got + 64;
    }
}

int pb__segments_overlap(const uintptr_t *ranges, size_t n, uintptr_t start, size_t size)
{
    uintptr_t end = start + (size ? size : 1);
    size_t lo = 0, hi = n; /* the first range whose end is > start */
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (ranges[2 * mid + 1] <= start)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < n && ranges[2 * lo] < end;
}
