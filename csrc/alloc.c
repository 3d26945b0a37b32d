/*
 * alloc.c - the tracked allocator.
 *
 * Every live block is recorded in an open-addressing hash table keyed by its
 * address, so pb_free can tell a block it handed out from any other pointer
 * without reading memory in front of the pointer (which, for a foreign
 * pointer, could itself fault).  A ring of the last FREED_RING freed
 * addresses lets a second free be reported as a double free rather than as an
 * unknown pointer; it is only read on that error path.  (An address freed by
 * pb_free and then reused by the system malloc for someone else's block is
 * reported as a double free too: both are bugs, only the wording differs.)
 * One mutex guards the table and the counters; pthread_atfork handlers take
 * it around fork() so a child never inherits it locked by a thread that does
 * not exist there.
 *
 * Every block has an owner.  Blocks from pb_malloc and friends belong to the
 * caller (C).  Blocks that back a live Python CBuffer (pb__alloc_owned) are
 * flagged PYOWNED: pb_free, pb_realloc and ptrbridge.free refuse them with
 * PB_ERR_PY_OWNED, because the CBuffer would go on using (and later free) the
 * memory.  CBuffer.transfer() turns a PYOWNED block into a TRANSFERRED one,
 * which belongs to C from then on.  Each block also carries the opaque
 * creation-site id the Python side gave it (0 for C allocations).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "pb_internal.h"

#define SLOT_EMPTY ((uintptr_t)0)
#define SLOT_TOMBSTONE ((uintptr_t)1)
#define FREED_RING 4096
#define FLAG_TRANSFERRED 1u
#define FLAG_PYOWNED 2u

struct block {
    uintptr_t addr; /* SLOT_EMPTY, SLOT_TOMBSTONE or a live block */
    size_t size;
    uint32_t flags;
    uint32_t site; /* creation-site id from Python (pysite.c), 0 if none */
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct block *table;
static size_t table_cap;  /* power of two, or 0 before the first block */
static size_t table_used; /* live + tombstones */
static struct pb_alloc_stats counters;
static uintptr_t freed_ring[FREED_RING];
static size_t freed_next;

static size_t hash_addr(uintptr_t a)
{
    /* malloc results are 16-byte aligned; mix the high bits down. */
    uint64_t x = (uint64_t)a >> 4;
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    return (size_t)x;
}

/* Returns the slot holding addr, or NULL.  Lock held. */
static struct block *find(uintptr_t addr)
{
    if (table_cap == 0)
        return NULL;
    size_t mask = table_cap - 1;
    for (size_t i = hash_addr(addr) & mask;; i = (i + 1) & mask) {
        if (table[i].addr == addr)
            return &table[i];
        if (table[i].addr == SLOT_EMPTY)
            return NULL;
    }
}

/* Inserts without checking capacity.  Lock held. */
static void insert_raw(struct block *tab, size_t cap, uintptr_t addr, size_t size, uint32_t flags,
                       uint32_t site)
{
    size_t mask = cap - 1;
    size_t i = hash_addr(addr) & mask;
    while (tab[i].addr != SLOT_EMPTY && tab[i].addr != SLOT_TOMBSTONE)
        i = (i + 1) & mask;
    tab[i].addr = addr;
    tab[i].size = size;
    tab[i].flags = flags;
    tab[i].site = site;
}

/* Makes room for one more entry: load (live + tombstones) stays at or below
 * one half; a rehash drops the tombstones and leaves the load at or below one
 * quarter.  Lock held.  Returns 0 or -1 (out of memory; table unchanged). */
static int reserve_one(void)
{
    if ((table_used + 1) * 2 <= table_cap)
        return 0;
    size_t live = (size_t)counters.live_blocks;
    size_t cap = 64;
    while ((live + 1) * 4 > cap)
        cap *= 2;
    struct block *tab = calloc(cap, sizeof *tab);
    if (tab == NULL)
        return -1;
    for (size_t i = 0; i < table_cap; i++)
        if (table[i].addr > SLOT_TOMBSTONE)
            insert_raw(tab, cap, table[i].addr, table[i].size, table[i].flags, table[i].site);
    free(table);
    table = tab;
    table_cap = cap;
    table_used = live;
    return 0;
}

static int was_freed(uintptr_t addr)
{
    for (size_t i = 0; i < FREED_RING; i++)
        if (freed_ring[i] == addr)
            return 1;
    return 0;
}

static void note_alloc(size_t size)
{
    counters.allocations++;
    counters.live_blocks++;
    counters.live_bytes += size;
    if (counters.live_bytes > counters.peak_bytes)
        counters.peak_bytes = counters.live_bytes;
}

