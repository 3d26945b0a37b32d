/*
 * qbuggy.c - small C functions written the naive way, for the quarantine's
 * crash tests: each keeps a pointer it was lent, reads past the end of a
 * buffer, or uses a kept pointer later from a global, a malloc'd context or
 * a thread of its own.  Their correct twins copy the data.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <zlib.h>

static const unsigned char *kept;          /* a global */
struct context {
    int tag;
    const unsigned char *data;
};
static struct context *ctx;                /* a malloc'd context */

/* Overrun: sums n + extra bytes of p (extra bytes past the end). */
int produce(const unsigned char *p, size_t n, size_t extra)
{
    int sum = 0;
    for (size_t i = 0; i < n + extra; i++)
        sum += ((const volatile unsigned char *)p)[i];
    return sum;
}

/* Underrun: reads `before` bytes before p. */
int produce_before(const unsigned char *p, size_t before)
{
    return ((const volatile unsigned char *)p)[-(ptrdiff_t)before];
}

void keep(const unsigned char *p)
{
    kept = p;
}

int keep_in_context(const unsigned char *p)
{
    if (ctx == NULL && (ctx = malloc(sizeof *ctx)) == NULL)
        return -1;
    ctx->tag = 7;
    ctx->data = p;
    return 0;
}

void keep_doubles(const double *p)
{
    kept = (const unsigned char *)p;
}

void keep_iov(const struct iovec *iov, int n)
{
    if (n > 0)
        kept = iov[n - 1].iov_base;
}

void keep_msg(const struct msghdr *m)
{
    if (m->msg_iovlen > 0)
        kept = m->msg_iov[m->msg_iovlen - 1].iov_base;
}

void keep_next_in(z_stream *s)
{
    kept = s->next_in;
}

/* A stream cursor, as zlib moves next_in: consume() advances it; peek() reads
 * through it; pending() only looks at the count. */
void consume(z_stream *s, unsigned n)
{
    s->next_in += n;
    s->avail_in -= n;
}

int peek(const z_stream *s)
{
    return ((const volatile unsigned char *)s->next_in)[0];
}

unsigned pending(const z_stream *s)
{
    return s->avail_in;
}

/* A correct twin: reads during the call only. */
int first_byte(const unsigned char *p)
{
    return p[0];
}

int use_kept(void)
{
    return kept != NULL ? ((const volatile unsigned char *)kept)[0] : -1;
}

/* Writes through the kept pointer (C treating a kept buffer as its own). */
void write_kept(void)
{
    if (kept != NULL)
        ((volatile unsigned char *)(uintptr_t)kept)[0] = 'W';
}

int use_context(void)
{
    return ctx != NULL ? ((const volatile unsigned char *)ctx->data)[0] : -1;
}

static void *reader(void *arg)
{
    (void)arg;
    static int value;
    value = use_kept();
    return &value;
}

/* Reads the kept pointer from a thread of its own. */
int use_kept_in_thread(void)
{
    pthread_t t;
    void *out = NULL;
    if (pthread_create(&t, NULL, reader, NULL) != 0)
        return -2;
    pthread_join(t, &out);
    return *(int *)out;
}

static void *overrunner(void *arg)
{
    static int value;
    const unsigned char *p = arg;
    value = produce(p, 8, 4096);
    return &value;
}

/* Overruns a buffer from a thread of its own, during the call. */
int produce_in_thread(const unsigned char *p)
{
    pthread_t t;
    void *out = NULL;
    if (pthread_create(&t, NULL, overrunner, (void *)p) != 0)
        return -2;
    pthread_join(t, &out);
    return *(int *)out;
}
