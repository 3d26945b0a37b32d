"""zlib through cffi (ABI mode), checked by ptrbridge: the classic next_in bug and two fixes.

zlib keeps ``z_stream.next_in`` pointing into the caller's input after
``deflate()`` returns whenever it could not consume all of it (its output
buffer filled up first): the rest is read by the *next* call.  If the input is
a temporary Python object, C now holds a pointer into memory that Python may
free or reuse before then: rule R2.  Run it::

    PTRBRIDGE_CHECK=2 python examples/zlib_stream.py

The z_stream is allocated in C memory with ``ptrbridge.cnew`` and zlib's own
allocations go through the tracked allocator, so at check level 2 ptrbridge
scans them and reports the pointer zlib kept.
"""
from __future__ import annotations

import zlib as py_zlib  # only to verify the output
from typing import Callable, List

import cffi

import ptrbridge

ffi = cffi.FFI()
ffi.cdef("""
    typedef struct z_stream_s {
        const unsigned char *next_in;
        unsigned int avail_in;
        unsigned long total_in;
        unsigned char *next_out;
        unsigned int avail_out;
        unsigned long total_out;
        const char *msg;
        void *state;
        void *(*zalloc)(void *, unsigned int, unsigned int);
        void (*zfree)(void *, void *);
        void *opaque;
        int data_type;
        unsigned long adler;
        unsigned long reserved;
    } z_stream;
    const char *zlibVersion(void);
    int deflateInit_(z_stream *strm, int level, const char *version, int stream_size);
    int deflate(z_stream *strm, int flush);
    int deflateEnd(z_stream *strm);
    const char *zError(int err);
""")
Z_NO_FLUSH, Z_FINISH, Z_OK, Z_STREAM_END, Z_BUF_ERROR = 0, 4, 0, 1, -5

_raw = ffi.dlopen("libz.so.1")
zlib = ptrbridge.wrap(
    _raw,
    errcheck={"deflateInit_": "nonzero", "deflate": lambda rc: rc < 0 and rc != Z_BUF_ERROR},
    error_message=lambda code: _raw.zError(code),
)

OUT_CHUNK = 1 << 12


class Deflater:
    """A streaming compressor whose z_stream and zlib state live in tracked C memory."""

    def __init__(self, level: int = 6) -> None:
        self.stream = ptrbridge.cnew("z_stream *", ffi=ffi)
        ptrbridge.c_allocator().use_for_zlib(self.stream.c)
        zlib.deflateInit_(self.stream.c, level, _raw.zlibVersion(), ffi.sizeof("z_stream"))
        self.out = ptrbridge.CBuffer(OUT_CHUNK)
        self.pieces: List[bytes] = []

    def _step(self, flush: int) -> int:
        """One deflate() call with one output chunk; input it could not take stays pending."""
        zs = self.stream.c
        zs.next_out = ffi.cast("unsigned char *", self.out.ptr)
        zs.avail_out = OUT_CHUNK
        rc = zlib.deflate(zs, flush)
        self.pieces.append(ffi.buffer(self.out.ptr, OUT_CHUNK - zs.avail_out)[:])
        return int(rc)

    def _drain(self, flush: int) -> int:
        while True:
            rc = self._step(flush)
            if (self.stream.c.avail_out != 0 and flush != Z_FINISH) or rc == Z_STREAM_END:
                return rc

    def feed_buggy(self, chunk: bytes) -> None:
        """BUG: one deflate() step; zlib keeps next_in pointing into `chunk` (R2).

        The caller's `chunk` may be gone by the next call, which reads the rest.
        """
        self.stream.c.next_in = ffi.from_buffer(chunk)
        self.stream.c.avail_in = len(chunk)
        self._step(Z_NO_FLUSH)

    def feed_copied(self, chunk: bytes) -> None:
        """Fixed: the input is copied to C memory that lives as long as zlib may read it."""
        self._input = ptrbridge.CBuffer.copy(chunk)
        self.stream.c.next_in = ffi.cast("unsigned char *", self._input.ptr)
        self.stream.c.avail_in = len(chunk)
        self._drain(Z_NO_FLUSH)

    def feed_pinned(self, chunk: bytes, pinner: ptrbridge.Pinner) -> None:
        """Fixed: the input stays pinned for the stream's whole life (pinner outlives it)."""
        self.stream.c.next_in = ffi.cast("unsigned char *", pinner.pin(chunk))
        self.stream.c.avail_in = len(chunk)
        self._drain(Z_NO_FLUSH)

    def finish(self) -> bytes:
        """Flush, end the stream, free its C memory and return the compressed bytes."""
        self._drain(Z_FINISH)
        _raw.deflateEnd(self.stream.c)
        self.stream.free()
        self.out.free()
        return b"".join(self.pieces)


def compress(chunks: List[bytes], feed: Callable[[Deflater, bytes], None]) -> bytes:
    """Compress chunks with one of the feed methods."""
    d = Deflater()
    for chunk in chunks:
        feed(d, chunk)
    return d.finish()


def main() -> None:
    import os

    ptrbridge.set_scan_batch(1)  # report at the call that lent the memory, not a few calls later
    chunks = [os.urandom(1 << 18) for _ in range(4)]  # incompressible: zlib cannot take it all at once
    with ptrbridge.Pinner() as pinner:
        good = compress(chunks, lambda d, c: d.feed_pinned(c, pinner))
    assert py_zlib.decompress(good) == b"".join(chunks)
    print("pinned input: clean,", len(good), "bytes")
    good = compress(chunks, Deflater.feed_copied)
    print("copied input: clean,", len(good), "bytes")
    d = Deflater()
    try:
        d.feed_buggy(bytes(chunks[0]))  # a temporary: freed as soon as feed_buggy returns
        print("temporary input: not detected (run with PTRBRIDGE_CHECK=2)")
    except ptrbridge.RetainedPointerError as exc:
        print("temporary input:", exc)
    finally:
        d.stream.c.next_in, d.stream.c.avail_in = ffi.NULL, 0  # zlib must not read the freed input
        d.finish()


if __name__ == "__main__":
    main()
