/*
 * scan.c - conservative scanner for pointers C kept to Python memory.
 *
 * Every aligned pointer-sized word of every root is tested against the
 * queued targets.  Most words are rejected by one subtraction and compare
 * (outside [lowest target, highest target]) and most of the rest by a
 * page-granular bitmap (a page number hashed into 2^20 bits); only then is
 * the sorted target array binary-searched.  Roots are the live blocks of the
 * tracked allocator, regions registered with pb_root_add, the writable
 * segments of watched libraries and, with the interposer on (level 2), the
 * blocks unmodified libraries allocate with malloc and the writable segments
 * of every non-system library.  CPython's own heap is never a root.
 *
 * Fault-proof reads.  A root can become unmapped after it was added (the
 * CBuffer under it freed, munmap, dlclose of a watched library, a block an
 * interposed library allocated and unpatched code freed).  Every root but
 * the tracked allocator's own blocks (live while its lock is held) is read
 * through process_vm_readv on our own pid into a 256 KiB scratch buffer
 * that stays in cache: the kernel copies what is mapped and readable and
 * stops at the first page that is not, so a bad root costs a short read,
 * never a SIGSEGV, and no signal handler is needed (nothing to chain, no
 * interference with faulthandler, quarantine guard pages or the program's
 * own handlers; PROT_NONE guard pages fail the same way).  Small blocks go
 * up to 1024 per system call (one iovec each).  Where process_vm_readv is
 * not allowed (seccomp, ENOSYS), each scan snapshots /proc/self/maps and
 * reads only roots inside readable mappings (safe against anything but an
 * unmap racing the scan itself).  A root that cannot be read in full is
 * skipped where unreadable and reported as stale (pb__scan_stale).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <link.h>
#include <pthread.h>
#include <errno.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include "pb_heapmap.h"
#include "pb_interpose.h"
#include "pb_internal.h"
#include "pb_scan.h"

#define PAGE_SHIFT 12
#define BITMAP_BITS ((size_t)1 << 20)
#define BITMAP_MASK (BITMAP_BITS - 1)

struct target {
    uintptr_t start;
    uintptr_t end; /* exclusive; start + max(size, 1); 0: cancelled (start too) */
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
static struct target *targets; /* the queue, in the order queued; cancelled ones stay, marked */
static size_t target_count, target_cap, target_live;
static uint64_t target_generation; /* bumped on every change of the queue */

/* The queue's index for pb__scan_cancel, which every level-2 lend calls: a
 * linear walk would make a batch of N lends of distinct buffers cost N^2.
 * Each target of up to NARROW_PAGES pages is chained (target_next) under the
 * page its start is in, in an open-addressing table of pages (page_keys,
 * page_heads; a power of two, at most half full); wider ones are only in
 * the queue, and counted (target_wide), so that a cancel walks the queue
 * only while there are some.  A cancel looks at the pages from the range's
 * first page less the widest narrow target's extent (target_reach) to its
 * last, and unlinks what it drops.  Cancelled targets stay in the queue,
 * marked, until the scan takes it (pages are never removed from the table),
 * so indices stay valid.  Guarded by target_lock. */
#define NARROW_PAGES 16
#define NO_TARGET UINT32_MAX
static uint32_t *target_next;
static uintptr_t *page_keys; /* page number + 1; 0: empty */
static uint32_t *page_heads;
static size_t page_cap, page_used, target_wide;
static uintptr_t target_reach; /* max (last page - first page) of a narrow target */

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

/* Roots found unreadable by the last scan (guarded by scan_lock). */
#define STALE_MAX 256
static struct pb_stale_root stale[STALE_MAX];
static size_t stale_count;
static uint64_t stale_blocks_last;

static void note_stale(int kind, uint64_t id, uintptr_t base, size_t size, size_t readable, int reason)
{
    if (stale_count < STALE_MAX)
        stale[stale_count] = (struct pb_stale_root){kind, reason, id, base, size, readable};
    stale_count++;
}

static void fork_prepare(void)
{
    pthread_mutex_lock(&scan_lock);
    pthread_mutex_lock(&root_lock);
    pthread_mutex_lock(&target_lock);
}

