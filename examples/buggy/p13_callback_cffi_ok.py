import gc
import os
import cffi

# cffi ABI mode: an ffi.callback is collected while C keeps it in a static variable and calls it later.
ffi = cffi.FFI()
ffi.cdef("typedef int (*cb_t)(int); void cb_set(cb_t cb); int cb_fire(int x);")
lib = ffi.dlopen(os.path.join(os.path.dirname(os.path.abspath(__file__)), "libkeep.so"))


_callbacks = []


def install(factor):
    cb = ffi.callback("int(int)", lambda x: x * factor)
    _callbacks.append(cb)            # FIX: keep it alive while C may call it
    lib.cb_set(cb)


install(5)
gc.collect()
others = [ffi.callback("int(int)", lambda x: -x) for _ in range(20)]
got = lib.cb_fire(7)
print("cb_fire(7) =", got)
print("CORRECT" if got == 35 else "WRONG")
