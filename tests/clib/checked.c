/*
 * checked.c - C functions the checked-call tests call through cffi (ABI and
 * API mode) and ctypes: structs with pointer fields in every shape, thread
 * identity, a racy counter, a concurrency gate, a blocking read, callbacks.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#include "checked.h"

static int slen(const char *s)
{
    return s ? (int)strlen(s) : 0;
}

int person_name_len(const struct person *p)
{
    return p && p->name ? (int)strlen(p->name) : -1;
}

int person_by_value_len(struct person p)
{
    return p.name ? (int)strlen(p.name) : -1;
}

int names_total(const char **names, int n)
{
    int total = 0;
    for (int i = 0; i < n; i++)
        total += slen(names[i]);
    return total;
}

int team_total(const struct person *team, int n)
{
    int total = 0;
    for (int i = 0; i < n; i++)
        total += slen(team[i].name);
    return total;
}

int holder_total(const struct holder *h)
{
    int total = slen(h->who.name) + team_total(h->team, 2);
    if (h->names)
        total += names_total(h->names, h->count);
    return total;
}

int list_total(const struct node *n)
{
    int total = 0;
    for (; n; n = n->next)
        total += slen(n->label);
    return total;
}

int text_len(const char *s)
{
    return slen(s);
}

int add(int a, int b)
{
    return a + b;
}

int fail_with(int code)
{
    return code;
}

void *null_pointer(void)
{
    return NULL;
}

unsigned long thread_id(void)
{
    return (unsigned long)pthread_self();
}

/* A counter with a lost-update race unless calls are serialised. */
static long counter;

void counter_bump(int times)
{
    for (int i = 0; i < times; i++) {
        long v = counter;
        sched_yield();
        counter = v + 1;
    }
}

long counter_value(void)
{
    return counter;
}

void counter_reset(void)
{
    counter = 0;
}

/* A gate: callers wait inside until it opens; the most ever inside is kept. */
static pthread_mutex_t gate_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t gate_cond = PTHREAD_COND_INITIALIZER;
static int gate_is_open, gate_inside, gate_most;

void gate_reset(void)
{
    pthread_mutex_lock(&gate_lock);
    gate_is_open = 0;
    gate_inside = 0;
    gate_most = 0;
    pthread_mutex_unlock(&gate_lock);
}

void gate_pass(void)
{
    pthread_mutex_lock(&gate_lock);
    gate_inside++;
    if (gate_inside > gate_most)
        gate_most = gate_inside;
    pthread_cond_broadcast(&gate_cond);
    while (!gate_is_open)
        pthread_cond_wait(&gate_cond, &gate_lock);
    gate_inside--;
    pthread_mutex_unlock(&gate_lock);
}

/* Blocks until at least n callers are inside the gate. */
void gate_wait_inside(int n)
{
    pthread_mutex_lock(&gate_lock);
    while (gate_inside < n)
        pthread_cond_wait(&gate_cond, &gate_lock);
    pthread_mutex_unlock(&gate_lock);
}

void gate_open(void)
{
    pthread_mutex_lock(&gate_lock);
    gate_is_open = 1;
    pthread_cond_broadcast(&gate_cond);
    pthread_mutex_unlock(&gate_lock);
}

int gate_most_inside(void)
{
    pthread_mutex_lock(&gate_lock);
    int most = gate_most;
    pthread_mutex_unlock(&gate_lock);
    return most;
}

/* Reads into buf, blocking until the pipe has data (for the R3 watchdog). */
long read_into(int fd, char *buf, long n)
{
    return (long)read(fd, buf, (size_t)n);
}

/* Waits for one byte on fd, then returns strlen(text): a call that holds its argument a while. */
long wait_then_len(int fd, const char *text)
{
    char byte;
    if (read(fd, &byte, 1) != 1)
        return -1;
    return (long)strlen(text);
}

/* Calls fn(0..n-1); returns the sum, or the first negative result. */
int call_each(int (*fn)(int), int n)
{
    int sum = 0;
    for (int i = 0; i < n; i++) {
        int r = fn(i);
        if (r < 0)
            return r;
        sum += r;
    }
    return sum;
}