static void fork_release(void)
{
    pthread_mutex_unlock(&target_lock);
    pthread_mutex_unlock(&root_lock);
    pthread_mutex_unlock(&scan_lock);
}

static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

static void register_atfork(void)
{
    pthread_atfork(fork_prepare, fork_release, fork_release);
}

/* ---- targets ---------------------------------------------------------- */

static size_t page_slot(uintptr_t page)
{
    uint64_t h = (uint64_t)page * 0x9E3779B97F4A7C15ull;
    return (size_t)(h >> 32) & (page_cap - 1);
}

/* The table slot of `page`: its own, or the empty one where it would go. */
static size_t page_find(uintptr_t page)
{
    size_t j = page_slot(page);
    while (page_keys[j] != 0 && page_keys[j] != page + 1)
        j = (j + 1) & (page_cap - 1);
    return j;
}

static void chain_target(size_t i)
{
    uintptr_t first = targets[i].start >> PAGE_SHIFT, last = (targets[i].end - 1) >> PAGE_SHIFT;
    if (last - first >= NARROW_PAGES) {
        target_wide++;
        target_next[i] = NO_TARGET;
        return;
    }
    if (last - first > target_reach)
        target_reach = last - first;
    size_t j = page_find(first);
    if (page_keys[j] == 0) {
        page_keys[j] = first + 1;
        page_heads[j] = NO_TARGET;
        page_used++;
    }
    target_next[i] = page_heads[j];
    page_heads[j] = (uint32_t)i;
}

/* Room in the page table for `pages` distinct pages (at most half full).  0 or -1. */
static int pages_reserve(size_t pages)
{
    if (pages * 2 <= page_cap)
        return 0;
    size_t cap = page_cap ? page_cap : 1024;
    while (cap < pages * 2)
        cap *= 2;
    uintptr_t *keys = calloc(cap, sizeof *keys);
    uint32_t *heads = malloc(cap * sizeof *heads);
    if (keys == NULL || heads == NULL) {
        free(keys);
        free(heads);
        return -1;
    }
    free(page_keys);
    free(page_heads);
    page_keys = keys;
    page_heads = heads;
    page_cap = cap;
    page_used = 0;
    target_wide = 0;
    target_reach = 0;
    /* Re-chained in queue order, so that each chain stays newest first. */
    for (size_t i = 0; i < target_count; i++)
        if (targets[i].end != 0)
            chain_target(i);
    return 0;
}

/* The queue is empty (a scan took it): the index too.  Under target_lock. */
static void reset_index(void)
{
    if (page_used)
        memset(page_keys, 0, page_cap * sizeof *page_keys);
    page_used = 0;
    target_wide = 0;
    target_reach = 0;
    target_live = 0;
}

static int drop_target(size_t i, uintptr_t start, uintptr_t end)
{
    if (targets[i].end == 0 || !(targets[i].start < end && start < targets[i].end))
        return 0;
    uintptr_t first = targets[i].start >> PAGE_SHIFT, last = (targets[i].end - 1) >> PAGE_SHIFT;
    if (last - first >= NARROW_PAGES)
        target_wide--;
    targets[i].start = targets[i].end = 0;
    target_live--;
    return 1;
}

int pb__scan_retire(uintptr_t start, size_t size, uint64_t id)
{
    return pb__scan_retire_many(&start, &size, id, 1);
}