static void note_free(const struct block *b)
{
    counters.frees++;
    counters.live_blocks--;
    counters.live_bytes -= b->size;
    if (b->flags & FLAG_TRANSFERRED)
        counters.transferred--;
}

/* Records a fresh block; frees it and returns NULL if the table cannot grow. */
static void *track(void *p, size_t size, uint32_t flags, uint32_t site)
{
    if (p == NULL)
        return NULL;
    pthread_mutex_lock(&lock);
    if (reserve_one() != 0) {
        pthread_mutex_unlock(&lock);
        free(p);
        errno = ENOMEM;
        return NULL;
    }
    insert_raw(table, table_cap, (uintptr_t)p, size, flags, site);
    table_used++;
    note_alloc(size);
    if (flags & FLAG_TRANSFERRED)
        counters.transferred++;
    pthread_mutex_unlock(&lock);
    return p;
}

PB_API void *pb_malloc(size_t size)
{
    return track(malloc(size ? size : 1), size, 0, 0);
}

PB_API void *pb_calloc(size_t count, size_t size)
{
    if (size != 0 && count > SIZE_MAX / size) {
        errno = ENOMEM;
        return NULL;
    }
    size_t total = count * size;
    return track(calloc(total ? total : 1, 1), total, 0, 0);
}

void *pb__alloc_owned(size_t size, int zero, uint32_t site)
{
    void *p = zero ? calloc(size ? size : 1, 1) : malloc(size ? size : 1);
    return track(p, size, FLAG_PYOWNED, site);
}

/* Status for a pointer that is not a live block.  Lock held. */
static int classify_unknown(uintptr_t addr)
{
    return was_freed(addr) ? PB_ERR_DOUBLE_FREE : PB_ERR_NOT_OWNED;
}

static void report_bad_free(const char *fn, const void *ptr, int status)
{
    if (status == PB_ERR_PY_OWNED)
        pb__report("%s: %p belongs to a live Python CBuffer, which still uses and will free it; "
                   "nothing was freed (call CBuffer.transfer() to give it to C)", fn, ptr);
    else if (status == PB_ERR_DOUBLE_FREE)
        pb__report("%s: double free of %p (block was already freed)", fn, ptr);
    else
        pb__report("%s: %p was not allocated by the ptrbridge allocator; nothing was freed", fn, ptr);
}

/* Frees a live block if its PYOWNED flag equals `pyowned`. */
static int free_block(void *ptr, uint32_t pyowned)
{
    if (ptr == NULL)
        return PB_OK;
    pthread_mutex_lock(&lock);
    struct block *b = find((uintptr_t)ptr);
    if (b == NULL) {
        int status = classify_unknown((uintptr_t)ptr);
        pthread_mutex_unlock(&lock);
        return status;
    }
    if ((b->flags & FLAG_PYOWNED) != pyowned) {
        pthread_mutex_unlock(&lock);
        return pyowned ? PB_ERR_NOT_OWNED : PB_ERR_PY_OWNED;
    }
    note_free(b);
    b->addr = SLOT_TOMBSTONE;
    freed_ring[freed_next] = (uintptr_t)ptr;
    freed_next = (freed_next + 1) % FREED_RING;
    pthread_mutex_unlock(&lock);
    free(ptr);
    return PB_OK;
}

int pb__free_quiet(void *ptr)
{
    return free_block(ptr, 0);
}

int pb__free_owned(void *ptr)
{
    return free_block(ptr, FLAG_PYOWNED);
}

PB_API int pb_free(void *ptr)
{
    int status = pb__free_quiet(ptr);
    if (status != PB_OK)
        report_bad_free("pb_free", ptr, status);
    return status;
}

void *pb__realloc_quiet(void *ptr, size_t size, int *status)
{
    *status = PB_OK;
    if (ptr == NULL) {
        void *p = pb_malloc(size);
        if (p == NULL)
            *status = PB_ERR_NOMEM;
        return p;
    }
    if (size == 0) {
        *status = pb__free_quiet(ptr);
        return NULL;
    }
    /* The block is taken out of the table while the system realloc runs, so
     * that a concurrent pb_free of the same pointer is refused.  Room for the
     * new entry is made first, so that recording it afterwards cannot fail. */
    pthread_mutex_lock(&lock);
    struct block *b = find((uintptr_t)ptr);
    if (b == NULL) {
        *status = classify_unknown((uintptr_t)ptr);
        pthread_mutex_unlock(&lock);
        return NULL;
    }
    if (b->flags & FLAG_PYOWNED) {
        *status = PB_ERR_PY_OWNED;
        pthread_mutex_unlock(&lock);
        return NULL;
    }
    if (reserve_one() != 0) {
        pthread_mutex_unlock(&lock);
        *status = PB_ERR_NOMEM;
        return NULL;
    }
    b = find((uintptr_t)ptr); /* the table may have been rehashed */
    struct block old = *b;
    b->addr = SLOT_TOMBSTONE;
    counters.live_blocks--;
    counters.live_bytes -= old.size;
    pthread_mutex_unlock(&lock);

    void *q = realloc(ptr, size);

    pthread_mutex_lock(&lock);
    /* Other threads may have inserted since; keep the load bound if we can.
     * Even if this fails there is a free slot: every insert reserved one. */
    (void)reserve_one();
    uintptr_t addr = q ? (uintptr_t)q : old.addr;
    size_t new_size = q ? size : old.size;
    insert_raw(table, table_cap, addr, new_size, old.flags, old.site);
    table_used++;
    counters.live_blocks++;
    counters.live_bytes += new_size;
    if (counters.live_bytes > counters.peak_bytes)
        counters.peak_bytes = counters.live_bytes;
    pthread_mutex_unlock(&lock);
    if (q == NULL)
        *status = PB_ERR_NOMEM; /* the old block is still valid */
    return q;
}

