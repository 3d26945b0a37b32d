/*
 * qforeign.c - a SIGSEGV handler that is not ptrbridge's, for the quarantine
 * tests: it recovers from its own faults, as a JIT, a wasm runtime or a GC
 * write barrier does, and chains every other fault to the handler installed
 * before it (calling it directly, the common pattern).
 *
 *   foreign_install(flags)   installs the handler with extra sa_flags
 *                            (SA_RESETHAND, SA_NODEFER) and SIGUSR1 in sa_mask;
 *   foreign_fault_fix(n)     n faults on a PROT_NONE page the handler opens;
 *   foreign_fault_jump(n)    n faults on a page the handler never opens: it
 *                            siglongjmps back instead;
 *   foreign_mask_ok()        1 if, inside the handler, SIGUSR1 was blocked and
 *                            SIGSEGV blocked unless SA_NODEFER;
 *   foreign_null_write()     a fault nobody handles (the process must die of
 *                            SIGSEGV).
 */
#define _GNU_SOURCE
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static struct sigaction previous;
static char *fix_page, *jump_page;
static size_t page;
static volatile sig_atomic_t fixed, jumped, mask_ok = 1, flags_used;
static sigjmp_buf jump_back;
static volatile sig_atomic_t jump_armed;

static void handler(int sig, siginfo_t *info, void *uctx)
{
    sigset_t now;
    pthread_sigmask(SIG_BLOCK, NULL, &now);
    int segv_blocked = sigismember(&now, SIGSEGV);
    if (!sigismember(&now, SIGUSR1) || segv_blocked != !(flags_used & SA_NODEFER))
        mask_ok = 0;
    char *a = info->si_addr;
    if (fix_page != NULL && a >= fix_page && a < fix_page + page) {
        mprotect(fix_page, page, PROT_READ | PROT_WRITE);
        fixed++;
        return;
    }
    if (jump_armed && jump_page != NULL && a >= jump_page && a < jump_page + page) {
        jumped++;
        jump_armed = 0;
        siglongjmp(jump_back, 1);
    }
    /* Not ours: the handler before us, as the kernel would run it. */
    if (previous.sa_flags & SA_SIGINFO) {
        previous.sa_sigaction(sig, info, uctx);
    } else if (previous.sa_handler == SIG_DFL || previous.sa_handler == SIG_IGN) {
        signal(sig, SIG_DFL);
    } else {
        previous.sa_handler(sig);
    }
}

int foreign_install(int flags)
{
    page = (size_t)sysconf(_SC_PAGESIZE);
    if (fix_page == NULL) {
        fix_page = mmap(NULL, page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        jump_page = mmap(NULL, page, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (fix_page == MAP_FAILED || jump_page == MAP_FAILED)
            return -1;
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = handler;
    sa.sa_flags = SA_SIGINFO | flags;
    sigemptyset(&sa.sa_mask);
    sigaddset(&sa.sa_mask, SIGUSR1);
    flags_used = flags;
    return sigaction(SIGSEGV, &sa, &previous);
}

int foreign_fault_fix(int n)
{
    for (int i = 0; i < n; i++) {
        mprotect(fix_page, page, PROT_NONE);
        ((volatile char *)fix_page)[i % 64] = (char)i; /* faults; the handler opens the page */
    }
    return (int)fixed;
}

int foreign_fault_jump(int n)
{
    for (volatile int i = 0; i < n; i++) {
        if (sigsetjmp(jump_back, 1) == 0) {
            jump_armed = 1;
            ((volatile char *)jump_page)[0] = 1; /* faults; the handler jumps back */
        }
    }
    return (int)jumped;
}

int foreign_mask_ok(void)
{
    return (int)mask_ok;
}

void foreign_null_write(void)
{
    *(volatile int *)(uintptr_t)16 = 1;
}
