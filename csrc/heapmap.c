/*
 * heapmap.c - index of every live Python heap block (check level 2).
 *
 * Hooks on PYMEM_DOMAIN_RAW, _MEM and _OBJ delegate to the allocators that
 * were installed before them, so every block is allocated and freed by the
 * same underlying allocator whether or not the hooks are on when it is freed.
 *
 * Index: an open-addressing table keyed by block start (size as value).  An
 * address inside a small block (<= 512 bytes, 16-byte aligned, as pymalloc
 * and malloc give) is found by probing starts up to 512 bytes below it; larger
 * blocks are also entered, per 64 KiB chunk they cover, in a chunk multimap.
 * Freed blocks go to a ring the retention scanner takes from, and are held
 * in a bounded per-domain quarantine before they are really freed.  The RAW domain
 * is called without the GIL, so a spinlock guards everything.  The index's
 * own memory comes from malloc, never from the hooked allocators.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "pb_heapmap.h"
#include "pb_scan.h"

#define SMALL_MAX 512
#define SMALL_ALIGN 16
#define CHUNK_SHIFT 16
#define FREED_RING 65536
#define EMPTY ((uintptr_t)0)
#define TOMB ((uintptr_t)1)

struct entry {
    uintptr_t key; /* block start, or chunk number + 2 in the chunk map */
    uintptr_t value; /* block size, or block start in the chunk map */
};

struct table {
    struct entry *slots;
    size_t cap; /* power of two or 0 */
    size_t used; /* live + tombstones */
};

/* Freed blocks are held back per domain before the underlying allocator
 * gets them, so their memory is not reused before the retention scanner has
 * looked for pointers into them (the sanitizer "quarantine").  A block is
 * evicted (really freed) by a later free in the same domain, which is called
 * under the same rules (with or without the GIL) as the original free. */
#define QUARANTINE_BLOCKS 8192
#define QUARANTINE_BYTES ((size_t)16 << 20)

struct domain {
    PyMemAllocatorDomain id;
    PyMemAllocatorEx orig;
    PyMemAllocatorEx hook;
    void *held[QUARANTINE_BLOCKS];
    size_t held_size[QUARANTINE_BLOCKS];
    size_t held_head, held_count, held_bytes;
};

static atomic_flag spin = ATOMIC_FLAG_INIT;
static struct table blocks, chunks;
static struct {
    uintptr_t start;
    size_t size;
} freed[FREED_RING];
static size_t freed_head, freed_count;
static uint64_t freed_dropped;
static struct pb_heapmap_stats counters;
static struct domain domains[3];
static int installed;

static void lock(void)
{
    while (atomic_flag_test_and_set_explicit(&spin, memory_order_acquire))
        ;
}

static void unlock(void)
{
    atomic_flag_clear_explicit(&spin, memory_order_release);
}

static size_t mix(uintptr_t k)
{
    uint64_t x = (uint64_t)k;
    x ^= x >> 31;
    x *= 0x9e3779b97f4a7c15ULL;
    x ^= x >> 29;
    return (size_t)x;
}

/* Makes room for one more entry (load <= 1/2).  Lock held.  0 or -1. */
static int reserve(struct table *t)
{
    if ((t->used + 1) * 2 <= t->cap)
        return 0;
    size_t live = 0;
    for (size_t i = 0; i < t->cap; i++)
        live += t->slots[i].key > TOMB;
    size_t cap = 1024;
    while ((live + 1) * 4 > cap)
        cap *= 2;
    struct entry *slots = calloc(cap, sizeof *slots);
    if (slots == NULL)
        return -1;
    for (size_t i = 0; i < t->cap; i++) {
        if (t->slots[i].key <= TOMB)
            continue;
        size_t j = mix(t->slots[i].key) & (cap - 1);
        while (slots[j].key != EMPTY)
            j = (j + 1) & (cap - 1);
        slots[j] = t->slots[i];
    }
    free(t->slots);
    t->slots = slots;
    t->cap = cap;
    t->used = live;
    return 0;
}

static void put(struct table *t, uintptr_t key, uintptr_t value)
{
    if (reserve(t) != 0)
        return; /* out of memory: the block is simply not indexed */
    size_t j = mix(key) & (t->cap - 1);
    while (t->slots[j].key > TOMB)
        j = (j + 1) & (t->cap - 1);
    if (t->slots[j].key == EMPTY)
        t->used++;
    t->slots[j].key = key;
    t->slots[j].value = value;
}

/* Finds the entry with this key (and value, if match_value). */
static struct entry *get(const struct table *t, uintptr_t key, int match_value, uintptr_t value)
{
    if (t->cap == 0)
        return NULL;
    for (size_t j = mix(key) & (t->cap - 1);; j = (j + 1) & (t->cap - 1)) {
        struct entry *e = &t->slots[j];
        if (e->key == EMPTY)
            return NULL;
        if (e->key == key && (!match_value || e->value == value))
            return e;
    }
}

