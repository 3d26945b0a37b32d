/*
 * scan.c - conservative scanner for pointers C kept to Python memory.
 *
 * Every aligned pointer-sized word of every root is tested against the
 * queued targets.  Most words are rejected by one subtraction and compare
 * (outside [lowest target, highest target]) and most of the rest by a
 * page-granular bitmap (a page number hashed into 2^20 bits); only then is
 * the sorted target array binary-searched.  Roots are the live blocks of the
 * tracked allocator, regions registered with pb_root_add, and the writable
 * segments of watched libraries.  CPython's own heap is never a root.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <link.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "pb_internal.h"
#include "pb_scan.h"

#define PAGE_SHIFT 12
#define BITMAP_BITS ((size_t)1 << 20)
#define BITMAP_MASK (BITMAP_BITS - 1)

struct target {
    uintptr_t start;
    uintptr_t end; /* exclusive; start + max(size, 1) */
    uint64_t id;
};

struct root {
    uint64_t id;
    uintptr_t base;
    size_t size;
    int kind;   /* PB_ROOT_REGISTERED or PB_ROOT_LIBRARY */
    char *name; /* library path (owned) or NULL */
};

static pthread_mutex_t target_lock = PTHREAD_MUTEX_INITIALIZER;
static struct target *targets;
static size_t target_count, target_cap;
static uint64_t target_generation; /* bumped on every change of the queue */

static pthread_mutex_t root_lock = PTHREAD_MUTEX_INITIALIZER;
static struct root *roots;
static size_t root_count, root_cap;
static uint64_t next_root_id = 1;

/* One scan at a time: the index and bitmap below are shared scratch space. */
static pthread_mutex_t scan_lock = PTHREAD_MUTEX_INITIALIZER;
static uint64_t bitmap[BITMAP_BITS / 64];

struct index {
    struct target *t; /* sorted by start */
    uintptr_t *max_end; /* max_end[i] = max(t[0..i].end) */
    size_t n;
    uintptr_t lo, span; /* w is a candidate iff w - lo < span */
};

struct sink {
    struct pb_finding *out;
    size_t cap;
    size_t found;
    uint64_t bytes;
};

/* ---- targets ---------------------------------------------------------- */

int pb__scan_retire(uintptr_t start, size_t size, uint64_t id)
{
    pthread_mutex_lock(&target_lock);
    if (target_count == target_cap) {
        size_t cap = target_cap ? target_cap * 2 : 256;
        struct target *t = realloc(targets, cap * sizeof *t);
        if (t == NULL) {
            pthread_mutex_unlock(&target_lock);
            return PB_ERR_NOMEM;
        }
        targets = t;
        target_cap = cap;
    }
    uintptr_t end = start + (size ? size : 1);
    if (end < start)
        end = UINTPTR_MAX;
    targets[target_count++] = (struct target){start, end, id};
    target_generation++;
    pthread_mutex_unlock(&target_lock);
    return PB_OK;
}

size_t pb__scan_cancel(uintptr_t start, size_t size)
{
    uintptr_t end = start + (size ? size : 1);
    size_t dropped = 0;
    pthread_mutex_lock(&target_lock);
    for (size_t i = 0; i < target_count;) {
        if (targets[i].start < end && start < targets[i].end) {
            targets[i] = targets[--target_count];
            dropped++;
            target_generation++;
        } else {
            i++;
        }
    }
    pthread_mutex_unlock(&target_lock);
    return dropped;
}

size_t pb__scan_pending(void)
{
    pthread_mutex_lock(&target_lock);
    size_t n = target_count;
    pthread_mutex_unlock(&target_lock);
    return n;
}

/* ---- roots ------------------------------------------------------------ */

static int add_root(uintptr_t base, size_t size, int kind, uint64_t id, const char *name)
{
    char *copy = NULL;
    if (name != NULL && (copy = strdup(name)) == NULL)
        return PB_ERR_NOMEM;
    if (root_count == root_cap) {
        size_t cap = root_cap ? root_cap * 2 : 32;
        struct root *r = realloc(roots, cap * sizeof *r);
        if (r == NULL) {
            free(copy);
            return PB_ERR_NOMEM;
        }
        roots = r;
        root_cap = cap;
    }
    roots[root_count++] = (struct root){id, base, size, kind, copy};
    return PB_OK;
}

PB_API int pb_root_add(const void *addr, size_t size, uint64_t *id_out)
{
    if (addr == NULL || id_out == NULL || size > UINTPTR_MAX - (uintptr_t)addr)
        return PB_ERR_INVALID;
    pthread_mutex_lock(&root_lock);
    uint64_t id = next_root_id++;
    int rc = add_root((uintptr_t)addr, size, PB_ROOT_REGISTERED, id, NULL);
    pthread_mutex_unlock(&root_lock);
    if (rc == PB_OK)
        *id_out = id;
    return rc;
}

