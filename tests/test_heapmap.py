"""The level-2 heap map: PyMem hooks that index every Python block."""
from __future__ import annotations

import threading

import cffi
import pytest

import ptrbridge
from ptrbridge import heapmap
from ptrbridge._bindings import ffi


def _address(obj: object) -> int:
    view = ffi.from_buffer(obj)
    try:
        return int(ffi.cast("uintptr_t", view))
    finally:
        ffi.release(view)


def test_level_two_installs_and_leaving_removes() -> None:
    assert not heapmap.installed()
    with ptrbridge.checking(2):
        assert heapmap.installed()
    assert not heapmap.installed()
    assert heapmap.install() is True and heapmap.install() is False
    assert heapmap.uninstall() is True and heapmap.uninstall() is False


def test_interior_pointers_of_new_blocks() -> None:
    with ptrbridge.checking(2):
        small = bytearray(b"x" * 40)
        large = bytearray(200_000)
        import ctypes

        ctypes_buf = (ctypes.c_char * 300)()
        for obj, at in ((small, 39), (large, 150_000), (ctypes_buf, 299)):
            start = _address(obj)
            found = heapmap.lookup(start + at)
            assert found is not None and found[0] <= start and start + at < found[0] + found[1]
        assert heapmap.lookup(8) is None


def test_freed_blocks_are_taken_once_and_not_live() -> None:
    with ptrbridge.checking(2):
        heapmap.take_freed()
        data = bytes(range(200)) * 3
        start = _address(data)
        del data
        freed = heapmap.take_freed()
        assert any(s <= start < s + size for s, size in freed)
        assert heapmap.lookup(start) is None  # held in quarantine, not reused yet
        assert not any(s <= start < s + size for s, size in heapmap.take_freed())


def test_blocks_cross_install_and_uninstall() -> None:
    before = [bytearray(1000) for _ in range(100)]  # allocated without hooks
    with ptrbridge.checking(2):
        during = [bytearray(1000) for _ in range(100)]
        del before  # freed while hooked: handed straight to the allocator
    del during  # allocated hooked, freed unhooked: the same allocator takes them
    assert not heapmap.installed()


def test_threads_allocate_while_switching() -> None:
    stop = threading.Event()
    errors: list = []

    def churn() -> None:
        try:
            while not stop.is_set():
                junk = [bytes(i % 300) for i in range(200)]
                del junk
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=churn) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for _ in range(50):
            with ptrbridge.checking(2):
                pass
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors and not heapmap.installed()


def test_stats() -> None:
    with ptrbridge.checking(2):
        keep = [bytes(100) for _ in range(10)]
        counters = heapmap.stats()
        assert counters["installed"] == 1 and counters["live_blocks"] >= 10
        del keep


def test_another_hook_on_top_blocks_uninstall() -> None:
    import tracemalloc

    heapmap.install()
    tracemalloc.start()
    try:
        with pytest.raises(ptrbridge.PointerError, match="another allocator hook"):
            heapmap.uninstall()
    finally:
        tracemalloc.stop()
    assert heapmap.uninstall() is True


def test_cffi_struct_field_from_raw_address_rejected_only_at_level_2() -> None:
    other = cffi.FFI()
    other.cdef("struct box { char *p; }; int strcmp(const char *, const char *);")

    class Holder:
        pass

    libc = ptrbridge.wrap(other.dlopen(None))
    with ptrbridge.checking(2):
        holder = Holder()
        holder.data = bytearray(b"hidden\0")
        box = other.new("struct box *")
        box.p = other.cast("char *", _address(holder.data))
        strcmp_sig = cffi.FFI()
        strcmp_sig.include(other)
        strcmp_sig.cdef("int memcmp(const struct box *a, const void *b, size_t n);")
        c = ptrbridge.wrap(strcmp_sig.dlopen(None))
        with pytest.raises(ptrbridge.NestedPointerError, match=r"\.p -> Python memory block"):
            c.memcmp(box, box, 0)
    assert libc.strcmp(b"a", b"a") == 0


def test_numpy_data_through_the_nep49_handler() -> None:
    import numpy as np

    from numpy._core import multiarray

    default = multiarray.get_handler_name()
    with ptrbridge.checking(2):
        assert heapmap.numpy_hooked() and multiarray.get_handler_name() == "ptrbridge_heapmap"
        data = np.arange(50_000, dtype=np.int64)
        found = heapmap.lookup(data.ctypes.data + 8 * 40_000)
        assert found is not None and found[0] == data.ctypes.data and found[1] == data.nbytes
        grown = data.copy()
        grown.resize(100_000, refcheck=False)  # realloc through the handler
        assert heapmap.lookup(grown.ctypes.data + 8 * 99_999) is not None
        start = data.ctypes.data
        heapmap.take_freed()
        del data
        assert any(s == start for s, _ in heapmap.take_freed())
    assert not heapmap.numpy_hooked() and multiarray.get_handler_name() == default
    del grown  # made under the handler, freed after: the handler still delegates
