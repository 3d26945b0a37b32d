import ctypes
import gc
import os

# ctypes: a CFUNCTYPE callback is garbage collected while C still holds it and calls it later.
lib = ctypes.CDLL(os.path.join(os.path.dirname(os.path.abspath(__file__)), "libkeep.so"))
CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)
lib.cb_set.argtypes = [CB]
lib.cb_fire.argtypes = [ctypes.c_int]


_callbacks = []


def install(factor):
    cb = CB(lambda x: x * factor)
    _callbacks.append(cb)                    # FIX: keep the callback alive while C may call it
    lib.cb_set(cb)


install(3)
gc.collect()
others = [CB(lambda x: -x) for _ in range(20)]   # later callbacks may reuse the freed trampoline
got = lib.cb_fire(14)
print("cb_fire(14) =", got)
print("CORRECT" if got == 42 else "WRONG")
