/*
 * quarantine.c - guard-paged shadow copies and the fault reporter.
 *
 * Layout.  Shadows come from a pool of pre-faulted slots, of one page (for
 * the many small buffers) and of 64 KiB; a buffer larger than that gets a
 * mapping of its own (bounded in number and bytes).
 * Every slot is one mapping: a leading guard page, the data area, a trailing
 * guard page.  The copy is right-aligned so its last byte touches the
 * trailing guard: C reading past the end while the buffer is lent faults at
 * once (an overrun report).  After the call the pages that held the copy are
 * closed and the slot waits in a FIFO of QUARANTINE_DEPTH; the oldest is
 * reopened the way it was closed.  When the closed pages are the whole data
 * area (a one-page slot), mprotect closes them: it merges them with the
 * guard pages, and the pages keep their contents.  Otherwise
 * MADV_GUARD_INSTALL where the kernel has it (no VMA split), mprotect if not
 * (decided and remembered per slot).  A slot is at most three VMAs, so the
 * pool stays a few hundred VMAs, far below vm.max_map_count (65530 by
 * default).  Per lend that is one syscall to close, one to reopen and one to
 * see that the handler is still on top (sigaction).
 *
 * The lending call's Python stack is kept as site ids (pysite.c): the text of
 * each frame is made once per call site, and the handler prints it from
 * there (pb__site_line).
 *
 * The SIGSEGV/SIGBUS handler.  It uses only async-signal-safe code (atomic
 * loads of fixed slot records, text formatted at lend time or once per call
 * site, write(2), sigaction, pthread_sigmask, raise), plus backtrace() and
 * dladdr(): both are
 * used by ASan and faulthandler-like tools in the same place; backtrace() is
 * called once at install time so that it loads libgcc then, and dladdr() can
 * only block if the fault hit during dlopen, with the process about to die.
 *   - A fault on a shadow (quarantined, or the guard of a lent one) is ours:
 *     a report in three parts (the access, where it was lent, where it was
 *     released), one SUMMARY line, then the previous handler (so
 *     faulthandler still prints the Python traceback), then the default
 *     action: the process dies of the signal.
 *   - Any other fault goes to the handler installed before ours exactly as
 *     the kernel would have run it: its sa_mask (and the signal itself unless
 *     SA_NODEFER) blocked while it runs, SA_RESETHAND honoured (it runs once,
 *     then the default applies), SA_SIGINFO or plain; SIG_DFL re-raises with
 *     the default action so the process dies of the right signal; SIG_IGN
 *     ignores a sent signal (a real fault cannot be ignored: default).  No
 *     state survives the call, so a handler that recovers (returns after
 *     fixing the page, or siglongjmps out) gets every later fault too.
 *   - A signal sent (not a fault) to a thread that is inside such a chained
 *     call is the previous handler passing the signal on to *its* previous
 *     one, which is ours when it was installed after us and we went back on
 *     top (faulthandler does that): it gets the default action instead of
 *     going round the cycle.  Threads are told apart by gettid in a small
 *     lock-free table, no thread-local storage.
 * An alternate signal stack is installed on each thread that lends (if it
 * has none), so a fault on an exhausted stack is still reported; it is
 * released when the thread exits.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <execinfo.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <ucontext.h>
#include <unistd.h>

#include "pb_internal.h"
#include "pb_py.h" /* Py_REFCNT of a held original (read, never changed, in the handler) */
#include "pb_quarantine.h"

#define SMALL_SLOTS 32 /* pool slots of one page, for buffers that fit one */
#define POOL_SLOTS (SMALL_SLOTS + 32) /* and of POOL_SLOT_BYTES */
#define POOL_SLOT_BYTES ((size_t)64 << 10)
#define MAX_SLOTS (POOL_SLOTS + 64)
#define DEDICATED_MAX_BYTES ((size_t)256 << 20) /* all dedicated shadows together */
#define QUARANTINE_DEPTH 16
#define OBJECT_MAX 160
#define FUNCTION_MAX 96
#define STACK_MAX 1024
#define SITE_MAX 256
#define STACK_IDS 8 /* frames of a lend's Python stack kept as site ids (pysite.c) */
#define BACKTRACE_MAX 32
#define CHAIN_THREADS 64
#define ALTSTACK_BYTES ((size_t)64 << 10)

#ifndef MADV_GUARD_INSTALL
#define MADV_GUARD_INSTALL 102
#endif
#ifndef MADV_GUARD_REMOVE
#define MADV_GUARD_REMOVE 103
#endif

/* ADOPTING/ADOPTED: a closed shadow of a live original that C read again;
 * reopened read-only for good while the original lives (see adopt()). */
enum { FREE = 0, LENT = 1, QUARANTINED = 2, BROKEN = 3, ADOPTING = 4, ADOPTED = 5, EVICTING = 6 };
enum { OPEN = 0, CLOSED_GUARD = 1, CLOSED_MPROTECT = 2, OPEN_READONLY = 3 };

struct slot {
    _Atomic int state;
    uintptr_t area;    /* start of the data area (page aligned); a guard page on each side */
    size_t area_bytes; /* data area size */
    uintptr_t data;    /* where the copy starts: area + area_bytes - len */
    size_t len;
    uintptr_t closed;  /* start of the closed range (to area + area_bytes) */
    int how;           /* OPEN, CLOSED_GUARD or CLOSED_MPROTECT: how to reopen */
    int dedicated;     /* own mapping, unmapped when evicted */
    uintptr_t src;     /* the original's bytes (read again when an adopted guard region is removed) */
    _Atomic uintptr_t owner; /* the original's object while it is alive and immutable, else 0 */
    _Atomic int owner_freed; /* the heap map saw the original freed since the lend: a read is an error */
    int held;          /* Python holds a reference to owner for the slot (no heap map): alive while > 1 */
    int mutable_owner; /* owner is the heap block of a live mutable original (bytearray, ffi.new) */
    int trap;          /* no copy: a closed region standing for freed memory a slot of the call's
                          arguments points into (pb__quarantine_trap_sites) */
    char object[OBJECT_MAX];
    char function[FUNCTION_MAX];
    /* Where it was lent: site ids of the Python stack (their text is made
     * once per site, pb__site_line), or, from pb__quarantine_lend, text. */
    int nstack;        /* > 0: stack_ids[0, nstack) hold it; 0: site and stack */
    uint32_t stack_ids[STACK_IDS];
    char site[SITE_MAX];
    char stack[STACK_MAX];
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct slot slots[MAX_SLOTS];
static _Atomic unsigned long mutable_adoptions; /* shadows of mutable originals adopted so far */
static int fifo[QUARANTINE_DEPTH];
static int fifo_head, fifo_count;
static size_t page;
static size_t dedicated_bytes;
static int pool_ready;
static int try_guard = 1;      /* MADV_GUARD_INSTALL is tried first (a hint; slots record what worked) */
static int forced_mprotect;
static int fallbacks;

static struct sigaction prev_segv, prev_bus; /* what the kernel would run without us */
static _Atomic int reporting;

struct chain_rec {
    _Atomic pid_t tid;
    _Atomic int depth;           /* chained calls in progress on this thread */
    _Atomic uintptr_t frame;     /* a stack address in on_fault of the innermost one */
    siginfo_t *_Atomic info;     /* the siginfo it was given */
    _Atomic int nodefer;         /* the previous handler had SA_NODEFER */
};
static struct chain_rec chain_threads[CHAIN_THREADS];

/* Watched originals: a count per hash bucket of the owners of slots, read by
 * the heap map's free hook (pb__quarantine_owner_freed) without the lock. */
_Atomic unsigned char pb__qwatch[PB_QWATCH_BUCKETS];

/* Kept reads (adoptions), formatted in the handler, taken by Python. */
#define KEPT_RING 16
#define KEPT_TEXT 8192
struct kept_read {
    _Atomic uint64_t seq; /* n + 1 once entry n is complete, 0 while it is written */
    size_t len;
    char text[KEPT_TEXT];
};
static struct kept_read kept[KEPT_RING];
static _Atomic uint64_t kept_count;

static pthread_key_t altstack_key;
static pthread_once_t altstack_once = PTHREAD_ONCE_INIT;

/* ---- async-signal-safe output ------------------------------------------- */

static _Atomic int log_fd = -1; /* a second copy of every report (PTRBRIDGE_QUARANTINE_LOG) */

static void put_fd(int fd, const char *s, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, s, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return;
        s += w;
        n -= (size_t)w;
    }
}

