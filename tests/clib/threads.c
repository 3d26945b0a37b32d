/*
 * threads.c - a C thread that releases handle tokens handed to it, the way a
 * library's worker thread signals completion.  Tokens arrive through a
 * mutex-protected queue; releaser_join() stops the thread and reports how
 * many releases succeeded and failed.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>

#include "ptrbridge.h"

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t ready = PTHREAD_COND_INITIALIZER;
static uintptr_t *queue;
static size_t queued, capacity;
static int stopping;
static pthread_t thread;
static long released_ok, released_failed;

static void *run(void *unused)
{
    (void)unused;
    pthread_mutex_lock(&lock);
    for (;;) {
        while (queued == 0 && !stopping)
            pthread_cond_wait(&ready, &lock);
        if (queued == 0 && stopping)
            break;
        uintptr_t token = queue[--queued];
        pthread_mutex_unlock(&lock);
        int rc = pb_handle_release(token); /* no GIL here */
        pthread_mutex_lock(&lock);
        if (rc == PB_OK)
            released_ok++;
        else
            released_failed++;
    }
    pthread_mutex_unlock(&lock);
    return NULL;
}

int releaser_start(void)
{
    queued = 0;
    stopping = 0;
    released_ok = released_failed = 0;
    return pthread_create(&thread, NULL, run, NULL);
}

/* Queues a token; returns 0 or -1 when out of memory. */
int releaser_submit(uintptr_t token)
{
    pthread_mutex_lock(&lock);
    if (queued == capacity) {
        size_t cap = capacity ? capacity * 2 : 1024;
        uintptr_t *q = realloc(queue, cap * sizeof *q);
        if (q == NULL) {
            pthread_mutex_unlock(&lock);
            return -1;
        }
        queue = q;
        capacity = cap;
    }
    queue[queued++] = token;
    pthread_cond_signal(&ready);
    pthread_mutex_unlock(&lock);
    return 0;
}

/* Stops the thread after the queue is empty; returns releases that succeeded
 * and stores the failures in *failed. */
long releaser_join(long *failed)
{
    pthread_mutex_lock(&lock);
    stopping = 1;
    pthread_cond_signal(&ready);
    pthread_mutex_unlock(&lock);
    pthread_join(thread, NULL);
    free(queue);
    queue = NULL;
    capacity = 0;
    *failed = released_failed;
    return released_ok;
}
