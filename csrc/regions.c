/*
 * regions.c - the index of Python-owned memory regions known to the registry.
 *
 * Regions are kept in an array in insertion order; lookups by address scan
 * it.  That is fine for the tens to thousands of regions that pins and lent
 * arguments produce; the retained-pointer scanner needs a faster index and
 * keeps its own.  One mutex guards the array and the per-kind counts; it is
 * held across fork() by pthread_atfork handlers and re-initialised in the
 * child.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "pb_internal.h"

#define KIND_MAX PB_REGION_MANAGED

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct pb_region *regions;
static size_t region_count;
static size_t region_cap;
static uint64_t next_id = 1;
static size_t kind_count[KIND_MAX + 1];

PB_API int pb_region_add(const void *addr, size_t size, int kind, uint64_t *id_out)
{
    if (id_out == NULL || kind < 1 || kind > KIND_MAX)
        return PB_ERR_INVALID;
    if (size > UINTPTR_MAX - (uintptr_t)addr)
        return PB_ERR_INVALID;
    pthread_mutex_lock(&lock);
    if (region_count == region_cap) {
        size_t cap = region_cap ? region_cap * 2 : 64;
        struct pb_region *r = realloc(regions, cap * sizeof *r);
        if (r == NULL) {
            pthread_mutex_unlock(&lock);
            return PB_ERR_NOMEM;
        }
        regions = r;
        region_cap = cap;
    }
    struct pb_region *r = &regions[region_count++];
    r->id = next_id++;
    r->start = (uintptr_t)addr;
    r->size = size;
    r->kind = kind;
    kind_count[kind]++;
    *id_out = r->id;
    pthread_mutex_unlock(&lock);
    return PB_OK;
}

/* Removes region `id` (newest first); the lock held.  PB_OK or PB_ERR_NOT_FOUND. */
static int remove_locked(uint64_t id)
{
    for (size_t i = region_count; i-- > 0;) {
        if (regions[i].id == id) {
            kind_count[regions[i].kind]--;
            regions[i] = regions[--region_count];
            return PB_OK;
        }
    }
    return PB_ERR_NOT_FOUND;
}

PB_API int pb_region_remove(uint64_t id)
{
    pthread_mutex_lock(&lock);
    int rc = remove_locked(id);
    pthread_mutex_unlock(&lock);
    return rc;
}

static int contains(const struct pb_region *r, uintptr_t a)
{
    /* A zero-length region contains only its start address. */
    return a >= r->start && (a - r->start < r->size || a == r->start);
}

int pb__region_remove_then_pinned(uint64_t id, uintptr_t addr)
{
    int pinned = 0;
    pthread_mutex_lock(&lock);
    remove_locked(id);
    if (kind_count[PB_REGION_PINNED] > 0) {
        for (size_t i = 0; i < region_count && !pinned; i++)
            pinned = regions[i].kind == PB_REGION_PINNED && contains(&regions[i], addr);
    }
    pthread_mutex_unlock(&lock);
    return pinned;
}

PB_API int pb_region_find(const void *addr, struct pb_region *out)
{
    uintptr_t a = (uintptr_t)addr;
    const struct pb_region *best = NULL;
    pthread_mutex_lock(&lock);
    for (size_t i = 0; i < region_count; i++) {
        if (!contains(&regions[i], a))
            continue;
        if (best == NULL || (regions[i].kind == PB_REGION_PINNED && best->kind != PB_REGION_PINNED))
            best = &regions[i];
    }
    if (best != NULL && out != NULL)
        *out = *best;
    pthread_mutex_unlock(&lock);
    return best != NULL;
}

/* pb__region_lookup of each of n addresses into at[i], and into before[i],
 * when no region holds a[i], the best one holding a[i] - 1 (else 0): under
 * one lock, for the slot scan, which asks both for every pointer it reads. */