PB_API void *pb_realloc(void *ptr, size_t size)
{
    int status;
    void *q = pb__realloc_quiet(ptr, size, &status);
    if (status == PB_ERR_NOT_OWNED || status == PB_ERR_DOUBLE_FREE || status == PB_ERR_PY_OWNED) {
        report_bad_free("pb_realloc", ptr, status);
        errno = EINVAL;
    } else if (status == PB_ERR_NOMEM) {
        errno = ENOMEM;
    }
    return q;
}

PB_API size_t pb_alloc_size(const void *ptr)
{
    if (ptr == NULL)
        return 0;
    pthread_mutex_lock(&lock);
    struct block *b = find((uintptr_t)ptr);
    size_t size = b ? b->size : 0;
    pthread_mutex_unlock(&lock);
    return size;
}

size_t pb__alloc_block_size(uintptr_t addr)
{
    return pb_alloc_size((const void *)addr);
}

int pb__alloc_set_transferred(void *ptr, int on)
{
    pthread_mutex_lock(&lock);
    struct block *b = find((uintptr_t)ptr);
    if (b == NULL) {
        pthread_mutex_unlock(&lock);
        return PB_ERR_NOT_OWNED;
    }
    int was = (b->flags & FLAG_TRANSFERRED) != 0;
    if (on && !was) {
        b->flags = (b->flags | FLAG_TRANSFERRED) & ~FLAG_PYOWNED;
        counters.transferred++;
    } else if (!on && was) {
        b->flags = (b->flags & ~FLAG_TRANSFERRED) | FLAG_PYOWNED;
        counters.transferred--;
    }
    pthread_mutex_unlock(&lock);
    return PB_OK;
}

int pb__alloc_owner(uintptr_t addr)
{
    pthread_mutex_lock(&lock);
    struct block *b = find(addr);
    int owner = b == NULL ? 0 : (b->flags & FLAG_PYOWNED) ? 1 : (b->flags & FLAG_TRANSFERRED) ? 3 : 2;
    pthread_mutex_unlock(&lock);
    return owner;
}

size_t pb__alloc_transferred(uintptr_t *addr, size_t *size, uint32_t *site, size_t cap)
{
    size_t n = 0;
    pthread_mutex_lock(&lock);
    for (size_t i = 0; i < table_cap; i++) {
        if (table[i].addr <= SLOT_TOMBSTONE || !(table[i].flags & FLAG_TRANSFERRED))
            continue;
        if (n < cap) {
            addr[n] = table[i].addr;
            size[n] = table[i].size;
            site[n] = table[i].site;
        }
        n++;
    }
    pthread_mutex_unlock(&lock);
    return n;
}

PB_API void pb_alloc_get_stats(struct pb_alloc_stats *out)
{
    if (out == NULL)
        return;
    pthread_mutex_lock(&lock);
    *out = counters;
    pthread_mutex_unlock(&lock);
}

PB_API int pb_alloc_foreach(pb_block_visitor visit, void *ctx)
{
    if (visit == NULL)
        return PB_ERR_INVALID;
    int rc = 0;
    pthread_mutex_lock(&lock);
    for (size_t i = 0; i < table_cap && rc == 0; i++)
        if (table[i].addr > SLOT_TOMBSTONE)
            rc = visit((void *)table[i].addr, table[i].size, ctx);
    pthread_mutex_unlock(&lock);
    return rc;
}

PB_FORK_SAFE_LOCK(lock);

void *pb__untracked_calloc(size_t size)
{
    return calloc(size ? size : 1, 1);
}

void pb__untracked_free(void *ptr)
{
    free(ptr);
}
