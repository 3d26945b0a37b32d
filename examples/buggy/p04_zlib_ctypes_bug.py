import ctypes
import random
import zlib as pyzlib  # only to check the result

# ctypes + libz: z_stream.next_in points at a bytes that is freed before the next deflate() call.
z = ctypes.CDLL("libz.so.1")
P = ctypes.POINTER(ctypes.c_ubyte)
class ZStream(ctypes.Structure):
    _fields_ = [("next_in", P), ("avail_in", ctypes.c_uint), ("total_in", ctypes.c_ulong),
                ("next_out", P), ("avail_out", ctypes.c_uint), ("total_out", ctypes.c_ulong),
                ("msg", ctypes.c_char_p), ("state", ctypes.c_void_p), ("zalloc", ctypes.c_void_p),
                ("zfree", ctypes.c_void_p), ("opaque", ctypes.c_void_p), ("data_type", ctypes.c_int),
                ("adler", ctypes.c_ulong), ("reserved", ctypes.c_ulong)]
z.zlibVersion.restype = ctypes.c_char_p
z.deflateInit_.argtypes = [ctypes.POINTER(ZStream), ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
z.deflate.argtypes = [ctypes.POINTER(ZStream), ctypes.c_int]
z.deflateEnd.argtypes = [ctypes.POINTER(ZStream)]

strm = ZStream()
assert z.deflateInit_(strm, 6, z.zlibVersion(), ctypes.sizeof(ZStream)) == 0
out = ctypes.create_string_buffer(400000)
rnd = random.Random(1)
data = bytes(rnd.getrandbits(8) for _ in range(200000))
expected = pyzlib.crc32(data)
strm.next_in = ctypes.cast(data, P)                  # nothing but `data` keeps the bytes alive
strm.avail_in = len(data)
strm.next_out, strm.avail_out = ctypes.cast(out, P), 64     # a small first output window
z.deflate(strm, 0)                                   # Z_NO_FLUSH: zlib consumes only part of the input
print("left after first deflate:", strm.avail_in)
del data                                             # BUG: freed while zlib still has avail_in bytes to read
junk = [bytes(200000) for _ in range(3)]
strm.avail_out = len(out) - strm.total_out
rc = z.deflate(strm, 4)                              # Z_FINISH reads the rest through next_in
comp = out.raw[:strm.total_out]
z.deflateEnd(strm)
print("rc", rc, "CORRECT" if rc == 1 and pyzlib.crc32(pyzlib.decompress(comp)) == expected else "WRONG")
