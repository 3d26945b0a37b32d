/*
 * quarantine.c - guard-paged shadow copies and the fault reporter.
 *
 * Shadows come from a pool of pre-faulted slots; a buffer larger than a pool
 * slot gets a mapping of its own (bounded in number).  The data is
 * right-aligned so its last byte touches a guard page.  After the call the
 * shadow is protected (MADV_GUARD_INSTALL where the kernel has it, mprotect
 * otherwise) and kept in a FIFO of QUARANTINE_DEPTH; the oldest is reopened
 * and reused.  Each slot is its own mapping region bounded by guard pages,
 * so the number of VMAs stays a small constant (well under vm.max_map_count).
 *
 * The SIGSEGV/SIGBUS handler uses only async-signal-safe code: atomic loads
 * of fixed slot records, pre-formatted text and write(2).  It then chains to
 * the handler that was installed before it (SA_SIGINFO or plain), or for
 * SIG_DFL / SIG_IGN restores the default action and returns, so the faulting
 * access repeats and the process dies of the signal as it would have.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "pb_internal.h"
#include "pb_quarantine.h"

#define POOL_SLOTS 32
#define POOL_SLOT_BYTES ((size_t)64 << 10)
#define MAX_SLOTS 96
#define QUARANTINE_DEPTH 16
#define DESC_MAX 384

#ifndef MADV_GUARD_INSTALL
#define MADV_GUARD_INSTALL 102
#endif
#ifndef MADV_GUARD_REMOVE
#define MADV_GUARD_REMOVE 103
#endif

enum { FREE = 0, LENT = 1, QUARANTINED = 2 };

struct slot {
    _Atomic int state;
    uintptr_t area; /* start of the data area (page aligned) */
    size_t area_bytes; /* data area size; a guard page follows */
    uintptr_t data; /* where the copy starts: area + area_bytes - len */
    size_t len;
    int dedicated; /* own mapping, unmapped when evicted */
    char desc[DESC_MAX];
    size_t desc_len;
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct slot slots[MAX_SLOTS];
static int fifo[QUARANTINE_DEPTH];
static int fifo_head, fifo_count;
static size_t page;
static int pool_ready;
static int use_guard_madvise = 1;

static struct sigaction prev_segv, prev_bus;
static volatile sig_atomic_t handler_installed;
static volatile sig_atomic_t in_report;

/* ---- async-signal-safe reporting ---------------------------------------- */

static void put(const char *s, size_t n)
{
    while (n > 0) {
        ssize_t w = write(STDERR_FILENO, s, n);
        if (w <= 0)
            return;
        s += w;
        n -= (size_t)w;
    }
}

static void put_str(const char *s)
{
    put(s, strlen(s));
}

static void put_hex(uintptr_t v)
{
    char buf[2 + 2 * sizeof v];
    int i = (int)sizeof buf;
    do {
        buf[--i] = "0123456789abcdef"[v & 15];
        v >>= 4;
    } while (v && i > 2);
    buf[--i] = 'x';
    buf[--i] = '0';
    put(buf + i, sizeof buf - (size_t)i);
}

