import os
import cffi

# cffi ABI mode: a bytearray is extended (and moves) while C keeps a pointer into it.
ffi = cffi.FFI()
ffi.cdef("void keep_set(const char *p, size_t n); size_t keep_copy(char *out, size_t cap);"
         "void keep_clear(void);")
lib = ffi.dlopen(os.path.join(os.path.dirname(os.path.abspath(__file__)), "libkeep.so"))

log = bytearray(b"record-A;" * 30)
lib.keep_set(ffi.from_buffer(log), len(log))    # C keeps a pointer to log's storage
junk = [bytearray(b"\xee" * 270) for _ in range(100)]
out = ffi.new("char[]", 270)
n = lib.keep_copy(out, 270)                     # C reads it while log is alive and unchanged
lib.keep_clear()                                # FIX: C lets go before the resize
log.extend(b"record-B;" * 4000)
got = ffi.buffer(out, n)[:]
print(got[:27])
print("CORRECT" if got == b"record-A;" * 30 else "WRONG")
