"""README: pinning a buffer across C calls."""
import cffi

import ptrbridge

ffi = cffi.FFI()
ffi.cdef("size_t strlen(const char *s);")
libc = ptrbridge.wrap(ffi.dlopen(None))
data = bytearray(b"streaming input\0")

with ptrbridge.Pinner() as p:
    ptr = p.pin(data)                       # char * to data's first byte
    print(libc.strlen(ptr))
    try:
        data.extend(b"!")                   # cannot be resized while C may hold it
    except BufferError:
        print("BufferError while pinned")
data.extend(b"!")                           # unpinned: it can grow again
