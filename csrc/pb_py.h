/*
 * pb_py.h - private declarations shared by the CPython-API C files
 * (pybuffer.c, pycall.c, pyhandles.c, pypin.c, pysite.c).  Not read by cffi (no
 * PB_CDEF block): these take PyObject and need the GIL.
 */
#ifndef PB_PY_H
#define PB_PY_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

/* CPython 3.9 lacks the 3.10 reference helpers; same semantics. */
#if PY_VERSION_HEX < 0x030A0000
static inline PyObject *pb__new_ref(PyObject *o)
{
    Py_INCREF(o);
    return o;
}
static inline PyObject *pb__xnew_ref(PyObject *o)
{
    Py_XINCREF(o);
    return o;
}
#define Py_NewRef(o) pb__new_ref((PyObject *)(o))
#define Py_XNewRef(o) pb__xnew_ref((PyObject *)(o))
#endif

/* pybuffer.c: the function table _cffi_backend exports in its "_C_API"
 * capsule, or NULL (an older cffi); never leaves an exception set. */
void **pb__cffi_exports(void);

/* pysite.c: "file.py:12" for a site id (new reference; "<unknown>:0" for 0). */
PyObject *pb__site_text(uint32_t site);

/* pysite.c: site ids of up to `max` frames of the Python stack from `frame`,
 * from the first one outside ptrbridge, their frame lines made for
 * pb__site_line(); returns how many. */
int pb__site_capture_stack(PyObject *frame, uint32_t *ids, int max);

/* A cffi `char *` cdata for an address, made without a cffi call (through
 * cffi's exported C API when available).  New reference, or NULL. */
PyObject *pb__charp_object(uintptr_t addr);

/* pylends.c: level 2's fast-path lends.  The first of n new scan target ids
 * (shared with scanning.py); a returned lend queued as target_id, recorded
 * for reports (0, or -1 with MemoryError set); how many await a scan. */
uint64_t pb__fl_take_ids(uint64_t n);
int pb__fl_returned(uint64_t target_id, uintptr_t start, size_t size, PyObject *kind, PyObject *function,
                    uint32_t site);
size_t pb__fl_pending(void);
/* "bytes(21)", "cdata 'char[]'(64)": ownership.describe's text for what `kind` says (new reference). */
PyObject *pb__fl_description(PyObject *kind, size_t size);

/* Registers a module function table on `module`.  Returns 0 or -1. */
int pb__add_functions(PyObject *module, PyMethodDef *defs);

int pb__py_handles_init(PyObject *module); /* pyhandles.c */
int pb__py_sites_init(PyObject *module);   /* pysite.c */
int pb__py_pins_init(PyObject *module);    /* pypin.c */
int pb__py_frames_init(PyObject *module);  /* pyframes.c */
int pb__py_quarantine_init(PyObject *module); /* pyquarantine.c */
int pb__py_calls_init(PyObject *module);   /* pycall.c */
int pb__py_lends_init(PyObject *module);   /* pylends.c */

#endif /* PB_PY_H */
