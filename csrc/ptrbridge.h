/*
 * ptrbridge.h - public C API of the ptrbridge registry.
 *
 * ptrbridge keeps a registry of the memory that crosses between Python and C:
 *
 *   - a tracked allocator (pb_malloc and friends) whose blocks are counted and
 *     can be enumerated, so leaks and bad frees are reported instead of
 *     corrupting the heap;
 *   - a handle table: nonzero integer tokens that stand for Python objects.
 *     C code may keep a token as long as it likes and give it back with
 *     pb_handle_release() from any thread, without the GIL;
 *   - the index of Python-owned memory regions lent to C (pinned buffers,
 *     buffers lent for the duration of a call).
 *
 * How C code reaches these functions once `import ptrbridge` has run:
 *
 *   1. By name.  The pb_* symbols are made globally visible when ptrbridge is
 *      imported, so a shared library loaded afterwards (ctypes.CDLL,
 *      ffi.dlopen) links to them directly, and ffi.dlopen(None) finds them.
 *   2. Through a table.  ptrbridge.c_api() returns a pointer to a
 *      `const struct pb_api`; pass it to your library and call through it.
 *      This works even when symbols are not global.
 *
 * Conventions for every function below:
 *   - Functions that can fail return an int status: PB_OK (0) or a negative
 *     PB_ERR_* code; pb_strerror() turns a code into text.
 *   - "Thread-safe" means the function may be called from any thread, at the
 *     same time as any other pb_* function, with or without the GIL.
 *   - No pb_* function calls into Python or needs the GIL.
 *
 * The lines between PB_CDEF_BEGIN and PB_CDEF_END are also read by cffi
 * (build_ffi.py), so they are kept to plain declarations.
 */
#ifndef PTRBRIDGE_H
#define PTRBRIDGE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define PB_API __attribute__((visibility("default")))
#else
#define PB_API
#endif

#define PB_API_VERSION 1

/* PB_CDEF_BEGIN */

/* Status codes returned by pb_* functions. */
enum pb_status {
    PB_OK = 0,
    PB_ERR_NOMEM = -1,          /* the system allocator failed */
    PB_ERR_INVALID = -2,        /* a bad argument (NULL where not allowed, overflow) */
    PB_ERR_NOT_OWNED = -3,      /* pointer was not allocated by the ptrbridge allocator */
    PB_ERR_DOUBLE_FREE = -4,    /* pointer was allocated by ptrbridge but already freed */
    PB_ERR_INVALID_HANDLE = -5, /* token is 0, forged, stale, or already released */
    PB_ERR_NOT_FOUND = -6,      /* no such region */
    PB_ERR_PY_OWNED = -7        /* block belongs to a live Python CBuffer (Python frees it) */
};

/* Returns a static, NUL-terminated description of a status code.
 * Never returns NULL.  Thread-safe. */
PB_API const char *pb_strerror(int status);

/* Version of this API (PB_API_VERSION of the library that is loaded). */
PB_API int pb_api_version(void);

/* ---------------------------------------------------------------------
 * Tracked allocator
 *
 * Blocks from pb_malloc/pb_calloc/pb_realloc are ordinary heap memory (any
 * alignment malloc gives) that the registry counts.  They must be freed with
 * pb_free, never with free(), and memory from malloc() must never be passed to
 * pb_free: the registry detects that and refuses, instead of corrupting the
 * heap.  All allocator functions are thread-safe.
 * ------------------------------------------------------------------- */

/* Allocates `size` bytes (a unique pointer even for size 0).  The caller owns
 * the block and frees it with pb_free.  Returns NULL if out of memory. */
PB_API void *pb_malloc(size_t size);

/* Allocates `count * size` zeroed bytes.  Returns NULL if out of memory or if
 * the product overflows. */
PB_API void *pb_calloc(size_t count, size_t size);

/* Resizes a block from this allocator, like realloc.  pb_realloc(NULL, n) is
 * pb_malloc(n); pb_realloc(p, 0) frees p and returns NULL.  If `ptr` is not a
 * live block of this allocator, or belongs to a live Python CBuffer, nothing is freed, a message is written to
 * stderr and NULL is returned.  On failure the old block stays valid. */
