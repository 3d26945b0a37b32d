import ctypes
import os

# ctypes: C keeps a pointer into a bytearray (via from_buffer); the bytearray is then extended.
lib = ctypes.CDLL(os.path.join(os.path.dirname(os.path.abspath(__file__)), "libkeep.so"))
lib.keep_set.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
lib.keep_copy.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
lib.keep_copy.restype = ctypes.c_size_t


def share(buf):
    view = (ctypes.c_char * len(buf)).from_buffer(buf)
    lib.keep_set(view, len(buf))             # C keeps the address; view is released on return


frame = bytearray(b"frame-0001:" * 40)
share(frame)
frame += b"frame-0002:" * 5000               # BUG: the bytearray grows and moves; C still points at the old block
junk = [bytearray(b"\x00" * 440) for _ in range(200)]
out = ctypes.create_string_buffer(440)
n = lib.keep_copy(out, 440)
print(out.raw[:22])
print("CORRECT" if out.raw[:n] == b"frame-0001:" * 40 else "WRONG")