static void put_dec(size_t v)
{
    char buf[24];
    int i = (int)sizeof buf;
    do {
        buf[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v && i > 0);
    put(buf + i, sizeof buf - (size_t)i);
}

static void chain(int sig, siginfo_t *info, void *uctx)
{
    struct sigaction *prev = sig == SIGBUS ? &prev_bus : &prev_segv;
    if (prev->sa_flags & SA_SIGINFO) {
        if (prev->sa_sigaction != NULL) {
            prev->sa_sigaction(sig, info, uctx);
            return;
        }
    } else if (prev->sa_handler != SIG_DFL && prev->sa_handler != SIG_IGN && prev->sa_handler != NULL) {
        prev->sa_handler(sig);
        return;
    }
    /* Default (or ignored, which cannot apply to a real fault): let the
     * access repeat with the default action, so the process dies of it. */
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigaction(sig, &dfl, NULL);
}

static void on_fault(int sig, siginfo_t *info, void *uctx)
{
    if (in_report) {
        /* Entered again (a chained handler raised the signal anew): stop
         * here and let the default action end the process. */
        struct sigaction dfl;
        memset(&dfl, 0, sizeof dfl);
        dfl.sa_handler = SIG_DFL;
        sigaction(sig, &dfl, NULL);
        return;
    }
    in_report = 1;
    uintptr_t a = (uintptr_t)info->si_addr;
    for (int i = 0; i < MAX_SLOTS; i++) {
        struct slot *s = &slots[i];
        if (atomic_load_explicit(&s->state, memory_order_acquire) != QUARANTINED)
            continue;
        if (a < s->area || a >= s->area + s->area_bytes + page)
            continue;
        put_str("\nptrbridge: C used a pointer to Python memory after the call that lent it returned "
                "(R2, caught by quarantine): ");
        put(s->desc, s->desc_len);
        put_str("; faulting address ");
        put_hex(a);
        if (a >= s->data && a < s->data + s->len) {
            put_str(" is offset ");
            put_dec((size_t)(a - s->data));
            put_str(" into it");
        } else {
            put_str(" is just outside it");
        }
        put_str(". C kept the pointer past the call: pin the object for its whole C lifetime, "
                "copy it with ptrbridge.CBuffer, or pass a ptrbridge.Handle.\n");
        break;
    }
    chain(sig, info, uctx);
}

/* ---- the handler ---------------------------------------------------------- */

static int handler_on_top(int sig)
{
    struct sigaction cur;
    if (sigaction(sig, NULL, &cur) != 0)
        return 0;
    return (cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == on_fault;
}

int pb__quarantine_ensure_handler(void)
{
    int changed = 0;
    const int sigs[2] = {SIGSEGV, SIGBUS};
    for (int i = 0; i < 2; i++) {
        if (handler_on_top(sigs[i]))
            continue;
        struct sigaction ours;
        memset(&ours, 0, sizeof ours);
        ours.sa_sigaction = on_fault;
        ours.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
        sigemptyset(&ours.sa_mask);
        struct sigaction *prev = sigs[i] == SIGSEGV ? &prev_segv : &prev_bus;
        sigaction(sigs[i], &ours, prev); /* whoever was on top is chained to */
        changed = 1;
    }
    handler_installed = 1;
    in_report = 0;
    return changed;
}

/* ---- slots ------------------------------------------------------------------ */

static int protect(struct slot *s, int closed)
{
    void *addr = (void *)s->area;
    if (use_guard_madvise) {
        if (madvise(addr, s->area_bytes, closed ? MADV_GUARD_INSTALL : MADV_GUARD_REMOVE) == 0)
            return 0;
        use_guard_madvise = 0; /* kernel without guard regions: mprotect from now on */
    }
    return mprotect(addr, s->area_bytes, closed ? PROT_NONE : PROT_READ | PROT_WRITE);
}

/* Maps data area + guard page; returns the area start or 0.  Lock held. */
static uintptr_t map_area(size_t area_bytes)
{
    void *p = mmap(NULL, area_bytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return 0;
    if (mprotect((char *)p + area_bytes, page, PROT_NONE) != 0) {
        munmap(p, area_bytes + page);
        return 0;
    }
    memset(p, 0, area_bytes); /* pre-fault the pages */
    return (uintptr_t)p;
}

static int init_pool(void)
{
    if (pool_ready)
        return 0;
    page = (size_t)sysconf(_SC_PAGESIZE);
    for (int i = 0; i < POOL_SLOTS; i++) {
        uintptr_t area = map_area(POOL_SLOT_BYTES);
        if (area == 0)
            return -1;
        slots[i].area = area;
        slots[i].area_bytes = POOL_SLOT_BYTES;
        slots[i].dedicated = 0;
    }
    pool_ready = 1;
    return 0;
}

/* Reopens the oldest quarantined slot.  Lock held. */
static void evict_one(void)
{
    int i = fifo[fifo_head];
    fifo_head = (fifo_head + 1) % QUARANTINE_DEPTH;
    fifo_count--;
    struct slot *s = &slots[i];
    atomic_store_explicit(&s->state, FREE, memory_order_release);
    if (s->dedicated) {
        munmap((void *)s->area, s->area_bytes + page);
        s->area = 0;
        s->area_bytes = 0;
    } else {
        protect(s, 0);
    }
}

int pb__quarantine_lend(const void *src, size_t len, const char *description, uintptr_t *shadow)
{
    if ((src == NULL && len != 0) || shadow == NULL || description == NULL)
        return PB_ERR_INVALID;
    pthread_mutex_lock(&lock);
    if (init_pool() != 0) {
        pthread_mutex_unlock(&lock);
        return PB_ERR_NOMEM;
    }
    pb__quarantine_ensure_handler();
    int found = -1;
    if (len <= POOL_SLOT_BYTES) {
        for (int attempt = 0; attempt < 2 && found < 0; attempt++) {
            for (int i = 0; i < POOL_SLOTS; i++)
                if (atomic_load(&slots[i].state) == FREE) {
                    found = i;
                    break;
                }
            if (found < 0 && fifo_count > 0)
                evict_one();
        }
    } else {
        size_t area_bytes = (len + page - 1) / page * page;
        for (int attempt = 0; attempt < 2 && found < 0; attempt++) {
            for (int i = POOL_SLOTS; i < MAX_SLOTS; i++)
                if (atomic_load(&slots[i].state) == FREE && slots[i].area == 0) {
                    uintptr_t area = map_area(area_bytes);
                    if (area != 0) {
                        slots[i].area = area;
                        slots[i].area_bytes = area_bytes;
                        slots[i].dedicated = 1;
                        found = i;
                    }
                    break;
                }
            if (found < 0 && fifo_count > 0)
                evict_one();
        }
    }
    if (found < 0) {
        pthread_mutex_unlock(&lock);
        return PB_ERR_NOMEM;
    }
    struct slot *s = &slots[found];
    s->len = len;
    s->data = s->area + s->area_bytes - len;
    if (len)
        memcpy((void *)s->data, src, len);
    size_t n = strlen(description);
    if (n >= DESC_MAX)
        n = DESC_MAX - 1;
    memcpy(s->desc, description, n);
    s->desc[n] = '\0';
    s->desc_len = n;
    atomic_store_explicit(&s->state, LENT, memory_order_release);
    *shadow = s->data;
    pthread_mutex_unlock(&lock);
    return found;
}

int pb__quarantine_finish(int index, void *dst)
{
    if (index < 0 || index >= MAX_SLOTS)
        return PB_ERR_INVALID;
    pthread_mutex_lock(&lock);
    struct slot *s = &slots[index];
    if (atomic_load(&s->state) != LENT) {
        pthread_mutex_unlock(&lock);
        return PB_ERR_INVALID;
    }
    if (dst != NULL && s->len)
        memcpy(dst, (const void *)s->data, s->len);
    if (fifo_count == QUARANTINE_DEPTH)
        evict_one();
    protect(s, 1);
    atomic_store_explicit(&s->state, QUARANTINED, memory_order_release);
    fifo[(fifo_head + fifo_count) % QUARANTINE_DEPTH] = index;
    fifo_count++;
    pthread_mutex_unlock(&lock);
    return PB_OK;
}

int pb__quarantine_held(void)
{
    pthread_mutex_lock(&lock);
    int n = fifo_count;
    pthread_mutex_unlock(&lock);
    return n;
}
