"""Routing real libraries' allocations through the tracked allocator."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import cffi
import pytest

import ptrbridge
from ptrbridge._bindings import ffi


def test_function_pointers() -> None:
    alloc = ptrbridge.c_allocator()
    assert alloc is ptrbridge.c_allocator()
    block = alloc.malloc(24)
    assert ptrbridge.stats().live_bytes >= 24
    assert alloc.free(block) == 0
    z = alloc.zlib_alloc(ffi.NULL, 3, 8)
    assert ffi.buffer(z, 24)[:] == bytes(24)  # zlib's zalloc: zeroed
    alloc.zlib_free(ffi.NULL, z)
    m = alloc.sqlite3_mem_methods
    p = m.xMalloc(10)
    assert m.xSize(p) == 10 and m.xRoundup(9) == 16
    p = m.xRealloc(p, 100)
    assert m.xSize(p) == 100
    m.xFree(p)


def test_zlib_state_is_tracked() -> None:
    zffi = cffi.FFI()
    zffi.cdef("""
        typedef struct { const unsigned char *next_in; unsigned int avail_in; unsigned long total_in;
            unsigned char *next_out; unsigned int avail_out; unsigned long total_out; const char *msg;
            void *state; void *(*zalloc)(void *, unsigned int, unsigned int); void (*zfree)(void *, void *);
            void *opaque; int data_type; unsigned long adler; unsigned long reserved; } z_stream;
        const char *zlibVersion(void);
        int deflateInit_(z_stream *strm, int level, const char *version, int stream_size);
        int deflateEnd(z_stream *strm);
    """)
    z = zffi.dlopen("libz.so.1")
    base = ptrbridge.stats()
    stream = zffi.new("z_stream *")
    ptrbridge.c_allocator().use_for_zlib(stream)
    assert z.deflateInit_(stream, 6, z.zlibVersion(), zffi.sizeof("z_stream")) == 0
    during = ptrbridge.stats()
    assert during.live_blocks > base.live_blocks and during.live_bytes - base.live_bytes > 100_000
    z.deflateEnd(stream)
    assert ptrbridge.stats().live_blocks == base.live_blocks


def test_zstd_custom_mem_compresses_with_tracked_memory() -> None:
    zffi = cffi.FFI()
    zffi.cdef("""
        typedef struct { void *(*customAlloc)(void *, size_t); void (*customFree)(void *, void *); void *opaque; } ZSTD_customMem;
        typedef struct ZSTD_CCtx_s ZSTD_CCtx;
        ZSTD_CCtx *ZSTD_createCCtx_advanced(ZSTD_customMem customMem);
        size_t ZSTD_freeCCtx(ZSTD_CCtx *cctx);
        size_t ZSTD_compressCCtx(ZSTD_CCtx *, void *dst, size_t cap, const void *src, size_t n, int level);
        size_t ZSTD_compressBound(size_t n);
        unsigned long long ZSTD_getFrameContentSize(const void *src, size_t n);
        unsigned ZSTD_isError(size_t code);
    """)
    zstd = zffi.dlopen("libzstd.so.1")
    base = ptrbridge.stats()
    cctx = zstd.ZSTD_createCCtx_advanced(ptrbridge.c_allocator().zstd_custom_mem(zffi))
    assert cctx != zffi.NULL
    data = b"ptrbridge " * 1000
    out = zffi.new("char[]", zstd.ZSTD_compressBound(len(data)))
    n = zstd.ZSTD_compressCCtx(cctx, out, len(out), data, len(data), 3)
    assert not zstd.ZSTD_isError(n) and n < len(data)
    assert zstd.ZSTD_getFrameContentSize(out, n) == len(data)
    assert ptrbridge.stats().live_blocks > base.live_blocks
    zstd.ZSTD_freeCCtx(cctx)
    assert ptrbridge.stats().live_blocks == base.live_blocks


def test_sqlite_memory_is_tracked_in_a_fresh_process(tmp_path: object) -> None:
    code = textwrap.dedent("""
        import cffi, ptrbridge
        ffi = cffi.FFI()
        ffi.cdef("typedef struct sqlite3 sqlite3; int sqlite3_config(int, ...);"
                 "int sqlite3_open(const char *, sqlite3 **); int sqlite3_close(sqlite3 *);")
        sq = ffi.dlopen("libsqlite3.so.0")
        assert sq.sqlite3_config(4, ffi.cast("void *", ptrbridge.c_allocator().sqlite3_mem_methods)) == 0
        base = ptrbridge.stats().live_blocks
        db = ffi.new("sqlite3 **")
        assert sq.sqlite3_open(b":memory:", db) == 0
        print("open", ptrbridge.stats().live_blocks > base)
        sq.sqlite3_close(db[0])
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "open True" in proc.stdout
