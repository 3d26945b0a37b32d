"""README: handles, released from C, and a bounded table."""
import cffi

import ptrbridge

ffi = cffi.FFI()
ffi.cdef("int pb_handle_release(uintptr_t token);")
c = ffi.dlopen(None)  # ptrbridge's C API is global once ptrbridge is imported

request = {"id": 7}
h = ptrbridge.Handle(request)
token = int(h)                              # what C stores: nonzero, never a pointer
print(ptrbridge.handle_value(token))        # C hands the token back: the object
c.pb_handle_release(token)                  # C is done with it (any thread, no GIL)
ptrbridge.collect()
try:
    ptrbridge.handle_value(token)           # stale: refused, never another object
except ptrbridge.InvalidHandleError as exc:
    print(type(exc).__name__)

table = ptrbridge.HandleTable(max_handles=2)
kept = [table.new(i) for i in range(2)]
try:
    table.new(2)
except ptrbridge.HandleLimitError as exc:
    print(type(exc).__name__)
for k in kept:
    k.delete()
