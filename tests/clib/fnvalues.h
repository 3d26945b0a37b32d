/* Function-pointer values a cffi library exposes (fnvalues.c). */
#ifndef FNVALUES_H
#define FNVALUES_H

/* CDEF_BEGIN */
extern int (*fv_hook)(const int *);
void fv_hook_reset(void);
void fv_hook_set_quadruple(void);
int fv_call_hook(int v);

struct fv_ops { int (*fn)(const int *); };
int fv_call_ops(const struct fv_ops *ops, int v);
/* CDEF_END */

#endif
