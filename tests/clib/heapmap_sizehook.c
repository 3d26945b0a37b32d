/* A PyMem hook that changes the requested size (a 16-byte header), like a debug allocator. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#define HDR 16
#define MAGIC ((uintptr_t)0x5A17E5A17E5A17E5ULL)
struct hook { PyMemAllocatorEx prev; };
static struct hook hooks[3];
static const PyMemAllocatorDomain ids[3] = {PYMEM_DOMAIN_RAW, PYMEM_DOMAIN_MEM, PYMEM_DOMAIN_OBJ};
static void *mark(char *p) { if (!p) return NULL; p += HDR; ((uintptr_t *)p)[-1] = MAGIC ^ (uintptr_t)p; return p; }
static int ours(void *p) { return p && ((uintptr_t *)p)[-1] == (MAGIC ^ (uintptr_t)p); }
static void *h_malloc(void *ctx, size_t n) { struct hook *h = ctx; return mark(h->prev.malloc(h->prev.ctx, n + HDR)); }
static void *h_calloc(void *ctx, size_t n, size_t e) {
    struct hook *h = ctx;
    if (e && n > (SIZE_MAX - HDR) / e) return NULL;
    return mark(h->prev.calloc(h->prev.ctx, 1, n * e + HDR));
}
static void *h_realloc(void *ctx, void *p, size_t n) {
    struct hook *h = ctx;
    if (p == NULL) return h_malloc(ctx, n);
    if (!ours(p)) return h->prev.realloc(h->prev.ctx, p, n);
    ((uintptr_t *)p)[-1] = 0;
    return mark(h->prev.realloc(h->prev.ctx, (char *)p - HDR, n + HDR));
}
static void h_free(void *ctx, void *p) {
    struct hook *h = ctx;
    if (!ours(p)) { h->prev.free(h->prev.ctx, p); return; }
    ((uintptr_t *)p)[-1] = 0;
    h->prev.free(h->prev.ctx, (char *)p - HDR);
}
void sizehook_install(int d) {
    PyMem_GetAllocator(ids[d], &hooks[d].prev);
    PyMemAllocatorEx a = {&hooks[d], h_malloc, h_calloc, h_realloc, h_free};
    PyMem_SetAllocator(ids[d], &a);
}
