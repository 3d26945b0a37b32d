/*
 * pb_quarantine.h - shadow copies for lent buffers (check level 2 with
 * quarantine on).  A buffer lent to a call is passed as a copy placed against
 * a guard page; after the call the copy is made inaccessible and kept in a
 * bounded FIFO, so a pointer C kept faults on its next use, and a SIGSEGV
 * handler explains which call lent which object.
 */
#ifndef PB_QUARANTINE_H
#define PB_QUARANTINE_H

#include "ptrbridge.h"

/* PB_CDEF_BEGIN */

/* Copies len bytes from src into a shadow whose last byte touches a guard
 * page, with `description` (copied; pre-formatted for the fault report).
 * Installs the fault handler on top if it is not.  Returns a slot number
 * (>= 0) and stores the shadow address in *shadow, or a negative PB_ERR_*
 * (PB_ERR_NOMEM when no slot is free).  Thread-safe. */
int pb__quarantine_lend(const void *src, size_t len, const char *description, uintptr_t *shadow);

/* Ends a lend: copies the shadow back to dst (if dst is not NULL), makes the
 * shadow inaccessible and puts it in the quarantine FIFO (evicting the
 * oldest).  Returns PB_OK or PB_ERR_INVALID.  Thread-safe. */
int pb__quarantine_finish(int slot, void *dst);

/* Number of shadows currently quarantined (inaccessible). */
int pb__quarantine_held(void);

/* Installs the fault handler on top (again) if another one replaced it;
 * returns 1 if it (re)installed, 0 if it already was on top. */
int pb__quarantine_ensure_handler(void);

/* PB_CDEF_END */

#endif /* PB_QUARANTINE_H */
