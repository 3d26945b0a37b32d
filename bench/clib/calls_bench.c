/* C side of bench/bench_calls.py.  Each function reads its arguments (and
 * only the pointer values, not the memory they point to), so the compiler
 * cannot drop the call and the C work stays a few nanoseconds. */
#include "calls_bench.h"

int cb_two_ints(int a, int b) { return a + b; }

int cb_one_bytes(const char *p) { return p ? p[0] : -1; }

int cb_struct4(const struct cb_s4 *s)
{
    return (s->a != NULL) + (s->b != NULL) + (s->c != NULL) + (s->d != NULL);
}

int cb_iov(const struct iovec *v, int n)
{
    size_t total = 0;
    for (int i = 0; i < n; i++)
        total += v[i].iov_len + (v[i].iov_base != NULL);
    return (int)total;
}