static size_t forget_locked(uintptr_t start, int to_freed);

static void record(void *p, size_t size)
{
    uintptr_t start = (uintptr_t)p;
    lock();
    struct entry *known = get(&blocks, start, 0, 0);
    if (known != NULL && known->value == size) {
        /* Seen already: pymalloc serves large object-domain requests from
         * the raw domain, so both hooks see the same block. */
        unlock();
        return;
    }
    if (known != NULL)
        forget_locked(start, 0);
    put(&blocks, start, size);
    if (size > SMALL_MAX)
        for (uintptr_t c = start >> CHUNK_SHIFT; c <= (start + size - 1) >> CHUNK_SHIFT; c++)
            put(&chunks, c + 2, start);
    counters.allocations++;
    counters.live_blocks++;
    counters.live_bytes += size;
    unlock();
}

/* Appends a freed block to the ring, dropping the oldest when full.  Lock held. */
static void push_freed_locked(uintptr_t start, size_t size)
{
    size_t slot = (freed_head + freed_count) % FREED_RING;
    if (freed_count == FREED_RING) {
        freed_head = (freed_head + 1) % FREED_RING;
        freed_dropped++;
    } else {
        freed_count++;
    }
    freed[slot].start = start;
    freed[slot].size = size;
}

/* Forgets a block; returns its size (0 if unknown).  Lock held. */
static size_t forget_locked(uintptr_t start, int to_freed)
{
    struct entry *e = get(&blocks, start, 0, 0);
    if (e == NULL)
        return 0;
    size_t size = e->value;
    e->key = TOMB;
    if (size > SMALL_MAX)
        for (uintptr_t c = start >> CHUNK_SHIFT; c <= (start + size - 1) >> CHUNK_SHIFT; c++) {
            struct entry *ce = get(&chunks, c + 2, 1, start);
            if (ce != NULL)
                ce->key = TOMB;
        }
    counters.frees++;
    counters.live_blocks--;
    counters.live_bytes -= size;
    if (to_freed)
        push_freed_locked(start, size);
    return size;
}

static void *hook_malloc(void *ctx, size_t size)
{
    struct domain *d = ctx;
    void *p = d->orig.malloc(d->orig.ctx, size);
    if (p != NULL)
        record(p, size ? size : 1);
    return p;
}

static void *hook_calloc(void *ctx, size_t n, size_t elsize)
{
    struct domain *d = ctx;
    void *p = d->orig.calloc(d->orig.ctx, n, elsize);
    size_t total = n * elsize;
    if (p != NULL)
        record(p, total != 0 ? total : 1);
    return p;
}

static void *hook_realloc(void *ctx, void *ptr, size_t size)
{
    struct domain *d = ctx;
    size_t old = 0;
    if (ptr != NULL) {
        /* Forget first: once the allocator has the block back, another
         * thread may be handed the same address. */
        lock();
        old = forget_locked((uintptr_t)ptr, 0);
        unlock();
    }
    void *q = d->orig.realloc(d->orig.ctx, ptr, size);
    if (q == NULL) {
        if (old)
            record(ptr, old); /* the old block is still valid */
        return NULL;
    }
    if (ptr != NULL && q != ptr && old) {
        lock();
        push_freed_locked((uintptr_t)ptr, old); /* moved: the old block is freed */
        unlock();
    }
    record(q, size ? size : 1);
    return q;
}

static void hook_free(void *ctx, void *ptr)
{
    struct domain *d = ctx;
    if (ptr == NULL)
        return;
    void *evict[4];
    int n_evict = 0;
    lock();
    size_t size = forget_locked((uintptr_t)ptr, 1);
    if (size == 0) {
        unlock(); /* allocated before the hooks: not ours to hold */
        d->orig.free(d->orig.ctx, ptr);
        return;
    }
    while ((d->held_count == QUARANTINE_BLOCKS || d->held_bytes + size > QUARANTINE_BYTES) &&
           d->held_count > 0 && n_evict < 4) {
        evict[n_evict++] = d->held[d->held_head];
        d->held_bytes -= d->held_size[d->held_head];
        d->held_head = (d->held_head + 1) % QUARANTINE_BLOCKS;
        d->held_count--;
    }
    int hold = d->held_count < QUARANTINE_BLOCKS && d->held_bytes + size <= QUARANTINE_BYTES;
    if (hold) {
        size_t slot = (d->held_head + d->held_count) % QUARANTINE_BLOCKS;
        d->held[slot] = ptr;
        d->held_size[slot] = size;
        d->held_count++;
        d->held_bytes += size;
    }
    unlock();
    for (int i = 0; i < n_evict; i++)
        d->orig.free(d->orig.ctx, evict[i]);
    if (!hold)
        d->orig.free(d->orig.ctx, ptr); /* larger than the whole quarantine */
}

