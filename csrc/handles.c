/*
 * handles.c - the handle table.
 *
 * A token is a uintptr_t that encodes (tag, generation, slot + 1).  Slots
 * move through these states:
 *
 *   FREE --pb__handle_new--> LIVE --pb__handle_delete (Python)--> FREE
 *                             |
 *                             +--pb_handle_release (C, any thread)--> RELEASED
 *   RELEASED --pb__handle_take_released (Python)--> TAKEN
 *   TAKEN --pb__handle_recycle (Python, after dropping the objects)--> FREE
 *
 * A RELEASED or TAKEN slot is not reused until Python has dropped its object
 * (dropping can run __del__ or weakref callbacks that create new handles: they
 * must not land in a slot whose old object is still being dropped).  So the
 * queue of released tokens never holds more entries than there are slots,
 * and pb_handle_release never has to allocate.
 *
 * Tokens never repeat in a process's lifetime:
 *   - the generation is bumped whenever a slot leaves LIVE;
 *   - a slot whose generation would pass gen_limit (2^32 - 1 on 64-bit) is
 *     retired for good instead of wrapping (it costs one slot per 2^32 reuses);
 *   - free slots are reused first-in first-out, so a slot is reused only
 *     after every other free slot, which makes retirement rare and keeps a
 *     just-deleted token's slot from being handed out again at once.
 *
 * One mutex guards everything (taken around fork() by pthread_atfork
 * handlers); the count of pending released tokens is also kept in an atomic
 * so Python can poll it with one load.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "pb_internal.h"

enum { SLOT_FREE = 0, SLOT_LIVE = 1, SLOT_RELEASED = 2, SLOT_TAKEN = 3, SLOT_RETIRED = 4 };

#if UINTPTR_MAX > 0xFFFFFFFFu
/* 64-bit: tag in bits 56..63, generation in 24..55, slot + 1 in 0..23. */
#define TAG_SHIFT 56
#define TAG_VALUE ((uintptr_t)0xA7)
#define GEN_SHIFT 24
#define GEN_MASK ((uintptr_t)0xFFFFFFFFu)
#define SLOT_MASK ((uintptr_t)0xFFFFFF)
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
    uint32_t gen; /* 1..gen_limit */
    uint32_t state;
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct slot *slots;
static size_t slot_count; /* slots ever used (prefix of `slots`) */
static size_t slot_cap;
static uint32_t *free_ring; /* FIFO of free slots, capacity slot_cap */
static size_t free_head;    /* index of the oldest free slot */
static size_t free_len;
static uintptr_t *released; /* capacity slot_cap */
static size_t released_count;
static _Atomic size_t pending;
static uint64_t live;
static uint64_t high_water;
static uint64_t retired;
static uint32_t gen_limit = (uint32_t)GEN_MASK;

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

/* A slot leaves LIVE: a new generation, so no old token matches it again. */
static void bump_gen(struct slot *s)
{
    if (s->gen < gen_limit)
        s->gen++;
    else
        s->gen = 0; /* marks "retire instead of reusing" (0 is never issued) */
}

/* Puts a slot on the free FIFO, or retires it if its generations are used up. */
static void free_slot(size_t index)
{
    if (slots[index].gen == 0) {
        slots[index].state = SLOT_RETIRED;
        retired++;
        return;
    }
    slots[index].state = SLOT_FREE;
    free_ring[(free_head + free_len) % slot_cap] = (uint32_t)index;
    free_len++;
}

/* Grows every array to `cap` slots.  Lock held.  Returns 0 or -1. */
static int grow(size_t cap)
{
    struct slot *ns = realloc(slots, cap * sizeof *ns);
    if (ns == NULL)
        return -1;
    slots = ns;
    uintptr_t *nr = realloc(released, cap * sizeof *nr);
    if (nr == NULL)
        return -1;
    released = nr;
    uint32_t *nf = malloc(cap * sizeof *nf);
    if (nf == NULL)
        return -1;
    for (size_t i = 0; i < free_len; i++) /* unwrap the ring */
        nf[i] = free_ring[(free_head + i) % slot_cap];
    free(free_ring);
    free_ring = nf;
    free_head = 0;
    slot_cap = cap;
    return 0;
}

uintptr_t pb__handle_new(void)
{
    uintptr_t token = 0;
    pthread_mutex_lock(&lock);
    size_t index;
    if (free_len > 0) {
        index = free_ring[free_head];
        free_head = (free_head + 1) % slot_cap;
        free_len--;
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
    free_slot((size_t)index);
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
    atomic_store_explicit(&pending, released_count, memory_order_release);
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
        slots[(size_t)(token & SLOT_MASK) - 1].state = SLOT_TAKEN;
    }
    released_count -= n;
    atomic_store_explicit(&pending, released_count, memory_order_release);
    pthread_mutex_unlock(&lock);
    return n;
}

void pb__handle_recycle(const uintptr_t *tokens, size_t n)
{
    pthread_mutex_lock(&lock);
    for (size_t i = 0; i < n; i++) {
        size_t index = pb__handle_slot(tokens[i]);
        if (index < slot_count && slots[index].state == SLOT_TAKEN)
            free_slot(index);
    }
    pthread_mutex_unlock(&lock);
}

size_t pb__handle_pending(void)
{
    return atomic_load_explicit(&pending, memory_order_acquire);
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

uint64_t pb__handle_test_gen_limit(uint64_t limit)
{
    pthread_mutex_lock(&lock);
    uint64_t old = gen_limit;
    if (limit >= 1 && limit <= GEN_MASK)
        gen_limit = (uint32_t)limit;
    uint64_t r = retired;
    pthread_mutex_unlock(&lock);
    return limit == 0 ? r : old;
}

PB_FORK_SAFE_LOCK(lock);
