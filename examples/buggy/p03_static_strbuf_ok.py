import ctypes
import os

# ctypes: a create_string_buffer made in a helper is kept by C (static variable) after it dies.
lib = ctypes.CDLL(os.path.join(os.path.dirname(os.path.abspath(__file__)), "libkeep.so"))
lib.keep_set.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
lib.keep_copy.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
lib.keep_copy.restype = ctypes.c_size_t


_prefix_buf = None


def set_prefix(text):
    global _prefix_buf
    _prefix_buf = ctypes.create_string_buffer(text.encode())   # FIX: a global keeps it alive
    lib.keep_set(_prefix_buf, len(text))


set_prefix("[app] " * 40)
junk = [ctypes.create_string_buffer(b"#" * 240) for _ in range(200)]
out = ctypes.create_string_buffer(400)
n = lib.keep_copy(out, 400)
got = out.raw[:n]
print("prefix starts:", got[:24])
print("CORRECT" if got == ("[app] " * 40).encode() else "WRONG")
