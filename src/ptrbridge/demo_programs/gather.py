"""A naive cffi program with a use-after-free: writev() reads iovec bases that are already freed.

Run it plainly, then under ptrbridge (no change to this file):

    python gather.py
    python -m ptrbridge run -- python gather.py
"""
import os

import cffi

ffi = cffi.FFI()
ffi.cdef("""
    struct iovec { void *iov_base; size_t iov_len; };
    ssize_t writev(int fd, const struct iovec *iov, int iovcnt);
""")
libc = ffi.dlopen(None)


def gather(parts):
    iov = ffi.new("struct iovec[]", len(parts))
    for i, part in enumerate(parts):
        iov[i].iov_base = ffi.new("char[]", part)   # BUG: this buffer is freed at once
        iov[i].iov_len = len(part)
    return iov


r, w = os.pipe()
n = libc.writev(w, gather([b"hello ", b"world\n"]), 2)
print("writev wrote", n, "bytes:", os.read(r, 100))
