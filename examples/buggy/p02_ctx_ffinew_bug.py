import os
import cffi

# cffi ABI mode: a malloc'd C context keeps a pointer to an ffi.new buffer made in a helper.
ffi = cffi.FFI()
ffi.cdef("""struct ctx; struct ctx *ctx_new(int id);
void ctx_set_key(struct ctx *c, const char *key, size_t n);
unsigned long ctx_hash(const struct ctx *c); void ctx_free(struct ctx *c);""")
lib = ffi.dlopen(os.path.join(os.path.dirname(os.path.abspath(__file__)), "libkeep.so"))


def fnv(b):
    h = 1469598103934665603
    for c in b:
        h = ((h ^ c) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h


def make_ctx(key):
    c = lib.ctx_new(1)
    k = ffi.new("char[]", key)
    lib.ctx_set_key(c, k, len(key))  # BUG: k is freed when make_ctx() returns; the ctx keeps it
    return c


key = b"secret-key-0123456789/" * 4
c = make_ctx(key)
junk = [ffi.new("char[]", b"Z" * len(key)) for _ in range(100)]
h = lib.ctx_hash(c)
print(hex(h), "CORRECT" if h == fnv(key) else "WRONG")
lib.ctx_free(c)
