import random
import zlib as pyzlib  # only to check the result
import cffi

# cffi ABI mode + libz: compress() assumes one deflate() eats all input; the next call reads the freed bytes.
ffi = cffi.FFI()
ffi.cdef("""typedef struct { unsigned char *next_in; unsigned avail_in; unsigned long total_in;
  unsigned char *next_out; unsigned avail_out; unsigned long total_out; char *msg; void *state;
  void *zalloc, *zfree, *opaque; int data_type; unsigned long adler, reserved; } z_stream;
const char *zlibVersion(void); int deflateInit_(z_stream *s, int level, const char *v, int size);
int deflate(z_stream *s, int flush); int deflateEnd(z_stream *s);""")
z = ffi.dlopen("libz.so.1")


class Compressor:
    def __init__(self):
        self.s = ffi.new("z_stream *")
        assert z.deflateInit_(self.s, 6, z.zlibVersion(), ffi.sizeof("z_stream")) == 0

    def _run(self, flush):
        out = ffi.new("unsigned char[]", 65536)
        self.s.next_out, self.s.avail_out = out, 65536
        rc = z.deflate(self.s, flush)
        return rc, ffi.buffer(out, 65536 - self.s.avail_out)[:]

    def compress(self, data):
        self.s.next_in, self.s.avail_in = ffi.from_buffer(data), len(data)
        parts = [self._run(0)[1]]
        while self.s.avail_in:      # FIX: call deflate() until it has taken all the input
            parts.append(self._run(0)[1])
        return b"".join(parts)      # next_in still points at data after this; zlib never reads it

    def flush(self):
        parts, rc = [], 0
        while rc != 1:              # Z_STREAM_END; the loop reads leftover input through next_in
            rc, part = self._run(4)
            parts.append(part)
        return b"".join(parts)


rnd = random.Random(2)
c = Compressor()
block = bytes(rnd.getrandbits(8) for _ in range(100000))   # a fresh bytes
crc = pyzlib.crc32(block)
chunks = [c.compress(block)]
del block                           # the caller is done with its data once compress() returned
junk = [bytes(100000) for _ in range(3)]
chunks.append(c.flush())
z.deflateEnd(c.s)
print("CORRECT" if pyzlib.crc32(pyzlib.decompress(b"".join(chunks))) == crc else "WRONG")
