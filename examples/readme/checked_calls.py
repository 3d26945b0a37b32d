"""README: a checked library with an error convention."""
import cffi

import ptrbridge

ffi = cffi.FFI()
ffi.cdef("int close(int fd);")
libc = ptrbridge.wrap(ffi.dlopen(None),                 # cffi ABI mode; also a cffi API-mode
                      errcheck={"close": "negative"},   # lib or a ctypes.CDLL
                      use_errno=True)
try:
    libc.close(-1)                                      # -1: OSError from the errno close() left
except OSError as exc:
    print(type(exc).__name__, exc.errno, exc.strerror)
