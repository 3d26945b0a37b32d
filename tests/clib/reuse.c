/*
 * reuse.c - a C library that keeps stale pointers into memory it freed
 * itself, the way sqlite's connection does (its allocator puts an 8-byte
 * size header before the pointer it hands out, and the connection keeps
 * such pointers after freeing them), for the tests that memory Python
 * freed, then libc gave to C, is not mistaken for Python memory.  Plain
 * libc, no knowledge of ptrbridge.
 *
 *   conn_new / conn_free       a 24-byte connection from calloc
 *   conn_cache(c, n, want)     mallocs n bytes, keeps the block + 8 at offset 8,
 *                              returns the block; with want != 0, mallocs until libc
 *                              returns want (at most 64 tries, the others freed again)
 *   conn_uncache(c)            frees that block, keeping the (now stale) pointer
 *   conn_keep(c, p)            keeps p at offset 16 (the caller's memory)
 *   scratch(n)                 mallocs and frees n bytes, returns where they were
 */
#include <stdint.h>
#include <stdlib.h>

struct conn {
    uint64_t magic;
    char *cached; /* offset 8 */
    const char *kept; /* offset 16 */
};

struct conn *conn_new(void)
{
    struct conn *c = calloc(1, sizeof *c);
    if (c != NULL)
        c->magic = 0x636f6e6e;
    return c;
}

void *conn_cache(struct conn *c, size_t n, uintptr_t want)
{
    char *tried[64];
    size_t k = 0;
    char *p = malloc(n);
    while (want != 0 && p != NULL && (uintptr_t)p != want && k < 64) {
        tried[k++] = p;
        p = malloc(n);
    }
    while (k > 0)
        free(tried[--k]);
    if (p != NULL)
        c->cached = p + 8;
    return p;
}

void conn_uncache(struct conn *c)
{
    if (c->cached != NULL)
        free(c->cached - 8); /* c->cached stays: stale, but C's own */
}

void conn_keep(struct conn *c, const char *p)
{
    c->kept = p;
}

void conn_free(struct conn *c)
{
    free(c);
}

uintptr_t scratch(size_t n)
{
    void *p = malloc(n);
    uintptr_t where = (uintptr_t)p;
    free(p);
    return where;
}