PB_API void *pb_realloc(void *ptr, size_t size);

/* Frees a block from this allocator.  pb_free(NULL) does nothing and returns
 * PB_OK.  A pointer this allocator never handed out gives PB_ERR_NOT_OWNED, a
 * block freed twice gives PB_ERR_DOUBLE_FREE, a block that a live Python
 * CBuffer owns (not transferred) gives PB_ERR_PY_OWNED; in each case nothing
 * is freed and a message naming the pointer is written to stderr. */
PB_API int pb_free(void *ptr);

/* Returns the size of the live block that starts at `ptr`, or 0 if `ptr` is
 * not the start of a live block of this allocator. */
PB_API size_t pb_alloc_size(const void *ptr);

/* Counters of the tracked allocator.  `transferred` counts blocks whose
 * ownership Python handed to C (CBuffer.transfer) and that are not freed yet. */
struct pb_alloc_stats {
    uint64_t allocations;
    uint64_t frees;
    uint64_t live_blocks;
    uint64_t live_bytes;
    uint64_t peak_bytes;
    uint64_t transferred;
};

/* Fills *out with a consistent snapshot of the counters.  Thread-safe. */
PB_API void pb_alloc_get_stats(struct pb_alloc_stats *out);

/* Called once per live block by pb_alloc_foreach.  Return 0 to go on, any
 * other value to stop (pb_alloc_foreach then returns that value). */
typedef int (*pb_block_visitor)(void *ptr, size_t size, void *ctx);

/* Visits every live block.  The allocator lock is held during the visit, so
 * the visitor must not call pb_malloc/pb_calloc/pb_realloc/pb_free (that
 * would deadlock); it may read the blocks.  Returns 0 or the visitor's stop
 * value. */
PB_API int pb_alloc_foreach(pb_block_visitor visit, void *ctx);

/* ---------------------------------------------------------------------
 * Handles
 *
 * A handle is a nonzero uintptr_t token that stands for a Python object; the
 * object itself stays in Python.  Tokens encode a slot and a generation, so a
 * stale, forged or twice-released token is rejected and never resolves to
 * another object.  Handles are created from Python (ptrbridge.Handle); C code
 * stores the token and, when it is done with it, gives it back here.
 * ------------------------------------------------------------------- */

/* Releases a handle: the token becomes invalid at once and the Python object
 * behind it is dropped later, on a Python thread (at the next handle
 * operation or ptrbridge.collect()).  Safe from any thread without the GIL;
 * never allocates.  Returns PB_OK or PB_ERR_INVALID_HANDLE (0, stale,
 * forged or already released; the table is not changed). */
PB_API int pb_handle_release(uintptr_t token);

/* Returns 1 if `token` is a live handle, 0 otherwise.  Thread-safe.  The
 * answer can change at once if another thread releases the handle. */
PB_API int pb_handle_is_valid(uintptr_t token);

/* ---------------------------------------------------------------------
 * Regions: Python-owned memory known to the registry
 * ------------------------------------------------------------------- */

/* Kinds of region. */
enum pb_region_kind {
    PB_REGION_PINNED = 1,   /* pinned by a ptrbridge.Pinner: C may keep it */
    PB_REGION_LENT = 2,     /* lent to C for the duration of one call */
    PB_REGION_MANAGED = 3   /* Python-owned memory ptrbridge knows (e.g. ptrbridge.new) */
};

struct pb_region {
    uint64_t id;            /* nonzero identifier, unique for the process lifetime */
    uintptr_t start;        /* first byte */
    size_t size;            /* length in bytes (may be 0) */
    int kind;               /* enum pb_region_kind */
};

/* Records [addr, addr+size) as a region of the given kind and stores its id
 * in *id_out.  Returns PB_OK, PB_ERR_INVALID (bad kind, NULL id_out, or
 * overflow) or PB_ERR_NOMEM.  Thread-safe. */
PB_API int pb_region_add(const void *addr, size_t size, int kind, uint64_t *id_out);

