/*
 * ctoralloc.c - a library whose constructor allocates: the memory it gets
 * from libc's malloc may be memory Python freed before the load, and the
 * interposer cannot see it (the constructor runs inside dlopen, before the
 * library is interposed).  Its global keeps the pointer, as libX11's and
 * libpixman's static tables do.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static char *table; /* the constructor's block, in the data segment */

static size_t wanted(void)
{
    const char *n = getenv("CTORALLOC_SIZE");
    return n != NULL ? (size_t)strtoul(n, NULL, 10) : 3000;
}

__attribute__((constructor)) static void make_table(void)
{
    table = malloc(wanted());
    if (table != NULL)
        memset(table, 'c', wanted());
}

uintptr_t ctoralloc_table(void)
{
    return (uintptr_t)table;
}
