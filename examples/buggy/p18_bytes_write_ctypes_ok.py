import ctypes

# ctypes: C writes into a buffer made for it (create_string_buffer), a new one at each call.
libc = ctypes.CDLL(None)
libc.memmove.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t]


def label(text):
    buf = ctypes.create_string_buffer(16)  # FIX: a mutable buffer C may write into
    libc.memmove(buf, text, len(text))
    return buf.value


first, second = label(b"hello"), label(b"hi")
print("labels:", first, second)
print("CORRECT" if (first, second) == (b"hello", b"hi") else "WRONG")
