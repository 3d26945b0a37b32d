"""Route real libraries' allocations through the tracked allocator.

A library that takes allocation functions can allocate from ptrbridge's
tracked allocator instead of malloc: its memory is then counted by
:func:`ptrbridge.stats` and scanned at check level 2, so a pointer the library
keeps to Python memory is found.  Example for zlib::

    zs = ptrbridge.cnew("z_stream *", ffi=zffi)     # the z_stream itself in C memory
    ptrbridge.c_allocator().use_for_zlib(zs.c)      # zalloc/zfree -> tracked allocator
    zlib.deflateInit_(zs.c, 6, zlib.zlibVersion(), zffi.sizeof("z_stream"))

sqlite3 (before ``sqlite3_initialize``, i.e. before the first connection in
the process; Python's own ``sqlite3`` module may already have done that)::

    sq.sqlite3_config(SQLITE_CONFIG_MALLOC, ffi.cast("void *", ptrbridge.c_allocator().sqlite3_mem_methods))

zstd::

    cctx = zstd.ZSTD_createCCtx_advanced(ptrbridge.c_allocator().zstd_custom_mem(zffi))
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._bindings import ffi, lib

__all__ = ["CAllocator", "c_allocator"]


@dataclass(frozen=True)
class CAllocator:
    """C function pointers of the tracked allocator and ready-made adapters."""

    malloc: Any
    """``void *(*)(size_t)``"""
    calloc: Any
    """``void *(*)(size_t, size_t)``"""
    realloc: Any
    """``void *(*)(void *, size_t)``"""
    free: Any
    """``int (*)(void *)`` (returns a status; ignore it where ``void`` is expected)"""
    zlib_alloc: Any
    """zlib ``alloc_func``: ``void *(*)(void *, unsigned int, unsigned int)``"""
    zlib_free: Any
    """zlib ``free_func``: ``void (*)(void *, void *)``"""
    zstd_alloc: Any
    """zstd ``ZSTD_allocFunction``: ``void *(*)(void *, size_t)``"""
    zstd_free: Any
    """zstd ``ZSTD_freeFunction``: ``void (*)(void *, void *)``"""
    sqlite3_mem_methods: Any
    """pointer to a ``sqlite3_mem_methods``-compatible table (static storage)"""

    def use_for_zlib(self, stream: Any) -> None:
        """Set a ``z_stream *``'s ``zalloc``/``zfree`` (before ``deflateInit``/``inflateInit``)."""
        stream.zalloc = self.zlib_alloc
        stream.zfree = self.zlib_free
        stream.opaque = ffi.NULL

    def zstd_custom_mem(self, zstd_ffi: Any) -> Any:
        """A ``ZSTD_customMem`` value for ``ZSTD_create*_advanced``, made with the zstd ffi."""
        return zstd_ffi.new(
            "ZSTD_customMem *",
            {"customAlloc": self.zstd_alloc, "customFree": self.zstd_free, "opaque": ffi.NULL},
        )[0]


_ALLOCATOR = CAllocator(
    malloc=ffi.addressof(lib, "pb_malloc"),
    calloc=ffi.addressof(lib, "pb_calloc"),
    realloc=ffi.addressof(lib, "pb_realloc"),
    free=ffi.addressof(lib, "pb_free"),
    zlib_alloc=ffi.addressof(lib, "pb_zlib_alloc"),
    zlib_free=ffi.addressof(lib, "pb_zlib_free"),
    zstd_alloc=ffi.addressof(lib, "pb_zstd_alloc"),
    zstd_free=ffi.addressof(lib, "pb_zstd_free"),
    sqlite3_mem_methods=lib.pb_sqlite3_mem_methods(),
)


def c_allocator() -> CAllocator:
    """The tracked allocator as C function pointers, with adapters for zlib, zstd and sqlite3."""
    return _ALLOCATOR
