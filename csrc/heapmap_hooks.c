/*
 * heapmap_hooks.c - the heap map's PyMem hooks (see pb_heapmap_internal.h).
 *
 * Each PyMem domain (raw, mem, obj) gets a hook that calls the allocator
 * installed before it and records the result, so a block is always
 * allocated and freed by the same underlying allocator whether the hooks are
 * on or off when it is freed.  Like tracemalloc, every hook keeps what it
 * wraps in its ctx: a hook instance (struct hm_hook) is created for each
 * allocator ptrbridge wraps, holds that allocator (`prev`, written once
 * before the instance is published), and is never freed, because another
 * hook installed above may keep calling through it.  So hooking twice -
 * verify() re-hooking above another hook that still calls ours, or an
 * install above a hook that changes the requested sizes - builds a chain
 * ours -> other -> ours -> original in which every instance calls the next:
 * nothing recurses.  Only the domain's current instance records (`active`);
 * the others pass every call through.
 *
 * Whether an instance is still in the chain is found by a probe: one
 * allocation in the domain, made with the GIL by the probing thread, which
 * every instance it reaches counts (whatever size a hook above passes on).
 *
 * realloc.  While freed blocks are held, a realloc of a recorded block of up
 * to REALLOC_COPY_MAX bytes is done as malloc + copy + free, so that the old
 * block is held (and poisoned) like any freed block: a pointer kept to the
 * old address reads garbage instead of the old bytes.  Larger blocks are
 * passed to the allocator's realloc (which may grow them in place: no
 * quadratic copying); when one moves, the old block goes to the history but
 * is not held (its memory behaves exactly as without ptrbridge).
 */
#include "pb_heapmap_internal.h"
#include "pb_quarantine.h"

#include <unistd.h>

#define HOOKS_PER_DOMAIN 64 /* instances a domain can ever create (reused when they wrap the same allocator) */

static struct hm_hook pool[PYMEM_DOMAINS][HOOKS_PER_DOMAIN];
static atomic_int pool_used[PYMEM_DOMAINS]; /* written under the GIL, after the instance is set */

struct domain_state {
    struct hm_hook *current;       /* the instance installed last (GIL) */
    int hooked;                    /* current was put in the chain and not taken out (GIL) */
    atomic_uintptr_t top_malloc;   /* the top of the chain when last verified: malloc ... */
    atomic_uintptr_t top_ctx;      /* ... and ctx */
};

static struct domain_state doms[PYMEM_DOMAINS];
static const PyMemAllocatorDomain domain_ids[PYMEM_DOMAINS] = {PYMEM_DOMAIN_RAW, PYMEM_DOMAIN_MEM, PYMEM_DOMAIN_OBJ};
static atomic_uintptr_t probing_thread; /* pthread_self() of in_chain_gil(), 0 otherwise */

/* ---- the hooks ----------------------------------------------------------------------- */

/* The raw domain is called without the GIL, so a thread may read its
 * allocator while PyMem_SetAllocator is replacing it and see our function
 * with the ctx of the allocator we wrap (install) or restore (uninstall).
 * That ctx is the prev.ctx of the instance being swapped: the call goes to
 * that instance, as it would have a moment later or earlier. */
static COLD struct hm_hook *torn_ctx(int domain, void *ctx)
{
    int used = atomic_load_explicit(&pool_used[domain], memory_order_acquire);
    for (int i = used - 1; i >= 0; i--)
        if (pool[domain][i].prev.ctx == ctx)
            return &pool[domain][i];
    return &pool[domain][used > 0 ? used - 1 : 0]; /* unreachable: some instance wraps every ctx we see */
}

static HOT struct hm_hook *instance_of(int domain, void *ctx)
{
    if (LIKELY((uintptr_t)ctx - (uintptr_t)pool[domain] < sizeof pool[domain]))
        return ctx;
    return torn_ctx(domain, ctx);
}

/* A call made by in_chain_gil()'s probe: counted, not recorded. */
static inline int is_probe(struct hm_hook *h)
{
    uintptr_t t = atomic_load_explicit(&probing_thread, memory_order_relaxed);
    if (LIKELY(t == 0) || t != (uintptr_t)pthread_self())
        return 0;
    atomic_fetch_add_explicit(&h->probe_hits, 1, memory_order_relaxed);
    return 1;
}

