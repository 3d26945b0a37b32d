"""Rule R2 at check level 2: finding the pointers C kept, with real C libraries.

R2: C may not keep a pointer to Python-owned memory after the call returns,
unless that memory is pinned for as long as C keeps it.  These tests make C
keep such pointers for real - zlib (next_in, the gzip header), sqlite3
(SQLITE_STATIC) and tests/clib/keeper.c (a global, heap blocks, a
registered root) - and check what the scanner reports, then exercise the
scanner's C core directly at its edges.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
import traceback
import zlib as py_zlib
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator, List, Tuple

import cffi
import pytest

import ptrbridge
from ptrbridge import findings
from ptrbridge import RetainedPointerError, RetainedPointerWarning, Retention
from ptrbridge._bindings import ffi as pb_ffi
from ptrbridge._bindings import lib as pb_lib

from cbuild import build_shared

REPO = Path(__file__).resolve().parent.parent
HERE = os.path.basename(__file__)
UINTPTR_MAX = (1 << (8 * pb_ffi.sizeof("uintptr_t"))) - 1


def _next_line() -> int:
    """The caller's next line number (where the call under test is written)."""
    return sys._getframe(1).f_lineno + 1


def _addr(cdata: Any) -> int:
    return int(pb_ffi.cast("uintptr_t", cdata))


def _violation_mode() -> str:
    mode = ptrbridge.set_on_violation("raise")
    ptrbridge.set_on_violation(mode)
    return mode


@pytest.fixture(autouse=True)
def restores_violation_mode() -> Iterator[None]:
    """Every test leaves the violation mode as it found it (conftest checks the level)."""
    before = _violation_mode()
    yield
    assert _violation_mode() == before, "test did not restore the violation mode"


@pytest.fixture
def level2() -> Iterator[None]:
    """Check level 2, "raise" mode, a scan after every lending call; all restored after."""
    with ptrbridge.checking(2):
        old_mode = ptrbridge.set_on_violation("raise")
        old_batch = ptrbridge.set_scan_batch(1)
        ptrbridge.clear_violations()
        try:
            yield
        finally:
            ptrbridge.scan()  # leave no queued target behind
            ptrbridge.set_scan_batch(old_batch)
            ptrbridge.set_on_violation(old_mode)
            ptrbridge.clear_violations()


# --- tests/clib/keeper.c: a library that keeps what it is given ---------------------

KEEPER_CDEF = """
    void keep_global(const char *p);
    int keep_heap(const char *p);
    int keep_indirect(const char *p);
    int keep_registered(const char *p);
    int keep_copy(const char *p, size_t n);
    int keeper_read(void);
    uintptr_t keeper_heap_block(void);
    uintptr_t keeper_inner_block(void);
    uintptr_t keeper_registered_block(void);
    uint64_t keeper_registered_root(void);
    void keeper_clear(void);
"""


