"""Pinner: pointers to Python buffers that stay valid while pinned."""
from __future__ import annotations

import array
import ctypes
import gc
import mmap
import subprocess
import sys
import warnings
from typing import Any, Callable, Tuple

import cffi
import numpy as np
import pytest

import ptrbridge
from ptrbridge import PinLeakWarning, Pinner, UnpinnableError
from ptrbridge._bindings import ffi

other_ffi = cffi.FFI()


def _address(ptr: Any) -> int:
    return int(ffi.cast("uintptr_t", ptr))


def _buffer_address(obj: Any) -> int:
    keeper = ffi.from_buffer(obj)
    try:
        return _address(keeper)
    finally:
        ffi.release(keeper)


def _make_mmap() -> Tuple[Any, int, bytes]:
    m = mmap.mmap(-1, 4096)
    m[:5] = b"mmap!"
    return m, _buffer_address(m), b"mmap!"


KINDS: dict = {
    "bytes": lambda: (lambda o: (o, _buffer_address(o), b"bytes"))(b"bytes data"),
    "bytearray": lambda: (lambda o: (o, _buffer_address(o), b"bytea"))(bytearray(b"bytearray")),
    "memoryview": lambda: (lambda o: (o, _buffer_address(o), b"view!"))(memoryview(bytearray(b"view!!"))),
    "array": lambda: (lambda o: (o, o.buffer_info()[0], bytes(memoryview(o).cast("B"))[:5]))(
        array.array("i", [7, 8, 9])),
    "numpy": lambda: (lambda o: (o, o.ctypes.data, o.tobytes()[:5]))(np.arange(4, dtype=np.int32) + 65),
    "mmap": _make_mmap,
    "ffi.buffer": lambda: (lambda c: (ffi.buffer(c), _address(c), b"cffi!"))(ffi.new("char[]", b"cffi!")),
    "ctypes": lambda: (lambda o: (o, ctypes.addressof(o), bytes(o)[:5]))((ctypes.c_char * 8)(*b"ctypes!!")),
    "ffi.new": lambda: (lambda c: (c, _address(c), b"new!\0"))(ffi.new("char[]", b"new!")),
    "other ffi.new": lambda: (lambda c: (c, _address(c), b"\x05\x00\x00\x00\x06"))(other_ffi.new("int[2]", [5, 6])),
    "from_buffer": lambda: (lambda c: (c, _address(c), b"fromb"))(ffi.from_buffer(bytearray(b"frombuf"))),
    "ptrbridge.new": lambda: (lambda c: (c, _address(c), b"pbnew"))(ptrbridge.new("char[]", b"pbnew")),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_pin_every_buffer_kind(kind: str) -> None:
    obj, address, head = KINDS[kind]()
    with Pinner() as p:
        ptr = p.pin(obj)
        assert ffi.typeof(ptr) is ffi.typeof("char *")
        assert _address(ptr) == address
        assert ffi.buffer(ptr, len(head))[:] == head
        assert p.is_pinned(obj) and len(p) == 1
    assert not p.is_pinned(obj)
    if kind == "mmap":
        obj.close()  # possible again once unpinned


def test_pinned_bytearray_cannot_be_resized_until_unpinned() -> None:
    data = bytearray(b"grow me")
    p = Pinner()
    p.pin(data)
    with pytest.raises(BufferError):
        data.extend(b"!")
    with pytest.raises(BufferError):
        data.clear()
    p.unpin()
    data.extend(b"!")
    assert data == b"grow me!"


def test_pin_twice_counts_once() -> None:
    base = ptrbridge.stats().live_pins
    data = bytearray(4)
    with Pinner() as p:
        assert p.pin(data) == p.pin(data)
        assert ptrbridge.stats().live_pins == base + 1 and len(p) == 1
        p.pin(bytearray(4))
        assert ptrbridge.stats().live_pins == base + 2
    assert ptrbridge.stats().live_pins == base


def test_two_pinners_pin_independently() -> None:
    data = bytearray(4)
    a, b = Pinner(), Pinner()
    a.pin(data)
    b.pin(data)
    a.unpin()
    with pytest.raises(BufferError):
        data.append(1)  # still pinned by b
    b.unpin()
    data.append(1)


def test_user_from_buffer_cdata_stays_usable_after_unpin() -> None:
    source = bytearray(b"abc")
    view = ffi.from_buffer(source)
    with Pinner() as p:
        p.pin(view)
    assert ffi.buffer(view)[:] == b"abc"  # not released by the Pinner
    ffi.release(view)


def test_pinner_reusable_after_unpin() -> None:
    p = Pinner()
    p.pin(b"one")
    p.unpin()
    p.pin(b"two")
    assert len(p) == 1
    p.unpin()
    assert "pins=0" in repr(p)


@pytest.mark.parametrize(
    "obj, match",
    [
        (42, "cannot pin int: it does not export a buffer"),
        ([1, 2], "cannot pin list"),
        ("text", "cannot pin str"),
        (np.arange(10)[::2], "non-contiguous ndarray"),
        (ffi.cast("char *", 0), "does not own its memory"),
        (ffi.new("char[]", 4) + 1, "does not own its memory"),
    ],
    ids=["int", "list", "str", "strided numpy", "cast pointer", "derived pointer"],
)
def test_unpinnable_objects(obj: Any, match: str) -> None:
    with pytest.raises(UnpinnableError, match=match) as info:
        Pinner().pin(obj)
    assert isinstance(info.value, TypeError)


def test_garbage_collected_pinner_warns_and_unpins() -> None:
    data = bytearray(16)
    base = ptrbridge.stats().live_pins
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p = Pinner()
        p.pin(data)  # the line named in the warning
        line = sys._getframe().f_lineno - 1
        del p
        gc.collect()
    leaks = [w for w in caught if issubclass(w.category, PinLeakWarning)]
    assert len(leaks) == 1
    message = str(leaks[0].message)
    assert "ptrbridge.Pinner: found leaking pinned pointer; forgot to call unpin()?" in message
    assert "bytearray(16)" in message and f"test_pinning.py:{line}" in message
    assert leaks[0].lineno == line
    assert ptrbridge.stats().live_pins == base
    data.extend(b"x")  # unpinned


def test_leak_warning_is_an_error_under_w_error() -> None:
    code = (
        "import gc, ptrbridge\n"
        "p = ptrbridge.Pinner(); p.pin(bytearray(8)); del p; gc.collect()\n"
    )
    proc = subprocess.run([sys.executable, "-W", "error::ptrbridge.PinLeakWarning", "-c", code],
                          capture_output=True, text=True)
    assert "PinLeakWarning" in proc.stderr and "forgot to call unpin()" in proc.stderr


def test_warning_at_interpreter_exit() -> None:
    code = (
        "import ptrbridge\n"
        "data = bytearray(32)\n"
        "keep = ptrbridge.Pinner()\n"
        "keep.pin(data)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0
    assert "PinLeakWarning: ptrbridge.Pinner: found leaking pinned pointer; forgot to call unpin()?" in proc.stderr
    assert "bytearray(32) pinned at <string>:4" in proc.stderr


def test_pin_is_thread_safe() -> None:
    import threading

    base = ptrbridge.stats().live_pins
    p = Pinner()
    objects = [bytearray(8) for _ in range(200)]

    def pin_all() -> None:
        for obj in objects:
            p.pin(obj)

    threads = [threading.Thread(target=pin_all) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(p) == 200 and ptrbridge.stats().live_pins == base + 200
    p.unpin()
    assert len(p) == 0 and ptrbridge.stats().live_pins == base


# --- pin_many, sites, messages (issues 8 and 12) -------------------------------------

def test_pin_many_pins_a_batch_and_returns_their_addresses() -> None:
    frames = [bytearray(b"frame%d" % i) for i in range(5)] + [b"bytes", np.arange(3, dtype=np.int16)]
    base = ptrbridge.stats().live_pins
    with Pinner() as p:
        ptrs = p.pin_many(frames)
        assert ffi.typeof(ptrs) is ffi.typeof("char *[]") and len(ptrs) == len(frames)
        for ptr, obj in zip(ptrs, frames):
            assert _address(ptr) == _buffer_address(obj)
            assert p.is_pinned(obj)
        assert len(p) == len(frames) and ptrbridge.stats().live_pins == base + len(frames)
        with pytest.raises(BufferError):
            frames[0].extend(b"!")  # pinned: cannot move
        assert _address(p.pin(frames[1])) == _address(ptrs[1])  # same pin, not a second one
        again = p.pin_many([frames[2], frames[2]])
        assert _address(again[0]) == _address(again[1]) == _address(ptrs[2]) and len(p) == len(frames)
    assert ptrbridge.stats().live_pins == base
    frames[0].extend(b"!")  # unpinned


def test_pin_many_is_all_or_nothing() -> None:
    base = ptrbridge.stats().live_pins
    data = bytearray(8)
    p = Pinner()
    with pytest.raises(UnpinnableError, match="cannot pin int"):
        p.pin_many([data, b"ok", 42])
    assert len(p) == 0 and ptrbridge.stats().live_pins == base
    data.extend(b"x")  # no export was left behind


def test_pin_many_accepts_owning_cdata() -> None:
    cd = ffi.new("char[]", b"cdata")
    with Pinner() as p:
        ptrs = p.pin_many([cd, bytearray(4)])
        assert _address(ptrs[0]) == _address(cd)


def test_a_pins_site_is_the_callers_line() -> None:
    import inspect

    data = bytearray(12)
    p = Pinner()
    line = inspect.currentframe().f_lineno + 1  # type: ignore[union-attr]
    p.pin(data)
    assert ("bytearray(12)", f"test_pinning.py:{line}") in ptrbridge.pinning.pinned_objects()
    region = ptrbridge.ownership.lookup(_buffer_address(data) + 3)
    assert region is not None and region.kind == "pinned" and region.site == f"test_pinning.py:{line}"
    assert region.description == "bytearray(12)"
    p.unpin()
    assert ptrbridge.ownership.lookup(_buffer_address(data)) is None


def test_span_messages_name_span_not_pinner() -> None:
    with pytest.raises(TypeError, match=r"^ptrbridge.Span: cannot make a span of int"):
        ptrbridge.Span(3)


def test_unpinning_the_oldest_batch_keeps_the_newer_batches_pinned() -> None:
    """A producer unpins its oldest batch while newer ones are still pinned (FIFO)."""
    from ptrbridge._bindings import lib

    def is_pinned(buf: bytes) -> bool:
        region = ffi.new("struct pb_region *")
        found = lib.pb_region_find(ffi.from_buffer(buf), region)
        return bool(found and region.kind == lib.PB_REGION_PINNED)

    batches = [[bytes([i]) * 100 for _ in range(300)] for i in range(3)]
    pinners = [Pinner() for _ in batches]
    for pinner, batch in zip(pinners, batches):
        pinner.pin_many(batch)
    single = Pinner()
    lone = b"x" * 100
    single.pin(lone)
    pinners[0].unpin()
    assert not any(is_pinned(b) for b in batches[0])
    assert all(is_pinned(b) for b in batches[1] + batches[2]) and is_pinned(lone)
    pinners[2].unpin()
    assert all(is_pinned(b) for b in batches[1]) and is_pinned(lone)
    assert not any(is_pinned(b) for b in batches[2])
    pinners[1].unpin()
    single.unpin()
    assert not any(is_pinned(b) for batch in batches for b in batch) and not is_pinned(lone)


def test_level2_unpin_retires_only_what_no_other_pinner_covers() -> None:
    """At level 2 unpin retires (for the R2 scan) the memory no other live Pinner still pins."""
    from ptrbridge import pinning

    whole = bytearray(4096)
    other = bytearray(64)
    keeper = Pinner()
    keeper.pin(whole)
    try:
        _check_coverage(whole, other)
    finally:
        keeper.unpin()
    start = int(ffi.cast("uintptr_t", ffi.from_buffer(whole)))
    assert pinning._pinned_elsewhere()(start, 1) is False


def test_batch_filter_of_pins_held_elsewhere_agrees_with_the_one_by_one_check() -> None:
    """``_not_pinned_elsewhere`` (a whole batch at once) keeps exactly the pins that
    ``_pinned_elsewhere`` (one query at a time) says no live pin covers, with overlapping
    live pins (a pin inside a longer one) and zero-length queries."""
    from ptrbridge import pinning

    whole, other = bytearray(4096), bytearray(64)
    start = _buffer_address(whole)
    elsewhere = _buffer_address(other)
    pinners = [Pinner(), Pinner(), Pinner()]
    try:
        pinners[0].pin(whole)
        pinners[1].pin(memoryview(whole)[10:20])  # starts after whole, ends before it
        pinners[2].pin(other)
        probes = [(start, 4096), (start, 4097), (start - 1, 2), (start + 10, 10), (start + 4000, 96),
                  (start + 4000, 97), (elsewhere, 64), (elsewhere + 1, 64), (elsewhere - 64, 8)]
        queries = [(None, s, n, 0) for s, n in probes]
        covered = pinning._pinned_elsewhere()
        expected = [q for q in queries if not covered(q[1], q[2])]
        assert [q[1:3] for q in expected] == [(start, 4097), (start - 1, 2), (start + 4000, 97),
                                              (elsewhere + 1, 64), (elsewhere - 64, 8)]
        assert pinning._not_pinned_elsewhere(queries) == expected
        with_empty = queries + [(None, start + 5, 0, 0), (None, elsewhere - 64, 0, 0)]
        assert pinning._not_pinned_elsewhere(with_empty) == [q for q in with_empty if not covered(q[1], q[2])]
        for p in pinners:
            p.unpin()
        assert pinning._not_pinned_elsewhere(queries) == queries  # nothing pinned any more
    finally:
        for p in pinners:
            p.unpin()


def test_level2_unpin_of_a_batch_reports_each_pin_c_kept() -> None:
    """A level-2 unpin of many pins (retired as one batch) reports each pin C still points to,
    with its own description and ``file.py:line``; a pin another Pinner still holds is not
    reported until that Pinner unpins too."""
    import os
    import sys

    from ptrbridge import scanning

    here = os.path.basename(__file__)
    objs = [bytearray(b"a" * 24), b"b" * 40, bytearray(b"c" * 24), ffi.new("char[16]"), bytearray(b"d" * 8),
            bytearray(b"e" * 200)]
    root = ctypes.create_string_buffer(8 * len(objs))
    base = ctypes.addressof(root)
    rid = ptrbridge.add_root(base, len(root))
    old_mode = ptrbridge.set_on_violation("collect")
    p, q = Pinner(), Pinner()
    try:
        with ptrbridge.checking(2):
            ptrbridge.scan()
            ptrbridge.clear_violations()
            first_line = sys._getframe().f_lineno + 1
            pointers = p.pin_many(objs[:4])
            p.pin(objs[4])
            q.pin(objs[2])  # pinned by q as well: C may keep it until q unpins
            for i, pointer in enumerate(list(pointers) + [p.pin(objs[4]), p.pin(objs[5])]):
                ctypes.c_void_p.from_address(base + 8 * i).value = _address(pointer) + i
            ctypes.c_void_p.from_address(base + 8 * 5).value = 0  # C let go of the last one
            p.unpin()
            found = sorted(ptrbridge.clear_violations(), key=lambda r: r.offset)
            assert [(r.description, r.function, r.lent_at, r.state, r.offset, r.object_offset) for r in found] == [
                ("bytearray(24)", "Pinner.pin", f"{here}:{first_line}", "unpinned", 0, 0),
                ("bytes(40)", "Pinner.pin", f"{here}:{first_line}", "unpinned", 8, 1),
                ("cdata 'char[16]'(16)", "Pinner.pin", f"{here}:{first_line}", "unpinned", 24, 3),
                ("bytearray(8)", "Pinner.pin", f"{here}:{first_line + 1}", "unpinned", 32, 4)]
            assert str(found[0]).startswith("ptrbridge: C kept a pointer to Python memory after it was unpinned "
                                            f"(R2): bytearray(24) lent to Pinner.pin() at {here}:{first_line} ")
            assert ptrbridge.scan() == []  # each looked for once
            q.unpin()
            (r,) = ptrbridge.clear_violations()
            assert (r.description, r.lent_at, r.offset) == ("bytearray(24)", f"{here}:{first_line + 2}", 16)
            assert not scanning._retired_batches
    finally:
        p.unpin()
        q.unpin()
        ptrbridge.remove_root(rid)
        ptrbridge.set_on_violation(old_mode)
        ptrbridge.clear_violations()


def _check_coverage(whole: bytearray, other: bytearray) -> None:
    from ptrbridge import pinning

    with ptrbridge.checking(2):
        covered = pinning._pinned_elsewhere()
        view = memoryview(whole)
        assert covered(int(ffi.cast("uintptr_t", ffi.from_buffer(view[100:200]))), 100)
        start = int(ffi.cast("uintptr_t", ffi.from_buffer(whole)))
        assert covered(start, 4096) and not covered(start, 4097) and not covered(start - 1, 10)
        assert not covered(int(ffi.cast("uintptr_t", ffi.from_buffer(other))), 64)
        for probe in ((start, 4096), (start + 4000, 96), (start + 4000, 97), (start - 1, 2)):
            assert covered(*probe) == pinning._still_pinned(*probe)
