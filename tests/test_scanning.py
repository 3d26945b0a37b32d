"""Rule R2 at check level 2: finding pointers C kept, with real libraries."""
from __future__ import annotations

import ctypes
import gc
import importlib.util
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any, Iterator, Tuple

import cffi
import pytest

import ptrbridge
from ptrbridge import RetainedPointerError, RetainedPointerWarning
from ptrbridge._bindings import ffi as pb_ffi
from ptrbridge._bindings import lib as pb_lib

from cbuild import build_shared

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def level2() -> Iterator[None]:
    with ptrbridge.checking(2):
        old = ptrbridge.set_on_violation("raise")
        old_batch = ptrbridge.set_scan_batch(1)  # scan after every call: exact blame
        try:
            yield
        finally:
            ptrbridge.set_scan_batch(old_batch)
            ptrbridge.set_on_violation(old)
            ptrbridge.clear_violations()
            ptrbridge.scan()  # leave no queued targets behind


@pytest.fixture(scope="module")
def keeper(tmp_path_factory: pytest.TempPathFactory) -> Tuple[Any, Any]:
    so = build_shared("keeper.c", tmp_path_factory.mktemp("keeper"))
    kffi = cffi.FFI()
    kffi.cdef("""
        void keep_global(const char *p);
        int keep_heap(const char *p);
        int keep_indirect(const char *p);
        int keep_copy(const char *p, size_t n);
        int keeper_read(void);
        void keeper_clear(void);
    """)
    raw = kffi.dlopen(str(so))
    return kffi, raw


@pytest.fixture
def k(keeper: Tuple[Any, Any], level2: None) -> Iterator[Any]:
    kffi, raw = keeper
    ptrbridge.watch_library("libkeeper")
    try:
        yield ptrbridge.wrap(raw)
    finally:
        raw.keeper_clear()
        ptrbridge.unwatch_library("libkeeper")


# --- a C library that keeps pointers ----------------------------------------------

def test_pointer_kept_in_a_global_is_found(k: Any) -> None:
    data = b"kept in a global"
    with pytest.raises(RetainedPointerError) as info:
        k.keep_global(data)
    (retention,) = info.value.retentions
    assert retention.description == "bytes(16)" and retention.function == "keep_global"
    assert retention.lent_at.startswith("test_scanning.py:") and retention.state == "returned"
    assert retention.root_kind == "library" and "global 'kept_global' of libkeeper.so" in retention.root
    message = str(info.value)
    assert message.startswith("ptrbridge: C kept a pointer to Python memory after the call returned (R2): bytes(16)")
    assert "pin the object for as long as C keeps the pointer" in message


def test_pointer_kept_in_a_heap_block_is_found(k: Any) -> None:
    with pytest.raises(RetainedPointerError) as info:
        k.keep_heap(b"in a heap block")
    (retention,) = info.value.retentions
    assert retention.root_kind == "allocation" and "C heap block" in retention.root
    assert retention.offset == 0


def test_pointer_reached_through_another_block_is_found(k: Any) -> None:
    data = bytearray(b"two blocks deep\0")
    with pytest.raises(RetainedPointerError, match=r"bytearray\(16\) lent to keep_indirect\(\)"):
        k.keep_indirect(pb_ffi.from_buffer(data))


def test_copying_library_is_clean(k: Any) -> None:
    data = b"copied"
    assert k.keep_copy(data, len(data)) == 0
    assert ptrbridge.scan() == []
    assert k.keeper_read() == ord("c")


def test_pinned_for_as_long_as_c_keeps_it_is_clean(k: Any) -> None:
    data = bytearray(b"pinned\0")
    with ptrbridge.Pinner() as p:
        k.keep_global(p.pin(data))  # allowed: pinned
        assert k.keeper_read() == ord("p")
        ptrbridge.unwrap(k).keeper_clear()  # C lets go before the unpin


