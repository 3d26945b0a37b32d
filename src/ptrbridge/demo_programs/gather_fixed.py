"""The correct twin of gather.py: the buffers live as long as the iovec that points at them."""
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
    keep = [ffi.new("char[]", part) for part in parts]   # kept alive with the iovec
    for i, (part, buf) in enumerate(zip(parts, keep)):
        iov[i].iov_base = buf
        iov[i].iov_len = len(part)
    return iov, keep


r, w = os.pipe()
iov, keep = gather([b"hello ", b"world\n"])
n = libc.writev(w, iov, 2)
print("writev wrote", n, "bytes:", os.read(r, 100))
