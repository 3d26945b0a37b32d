/* Function-pointer values a cffi library exposes: a variable C changes, and a
 * struct field the program stores a callback in (libgit2's git_remote_callbacks). */

#include "fnvalues.h"

static int triple(const int *v) { return 3 * *v; }
static int quadruple(const int *v) { return 4 * *v; }

int (*fv_hook)(const int *) = triple;

void fv_hook_reset(void) { fv_hook = triple; }
void fv_hook_set_quadruple(void) { fv_hook = quadruple; }
int fv_call_hook(int v) { return fv_hook(&v); }

int fv_call_ops(const struct fv_ops *ops, int v) { return ops->fn(&v); }
