/*
 * uses_pb.c - a C library that uses ptrbridge's C API: by name (the symbols
 * resolve when the library is loaded after `import ptrbridge`) and through
 * the struct pb_api table.
 */
#include <stdint.h>
#include <string.h>

#include "ptrbridge.h"

/* Allocates a block by name, fills it, checks its size and frees it.
 * Returns 0 on success. */
int by_name_roundtrip(size_t size)
{
    unsigned char *p = pb_malloc(size);
    if (p == NULL)
        return -1;
    memset(p, 0xAB, size);
    if (pb_alloc_size(p) != size)
        return -2;
    return pb_free(p);
}

/* A block that stays allocated (Python frees it). */
void *by_name_alloc(size_t size)
{
    return pb_malloc(size);
}

int by_name_free(void *p)
{
    return pb_free(p);
}

int by_name_release(uintptr_t token)
{
    return pb_handle_release(token);
}

/* The same through the function table. */
int by_table_roundtrip(const struct pb_api *api, size_t size)
{
    if (api == NULL || api->version != PB_API_VERSION)
        return -100;
    unsigned char *p = api->malloc(size);
    if (p == NULL)
        return -1;
    memset(p, 0xCD, size);
    if (api->alloc_size(p) != size)
        return -2;
    return api->free(p);
}

int by_table_release(const struct pb_api *api, uintptr_t token)
{
    return api->handle_release(token);
}
