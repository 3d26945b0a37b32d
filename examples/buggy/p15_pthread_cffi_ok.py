import os
import cffi

# cffi ABI mode: a C background thread reads a bytes after the call that lent it returned.
ffi = cffi.FFI()
ffi.cdef("int bg_start(const char *p, size_t n); unsigned long bg_join(void);")
lib = ffi.dlopen(os.path.join(os.path.dirname(os.path.abspath(__file__)), "libkeep.so"))


def checksum(b):
    s = 0
    for c in b:
        s = (s * 31 + c) & 0xFFFFFFFFFFFFFFFF
    return s


def start_job(seed):
    data = bytes((seed * i + 1) & 0xFF for i in range(4096))
    lib.bg_start(data, len(data))
    return checksum(data), data              # FIX: the caller keeps data until bg_join()


expected, data = start_job(7)
junk = [bytes(4096) for _ in range(20)]
got = lib.bg_join()
print("CORRECT" if got == expected else "WRONG", hex(got))
