"""Routing real libraries' allocations through the tracked allocator (ptrbridge.c_allocator()).

Each adapter is called directly and through the library it is made for
(zlib, zstd, sqlite3 - real shared libraries in cffi ABI mode): the library
still works, and every block it takes shows in ``ptrbridge.stats()`` until it
gives it back.
"""
from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import textwrap
import zlib as py_zlib
from pathlib import Path
from typing import Any, Tuple

import cffi
import pytest

import ptrbridge
from ptrbridge._bindings import ffi


def _counts() -> Tuple[int, int]:
    s = ptrbridge.stats()
    return s.live_blocks, s.live_bytes


def test_c_allocator_is_one_table_of_c_function_pointers() -> None:
    alloc = ptrbridge.c_allocator()
    assert alloc is ptrbridge.c_allocator() and isinstance(alloc, ptrbridge.CAllocator)
    for name in ("malloc", "calloc", "realloc", "free", "zlib_alloc", "zlib_free", "zstd_alloc", "zstd_free"):
        assert ffi.typeof(getattr(alloc, name)).kind == "function", name
    with pytest.raises(AttributeError):
        alloc.malloc = None  # type: ignore[misc]


def test_malloc_calloc_realloc_free_count_into_stats() -> None:
    alloc = ptrbridge.c_allocator()
    blocks, size = _counts()
    before = ptrbridge.stats()
    p = alloc.malloc(24)
    assert _counts() == (blocks + 1, size + 24)
    p = alloc.realloc(p, 100)
    assert _counts() == (blocks + 1, size + 100)
    q = alloc.calloc(3, 8)
    assert ffi.buffer(q, 24)[:] == bytes(24) and _counts() == (blocks + 2, size + 124)
    assert alloc.free(p) == 0 and alloc.free(q) == 0
    after = ptrbridge.stats()
    assert _counts() == (blocks, size)
    assert after.allocations - before.allocations >= 2 and after.peak_bytes >= size + 124


def test_zlib_adapter_functions() -> None:
    alloc = ptrbridge.c_allocator()
    blocks, size = _counts()
    z = alloc.zlib_alloc(ffi.NULL, 3, 8)
    assert ffi.buffer(z, 24)[:] == bytes(24)  # zeroed, as zlib's default zcalloc
    assert _counts() == (blocks + 1, size + 24)
    alloc.zlib_free(ffi.NULL, z)
    assert _counts() == (blocks, size)
    alloc.zlib_free(ffi.NULL, ffi.NULL)  # like free(NULL): nothing


ZLIB_CDEF = """
    typedef struct z_stream_s {
        const unsigned char *next_in; unsigned int avail_in; unsigned long total_in;
        unsigned char *next_out; unsigned int avail_out; unsigned long total_out;
        const char *msg; void *state;
        void *(*zalloc)(void *, unsigned int, unsigned int); void (*zfree)(void *, void *);
        void *opaque; int data_type; unsigned long adler; unsigned long reserved;
    } z_stream;
    const char *zlibVersion(void);
    int deflateInit_(z_stream *strm, int level, const char *version, int stream_size);
    int deflate(z_stream *strm, int flush);
    int deflateEnd(z_stream *strm);
    int inflateInit_(z_stream *strm, const char *version, int stream_size);
    int inflate(z_stream *strm, int flush);
    int inflateEnd(z_stream *strm);
"""


@pytest.fixture(scope="module")
def zlib_abi() -> Tuple[Any, Any]:
    zffi = cffi.FFI()
    zffi.cdef(ZLIB_CDEF)
    return zffi, zffi.dlopen("libz.so.1")


def test_zlib_compresses_with_tracked_memory(zlib_abi: Tuple[Any, Any]) -> None:
    zffi, z = zlib_abi
    data = os.urandom(1 << 15) + b"ptrbridge " * 10_000
    before = ptrbridge.stats()
    stream = zffi.new("z_stream *")
    ptrbridge.c_allocator().use_for_zlib(stream)
    assert stream.opaque == zffi.NULL
    assert z.deflateInit_(stream, 6, z.zlibVersion(), zffi.sizeof("z_stream")) == 0
    during = ptrbridge.stats()
    assert during.live_blocks - before.live_blocks >= 4  # state, window, prev, head, pending_buf
    assert during.live_bytes - before.live_bytes > 256 << 10
    out = zffi.new("unsigned char[]", len(data) + 1024)
    stream.next_in, stream.avail_in = zffi.from_buffer(data), len(data)
    stream.next_out, stream.avail_out = out, len(out)
    assert z.deflate(stream, 4) == 1  # Z_FINISH -> Z_STREAM_END
    compressed = zffi.buffer(out, stream.total_out)[:]
    assert z.deflateEnd(stream) == 0
    after = ptrbridge.stats()
    assert (after.live_blocks, after.live_bytes) == (before.live_blocks, before.live_bytes)
    assert after.frees - before.frees == during.allocations - before.allocations  # each block given back
    assert py_zlib.decompress(compressed) == data

    inflater = zffi.new("z_stream *")
    ptrbridge.c_allocator().use_for_zlib(inflater)
    assert z.inflateInit_(inflater, z.zlibVersion(), zffi.sizeof("z_stream")) == 0
    back = zffi.new("unsigned char[]", len(data))
    inflater.next_in, inflater.avail_in = zffi.from_buffer(compressed), len(compressed)
    inflater.next_out, inflater.avail_out = back, len(back)
    assert z.inflate(inflater, 4) == 1
    assert ptrbridge.stats().live_blocks > before.live_blocks  # inflate's state and window
    assert z.inflateEnd(inflater) == 0
    assert zffi.buffer(back)[:] == data
    assert _counts() == (before.live_blocks, before.live_bytes)