static inline int records(struct hm_hook *h)
{
    return atomic_load_explicit(&h->active, memory_order_relaxed) && records_domain(h->domain);
}

/* Forgets ptr for a free; the GIL path inline.  1 if the block is held (the
 * caller must not free it); ev gets blocks to release now. */
static HOT int forget_for_free(const struct hm_hook *h, void *ptr, struct evicted *ev)
{
    int domain = h->domain;
    ev->n = 0;
    if (is_gil_domain(domain) && on_gil_path()) {
        struct forgotten f;
        int where = gil_forget((uintptr_t)ptr, &f);
        if (where == ON_GIL_PATH) {
            gil_ring_append((uintptr_t)ptr, f.cell);
            size_t max_blocks = atomic_load_explicit(&hm_hold_max_blocks, memory_order_relaxed);
            if (max_blocks == 0)
                return 0;
            return quarantine_swap(&hm_gil_held[domain], ptr, cell_size(f.cell), h, max_blocks, ev);
        }
        if (where == NOT_FOUND)
            return 0;
    }
    return hm_forget_for_free_locked(domain, ptr, 0, h, ev);
}

struct forgotten hm_realloc_before(int domain, void *ptr)
{
    struct forgotten f = {NOT_FOUND, 0, 0};
    if (ptr == NULL)
        return f;
    if (is_gil_domain(domain) && on_gil_path()) {
        int where = gil_forget((uintptr_t)ptr, &f);
        if (where != ON_LOCK_PATH)
            return f;
    }
    hm_lock();
    if (recording())
        hm_lock_forget((uintptr_t)ptr, is_gil_domain(domain) || domain == PB_HEAPMAP_NUMPY, &f);
    hm_unlock();
    return f;
}

void hm_realloc_after(int domain, void *ptr, const struct forgotten *old, void *q, size_t size)
{
    if (q == NULL) { /* failed: the old block is still valid */
        if (old->path != NOT_FOUND)
            record((int)(old->val >> SIZE_SHIFT), ptr, (size_t)(old->val & SIZE_MASK));
        return;
    }
    if (q != ptr && old->path == ON_GIL_PATH) {
        gil_ring_append((uintptr_t)ptr, old->cell);
    } else if (q != ptr && old->path == ON_LOCK_PATH) {
        hm_lock();
        if (recording())
            hm_lock_ring_append((uintptr_t)ptr, old->val);
        hm_unlock();
    }
    record(domain, q, size);
}

/* Should this realloc be a malloc + copy + hold of the old block? */
int hm_realloc_copies(const struct forgotten *old)
{
    return old->path != NOT_FOUND && (old->val & SIZE_MASK) <= REALLOC_COPY_MAX &&
           atomic_load_explicit(&hm_hold_max_blocks, memory_order_relaxed) != 0;
}

static HOT void *hook_malloc(int domain, void *ctx, size_t size)
{
    struct hm_hook *h = instance_of(domain, ctx);
    void *p = h->prev.malloc(h->prev.ctx, size);
    if (UNLIKELY(is_probe(h)))
        return p;
    if (p != NULL && records(h))
        record(h->domain, p, size);
    return p;
}

static inline void *hook_calloc(int domain, void *ctx, size_t n, size_t elsize)
{
    struct hm_hook *h = instance_of(domain, ctx);
    void *p = h->prev.calloc(h->prev.ctx, n, elsize);
    if (UNLIKELY(is_probe(h)))
        return p;
    if (p != NULL && records(h))
        record(h->domain, p, n * elsize); /* no overflow: the allocator checked */
    return p;
}

static inline void *hook_realloc(int domain, void *ctx, void *ptr, size_t size)
{
    struct hm_hook *h = instance_of(domain, ctx);
    if (!records(h) || is_probe(h))
        return h->prev.realloc(h->prev.ctx, ptr, size);
    struct forgotten old = hm_realloc_before(domain, ptr);
    if (hm_realloc_copies(&old)) {
        void *q = h->prev.malloc(h->prev.ctx, size);
        if (q == NULL) {
            hm_realloc_after(domain, ptr, &old, NULL, size);
            return NULL;
        }
        size_t old_size = (size_t)(old.val & SIZE_MASK);
        memcpy(q, ptr, old_size < size ? old_size : size);
        record(domain, q, size);
        pb__quarantine_owner_freed(ptr); /* moved: the old block is gone (a bytearray grown) */
        struct evicted ev;
        int hold = hm_hold_forgotten(domain, ptr, &old, h, &ev);
        hm_release_evicted(domain, &ev);
        if (!hold)
            hook_free_prev(h, ptr);
        return q;
    }
    void *q = h->prev.realloc(h->prev.ctx, ptr, size);
    hm_realloc_after(domain, ptr, &old, q, size);
    if (q != NULL && q != ptr)
        pb__quarantine_owner_freed(ptr); /* moved: the old block is gone */
    return q;
}

