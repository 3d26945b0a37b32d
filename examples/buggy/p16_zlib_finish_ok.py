import zlib as pyzlib  # only to check the result
import cffi

# cffi ABI mode + libz, CORRECT: next_in is left pointing at a freed bytes, but avail_in is 0,
# so zlib never reads it again (the way zlib is normally driven).
ffi = cffi.FFI()
ffi.cdef("""typedef struct { unsigned char *next_in; unsigned avail_in; unsigned long total_in;
  unsigned char *next_out; unsigned avail_out; unsigned long total_out; char *msg; void *state;
  void *zalloc, *zfree, *opaque; int data_type; unsigned long adler, reserved; } z_stream;
const char *zlibVersion(void); int deflateInit_(z_stream *s, int level, const char *v, int size);
int deflate(z_stream *s, int flush); int deflateEnd(z_stream *s);""")
z = ffi.dlopen("libz.so.1")
s = ffi.new("z_stream *")
assert z.deflateInit_(s, 6, z.zlibVersion(), ffi.sizeof("z_stream")) == 0
out = ffi.new("unsigned char[]", 4096)
s.next_out, s.avail_out = out, 4096


def feed(text):
    data = (text * 20).encode()                  # a temporary bytes of 400 bytes
    s.next_in, s.avail_in = ffi.from_buffer(data), len(data)
    assert z.deflate(s, 0) == 0 and s.avail_in == 0   # zlib took all of it


feed("0123456789abcdefghij")
rc = z.deflate(s, 4)                             # Z_FINISH: avail_in is 0, next_in is not read
comp = ffi.buffer(out, 4096 - s.avail_out)[:]
z.deflateEnd(s)
print("rc", rc, "CORRECT" if rc == 1 and pyzlib.decompress(comp) == b"0123456789abcdefghij" * 20 else "WRONG")
