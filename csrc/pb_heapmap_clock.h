/*
 * pb_heapmap_clock.h - the heap map's free clock, inline (private to csrc).
 *
 * pb_heapmap_clock (pb_heapmap.h) is read on every free the interposer sees
 * (interpose.c stamps C's frees with it), so its few atomic loads are
 * inlined there instead of a call through the PLT.  The variables live in
 * heapmap_freed.c, which writes them; hidden visibility (not exported).
 */
#ifndef PB_HEAPMAP_CLOCK_H
#define PB_HEAPMAP_CLOCK_H

#include <stdatomic.h>
#include <stdint.h>

#include "pb_heapmap.h"

#pragma GCC visibility push(hidden)

/* Frees recorded on the GIL path (the GIL ring's claim counter), the locked
 * ring's sequence published for readers without the lock, and the history's
 * epoch, a sequence lock (odd while the history is being forgotten: a clock
 * read meanwhile gets epoch 0). */
extern _Atomic uint64_t hm_gil_ring_claim, hm_lock_ring_pub, hm_freed_epoch;

static inline __attribute__((always_inline)) void hm_clock_read(struct pb_heapmap_clock *out)
{
    uint64_t e = atomic_load_explicit(&hm_freed_epoch, memory_order_acquire);
    out->gil = atomic_load_explicit(&hm_gil_ring_claim, memory_order_acquire);
    out->lock = atomic_load_explicit(&hm_lock_ring_pub, memory_order_acquire);
    atomic_thread_fence(memory_order_acquire);
    out->epoch = (e & 1) == 0 && atomic_load_explicit(&hm_freed_epoch, memory_order_relaxed) == e ? e : 0;
}

#pragma GCC visibility pop

#endif /* PB_HEAPMAP_CLOCK_H */