int pb__scan_retire_many(const uintptr_t *starts, const size_t *sizes, uint64_t first_id, size_t n)
{
    pthread_once(&atfork_once, register_atfork);
    if (n == 0)
        return PB_OK;
    pthread_mutex_lock(&target_lock);
    if (n > target_cap - target_count) {
        size_t cap = target_cap ? target_cap : 256;
        while (cap - target_count < n) {
            if (cap > SIZE_MAX / 2 / sizeof *targets) {
                pthread_mutex_unlock(&target_lock);
                return PB_ERR_NOMEM;
            }
            cap *= 2;
        }
        if (cap > NO_TARGET) {
            pthread_mutex_unlock(&target_lock);
            return PB_ERR_NOMEM;
        }
        struct target *t = realloc(targets, cap * sizeof *t);
        if (t != NULL)
            targets = t;
        uint32_t *next = t ? realloc(target_next, cap * sizeof *next) : NULL;
        if (next != NULL)
            target_next = next;
        if (t == NULL || next == NULL) {
            pthread_mutex_unlock(&target_lock);
            return PB_ERR_NOMEM;
        }
        target_cap = cap;
    }
    if (pages_reserve(page_used + n) != 0) {
        pthread_mutex_unlock(&target_lock);
        return PB_ERR_NOMEM;
    }
    for (size_t i = 0; i < n; i++) {
        uintptr_t start = starts[i];
        uintptr_t end = start + (sizes[i] ? sizes[i] : 1);
        if (end < start)
            end = UINTPTR_MAX;
        targets[target_count] = (struct target){start, end, first_id + i};
        chain_target(target_count);
        target_count++;
        target_live++;
    }
    target_generation++;
    pthread_mutex_unlock(&target_lock);
    return PB_OK;
}

void pb__scan_clocks_store(uint64_t *clocks, const size_t *slots, size_t n)
{
    for (size_t i = 0; i < n; i++)
        pb__heapmap_clock_store(clocks, slots[i]);
}

size_t pb__scan_cancel(uintptr_t start, size_t size)
{
    uintptr_t end = start + (size ? size : 1);
    if (end < start)
        end = UINTPTR_MAX;
    size_t dropped = 0;
    pthread_mutex_lock(&target_lock);
    if (target_live == 0) {
        pthread_mutex_unlock(&target_lock);
        return 0;
    }
    uintptr_t first = start >> PAGE_SHIFT, last = (end - 1) >> PAGE_SHIFT;
    uintptr_t from = first >= target_reach ? first - target_reach : 0;
    if (target_wide > 0 || last - from >= target_count) {
        for (size_t i = 0; i < target_count; i++) /* a wide target may be anywhere: the whole queue */
            dropped += (size_t)drop_target(i, start, end);
    } else {
        for (uintptr_t page = from;; page++) {
            size_t j = page_find(page);
            if (page_keys[j] != 0) {
                /* Dropped targets leave the chain (a buffer lent again and again stays one entry). */
                for (uint32_t *link = &page_heads[j]; *link != NO_TARGET;) {
                    uint32_t i = *link;
                    if (targets[i].end == 0) { /* dropped by a walk of the whole queue */
                        *link = target_next[i];
                    } else if (drop_target(i, start, end)) {
                        dropped++;
                        *link = target_next[i];
                    } else {
                        link = &target_next[i];
                    }
                }
            }
            if (page == last)
                break;
        }
    }
    if (dropped)
        target_generation++;
    pthread_mutex_unlock(&target_lock);
    return dropped;
}

size_t pb__scan_pending(void)
{
    pthread_mutex_lock(&target_lock);
    size_t n = target_live;
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

/* ---- fault-proof reads ------------------------------------------------ */

#define CHUNK ((size_t)256 * 1024)
#define MAX_IOV 1024

static int pvr_state; /* 0 untried, 1 works, -1 not allowed (use the maps snapshot) */

struct range {
    uintptr_t lo, hi;
};

/* Readable mappings of the last /proc/self/maps snapshot (fallback mode). */
static struct range *maps;
static size_t maps_n;

static void snapshot_maps(void)
{
    free(maps);
    maps = NULL;
    maps_n = 0;
    FILE *f = fopen("/proc/self/maps", "re");
    if (f == NULL)
        return;
    size_t cap = 0;
    char line[512];
    while (fgets(line, sizeof line, f)) {
        unsigned long lo, hi;
        char perms[8];
        if (sscanf(line, "%lx-%lx %7s", &lo, &hi, perms) != 3 || perms[0] != 'r')
            continue;
        if (strstr(line, "[vvar") != NULL) /* readable in name only */
            continue;
        if (maps_n == cap) {
            size_t ncap = cap ? cap * 2 : 256;
            struct range *r = realloc(maps, ncap * sizeof *r);
            if (r == NULL)
                break;
            maps = r;
            cap = ncap;
        }
        if (maps_n && maps[maps_n - 1].hi == lo)
            maps[maps_n - 1].hi = hi;
        else
            maps[maps_n++] = (struct range){lo, hi};
    }
    fclose(f);
}

/* Bytes readable from addr on, up to len, by the maps snapshot. */
static size_t maps_readable(uintptr_t addr, size_t len)
{
    size_t lo = 0, hi = maps_n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (maps[mid].hi <= addr)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo == maps_n || maps[lo].lo > addr)
        return 0;
    size_t avail = maps[lo].hi - addr;
    return avail < len ? avail : len;
}

