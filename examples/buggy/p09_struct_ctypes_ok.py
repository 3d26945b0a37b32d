import ctypes
import os

# ctypes: a Structure's c_char_p field holds the address of a create_string_buffer made in a helper.
lib = ctypes.CDLL(os.path.join(os.path.dirname(os.path.abspath(__file__)), "libkeep.so"))


class Opts(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("level", ctypes.c_int)]


lib.opts_describe.argtypes = [ctypes.POINTER(Opts), ctypes.c_char_p, ctypes.c_size_t]


def make_opts(name, level):
    buf = ctypes.create_string_buffer(name.encode())
    o = Opts(ctypes.addressof(buf), level)
    o._name_buf = buf                           # FIX: the struct keeps its string alive
    return o


opts = [make_opts("decoder-%d" % i, i) for i in range(3)]
junk = [ctypes.create_string_buffer(b"?" * 9) for _ in range(50)]
out = ctypes.create_string_buffer(100)
got = []
for o in opts:
    lib.opts_describe(ctypes.byref(o), out, 100)
    got.append(out.value.decode(errors="replace"))
print(got)
print("CORRECT" if got == ["name=decoder-%d level=%d" % (i, i) for i in range(3)] else "WRONG")