/* Calls fn(userdata, i) for i < n; returns the sum. */
int call_with_userdata(int (*fn)(void *, int), void *userdata, int n)
{
    int sum = 0;
    for (int i = 0; i < n; i++)
        sum += fn(userdata, i);
    return sum;
}

/* A callback and its user data kept for later, as an event loop's registration. */
static int (*kept_userdata_fn)(void *, int);
static void *kept_userdata;

void keep_userdata(int (*fn)(void *, int), void *userdata)
{
    kept_userdata_fn = fn;
    kept_userdata = userdata;
}

int call_kept_userdata(int arg)
{
    return kept_userdata_fn != NULL ? kept_userdata_fn(kept_userdata, arg) : -1;
}

/* Calls fn(arg) and returns the length of the string it returns (-1 for NULL). */
int call_get_len(const char *(*fn)(int), int arg)
{
    const char *s = fn(arg);
    return s ? (int)strlen(s) : -1;
}

struct thread_call {
    int (*fn)(int);
    int arg;
    int result;
};

static void *thread_main(void *p)
{
    struct thread_call *c = p;
    c->result = c->fn(c->arg);
    return NULL;
}

/* Calls fn(arg) on a new C thread, outside any Python call, and returns its result. */
int call_on_thread(int (*fn)(int), int arg)
{
    pthread_t t;
    struct thread_call c = {fn, arg, 0};
    if (pthread_create(&t, NULL, thread_main, &c) != 0)
        return -1000;
    pthread_join(t, NULL);
    return c.result;
}

struct get_call {
    const char *(*fn)(int);
    int arg;
    int len;
};

static void *get_thread_main(void *p)
{
    struct get_call *c = p;
    const char *s = c->fn(c->arg);
    c->len = s ? (int)strlen(s) : -1;
    return NULL;
}

/* call_get_len on a new C thread: no Python frame below the callback. */
int call_get_len_on_thread(const char *(*fn)(int), int arg)
{
    pthread_t t;
    struct get_call c = {fn, arg, 0};
    if (pthread_create(&t, NULL, get_thread_main, &c) != 0)
        return -1000;
    pthread_join(t, NULL);
    return c.len;
}

/* A callback C keeps after the call that registered it returned (like an event
 * handler), called later - from the caller's thread or from a C thread. */
static int (*kept_fn)(int);

void keep_callback(int (*fn)(int))
{
    kept_fn = fn;
}

int call_kept(int arg)
{
    return kept_fn ? kept_fn(arg) : -1000;
}

int call_kept_on_thread(int arg)
{
    return kept_fn ? call_on_thread(kept_fn, arg) : -1000;
}

/* Gathers writev-style: total bytes of an iovec array (reads every byte). */
long iov_sum(const struct pb_iov *iov, int n)
{
    long total = 0;
    for (int i = 0; i < n; i++)
        for (size_t j = 0; j < iov[i].len; j++)
            total += ((const unsigned char *)iov[i].base)[j];
    return total;
}

/* A msghdr-like chain: message -> iovec array -> buffers. */
long msg_sum(const struct pb_msg *msg)
{
    return iov_sum(msg->iov, msg->iovlen);
}

int is_null(const void *p)
{
    return p == NULL;
}

int is_null_text(const char *p)
{
    return p == NULL;
}

int is_null_int(const int *p)
{
    return p == NULL;
}

/* The address C was given, as a number (no pointer result for a checker to translate). */
unsigned long long address_seen(const char *p)
{
    return (unsigned long long)(uintptr_t)p;
}

/* Fills buf, calling progress after each byte; returns buf[0] as it is at the end (a callback
 * may have changed it). */
int fill_calling(char *buf, int n, int (*progress)(int))
{
    for (int i = 0; i < n; i++) {
        buf[i] = (char)('a' + i);
        progress(i + 1);
    }
    return buf[0];
}

/* Calls on_word with a pointer into text for each space-separated word; returns the count. */
int each_word(const char *text, int (*on_word)(const char *start, int len))
{
    int words = 0;
    for (const char *p = text; *p;) {
        while (*p == ' ')
            p++;
        const char *start = p;
        while (*p && *p != ' ')
            p++;
        if (p > start) {
            on_word(start, (int)(p - start));
            words++;
        }
    }
    return words;
}
