/*
 * pb_py.h - private declarations shared by the CPython-API C files
 * (pybuffer.c, pyhandles.c, pypin.c, pysite.c).  Not read by cffi (no
 * PB_CDEF block): these take PyObject and need the GIL.
 */
#ifndef PB_PY_H
#define PB_PY_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

/* pysite.c: "file.py:12" for a site id (new reference; "<unknown>:0" for 0). */
PyObject *pb__site_text(uint32_t site);

/* Registers a module function table on `module`.  Returns 0 or -1. */
int pb__add_functions(PyObject *module, PyMethodDef *defs);

int pb__py_handles_init(PyObject *module); /* pyhandles.c */
int pb__py_sites_init(PyObject *module);   /* pysite.c */
int pb__py_pins_init(PyObject *module);    /* pypin.c */

#endif /* PB_PY_H */