/* Gives every held block back to its allocator.  GIL held (install/uninstall). */
static void flush_quarantine(struct domain *d)
{
    while (d->held_count > 0) {
        d->orig.free(d->orig.ctx, d->held[d->held_head]);
        d->held_head = (d->held_head + 1) % QUARANTINE_BLOCKS;
        d->held_count--;
    }
    d->held_bytes = 0;
    d->held_head = 0;
}

static void clear_index(void)
{
    lock();
    free(blocks.slots);
    free(chunks.slots);
    memset(&blocks, 0, sizeof blocks);
    memset(&chunks, 0, sizeof chunks);
    freed_head = freed_count = 0;
    counters.live_blocks = counters.live_bytes = 0;
    unlock();
}

int pb__heapmap_install(void)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    int rc = -1;
    if (!installed) {
        static const PyMemAllocatorDomain ids[3] = {PYMEM_DOMAIN_RAW, PYMEM_DOMAIN_MEM, PYMEM_DOMAIN_OBJ};
        for (int i = 0; i < 3; i++) {
            struct domain *d = &domains[i];
            d->id = ids[i];
            PyMem_GetAllocator(d->id, &d->orig);
            d->hook.ctx = d;
            d->hook.malloc = hook_malloc;
            d->hook.calloc = hook_calloc;
            d->hook.realloc = hook_realloc;
            d->hook.free = hook_free;
            PyMem_SetAllocator(d->id, &d->hook);
        }
        installed = 1;
        rc = 0;
    }
    PyGILState_Release(gil);
    return rc;
}

int pb__heapmap_uninstall(void)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    int rc = -1;
    if (installed) {
        rc = 0;
        for (int i = 0; i < 3; i++) {
            PyMemAllocatorEx current;
            PyMem_GetAllocator(domains[i].id, &current);
            if (current.malloc != hook_malloc || current.ctx != &domains[i])
                rc = -2;
        }
        if (rc == 0) {
            for (int i = 0; i < 3; i++)
                PyMem_SetAllocator(domains[i].id, &domains[i].orig);
            installed = 0;
            for (int i = 0; i < 3; i++)
                flush_quarantine(&domains[i]);
            clear_index();
        }
    }
    PyGILState_Release(gil);
    return rc;
}

static int find_locked(uintptr_t addr, uintptr_t *start, size_t *size);

int pb__heapmap_find(uintptr_t addr, uintptr_t *start, size_t *size)
{
    lock();
    int found = find_locked(addr, start, size);
    unlock();
    return found;
}

size_t pb__heapmap_retire_freed(uint64_t first_id, uintptr_t *starts, size_t *sizes, size_t cap)
{
    size_t n = 0;
    lock();
    while (freed_count > 0 && n < cap) {
        uintptr_t start = freed[freed_head].start;
        size_t size = freed[freed_head].size;
        freed_head = (freed_head + 1) % FREED_RING;
        freed_count--;
        uintptr_t live_start;
        size_t live_size;
        if (find_locked(start, &live_start, &live_size))
            continue; /* reused: the memory is live again */
        if (pb__scan_retire(start, size, first_id + n) != PB_OK)
            break;
        starts[n] = start;
        sizes[n] = size;
        n++;
    }
    unlock();
    return n;
}

static int find_locked(uintptr_t addr, uintptr_t *start, size_t *size)
{
    int found = 0;
    uintptr_t base = addr & ~(uintptr_t)(SMALL_ALIGN - 1);
    for (uintptr_t k = 0; k <= SMALL_MAX && k <= base && !found; k += SMALL_ALIGN) {
        struct entry *e = get(&blocks, base - k, 0, 0);
        if (e != NULL && addr < base - k + e->value) {
            *start = base - k;
            *size = e->value;
            found = 1;
        }
    }
    if (!found && chunks.cap) {
        uintptr_t key = (addr >> CHUNK_SHIFT) + 2;
        for (size_t j = mix(key) & (chunks.cap - 1); chunks.slots[j].key != EMPTY; j = (j + 1) & (chunks.cap - 1)) {
            if (chunks.slots[j].key != key)
                continue;
            uintptr_t s = chunks.slots[j].value;
            struct entry *e = get(&blocks, s, 0, 0);
            if (e != NULL && addr >= s && addr < s + e->value) {
                *start = s;
                *size = e->value;
                found = 1;
                break;
            }
        }
    }
    return found;
}

