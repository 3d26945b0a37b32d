"""README: rule R1 with writev(2), broken and fixed."""
import os

import cffi

import ptrbridge

ffi = cffi.FFI()
ffi.cdef("""
    struct iovec { void *iov_base; size_t iov_len; };
    ssize_t writev(int fd, const struct iovec *iov, int iovcnt);
""")
libc = ptrbridge.wrap(ffi.dlopen(None), errcheck={"writev": "negative"}, use_errno=True)
read_end, fd = os.pipe()
buf = bytearray(b"hello, C")

iov = ffi.new("struct iovec[1]")
iov[0].iov_base = ffi.from_buffer(buf)      # a pointer to unpinned Python memory...
iov[0].iov_len = len(buf)
try:
    libc.writev(fd, iov, 1)                 # ...inside memory passed to C: R1
except ptrbridge.NestedPointerError as exc:
    print(exc)

with ptrbridge.Pinner() as p:
    iov[0].iov_base = p.pin(buf)            # fixed: pinned for the call
    print("wrote", libc.writev(fd, iov, 1), "bytes")
