/* C side of bench/bench_calls.py: trivial functions, so a call costs what the binding costs. */
#ifndef CALLS_BENCH_H
#define CALLS_BENCH_H

#include <stddef.h>
#include <sys/uio.h>

struct cb_s4 {
    char *a;
    char *b;
    char *c;
    char *d;
};

int cb_two_ints(int a, int b);
int cb_one_bytes(const char *p);
int cb_struct4(const struct cb_s4 *s);
int cb_iov(const struct iovec *v, int n);

#endif
