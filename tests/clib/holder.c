/*
 * holder.c - a small C library written the naive way, with no knowledge of
 * ptrbridge (plain libc malloc, statics, a thread of its own), for the
 * interposition tests.  Each buggy function keeps the pointer it was given;
 * each *_copy twin copies the data, which is correct.
 *
 *   set_prefix / set_prefix_copy    a static variable (g_prefix)
 *   ctx_new / ctx_keep / ctx_keep_copy / ctx_free
 *                                   a 64-byte context from calloc, at offset 8
 *   worker_start / worker_start_copy / worker_finish
 *                                   a pthread of its own reads the data later
 *   holder_loop, holder_*_churn     malloc/free pairs (benchmarks, fork tests)
 *   holder_alloc/calloc/free        plain blocks for the tests
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static const char *g_prefix;
static char *g_prefix_copy;

void set_prefix(const char *p)
{
    g_prefix = p;
}

void set_prefix_copy(const char *p)
{
    free(g_prefix_copy);
    g_prefix_copy = strdup(p);
    g_prefix = g_prefix_copy;
}

size_t prefix_len(void)
{
    return g_prefix ? strlen(g_prefix) : 0;
}

void clear_prefix(void)
{
    g_prefix = NULL;
    free(g_prefix_copy);
    g_prefix_copy = NULL;
}

struct ctx {
    uint64_t magic;
    const char *data; /* offset 8 */
    char *owned;
    char pad[40];
};

struct ctx *ctx_new(void)
{
    struct ctx *c = calloc(1, sizeof *c);
    if (c)
        c->magic = 0xC0FFEE;
    return c;
}

void ctx_keep(struct ctx *c, const char *p)
{
    c->data = p;
}

void ctx_keep_copy(struct ctx *c, const char *p, size_t n)
{
    free(c->owned);
    c->owned = malloc(n + 1);
    if (c->owned) {
        memcpy(c->owned, p, n);
        c->owned[n] = 0;
    }
    c->data = c->owned;
}

size_t ctx_len(const struct ctx *c)
{
    return c->data ? strlen(c->data) : 0;
}

void ctx_free(struct ctx *c)
{
    if (c)
        free(c->owned);
    free(c);
}

/* A worker that sums the bytes it was given when told to go. */
struct job {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int go;
    const unsigned char *data;
    size_t n;
    unsigned char *owned;
    uint64_t sum;
    pthread_t thread;
};

static struct job *g_job;

static void *worker(void *arg)
{
    struct job *j = arg;
    pthread_mutex_lock(&j->lock);
    while (!j->go)
        pthread_cond_wait(&j->cond, &j->lock);
    pthread_mutex_unlock(&j->lock);
    uint64_t s = 0;
    for (size_t i = 0; i < j->n; i++)
        s += j->data[i];
    j->sum = s;
    return NULL;
}

static int start(const unsigned char *p, size_t n, int copy)
{
    struct job *j = calloc(1, sizeof *j);
    if (j == NULL)
        return -1;
    pthread_mutex_init(&j->lock, NULL);
    pthread_cond_init(&j->cond, NULL);
    j->n = n;
    if (copy) {
        j->owned = malloc(n ? n : 1);
        if (j->owned == NULL) {
            free(j);
            return -1;
        }
        memcpy(j->owned, p, n);
        j->data = j->owned;
    } else {
        j->data = p;
    }
    if (pthread_create(&j->thread, NULL, worker, j) != 0) {
        free(j->owned);
        free(j);
        return -1;
    }
    g_job = j;
    return 0;
}

int worker_start(const unsigned char *p, size_t n)
{
    return start(p, n, 0);
}

int worker_start_copy(const unsigned char *p, size_t n)
{
    return start(p, n, 1);
}

/* Lets the worker run, waits for it and returns its sum; the job (and the
 * pointer it holds) stays until worker_free(). */
uint64_t worker_finish(void)
{
    struct job *j = g_job;
    if (j == NULL)
        return 0;
    pthread_mutex_lock(&j->lock);
    j->go = 1;
    pthread_cond_signal(&j->cond);
    pthread_mutex_unlock(&j->lock);
    pthread_join(j->thread, NULL);
    return j->sum;
}

void worker_free(void)
{
    struct job *j = g_job;
    if (j == NULL)
        return;
    pthread_mutex_destroy(&j->lock);
    pthread_cond_destroy(&j->cond);
    free(j->owned);
    free(j);
    g_job = NULL;
}

/* n malloc/free pairs of `size` bytes; returns a checksum so nothing is optimised away. */
uint64_t holder_loop(size_t n, size_t size)
{
    uint64_t s = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char *p = malloc(size);
        if (p == NULL)
            return 0;
        p[0] = (unsigned char)i;
        s += p[0];
        free(p);
    }
    return s;
}

/* A block the caller frees with plain free() from code that is not interposed. */
void *holder_alloc(size_t n)
{
    return malloc(n);
}

void *holder_calloc(size_t n)
{
    return calloc(1, n);
}

void holder_free(void *p)
{
    free(p);
}

/* A background thread that loops malloc/free until holder_stop_churn(). */
static volatile int churn_stop;
static pthread_t churn_thread;

static void *churn(void *arg)
{
    (void)arg;
    while (!__atomic_load_n(&churn_stop, __ATOMIC_RELAXED)) {
        void *p = malloc(64);
        void *q = strdup("churn");
        free(p);
        free(q);
    }
    return NULL;
}

int holder_start_churn(void)
{
    __atomic_store_n(&churn_stop, 0, __ATOMIC_RELAXED);
    return pthread_create(&churn_thread, NULL, churn, NULL);
}

void holder_stop_churn(void)
{
    __atomic_store_n(&churn_stop, 1, __ATOMIC_RELAXED);
    pthread_join(churn_thread, NULL);
}
