import ctypes
import os

# ctypes: C keeps a pointer to a temporary bytes in a static variable and reads it later.
lib = ctypes.CDLL(os.path.join(os.path.dirname(os.path.abspath(__file__)), "libkeep.so"))
lib.keep_set.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
lib.keep_copy.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
lib.keep_copy.restype = ctypes.c_size_t


def register(name):
    msg = ("hello, %s! " % name * 20).encode()
    lib.keep_set(msg, len(msg))      # BUG: C keeps the pointer; msg dies when register() returns


register("world")
junk = [bytes([65 + i % 26]) * 280 for i in range(200)]   # the program goes on allocating
out = ctypes.create_string_buffer(400)
n = lib.keep_copy(out, 400)
got, expected = out.raw[:n], ("hello, world! " * 20).encode()
print("kept text starts:", got[:28])
print("CORRECT" if got == expected else "WRONG")