def test_zstd_adapter_functions() -> None:
    alloc = ptrbridge.c_allocator()
    blocks, size = _counts()
    p = alloc.zstd_alloc(ffi.NULL, 1000)
    assert p != ffi.NULL and _counts() == (blocks + 1, size + 1000)
    alloc.zstd_free(ffi.NULL, p)
    assert _counts() == (blocks, size)


ZSTD_CDEF = """
    typedef void *(*ZSTD_allocFunction)(void *opaque, size_t size);
    typedef void (*ZSTD_freeFunction)(void *opaque, void *address);
    typedef struct { ZSTD_allocFunction customAlloc; ZSTD_freeFunction customFree; void *opaque; } ZSTD_customMem;
    typedef struct ZSTD_CCtx_s ZSTD_CCtx;
    typedef struct ZSTD_DCtx_s ZSTD_DCtx;
    ZSTD_CCtx *ZSTD_createCCtx_advanced(ZSTD_customMem customMem);
    size_t ZSTD_freeCCtx(ZSTD_CCtx *cctx);
    ZSTD_DCtx *ZSTD_createDCtx_advanced(ZSTD_customMem customMem);
    size_t ZSTD_freeDCtx(ZSTD_DCtx *dctx);
    size_t ZSTD_compressCCtx(ZSTD_CCtx *, void *dst, size_t cap, const void *src, size_t n, int level);
    size_t ZSTD_decompressDCtx(ZSTD_DCtx *, void *dst, size_t cap, const void *src, size_t n);
    size_t ZSTD_compressBound(size_t n);
    unsigned long long ZSTD_getFrameContentSize(const void *src, size_t n);
    unsigned ZSTD_isError(size_t code);
    const char *ZSTD_getErrorName(size_t code);
"""


@pytest.fixture(scope="module")
def zstd_abi() -> Tuple[Any, Any]:
    zffi = cffi.FFI()
    zffi.cdef(ZSTD_CDEF)
    return zffi, zffi.dlopen("libzstd.so.1")


def test_zstd_custom_mem_is_the_tracked_allocator(zstd_abi: Tuple[Any, Any]) -> None:
    zffi, _ = zstd_abi
    mem = ptrbridge.c_allocator().zstd_custom_mem(zffi)
    assert zffi.typeof(mem) is zffi.typeof("ZSTD_customMem") and mem.opaque == zffi.NULL
    blocks, size = _counts()
    p = mem.customAlloc(mem.opaque, 64)
    assert _counts() == (blocks + 1, size + 64)
    mem.customFree(mem.opaque, p)
    assert _counts() == (blocks, size)


def test_zstd_compresses_with_tracked_memory(zstd_abi: Tuple[Any, Any]) -> None:
    zffi, zstd = zstd_abi
    data = b"ptrbridge " * 10_000 + os.urandom(4096)
    before = ptrbridge.stats()
    cctx = zstd.ZSTD_createCCtx_advanced(ptrbridge.c_allocator().zstd_custom_mem(zffi))
    dctx = zstd.ZSTD_createDCtx_advanced(ptrbridge.c_allocator().zstd_custom_mem(zffi))
    assert cctx != zffi.NULL and dctx != zffi.NULL
    try:
        out = zffi.new("char[]", zstd.ZSTD_compressBound(len(data)))
        n = zstd.ZSTD_compressCCtx(cctx, out, len(out), data, len(data), 3)
        assert not zstd.ZSTD_isError(n), zffi.string(zstd.ZSTD_getErrorName(n))
        assert n < len(data) // 4 and zstd.ZSTD_getFrameContentSize(out, n) == len(data)
        during = ptrbridge.stats()
        assert during.live_blocks > before.live_blocks  # the contexts and their workspaces
        assert during.live_bytes - before.live_bytes > 64 << 10
        back = zffi.new("char[]", len(data))
        m = zstd.ZSTD_decompressDCtx(dctx, back, len(back), out, n)
        assert not zstd.ZSTD_isError(m) and zffi.buffer(back, m)[:] == data
    finally:
        zstd.ZSTD_freeCCtx(cctx)
        zstd.ZSTD_freeDCtx(dctx)
    after = ptrbridge.stats()
    assert (after.live_blocks, after.live_bytes) == (before.live_blocks, before.live_bytes)
    assert after.allocations > before.allocations and after.frees - before.frees == (
        after.allocations - before.allocations)


