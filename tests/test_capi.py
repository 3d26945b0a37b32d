"""The public C API: pb_* by name after `import ptrbridge`, and the pb_api table."""
from __future__ import annotations

import ctypes
from pathlib import Path

import cffi

import ptrbridge
from ptrbridge._bindings import ffi, lib


def test_symbols_are_global_for_libraries_loaded_later(uses_pb_lib: Path) -> None:
    c = ctypes.CDLL(str(uses_pb_lib))  # its pb_* references resolve from ptrbridge
    c.by_name_roundtrip.argtypes = [ctypes.c_size_t]
    base = ptrbridge.stats()
    assert c.by_name_roundtrip(100) == 0
    now = ptrbridge.stats()
    assert now.allocations == base.allocations + 1 and now.frees == base.frees + 1


def test_memory_allocated_in_c_shows_in_stats(uses_pb_lib: Path) -> None:
    c = ctypes.CDLL(str(uses_pb_lib))
    c.by_name_alloc.restype = ctypes.c_void_p
    c.by_name_alloc.argtypes = [ctypes.c_size_t]
    base = ptrbridge.stats()
    block = c.by_name_alloc(48)
    assert ptrbridge.stats().live_bytes == base.live_bytes + 48
    ptrbridge.free(block)
    assert ptrbridge.stats().live_bytes == base.live_bytes


def test_dlopen_none_finds_the_symbols() -> None:
    other = cffi.FFI()
    other.cdef("int pb_api_version(void); const char *pb_strerror(int);")
    c = other.dlopen(None)
    assert c.pb_api_version() == 1
    assert other.string(c.pb_strerror(-5)).startswith(b"misuse of an invalid handle")


def test_c_api_table(uses_pb_lib: Path) -> None:
    api = ptrbridge.c_api()
    assert ffi.typeof(api) is ffi.typeof("const struct pb_api *")
    assert api.version == lib.pb_api_version() == 1
    block = api.malloc(16)
    assert api.alloc_size(block) == 16
    assert api.free(block) == lib.PB_OK
    assert api.free(block) == lib.PB_ERR_DOUBLE_FREE
    c = ctypes.CDLL(str(uses_pb_lib))
    c.by_table_roundtrip.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    assert c.by_table_roundtrip(int(ffi.cast("uintptr_t", api)), 64) == 0
    assert c.by_table_roundtrip(None, 64) == -100


def test_release_from_c_both_ways(uses_pb_lib: Path) -> None:
    c = ctypes.CDLL(str(uses_pb_lib))
    c.by_name_release.argtypes = [ctypes.c_size_t]
    c.by_table_release.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    api = int(ffi.cast("uintptr_t", ptrbridge.c_api()))
    first, second = ptrbridge.Handle("a"), ptrbridge.Handle("b")
    assert c.by_name_release(int(first)) == lib.PB_OK
    assert c.by_table_release(api, int(second)) == lib.PB_OK
    assert c.by_name_release(int(first)) == lib.PB_ERR_INVALID_HANDLE
    assert not first.is_valid() and not second.is_valid()
    ptrbridge.collect()


def test_status_strings() -> None:
    for status in (0, -1, -2, -3, -4, -5, -6, 12345):
        assert ffi.string(lib.pb_strerror(status))
    assert ffi.string(lib.pb_strerror(12345)) == b"unknown ptrbridge status"


def test_native_library_path() -> None:
    path = Path(ptrbridge.native_library_path())
    assert path.exists() and path.name.startswith("_native")