static size_t remove_roots(uint64_t id, int kind)
{
    size_t removed = 0;
    for (size_t i = 0; i < root_count;) {
        if (roots[i].id == id && roots[i].kind == kind) {
            free(roots[i].name);
            roots[i] = roots[--root_count];
            removed++;
        } else {
            i++;
        }
    }
    return removed;
}

PB_API int pb_root_remove(uint64_t id)
{
    pthread_mutex_lock(&root_lock);
    size_t removed = remove_roots(id, PB_ROOT_REGISTERED);
    pthread_mutex_unlock(&root_lock);
    return removed ? PB_OK : PB_ERR_NOT_FOUND;
}

struct watch_ctx {
    const char *name;
    uint64_t id;
    int segments;
    int status;
};

static int watch_one(struct dl_phdr_info *info, size_t size, void *data)
{
    (void)size;
    struct watch_ctx *ctx = data;
    if (info->dlpi_name == NULL || strstr(info->dlpi_name, ctx->name) == NULL)
        return 0;
    for (int i = 0; i < info->dlpi_phnum; i++) {
        const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
        if (ph->p_type != PT_LOAD || !(ph->p_flags & PF_W) || ph->p_memsz == 0)
            continue;
        int rc = add_root((uintptr_t)(info->dlpi_addr + ph->p_vaddr), (size_t)ph->p_memsz,
                          PB_ROOT_LIBRARY, ctx->id, info->dlpi_name);
        if (rc != PB_OK) {
            ctx->status = rc;
            return 1;
        }
        ctx->segments++;
    }
    return 0;
}

int pb__scan_watch_library(const char *name, uint64_t id)
{
    if (name == NULL || name[0] == '\0')
        return PB_ERR_INVALID;
    struct watch_ctx ctx = {name, id, 0, PB_OK};
    pthread_mutex_lock(&root_lock);
    dl_iterate_phdr(watch_one, &ctx);
    if (ctx.status != PB_OK)
        remove_roots(id, PB_ROOT_LIBRARY);
    pthread_mutex_unlock(&root_lock);
    return ctx.status != PB_OK ? ctx.status : ctx.segments;
}

void pb__scan_unwatch_library(uint64_t id)
{
    pthread_mutex_lock(&root_lock);
    remove_roots(id, PB_ROOT_LIBRARY);
    pthread_mutex_unlock(&root_lock);
}

int pb__scan_describe_address(uintptr_t addr, const char **object, const char **symbol,
                              uintptr_t *symbol_addr)
{
    Dl_info info;
    if (dladdr((void *)addr, &info) == 0)
        return 0;
    *object = info.dli_fname;
    *symbol = info.dli_sname;
    *symbol_addr = (uintptr_t)info.dli_saddr;
    return 1;
}

/* ---- the index -------------------------------------------------------- */

static int by_start(const void *a, const void *b)
{
    const struct target *x = a, *y = b;
    return (x->start > y->start) - (x->start < y->start);
}

static void set_bits(const struct index *ix, int on)
{
    for (size_t i = 0; i < ix->n; i++) {
        uintptr_t first = ix->t[i].start >> PAGE_SHIFT;
        uintptr_t last = (ix->t[i].end - 1) >> PAGE_SHIFT;
        if (last - first >= BITMAP_BITS) {
            memset(bitmap, on ? 0xff : 0, sizeof bitmap);
            if (!on)
                return;
            continue;
        }
        for (uintptr_t p = first; p <= last; p++) {
            size_t bit = (size_t)(p & BITMAP_MASK);
            if (on)
                bitmap[bit >> 6] |= (uint64_t)1 << (bit & 63);
            else
                bitmap[bit >> 6] &= ~((uint64_t)1 << (bit & 63));
        }
    }
}

/* The index of a scan that kept the queue, reused while the queue is
 * unchanged (repeated scans for the same targets skip the sort).  Guarded by
 * scan_lock. */
static struct index cached;
static uint64_t cached_generation = UINT64_MAX;

static void free_index(struct index *ix);

/* Builds the index from a copy of the queued targets.  Returns 0 or -1. */
static int build_index(struct index *ix, int keep)
{
    memset(ix, 0, sizeof *ix);
    pthread_mutex_lock(&target_lock);
    if (keep && cached_generation == target_generation) {
        *ix = cached;
        pthread_mutex_unlock(&target_lock);
        return 0;
    }
    uint64_t generation = target_generation;
    if (cached_generation != UINT64_MAX) {
        struct index old = cached;
        cached_generation = UINT64_MAX;
        memset(&cached, 0, sizeof cached);
        free_index(&old);
    }
    size_t n = target_count;
    struct target *t = n ? malloc(n * sizeof *t) : NULL;
    if (n && t == NULL) {
        pthread_mutex_unlock(&target_lock);
        return -1;
    }
    if (n)
        memcpy(t, targets, n * sizeof *t);
    if (!keep) {
        target_count = 0;
        target_generation++;
    }
    pthread_mutex_unlock(&target_lock);
    if (n == 0)
        return 0;
    uintptr_t *max_end = malloc(n * sizeof *max_end);
    if (max_end == NULL) {
        free(t);
        return -1;
    }
    qsort(t, n, sizeof *t, by_start);
    uintptr_t hi = 0;
    for (size_t i = 0; i < n; i++) {
        if (t[i].end > hi)
            hi = t[i].end;
        max_end[i] = hi;
    }
    ix->t = t;
    ix->max_end = max_end;
    ix->n = n;
    ix->lo = t[0].start;
    ix->span = hi - t[0].start;
    set_bits(ix, 1);
    if (keep) {
        cached = *ix;
        cached_generation = generation;
    }
    return 0;
}