/* Forgets a region.  Returns PB_OK or PB_ERR_NOT_FOUND.  Thread-safe. */
PB_API int pb_region_remove(uint64_t id);

/* Finds a region that contains `addr`; when several do, a pinned one is
 * preferred.  Returns 1 and fills *out if found, 0 otherwise.  Thread-safe. */
PB_API int pb_region_find(const void *addr, struct pb_region *out);

/* Number of live regions of `kind`, or of every kind if kind is 0. */
PB_API size_t pb_region_count(int kind);

/* ---------------------------------------------------------------------
 * Roots: C memory the retained-pointer scanner (check level 2) examines
 *
 * The scanner always examines the live blocks of the tracked allocator.  A
 * library that keeps state in memory of its own (a static table, a block
 * from its own allocator) can register it so that pointers it keeps to
 * Python memory are found too.
 * ------------------------------------------------------------------- */

/* Registers [addr, addr+size) as a root and stores its id in *id_out.  The
 * memory must stay readable until pb_root_remove(id).  Returns PB_OK,
 * PB_ERR_INVALID (NULL addr or id_out, overflow) or PB_ERR_NOMEM.
 * Thread-safe. */
PB_API int pb_root_add(const void *addr, size_t size, uint64_t *id_out);

/* Unregisters a root.  Returns PB_OK or PB_ERR_NOT_FOUND.  Thread-safe. */
PB_API int pb_root_remove(uint64_t id);

/* ---------------------------------------------------------------------
 * Allocator adapters: route a library's own allocations through the tracked
 * allocator, so they are counted and scanned (check level 2).  Each has the
 * exact signature the library expects; `opaque` arguments are ignored.
 * All are thread-safe.
 * ------------------------------------------------------------------- */

/* zlib: z_stream.zalloc / z_stream.zfree (alloc_func / free_func). */
PB_API void *pb_zlib_alloc(void *opaque, unsigned int items, unsigned int size);
PB_API void pb_zlib_free(void *opaque, void *address);

/* zstd: ZSTD_customMem.customAlloc / customFree. */
PB_API void *pb_zstd_alloc(void *opaque, size_t size);
PB_API void pb_zstd_free(void *opaque, void *address);

/* sqlite3: the same layout as sqlite3_mem_methods, for
 * sqlite3_config(SQLITE_CONFIG_MALLOC, pb_sqlite3_mem_methods()) before
 * sqlite3_initialize().  Static storage. */
struct pb_sqlite3_mem_methods {
    void *(*xMalloc)(int size);
    void (*xFree)(void *ptr);
    void *(*xRealloc)(void *ptr, int size);
    int (*xSize)(void *ptr);
    int (*xRoundup)(int size);
    int (*xInit)(void *app_data);
    void (*xShutdown)(void *app_data);
    void *pAppData;
};
PB_API const struct pb_sqlite3_mem_methods *pb_sqlite3_mem_methods(void);

/* ---------------------------------------------------------------------
 * The function table (for code that prefers not to use global symbols)
 * ------------------------------------------------------------------- */

struct pb_api {
    int version;                                   /* PB_API_VERSION */
    const char *(*strerror)(int status);
    void *(*malloc)(size_t size);
    void *(*calloc)(size_t count, size_t size);
    void *(*realloc)(void *ptr, size_t size);
    int (*free)(void *ptr);
    size_t (*alloc_size)(const void *ptr);
    void (*alloc_get_stats)(struct pb_alloc_stats *out);
    int (*handle_release)(uintptr_t token);
    int (*handle_is_valid)(uintptr_t token);
    int (*region_add)(const void *addr, size_t size, int kind, uint64_t *id_out);
    int (*region_remove)(uint64_t id);
    int (*region_find)(const void *addr, struct pb_region *out);
    int (*root_add)(const void *addr, size_t size, uint64_t *id_out);
    int (*root_remove)(uint64_t id);
};

/* Returns the process-wide function table.  Never NULL; static storage. */
PB_API const struct pb_api *pb_get_api(void);

/* PB_CDEF_END */

#ifdef __cplusplus
}
#endif

#endif /* PTRBRIDGE_H */
