/*
 * adapters.c - allocator adapters for libraries that take their own
 * allocation functions (zlib, zstd, sqlite3), all backed by the tracked
 * allocator.  A failed pb_free here has no way to report back to the library
 * and is written to stderr by pb_free itself.
 */
#include <limits.h>

#include "pb_internal.h"

PB_API void *pb_zlib_alloc(void *opaque, unsigned int items, unsigned int size)
{
    (void)opaque;
    return pb_calloc(items, size);
}

PB_API void pb_zlib_free(void *opaque, void *address)
{
    (void)opaque;
    pb_free(address);
}

PB_API void *pb_zstd_alloc(void *opaque, size_t size)
{
    (void)opaque;
    return pb_malloc(size);
}

PB_API void pb_zstd_free(void *opaque, void *address)
{
    (void)opaque;
    pb_free(address);
}

static void *sq_malloc(int size)
{
    return size <= 0 ? NULL : pb_malloc((size_t)size);
}

static void sq_free(void *ptr)
{
    pb_free(ptr);
}

static void *sq_realloc(void *ptr, int size)
{
    return size <= 0 ? NULL : pb_realloc(ptr, (size_t)size);
}

static int sq_size(void *ptr)
{
    size_t size = pb_alloc_size(ptr);
    return size > INT_MAX ? INT_MAX : (int)size;
}

static int sq_roundup(int size)
{
    return size > INT_MAX - 7 ? size : (size + 7) & ~7;
}

static int sq_init(void *app_data)
{
    (void)app_data;
    return 0;
}

static void sq_shutdown(void *app_data)
{
    (void)app_data;
}

static const struct pb_sqlite3_mem_methods sqlite3_methods = {
    sq_malloc, sq_free, sq_realloc, sq_size, sq_roundup, sq_init, sq_shutdown, NULL,
};

PB_API const struct pb_sqlite3_mem_methods *pb_sqlite3_mem_methods(void)
{
    return &sqlite3_methods;
}
