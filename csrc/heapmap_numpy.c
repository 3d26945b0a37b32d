/*
 * heapmap_numpy.c - the heap map's hook of numpy's default data-memory
 * handler (NEP 49), by pointing numpy's default-handler capsule (which numpy
 * reads at every allocation and every free) at a handler that delegates to
 * numpy's own and records the blocks on the locked path (numpy allocates
 * without the GIL).  numpy's handler stays the one that frees every block
 * it allocated, hooked or not.
 */
#include "pb_heapmap_internal.h"
#include "pb_quarantine.h"

/* numpy's PyDataMemAllocator / PyDataMem_Handler (version 1), declared here
 * so that building ptrbridge does not need numpy's headers. */
struct np_allocator {
    void *ctx;
    void *(*malloc)(void *ctx, size_t size);
    void *(*calloc)(void *ctx, size_t nelem, size_t elsize);
    void *(*realloc)(void *ctx, void *ptr, size_t new_size);
    void (*free)(void *ctx, void *ptr, size_t size);
};

struct np_handler {
    char name[127];
    uint8_t version;
    struct np_allocator allocator;
};

#define NP_FEATURE_1_22 0x0000000fu /* NEP 49 handlers appeared in numpy 1.22 */
#define NP_SLOT_FEATURE_VERSION 211 /* PyArray_GetNDArrayCFeatureVersion */
#define NP_SLOT_DEFAULT_HANDLER 306 /* &PyDataMem_DefaultHandler */

static struct np_handler np_ours;
static const struct np_handler *np_orig; /* numpy's default handler (static storage in numpy) */
static PyObject *np_capsule;             /* numpy's default-handler capsule, while hooked */

void hm_numpy_release(void *ptr, size_t size)
{
    np_orig->allocator.free(np_orig->allocator.ctx, ptr, size);
}

static void *np_malloc(void *ctx, size_t size)
{
    (void)ctx;
    void *p = np_orig->allocator.malloc(np_orig->allocator.ctx, size);
    if (p != NULL && recording())
        hm_lock_record((uintptr_t)p, size, PB_HEAPMAP_NUMPY);
    return p;
}

static void *np_calloc(void *ctx, size_t n, size_t elsize)
{
    (void)ctx;
    void *p = np_orig->allocator.calloc(np_orig->allocator.ctx, n, elsize);
    if (p != NULL && recording())
        hm_lock_record((uintptr_t)p, n * elsize, PB_HEAPMAP_NUMPY);
    return p;
}

static void *np_realloc(void *ctx, void *ptr, size_t size)
{
    (void)ctx;
    if (!recording())
        return np_orig->allocator.realloc(np_orig->allocator.ctx, ptr, size);
    struct forgotten old = hm_realloc_before(PB_HEAPMAP_NUMPY, ptr);
    if (hm_realloc_copies(&old)) { /* malloc + copy, so that the old block is held (heapmap_hooks.c) */
        void *q = np_orig->allocator.malloc(np_orig->allocator.ctx, size);
        if (q == NULL) {
            hm_realloc_after(PB_HEAPMAP_NUMPY, ptr, &old, NULL, size);
            return NULL;
        }
        size_t old_size = (size_t)(old.val & SIZE_MASK);
        memcpy(q, ptr, old_size < size ? old_size : size);
        hm_lock_record((uintptr_t)q, size, PB_HEAPMAP_NUMPY);
        pb__quarantine_owner_freed(ptr); /* moved: the old block is gone */
        struct evicted ev;
        int hold = hm_hold_forgotten(PB_HEAPMAP_NUMPY, ptr, &old, NULL, &ev);
        hm_release_evicted(PB_HEAPMAP_NUMPY, &ev);
        if (!hold)
            hm_numpy_release(ptr, old_size);
        return q;
    }
    void *q = np_orig->allocator.realloc(np_orig->allocator.ctx, ptr, size);
    hm_realloc_after(PB_HEAPMAP_NUMPY, ptr, &old, q, size);
    if (q != NULL && q != ptr)
        pb__quarantine_owner_freed(ptr);
    return q;
}

