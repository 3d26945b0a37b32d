/*
 * api.c - status strings, error reports and the pb_api function table.
 */
#include <stdarg.h>
#include <stdio.h>
#include <unistd.h>

#include "pb_internal.h"

PB_API const char *pb_strerror(int status)
{
    switch (status) {
    case PB_OK:
        return "ok";
    case PB_ERR_NOMEM:
        return "out of memory";
    case PB_ERR_INVALID:
        return "invalid argument";
    case PB_ERR_NOT_OWNED:
        return "pointer was not allocated by the ptrbridge allocator";
    case PB_ERR_DOUBLE_FREE:
        return "double free: block was already freed";
    case PB_ERR_INVALID_HANDLE:
        return "misuse of an invalid handle (zero, stale, forged or already released)";
    case PB_ERR_NOT_FOUND:
        return "no such region";
    case PB_ERR_PY_OWNED:
        return "block belongs to a live Python CBuffer, which still uses and frees it";
    default:
        return "unknown ptrbridge status";
    }
}

PB_API int pb_api_version(void)
{
    return PB_API_VERSION;
}

void pb__report(const char *fmt, ...)
{
    char buf[512];
    int n = snprintf(buf, sizeof buf, "ptrbridge: ");
    va_list ap;
    va_start(ap, fmt);
    int m = vsnprintf(buf + n, sizeof buf - (size_t)n - 1, fmt, ap);
    va_end(ap);
    size_t len = (size_t)n + (m < 0 ? 0 : (size_t)m);
    if (len > sizeof buf - 2)
        len = sizeof buf - 2;
    buf[len++] = '\n';
    /* One write(2) so reports from several threads do not interleave. */
    ssize_t rc = write(STDERR_FILENO, buf, len);
    (void)rc;
}

static const struct pb_api api_table = {
    .version = PB_API_VERSION,
    .strerror = pb_strerror,
    .malloc = pb_malloc,
    .calloc = pb_calloc,
    .realloc = pb_realloc,
    .free = pb_free,
    .alloc_size = pb_alloc_size,
    .alloc_get_stats = pb_alloc_get_stats,
    .handle_release = pb_handle_release,
    .handle_is_valid = pb_handle_is_valid,
    .region_add = pb_region_add,
    .region_remove = pb_region_remove,
    .region_find = pb_region_find,
    .root_add = pb_root_add,
    .root_remove = pb_root_remove,
};

PB_API const struct pb_api *pb_get_api(void)
{
    return &api_table;
}
