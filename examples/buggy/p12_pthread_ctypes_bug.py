import ctypes
import os

# ctypes: a C background thread reads the buffer after the call that lent it returned.
lib = ctypes.CDLL(os.path.join(os.path.dirname(os.path.abspath(__file__)), "libkeep.so"))
lib.bg_start.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
lib.bg_join.restype = ctypes.c_ulong


def checksum(b):
    s = 0
    for c in b:
        s = (s * 31 + c) & 0xFFFFFFFFFFFFFFFF
    return s


def start_job(seed):
    data = bytes((seed * i + 1) & 0xFF for i in range(4096))
    lib.bg_start(data, len(data))       # BUG: the worker reads data at bg_join(); data dies now
    return checksum(data)


expected = start_job(7)
junk = [bytes(4096) for _ in range(20)]
got = lib.bg_join()
print("CORRECT" if got == expected else "WRONG", hex(got))