static HOT void hook_free(int domain, void *ctx, void *ptr)
{
    struct hm_hook *h = instance_of(domain, ctx);
    if (ptr == NULL || !records(h)) {
        h->prev.free(h->prev.ctx, ptr);
        return;
    }
    pb__quarantine_owner_freed(ptr); /* a quarantined shadow's original (a bytes, a buffer) dies */
    struct evicted ev;
    int hold = forget_for_free(h, ptr, &ev);
    if (hold) {
        if (LIKELY(ev.n == 1 && ev.b[0].via == h && !ev.b[0].prot))
            h->prev.free(h->prev.ctx, ev.b[0].ptr);
        else
            hm_release_evicted(h->domain, &ev);
        return;
    }
    if (UNLIKELY(ev.n != 0))
        hm_release_evicted(h->domain, &ev);
    h->prev.free(h->prev.ctx, ptr);
}

/* One set of functions per domain: each knows its domain even when its ctx
 * is not one of its instances (see instance_of). */
#define DEFINE_HOOKS(NAME, DOMAIN)                                                                   \
    static void *NAME##_malloc(void *ctx, size_t size) { return hook_malloc(DOMAIN, ctx, size); }    \
    static void *NAME##_calloc(void *ctx, size_t n, size_t elsize)                                   \
    {                                                                                                \
        return hook_calloc(DOMAIN, ctx, n, elsize);                                                  \
    }                                                                                                \
    static void *NAME##_realloc(void *ctx, void *ptr, size_t size)                                   \
    {                                                                                                \
        return hook_realloc(DOMAIN, ctx, ptr, size);                                                 \
    }                                                                                                \
    static void NAME##_free(void *ctx, void *ptr) { hook_free(DOMAIN, ctx, ptr); }

DEFINE_HOOKS(raw, PB_HEAPMAP_RAW)
DEFINE_HOOKS(mem, PB_HEAPMAP_MEM)
DEFINE_HOOKS(obj, PB_HEAPMAP_OBJ)

static const PyMemAllocatorEx hook_functions[PYMEM_DOMAINS] = {
    {NULL, raw_malloc, raw_calloc, raw_realloc, raw_free},
    {NULL, mem_malloc, mem_calloc, mem_realloc, mem_free},
    {NULL, obj_malloc, obj_calloc, obj_realloc, obj_free},
};

/* ---- instances and the chain ----------------------------------------------------------- */

/* The instance wrapping *cur (an existing one if it wraps exactly that, so
 * repeated hooking does not use instances up), or NULL when the domain has
 * used all of them.  GIL held. */
static struct hm_hook *instance_for(int domain, const PyMemAllocatorEx *cur)
{
    int used = atomic_load(&pool_used[domain]);
    for (int i = 0; i < used; i++)
        if (memcmp(&pool[domain][i].prev, cur, sizeof *cur) == 0)
            return &pool[domain][i];
    if (used == HOOKS_PER_DOMAIN)
        return NULL;
    struct hm_hook *h = &pool[domain][used];
    h->prev = *cur;
    h->domain = domain;
    atomic_store(&h->active, 0);
    atomic_store_explicit(&pool_used[domain], used + 1, memory_order_release); /* publishes h */
    return h;
}

static PyMemAllocatorEx hook_of(struct hm_hook *h)
{
    PyMemAllocatorEx a = hook_functions[h->domain];
    a.ctx = h;
    return a;
}

static int is_instance(const PyMemAllocatorEx *a, const struct hm_hook *h)
{
    return h != NULL && a->malloc == hook_functions[h->domain].malloc && a->ctx == (const void *)h;
}

