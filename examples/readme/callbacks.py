"""README: a Python callback C calls, with a Handle as userdata."""
import cffi

import ptrbridge

ffi = cffi.FFI()
ffi.cdef("void qsort(void *base, size_t n, size_t size, int (*cmp)(const void *, const void *));")
libc = ptrbridge.wrap(ffi.dlopen(None))
numbers = ffi.new("int[5]", [3, 1, 4, 1, 5])
seen = []


def compare(a, b):
    x, y = ffi.cast("int *", a)[0], ffi.cast("int *", b)[0]
    seen.append((x, y))
    return (x > y) - (x < y)


with ptrbridge.callback(ffi, "int(const void *, const void *)", compare, error=0) as cmp:
    libc.qsort(numbers, 5, ffi.sizeof("int"), cmp.cdata)
print(list(numbers))


def failing(a, b):
    raise ValueError("the comparator failed")


with ptrbridge.callback(ffi, "int(const void *, const void *)", failing, error=0) as cmp:
    try:
        libc.qsort(numbers, 5, ffi.sizeof("int"), cmp.cdata)   # C got 0; the call re-raises
    except ValueError as exc:
        print("re-raised:", exc)
