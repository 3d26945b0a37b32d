"""README: copying to the C heap and handing ownership to C."""
import cffi

import ptrbridge

ffi = cffi.FFI()
ffi.cdef("int pb_free(void *ptr);")
c = ffi.dlopen(None)

payload = b"message for a background thread"
buf = ptrbridge.CBuffer.copy(payload)       # tracked C heap copy; memoryview(buf) is zero-copy
size = len(buf)                             # read the size first: transfer() empties buf
ptr = buf.transfer()                        # C owns it now...
print(ptrbridge.stats().transferred, "transferred,", size, "bytes")
c.pb_free(ptr)                              # ...and frees it (say, in a delivery callback)
print(ptrbridge.stats().transferred, "transferred")

name = ptrbridge.cstring("héllo")           # NUL-terminated UTF-8, like C.CString
print(name.to_bytes())