static void np_free(void *ctx, void *ptr, size_t size)
{
    (void)ctx;
    if (ptr == NULL || !recording()) {
        hm_numpy_release(ptr, size);
        return;
    }
    pb__quarantine_owner_freed(ptr); /* an array a quarantine shadow copied dies */
    struct evicted ev;
    int hold = hm_forget_for_free_locked(PB_HEAPMAP_NUMPY, ptr, size, NULL, &ev);
    hm_release_evicted(PB_HEAPMAP_NUMPY, &ev);
    if (!hold)
        hm_numpy_release(ptr, size);
}

/* GIL held.  1 hooked (now or before), 0 numpy's core not imported, -1 unsupported. */
int hm_numpy_attach_gil(void)
{
    if (np_capsule != NULL && PyCapsule_GetPointer(np_capsule, "mem_handler") == (void *)&np_ours)
        return 1;
    PyErr_Clear();
    PyObject *modules = PyImport_GetModuleDict(); /* borrowed */
    PyObject *core = PyDict_GetItemString(modules, "numpy._core._multiarray_umath");
    if (core == NULL)
        core = PyDict_GetItemString(modules, "numpy.core._multiarray_umath");
    if (core == NULL)
        return 0;
    /* The module is in sys.modules while it is still being initialised (and
     * imports other modules): until its C-API table and default handler
     * exist, the answer is "not yet" (0). */
    int rc = 0;
    PyObject *api_capsule = PyObject_GetAttrString(core, "_ARRAY_API");
    if (api_capsule == NULL || !PyCapsule_CheckExact(api_capsule))
        goto out;
    void **api = PyCapsule_GetPointer(api_capsule, NULL);
    if (api == NULL)
        goto out;
    unsigned int (*feature_version)(void);
    memcpy(&feature_version, &api[NP_SLOT_FEATURE_VERSION], sizeof feature_version);
    rc = -1;
    if (feature_version() < NP_FEATURE_1_22)
        goto out;
    PyObject *capsule = *(PyObject **)api[NP_SLOT_DEFAULT_HANDLER];
    rc = 0;
    if (capsule == NULL || !PyCapsule_IsValid(capsule, "mem_handler"))
        goto out;
    rc = -1;
    const struct np_handler *orig = PyCapsule_GetPointer(capsule, "mem_handler");
    if (orig == &np_ours) {
        rc = 1;
        goto out;
    }
    /* np_orig is set once: arrays allocated through ours free through it
     * for as long as they live, hooked or not. */
    if (orig == NULL || orig->version != 1 || (np_orig != NULL && np_orig != orig))
        goto out;
    np_orig = orig;
    memcpy(np_ours.name, orig->name, sizeof np_ours.name); /* transparent: numpy's name */
    np_ours.version = 1;
    np_ours.allocator = (struct np_allocator){NULL, np_malloc, np_calloc, np_realloc, np_free};
    if (PyCapsule_SetPointer(capsule, &np_ours) != 0)
        goto out;
    Py_INCREF(capsule);
    Py_XSETREF(np_capsule, capsule);
    rc = 1;
out:
    Py_XDECREF(api_capsule);
    PyErr_Clear();
    return rc;
}

/* GIL held.  Points numpy's default capsule back at numpy's handler. */
void hm_numpy_detach_gil(void)
{
    if (np_capsule == NULL)
        return;
    if (PyCapsule_GetPointer(np_capsule, "mem_handler") == (void *)&np_ours)
        PyCapsule_SetPointer(np_capsule, (void *)np_orig);
    /* else someone wrapped ours: it stays, passing every call through */
    PyErr_Clear();
    Py_CLEAR(np_capsule);
}


int hm_numpy_hooked(void)
{
    return np_capsule != NULL;
}
