/*
 * pb_quarantine.h - shadow copies for lent buffers (check level 2 with
 * quarantine on, or one lend in N when sampling).  A buffer lent to a call is
 * passed as a copy placed against a guard page; after the call the copy is
 * made inaccessible and kept in a bounded FIFO, so a pointer C kept faults on
 * its next use, and a SIGSEGV handler explains which call lent which object.
 */
#ifndef PB_QUARANTINE_H
#define PB_QUARANTINE_H

#include "ptrbridge.h"

/* PB_CDEF_BEGIN */

/* Copies len bytes from src into a shadow whose last byte touches a guard
 * page.  `owner` is the address of the original's object when it is
 * immutable (a bytes), or, with PB_QOWNER_MUTABLE in `held`, of the heap
 * block of a mutable original (a bytearray's buffer, ffi.new memory), else 0:
 * a later read of the closed shadow while that object lives is a kept read
 * (recorded, the read goes on), after its free an error.  Its free is seen by
 * the heap map's free hook, or, with PB_QOWNER_HELD in `held` (no heap map,
 * bytes only), Python holds one reference to it for the slot and the
 * object is alive while anything else references it.  `object` ("bytes(241)"), `function` ("produce"), `site` (the
 * lending call's "file.py:12") and `stack` (the
 * Python stack of the lending call, one "    #k file:line in name" line per
 * frame) are copied into the slot (truncated to fixed sizes) for the fault
 * report; the caller keeps ownership of all three.  Installs the fault
 * handler on top if it is not, and an alternate signal stack on the calling
 * thread if it has none.  Returns a slot number (>= 0) and stores the shadow
 * address in *shadow, or a negative PB_ERR_*: PB_ERR_NOMEM when no slot is
 * free, PB_ERR_INVALID for a NULL pointer argument.  Thread-safe. */
int pb__quarantine_lend(const void *src, size_t len, uintptr_t owner, int held, const char *object,
                        const char *function, const char *site, const char *stack, uintptr_t *shadow);

/* `held` flags of pb__quarantine_lend. */
#define PB_QOWNER_HELD 1
#define PB_QOWNER_MUTABLE 2

/* Copies into each adopted shadow of a live mutable original what the
 * original holds now, where it changed since (C reads that shadow in place of
 * the object).  Called before each checked call that may lend.  Returns how
 * many were refreshed.  Thread-safe. */
int pb__quarantine_refresh_adopted(void);

/* 1 if slot's shadow was adopted (a kept read: open read-only while its
 * original lives).  Thread-safe. */
int pb__quarantine_adopted(int slot);

/* The original `object` of watched shadows is gone: their adopted shadows
 * close again, and a read after that is an error.  The heap map's free hook
 * calls it; so does Python for a held original it lets go of.  Thread-safe. */
void pb__quarantine_owner_freed_slow(uintptr_t object);

/* Ends a lend: copies the shadow back to dst (if dst is not NULL), makes the
 * shadow inaccessible and puts it in the quarantine FIFO (evicting the
 * oldest).  Returns PB_OK, PB_ERR_INVALID (not a lent slot) or
 * PB_QUARANTINE_WROTE_IMMUTABLE: the original is an immutable object (a
 * bytes) and C changed the shadow, which a bytes must never be; the shadow
 * was copied to the original, as C's writes would have reached it without
 * the quarantine.  Thread-safe. */
#define PB_QUARANTINE_WROTE_IMMUTABLE 1
int pb__quarantine_finish(int slot, void *dst);

/* pb__quarantine_finish with the copy-back address as an integer (0: none),
 * so that Python passes it without making a pointer cdata.  Thread-safe. */
int pb__quarantine_finish_at(int slot, uintptr_t dst);

/* Number of shadows currently quarantined (inaccessible).  Thread-safe. */
int pb__quarantine_held(void);

/* Installs the fault handler on top (again) if another one replaced it;
 * returns 1 if it (re)installed, 0 if it already was on top.  Thread-safe. */
int pb__quarantine_ensure_handler(void);

/* Number of slots whose guard install failed and fell back to mprotect
 * (for tests and the benchmark). */
int pb__quarantine_fallbacks(void);

/* Forces the mprotect fallback for every later close (1) or lets slots try
 * MADV_GUARD_INSTALL first again (0).  For tests. */
void pb__quarantine_force_mprotect(int on);

/* Also writes every report to `fd` (-1: only stderr); the caller keeps
 * the descriptor open.  Returns the previous one.  Thread-safe. */
int pb__quarantine_set_log_fd(int fd);

/* Kept reads so far (reads of closed shadows whose original was alive and
 * immutable: the read went on).  Thread-safe. */
uint64_t pb__quarantine_kept_reads(void);

/* Copies the report of kept read n (0-based) into out (NUL-terminated,
 * truncated to cap); returns its length, or -1 if the ring of the last 16
 * no longer holds it.  Thread-safe. */
long pb__quarantine_kept_read(uint64_t n, char *out, size_t cap);

/* Stops following every original (the heap map is going away): their
 * shadows are no longer adopted on a read.  Thread-safe. */
void pb__quarantine_unwatch_all(void);

/* PB_CDEF_END */

/* A trap for freed memory a pointer slot of a call's arguments points into:
 * a closed region of len bytes (nothing is copied) that stands for it while
 * the call runs.  The slot is pointed into it for the call, and any access
 * by C is reported as a use after free with where it was passed (ids: the
 * lending call's Python stack, as pb__quarantine_lend_sites) and the process
 * ends.  Ended by pb__quarantine_finish(slot, NULL).  Returns the slot or a
 * negative PB_ERR_*.  Thread-safe. */
int pb__quarantine_trap_sites(size_t len, const char *object, size_t object_len, const char *function,
                              size_t function_len, const uint32_t *ids, int nids, uintptr_t *shadow);

/* pb__quarantine_lend for pyquarantine.c: the texts are counted, and where
 * it was lent is the site ids of the lending call's Python stack
 * (pysite.c's pb__site_capture_stack; their text is made once per site and
 * printed by the fault handler).  nids 0: no Python caller ("<unknown>"). */
int pb__quarantine_lend_sites(const void *src, size_t len, uintptr_t owner, int held, const char *object,
                              size_t object_len, const char *function, size_t function_len, const uint32_t *ids,
                              int nids, uintptr_t *shadow);

/* Watched originals, for the heap map's free hook: a count per bucket of the
 * slots whose owner hashes there.  Internal. */
#include <stdatomic.h>
#include <stdint.h>
#define PB_QWATCH_BUCKETS 1024
extern _Atomic unsigned char pb__qwatch[PB_QWATCH_BUCKETS];

static inline unsigned pb__qwatch_bucket(uintptr_t p)
{
    return (unsigned)((p >> 4) ^ (p >> 14)) & (PB_QWATCH_BUCKETS - 1);
}

/* Called for every object block the heap map sees freed: closes the
 * adopted shadows of `p` again.  A relaxed load unless p is watched. */
static inline void pb__quarantine_owner_freed(void *p)
{
    uintptr_t a = (uintptr_t)p;
    if (__builtin_expect(atomic_load_explicit(&pb__qwatch[pb__qwatch_bucket(a)], memory_order_relaxed) != 0, 0))
        pb__quarantine_owner_freed_slow(a);
}

#endif /* PB_QUARANTINE_H */
