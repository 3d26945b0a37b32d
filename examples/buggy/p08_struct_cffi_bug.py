import os
import cffi

# cffi ABI mode: a struct's char* field points at an ffi.new made inside a helper.
ffi = cffi.FFI()
ffi.cdef("struct opts { const char *name; int level; };"
         "int opts_describe(const struct opts *o, char *out, size_t cap);")
lib = ffi.dlopen(os.path.join(os.path.dirname(os.path.abspath(__file__)), "libkeep.so"))


def make_opts(name, level):
    o = ffi.new("struct opts *")
    o.name = ffi.new("char[]", name.encode())   # BUG: this char[] is freed as soon as it is stored
    o.level = level
    return o


opts = [make_opts("compressor-%d" % i, i) for i in range(3)]
junk = [ffi.new("char[]", b"?" * 13) for _ in range(3000)]
out = ffi.new("char[]", 100)
got = []
for o in opts:
    lib.opts_describe(o, out, 100)
    got.append(ffi.string(out).decode(errors="replace"))
print(got)
print("CORRECT" if got == ["name=compressor-%d level=%d" % (i, i) for i in range(3)] else "WRONG")