/* Copies remote iovecs into buf.  Returns bytes copied (they are contiguous
 * in buf and stop at the first unreadable byte), or (size_t)-1 when
 * process_vm_readv cannot be used at all. */
static size_t safe_copy(void *buf, size_t len, const struct iovec *remote, size_t nremote)
{
    if (pvr_state < 0)
        return (size_t)-1;
    struct iovec local = {buf, len};
    ssize_t n = process_vm_readv(getpid(), &local, 1, remote, (unsigned long)nremote, 0);
    if (n >= 0) {
        pvr_state = 1;
        return (size_t)n;
    }
    if (errno == EFAULT || errno == ENOMEM)
        return 0;
    if (pvr_state == 0 && (errno == ENOSYS || errno == EPERM || errno == EACCES)) {
        pvr_state = -1;
        return (size_t)-1;
    }
    return 0;
}

/* Bytes of [addr, addr+len) readable from addr on, probing one byte per page. */
static size_t probe_readable(uintptr_t addr, size_t len)
{
    long pagesize = sysconf(_SC_PAGESIZE);
    size_t done = 0;
    char sink[MAX_IOV];
    while (done < len) {
        struct iovec remote[MAX_IOV];
        size_t n = 0;
        uintptr_t p = addr + done;
        while (n < MAX_IOV && done < len) {
            remote[n].iov_base = (void *)p;
            remote[n].iov_len = 1;
            n++;
            uintptr_t next = (p | (uintptr_t)(pagesize - 1)) + 1;
            size_t step = next - p;
            done = step >= len - done ? len : done + step;
            p = next;
        }
        size_t got = safe_copy(sink, n, remote, n);
        if (got == (size_t)-1) {
            snapshot_maps();
            return maps_readable(addr, len);
        }
        if (got < n) {
            uintptr_t bad = (uintptr_t)remote[got].iov_base;
            return bad - addr;
        }
    }
    return len;
}

int pb__scan_readable(uintptr_t addr, size_t size)
{
    if (addr == 0 || size > UINTPTR_MAX - addr)
        return 0;
    if (size == 0)
        return 1;
    pthread_mutex_lock(&scan_lock);
    size_t ok = probe_readable(addr, size);
    pthread_mutex_unlock(&scan_lock);
    return ok == size;
}

