"""ptrbridge.new and the freed-region history."""
from __future__ import annotations

import gc

import cffi
import pytest

import ptrbridge
from ptrbridge import ownership
from ptrbridge._bindings import ffi


def test_new_is_registered_and_zeroed() -> None:
    p = ptrbridge.new("int[4]")
    assert list(p) == [0, 0, 0, 0]
    region = ownership.lookup(int(ffi.cast("uintptr_t", p)) + 4)
    assert region is not None and region.kind == "managed" and region.size == 16
    assert region.description == "cdata 'int[4]'(16)"
    q = ptrbridge.new("char[]", b"init")
    assert ffi.string(q) == b"init"


def test_new_with_another_ffi_and_ctype_objects() -> None:
    other = cffi.FFI()
    other.cdef("struct pair { int a, b; };")
    pair = ptrbridge.new("struct pair *", {"a": 1, "b": 2}, ffi=other)
    assert (pair.a, pair.b) == (1, 2)
    assert ptrbridge.new(other.typeof("struct pair *")).a == 0
    with pytest.raises(TypeError, match="expected a pointer or array type"):
        ptrbridge.new("int")


def test_freed_history_names_creation_and_release() -> None:
    p = ptrbridge.new("char[]", 32)
    address = int(ffi.cast("uintptr_t", p)) + 5
    del p
    gc.collect()
    assert ownership.lookup(address) is None
    freed = ownership.find_freed(address)
    assert freed is not None and freed.description == "cdata 'char[]'(32)"
    assert freed.site.startswith("test_ownership.py:") and freed.freed_at.startswith("test_ownership.py:")


def test_quarantine_bounds_the_history() -> None:
    first = ptrbridge.new("char[]", 8)
    address = int(ffi.cast("uintptr_t", first))
    del first
    entry = ownership.find_freed(address)
    assert entry is not None
    for _ in range(ownership.QUARANTINE_BLOCKS + 1):
        ptrbridge.new("char[]", 8)  # each is freed at once and pushes the first out
    # evicted from quarantine (really freed, reusable) and so from the history
    assert not any(e is entry for e in ownership._freed)


def test_pin_ptrbridge_new() -> None:
    p = ptrbridge.new("char[]", b"pin me")
    with ptrbridge.Pinner() as pinner:
        assert pinner.pin(p) == ffi.cast("char *", p)


def test_a_buffer_lent_to_a_level_2_call_is_a_lent_region_while_the_call_runs() -> None:
    # qsort calls back into Python while it holds the lent buffer: the registry says "lent" and
    # names the object; after the call the region is gone.
    qffi = cffi.FFI()
    qffi.cdef("void qsort(void *base, size_t n, size_t size, int (*cmp)(const void *, const void *));")
    libc = ptrbridge.wrap(qffi.dlopen(None))
    data = bytearray(b"dcba")
    start = int(qffi.cast("uintptr_t", qffi.from_buffer(data)))
    seen = []

    @qffi.callback("int(const void *, const void *)")
    def cmp(a, b):  # type: ignore[no-untyped-def]
        if not seen:
            seen.append(ownership.lookup(start))
        return qffi.cast("unsigned char *", a)[0] - qffi.cast("unsigned char *", b)[0]

    with ptrbridge.checking(2):
        libc.qsort(qffi.from_buffer(data), 4, 1, cmp)
        after = ownership.lookup(start)
    assert data == bytearray(b"abcd")
    (info,) = seen
    assert info is not None and info.kind == "lent" and info.start == start and info.size == 4
    assert info.description == "bytearray(4)" and info.site == "<in call>"
    assert after is None
