"""README: batch forms for producers: pin_many and copy_many."""
import cffi

import ptrbridge

ffi = cffi.FFI()
ffi.cdef("int pb_free(void *ptr);")
c = ffi.dlopen(None)

frames = [bytearray(100) for _ in range(8)]
with ptrbridge.Pinner() as p:
    ptrs = p.pin_many(frames)              # one C call; a char *[8] of their addresses
    print(len(ptrs), "pinned")

batch = ptrbridge.CBuffer.copy_many([b"m1", b"message two", bytearray(b"3")])
print(list(batch.lengths))                 # batch.pointers is a char *[3], batch.lengths a size_t[3]
n = len(batch)
ptrs = batch.transfer()                    # C owns every block now...
for i in range(n):
    c.pb_free(ptrs[i])                     # ...and frees each one on its own (a delivery callback)
print(ptrbridge.stats().transferred, "transferred")