void pb__region_lookup_edges(const uintptr_t *a, size_t n, uint64_t *at, uint64_t *before)
{
    pthread_mutex_lock(&lock);
    for (size_t j = 0; j < n; j++) {
        const struct pb_region *best = NULL, *edge = NULL;
        for (size_t i = 0; i < region_count; i++) {
            const struct pb_region *r = &regions[i];
            if (contains(r, a[j])) {
                if (best == NULL || (r->kind == PB_REGION_PINNED && best->kind != PB_REGION_PINNED))
                    best = r;
            } else if (a[j] > 0 && contains(r, a[j] - 1)) {
                if (edge == NULL || (r->kind == PB_REGION_PINNED && edge->kind != PB_REGION_PINNED))
                    edge = r;
            }
        }
        at[j] = best != NULL ? (best->id << 2) | (uint64_t)best->kind : 0;
        before[j] = best == NULL && edge != NULL ? (edge->id << 2) | (uint64_t)edge->kind : 0;
    }
    pthread_mutex_unlock(&lock);
}

PB_API size_t pb_region_count(int kind)
{
    size_t n = 0;
    pthread_mutex_lock(&lock);
    if (kind == 0)
        n = region_count;
    else if (kind >= 1 && kind <= KIND_MAX)
        n = kind_count[kind];
    pthread_mutex_unlock(&lock);
    return n;
}

uint64_t pb__region_lookup(uintptr_t addr)
{
    struct pb_region found;
    if (!pb_region_find((const void *)addr, &found))
        return 0;
    return (found.id << 2) | (uint64_t)found.kind;
}

int pb__region_add_many(const uintptr_t *addr, const size_t *size, size_t n, int kind, uint64_t *ids)
{
    if (kind < 1 || kind > KIND_MAX)
        return PB_ERR_INVALID;
    for (size_t i = 0; i < n; i++)
        if (size[i] > UINTPTR_MAX - addr[i])
            return PB_ERR_INVALID;
    pthread_mutex_lock(&lock);
    if (region_count + n > region_cap) {
        size_t cap = region_cap ? region_cap : 64;
        while (cap < region_count + n)
            cap *= 2;
        struct pb_region *r = realloc(regions, cap * sizeof *r);
        if (r == NULL) {
            pthread_mutex_unlock(&lock);
            return PB_ERR_NOMEM;
        }
        regions = r;
        region_cap = cap;
    }
    for (size_t i = 0; i < n; i++) {
        struct pb_region *r = &regions[region_count++];
        r->id = next_id++;
        r->start = addr[i];
        r->size = size[i];
        r->kind = kind;
        ids[i] = r->id;
    }
    kind_count[kind] += n;
    pthread_mutex_unlock(&lock);
    return PB_OK;
}

static int cmp_id(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

static int has_id(const uint64_t *sorted, size_t n, uint64_t id)
{
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (sorted[mid] < id)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < n && sorted[lo] == id;
}

void pb__region_remove_many(const uint64_t *ids, size_t n)
{
    /* One compacting pass over the array, O(regions * log n): an id-by-id
     * search is O(regions * n) once other regions were added after these
     * (a producer unpinning its oldest batch while newer ones are pinned).
     * A Pinner's ids are ascending (ids only grow), so sorting is usually a
     * check; ids outside [min, max] are rejected by two compares. */
    if (n == 0)
        return;
    uint64_t small[64];
    uint64_t *sorted = n <= 64 ? small : malloc(n * sizeof *sorted);
    if (sorted == NULL) {
        for (size_t k = n; k-- > 0;)
            pb_region_remove(ids[k]);
        return;
    }
    memcpy(sorted, ids, n * sizeof *sorted);
    for (size_t k = 1; k < n; k++) {
        if (sorted[k - 1] > sorted[k]) {
            qsort(sorted, n, sizeof *sorted, cmp_id);
            break;
        }
    }
    uint64_t lo = sorted[0], hi = sorted[n - 1];
    pthread_mutex_lock(&lock);
    size_t out = 0, removed = 0;
    for (size_t i = 0; i < region_count; i++) {
        uint64_t id = regions[i].id;
        if (removed < n && id >= lo && id <= hi && has_id(sorted, n, id)) {
            kind_count[regions[i].kind]--;
            removed++;
            continue;
        }
        if (out != i)
            regions[out] = regions[i];
        out++;
    }
    region_count = out;
    pthread_mutex_unlock(&lock);
    if (sorted != small)
        free(sorted);
}

PB_FORK_SAFE_LOCK(lock);
