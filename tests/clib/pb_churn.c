/*
 * pb_churn.c - a C thread that keeps the registry's locks busy: allocator,
 * handle table and region index, in a tight loop, so that a fork() from
 * Python very likely happens while this thread holds one of them.
 * Used by tests/test_fork.py.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

#include "ptrbridge.h"

uintptr_t pb__handle_new(void);
int pb__handle_delete(uintptr_t token);

static atomic_int stop;
static atomic_long loops;
static pthread_t thread;

static void *run(void *arg)
{
    (void)arg;
    while (!atomic_load(&stop)) {
        void *p = pb_malloc(64);
        pb_free(p);
        uintptr_t token = pb__handle_new();
        if (token != 0)
            pb__handle_delete(token);
        uint64_t id;
        if (pb_region_add(&id, sizeof id, PB_REGION_LENT, &id) == PB_OK)
            pb_region_remove(id);
        atomic_fetch_add(&loops, 1);
    }
    return NULL;
}

/* Starts the thread; returns 0 or an errno value. */
int churn_start(void)
{
    atomic_store(&stop, 0);
    return pthread_create(&thread, NULL, run, NULL);
}

/* Loops done so far. */
long churn_loops(void)
{
    return atomic_load(&loops);
}

/* Stops and joins the thread. */
void churn_stop(void)
{
    atomic_store(&stop, 1);
    pthread_join(thread, NULL);
}