static void *probe_alloc(int domain)
{
    switch (domain) {
    case PB_HEAPMAP_RAW:
        return PyMem_RawMalloc(16);
    case PB_HEAPMAP_MEM:
        return PyMem_Malloc(16);
    default:
        return PyObject_Malloc(16);
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

/* Does an allocation in this domain reach instance h?  GIL held. */
static int in_chain_gil(int domain, struct hm_hook *h)
{
    PyMemAllocatorEx cur;
    PyMem_GetAllocator(domain_ids[domain], &cur);
    if (is_instance(&cur, h))
        return 1;
    unsigned long before = atomic_load(&h->probe_hits);
    atomic_store(&probing_thread, (uintptr_t)pthread_self());
    void *p = probe_alloc(domain);
    atomic_store(&probing_thread, (uintptr_t)0);
    unsigned long after = atomic_load(&h->probe_hits);
    if (p != NULL)
        probe_free(domain, p);
    return after != before;
}

static void remember_top(int domain)
{
    PyMemAllocatorEx cur;
    PyMem_GetAllocator(domain_ids[domain], &cur);
    atomic_store(&doms[domain].top_malloc, (uintptr_t)cur.malloc);
    atomic_store(&doms[domain].top_ctx, (uintptr_t)cur.ctx);
}

/* Puts an instance on top of the domain's chain and makes it the one that
 * records.  GIL held.  0, or -1 (no instance left: the domain is not hooked). */
static int hook_domain_gil(int domain)
{
    struct domain_state *d = &doms[domain];
    PyMemAllocatorEx cur;
    PyMem_GetAllocator(domain_ids[domain], &cur);
    struct hm_hook *h = instance_for(domain, &cur);
    if (h == NULL)
        return -1;
    if (d->current != NULL && d->current != h)
        atomic_store(&d->current->active, 0);
    atomic_store(&h->active, recording());
    PyMemAllocatorEx mine = hook_of(h);
    PyMem_SetAllocator(domain_ids[domain], &mine);
    d->current = h;
    d->hooked = 1;
    remember_top(domain);
    return 0;
}

/* Forgets every block and freed block.  GIL and lock held.  The quarantine
 * stops following the originals of its shadows too: frees are (or were)
 * unseen, so a watched original may be gone. */
static void clear_all_locked(void)
{
    hm_index_clear_locked();
    hm_freed_clear_locked();
    pb__quarantine_unwatch_all();
}

/* ---- fork ------------------------------------------------------------------------------------ */

static void fork_prepare(void) { hm_lock(); }
static void fork_parent(void) { hm_unlock(); }

static void fork_child(void)
{
    atomic_store_explicit(&hm_spin_owner, 0, memory_order_relaxed);
    atomic_store_explicit(&hm_spin, 0, memory_order_relaxed);
    atomic_store_explicit(&probing_thread, 0, memory_order_relaxed);
}

static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

static void init_once(void)
{
    long page = sysconf(_SC_PAGESIZE);
    hm_page_size = page > 0 ? (uintptr_t)page : 4096; /* read by the hold: set once, before any hold */
    pthread_atfork(fork_prepare, fork_parent, fork_child);
}

/* ---- install / uninstall / verify ------------------------------------------------------- */

int pb__heapmap_install(void)
{
    pthread_once(&atfork_once, init_once);
    PyGILState_STATE gil = PyGILState_Ensure();
    int rc = 1;
    if (!recording()) {
#if PY_VERSION_HEX >= 0x030C0000
        hm_main_interp = PyInterpreterState_Main();
#endif
        hm_lock();
        clear_all_locked();
        atomic_store(&hm_recording, 1);
        hm_unlock();
        rc = 0;
        for (int domain = 0; domain < PYMEM_DOMAINS; domain++) {
            struct domain_state *d = &doms[domain];
            /* Ours may still be in the chain below another hook (uninstall
             * returned 2): reuse it rather than hook twice. */
            if (d->hooked && d->current != NULL && in_chain_gil(domain, d->current)) {
                atomic_store(&d->current->active, 1);
                remember_top(domain);
            } else if (hook_domain_gil(domain) != 0) {
                rc = PB_ERR_NOMEM;
            }
        }
        if (rc != 0) { /* out of instances (a process that hooked 64 different chains): undo */
            PyGILState_Release(gil);
            pb__heapmap_uninstall();
            return PB_ERR_NOMEM;
        }
        hm_numpy_attach_gil();
    }
    PyGILState_Release(gil);
    return rc;
}

int pb__heapmap_uninstall(void)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    int rc = 1;
    if (recording()) {
        hm_lock();
        atomic_store(&hm_recording, 0);
        hm_unlock();
        for (int domain = 0; domain < PYMEM_DOMAINS; domain++)
            if (doms[domain].current != NULL)
                atomic_store(&doms[domain].current->active, 0);
        hm_release_hold_gil();
        hm_numpy_detach_gil();
        hm_lock();
        clear_all_locked();
        hm_unlock();
        rc = 0;
    }
    /* Also when not recording: a hook left passing through below another
     * one (rc 2 earlier) is taken out once it is on top again. */
    for (int domain = 0; domain < PYMEM_DOMAINS; domain++) {
        struct domain_state *d = &doms[domain];
        if (!d->hooked)
            continue;
        PyMemAllocatorEx cur;
        PyMem_GetAllocator(domain_ids[domain], &cur);
        if (is_instance(&cur, d->current)) {
            PyMem_SetAllocator(domain_ids[domain], &d->current->prev);
            d->hooked = 0;
        } else if (rc != 1 && in_chain_gil(domain, d->current)) {
            rc = 2; /* another hook on top: ours stays, passing through */
        } else if (rc != 1) {
            d->hooked = 0; /* someone already took ours out */
        }
    }
    PyGILState_Release(gil);
    return rc;
}

int pb_heapmap_verify(void)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    int rc = 0;
    for (int domain = 0; domain < PYMEM_DOMAINS && recording(); domain++) {
        struct domain_state *d = &doms[domain];
        PyMemAllocatorEx cur;
        PyMem_GetAllocator(domain_ids[domain], &cur);
        if ((uintptr_t)cur.malloc == atomic_load(&d->top_malloc) && (uintptr_t)cur.ctx == atomic_load(&d->top_ctx))
            continue;
        if (d->current != NULL && in_chain_gil(domain, d->current)) {
            remember_top(domain);
            continue;
        }
        /* Cut out of the chain: frees went unseen, so the index is stale. */
        hm_release_hold_gil();
        hm_lock();
        clear_all_locked();
        hm_unlock();
        if (hook_domain_gil(domain) != 0)
            d->hooked = 0; /* out of instances: this domain goes unrecorded */
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
    int rc = recording() ? hm_numpy_attach_gil() : 0;
    PyGILState_Release(gil);
    return rc;
}

int hm_chain_unchanged(void)
{
    for (int domain = 0; domain < PYMEM_DOMAINS; domain++) {
        PyMemAllocatorEx cur;
        PyMem_GetAllocator(domain_ids[domain], &cur);
        if ((uintptr_t)cur.malloc != atomic_load_explicit(&doms[domain].top_malloc, memory_order_relaxed) ||
            (uintptr_t)cur.ctx != atomic_load_explicit(&doms[domain].top_ctx, memory_order_relaxed))
            return 0;
    }
    return 1;
}

/* ---- configuration and counters ---------------------------------------------------------- */

int pb__heapmap_installed(void)
{
    return recording();
}

void pb__heapmap_get_stats(struct pb_heapmap_stats *out)
{
    memset(out, 0, sizeof *out);
    /* The GIL: hm_gil_held and the install state are written under it; the
     * lock: everything the locked path writes. */
    PyGILState_STATE gil = PyGILState_Ensure();
    hm_lock();
    struct counters *cs[2] = {&hm_gil_counters, &hm_lock_counters};
    for (int i = 0; i < 2; i++) {
        out->live_blocks += get(&cs[i]->live_blocks);
        out->live_bytes += get(&cs[i]->live_bytes);
        out->allocations += get(&cs[i]->allocations);
        out->frees += get(&cs[i]->frees);
        out->untracked += get(&cs[i]->untracked);
    }
    hm_freed_stats_locked(out);
    out->index_bytes = hm_index_bytes_locked() + hm_freed_bytes_locked();
    out->shadow_leaves = get(&hm_shadow_leaves);
    out->installed = recording();
    for (int domain = 0; domain < PYMEM_DOMAINS; domain++)
        out->hooked |= doms[domain].hooked << domain;
    out->numpy = hm_numpy_hooked();
    hm_unlock();
    PyGILState_Release(gil);
    out->lookups = atomic_load_explicit(&hm_lookups, memory_order_relaxed);
}
