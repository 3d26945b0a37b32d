/*
 * keeper.c - a careless C library for the retention tests (rule R2).
 *
 * Each keep_* function stores the pointer it was given somewhere C memory
 * lives, and keeper_read() later reads through every pointer kept:
 *
 *   keep_global      in an exported global (`kept_global`, in .bss);
 *   keep_heap        in a block from pb_malloc (the tracked allocator);
 *   keep_indirect    in a pb_malloc block reached only through another one;
 *   keep_registered  in a libc malloc block the library registers itself
 *                    with pb_root_add (at offset 8 of a 16-byte record);
 *   keep_copy        the correct variant: it copies the data.
 *
 * keeper_clear() forgets everything and frees what the library allocated.
 * The keeper_*_block() functions tell the tests where each pointer is held.
 * pb_* symbols resolve from ptrbridge, imported before this library loads.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ptrbridge.h"

struct record {
    uint64_t tag;
    const char *data;
};

const char *kept_global;
static const char **heap_holder;   /* a pb_malloc block holding the pointer */
static const char ***outer_block;  /* a pb_malloc block holding a block holding it */
static struct record *registered;  /* libc malloc, registered as a root */
static uint64_t registered_root;
static char *copied;

void keep_global(const char *p)
{
    kept_global = p;
}

int keep_heap(const char *p)
{
    if (heap_holder == NULL && (heap_holder = pb_malloc(sizeof *heap_holder)) == NULL)
        return -1;
    *heap_holder = p;
    return 0;
}

int keep_indirect(const char *p)
{
    if (outer_block == NULL) {
        if ((outer_block = pb_malloc(sizeof *outer_block)) == NULL)
            return -1;
        if ((*outer_block = pb_malloc(sizeof **outer_block)) == NULL) {
            pb_free(outer_block);
            outer_block = NULL;
            return -1;
        }
    }
    **outer_block = p;
    return 0;
}

/* Returns PB_OK or the status of pb_root_add. */
int keep_registered(const char *p)
{
    if (registered == NULL) {
        if ((registered = malloc(sizeof *registered)) == NULL)
            return PB_ERR_NOMEM;
        registered->tag = 0x6b656570u;
        int rc = pb_root_add(registered, sizeof *registered, &registered_root);
        if (rc != PB_OK) {
            free(registered);
            registered = NULL;
            return rc;
        }
    }
    registered->data = p;
    return PB_OK;
}

int keep_copy(const char *p, size_t n)
{
    char *block = pb_malloc(n ? n : 1);
    if (block == NULL)
        return -1;
    memcpy(block, p, n);
    pb_free(copied);
    copied = block;
    return 0;
}

/* Sum of the first bytes read through every kept pointer (the later use). */
int keeper_read(void)
{
    int sum = 0;
    if (kept_global)
        sum += (unsigned char)kept_global[0];
    if (heap_holder && *heap_holder)
        sum += (unsigned char)(*heap_holder)[0];
    if (outer_block && **outer_block)
        sum += (unsigned char)(**outer_block)[0];
    if (registered && registered->data)
        sum += (unsigned char)registered->data[0];
    if (copied)
        sum += (unsigned char)copied[0];
    return sum;
}

/* keeper_read through a static function (no dynamic symbol: reports name the
 * library and offset); noinline so that it is the faulting frame. */
__attribute__((noinline)) static int read_kept_global(void)
{
    return kept_global ? (unsigned char)kept_global[0] : 0;
}

int keeper_read_static(void)
{
    return read_kept_global() + 1;
}

uintptr_t keeper_heap_block(void)
{
    return (uintptr_t)heap_holder;
}

uintptr_t keeper_inner_block(void)
{
    return outer_block ? (uintptr_t)*outer_block : 0;
}

uintptr_t keeper_registered_block(void)
{
    return (uintptr_t)registered;
}

uint64_t keeper_registered_root(void)
{
    return registered ? registered_root : 0;
}

void keeper_clear(void)
{
    kept_global = NULL;
    if (outer_block) {
        pb_free(*outer_block);
        pb_free(outer_block);
        outer_block = NULL;
    }
    pb_free(heap_holder);
    heap_holder = NULL;
    if (registered) {
        pb_root_remove(registered_root);
        free(registered);
        registered = NULL;
    }
    pb_free(copied);
    copied = NULL;
}