def test_unpin_while_c_still_holds_it(k: Any) -> None:
    data = bytearray(b"pinned\0")
    p = ptrbridge.Pinner()
    k.keep_global(p.pin(data))
    with pytest.raises(RetainedPointerError) as info:
        p.unpin()
    (retention,) = info.value.retentions
    assert retention.state == "unpinned" and retention.function == "Pinner.pin"
    assert "after it was unpinned" in str(retention)


def test_violation_modes(k: Any) -> None:
    ptrbridge.set_on_violation("collect")
    k.keep_global(b"collected")
    found = ptrbridge.violations()
    assert len(found) == 1 and found[0].description == "bytes(9)"
    assert ptrbridge.clear_violations() == found and ptrbridge.violations() == []
    ptrbridge.set_on_violation("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        k.keep_global(b"warned")
    assert any(issubclass(w.category, RetainedPointerWarning) for w in caught)
    with pytest.raises(ValueError, match="mode must be 'raise', 'warn' or 'collect'"):
        ptrbridge.set_on_violation("ignore")


def test_freed_ptrbridge_new_still_held(k: Any) -> None:
    owner = ptrbridge.new("char[]", b"soon freed")
    p = ptrbridge.Pinner()
    k.keep_heap(p.pin(owner))
    ptrbridge.set_on_violation("collect")
    p.unpin()  # reported as unpinned; then the object dies
    ptrbridge.clear_violations()
    del owner
    gc.collect()
    found = ptrbridge.scan()
    assert [r.state for r in found] == ["freed"] and found[0].function == "ptrbridge.new"


def test_raw_pointer_known_only_to_the_heap_map(k: Any) -> None:
    class Holder:
        pass

    holder = Holder()
    holder.data = bytearray(b"only the heap map knows\0")  # not a local: level 1 cannot see it
    raw = pb_ffi.cast("char *", int(pb_ffi.cast("uintptr_t", pb_ffi.from_buffer(holder.data))))
    with pytest.raises(RetainedPointerError, match=r"Python memory block \(\d+ bytes"):
        k.keep_global(raw)


def test_heap_map_recognises_raw_addresses_in_structs(level2: None) -> None:
    libc_ffi = cffi.FFI()
    libc_ffi.cdef("struct iovec { void *iov_base; size_t iov_len; }; ssize_t writev(int, const struct iovec *, int);")
    libc = ptrbridge.wrap(libc_ffi.dlopen(None))

    class Holder:
        pass

    holder = Holder()
    holder.data = bytearray(b"raw")
    iov = libc_ffi.new("struct iovec[1]")
    iov[0].iov_base = libc_ffi.cast("void *", int(libc_ffi.cast("uintptr_t", libc_ffi.from_buffer(holder.data))))
    iov[0].iov_len = 3
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(ptrbridge.NestedPointerError, match=r"\.iov_base -> Python memory block \(4 bytes, \w+ allocator\)"):
            libc.writev(write_end, iov, 1)
        with ptrbridge.checking(1):
            assert libc.writev(write_end, iov, 1) == 3  # level 1 cannot know this address
    finally:
        os.close(read_end)
        os.close(write_end)


def test_watch_unknown_library(level2: None) -> None:
    with pytest.raises(ValueError, match="no loaded library's path contains"):
        ptrbridge.watch_library("libdoes-not-exist")
    with pytest.raises(ValueError):
        ptrbridge.unwatch_library("never-watched")


def test_registered_roots(level2: None) -> None:
    root = ctypes.create_string_buffer(64)
    data = bytearray(32)
    rid = ptrbridge.add_root(ctypes.addressof(root), 64)
    try:
        pinner = ptrbridge.Pinner()
        ctypes.c_void_p.from_buffer(root).value = int(pb_ffi.cast("uintptr_t", pinner.pin(data)))
        with pytest.raises(RetainedPointerError) as info:
            pinner.unpin()
        assert info.value.retentions[0].root_kind == "root"
        assert f"registered root #{rid}" in info.value.retentions[0].root
    finally:
        ptrbridge.remove_root(rid)
    with pytest.raises(ptrbridge.PointerError):
        ptrbridge.remove_root(rid)
    with pytest.raises(ValueError):
        ptrbridge.add_root(ctypes.addressof(root), -1)


# --- the scanner itself -------------------------------------------------------------

@pytest.fixture
def target() -> Iterator[Tuple[int, int]]:
    block = bytearray(64)
    start = int(pb_ffi.cast("uintptr_t", pb_ffi.from_buffer(block)))
    yield start, 64
    pb_lib.pb__scan_run(pb_ffi.NULL, 0, 0, pb_ffi.NULL)  # drop queued targets


def _hits(words: list) -> int:
    buf = pb_ffi.new("uintptr_t[]", words)
    return int(pb_lib.pb__scan_buffer(buf, pb_ffi.sizeof(buf)))


def test_scanner_edges(target: Tuple[int, int]) -> None:
    start, size = target
    pb_lib.pb__scan_retire(start, size, 1)
    assert _hits([start]) == 1
    assert _hits([start + size - 1]) == 1
    assert _hits([start + size]) == 0  # one past the end: not a pointer into it
    assert _hits([start - 1, 0, 12345, (1 << 64) - 1]) == 0
    assert _hits([start, start + 8, 7, start + 63]) == 3
    raw = pb_ffi.new("char[]", 8 * 4 + 3)  # an unaligned root: only aligned words count
    pb_ffi.memmove(raw + 3, pb_ffi.new("uintptr_t[]", [start, start]), 16)
    assert int(pb_lib.pb__scan_buffer(raw + 3, 16)) <= 1


def test_zero_size_and_overlapping_targets(target: Tuple[int, int]) -> None:
    start, size = target
    pb_lib.pb__scan_retire(start + 10, 0, 5)
    assert _hits([start + 10]) == 1 and _hits([start + 11]) == 0
    pb_lib.pb__scan_retire(start, size, 6)
    pb_lib.pb__scan_retire(start, size, 7)
    out = pb_ffi.new("struct pb_finding[4]")
    holder = ptrbridge.CBuffer(8)
    pb_ffi.cast("uintptr_t *", holder.ptr)[0] = start + 10
    try:
        assert pb_lib.pb__scan_run(out, 4, 0, pb_ffi.NULL) == 1
        assert out[0].target_id == 7  # the most recently queued wins
    finally:
        holder.free()


def test_many_targets(target: Tuple[int, int]) -> None:
    start, _ = target
    big = bytearray(100_000 * 16)
    base = int(pb_ffi.cast("uintptr_t", pb_ffi.from_buffer(big)))
    for i in range(100_000):
        pb_lib.pb__scan_retire(base + 16 * i, 8, i + 1)
    assert _hits([base + 16 * 500 + 4, base + 16 * 500 + 8, base + 16 * 99_999]) == 2


# --- real libraries -----------------------------------------------------------------

def _zlib_example() -> Any:
    spec = importlib.util.spec_from_file_location("zlib_stream", REPO / "examples" / "zlib_stream.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_zlib_next_in_into_a_temporary(level2: None) -> None:
    z = _zlib_example()
    base = ptrbridge.stats().live_blocks
    d = z.Deflater()
    assert ptrbridge.stats().live_blocks > base + 2  # the z_stream, the out buffer and zlib's own state
    try:
        with pytest.raises(RetainedPointerError) as info:
            d.feed_buggy(os.urandom(1 << 18))
        (retention,) = info.value.retentions
        assert retention.description == "bytes(262144)" and retention.function == "deflate"
        assert retention.root_kind == "allocation" and retention.object_offset > 0
    finally:
        d.stream.c.next_in, d.stream.c.avail_in = z.ffi.NULL, 0  # zlib must not read the temporary
        d.finish()
    assert ptrbridge.stats().live_blocks == base


@pytest.mark.parametrize("feed", ["pinned", "copied"])
def test_zlib_correct_wrappers_are_clean(level2: None, feed: str) -> None:
    import zlib as py_zlib

    z = _zlib_example()
    chunks = [os.urandom(1 << 17) for _ in range(3)]
    with ptrbridge.Pinner() as pinner:
        method = (lambda d, c: d.feed_pinned(c, pinner)) if feed == "pinned" else z.Deflater.feed_copied
        out = z.compress(chunks, method)
    assert py_zlib.decompress(out) == b"".join(chunks)
    assert ptrbridge.scan() == []


SQLITE_PROGRAM = """
import cffi, ptrbridge
ffi = cffi.FFI()
ffi.cdef('''
    typedef struct sqlite3 sqlite3; typedef struct sqlite3_stmt sqlite3_stmt;
    int sqlite3_config(int, ...);
    int sqlite3_open(const char *filename, sqlite3 **db);
    int sqlite3_exec(sqlite3 *, const char *sql, void *, void *, char **err);
    int sqlite3_prepare_v2(sqlite3 *db, const char *sql, int n, sqlite3_stmt **stmt, const char **tail);
    int sqlite3_bind_blob(sqlite3_stmt *, int, const void *, int n, void (*)(void *));
    int sqlite3_step(sqlite3_stmt *);
    int sqlite3_finalize(sqlite3_stmt *);
    int sqlite3_close(sqlite3 *);
''')
raw = ffi.dlopen("libsqlite3.so.0")
assert raw.sqlite3_config(4, ffi.cast("void *", ptrbridge.c_allocator().sqlite3_mem_methods)) == 0
sq = ptrbridge.wrap(raw)
db = ffi.new("sqlite3 **")
assert sq.sqlite3_open(b":memory:", db) == 0
assert sq.sqlite3_exec(db[0], b"create table t(b blob)", ffi.NULL, ffi.NULL, ffi.NULL) == 0
print("tracked blocks after open:", ptrbridge.stats().live_blocks > 5)
STATIC, TRANSIENT = ffi.cast("void (*)(void *)", 0), ffi.cast("void (*)(void *)", -1)

def insert(destructor, data):
    stmt = ffi.new("sqlite3_stmt **")
    sq.sqlite3_prepare_v2(db[0], b"insert into t values (?)", -1, stmt, ffi.NULL)
    try:
        sq.sqlite3_bind_blob(stmt[0], 1, data, len(data), destructor)
        assert sq.sqlite3_step(stmt[0]) == 101
    finally:
        sq.sqlite3_finalize(stmt[0])

ptrbridge.set_check_level(2)
ptrbridge.set_scan_batch(1)  # scan right after each call: exact blame, whatever the load
insert(TRANSIENT, bytes(200))
print("transient findings:", ptrbridge.scan())
try:
    insert(STATIC, bytes(range(200)))
    print("static: not reported")
except ptrbridge.RetainedPointerError as exc:
    print("static reported:", exc.retentions[0].description, exc.retentions[0].function, exc.retentions[0].root_kind)
sq.sqlite3_close(db[0])
"""


def test_sqlite_static_blob_is_reported_transient_is_clean(tmp_path: Path) -> None:
    script = tmp_path / "sqlite_check.py"
    script.write_text(textwrap.dedent(SQLITE_PROGRAM))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "tracked blocks after open: True" in proc.stdout
    assert "transient findings: []" in proc.stdout
    assert "static reported: bytes(200) sqlite3_bind_blob allocation" in proc.stdout


def test_checked_call_suites_report_nothing_at_level_2() -> None:
    """No false reports on clean code: the checked-call tests, rerun at level 2 under the plugin."""
    env = dict(os.environ, PTRBRIDGE_CHECK="2")
    tests = [str(REPO / "tests" / name) for name in ("test_calls.py", "test_checking.py", "test_callbacks.py")]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "ptrbridge: no pointer problems found" in proc.stdout
