/*
 * keeper.c - a careless C library for the retention tests: it keeps the
 * pointer it was given in a global, in a tracked heap block, or in a block
 * reached only through another block, and reads it later.  keep_copy() is
 * the correct variant: it copies the data.
 */
#include <stddef.h>
#include <string.h>

#include "ptrbridge.h"

const char *kept_global;
static const char **heap_holder;  /* a pb_malloc block holding the pointer */
static const char ***outer_block; /* a block holding a block holding it */
static char *copied;

void keep_global(const char *p)
{
    kept_global = p;
}

int keep_heap(const char *p)
{
    heap_holder = pb_malloc(sizeof *heap_holder);
    if (heap_holder == NULL)
        return -1;
    *heap_holder = p;
    return 0;
}

int keep_indirect(const char *p)
{
    outer_block = pb_malloc(sizeof *outer_block);
    if (outer_block == NULL)
        return -1;
    *outer_block = pb_malloc(sizeof **outer_block);
    if (*outer_block == NULL)
        return -1;
    **outer_block = p;
    return 0;
}

int keep_copy(const char *p, size_t n)
{
    copied = pb_malloc(n);
    if (copied == NULL)
        return -1;
    memcpy(copied, p, n);
    return 0;
}

/* Reads the first byte through every kept pointer (the use that goes wrong). */
int keeper_read(void)
{
    int sum = 0;
    if (kept_global)
        sum += (unsigned char)kept_global[0];
    if (heap_holder && *heap_holder)
        sum += (unsigned char)(*heap_holder)[0];
    if (outer_block && *outer_block && **outer_block)
        sum += (unsigned char)(**outer_block)[0];
    if (copied)
        sum += (unsigned char)copied[0];
    return sum;
}

void keeper_clear(void)
{
    kept_global = NULL;
    if (outer_block) {
        pb_free(*outer_block);
        pb_free(outer_block);
    }
    pb_free(heap_holder);
    pb_free(copied);
    heap_holder = NULL;
    outer_block = NULL;
    copied = NULL;
}
