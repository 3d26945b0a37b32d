/* libkeep.so: small C library that keeps pointers it is given (the way real C libraries do). */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* 1. a static variable that keeps the caller's pointer */
static const char *g_kept;
static size_t g_kept_len;
void keep_set(const char *p, size_t n) { g_kept = p; g_kept_len = n; }
size_t keep_copy(char *out, size_t cap) {      /* reads the kept pointer later */
    size_t n = g_kept_len < cap ? g_kept_len : cap;
    if (g_kept) memcpy(out, g_kept, n);
    return n;
}
void keep_clear(void) { g_kept = NULL; g_kept_len = 0; }

/* 2. a malloc'd context that keeps the caller's pointer */
struct ctx { int id; const char *key; size_t keylen; };
struct ctx *ctx_new(int id) { struct ctx *c = calloc(1, sizeof *c); c->id = id; return c; }
void ctx_set_key(struct ctx *c, const char *key, size_t n) { c->key = key; c->keylen = n; }
unsigned long ctx_hash(const struct ctx *c) {   /* FNV-1a of the key, read later */
    unsigned long h = 1469598103934665603UL;
    for (size_t i = 0; i < c->keylen; i++) { h ^= (unsigned char)c->key[i]; h *= 1099511628211UL; }
    return h;
}
void ctx_free(struct ctx *c) { free(c); }

/* 3. a struct with a char* field */
struct opts { const char *name; int level; };
int opts_describe(const struct opts *o, char *out, size_t cap) {
    return snprintf(out, cap, "name=%s level=%d", o->name, o->level);
}

/* 4. a stored callback called later */
typedef int (*cb_t)(int);
static cb_t g_cb;
void cb_set(cb_t cb) { g_cb = cb; }
int cb_fire(int x) { return g_cb ? g_cb(x) : -1; }

/* 5. a background worker that reads the buffer after the call returned: it starts on the job
 * when the caller flushes (bg_join), as a queue drained by a worker thread does */
static pthread_t g_thr;
static const unsigned char *g_bg_p;
static size_t g_bg_n;
static unsigned long g_bg_sum;
static pthread_mutex_t g_bg_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_bg_cond = PTHREAD_COND_INITIALIZER;
static int g_bg_go;
static void *bg_main(void *arg) {
    (void)arg;
    pthread_mutex_lock(&g_bg_lock);
    while (!g_bg_go)
        pthread_cond_wait(&g_bg_cond, &g_bg_lock);
    pthread_mutex_unlock(&g_bg_lock);
    unsigned long s = 0;
    for (size_t i = 0; i < g_bg_n; i++) s = s * 31 + g_bg_p[i];
    g_bg_sum = s;
    return NULL;
}
int bg_start(const char *p, size_t n) {
    g_bg_p = (const unsigned char *)p; g_bg_n = n; g_bg_go = 0;
    return pthread_create(&g_thr, NULL, bg_main, NULL);
}
unsigned long bg_join(void) {
    pthread_mutex_lock(&g_bg_lock);
    g_bg_go = 1;
    pthread_cond_signal(&g_bg_cond);
    pthread_mutex_unlock(&g_bg_lock);
    pthread_join(g_thr, NULL);
    return g_bg_sum;
}

/* 6. a callback registered with user data and called later, as an event loop does */
typedef void (*ev_cb)(void *ud, int x);
static ev_cb g_ev_cb;
static void *g_ev_ud;
void ev_register(ev_cb cb, void *ud) { g_ev_cb = cb; g_ev_ud = ud; }
int ev_fire(int x) {
    if (!g_ev_cb) return -1;
    g_ev_cb(g_ev_ud, x);
    return 0;
}