def test_sqlite3_mem_methods_table() -> None:
    m = ptrbridge.c_allocator().sqlite3_mem_methods
    blocks, size = _counts()
    p = m.xMalloc(10)
    assert m.xSize(p) == 10 and _counts() == (blocks + 1, size + 10)
    assert [m.xRoundup(n) for n in (1, 8, 9, 16)] == [8, 8, 16, 16]
    p = m.xRealloc(p, 100)
    assert m.xSize(p) == 100 and _counts() == (blocks + 1, size + 100)
    assert m.xRealloc(p, 0) == ffi.NULL and m.xSize(p) == 100  # a harmless no-op: p stays valid
    assert m.xMalloc(0) == ffi.NULL and m.xMalloc(-1) == ffi.NULL
    assert m.xSize(ffi.NULL) == 0
    assert m.xInit(m.pAppData) == 0
    m.xShutdown(m.pAppData)
    m.xFree(p)
    assert _counts() == (blocks, size)


SQLITE_PROGRAM = """
    import json, sys
    import cffi
    import ptrbridge
    ffi = cffi.FFI()
    ffi.cdef('''
        typedef struct sqlite3 sqlite3;
        int sqlite3_config(int, ...);
        int sqlite3_open(const char *, sqlite3 **);
        int sqlite3_exec(sqlite3 *, const char *sql, void *, void *, char **err);
        int sqlite3_close(sqlite3 *);
        int sqlite3_shutdown(void);
        long long sqlite3_memory_used(void);
    ''')
    sq = ffi.dlopen("libsqlite3.so.0")
    out = {"sqlite3_module_loaded": "sqlite3" in sys.modules}
    base = ptrbridge.stats()
    out["config"] = sq.sqlite3_config(4, ffi.cast("void *", ptrbridge.c_allocator().sqlite3_mem_methods))
    db = ffi.new("sqlite3 **")
    assert sq.sqlite3_open(b":memory:", db) == 0
    opened = ptrbridge.stats()
    sql = b"create table t(x); insert into t select randomblob(1000) from (select 1 union select 2 union select 3);"
    assert sq.sqlite3_exec(db[0], sql, ffi.NULL, ffi.NULL, ffi.NULL) == 0
    used = ptrbridge.stats()
    out["blocks_after_open"] = opened.live_blocks - base.live_blocks
    out["bytes_after_insert"] = used.live_bytes - base.live_bytes
    out["sqlite_memory_used"] = sq.sqlite3_memory_used()
    assert sq.sqlite3_close(db[0]) == 0
    assert sq.sqlite3_shutdown() == 0
    end = ptrbridge.stats()
    out["blocks_after_shutdown"] = end.live_blocks - base.live_blocks
    out["allocations"] = end.allocations - base.allocations
    out["frees"] = end.frees - base.frees
    print(json.dumps(out))
"""


def test_sqlite_allocations_are_tracked_in_a_fresh_process(tmp_path: Path) -> None:
    """sqlite3_config(SQLITE_CONFIG_MALLOC) works only before sqlite initialises: a new process."""
    script = tmp_path / "sqlite_alloc.py"
    script.write_text(textwrap.dedent(SQLITE_PROGRAM))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PTRBRIDGE_CHECK="1"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["sqlite3_module_loaded"] is False and out["config"] == 0
    assert out["blocks_after_open"] > 10
    assert out["bytes_after_insert"] >= out["sqlite_memory_used"] > 3000  # every byte sqlite uses is ours
    assert out["blocks_after_shutdown"] == 0 and out["allocations"] == out["frees"] > 0


def test_bad_free_through_an_adapter_is_refused(capfd: pytest.CaptureFixture[str]) -> None:
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    foreign = libc.malloc(32)
    assert foreign
    alloc = ptrbridge.c_allocator()
    before = ptrbridge.stats()
    try:
        alloc.zlib_free(ffi.NULL, ffi.cast("void *", foreign))  # zlib handed a block it did not get from us
        alloc.zstd_free(ffi.NULL, ffi.cast("void *", foreign))
        alloc.sqlite3_mem_methods.xFree(ffi.cast("void *", foreign))
        assert alloc.free(ffi.cast("void *", foreign)) == -3  # PB_ERR_NOT_OWNED
    finally:
        libc.free(foreign)  # still ours to free: nothing was freed above
    err = capfd.readouterr().err
    assert err.count(f"{foreign:#x} was not allocated by the ptrbridge allocator; nothing was freed") == 4, err
    assert ptrbridge.stats().frees == before.frees
