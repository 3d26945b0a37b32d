import ctypes

# ctypes: C writes into a bytes "buffer".  CPython folds b"\0" * 16 into one constant of the
# function, so every call gets the same bytes object, already changed by the previous call.
libc = ctypes.CDLL(None)
libc.memmove.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t]


def label(text):
    buf = b"\0" * 16                      # BUG: a bytes is immutable; C must not write into it
    libc.memmove(buf, text, len(text))
    return buf.rstrip(b"\0")


first, second = label(b"hello"), label(b"hi")
print("labels:", first, second)
print("CORRECT" if (first, second) == (b"hello", b"hi") else "WRONG")