PB_API int pb_root_add(const void *addr, size_t size, uint64_t *id_out)
{
    if (addr == NULL || id_out == NULL || size > UINTPTR_MAX - (uintptr_t)addr)
        return PB_ERR_INVALID;
    pthread_once(&atfork_once, register_atfork);
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
    pthread_once(&atfork_once, register_atfork);
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

struct base_ctx {
    uintptr_t addr, base;
};

static int base_one(struct dl_phdr_info *info, size_t size, void *data)
{
    (void)size;
    struct base_ctx *c = data;
    for (int i = 0; i < info->dlpi_phnum; i++) {
        const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
        uintptr_t lo = info->dlpi_addr + ph->p_vaddr;
        if (ph->p_type == PT_LOAD && c->addr >= lo && c->addr - lo < ph->p_memsz) {
            c->base = info->dlpi_addr;
            return 1;
        }
    }
    return 0;
}

uintptr_t pb__scan_object_base(uintptr_t addr)
{
    struct base_ctx c = {addr, 0};
    dl_iterate_phdr(base_one, &c);
    return c.base;
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

/* Drops the targets a loaded object is mapped over now, compacting t[]:
 * their memory went back to the kernel (pymalloc gave its arena back, a
 * large block was unmapped) and dlopen mapped a library there, whose own
 * pointers into its image would be reported as C holding that Python
 * memory.  (Live memory is never mapped over: only retired targets can be.)
 * Returns the new count.  No memory for the segments: nothing is dropped. */
static size_t drop_mapped_over(struct target *t, size_t n)
{
    size_t nseg = 0;
    uintptr_t *seg = n ? pb__loaded_segments_alloc(&nseg) : NULL;
    if (seg == NULL)
        return n;
    size_t m = 0;
    for (size_t i = 0; i < n; i++)
        if (!pb__segments_overlap(seg, nseg, t[i].start, t[i].end - t[i].start))
            t[m++] = t[i];
    free(seg);
    return m;
}

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
    size_t m = 0;
    for (size_t i = 0; i < n; i++)
        if (targets[i].end != 0)
            t[m++] = targets[i];
    n = m;
    if (!keep) {
        target_count = 0;
        reset_index();
        target_generation++;
    }
    pthread_mutex_unlock(&target_lock);
    n = drop_mapped_over(t, n);
    if (n == 0) {
        free(t);
        return 0;
    }
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

/* Tests the words of src[0..len) (a copy of, or the memory at, the aligned
 * address addr) against the index; a hit is reported in root coordinates. */
/* Reads every word, whatever it holds: a sanitizer's redzones are not bugs here. */
__attribute__((no_sanitize_address, no_sanitize_thread))
static void scan_words(const struct index *ix, const char *src, size_t len, uintptr_t addr, uintptr_t base,
                       size_t size, int kind, uint64_t root_id, struct sink *sink)
{
    uintptr_t lo = ix->lo, span = ix->span;
    for (size_t k = 0; k + sizeof(uintptr_t) <= len; k += sizeof(uintptr_t)) {
        uintptr_t w;
        memcpy(&w, src + k, sizeof w);
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
            f->offset = (size_t)(addr + k - base);
            f->value = w;
        }
        sink->found++;
    }
}

static inline uintptr_t align_up(uintptr_t p)
{
    return (p + sizeof(uintptr_t) - 1) & ~(uintptr_t)(sizeof(uintptr_t) - 1);
}

/* Scans memory known to be live (the tracked allocator's blocks, under its
 * lock) in place. */
static void scan_range(const struct index *ix, uintptr_t base, size_t size, int kind, uint64_t root_id,
                       struct sink *sink)
{
    uintptr_t p = align_up(base), end = base + size;
    sink->bytes += size;
    if (end > p)
        scan_words(ix, (const char *)p, end - p, p, base, size, kind, root_id, sink);
}

static char *scratch; /* CHUNK bytes, guarded by scan_lock */

/* ---- in-place reads with fault recovery ---------------------------------
 *
 * The fast path.  While a scanning thread reads a root it arms a
 * thread-local sigjmp_buf; a SIGSEGV/SIGBUS on that thread then jumps back
 * and the page is skipped.  Any other fault goes to the handler that was
 * installed before ours (faulthandler, the quarantine's, the program's), or
 * to the default action.  The handler is installed at the first scan and
 * put back on top at every scan if someone installed theirs above it.  It
 * uses only siglongjmp and sigaction (async-signal-safe); SA_NODEFER keeps
 * the signal unblocked after the jump, so no mask has to be saved per root
 * (sigsetjmp(env, 0) costs a few ns).  PTRBRIDGE_SCAN_READ=copy selects
 * the process_vm_readv copy for every root instead. */

#define TLS_IE __attribute__((tls_model("initial-exec")))

static _Thread_local sigjmp_buf *fault_jmp TLS_IE;
static struct sigaction prev_segv, prev_bus;
static int read_mode; /* 0 undecided, 1 in place (signal recovery), 2 copy */

static void on_fault(int sig, siginfo_t *info, void *uc)
{
    sigjmp_buf *j = fault_jmp;
    if (j != NULL) {
        fault_jmp = NULL;
        siglongjmp(*j, 1);
    }
    const struct sigaction *prev = sig == SIGBUS ? &prev_bus : &prev_segv;
    if (prev->sa_flags & SA_SIGINFO) {
        if (prev->sa_sigaction != NULL) {
            prev->sa_sigaction(sig, info, uc);
            return;
        }
    } else if (prev->sa_handler != SIG_DFL && prev->sa_handler != SIG_IGN) {
        prev->sa_handler(sig);
        return;
    }
    /* Default action: restore it; returning re-executes the faulting
     * instruction, which now kills the process as it would have. */
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(sig, &dfl, NULL);
}

static int ensure_handler_one(int sig, struct sigaction *prev)
{
    struct sigaction cur;
    if (sigaction(sig, NULL, &cur) != 0)
        return -1;
    if ((cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == on_fault)
        return 0;
    struct sigaction mine;
    memset(&mine, 0, sizeof mine);
    mine.sa_sigaction = on_fault;
    mine.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK | SA_RESTART;
    sigemptyset(&mine.sa_mask);
    *prev = cur;
    return sigaction(sig, &mine, NULL);
}

/* Puts back the handler that was on top before the scan, if ours is still
 * on top.  The handler is only installed for the duration of a scan: left in
 * the chain between scans, another ptrbridge handler that puts itself back on
 * top (the quarantine's) would chain to it, and it to that one, and a
 * program's own handler installed before both would never be reached. */
static void leave_handler_one(int sig, const struct sigaction *prev)
{
    struct sigaction cur;
    if (sigaction(sig, NULL, &cur) == 0 && (cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == on_fault)
        sigaction(sig, prev, NULL);
}

static void leave_in_place(void)
{
    if (read_mode != 1)
        return;
    leave_handler_one(SIGSEGV, &prev_segv);
    leave_handler_one(SIGBUS, &prev_bus);
}

/* Scan lock held.  1: read in place; 0: use the copy.  A 1 must be
 * followed by leave_in_place() before the scan lock is released. */
static int in_place(void)
{
    if (read_mode == 0) {
        const char *env = getenv("PTRBRIDGE_SCAN_READ");
        read_mode = env != NULL && strcmp(env, "copy") == 0 ? 2 : 1;
    }
    if (read_mode != 1)
        return 0;
    if (ensure_handler_one(SIGSEGV, &prev_segv) != 0 || ensure_handler_one(SIGBUS, &prev_bus) != 0) {
        read_mode = 2;
        return 0;
    }
    return 1;
}

/* Scans [base, base+size) in place, a page at a time, skipping pages that
 * fault.  Returns the bytes that could not be read. */
static size_t read_range_inplace(const struct index *ix, uintptr_t base, size_t size, int kind,
                                 uint64_t root_id, struct sink *sink)
{
    const uintptr_t pagesize = (uintptr_t)sysconf(_SC_PAGESIZE);
    volatile uintptr_t p = align_up(base);
    const uintptr_t end = base + size;
    volatile size_t missing = 0;
    sigjmp_buf env;
    while (p < end) {
        if (sigsetjmp(env, 0) == 0) {
            fault_jmp = &env;
            while (p < end) {
                uintptr_t next = (p | (pagesize - 1)) + 1;
                uintptr_t stop = next < end ? next : end;
                scan_words(ix, (const char *)p, stop - p, p, base, size, kind, root_id, sink);
                p = stop;
            }
            fault_jmp = NULL;
        } else { /* the page at p faulted: skip it */
            uintptr_t next = (p | (pagesize - 1)) + 1;
            uintptr_t stop = next < end ? next : end;
            missing += stop - p;
            p = stop;
        }
    }
    return missing;
}

/* Scans a root that may be (partly) unmapped.  Returns the bytes that could
 * not be read (0: all of it was). */
static size_t read_range_safe(const struct index *ix, uintptr_t base, size_t size, int kind, uint64_t root_id,
                              struct sink *sink)
{
    long pagesize = sysconf(_SC_PAGESIZE);
    uintptr_t p = align_up(base), end = base + size;
    size_t missing = 0;
    if (end <= p)
        return 0;
    if (pvr_state < 0) {
        while (p < end) {
            size_t ok = maps_readable(p, end - p);
            if (ok) {
                scan_words(ix, (const char *)p, ok, p, base, size, kind, root_id, sink);
                p += ok;
            } else {
                uintptr_t next = (p | (uintptr_t)(pagesize - 1)) + 1;
                uintptr_t stop = next < end ? next : end;
                missing += stop - p;
                p = stop;
            }
        }
        return missing;
    }
    while (p < end) {
        size_t want = end - p < CHUNK ? end - p : CHUNK;
        struct iovec remote = {(void *)p, want};
        size_t got = safe_copy(scratch, want, &remote, 1);
        if (got == (size_t)-1) { /* not allowed after all: the maps snapshot */
            snapshot_maps();
            return missing + read_range_safe(ix, p, end - p, kind, root_id, sink);
        }
        if (got)
            scan_words(ix, scratch, got, p, base, size, kind, root_id, sink);
        p += got;
        if (got < want) { /* skip the unreadable page */
            uintptr_t next = (p | (uintptr_t)(pagesize - 1)) + 1;
            uintptr_t stop = next < end ? next : end;
            missing += stop - p;
            p = stop;
        }
    }
    return missing;
}

static int use_in_place; /* decided per scan by in_place(); scan lock held */

static size_t scan_range_safe(const struct index *ix, uintptr_t base, size_t size, int kind, uint64_t root_id,
                              struct sink *sink)
{
    size_t missing = use_in_place ? read_range_inplace(ix, base, size, kind, root_id, sink)
                                  : read_range_safe(ix, base, size, kind, root_id, sink);
    sink->bytes += size - (missing < size ? missing : size);
    return missing;
}

/* Scans interposed blocks (a snapshot: any may have been freed since),
 * many per system call.  Returns how many could not be read. */
static size_t scan_blocks_safe(const struct index *ix, const struct pb_iblock *b, size_t n, struct sink *sink)
{
    size_t bad = 0, i = 0;
    while (i < n) {
        if (b[i].python || b[i].size < sizeof(uintptr_t)) {
            i++;
            continue;
        }
        if (use_in_place || b[i].size >= CHUNK / 4 || pvr_state < 0) {
            if (scan_range_safe(ix, b[i].ptr, b[i].size, PB_ROOT_INTERPOSED, b[i].caller, sink))
                bad++;
            i++;
            continue;
        }
        struct iovec remote[MAX_IOV];
        size_t which[MAX_IOV];
        size_t k = 0, total = 0;
        while (i < n && k < MAX_IOV) {
            const struct pb_iblock *x = &b[i];
            if (x->python || x->size < sizeof(uintptr_t)) {
                i++;
                continue;
            }
            uintptr_t a = align_up(x->ptr);
            size_t len = (x->ptr + x->size - a) & ~(size_t)(sizeof(uintptr_t) - 1);
            if (x->size >= CHUNK / 4 || total + len > CHUNK)
                break;
            remote[k].iov_base = (void *)a;
            remote[k].iov_len = len;
            which[k++] = i++;
            total += len;
        }
        if (k == 0)
            continue;
        size_t got = safe_copy(scratch, total, remote, k);
        if (got == (size_t)-1) {
            snapshot_maps();
            i = which[0];
            continue; /* pvr_state < 0 now: one by one through the snapshot */
        }
        size_t off = 0;
        for (size_t j = 0; j < k; j++) {
            const struct pb_iblock *x = &b[which[j]];
            size_t len = remote[j].iov_len;
            size_t have = got > off ? (got - off < len ? got - off : len) : 0;
            if (have)
                scan_words(ix, scratch + off, have, (uintptr_t)remote[j].iov_base, x->ptr, x->size,
                           PB_ROOT_INTERPOSED, x->caller, sink);
            if (have < len) { /* this block is unreadable: go on after it */
                bad++;
                i = which[j] + 1;
                break;
            }
            sink->bytes += x->size;
            off += len;
        }
    }
    return bad;
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

struct segment_ctx {
    const struct index *ix;
    struct sink *sink;
};

static void scan_segment(uintptr_t base, size_t size, const char *path, void *data)
{
    (void)path;
    struct segment_ctx *c = data;
    size_t missing = scan_range_safe(c->ix, base, size, PB_ROOT_LIBRARY, 0, c->sink);
    if (missing)
        note_stale(PB_ROOT_LIBRARY, 0, base, size, size - missing, PB_STALE_UNREADABLE);
}

static void scan_interposed(const struct index *ix, struct sink *sink)
{
    pb__interpose_refresh();
    struct segment_ctx sc = {ix, sink};
    pb__interpose_foreach_segment(scan_segment, &sc);
    size_t n = pb__interpose_blocks(NULL, 0);
    if (n == 0)
        return;
    size_t cap = n + n / 8 + 64;
    struct pb_iblock *b = malloc(cap * sizeof *b);
    if (b == NULL)
        return;
    n = pb__interpose_blocks(b, cap);
    if (n > cap)
        n = cap;
    stale_blocks_last = scan_blocks_safe(ix, b, n, sink);
    free(b);
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
    stale_count = 0;
    stale_blocks_last = 0;
    if (ix.n) {
        if (scratch == NULL && (scratch = malloc(CHUNK)) == NULL) {
            done_with_index(&ix);
            pthread_mutex_unlock(&scan_lock);
            if (bytes)
                *bytes = 0;
            return 0;
        }
        use_in_place = in_place();
        if (!use_in_place && pvr_state < 0)
            snapshot_maps();
        pthread_mutex_lock(&root_lock);
        for (size_t i = 0; i < root_count; i++) {
            const struct root *r = &roots[i];
            if (r->kind == PB_ROOT_LIBRARY && !pb__interpose_is_loaded(r->base, r->size)) {
                note_stale(r->kind, r->id, r->base, r->size, 0, PB_STALE_UNLOADED);
                continue; /* dlclose'd: whatever is mapped there now is not the library */
            }
            size_t missing = scan_range_safe(&ix, r->base, r->size, r->kind, r->id, &sink);
            if (missing)
                note_stale(r->kind, r->id, r->base, r->size, r->size - missing, PB_STALE_UNREADABLE);
        }
        pthread_mutex_unlock(&root_lock);
        struct block_ctx ctx = {&ix, &sink};
        pb_alloc_foreach(scan_block, &ctx);
        scan_interposed(&ix, &sink);
        if (use_in_place)
            leave_in_place();
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

size_t pb__scan_buffer_safe(const void *base, size_t size)
{
    struct sink sink = {NULL, 0, 0, 0};
    struct index ix;
    pthread_mutex_lock(&scan_lock);
    if ((scratch != NULL || (scratch = malloc(CHUNK)) != NULL) && build_index(&ix, 1) == 0) {
        use_in_place = in_place();
        if (ix.n)
            scan_range_safe(&ix, (uintptr_t)base, size, PB_ROOT_REGISTERED, 0, &sink);
        if (use_in_place)
            leave_in_place();
        done_with_index(&ix);
    }
    pthread_mutex_unlock(&scan_lock);
    return sink.found;
}

size_t pb__scan_interposed_only(uint64_t *bytes)
{
    struct sink sink = {NULL, 0, 0, 0};
    struct index ix;
    pthread_mutex_lock(&scan_lock);
    if ((scratch != NULL || (scratch = malloc(CHUNK)) != NULL) && build_index(&ix, 1) == 0) {
        use_in_place = in_place();
        if (ix.n)
            scan_interposed(&ix, &sink);
        if (use_in_place)
            leave_in_place();
        done_with_index(&ix);
    }
    pthread_mutex_unlock(&scan_lock);
    if (bytes)
        *bytes = sink.bytes;
    return sink.found;
}

size_t pb__scan_stale(struct pb_stale_root *out, size_t cap, uint64_t *stale_blocks)
{
    pthread_mutex_lock(&scan_lock);
    size_t n = stale_count < STALE_MAX ? stale_count : STALE_MAX;
    for (size_t i = 0; i < n && i < cap; i++)
        out[i] = stale[i];
    if (stale_blocks)
        *stale_blocks = stale_blocks_last;
    size_t total = stale_count;
    pthread_mutex_unlock(&scan_lock);
    return total;
}