/* Releases an index after a scan, unless it is the cached one. */
static void done_with_index(struct index *ix)
{
    if (cached_generation != UINT64_MAX && ix->t == cached.t)
        return;
    free_index(ix);
}

static void free_index(struct index *ix)
{
    if (ix->n)
        set_bits(ix, 0);
    free(ix->t);
    free(ix->max_end);
}

/* The most recently retired target containing w, or NULL. */
static const struct target *lookup(const struct index *ix, uintptr_t w)
{
    size_t lo = 0, hi = ix->n; /* first index with start > w */
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (ix->t[mid].start <= w)
            lo = mid + 1;
        else
            hi = mid;
    }
    const struct target *best = NULL;
    for (size_t i = lo; i-- > 0 && ix->max_end[i] > w;) {
        if (w < ix->t[i].end && (best == NULL || ix->t[i].id > best->id))
            best = &ix->t[i];
    }
    return best;
}

/* Reads every word of a root, whatever it holds: a sanitizer's redzones are not bugs here. */
__attribute__((no_sanitize_address, no_sanitize_thread))
static void scan_range(const struct index *ix, uintptr_t base, size_t size, int kind, uint64_t root_id,
                       struct sink *sink)
{
    uintptr_t p = (base + sizeof(uintptr_t) - 1) & ~(uintptr_t)(sizeof(uintptr_t) - 1);
    uintptr_t end = base + size;
    uintptr_t lo = ix->lo, span = ix->span;
    sink->bytes += size;
    for (; p + sizeof(uintptr_t) <= end; p += sizeof(uintptr_t)) {
        uintptr_t w;
        memcpy(&w, (const void *)p, sizeof w);
        if (w - lo >= span)
            continue;
        size_t bit = (size_t)((w >> PAGE_SHIFT) & BITMAP_MASK);
        if (!((bitmap[bit >> 6] >> (bit & 63)) & 1))
            continue;
        const struct target *t = lookup(ix, w);
        if (t == NULL)
            continue;
        if (sink->found < sink->cap) {
            struct pb_finding *f = &sink->out[sink->found];
            f->target_id = t->id;
            f->root_kind = kind;
            f->root_id = root_id;
            f->root_base = base;
            f->root_size = size;
            f->offset = (size_t)(p - base);
            f->value = w;
        }
        sink->found++;
    }
}

struct block_ctx {
    const struct index *ix;
    struct sink *sink;
};

static int scan_block(void *ptr, size_t size, void *data)
{
    struct block_ctx *ctx = data;
    scan_range(ctx->ix, (uintptr_t)ptr, size, PB_ROOT_ALLOCATION, 0, ctx->sink);
    return 0;
}

size_t pb__scan_run(struct pb_finding *out, size_t cap, int keep, uint64_t *bytes)
{
    struct sink sink = {out, out ? cap : 0, 0, 0};
    struct index ix;
    pthread_mutex_lock(&scan_lock);
    if (build_index(&ix, keep) != 0) {
        pthread_mutex_unlock(&scan_lock);
        if (bytes)
            *bytes = 0;
        return 0;
    }
    if (ix.n) {
        pthread_mutex_lock(&root_lock);
        for (size_t i = 0; i < root_count; i++)
            scan_range(&ix, roots[i].base, roots[i].size, roots[i].kind, roots[i].id, &sink);
        pthread_mutex_unlock(&root_lock);
        struct block_ctx ctx = {&ix, &sink};
        pb_alloc_foreach(scan_block, &ctx);
    }
    done_with_index(&ix);
    pthread_mutex_unlock(&scan_lock);
    if (bytes)
        *bytes = sink.bytes;
    return sink.found;
}

size_t pb__scan_buffer(const void *base, size_t size)
{
    struct sink sink = {NULL, 0, 0, 0};
    struct index ix;
    pthread_mutex_lock(&scan_lock);
    if (build_index(&ix, 1) == 0 && ix.n)
        scan_range(&ix, (uintptr_t)base, size, PB_ROOT_REGISTERED, 0, &sink);
    done_with_index(&ix);
    pthread_mutex_unlock(&scan_lock);
    return sink.found;
}