/* While a kept read is formatted, put() appends to its ring entry instead
 * (the `reporting` flag is held: one writer). */
static char *sink;
static size_t sink_len, sink_cap;

static void put(const char *s, size_t n)
{
    if (sink != NULL) {
        size_t room = sink_cap - sink_len;
        if (n > room)
            n = room;
        memcpy(sink + sink_len, s, n);
        sink_len += n;
        return;
    }
    put_fd(STDERR_FILENO, s, n);
    int fd = atomic_load(&log_fd);
    if (fd >= 0)
        put_fd(fd, s, n);
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

static void put_dec(uintmax_t v)
{
    char buf[24];
    int i = (int)sizeof buf;
    do {
        buf[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v && i > 0);
    put(buf + i, sizeof buf - (size_t)i);
}

static void put_bytes(size_t n)
{
    put_dec(n);
    put_str(n == 1 ? " byte" : " bytes");
}

static void copy_text(char *dst, size_t cap, const char *src)
{
    size_t n = strlen(src);
    if (n >= cap)
        n = cap - 1;
    memcpy(dst, src, n);
    dst[n] = '\0';
}

static pid_t current_tid(void)
{
    return (pid_t)syscall(SYS_gettid);
}

/* ---- chaining -------------------------------------------------------------- */

static struct chain_rec *chain_record(pid_t tid, int claim)
{
    for (int i = 0; i < CHAIN_THREADS; i++)
        if (atomic_load(&chain_threads[i].tid) == tid)
            return &chain_threads[i];
    if (!claim)
        return NULL;
    for (int i = 0; i < CHAIN_THREADS; i++) {
        pid_t expected = 0;
        if (atomic_compare_exchange_strong(&chain_threads[i].tid, &expected, tid))
            return &chain_threads[i];
    }
    return NULL; /* table full: that thread is not cycle-protected */
}

static void chain_release(struct chain_rec *rec)
{
    if (rec != NULL && atomic_load(&rec->depth) == 0)
        atomic_store(&rec->tid, 0);
}

/* The default action, now: the process dies of `sig` (or, for a fault whose
 * signal is blocked, when the access repeats on return). */
static void die_default(int sig)
{
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(sig, &dfl, NULL);
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, sig);
    pthread_sigmask(SIG_UNBLOCK, &set, NULL);
    raise(sig);
}

/* Runs the handler that was installed before ours as the kernel would have. */
static void call_previous(int sig, siginfo_t *info, void *uctx, int sent)
{
    struct sigaction *rec = sig == SIGBUS ? &prev_bus : &prev_segv;
    struct sigaction prev = *rec;
    int siginfo = (prev.sa_flags & SA_SIGINFO) != 0;
    if (!siginfo && prev.sa_handler == SIG_IGN) {
        if (sent)
            return; /* an ignored signal sent by kill(): nothing happens */
        die_default(sig); /* the kernel does not let a fault be ignored */
        return;
    }
    if ((siginfo && prev.sa_sigaction == NULL) || (!siginfo && prev.sa_handler == SIG_DFL)) {
        die_default(sig);
        return;
    }
    if (prev.sa_flags & SA_RESETHAND) {
        /* One delivery, then the default action, as the kernel would do. */
        memset(rec, 0, sizeof *rec);
        rec->sa_handler = SIG_DFL;
        sigemptyset(&rec->sa_mask);
    }
    sigset_t mask = prev.sa_mask, old;
    if (!(prev.sa_flags & SA_NODEFER))
        sigaddset(&mask, sig);
    pthread_sigmask(SIG_BLOCK, &mask, &old);
    if ((prev.sa_flags & SA_NODEFER) && !sigismember(&prev.sa_mask, sig)) {
        /* The kernel would leave sig deliverable.  Ours has SA_NODEFER too,
         * but a runtime between the kernel and us may have blocked it
         * (ThreadSanitizer runs handlers from its own, which blocks every
         * signal): a nested fault in that handler must not kill the process. */
        sigset_t self;
        sigemptyset(&self);
        sigaddset(&self, sig);
        pthread_sigmask(SIG_UNBLOCK, &self, NULL);
    }
    pid_t tid = current_tid();
    struct chain_rec *me = chain_record(tid, 1);
    char here;
    uintptr_t old_frame = 0;
    siginfo_t *old_info = NULL;
    int old_nodefer = 0;
    if (me != NULL) {
        old_frame = atomic_load(&me->frame);
        old_info = atomic_load(&me->info);
        old_nodefer = atomic_load(&me->nodefer);
        atomic_store(&me->frame, (uintptr_t)&here);
        atomic_store(&me->info, info);
        atomic_store(&me->nodefer, (prev.sa_flags & SA_NODEFER) != 0);
        atomic_fetch_add(&me->depth, 1);
    }
    if (siginfo)
        prev.sa_sigaction(sig, info, uctx);
    else
        prev.sa_handler(sig);
    /* Not reached if the handler siglongjmp'd out: see on_fault. */
    if (me != NULL) {
        atomic_store(&me->frame, old_frame);
        atomic_store(&me->info, old_info);
        atomic_store(&me->nodefer, old_nodefer);
        atomic_fetch_sub(&me->depth, 1);
        chain_release(me);
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
}

/* ---- the report --------------------------------------------------------------- */

static int fault_is_write(void *uctx)
{
#if defined(__x86_64__)
    const ucontext_t *uc = uctx;
    return (uc->uc_mcontext.gregs[REG_ERR] & 2) ? 1 : 0; /* page-fault error code: W bit */
#else
    (void)uctx;
    return -1; /* this CPU does not say (cheaply) */
#endif
}

static uintptr_t fault_pc(void *uctx)
{
#if defined(__x86_64__)
    const ucontext_t *uc = uctx;
    return (uintptr_t)uc->uc_mcontext.gregs[REG_RIP];
#elif defined(__aarch64__)
    const ucontext_t *uc = uctx;
    return (uintptr_t)uc->uc_mcontext.pc;
#else
    (void)uctx;
    return 0;
#endif
}

static void put_frame(int n, uintptr_t pc)
{
    put_str("    #");
    put_dec((uintmax_t)n);
    put_str(" ");
    put_hex(pc);
    Dl_info dl;
    if (dladdr((void *)pc, &dl) != 0) {
        if (dl.dli_sname != NULL && dl.dli_saddr != NULL) {
            put_str(" in ");
            put_str(dl.dli_sname);
            put_str("+");
            put_hex(pc - (uintptr_t)dl.dli_saddr);
        }
        if (dl.dli_fname != NULL) {
            put_str(" (");
            put_str(dl.dli_fname);
            put_str("+");
            put_hex(pc - (uintptr_t)dl.dli_fbase);
            put_str(")");
        }
    }
    put_str("\n");
}

/* Prints the faulting thread's native stack from the faulting instruction;
 * stores the innermost symbol name for the SUMMARY line. */
static const char *base_name(const char *path)
{
    const char *b = path;
    for (const char *p = path; *p; p++)
        if (*p == '/')
            b = p + 1;
    return b;
}

static void put_backtrace(void *uctx, const char **where, const char **where_lib, uintptr_t *where_off)
{
    void *frames[BACKTRACE_MAX];
    int n = backtrace(frames, BACKTRACE_MAX);
    uintptr_t pc = fault_pc(uctx);
    int start = -1;
    for (int i = 0; i < n; i++)
        if ((uintptr_t)frames[i] == pc) {
            start = i;
            break;
        }
    int k = 0;
    if (start < 0) { /* the unwinder did not cross the signal frame: at least the pc */
        put_frame(k++, pc);
        n = 0;
        start = 0;
    }
    for (int i = start; i < n; i++)
        put_frame(k++, (uintptr_t)frames[i]);
    Dl_info dl;
    if (pc && dladdr((void *)pc, &dl) != 0) {
        if (dl.dli_sname != NULL)
            *where = dl.dli_sname;
        if (dl.dli_fname != NULL)
            *where_lib = base_name(dl.dli_fname);
        *where_off = pc - (uintptr_t)dl.dli_fbase;
    }
}

static struct slot *slot_of(uintptr_t a)
{
    for (int i = 0; i < MAX_SLOTS; i++) {
        struct slot *s = &slots[i];
        int state = atomic_load_explicit(&s->state, memory_order_acquire);
        if (state != LENT && state != QUARANTINED && state != ADOPTING && state != ADOPTED)
            continue;
        if (s->area == 0 || a < s->area - page || a >= s->area + s->area_bytes + page)
            continue;
        if (state == LENT && !s->trap && a >= s->area && a < s->area + s->area_bytes)
            continue; /* open while lent: not a fault of ours */
        if (state != LENT && a >= s->area && a < s->closed)
            continue; /* below the closed pages: never part of the copy */
        return s;
    }
    return NULL;
}

/* Whether the slot's original is alive in the program: watched and not seen
 * freed, and, when only ptrbridge's reference keeps it (held), referenced by
 * someone else too.  Reads the reference count without the GIL: a count
 * changing meanwhile is a race the program has anyway. */
static int owner_alive(struct slot *s)
{
    uintptr_t owner = atomic_load(&s->owner);
    if (owner == 0)
        return 0;
    return !s->held || Py_REFCNT((PyObject *)owner) > 1;
}

/* "/path/file.py:12" of the lending call */
static void put_site(const struct slot *s)
{
    size_t where_len = 0;
    const char *line = s->nstack > 0 ? pb__site_line(s->stack_ids[0], &where_len) : NULL;
    if (line != NULL)
        put(line, where_len);
    else
        put_str(s->nstack > 0 ? "<unknown>" : s->site);
}

/* "    #k /path/file.py:12 in name" lines of the lending call's Python stack */
static void put_stack(const struct slot *s)
{
    if (s->nstack == 0) {
        put_str(s->stack);
        return;
    }
    for (int k = 0; k < s->nstack; k++) {
        size_t where_len;
        const char *line = pb__site_line(s->stack_ids[k], &where_len);
        put_str("    #");
        put_dec((uintmax_t)k);
        put_str(" ");
        put_str(line != NULL ? line : "<unknown>\n");
    }
}

/* "bytes(241) lent to produce() at file.py:12" */
static void put_lent(const struct slot *s)
{
    put_str(s->object);
    put_str(s->trap ? " passed to " : " lent to ");
    put_str(s->function);
    put_str("() at ");
    put_site(s);
}

static void report(struct slot *s, int state, uintptr_t a, void *uctx)
{
    int write_access = fault_is_write(uctx);
    const char *verb = write_access == 1 ? "wrote" : write_access == 0 ? "read" : "accessed";
    const char *access = write_access == 1 ? "WRITE" : write_access == 0 ? "READ" : "ACCESS";
    const char *kind;
    uintptr_t end = s->data + s->len;
    put_str("\n=================================================================\n");
    if (s->trap) {
        kind = "use-after-free";
        put_str("ptrbridge: C ");
        put_str(verb);
        put_str(" freed Python memory through a pointer the call was passed (caught by quarantine): ");
        put_lent(s);
        put_str("\n");
    } else if (state == LENT) {
        kind = "overrun";
        put_str("ptrbridge: C ");
        put_str(verb);
        if (a >= end) {
            put_str(" past the end of ");
            put_str(s->object);
            put_str(" lent to ");
            put_str(s->function);
            put_str("(): ");
            put_bytes((size_t)(a - end) + 1);
            put_str(" beyond its end (at ");
            put_site(s);
            put_str(", caught by the quarantine's guard page)\n");
        } else {
            put_str(" before the start of ");
            put_str(s->object);
            put_str(" lent to ");
            put_str(s->function);
            put_str("(): ");
            put_bytes((size_t)(s->data - a));
            put_str(" before its start (at ");
            put_site(s);
            put_str(", caught by the quarantine's guard page)\n");
        }
    } else if (state == ADOPTING) {
        kind = "kept-read";
        put_str(s->mutable_owner
                    ? "ptrbridge: C read a pointer to Python memory after the call that lent it returned "
                      "(R2, caught by quarantine; portability: the object is alive, so the read went on): "
                    : "ptrbridge: C read a pointer to Python memory after the call that lent it returned "
                      "(R2, caught by quarantine; portability: the original is alive and immutable, so the read "
                      "went on): ");
        put_lent(s);
        put_str("\n");
    } else {
        kind = "use-after-release";
        put_str("ptrbridge: C used a pointer to Python memory after the call that lent it returned "
                "(R2, caught by quarantine): ");
        put_lent(s);
        put_str("\n");
    }
    /* 1. the access */
    put_str(access);
    put_str(" at ");
    put_hex(a);
    put_str(" by thread ");
    put_dec((uintmax_t)current_tid());
    put_str(" (pid ");
    put_dec((uintmax_t)getpid());
    put_str("):\n");
    const char *where = NULL, *where_lib = NULL;
    uintptr_t where_off = 0;
    put_backtrace(uctx, &where, &where_lib, &where_off);
    put_str("\n");
    put_hex(a);
    if (a >= s->data && a < end) {
        put_str(" is offset ");
        put_dec((uintmax_t)(a - s->data));
        put_str(" into it");
    } else if (a >= end) {
        put_str(" is ");
        put_bytes((size_t)(a - end));
        put_str(" past its end");
    } else {
        put_str(" is ");
        put_bytes((size_t)(s->data - a));
        put_str(" before its start");
    }
    put_str(" (");
    put_str(s->object);
    put_str(", shadow ");
    put_hex(s->data);
    put_str("-");
    put_hex(end);
    put_str(")\n\n");
    /* 2. where it was lent (a trap: passed, pointing into memory freed before) */
    put_str(s->trap ? "passed to " : "lent to ");
    put_str(s->function);
    put_str("() by the Python call (innermost first):\n");
    put_stack(s);
    put_str("\n");
    /* 3. where it was released */
    if (s->trap) {
        put_str("freed before the call to ");
        put_str(s->function);
        put_str("(): a pointer in its arguments (a struct field or an array slot) still pointed into it; "
                "ptrbridge pointed it at this guard region for the call, and C used it.\n");
        if (state == ADOPTING)
            put_str("The access went on in the region, filled with 0xDB (what freed memory reads as under "
                    "ptrbridge; its last byte 0), and the program goes on.\n");
        put_str("Keep the object alive, or pin it, for as long as C uses it.\n");
    } else if (state == LENT) {
        put_str("still lent: the call to ");
        put_str(s->function);
        put_str("() has not returned; C went outside the buffer it was given.\n");
    } else if (state == ADOPTING) {
        put_str("released when the call to ");
        put_str(s->function);
        put_str("() returned; C kept the pointer and read through it later.\n");
        put_str(s->mutable_owner
                    ? "CPython does not move objects, so this works while the object lives; under Go's rule R2 "
                      "(or a moving collector) it is a bug.  The shadow was reopened read-only, filled from the "
                      "object, and the read went on; what the program writes into the object reaches it at the "
                      "next checked call, a write by C through it is an error, and it is closed again when the "
                      "object is freed (a read after that is an error).\n"
                    : "CPython does not move objects, so this works while the object lives and nothing changes "
                      "it; under Go's rule R2 (or a moving collector) it is a bug.  The shadow was reopened "
                      "read-only and the read went on; it is closed again when the object is freed, and a read "
                      "after that is an error.\n");
        put_str(
                "Keep the object alive and pinned for as long as C keeps the pointer (ptrbridge.Pinner), "
                "or give C its own copy (ptrbridge.CBuffer).\n");
    } else if (atomic_load(&s->owner_freed) || (s->held && atomic_load(&s->owner) != 0 && !owner_alive(s))) {
        put_str("released when the call to ");
        put_str(s->function);
        put_str("() returned (the shadow was closed then), and the object has been freed since.\n"
                "C kept the pointer past the object's life: pin the object for its whole C lifetime, "
                "copy it with ptrbridge.CBuffer, or pass a ptrbridge.Handle.\n");
    } else if (state == ADOPTED) {
        put_str("released when the call to ");
        put_str(s->function);
        put_str(s->mutable_owner
                    ? "() returned; C kept the pointer, read through it (a kept read), then wrote through it.\n"
                      "Under quarantine C's writes would reach a copy the object never sees: pin the object "
                      "(ptrbridge.Pinner) for as long as C keeps the pointer.\n"
                    : "() returned; C kept the pointer, read through it (a kept read), then wrote to the "
                      "immutable object through it.\n"
                      "C must not write into bytes: pass a bytearray (pinned for as long as C keeps it) or a "
                      "ptrbridge.CBuffer.\n");
    } else {
        put_str("released when the call to ");
        put_str(s->function);
        put_str("() returned (the shadow was closed then).\n"
                "C kept the pointer past the call: pin the object for its whole C lifetime, "
                "copy it with ptrbridge.CBuffer, or pass a ptrbridge.Handle.\n");
    }
    put_str("\nSUMMARY: ptrbridge: ");
    put_str(kind);
    put_str(" (");
    put_str(access);
    put_str(") in ");
    if (where != NULL) {
        put_str(where);
        if (where_lib != NULL) {
            put_str(" (");
            put_str(where_lib);
            put_str(")");
        }
    } else if (where_lib != NULL) { /* no dynamic symbol (a static function): the library and
                                       offset, as ASan prints them */
        put_str(where_lib);
        put_str("+");
        put_hex(where_off);
    } else {
        put_str("??");
    }
    put_str(" on ");
    put_lent(s);
    put_str("\n=================================================================\n");
}

/* Takes the `reporting` flag for formatting a kept read (2); 0 if a fatal
 * report holds it (the process is about to die). */
static int take_reporting_for_kept(void)
{
    for (;;) {
        int expected = 0;
        if (atomic_compare_exchange_strong(&reporting, &expected, 2))
            return 1;
        if (expected == 1)
            return 0;
        struct timespec t = {0, 100000};
        nanosleep(&t, NULL);
    }
}

/* Writes the report of an access the program survives (a kept read, a
 * trap's use) into the ring Python takes (pb__quarantine_kept_read). */
static void keep_report(struct slot *s, uintptr_t a, void *uctx)
{
    if (!take_reporting_for_kept())
        return;
    uint64_t k = atomic_load(&kept_count);
    struct kept_read *e = &kept[k % KEPT_RING];
    atomic_store(&e->seq, 0);
    sink = e->text;
    sink_len = 0;
    sink_cap = sizeof e->text - 1;
    report(s, ADOPTING, a, uctx);
    e->len = sink_len;
    e->text[sink_len] = '\0';
    sink = NULL;
    atomic_store(&e->seq, k + 1);
    atomic_store(&kept_count, k + 1);
    atomic_store(&reporting, 0);
}

/* A read of a closed shadow whose original is alive: a bytes, or (with the
 * heap map watching its block) a mutable buffer.  What C reads is what the
 * original holds, and CPython does not move it, so the program is correct
 * there (Go's R2 says otherwise: a portability finding).  The shadow is
 * reopened read-only for good, refilled from the original (a mutable one's
 * later changes are copied in at each checked call,
 * pb__quarantine_refresh_adopted), and the read retried; the heap map's free
 * hook closes it again when the original is freed.  A write is not adopted:
 * C's writes would reach the copy, not the object.  Returns 1 if adopted.
 * Async-signal-safe (atomics, madvise, mprotect, memcpy). */
static int adopt(struct slot *s, uintptr_t a, void *uctx)
{
    if (!owner_alive(s) || fault_is_write(uctx) == 1)
        return 0; /* freed, mutable, or a write into bytes: an error */
    int expected = QUARANTINED;
    if (!atomic_compare_exchange_strong(&s->state, &expected, ADOPTING))
        return 0;
    if (!owner_alive(s)) { /* freed meanwhile (the free hook clears it first) */
        atomic_store(&s->state, QUARANTINED);
        return 0;
    }
    void *addr = (void *)s->closed;
    size_t n = s->area + s->area_bytes - s->closed;
    int rc = 0;
    if (s->how == CLOSED_GUARD) {
        rc = madvise(addr, n, MADV_GUARD_REMOVE);
        if (rc == 0) {
            memcpy((void *)s->data, (const void *)s->src, s->len); /* the guard discarded the copy */
            rc = mprotect(addr, n, PROT_READ);
        }
    } else if (s->how == CLOSED_MPROTECT && s->mutable_owner) {
        /* What the object holds now, not what it held when the call returned. */
        rc = mprotect(addr, n, PROT_READ | PROT_WRITE);
        if (rc == 0) {
            memcpy((void *)s->data, (const void *)s->src, s->len);
            rc = mprotect(addr, n, PROT_READ);
        }
    } else if (s->how == CLOSED_MPROTECT) {
        rc = mprotect(addr, n, PROT_READ);
    }
    if (rc != 0) {
        atomic_store(&s->state, QUARANTINED);
        return 0;
    }
    s->how = OPEN_READONLY;
    keep_report(s, a, uctx);
    if (s->mutable_owner)
        atomic_fetch_add(&mutable_adoptions, 1);
    atomic_store(&s->state, ADOPTED);
    return 1;
}

/* C used a trap while the call runs (freed memory a struct field of its
 * arguments points into): a use after free, reported as an error; the access
 * goes on, as it would without ptrbridge, in the trap opened and filled with
 * the pattern freed memory reads as under ptrbridge (0xDB; its last byte 0,
 * so that a string read there ends), and the process lives.  finish() closes it when the call returns.  Returns 1 if opened.
 * Async-signal-safe (atomics, madvise, mprotect, memset). */
static int open_trap(struct slot *s, uintptr_t a, void *uctx)
{
    int expected = LENT;
    if (!s->trap || s->how == OPEN || a < s->data || a >= s->data + s->len)
        return 0; /* opened already, or past its ends (a guard page): fatal */
    if (!atomic_compare_exchange_strong(&s->state, &expected, ADOPTING))
        return 0;
    void *addr = (void *)s->closed;
    size_t n = s->area + s->area_bytes - s->closed;
    int rc = s->how == CLOSED_GUARD ? madvise(addr, n, MADV_GUARD_REMOVE) : 0;
    if (rc == 0)
        rc = mprotect(addr, n, PROT_READ | PROT_WRITE);
    if (rc != 0) {
        atomic_store(&s->state, LENT);
        return 0;
    }
    memset((void *)s->data, 0xDB, s->len);
    ((char *)s->data)[s->len - 1] = '\0'; /* a string read in it ends inside it */
    s->how = OPEN;
    keep_report(s, a, uctx);
    atomic_store(&s->state, LENT); /* open again: the call still runs */
    return 1;
}

static void on_fault(int sig, siginfo_t *info, void *uctx)
{
    int saved_errno = errno;
    int sent = info == NULL || info->si_code <= 0; /* kill, tgkill, sigqueue: not a fault */
    pid_t tid = current_tid();
    struct chain_rec *me = chain_record(tid, 0);
    if (me != NULL && atomic_load(&me->depth) > 0) {
        char here;
        uintptr_t h = (uintptr_t)&here, outer = atomic_load(&me->frame);
        if (h < outer && outer - h < ((uintptr_t)8 << 20)) {
            /* Entered from inside the handler we chained to (the stack
             * grows down).  Sent, or the same fault passed on by a direct
             * call: it passes the signal on to its previous handler, which
             * is us (it was installed after us and we went back on top), so
             * the cycle ends in the default action.  A new fault inside a
             * handler without SA_NODEFER: the kernel would kill the process. */
            if (sent || info == atomic_load(&me->info) || !atomic_load(&me->nodefer)) {
                die_default(sig);
                errno = saved_errno;
                return;
            }
        } else {
            /* Not nested: the handler siglongjmp'd out of its chained call,
             * which is no longer in progress. */
            atomic_store(&me->depth, 0);
            chain_release(me);
        }
    }
    struct slot *s = sent ? NULL : slot_of((uintptr_t)info->si_addr);
    if (s != NULL) {
        int state = atomic_load_explicit(&s->state, memory_order_acquire);
        if (state == QUARANTINED && adopt(s, (uintptr_t)info->si_addr, uctx)) {
            errno = saved_errno;
            return; /* the read is retried on the reopened shadow */
        }
        if (state == LENT && s->trap && open_trap(s, (uintptr_t)info->si_addr, uctx)) {
            errno = saved_errno;
            return; /* the access is retried on the opened trap */
        }
        while (state == ADOPTING) { /* another thread is reopening it: retry after it did */
            struct timespec t = {0, 100000};
            nanosleep(&t, NULL);
            state = atomic_load_explicit(&s->state, memory_order_acquire);
            if (state != ADOPTING) {
                errno = saved_errno;
                return;
            }
        }
        for (;;) {
            int expected = 0;
            if (atomic_compare_exchange_strong(&reporting, &expected, 1))
                break;
            if (expected == 1) { /* another thread is reporting and will end the process */
                struct timespec t = {1, 0};
                for (;;)
                    nanosleep(&t, NULL);
            }
            struct timespec t = {0, 100000}; /* a kept read is being written down: wait for it */
            nanosleep(&t, NULL);
        }
        report(s, state, (uintptr_t)info->si_addr, uctx);
        call_previous(sig, info, uctx, sent); /* faulthandler adds the Python traceback */
        die_default(sig);
        errno = saved_errno;
        return;
    }
    call_previous(sig, info, uctx, sent);
    errno = saved_errno;
}

/* ---- the handler ------------------------------------------------------------ */

static int handler_on_top(int sig)
{
    struct sigaction cur;
    if (sigaction(sig, NULL, &cur) != 0)
        return 0;
    return (cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == on_fault;
}

/* Lock held (or at init).  SIGSEGV is looked at on every call, SIGBUS on
 * every 64th (a syscall each: the per-lend cost matters, and whoever takes
 * SIGBUS over without SIGSEGV is rare). */
static int ensure_handler_locked(int all)
{
    static int warmed;
    static unsigned calls;
    if (!warmed) {
        void *frames[2];
        backtrace(frames, 2); /* loads the unwinder now, not in the handler */
        warmed = 1;
    }
    int changed = 0;
    const int sigs[2] = {SIGSEGV, SIGBUS};
    int n = (all || calls++ % 64 == 0) ? 2 : 1;
    for (int i = 0; i < n; i++) {
        if (handler_on_top(sigs[i]))
            continue;
        struct sigaction ours, before;
        memset(&ours, 0, sizeof ours);
        ours.sa_sigaction = on_fault;
        ours.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
        sigemptyset(&ours.sa_mask);
        if (sigaction(sigs[i], &ours, &before) != 0)
            continue;
        *(sigs[i] == SIGSEGV ? &prev_segv : &prev_bus) = before; /* whoever was on top is chained to */
        changed = 1;
    }
    return changed;
}

int pb__quarantine_ensure_handler(void)
{
    pthread_mutex_lock(&lock);
    int changed = ensure_handler_locked(1);
    pthread_mutex_unlock(&lock);
    return changed;
}

/* ---- alternate signal stacks ------------------------------------------------ */

static int altstack_key_ok;
static void *const altstack_foreign = (void *)&altstack_key_ok; /* marker: the thread had one */

static void altstack_release(void *mem)
{
    if (mem == altstack_foreign)
        return;
    stack_t ss, cur;
    if (sigaltstack(NULL, &cur) == 0 && cur.ss_sp == mem) {
        memset(&ss, 0, sizeof ss);
        ss.ss_flags = SS_DISABLE;
        sigaltstack(&ss, NULL);
    }
    munmap(mem, ALTSTACK_BYTES);
}

static void altstack_key_init(void)
{
    altstack_key_ok = pthread_key_create(&altstack_key, altstack_release) == 0;
}


/* Gives the calling thread an alternate signal stack if it has none. */
static void ensure_altstack(void)
{
    pthread_once(&altstack_once, altstack_key_init);
    if (!altstack_key_ok || pthread_getspecific(altstack_key) != NULL)
        return;
    stack_t cur;
    if (sigaltstack(NULL, &cur) != 0)
        return;
    if (!(cur.ss_flags & SS_DISABLE)) {
        /* Someone else's (faulthandler's): keep it, remember not to look again. */
        pthread_setspecific(altstack_key, altstack_foreign);
        return;
    }
    void *mem = mmap(NULL, ALTSTACK_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED)
        return;
    stack_t ss;
    memset(&ss, 0, sizeof ss);
    ss.ss_sp = mem;
    ss.ss_size = ALTSTACK_BYTES;
    if (sigaltstack(&ss, NULL) != 0 || pthread_setspecific(altstack_key, mem) != 0) {
        munmap(mem, ALTSTACK_BYTES);
        return;
    }
}

/* ---- slots ------------------------------------------------------------------ */

/* Closes [s->closed, area end).  The whole area: mprotect (see below).  Part
 * of it: a guard region first (no VMA split), mprotect for this slot only if
 * the kernel refuses.  Lock held. */
static int close_slot(struct slot *s)
{
    void *addr = (void *)s->closed;
    size_t n = s->area + s->area_bytes - s->closed;
    if (n == 0) {
        s->how = CLOSED_GUARD;
        return 0;
    }
    /* The whole data area (a small slot, or a dedicated one the copy fills):
     * mprotect merges it with its guard pages, so it adds no VMA, and the
     * pages keep their contents, where a guard region would discard them and
     * the next lend of the slot would take a page fault per page to refill
     * them (that fault costs more than the mprotect pair). */
    int whole = s->closed == s->area;
    if (try_guard && !forced_mprotect && !whole) {
        if (madvise(addr, n, MADV_GUARD_INSTALL) == 0) {
            s->how = CLOSED_GUARD;
            return 0;
        }
        if (errno == EINVAL)
            try_guard = 0; /* the kernel has no guard regions: do not ask again */
        fallbacks++;
    }
    if (mprotect(addr, n, PROT_NONE) == 0) {
        s->how = CLOSED_MPROTECT;
        return 0;
    }
    return -1;
}

/* Reopens a closed slot the way it was closed.  Lock held. */
static int open_slot(struct slot *s)
{
    void *addr = (void *)s->closed;
    size_t n = s->area + s->area_bytes - s->closed;
    int rc = 0;
    if (n == 0 || s->how == OPEN)
        rc = 0;
    else if (s->how == OPEN_READONLY)
        rc = mprotect(addr, n, PROT_READ | PROT_WRITE);
    else if (s->how == CLOSED_GUARD)
        rc = madvise(addr, n, MADV_GUARD_REMOVE);
    else
        rc = mprotect(addr, n, PROT_READ | PROT_WRITE);
    if (rc == 0)
        s->how = OPEN;
    return rc;
}

/* Maps guard + data area + guard; returns the area start or 0.  Lock held. */
static uintptr_t map_area(size_t area_bytes)
{
    size_t total = area_bytes + 2 * page;
    char *p = mmap(NULL, total, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return 0;
    if (mprotect(p + page, area_bytes, PROT_READ | PROT_WRITE) != 0) {
        munmap(p, total);
        return 0;
    }
    memset(p + page, 0, area_bytes); /* pre-fault the pages */
    return (uintptr_t)(p + page);
}

static void unmap_area(struct slot *s)
{
    munmap((void *)(s->area - page), s->area_bytes + 2 * page);
    dedicated_bytes -= s->area_bytes;
    s->area = 0;
    s->area_bytes = 0;
}

static void at_fork_prepare(void)
{
    pthread_mutex_lock(&lock);
}

static void at_fork_parent(void)
{
    pthread_mutex_unlock(&lock);
}

static void at_fork_child(void)
{
    pthread_mutex_unlock(&lock);
    for (int i = 0; i < CHAIN_THREADS; i++) { /* other threads are gone */
        atomic_store(&chain_threads[i].tid, 0);
        atomic_store(&chain_threads[i].depth, 0);
    }
}

static int init_pool(void)
{
    if (pool_ready)
        return 0;
    page = (size_t)sysconf(_SC_PAGESIZE);
    for (int i = 0; i < POOL_SLOTS; i++) {
        size_t area_bytes = i < SMALL_SLOTS ? page : POOL_SLOT_BYTES;
        uintptr_t area = map_area(area_bytes);
        if (area == 0) {
            for (int j = 0; j < i; j++)
                munmap((void *)(slots[j].area - page), slots[j].area_bytes + 2 * page);
            return -1;
        }
        slots[i].area = area;
        slots[i].area_bytes = area_bytes;
        slots[i].closed = area + area_bytes;
        slots[i].how = OPEN;
        slots[i].dedicated = 0;
    }
    pthread_atfork(at_fork_prepare, at_fork_parent, at_fork_child);
    pool_ready = 1;
    return 0;
}

/* Watches (owner != 0) or stops watching a slot's original.  Lock held. */
static void watch_locked(struct slot *s, uintptr_t owner)
{
    atomic_store(&s->owner_freed, 0);
    atomic_store(&s->owner, owner);
    if (owner != 0)
        atomic_fetch_add(&pb__qwatch[pb__qwatch_bucket(owner)], 1);
}

static void unwatch_locked(struct slot *s)
{
    uintptr_t owner = atomic_exchange(&s->owner, 0);
    if (owner != 0)
        atomic_fetch_sub(&pb__qwatch[pb__qwatch_bucket(owner)], 1);
}

/* Puts a closed slot at the end of the FIFO, evicting the oldest if full.  Lock held. */
static void enqueue_locked(int index);

/* Reopens the oldest quarantined slot.  An adopted one leaves the FIFO as it
 * is: C still reads it; it comes back when its original is freed.  Lock held. */
static void evict_one(void)
{
    int i = fifo[fifo_head];
    fifo_head = (fifo_head + 1) % QUARANTINE_DEPTH;
    fifo_count--;
    struct slot *s = &slots[i];
    int expected = QUARANTINED;
    if (!atomic_compare_exchange_strong(&s->state, &expected, EVICTING))
        return; /* adopted (or being adopted) */
    unwatch_locked(s);
    if (s->dedicated) {
        atomic_store_explicit(&s->state, FREE, memory_order_release);
        unmap_area(s);
        return;
    }
    if (open_slot(s) != 0) {
        atomic_store_explicit(&s->state, BROKEN, memory_order_release); /* never lent again */
        return;
    }
    s->closed = s->area + s->area_bytes;
    atomic_store_explicit(&s->state, FREE, memory_order_release);
}

static void copy_text_n(char *dst, size_t cap, const char *src, size_t n)
{
    if (n >= cap)
        n = cap - 1;
    memcpy(dst, src, n);
    dst[n] = '\0';
}

/* Both ways of lending: where it was lent is `ids` (nids > 0), else the
 * texts `site` and `stack`. */
static int lend(const void *src, size_t len, uintptr_t owner, int held, const char *object, size_t object_len,
                const char *function, size_t function_len, const char *site, const char *stack,
                const uint32_t *ids, int nids, uintptr_t *shadow)
{
    ensure_altstack();
    pthread_mutex_lock(&lock);
    if (init_pool() != 0) {
        pthread_mutex_unlock(&lock);
        return PB_ERR_NOMEM;
    }
    ensure_handler_locked(0);
    int found = -1;
    if (len <= POOL_SLOT_BYTES) {
        for (int attempt = 0; attempt < 2 && found < 0; attempt++) {
            for (int i = len <= page ? 0 : SMALL_SLOTS; i < POOL_SLOTS; i++) /* a small slot first */
                if (atomic_load(&slots[i].state) == FREE) {
                    found = i;
                    break;
                }
            if (found < 0 && fifo_count > 0)
                evict_one();
        }
    }
    /* A large buffer, or a small one when adopted shadows (kept reads of live
     * bytes) hold the pool: a mapping of its own. */
    if (found < 0) {
        size_t area_bytes = (len + page - 1) / page * page;
        if (area_bytes == 0)
            area_bytes = page;
        for (int attempt = 0; attempt < 2 && found < 0; attempt++) {
            if (dedicated_bytes + area_bytes <= DEDICATED_MAX_BYTES) {
                for (int i = POOL_SLOTS; i < MAX_SLOTS; i++)
                    if (atomic_load(&slots[i].state) == FREE && slots[i].area == 0) {
                        uintptr_t area = map_area(area_bytes);
                        if (area != 0) {
                            slots[i].area = area;
                            slots[i].area_bytes = area_bytes;
                            slots[i].how = OPEN;
                            slots[i].dedicated = 1;
                            dedicated_bytes += area_bytes;
                            found = i;
                        }
                        break;
                    }
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
    s->closed = s->area + s->area_bytes;
    if (len && src != NULL) /* (no source: a trap, nothing to copy) */
        memcpy((void *)s->data, src, len);
    s->trap = 0;
    copy_text_n(s->object, sizeof s->object, object, object_len);
    copy_text_n(s->function, sizeof s->function, function, function_len);
    if (nids > 0) {
        if (nids > STACK_IDS)
            nids = STACK_IDS;
        memcpy(s->stack_ids, ids, (size_t)nids * sizeof *ids);
        s->nstack = nids;
    } else {
        s->nstack = 0;
        copy_text(s->site, sizeof s->site, site);
        copy_text(s->stack, sizeof s->stack, stack);
    }
    s->src = (uintptr_t)src;
    s->held = owner != 0 && (held & PB_QOWNER_HELD) != 0;
    s->mutable_owner = owner != 0 && (held & PB_QOWNER_MUTABLE) != 0;
    watch_locked(s, owner);
    atomic_store_explicit(&s->state, LENT, memory_order_release);
    *shadow = s->data;
    pthread_mutex_unlock(&lock);
    return found;
}

int pb__quarantine_lend(const void *src, size_t len, uintptr_t owner, int held, const char *object,
                        const char *function, const char *site, const char *stack, uintptr_t *shadow)
{
    if ((src == NULL && len != 0) || shadow == NULL || object == NULL || function == NULL || site == NULL ||
        stack == NULL)
        return PB_ERR_INVALID;
    return lend(src, len, owner, held, object, strlen(object), function, strlen(function), site, stack, NULL, 0,
                shadow);
}

int pb__quarantine_lend_sites(const void *src, size_t len, uintptr_t owner, int held, const char *object,
                              size_t object_len, const char *function, size_t function_len, const uint32_t *ids,
                              int nids, uintptr_t *shadow)
{
    if ((src == NULL && len != 0) || shadow == NULL || object == NULL || function == NULL ||
        (ids == NULL && nids > 0))
        return PB_ERR_INVALID;
    if (nids <= 0) /* no Python caller */
        return lend(src, len, owner, held, object, object_len, function, function_len, "<unknown>",
                    "    #0 <unknown>\n", NULL, 0, shadow);
    return lend(src, len, owner, held, object, object_len, function, function_len, NULL, NULL, ids, nids, shadow);
}

int pb__quarantine_trap_sites(size_t len, const char *object, size_t object_len, const char *function,
                              size_t function_len, const uint32_t *ids, int nids, uintptr_t *shadow)
{
    if (len == 0 || shadow == NULL || object == NULL || function == NULL || (ids == NULL && nids > 0))
        return PB_ERR_INVALID;
    int index = nids <= 0 ? lend(NULL, len, 0, 0, object, object_len, function, function_len, "<unknown>",
                                 "    #0 <unknown>\n", NULL, 0, shadow)
                          : lend(NULL, len, 0, 0, object, object_len, function, function_len, NULL, NULL, ids,
                                 nids, shadow);
    if (index < 0)
        return index;
    pthread_mutex_lock(&lock);
    struct slot *s = &slots[index];
    s->trap = 1;
    atomic_store(&s->owner_freed, 1);
    s->closed = s->data & ~(uintptr_t)(page - 1);
    int rc = close_slot(s);
    if (rc != 0) { /* cannot close it: no trap */
        s->trap = 0;
        s->closed = s->area + s->area_bytes;
        s->how = OPEN;
        atomic_store_explicit(&s->state, FREE, memory_order_release);
        if (s->dedicated)
            unmap_area(s);
    }
    pthread_mutex_unlock(&lock);
    return rc != 0 ? PB_ERR_NOMEM : index;
}

int pb__quarantine_finish_at(int index, uintptr_t dst)
{
    return pb__quarantine_finish(index, (void *)dst);
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
    int status = PB_OK;
    if (dst == NULL && s->len && s->src != 0 && atomic_load(&s->owner) != 0 && !s->mutable_owner && !s->trap &&
        memcmp((const void *)s->data, (const void *)s->src, s->len) != 0) {
        /* C wrote into the copy of an immutable original: without the quarantine the write
         * reaches the object itself, so it does now too; the caller reports it. */
        memcpy((void *)s->src, (const void *)s->data, s->len);
        status = PB_QUARANTINE_WROTE_IMMUTABLE;
    }
    if (fifo_count == QUARANTINE_DEPTH)
        evict_one();
    s->closed = s->data & ~(uintptr_t)(page - 1); /* the pages that held the copy */
    if (close_slot(s) != 0) {
        /* Cannot close it: release it at once, unquarantined. */
        unwatch_locked(s);
        s->closed = s->area + s->area_bytes;
        s->how = OPEN;
        if (s->dedicated) {
            atomic_store_explicit(&s->state, FREE, memory_order_release);
            unmap_area(s);
        } else {
            atomic_store_explicit(&s->state, FREE, memory_order_release);
        }
        pthread_mutex_unlock(&lock);
        return status;
    }
    atomic_store_explicit(&s->state, QUARANTINED, memory_order_release);
    enqueue_locked(index);
    pthread_mutex_unlock(&lock);
    return status;
}

static void enqueue_locked(int index)
{
    if (fifo_count == QUARANTINE_DEPTH)
        evict_one();
    fifo[(fifo_head + fifo_count) % QUARANTINE_DEPTH] = index;
    fifo_count++;
}

int pb__quarantine_refresh_adopted(void)
{
    if (atomic_load_explicit(&mutable_adoptions, memory_order_relaxed) == 0)
        return 0; /* never any: nothing to look at (the common case, on every checked call) */
    int refreshed = 0;
    pthread_mutex_lock(&lock);
    for (int i = 0; i < MAX_SLOTS; i++) {
        struct slot *s = &slots[i];
        if (!s->mutable_owner || atomic_load(&s->state) != ADOPTED || atomic_load(&s->owner) == 0)
            continue; /* (the free hook clears owner under the lock before it closes the slot) */
        if (memcmp((const void *)s->data, (const void *)s->src, s->len) == 0)
            continue;
        void *addr = (void *)s->closed;
        size_t n = s->area + s->area_bytes - s->closed;
        if (mprotect(addr, n, PROT_READ | PROT_WRITE) == 0) {
            memcpy((void *)s->data, (const void *)s->src, s->len);
            mprotect(addr, n, PROT_READ);
            refreshed++;
        }
    }
    pthread_mutex_unlock(&lock);
    return refreshed;
}

void pb__quarantine_owner_freed_slow(uintptr_t object)
{
    for (int i = 0; i < MAX_SLOTS; i++) {
        struct slot *s = &slots[i];
        if (atomic_load_explicit(&s->owner, memory_order_relaxed) != object)
            continue;
        pthread_mutex_lock(&lock);
        if (atomic_load(&s->owner) == object) {
            unwatch_locked(s); /* first: adopt() checks it after claiming the slot */
            atomic_store(&s->owner_freed, 1);
            int state;
            while ((state = atomic_load(&s->state)) == ADOPTING) {
                struct timespec t = {0, 100000}; /* a handler is reopening it on another thread */
                nanosleep(&t, NULL);
            }
            if (state == ADOPTED) {
                /* Closed again: C reading it from now on reads freed memory. */
                if (open_slot(s) == 0 && close_slot(s) == 0) {
                    atomic_store_explicit(&s->state, QUARANTINED, memory_order_release);
                    enqueue_locked(i);
                } else {
                    atomic_store_explicit(&s->state, BROKEN, memory_order_release); /* never lent again */
                }
            }
        }
        pthread_mutex_unlock(&lock);
    }
}

void pb__quarantine_unwatch_all(void)
{
    pthread_mutex_lock(&lock);
    for (int i = 0; i < MAX_SLOTS; i++) {
        struct slot *s = &slots[i];
        if (atomic_load(&s->owner) != 0) {
            unwatch_locked(s);
            /* An adopted slot's original can no longer be followed: it stays open (read-only). */
        }
    }
    pthread_mutex_unlock(&lock);
}

int pb__quarantine_adopted(int slot)
{
    if (slot < 0 || slot >= MAX_SLOTS)
        return 0;
    int state = atomic_load(&slots[slot].state);
    return state == ADOPTED || state == ADOPTING;
}

uint64_t pb__quarantine_kept_reads(void)
{
    return atomic_load(&kept_count);
}

long pb__quarantine_kept_read(uint64_t n, char *out, size_t cap)
{
    if (out == NULL || cap == 0)
        return PB_ERR_INVALID;
    struct kept_read *e = &kept[n % KEPT_RING];
    if (atomic_load(&e->seq) != n + 1)
        return -1; /* overwritten by a later one, or not written yet */
    size_t len = e->len < cap - 1 ? e->len : cap - 1;
    memcpy(out, e->text, len);
    out[len] = '\0';
    if (atomic_load(&e->seq) != n + 1)
        return -1; /* overwritten while copied */
    return (long)len;
}

int pb__quarantine_held(void)
{
    pthread_mutex_lock(&lock);
    int n = fifo_count;
    pthread_mutex_unlock(&lock);
    return n;
}

int pb__quarantine_fallbacks(void)
{
    pthread_mutex_lock(&lock);
    int n = fallbacks;
    pthread_mutex_unlock(&lock);
    return n;
}

void pb__quarantine_force_mprotect(int on)
{
    pthread_mutex_lock(&lock);
    forced_mprotect = on != 0;
    pthread_mutex_unlock(&lock);
}

int pb__quarantine_set_log_fd(int fd)
{
    return atomic_exchange(&log_fd, fd < 0 ? -1 : fd);
}