size_t pb__heapmap_take_freed(uintptr_t *starts, size_t *sizes, size_t cap, uint64_t *dropped)
{
    lock();
    size_t n = freed_count < cap ? freed_count : cap;
    for (size_t i = 0; i < n; i++) {
        size_t slot = (freed_head + i) % FREED_RING;
        starts[i] = freed[slot].start;
        sizes[i] = freed[slot].size;
    }
    freed_head = (freed_head + n) % FREED_RING;
    freed_count -= n;
    if (dropped != NULL)
        *dropped = freed_dropped;
    unlock();
    return n;
}

void pb__heapmap_get_stats(struct pb_heapmap_stats *out)
{
    lock();
    *out = counters;
    out->freed_pending = freed_count;
    out->installed = installed;
    unlock();
}

/* ---- numpy (NEP 49) ---------------------------------------------------------
 * The structs below mirror numpy's PyDataMem_Handler (version 1), so no numpy
 * headers are needed at build time.  Arrays keep the handler capsule they were
 * allocated with and free through it, so ours stays valid (static) forever and
 * keeps delegating to the handler it wrapped, even after uninstall. */

typedef struct {
    void *ctx;
    void *(*malloc)(void *ctx, size_t size);
    void *(*calloc)(void *ctx, size_t nelem, size_t elsize);
    void *(*realloc)(void *ctx, void *ptr, size_t new_size);
    void (*free)(void *ctx, void *ptr, size_t size);
} np_allocator;

typedef struct {
    char name[127];
    uint8_t version;
    np_allocator allocator;
} np_handler;

typedef PyObject *(*np_set_handler_fn)(PyObject *);
typedef PyObject *(*np_get_handler_fn)(void);

static np_handler *np_wrapped;       /* the handler ours delegates to */
static PyObject *np_wrapped_capsule; /* kept alive for ever */
static int np_installed;

static void *np_malloc(void *ctx, size_t size)
{
    (void)ctx;
    void *p = np_wrapped->allocator.malloc(np_wrapped->allocator.ctx, size);
    if (p != NULL && installed)
        record(p, size ? size : 1);
    return p;
}

static void *np_calloc(void *ctx, size_t nelem, size_t elsize)
{
    (void)ctx;
    void *p = np_wrapped->allocator.calloc(np_wrapped->allocator.ctx, nelem, elsize);
    size_t total = nelem * elsize;
    if (p != NULL && installed)
        record(p, total != 0 ? total : 1);
    return p;
}

static void *np_realloc(void *ctx, void *ptr, size_t new_size)
{
    (void)ctx;
    if (ptr != NULL) {
        lock();
        forget_locked((uintptr_t)ptr, 0);
        unlock();
    }
    void *q = np_wrapped->allocator.realloc(np_wrapped->allocator.ctx, ptr, new_size);
    if (q != NULL && installed)
        record(q, new_size ? new_size : 1);
    return q;
}

static void np_free(void *ctx, void *ptr, size_t size)
{
    (void)ctx;
    if (ptr != NULL) {
        lock();
        forget_locked((uintptr_t)ptr, 1);
        unlock();
    }
    np_wrapped->allocator.free(np_wrapped->allocator.ctx, ptr, size);
}

static np_handler np_ours = {
    "ptrbridge_heapmap", 1, {NULL, np_malloc, np_calloc, np_realloc, np_free},
};

int pb__heapmap_numpy_install(void *set_handler, void *get_handler)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    int rc = -1;
    PyObject *current = NULL, *ours = NULL, *old = NULL;
    if (np_installed) {
        rc = 1;
        goto out;
    }
    current = ((np_get_handler_fn)get_handler)();
    if (current == NULL)
        goto out;
    np_handler *h = PyCapsule_GetPointer(current, "mem_handler");
    if (h == NULL)
        goto out;
    if (h == &np_ours) {
        np_installed = 1;
        rc = 1;
        goto out;
    }
    if (np_wrapped_capsule == NULL) { /* wrap the first handler seen, for ever */
        np_wrapped = h;
        np_wrapped_capsule = current;
        Py_INCREF(np_wrapped_capsule);
    }
    ours = PyCapsule_New(&np_ours, "mem_handler", NULL);
    if (ours == NULL)
        goto out;
    old = ((np_set_handler_fn)set_handler)(ours);
    if (old == NULL)
        goto out;
    np_installed = 1;
    rc = 0;
out:
    if (rc < 0 && PyErr_Occurred())
        PyErr_Print();
    Py_XDECREF(current);
    Py_XDECREF(ours);
    Py_XDECREF(old);
    PyGILState_Release(gil);
    return rc;
}

int pb__heapmap_numpy_uninstall(void *set_handler)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    int rc = -1;
    if (np_installed && np_wrapped_capsule != NULL) {
        PyObject *old = ((np_set_handler_fn)set_handler)(np_wrapped_capsule);
        if (old != NULL) {
            Py_DECREF(old);
            np_installed = 0;
            rc = 0;
        } else {
            PyErr_Print();
        }
    }
    PyGILState_Release(gil);
    return rc;
}
