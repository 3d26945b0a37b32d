/*
 * handles.c - the handle table.
 *
 * A token is a uintptr_t that encodes (tag, generation, slot + 1).  Slots
 * move through three states:
 *
 *   FREE --pb__handle_new--> LIVE --pb__handle_delete (Python)--> FREE
 *                             |
 *                             +--pb_handle_release (C, any thread)--> RELEASED
 *   RELEASED --pb__handle_take_released (Python)--> FREE
 *
 * A RELEASED slot is not reused until Python has taken its token and dropped
 * the object, so the queue of released tokens never holds more entries than
 * there are slots, and pb_handle_release never has to allocate.  The
 * generation is bumped whenever a slot leaves LIVE, so an old token for a
 * reused slot never matches.  One mutex guards everything; the count of
 * pending released tokens is also kept in an atomic so Python can poll it
 * without a call.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>

#include "pb_internal.h"

enum { SLOT_FREE = 0, SLOT_LIVE = 1, SLOT_RELEASED = 2 };

#if UINTPTR_MAX > 0xFFFFFFFFu
/* 64-bit: tag in bits 56..63, generation in 32..55, slot + 1 in 0..31. */
#define TAG_SHIFT 56
#define TAG_VALUE ((uintptr_t)0xA7)
#define GEN_SHIFT 32
#define GEN_MASK ((uintptr_t)0xFFFFFF)
#define SLOT_MASK ((uintptr_t)0xFFFFFFFF)
#else
/* 32-bit: tag in bit 31, generation in 20..30, slot + 1 in 0..19. */
#define TAG_SHIFT 31
#define TAG_VALUE ((uintptr_t)1)
#define GEN_SHIFT 20
#define GEN_MASK ((uintptr_t)0x7FF)
#define SLOT_MASK ((uintptr_t)0xFFFFF)
#endif
#define MAX_SLOTS ((size_t)SLOT_MASK - 1)

struct slot {
    uint32_t gen; /* 1..GEN_MASK */
    uint32_t state;
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct slot *slots;
static size_t slot_count; /* slots ever used (prefix of `slots`) */
static size_t slot_cap;
static uint32_t *free_stack; /* capacity slot_cap */
static size_t free_top;
static uintptr_t *released; /* capacity slot_cap */
static size_t released_count;
static _Atomic size_t pending;
static uint64_t live;
static uint64_t high_water;

static uintptr_t encode(size_t index, uint32_t gen)
{
    return (TAG_VALUE << TAG_SHIFT) | ((uintptr_t)gen << GEN_SHIFT) | (uintptr_t)(index + 1);
}

/* Returns the slot index for a token that names a LIVE slot, or -1. */
static long decode_live(uintptr_t token)
{
    if ((token >> TAG_SHIFT) != TAG_VALUE)
        return -1;
    size_t index_plus_one = (size_t)(token & SLOT_MASK);
    if (index_plus_one == 0 || index_plus_one > slot_count)
        return -1;
    size_t index = index_plus_one - 1;
    uint32_t gen = (uint32_t)((token >> GEN_SHIFT) & GEN_MASK);
    if (slots[index].state != SLOT_LIVE || slots[index].gen != gen)
        return -1;
    return (long)index;
}

static void bump_gen(struct slot *s)
{
    s->gen = (uint32_t)((s->gen + 1) & GEN_MASK);
    if (s->gen == 0)
        s->gen = 1;
}

/* Grows every array to `cap` slots.  Lock held.  Returns 0 or -1. */
static int grow(size_t cap)
{
    struct slot *ns = realloc(slots, cap * sizeof *ns);
    if (ns == NULL)
        return -1;
    slots = ns;
    uint32_t *nf = realloc(free_stack, cap * sizeof *nf);
    if (nf == NULL)
        return -1;
    free_stack = nf;
    uintptr_t *nr = realloc(released, cap * sizeof *nr);
    if (nr == NULL)
        return -1;
    released = nr;
    slot_cap = cap;
    return 0;
}

uintptr_t pb__handle_new(void)
{
    uintptr_t token = 0;
    pthread_mutex_lock(&lock);
    size_t index;
    if (free_top > 0) {
        index = free_stack[--free_top];
    } else {
        if (slot_count == slot_cap) {
            size_t cap = slot_cap ? slot_cap * 2 : 256;
            if (cap > MAX_SLOTS)
                cap = MAX_SLOTS;
            if (slot_count >= cap || grow(cap) != 0)
                goto out;
        }
        index = slot_count++;
        slots[index].gen = 1;
    }
    slots[index].state = SLOT_LIVE;
    token = encode(index, slots[index].gen);
    live++;
    if (live > high_water)
        high_water = live;
out:
    pthread_mutex_unlock(&lock);
    return token;
}

int pb__handle_delete(uintptr_t token)
{
    pthread_mutex_lock(&lock);
    long index = decode_live(token);
    if (index < 0) {
        pthread_mutex_unlock(&lock);
        return PB_ERR_INVALID_HANDLE;
    }
    bump_gen(&slots[index]);
    slots[index].state = SLOT_FREE;
    free_stack[free_top++] = (uint32_t)index;
    live--;
    pthread_mutex_unlock(&lock);
    return PB_OK;
}

PB_API int pb_handle_release(uintptr_t token)
{
    pthread_mutex_lock(&lock);
    long index = decode_live(token);
    if (index < 0) {
        pthread_mutex_unlock(&lock);
        return PB_ERR_INVALID_HANDLE;
    }
    bump_gen(&slots[index]);
    slots[index].state = SLOT_RELEASED;
    released[released_count++] = token;
    atomic_store(&pending, released_count);
    live--;
    pthread_mutex_unlock(&lock);
    return PB_OK;
}

PB_API int pb_handle_is_valid(uintptr_t token)
{
    pthread_mutex_lock(&lock);
    int ok = decode_live(token) >= 0;
    pthread_mutex_unlock(&lock);
    return ok;
}

size_t pb__handle_take_released(uintptr_t *out, size_t cap)
{
    if (out == NULL)
        return 0;
    pthread_mutex_lock(&lock);
    size_t n = released_count < cap ? released_count : cap;
    for (size_t i = 0; i < n; i++) {
        uintptr_t token = released[released_count - 1 - i];
        out[i] = token;
        size_t index = (size_t)(token & SLOT_MASK) - 1;
        slots[index].state = SLOT_FREE;
        free_stack[free_top++] = (uint32_t)index;
    }
    released_count -= n;
    atomic_store(&pending, released_count);
    pthread_mutex_unlock(&lock);
    return n;
}

size_t *pb__handle_pending_counter(void)
{
    /* _Atomic size_t is lock-free and has the size and representation of
     * size_t on every platform ptrbridge supports; Python only loads it. */
    return (size_t *)&pending;
}

void pb__handle_get_counts(uint64_t *live_out, uint64_t *high_water_out)
{
    pthread_mutex_lock(&lock);
    if (live_out)
        *live_out = live;
    if (high_water_out)
        *high_water_out = high_water;
    pthread_mutex_unlock(&lock);
}

size_t pb__handle_slot(uintptr_t token)
{
    if ((token >> TAG_SHIFT) != TAG_VALUE || (token & SLOT_MASK) == 0)
        return SIZE_MAX;
    return (size_t)(token & SLOT_MASK) - 1;
}