@pytest.fixture(scope="module")
def keeper_raw(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The raw (unchecked) cffi ABI-mode library built from tests/clib/keeper.c."""
    so = build_shared("keeper.c", tmp_path_factory.mktemp("keeper"))
    kffi = cffi.FFI()
    kffi.cdef(KEEPER_CDEF)
    return kffi.dlopen(str(so))


@pytest.fixture
def k(keeper_raw: Any, level2: None) -> Iterator[Any]:
    """keeper, checked, with its globals watched; C forgets everything afterwards."""
    ptrbridge.watch_library("libkeeper")
    try:
        yield ptrbridge.wrap(keeper_raw)
    finally:
        keeper_raw.keeper_clear()
        ptrbridge.unwatch_library("libkeeper")


def _expected_root(raw: Any, where: str) -> Tuple[str, str, int]:
    """(root kind, text the root description contains, offset) for each way keeper keeps a pointer."""
    if where == "global":
        return "library", "global 'kept_global' of libkeeper.so", -1
    if where == "heap":
        return "allocation", f"C heap block {raw.keeper_heap_block():#x} (8 bytes, tracked allocator)", 0
    if where == "indirect":
        return "allocation", f"C heap block {raw.keeper_inner_block():#x} (8 bytes, tracked allocator)", 0
    assert where == "registered"
    return ("root", f"registered root #{raw.keeper_registered_root()} "
            f"(16 bytes at {raw.keeper_registered_block():#x})", 8)


@pytest.mark.parametrize("where", ["global", "heap", "indirect", "registered"])
def test_pointer_kept_by_c_is_found_by_a_scan(k: Any, keeper_raw: Any, where: str) -> None:
    ptrbridge.set_scan_batch(1_000_000)  # no automatic scan: ptrbridge.scan() reports
    data = bytes([65 + len(where)]) + b" kept by C"
    keep = getattr(k, f"keep_{where}")
    line = _next_line()
    keep(data)
    found = ptrbridge.scan()
    assert len(found) == 1, found
    (r,) = found
    kind, root_text, offset = _expected_root(keeper_raw, where)
    assert (r.description, r.function, r.lent_at, r.state) == ("bytes(11)", f"keep_{where}", f"{HERE}:{line}",
                                                               "returned")
    assert r.root_kind == kind and root_text in r.root, r.root
    if offset >= 0:
        assert r.offset == offset
    assert r.address == _addr(pb_ffi.from_buffer(data)) and r.object_offset == 0
    assert ptrbridge.scan() == []  # each retired region is looked for once
    assert keeper_raw.keeper_read() == data[0]  # C reads through the pointer it kept


def test_checked_call_raises_at_once_with_the_rule_and_the_fix(k: Any) -> None:
    data = bytearray(b"kept in a global\0")
    line = _next_line() + 1
    with pytest.raises(RetainedPointerError) as info:
        k.keep_global(pb_ffi.from_buffer(data))
    (r,) = info.value.retentions
    assert isinstance(info.value, ptrbridge.PointerError) and isinstance(info.value, RuntimeError)
    message = str(info.value)
    assert message == str(r)
    assert message.startswith(
        "ptrbridge: C kept a pointer to Python memory after the call returned (R2): bytearray(17) "
        f"lent to keep_global() at {HERE}:{line} is still pointed to by global 'kept_global' of libkeeper.so "
        "at offset ")
    assert message.endswith(
        f"(pointer {_addr(pb_ffi.from_buffer(data)):#x}) (pin the object for as long as C keeps the pointer, "
        "copy it with ptrbridge.CBuffer, or pass a ptrbridge.Handle instead)")


def test_copying_variant_is_clean(k: Any, keeper_raw: Any) -> None:
    data = b"copied by C"
    assert k.keep_copy(data, len(data)) == 0  # a lending call, scanned after: nothing kept
    del data
    gc.collect()
    assert ptrbridge.scan() == [] and ptrbridge.violations() == []
    assert keeper_raw.keeper_read() == ord("c")  # C reads its own copy


def test_level_1_does_not_scan(k: Any) -> None:
    data = b"unseen at level 1"
    with ptrbridge.checking(1):
        k.keep_global(data)  # the same bug: no scan at level 1
    assert ptrbridge.scan() == []  # and nothing was queued for level 2


def test_pinned_memory_may_be_kept_until_unpinned(k: Any, keeper_raw: Any) -> None:
    data = bytearray(b"pinned\0")
    p = ptrbridge.Pinner()
    line = _next_line()
    pointer = p.pin(data)
    k.keep_heap(pointer)  # allowed: pinned
    assert ptrbridge.scan() == []
    assert keeper_raw.keeper_read() == ord("p")
    with pytest.raises(RetainedPointerError, match="after it was unpinned") as info:
        p.unpin()  # C still holds it
    (r,) = info.value.retentions
    assert (r.description, r.function, r.lent_at, r.state) == ("bytearray(7)", "Pinner.pin", f"{HERE}:{line}",
                                                               "unpinned")
    assert r.root_kind == "allocation" and f"C heap block {keeper_raw.keeper_heap_block():#x}" in r.root
    assert len(p) == 0 and not p.is_pinned(data)  # the pins are released all the same
    data.extend(b"resizable again")


def test_unpin_after_c_let_go_is_clean(k: Any, keeper_raw: Any) -> None:
    data = bytearray(b"pinned\0")
    with ptrbridge.Pinner() as p:
        k.keep_global(p.pin(data))
        assert keeper_raw.keeper_read() == ord("p")
        keeper_raw.keeper_clear()  # C lets go before the unpin
    assert ptrbridge.scan() == []


def test_memory_lent_then_pinned_before_the_scan_is_not_reported(k: Any) -> None:
    ptrbridge.set_scan_batch(1_000_000)
    data = bytearray(b"lent, then pinned\0")
    k.keep_global(pb_ffi.from_buffer(data))  # queued as "returned", not scanned yet
    with ptrbridge.Pinner() as p:
        p.pin(data)  # C may hold it now: the queued target is dropped
        assert ptrbridge.scan() == []
        ptrbridge.unwrap(k).keeper_clear()


def test_violation_mode_collect(k: Any) -> None:
    ptrbridge.set_on_violation("collect")
    k.keep_global(b"collected")
    (r,) = ptrbridge.violations()
    assert (r.description, r.function, r.state) == ("bytes(9)", "keep_global", "returned")
    assert ptrbridge.clear_violations() == [r] and ptrbridge.violations() == []
    k.keep_heap(b"collected twice")
    k.keep_indirect(b"collected thrice")
    assert [v.function for v in ptrbridge.violations()] == ["keep_heap", "keep_indirect"]


def test_violation_mode_warn_after_a_call(k: Any) -> None:
    ptrbridge.set_on_violation("warn")
    with pytest.warns(RetainedPointerWarning, match=r"R2\): bytes\(6\) lent to keep_global\(\)") as caught:
        line = _next_line()
        k.keep_global(b"warned")
    assert ptrbridge.violations() == []
    (w,) = caught
    # The warning should point at the user's lending call, like the report text does:
    assert (w.filename, w.lineno) == (__file__, line), f"warning attributed to {w.filename}:{w.lineno}"


def test_violation_mode_warn_at_unpin(k: Any) -> None:
    ptrbridge.set_on_violation("warn")
    data = bytearray(b"pinned\0")
    p = ptrbridge.Pinner()
    k.keep_global(p.pin(data))
    with pytest.warns(RetainedPointerWarning, match=r"after it was unpinned \(R2\): bytearray\(7\)") as caught:
        line = _next_line()
        p.unpin()
    (w,) = caught
    assert (w.filename, w.lineno) == (__file__, line), f"warning attributed to {w.filename}:{w.lineno}"


def test_invalid_violation_mode() -> None:
    for bad in ("ignore", "RAISE", "", None, 1):
        with pytest.raises(ValueError, match=r"ptrbridge.set_on_violation: mode must be 'raise', 'warn' or "
                                             r"'collect', not"):
            ptrbridge.set_on_violation(bad)  # type: ignore[arg-type]
    assert _violation_mode() == "raise"


def test_invalid_scan_batch() -> None:
    for bad in (0, -1, True, 1.5, "2"):
        with pytest.raises(ValueError, match="ptrbridge.set_scan_batch: calls must be a positive int or None"):
            ptrbridge.set_scan_batch(bad)  # type: ignore[arg-type]
    old = ptrbridge.set_scan_batch(7)
    assert ptrbridge.set_scan_batch(old) == 7


def test_freed_ptrbridge_new_memory_is_reported_at_the_next_scan(k: Any, keeper_raw: Any) -> None:
    line = _next_line()
    owner = ptrbridge.new("char[]", b"soon freed")
    keeper_raw.keep_heap(owner)  # an unchecked call: C keeps a pointer to live ptrbridge.new memory
    assert ptrbridge.scan() == []
    del owner  # freed while C still holds it
    (r,) = ptrbridge.scan()
    assert (r.function, r.lent_at, r.state, r.object_offset) == ("ptrbridge.new", f"{HERE}:{line}", "freed", 0)
    assert "char[]" in r.description and "after the object was freed" in str(r)
    assert r.root_kind == "allocation" and f"C heap block {keeper_raw.keeper_heap_block():#x}" in r.root


def test_freed_memory_makes_the_next_lending_call_scan_whatever_the_batch(k: Any, keeper_raw: Any) -> None:
    ptrbridge.set_scan_batch(1_000_000)
    owner = ptrbridge.new("char[]", b"soon freed")
    keeper_raw.keep_global(owner)
    del owner
    with pytest.raises(RetainedPointerError, match="after the object was freed") as info:
        k.keep_copy(b"x", 1)  # an unrelated lending call runs the due scan
    assert [r.state for r in info.value.retentions] == ["freed"]
    assert "global 'kept_global'" in info.value.retentions[0].root


def test_heap_map_recognises_a_raw_address_c_kept(k: Any) -> None:
    class Holder:
        pass

    holder = Holder()
    holder.data = bytearray(b"only the heap map knows\0")  # made at level 2, reached only by attribute
    raw = pb_ffi.cast("char *", _addr(pb_ffi.from_buffer(holder.data)))  # a bare address, no owner
    with pytest.raises(RetainedPointerError, match=r"Python memory block \(\d+ bytes"):
        k.keep_global(raw)


_PROVENANCE_CHILD = """
import ptrbridge
from ptrbridge import heapmap, scanning
ptrbridge.set_check_level(2)
heapmap.set_hold(0, 0)              # freed blocks go straight back: pymalloc reuses them at once
data = b"a" * int("60")               # a small bytes made now: one pymalloc block
block = heapmap.lookup_block(id(data))
scanning.remember_lend(id(data) + 32, 60, "bytes(60) 'A'", "keep", "prog.py:7")
del data
print(scanning.lent_provenance(block.start, block.size))   # A, freed once since its lend
for _ in range(100):                # an object nobody lent takes A's place, and is freed in turn
    other = b"b" * int("60")
    if id(other) == block.start:
        break
    keep_away = other
print(id(other) == block.start)
del other
print(scanning.lent_provenance(block.start, block.size))   # not A: two frees since A's lend
"""


def test_lend_provenance_names_only_the_object_that_was_lent() -> None:
    """A use-after-free report names the lent object only if the freed block is that object's:
    not an object that later took the same address and that nobody lent."""
    proc = subprocess.run([sys.executable, "-c", _PROVENANCE_CHILD], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == ["(\"bytes(60) 'A'\", 'keep', 'prog.py:7')", "True", "None"], proc.stdout


_CFFI_PROVENANCE_CHILD = """
import cffi, ptrbridge
from ptrbridge import scanning
ptrbridge.set_check_level(2)
ffi = cffi.FFI()
p = ffi.new("char[3000]")
a = int(ffi.cast("uintptr_t", p))
scanning.remember_lend(a + 8, 100, "bytearray(100) 'A'", "keep", "prog.py:9")
del p                               # freed by _cffi_backend: the interposer sees it
scanning._retire_freed_cffi()
with scanning._lock:
    print([t.description for t in scanning._targets.values() if t.start <= a < t.start + t.size])
    scanning._targets.clear()
    print(scanning._lends_overlapping(a, 3000))   # matched once: a later free there cannot match it
q = ffi.new("char[5000]")
b = int(ffi.cast("uintptr_t", q))
del q
lib, starts, sizes = ptrbridge._bindings.lib, scanning._scratch_starts, scanning._scratch_sizes
with scanning._lock:   # each path queues what it takes: ffi.new memory is the interposer's alone
    n = lib.pb__heapmap_retire_freed(1 << 40, starts, sizes, scanning._FREED_BATCH)
    size = lambda i: sizes[i] & ~lib.PB_HEAPMAP_GIVEN_BACK  # the flag of blocks libc got back
    by_heap_map = sum(1 for i in range(n) if starts[i] <= b < starts[i] + size(i))
    n = lib.pb__interpose_take_freed(starts, sizes, scanning._FREED_BATCH, ptrbridge._bindings.ffi.NULL)
    by_interposer = sum(1 for i in range(n) if starts[i] <= b < starts[i] + sizes[i])
print(by_heap_map, by_interposer)
"""


_RELENT_CHILD = """
import ptrbridge
from ptrbridge import heapmap, scanning
ptrbridge.set_check_level(2)
heapmap.set_hold(0, 0)
data = b"a" * int("60")
block = heapmap.lookup_block(id(data))
for _ in range(3):                  # a loop lending the same bytes to the same call: one record, refreshed
    scanning.remember_lend(id(data) + 32, 60, "bytes(60) 'A'", "keep", "prog.py:7")
with scanning._lock:
    print(sum(1 for s in scanning._lent if block.start <= s < block.start + block.size))
del data
print(scanning.lent_provenance(block.start, block.size))
"""


def test_the_same_lend_again_refreshes_its_record_and_still_names_the_object() -> None:
    proc = subprocess.run([sys.executable, "-c", _RELENT_CHILD], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == ["1", "(\"bytes(60) 'A'\", 'keep', 'prog.py:7')"], proc.stdout


_RETIRE_MANY_PROVENANCE_CHILD = """
import ptrbridge
from ptrbridge import heapmap, scanning
ptrbridge.set_check_level(2)
heapmap.set_hold(0, 0)
data = [b"a" * int("400"), b"b" * int("460")]  # sizes of their own: no other block takes their place
blocks = [heapmap.lookup_block(id(d)) for d in data]
for _ in range(2):                  # retired twice with the same texts: one record each, refreshed
    scanning.retire_many([id(d) + 32 for d in data], [400, 460], ["bytes(400)", "bytes(460)"], "Pinner.pin",
                         ["prog.py:7", "prog.py:8"], "unpinned")
    print(len(ptrbridge.scan()))
with scanning._lock:
    print(sum(1 for b in blocks for s in scanning._lent if b.start <= s < b.start + b.size))
del data
found = [scanning.lent_provenance(b.start, b.size) for b in blocks]  # before printing allocates
for f in found:
    print(f)
"""


def test_retire_many_keeps_the_provenance_of_every_range() -> None:
    """Ranges retired in a batch keep their lend records, refreshed when retired again with the
    same texts, so a use-after-free report later names each object and where it was pinned."""
    proc = subprocess.run([sys.executable, "-c", _RETIRE_MANY_PROVENANCE_CHILD], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == ["0", "0", "2", "('bytes(400)', 'Pinner.pin', 'prog.py:7')",
                                        "('bytes(460)', 'Pinner.pin', 'prog.py:8')"], proc.stdout


def _retire_and_scan(batch: bool, objs: List[Any], descriptions: List[str], sites: List[str]) -> List[Retention]:
    from ptrbridge import scanning

    starts = [_addr(pb_ffi.from_buffer(o)) for o in objs]
    sizes = [len(o) for o in objs]
    if batch:
        scanning.retire_many(starts, sizes, descriptions, "Pinner.pin", sites, "unpinned")
    else:
        for start, size, description, site in zip(starts, sizes, descriptions, sites):
            scanning.retire(start, size, description, "Pinner.pin", site, "unpinned")
    return sorted(ptrbridge.scan(), key=lambda r: r.offset)


def test_retire_many_finds_what_retire_one_by_one_finds(level2: None) -> None:
    """retire_many queues every range with its own texts: a scan reports exactly what it reports
    after retire() of each range in turn, each range once; a cancelled range is not reported."""
    objs = [bytearray(16), bytearray(40), b"x" * 24, bytearray(8)]
    descriptions = ["bytearray(16)", "bytearray(40)", "bytes(24)", "ffi.new-like(8)"]  # the last: kept eagerly
    sites = ["a.py:1", "b.py:2", "a.py:1", "c.py:3"]
    root = ctypes.create_string_buffer(8 * 5)
    base = ctypes.addressof(root)
    starts = [_addr(pb_ffi.from_buffer(o)) for o in objs]
    for i, pointer in enumerate([starts[0], starts[1] + 8, starts[2] + 23, starts[3], 0]):
        ctypes.c_void_p.from_address(base + 8 * i).value = pointer
    rid = ptrbridge.add_root(base, 8 * 5)
    try:
        one_by_one = _retire_and_scan(False, objs, descriptions, sites)
        batched = _retire_and_scan(True, objs, descriptions, sites)
        assert batched == one_by_one and len(batched) == 4
        assert [(r.description, r.function, r.lent_at, r.state, r.offset, r.object_offset) for r in batched] == [
            ("bytearray(16)", "Pinner.pin", "a.py:1", "unpinned", 0, 0),
            ("bytearray(40)", "Pinner.pin", "b.py:2", "unpinned", 8, 8),
            ("bytes(24)", "Pinner.pin", "a.py:1", "unpinned", 16, 23),
            ("ffi.new-like(8)", "Pinner.pin", "c.py:3", "unpinned", 24, 0)]
        assert ptrbridge.scan() == [] and pb_lib.pb__scan_pending() == 0  # each range looked for once
        from ptrbridge import scanning

        scanning.retire_many(starts[:2], [16, 40], descriptions[:2], "Pinner.pin", sites[:2], "unpinned")
        scanning.cancel(starts[1], 40)  # pinned again before the scan: C may hold it
        assert [r.description for r in ptrbridge.scan()] == ["bytearray(16)"]
        scanning.retire_many([], [], [], "Pinner.pin", [], "unpinned")  # nothing to queue
        assert pb_lib.pb__scan_pending() == 0
        with pytest.raises(ValueError, match="differ in length"):
            scanning.retire_many(starts[:2], [16], descriptions[:2], "Pinner.pin", sites[:2], "unpinned")
    finally:
        ptrbridge.remove_root(rid)


def test_lend_inside_freed_ffi_new_memory_names_it_once() -> None:
    proc = subprocess.run([sys.executable, "-c", _CFFI_PROVENANCE_CHILD], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == ["[\"bytearray(100) 'A'\"]", "[]", "0 1"], proc.stdout


def test_lend_history_keeps_the_newest_lends() -> None:
    from ptrbridge import scanning

    base = 0x7F0000000000
    with scanning._lock:
        try:
            for i in range(scanning.LENT_HISTORY + 1000):
                scanning._remember_lend(base + 64 * i, 32, "d", "f", "s")
            scanning._remember_lend(base + 64 * 5000, 32, "again", "f", "s")  # re-lent: newest now
            kept = [s for s in scanning._lent if base <= s < base + 64 * (scanning.LENT_HISTORY + 1000)]
            assert len(scanning._lent) <= scanning.LENT_HISTORY
            assert base + 64 * (scanning.LENT_HISTORY + 999) in kept  # the newest
            assert base + 64 * 5000 in kept and base + 64 * 1000 not in kept  # the oldest went first
            assert scanning._lends_overlapping(base + 64 * 5000 - 16, 64) == [base + 64 * 5000]
        finally:
            for start in [s for s in scanning._lent if base <= s < base + 64 * (scanning.LENT_HISTORY + 1000)]:
                scanning._forget_lend(start)


def test_heap_map_recognises_raw_addresses_in_structs(level2: None) -> None:
    libc_ffi = cffi.FFI()
    libc_ffi.cdef("struct iovec { void *iov_base; size_t iov_len; };"
                  "ssize_t writev(int, const struct iovec *, int);")
    libc = ptrbridge.wrap(libc_ffi.dlopen(None))

    class Holder:
        pass

    holder = Holder()
    holder.data = bytearray(b"raw")
    iov = libc_ffi.new("struct iovec[1]")
    iov[0].iov_base = libc_ffi.cast("void *", _addr(pb_ffi.from_buffer(holder.data)))
    iov[0].iov_len = 3
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(ptrbridge.NestedPointerError,
                           match=r"\.iov_base -> Python memory block \(4 bytes, \w+ allocator\)"):
            libc.writev(write_end, iov, 1)
        with ptrbridge.checking(1):
            assert libc.writev(write_end, iov, 1) == 3  # level 1 cannot know this address
    finally:
        os.close(read_end)
        os.close(write_end)


# --- watch_library -------------------------------------------------------------------

def test_watch_library_twice_is_harmless_and_unwatch_stops_it(k: Any, keeper_raw: Any) -> None:
    ptrbridge.set_scan_batch(1_000_000)
    segments = ptrbridge.watch_library("libkeeper")  # already watched by the fixture
    assert segments >= 1 and ptrbridge.watch_library("libkeeper") == segments
    data = b"global"
    k.keep_global(data)
    assert [r.root_kind for r in ptrbridge.scan()] == ["library"]  # one finding, not one per watch
    ptrbridge.unwatch_library("libkeeper")
    try:
        k.keep_global(data)
        (r,) = ptrbridge.scan()  # still found: at level 2 every non-system library's globals are roots
        assert r.root == "global 'kept_global' of libkeeper.so"
        ptrbridge.interposition.disable()
        try:
            k.keep_global(data)
            assert ptrbridge.scan() == []  # without the interposer the global is not a root any more
        finally:
            ptrbridge.interposition.enable()
    finally:
        ptrbridge.watch_library("libkeeper")  # for the fixture's unwatch


def test_watch_library_invalid_names(level2: None) -> None:
    with pytest.raises(ValueError, match="ptrbridge.watch_library: no loaded library's path contains "
                                         "'libdoes-not-exist'"):
        ptrbridge.watch_library("libdoes-not-exist")
    for bad in ("", None, b"libc"):
        with pytest.raises(ValueError, match="name must be a non-empty str"):
            ptrbridge.watch_library(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'never-watched' is not watched"):
        ptrbridge.unwatch_library("never-watched")


# --- registered roots ----------------------------------------------------------------

def test_add_root_ctypes_buffer(level2: None) -> None:
    root = ctypes.create_string_buffer(64)
    base = ctypes.addressof(root)
    data = bytearray(32)
    rid = ptrbridge.add_root(base, 64)
    try:
        p = ptrbridge.Pinner()
        ctypes.c_void_p.from_address(base + 24).value = _addr(p.pin(data))
        with pytest.raises(RetainedPointerError) as info:
            p.unpin()
        (r,) = info.value.retentions
        assert (r.root_kind, r.root, r.offset) == ("root", f"registered root #{rid} (64 bytes at {base:#x})", 24)
    finally:
        ptrbridge.remove_root(rid)
    with ptrbridge.Pinner() as p:  # the same pointer, the root removed: not scanned any more
        ctypes.c_void_p.from_address(base + 24).value = _addr(p.pin(data))
    with pytest.raises(ptrbridge.PointerError, match=rf"remove_root\({rid}\)"):
        ptrbridge.remove_root(rid)


def test_add_root_libc_malloc_unaligned(level2: None) -> None:
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    block = libc.malloc(32)
    assert block and block % 8 == 0
    ctypes.memset(block, 0, 32)
    data = bytearray(b"in a malloc block")
    rid = ptrbridge.add_root(block + 3, 29)  # unaligned start: the aligned words inside it are scanned
    try:
        p = ptrbridge.Pinner()
        ctypes.c_void_p.from_address(block + 8).value = _addr(p.pin(data))
        with pytest.raises(RetainedPointerError) as info:
            p.unpin()
        (r,) = info.value.retentions
        assert r.root_kind == "root" and r.offset == 5 and f"(29 bytes at {block + 3:#x})" in r.root
    finally:
        ptrbridge.remove_root(rid)
        libc.free(block)


def test_add_root_invalid_arguments(level2: None) -> None:
    for bad in (-1, True, 1.0, "8"):
        with pytest.raises(ValueError, match="ptrbridge.add_root: size must be a non-negative int"):
            ptrbridge.add_root(0x1000, bad)  # type: ignore[arg-type]
    with pytest.raises(ptrbridge.RootError, match=r"add_root: \[0x0, \+8\) is not a valid address range"):
        ptrbridge.add_root(0, 8)
    with pytest.raises(ptrbridge.RootError, match=r"add_root: \[0x[0-9a-f]+, \+8\) is not a valid"):
        ptrbridge.add_root(UINTPTR_MAX - 3, 8)  # wraps around the address space


def test_pb_root_add_from_c_unregisters_with_pb_root_remove(k: Any, keeper_raw: Any) -> None:
    ptrbridge.set_scan_batch(1_000_000)
    data = b"registered by C"
    assert k.keep_registered(data) == 0
    rid = keeper_raw.keeper_registered_root()
    assert rid > 0
    (r,) = ptrbridge.scan()
    assert r.root_kind == "root" and f"registered root #{rid}" in r.root and r.offset == 8
    keeper_raw.keeper_clear()  # pb_root_remove + free
    with pytest.raises(ptrbridge.PointerError):
        ptrbridge.remove_root(rid)  # already removed by C


# --- zlib: next_in and the gzip header -------------------------------------------

@pytest.fixture(scope="module")
def zexample() -> ModuleType:
    """examples/zlib_stream.py, imported by path."""
    spec = importlib.util.spec_from_file_location("zlib_stream_example", REPO / "examples" / "zlib_stream.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _line_of(path: Path, text: str) -> int:
    (line,) = [i for i, source in enumerate(path.read_text().splitlines(), 1) if text in source]
    return line


def test_zlib_internal_allocations_are_tracked(zexample: ModuleType) -> None:
    zs = ptrbridge.cnew("z_stream *", ffi=zexample.ffi)
    try:
        ptrbridge.c_allocator().use_for_zlib(zs.c)
        before = ptrbridge.stats()
        zexample.zlib.deflateInit_(zs.c, 6, zexample._raw.zlibVersion(), zexample.ffi.sizeof("z_stream"))
        during = ptrbridge.stats()
        assert during.live_blocks - before.live_blocks >= 4  # state, window, prev, head, pending_buf
        assert during.live_bytes - before.live_bytes > 256 << 10
        assert pb_lib.pb_alloc_size(zs.c.state) > 1000  # the deflate state is a tracked block
        assert zexample._raw.deflateEnd(zs.c) == zexample.Z_OK
        after = ptrbridge.stats()
        assert (after.live_blocks, after.live_bytes) == (before.live_blocks, before.live_bytes)
        assert after.frees - before.frees == during.allocations - before.allocations
    finally:
        zs.free()


@pytest.mark.parametrize("mode", ["raise", "collect", "warn"])
def test_zlib_buggy_wrapper_is_reported(zexample: ModuleType, level2: None, mode: str) -> None:
    ptrbridge.set_on_violation(mode)
    example = REPO / "examples" / "zlib_stream.py"
    deflate_line = _line_of(example, "rc = zlib.deflate(zs, flush)")
    d = zexample.Deflater()
    chunk = os.urandom(1 << 18)  # incompressible: one step cannot take it all
    try:
        if mode == "raise":
            with pytest.raises(RetainedPointerError) as info:
                d.feed_buggy(chunk)
            found = info.value.retentions
            frames = traceback.extract_tb(info.tb)
            assert any(f.filename == str(example) and f.lineno == deflate_line for f in frames)
        elif mode == "collect":
            d.feed_buggy(chunk)
            found = ptrbridge.clear_violations()
        else:
            with pytest.warns(RetainedPointerWarning) as caught:
                d.feed_buggy(chunk)
            assert all(issubclass(w.category, RetainedPointerWarning) for w in caught)
            found = []
            assert len(caught) == 1 and str(caught[0].message).startswith(
                "ptrbridge: C kept a pointer to Python memory after the call returned (R2): bytes(262144) (+")
        if mode != "warn":
            (r,) = found
            assert (r.description, r.function, r.lent_at, r.state, r.root_kind) == (
                "bytes(262144)", "deflate", f"zlib_stream.py:{deflate_line}", "returned", "allocation")
            size = zexample.ffi.sizeof("z_stream")
            assert r.root.startswith(f"C heap block {d.stream.address:#x} ({size} bytes, tracked allocator)")
            assert r.offset == 0  # next_in is the z_stream's first field
            assert 0 < r.object_offset < len(chunk) and r.address == _addr(d.stream.c.next_in)
    finally:
        d.stream.c.next_in, d.stream.c.avail_in = zexample.ffi.NULL, 0  # zlib must not read on
        d.finish()
    assert ptrbridge.violations() == []


@pytest.mark.parametrize("feed", ["pinned", "copied"])
def test_zlib_correct_wrappers_are_clean(zexample: ModuleType, level2: None, feed: str) -> None:
    chunks = [os.urandom(1 << 17) for _ in range(3)] + [b"squeezable " * 20_000]
    with ptrbridge.Pinner() as pinner:  # outlives the stream
        if feed == "pinned":
            out = zexample.compress(chunks, lambda d, c: d.feed_pinned(c, pinner))
        else:
            out = zexample.compress(chunks, zexample.Deflater.feed_copied)
    assert py_zlib.decompress(out) == b"".join(chunks)
    assert ptrbridge.scan() == [] and ptrbridge.violations() == []


GZ_CDEF = """
    typedef struct z_stream_s {
        const unsigned char *next_in; unsigned int avail_in; unsigned long total_in;
        unsigned char *next_out; unsigned int avail_out; unsigned long total_out;
        const char *msg; void *state;
        void *(*zalloc)(void *, unsigned int, unsigned int); void (*zfree)(void *, void *);
        void *opaque; int data_type; unsigned long adler; unsigned long reserved;
    } z_stream;
    typedef struct gz_header_s {
        int text; unsigned long time; int xflags; int os;
        unsigned char *extra; unsigned int extra_len; unsigned int extra_max;
        unsigned char *name; unsigned int name_max;
        unsigned char *comment; unsigned int comm_max;
        int hcrc; int done;
    } gz_header;
    const char *zlibVersion(void);
    int deflateInit2_(z_stream *strm, int level, int method, int windowBits, int memLevel, int strategy,
                      const char *version, int stream_size);
    int deflateSetHeader(z_stream *strm, gz_header *head);
    int deflate(z_stream *strm, int flush);
    int deflateEnd(z_stream *strm);
"""


@pytest.fixture(scope="module")
def gz() -> Tuple[Any, Any]:
    gffi = cffi.FFI()
    gffi.cdef(GZ_CDEF)
    return gffi, gffi.dlopen("libz.so.1")


def _gzip(gffi: Any, raw: Any, header_arg: Any, data: bytes, z: Any) -> Tuple[bytes, Any, int, int]:
    """Compress ``data`` as gzip with ``header_arg`` given to deflateSetHeader (through ``z``).

    Returns the output, the RetainedPointerError that call raised (or None),
    the address of zlib's deflate state and the line of the call.
    """
    zs = ptrbridge.cnew("z_stream *", ffi=gffi)
    out = ptrbridge.CBuffer(len(data) + 1024)
    try:
        ptrbridge.c_allocator().use_for_zlib(zs.c)
        assert raw.deflateInit2_(zs.c, 6, 8, 16 + 15, 8, 0, raw.zlibVersion(), gffi.sizeof("z_stream")) == 0
        state = _addr(zs.c.state)
        error = None
        line = _next_line()
        try:
            z.deflateSetHeader(zs.c, header_arg)
        except RetainedPointerError as exc:
            error = exc
        zs.c.next_in, zs.c.avail_in = gffi.from_buffer(data), len(data)
        zs.c.next_out, zs.c.avail_out = gffi.cast("unsigned char *", out.ptr), len(out)
        assert raw.deflate(zs.c, 4) == 1  # Z_FINISH -> Z_STREAM_END: the header is read here
        result = out.to_bytes()[: len(out) - zs.c.avail_out]
        assert raw.deflateEnd(zs.c) == 0
        return result, error, state, line + 1
    finally:
        zs.free()
        out.free()


def test_zlib_keeps_the_gzip_header_in_its_own_state(gz: Tuple[Any, Any], level2: None) -> None:
    gffi, raw = gz
    z = ptrbridge.wrap(raw)
    header = gffi.new("gz_header *", {"os": 3, "time": 1_700_000_000})  # a temporary, in the caller's eyes
    data = b"header kept by zlib " * 100
    out, error, state, line = _gzip(gffi, raw, header, data, z)
    assert py_zlib.decompress(out, 16 + 15) == data and out[4:8] == (1_700_000_000).to_bytes(4, "little")
    assert error is not None
    (r,) = error.retentions
    assert "gz_header" in r.description and r.description.endswith("(80)")
    assert (r.function, r.lent_at, r.state) == ("deflateSetHeader", f"{HERE}:{line}", "returned")
    # Found in zlib's internal deflate_state (s->gzhead), a block zlib got from zalloc:
    assert r.root_kind == "allocation" and r.root.startswith(f"C heap block {state:#x} (")
    assert r.address == _addr(header) and r.object_offset == 0


def test_zlib_gzip_header_pinned_for_the_stream_is_clean(gz: Tuple[Any, Any], level2: None) -> None:
    gffi, raw = gz
    z = ptrbridge.wrap(raw)
    header = gffi.new("gz_header *", {"os": 3})
    data = b"pinned header " * 100
    with ptrbridge.Pinner() as p:  # unpinned after deflateEnd: zlib has let go by then
        out, error, _, _ = _gzip(gffi, raw, gffi.cast("gz_header *", p.pin(header)), data, z)
    assert error is None and py_zlib.decompress(out, 16 + 15) == data
    assert ptrbridge.scan() == []


# --- sqlite3: SQLITE_STATIC --------------------------------------------------------

SQLITE_PROGRAM = '''\
"""sqlite3 keeps an SQLITE_STATIC blob pointer in its prepared statement (run by test_scanning.py)."""
import json
import sys

import cffi

import ptrbridge

report = {"sqlite3_module_loaded": "sqlite3" in sys.modules or "_sqlite3" in sys.modules}
ffi = cffi.FFI()
ffi.cdef("""
    typedef struct sqlite3 sqlite3;
    typedef struct sqlite3_stmt sqlite3_stmt;
    int sqlite3_config(int, ...);
    int sqlite3_shutdown(void);
    int sqlite3_open(const char *filename, sqlite3 **db);
    int sqlite3_exec(sqlite3 *, const char *sql, void *, void *, char **err);
    int sqlite3_prepare_v2(sqlite3 *db, const char *sql, int n, sqlite3_stmt **stmt, const char **tail);
    int sqlite3_bind_blob(sqlite3_stmt *, int, const void *, int n, void (*)(void *));
    int sqlite3_step(sqlite3_stmt *);
    const void *sqlite3_column_blob(sqlite3_stmt *, int);
    int sqlite3_column_bytes(sqlite3_stmt *, int);
    int sqlite3_finalize(sqlite3_stmt *);
    int sqlite3_close(sqlite3 *);
""")
raw = ffi.dlopen("libsqlite3.so.0")
routed = sys.argv[1] == "routed"
base = ptrbridge.stats().live_blocks
if routed:  # before sqlite3 initialises: its first connection
    report["config"] = raw.sqlite3_config(4, ffi.cast("void *", ptrbridge.c_allocator().sqlite3_mem_methods))
db_out = ffi.new("sqlite3 **")
assert raw.sqlite3_open(b":memory:", db_out) == 0
db = db_out[0]
assert raw.sqlite3_exec(db, b"create table t(n int, b blob)", ffi.NULL, ffi.NULL, ffi.NULL) == 0
report["tracked_blocks_after_open"] = ptrbridge.stats().live_blocks - base
if routed:
    report["config_after_init"] = raw.sqlite3_config(4, ffi.cast("void *", ptrbridge.c_allocator().sqlite3_mem_methods))
sq = ptrbridge.wrap(raw)
STATIC = ffi.cast("void (*)(void *)", 0)
TRANSIENT = ffi.cast("void (*)(void *)", -1)
SQLITE_DONE, SQLITE_ROW = 101, 100


def retentions(found):
    return [{"description": r.description, "function": r.function, "lent_at": r.lent_at, "state": r.state,
             "root_kind": r.root_kind, "object_offset": r.object_offset} for r in found]


def prepare(sql):
    stmt = ffi.new("sqlite3_stmt **")
    assert raw.sqlite3_prepare_v2(db, sql, -1, stmt, ffi.NULL) == 0
    return stmt[0]


def step_and_finalize(stmt):
    rc = raw.sqlite3_step(stmt)
    assert raw.sqlite3_finalize(stmt) == 0
    return rc


ptrbridge.set_check_level(2)
ptrbridge.set_scan_batch(1_000_000)  # no automatic scan after calls: ptrbridge.scan() reports

# SQLITE_TRANSIENT: sqlite copies the blob during the call.
stmt = prepare(b"insert into t values (1, ?)")
sq.sqlite3_bind_blob(stmt, 1, bytes(range(200)), 200, TRANSIENT)
report["transient"] = retentions(ptrbridge.scan())
report["transient_step"] = step_and_finalize(stmt)

# SQLITE_STATIC: sqlite keeps the pointer and reads the blob at step; the caller's bytes was only lent.
static = bytes(range(200, 0, -1))
stmt = prepare(b"insert into t values (2, ?)")
sq.sqlite3_bind_blob(stmt, 1, static, len(static), STATIC)  # BUG: lent for the call only
found = ptrbridge.scan()
report["static"] = retentions(found)
report["static_roots"] = [r.root for r in found]
report["static_step"] = step_and_finalize(stmt)  # `static` is still alive: the read is safe here

# SQLITE_STATIC with the bytes pinned (allowed), then unpinned before the step (R2).
pinned = bytes(range(50, 250))
stmt = prepare(b"insert into t values (3, ?)")
pinner = ptrbridge.Pinner()
sq.sqlite3_bind_blob(stmt, 1, pinner.pin(pinned), len(pinned), STATIC)
report["pinned"] = retentions(ptrbridge.scan())
try:
    pinner.unpin()
    report["unpinned"] = []
except ptrbridge.RetainedPointerError as exc:
    report["unpinned"] = retentions(exc.retentions)
report["unpinned_step"] = step_and_finalize(stmt)

ptrbridge.set_check_level(1)
stmt = prepare(b"select b from t order by n")
blobs = []
while raw.sqlite3_step(stmt) == SQLITE_ROW:
    blobs.append(ffi.buffer(raw.sqlite3_column_blob(stmt, 0), raw.sqlite3_column_bytes(stmt, 0))[:])
raw.sqlite3_finalize(stmt)
report["stored_intact"] = blobs == [bytes(range(200)), static, pinned]
assert raw.sqlite3_close(db) == 0
assert raw.sqlite3_shutdown() == 0
report["tracked_blocks_after_shutdown"] = ptrbridge.stats().live_blocks - base
report["sqlite3_module_loaded"] = report["sqlite3_module_loaded"] or "sqlite3" in sys.modules
print(json.dumps(report))
'''


def _run_sqlite_program(tmp_path: Path, mode: str) -> dict:
    script = tmp_path / "sqlite_r2.py"
    script.write_text(SQLITE_PROGRAM)
    env = dict(os.environ, PTRBRIDGE_CHECK="1")
    proc = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result: dict = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_sqlite_static_blob_is_reported_transient_is_clean(tmp_path: Path) -> None:
    report = _run_sqlite_program(tmp_path, "routed")
    assert report["sqlite3_module_loaded"] is False  # sqlite initialised by us, with our allocator
    assert report["config"] == 0 and report["config_after_init"] == 21  # SQLITE_MISUSE once initialised
    assert report["tracked_blocks_after_open"] > 10
    assert report["transient"] == [] and report["transient_step"] == 101
    bind_line = _line_of_text(SQLITE_PROGRAM, "# BUG: lent for the call only")
    assert report["static"], "SQLITE_STATIC pointer held by the statement was not found"
    for r in report["static"]:
        assert r == {"description": "bytes(200)", "function": "sqlite3_bind_blob",
                     "lent_at": f"sqlite_r2.py:{bind_line}", "state": "returned", "root_kind": "allocation",
                     "object_offset": 0}
    assert report["static_step"] == 101
    assert report["pinned"] == []
    assert report["unpinned"] and all(
        (r["state"], r["function"], r["description"], r["root_kind"]) ==
        ("unpinned", "Pinner.pin", "bytes(200)", "allocation") for r in report["unpinned"])
    assert report["unpinned_step"] == 101 and report["stored_intact"] is True
    assert report["tracked_blocks_after_shutdown"] == 0


def test_sqlite_without_the_allocator_is_seen_through_the_interposer(tmp_path: Path) -> None:
    """sqlite's own malloc, with no allocator routing: at level 2 the interposer makes its
    statement a root, so the same bug is found, named by the sqlite function that allocated it."""
    report = _run_sqlite_program(tmp_path, "plain")
    assert report["tracked_blocks_after_open"] == 0
    bind_line = _line_of_text(SQLITE_PROGRAM, "# BUG: lent for the call only")
    assert report["static"], "SQLITE_STATIC pointer held by sqlite's own malloc'd statement was not found"
    for r in report["static"]:
        assert r == {"description": "bytes(200)", "function": "sqlite3_bind_blob",
                     "lent_at": f"sqlite_r2.py:{bind_line}", "state": "returned", "root_kind": "interposed",
                     "object_offset": 0}
    for root in report["static_roots"]:
        assert re.fullmatch(r"a \d+-byte block allocated by (\w+\(\) in libsqlite3\.so\.0|a static function at "
                            r"libsqlite3\.so\.0\+0x[0-9a-f]+ \(the library is stripped\)), at offset \d+", root), root
    assert report["transient"] == [] and report["pinned"] == []
    assert report["unpinned"] and all(r["root_kind"] == "interposed" for r in report["unpinned"])
    assert report["stored_intact"] is True


def _line_of_text(text: str, marker: str) -> int:
    (line,) = [i for i, source in enumerate(text.splitlines(), 1) if marker in source]
    return line


# --- the scanner's C core ----------------------------------------------------------

@pytest.fixture
def scanner() -> Iterator[None]:
    """An empty target queue before and after (targets are queued by hand)."""
    ptrbridge.scan()
    pb_lib.pb__scan_run(pb_ffi.NULL, 0, 0, pb_ffi.NULL)
    assert pb_lib.pb__scan_pending() == 0
    yield
    pb_lib.pb__scan_run(pb_ffi.NULL, 0, 0, pb_ffi.NULL)


@pytest.fixture
def target() -> Iterator[Tuple[int, int]]:
    """A 64-byte Python block to point at (never dereferenced)."""
    block = bytearray(64)
    yield _addr(pb_ffi.from_buffer(block)), 64


def _hits(words: List[int]) -> int:
    """Hits of pb__scan_buffer over an aligned array of ``words`` (the queue is kept)."""
    root = pb_ffi.new("uintptr_t[]", words)
    return int(pb_lib.pb__scan_buffer(root, pb_ffi.sizeof(root)))


def _findings(base: int, size: int, cap: int = 16) -> Tuple[int, List[Tuple[int, int, int]]]:
    """pb__scan_run over ``[base, base + size)`` registered as a root, keeping the queue.

    Returns the total found in that root and its (target id, offset, value) findings.
    """
    rid = ptrbridge.add_root(base, size)
    try:
        out = pb_ffi.new("struct pb_finding[]", cap)
        scanned = pb_ffi.new("uint64_t *")
        total = int(pb_lib.pb__scan_run(out, cap, 1, scanned))
        assert scanned[0] >= size
    finally:
        ptrbridge.remove_root(rid)
    mine = [(int(f.target_id), int(f.offset), int(f.value)) for f in out[0:min(total, cap)]
            if f.root_kind == pb_lib.PB_ROOT_REGISTERED and f.root_id == rid]
    return total, mine


def test_scanner_first_last_and_one_past_the_end(scanner: None, target: Tuple[int, int]) -> None:
    start, size = target
    assert pb_lib.pb__scan_retire(start, size, 1) == 0 and pb_lib.pb__scan_pending() == 1
    assert _hits([start]) == 1  # the first byte
    assert _hits([start + size - 1]) == 1  # the last byte
    assert _hits([start + size]) == 0  # one past the end: C may hold an end pointer
    assert _hits([start - 1]) == 0
    assert _hits([0, 1, 12345, UINTPTR_MAX, start ^ (1 << 40)]) == 0
    assert _hits([start, start + 8, 7, start + 63, start + 64]) == 3
    words = pb_ffi.new("uintptr_t[]", [0, start + 5, 0, start])
    total, found = _findings(_addr(words), pb_ffi.sizeof(words))
    assert found == [(1, 8, start + 5), (1, 24, start)]
    assert pb_lib.pb__scan_pending() == 1  # keep=1 kept the queue
    assert pb_lib.pb__scan_run(pb_ffi.NULL, 0, 0, pb_ffi.NULL) == 0  # nothing in the real roots
    assert pb_lib.pb__scan_pending() == 0  # keep=0 emptied it


def test_scanner_zero_size_target(scanner: None, target: Tuple[int, int]) -> None:
    start, _ = target
    pb_lib.pb__scan_retire(start + 10, 0, 5)  # an empty object still has an address C can keep
    assert _hits([start + 10]) == 1
    assert _hits([start + 9]) == 0 and _hits([start + 11]) == 0


def test_scanner_target_at_the_top_of_the_address_space(scanner: None) -> None:
    pb_lib.pb__scan_retire(UINTPTR_MAX - 7, 64, 9)  # end would wrap: clamped
    assert _hits([UINTPTR_MAX - 7]) == 1 and _hits([UINTPTR_MAX - 1]) == 1
    assert _hits([UINTPTR_MAX - 8, 0]) == 0


def test_scanner_overlapping_targets_most_recent_wins(scanner: None, target: Tuple[int, int]) -> None:
    s, _ = target
    pb_lib.pb__scan_retire(s, 64, 6)
    pb_lib.pb__scan_retire(s + 16, 16, 7)  # inside the first, queued later
    words = pb_ffi.new("uintptr_t[]", [s + 20, s + 40, s + 8, s + 31, s + 32])
    base, size = _addr(words), pb_ffi.sizeof(words)
    _, found = _findings(base, size)
    assert [t for t, _, _ in found] == [7, 6, 6, 7, 6]
    pb_lib.pb__scan_retire(s, 64, 8)  # the whole range again, most recent of all
    _, found = _findings(base, size)
    assert [t for t, _, _ in found] == [8, 8, 8, 8, 8]
    # An old wide target behind many later narrow ones that start inside it:
    pb_lib.pb__scan_run(pb_ffi.NULL, 0, 0, pb_ffi.NULL)
    pb_lib.pb__scan_retire(s, 64, 1)
    for i in range(6):
        pb_lib.pb__scan_retire(s + 8 * i, 4, 10 + i)
    words = pb_ffi.new("uintptr_t[]", [s + 60, s + 8 * 3 + 1, s + 8 * 3 + 5])
    _, found = _findings(_addr(words), pb_ffi.sizeof(words))
    assert [t for t, _, _ in found] == [1, 13, 1]


def test_scanner_unaligned_roots(scanner: None, target: Tuple[int, int]) -> None:
    start, _ = target
    pb_lib.pb__scan_retire(start, 64, 3)
    words = pb_ffi.new("uintptr_t[4]", [start, start + 1, start + 2, start + 3])
    base = _addr(words)
    assert base % 8 == 0
    # A root starting at base + 3: the word at base (partly before it) is not scanned,
    # the aligned words at base + 8, + 16, + 24 are, at offsets 5, 13, 21.
    _, found = _findings(base + 3, 29)
    assert found == [(3, 5, start + 1), (3, 13, start + 2), (3, 21, start + 3)]
    # A root ending inside a word: that word is not scanned.
    _, found = _findings(base, 12)
    assert found == [(3, 0, start)]
    assert int(pb_lib.pb__scan_buffer(pb_ffi.cast("char *", words) + 1, 7)) == 0  # no whole word inside
    # A pointer stored at an unaligned address is not seen (aligned words only, like Go's cgocheck=2).
    backing = pb_ffi.new("uintptr_t[5]")
    raw = pb_ffi.cast("char *", backing)
    assert _addr(raw) % 8 == 0
    pb_ffi.memmove(raw + 3, pb_ffi.new("uintptr_t *", start), 8)
    assert int(pb_lib.pb__scan_buffer(raw, 40)) == 0


def test_scanner_reports_the_total_beyond_the_capacity(scanner: None, target: Tuple[int, int]) -> None:
    start, _ = target
    pb_lib.pb__scan_retire(start, 64, 4)
    words = pb_ffi.new("uintptr_t[]", [start, start + 1, start + 2])
    total, found = _findings(_addr(words), pb_ffi.sizeof(words), cap=1)
    assert total == 3 and len(found) == 1  # the count goes on past the capacity


def test_scanner_cancel(scanner: None, target: Tuple[int, int]) -> None:
    s, _ = target
    pb_lib.pb__scan_retire(s, 32, 1)
    pb_lib.pb__scan_retire(s + 40, 10, 2)
    assert pb_lib.pb__scan_cancel(s + 32, 8) == 0  # the gap between them: touches neither
    assert pb_lib.pb__scan_cancel(s + 31, 1) == 1  # the last byte of the first
    assert pb_lib.pb__scan_pending() == 1
    assert _hits([s, s + 45]) == 1
    assert pb_lib.pb__scan_cancel(s + 49, 0) == 1  # a zero-size range at the last byte
    assert pb_lib.pb__scan_pending() == 0 and _hits([s + 45]) == 0


def test_scanner_100_000_targets(scanner: None) -> None:
    n = 100_000
    arena = bytearray(16 * n)  # target i: [base + 16 i, base + 16 i + 8)
    base = _addr(pb_ffi.from_buffer(arena))
    for i in range(n):
        pb_lib.pb__scan_retire(base + 16 * i, 8, i + 1)
    assert pb_lib.pb__scan_pending() == n
    inside = [base + 16 * i + (i % 8) for i in range(n)]  # one pointer into each target
    gaps = [base + 16 * i + 8 + (i % 8) for i in range(n)]  # one into each gap
    words = [w for pair in zip(gaps, inside) for w in pair] + [base - 1, base + 16 * n, base + 16 * n - 8]
    root = pb_ffi.new("uintptr_t[]", words)
    assert _hits(words) == n
    total, found = _findings(_addr(root), pb_ffi.sizeof(root), cap=n + 8)
    assert total == n and len(found) == n
    assert [t for t, _, _ in found] == list(range(1, n + 1))
    assert [off for _, off, _ in found] == [16 * i + 8 for i in range(n)]


# --- no false reports on clean code --------------------------------------------------

def test_checked_call_suites_report_nothing_at_level_2() -> None:
    """tests/test_calls.py and tests/test_checking.py, rerun at level 2 under the pytest plugin."""
    names = ("test_calls.py", "test_checking.py")
    present = [name for name in names if (REPO / "tests" / name).exists()]
    assert present == list(names), f"missing checked-call test files: {set(names) - set(present)}"
    env = dict(os.environ, PTRBRIDGE_CHECK="2")
    # --ptrbridge-no-instrument: these suites test explicit wrap() (identities of raw and wrapped libraries)
    proc = subprocess.run([sys.executable, "-m", "pytest", *[f"tests/{n}" for n in present],
                           "-p", "no:cacheprovider", "-q", "--ptrbridge-no-instrument"],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    tail = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    assert "ptrbridge: no pointer problems found" in proc.stdout, tail
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) > 0, tail
    assert "RetainedPointer" not in proc.stdout, tail


def test_retention_is_a_frozen_record() -> None:
    r = Retention("bytes(4)", "f", "a.py:1", "returned", "root", "registered root #1 (8 bytes at 0x10)",
                  0, 0x20, 0)
    with pytest.raises(AttributeError):
        r.state = "freed"  # type: ignore[misc]
    assert str(r).startswith("ptrbridge: C kept a pointer to Python memory after the call returned (R2): "
                             "bytes(4) lent to f() at a.py:1 is still pointed to by registered root #1")
    assert issubclass(RetainedPointerWarning, ptrbridge.PointerWarning)
    assert issubclass(RetainedPointerError, ptrbridge.PointerError)


def test_a_live_link_map_is_c_memory_not_freed_python_memory() -> None:
    """ld.so's link_map (what dlopen() returns; libsasl2 keeps its plugins' handles) is allocated by
    the loader with libc malloc, outside the interposer, and can land where Python freed a block: a
    word pointing at it is C's, so _live_again excuses it (it was a false 'pointer into freed Python
    memory' in librdkafka's suite).  Checked on the real handles of loaded libraries: the handle
    itself, a field inside it and its l_name; a Python buffer is not."""
    from ptrbridge import scanning

    z = ctypes.CDLL(ctypes.util.find_library("z") or "libz.so.1")
    handle = z._handle

    class LinkMap(ctypes.Structure):
        _fields_ = [("l_addr", ctypes.c_void_p), ("l_name", ctypes.c_void_p), ("l_ld", ctypes.c_void_p),
                    ("l_next", ctypes.c_void_p), ("l_prev", ctypes.c_void_p)]

    lm = LinkMap.from_address(handle)
    assert pb_lib.pb__interpose_in_link_map(handle) == 1
    assert pb_lib.pb__interpose_in_link_map(handle + 3 * ctypes.sizeof(ctypes.c_void_p)) == 1
    assert pb_lib.pb__interpose_in_link_map(lm.l_name) == 1
    assert scanning._live_again(handle, freed_start=handle)
    data = bytearray(4096)
    assert pb_lib.pb__interpose_in_link_map(ctypes.addressof((ctypes.c_char * 4096).from_buffer(data)) + 2048) == 0
    assert pb_lib.pb__interpose_in_link_map(0) == 0


# ---------------------------------------------------------------------------
# Level 2's fast path: a call that lends only bytes and bytearrays runs in C
# (csrc/pycall.c, csrc/pylends.c), and says what the Python closure says.


def _runs_in_c(checked: Any, *args: Any) -> bool:
    """Whether a call of ``checked`` with ``args`` ran without the Python closure's frame."""
    seen: List[str] = []

    def tracer(frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            seen.append(frame.f_code.co_name)

    sys.setprofile(tracer)
    try:
        checked(*args)
    finally:
        sys.setprofile(None)
    return "checked" not in seen


def test_fast_path_reports_what_the_closure_reports(k: Any, keeper_raw: Any) -> None:
    ptrbridge.set_scan_batch(1_000_000)
    data = b"kept in a global"
    assert _runs_in_c(k.keep_copy, data, 3)  # the fast path takes it...
    fast_line = _next_line()
    k.keep_global(data)
    (fast,) = ptrbridge.scan()
    slow_line = _next_line()
    k.keep_global._ptrbridge_slow(data)  # ...and the closure, called directly, says the same
    (slow,) = ptrbridge.scan()
    assert (fast.description, fast.function, fast.lent_at, fast.state) == (
        "bytes(16)", "keep_global", f"{HERE}:{fast_line}", "returned")
    assert (slow.description, slow.function, slow.lent_at) == ("bytes(16)", "keep_global", f"{HERE}:{slow_line}")
    assert (fast.root, fast.offset, fast.address) == (slow.root, slow.offset, slow.address)


_VIEWED = bytearray(b"viewed bytes")


def _lent_kinds(keeper_so: str) -> List[Tuple[str, Any, Any, str]]:
    """(kind, checked library, argument, its description) for each kind the fast path lends."""
    array = (ctypes.c_char * 12).from_buffer_copy(b"ctypes array")
    ctypes_lib = ptrbridge.wrap(ctypes.CDLL(keeper_so))
    cffi_ffi = cffi.FFI()
    cffi_ffi.cdef(KEEPER_CDEF)
    cdata = cffi_ffi.new("char[]", b"ffi.new memory")
    view = cffi_ffi.from_buffer(_VIEWED)
    cffi_lib = ptrbridge.wrap(cffi_ffi.dlopen(keeper_so))
    return [("cffi bytes", cffi_lib, b"kept bytes", "bytes(10)"),
            ("cffi ffi.new", cffi_lib, cdata, "cdata 'char[]'(15)"),
            ("cffi from_buffer", cffi_lib, view, "bytearray(12)"),
            ("ctypes bytes", ctypes_lib, b"kept bytes", "bytes(10)"),
            ("ctypes array", ctypes_lib, array, "c_char_Array_12(12)"),
            ("ctypes byref", ctypes_lib, ctypes.byref(array), "c_char_Array_12(12)")]


def test_fast_path_lends_each_kind_as_the_closure_does(level2: None, tmp_path: Path) -> None:
    so = str(build_shared("keeper.c", tmp_path))
    ptrbridge.set_scan_batch(1_000_000)
    kinds = _lent_kinds(so)
    try:
        _lends_each_kind(kinds)
    finally:
        kinds[0][1].keeper_clear()


def _lends_each_kind(kinds: List[Tuple[str, Any, Any, str]]) -> None:
    for kind, lib_, arg, text in kinds:
        lib_.keep_copy(arg, 1)  # the first call of a type: the closure learns its shape
        assert _runs_in_c(lib_.keep_copy, arg, 1), kind
        ptrbridge.scan()
        fast_line = _next_line()
        lib_.keep_global(arg)
        (fast,) = ptrbridge.scan()
        checked = type(lib_.keep_global).__call__ if kind.startswith("ctypes") else lib_.keep_global
        slow_line = _next_line()
        checked._ptrbridge_slow(arg)  # the Python closure, which the fast path stands for
        (slow,) = ptrbridge.scan()
        assert (fast.description, fast.function, fast.lent_at) == (text, "keep_global", f"{HERE}:{fast_line}"), kind
        assert (slow.description, slow.function, slow.lent_at) == (text, "keep_global", f"{HERE}:{slow_line}"), kind
        assert (fast.address, fast.object_size) == (slow.address, slow.object_size), kind
        lib_.keeper_clear()


def test_fast_path_counts_its_lends_and_scans_by_the_batch(k: Any) -> None:
    ptrbridge.set_scan_batch(3)
    ptrbridge.scan()
    before = findings.counters().get("lends", 0)
    data = b"kept at the third call"
    k.keep_global(data)
    k.keep_global(data)
    line = _next_line() + 1
    with pytest.raises(RetainedPointerError) as info:
        k.keep_global(data)  # the batch of 3 is due: the scan runs here
    (r,) = info.value.retentions
    assert (r.description, r.lent_at) == ("bytes(22)", f"{HERE}:{line}")  # lent again: the last lend
    assert findings.counters()["lends"] - before == 3
    assert k.keep_copy(b"two buffers? one", 4) == 0 and findings.counters()["lends"] - before == 4


def test_fast_path_lend_is_a_lent_region_while_the_call_runs(level2: None, abi: Tuple[Any, Any]) -> None:
    from ptrbridge import ownership

    c = ptrbridge.wrap(abi[1])
    read_end, write_end = os.pipe()
    text = b"held while C waits" + b"!" * 14
    result: List[int] = []
    assert _runs_in_c(c.text_len, text)
    worker = threading.Thread(target=lambda: result.append(c.wait_then_len(read_end, text)))
    address = _addr(pb_ffi.from_buffer(text))
    try:
        worker.start()
        info = None
        for _ in range(10_000):  # until the worker is inside read(): its buffer is lent
            info = ownership.lookup(address + 5)
            if info is not None:
                break
            threading.Event().wait(0.001)
        assert info is not None and (info.kind, info.start, info.size, info.description) == (
            "lent", address, 32, "bytes(32)")
        os.write(write_end, b"!")
        worker.join()
    finally:
        os.close(read_end)
        os.close(write_end)
    assert result == [32] and ownership.lookup(address) is None and ptrbridge.scan() == []


def test_fast_path_from_many_threads_is_clean_and_counted(level2: None, abi: Tuple[Any, Any]) -> None:
    c = ptrbridge.wrap(abi[1])  # text_len is thread-safe (keeper's functions are not)
    ptrbridge.set_scan_batch(7)
    before = findings.counters().get("lends", 0)
    errors: List[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(2000):
                assert c.text_len(bytes([65 + n]) * (i % 50 + 1)) == i % 50 + 1
        except BaseException as exc:  # noqa: B902 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and ptrbridge.scan() == [] and ptrbridge.violations() == []
    assert findings.counters()["lends"] - before == 8000


_FAST_PROVENANCE_CHILD = """
import sys, cffi, ptrbridge
from ptrbridge import heapmap, scanning
ffi = cffi.FFI()
ffi.cdef("int keep_copy(const char *p, size_t n);")
k = ptrbridge.wrap(ffi.dlopen(sys.argv[1]))
ptrbridge.set_check_level(2)
heapmap.set_hold(0, 0)
first = b"A" * int("60")
block = heapmap.lookup_block(id(first))
k.keep_copy(first, 1)                  # a fast lend, once
other = b"B" * int("90")
for _ in range(70000):                 # then another, more often than the history holds lends
    k.keep_copy(other, 1)
del first
print(scanning.lent_provenance(block.start, block.size))
"""


def test_fast_path_lends_keep_their_provenance(keeper_raw: Any, tmp_path: Path) -> None:
    """A use-after-free report names a buffer a fast call lent, and a loop lending one buffer
    again and again refreshes its record instead of pushing the others out."""
    so = build_shared("keeper.c", tmp_path)
    proc = subprocess.run([sys.executable, "-c", _FAST_PROVENANCE_CHILD, str(so)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == ["('bytes(60)', 'keep_copy', '<string>:11')"], proc.stdout


def test_fast_path_leaves_ctypes_addresses_to_the_closure(level2: None, checked_so: Path) -> None:
    """At level 2 a ctypes int may be an address the closure checks against freed memory: only
    one below the lowest address anything can be mapped at (vm.mmap_min_addr) is taken in C."""
    c = ptrbridge.wrap(ctypes.CDLL(str(checked_so)))
    try:
        low = int(Path("/proc/sys/vm/mmap_min_addr").read_text()) or 1
    except OSError:
        low = 4096
    assert _runs_in_c(c.add, 0, low - 1) and _runs_in_c(c.add, -5, 3)
    assert not _runs_in_c(c.add, low, 1) and not _runs_in_c(c.add, 1 << 40, 1)
    assert c.add(low - 1, 1) == low and c.add(2, 3) == 5
