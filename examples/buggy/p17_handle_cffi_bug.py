import gc
import os
import cffi

# cffi ABI mode: an ffi.new_handle() passed to C as a callback's user data is collected while C
# keeps it; the next callback hands the dead address to ffi.from_handle().
ffi = cffi.FFI()
ffi.cdef("typedef void (*ev_cb)(void *ud, int x); void ev_register(ev_cb cb, void *ud); int ev_fire(int x);")
lib = ffi.dlopen(os.path.join(os.path.dirname(os.path.abspath(__file__)), "libkeep.so"))


class Counter:
    def __init__(self):
        self.total = 0


@ffi.callback("void(void *, int)")
def on_event(userdata, x):
    ffi.from_handle(userdata).total += x


counter = Counter()


def subscribe():
    lib.ev_register(on_event, ffi.new_handle(counter))   # BUG: the handle dies on return


subscribe()
gc.collect()
for i in range(10):
    lib.ev_fire(i)
print("total =", counter.total)
print("CORRECT" if counter.total == 45 else "WRONG")
