"""The level-2 heap map: allocator hooks that index every Python block (ptrbridge.heapmap)."""
from __future__ import annotations

import array
import contextlib
import ctypes
import gc
import os
import subprocess
import sys
import textwrap
import threading
import tracemalloc
from pathlib import Path
from typing import Any, Callable, Iterator, List, Tuple

import cffi
import pytest

import ptrbridge
from ptrbridge import heapmap
from ptrbridge._bindings import NATIVE_PATH, ffi
from ptrbridge.testing import assert_no_growth

def data_address(obj: Any) -> int:
    """Address of the first byte of a buffer's data."""
    view = ffi.from_buffer(obj)
    try:
        return int(ffi.cast("uintptr_t", view))
    finally:
        ffi.release(view)


@pytest.fixture
def hooked() -> Iterator[None]:
    """The heap map recording for one test, with the default hold."""
    assert heapmap.install() is True
    try:
        yield
    finally:
        heapmap.set_hold()
        assert heapmap.uninstall() is True
    assert not heapmap.installed()


# ---- installing and levels -------------------------------------------------------------


def test_install_and_uninstall_report_whether_they_changed_anything() -> None:
    assert not heapmap.installed()
    assert heapmap.uninstall() is False
    assert heapmap.install() is True
    try:
        assert heapmap.installed() and heapmap.install() is False
        assert heapmap.stats().hooked_domains == ("raw", "mem", "object")
    finally:
        assert heapmap.uninstall() is True
    assert heapmap.uninstall() is False
    counters = heapmap.stats()
    assert not counters.installed and counters.hooked_domains == ()
    assert counters.live_blocks == 0 and counters.held_blocks == 0 and counters.freed_history == 0


def test_level_two_installs_and_leaving_it_uninstalls() -> None:
    assert ptrbridge.check_level() == 1 and not heapmap.installed()
    with ptrbridge.checking(2):
        assert heapmap.installed()
        kept = bytearray(300)
        assert heapmap.lookup(data_address(kept)) is not None
    assert not heapmap.installed()
    assert heapmap.lookup(data_address(kept)) is None  # the map was cleared
    old = ptrbridge.set_check_level(2)
    try:
        assert heapmap.installed()
        ptrbridge.set_check_level(0)
        assert not heapmap.installed()
        ptrbridge.set_check_level(2)
        assert heapmap.installed()
    finally:
        ptrbridge.set_check_level(old)
    assert not heapmap.installed()


def test_level_two_from_the_environment_installs_at_import() -> None:
    code = "import ptrbridge; from ptrbridge import heapmap; print(heapmap.installed())"
    for level, expected in (("2", "True"), ("1", "False")):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env=dict(os.environ, PTRBRIDGE_CHECK=level))
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == expected


# ---- lookups ---------------------------------------------------------------------------


def _bytearray(n: int) -> Tuple[Any, int, Callable[[Any, Tuple[int, int]], bool]]:
    obj = bytearray(n)
    return obj, data_address(obj), lambda o, b: b == (data_address(o), o.__alloc__())


def _bytes(n: int) -> Tuple[Any, int, Callable[[Any, Tuple[int, int]], bool]]:
    obj = bytes(bytearray(n))  # made at run time, not a constant of the code object
    return obj, data_address(obj), lambda o, b: b == (id(o), sys.getsizeof(o))


def _ctypes(n: int) -> Tuple[Any, int, Callable[[Any, Tuple[int, int]], bool]]:
    obj = (ctypes.c_char * n)()
    if n <= 16:  # small ctypes data is stored inside the object
        return obj, ctypes.addressof(obj), lambda o, b: b[0] < ctypes.addressof(o) < b[0] + b[1]
    return obj, ctypes.addressof(obj), lambda o, b: b == (ctypes.addressof(o), ctypes.sizeof(o))


def _array(n: int) -> Tuple[Any, int, Callable[[Any, Tuple[int, int]], bool]]:
    obj = array.array("B", bytes(n))
    return obj, obj.buffer_info()[0], lambda o, b: b[0] == o.buffer_info()[0] and b[1] >= n


def _from_buffer(n: int) -> Tuple[Any, int, Callable[[Any, Tuple[int, int]], bool]]:
    owner = bytearray(n)
    view = ffi.from_buffer(owner)
    return (owner, view), int(ffi.cast("uintptr_t", view)), lambda o, b: b[0] == data_address(o[0])


MAKERS = {"bytearray": _bytearray, "bytes": _bytes, "ctypes": _ctypes, "array": _array,
          "ffi.from_buffer": _from_buffer}
SIZES = [1, 8, 16, 17, 100, 496, 512, 513, 4096, 100_000, 3 << 20]


@pytest.mark.parametrize("kind", sorted(MAKERS))
@pytest.mark.parametrize("n", SIZES)
def test_every_byte_of_a_new_buffer_is_found_in_its_block(hooked: None, kind: str, n: int) -> None:
    obj, data, exact = MAKERS[kind](n)
    blocks = {heapmap.lookup(data + offset) for offset in {0, 1, n // 2, n - 1}}
    assert len(blocks) == 1
    block = blocks.pop()
    assert block is not None, f"{kind}({n}) at {data:#x} not in the heap map"
    start, size = block
    assert start <= data and data + n <= start + size
    assert exact(obj, block), (kind, n, block, data)
    if isinstance(obj, tuple):
        ffi.release(obj[1])


# Which domain an object's memory comes from is an implementation detail of each CPython
# version (bytes: "object" up to 3.12, "mem" on 3.13): tests accept either.
PYTHON_DOMAINS = ("mem", "object")


def test_block_details_and_edges(hooked: None) -> None:
    buf = bytearray(1000)
    start = data_address(buf)
    block = heapmap.lookup_block(start + 999)
    assert block is not None and (block.start, block.size) == (start, 1001) and block.domain in PYTHON_DOMAINS
    assert heapmap.lookup(start - 1) != (start, 1001)  # the byte before belongs to someone else
    assert heapmap.lookup(start + 1001) != (start, 1001)  # one past the end: not this block
    small = bytearray(b"x" * 40)
    assert heapmap.lookup_block(data_address(small)).domain in PYTHON_DOMAINS
    items = array.array("B", b"ab")
    block = heapmap.lookup_block(items.buffer_info()[0])
    assert block is not None and block.start == items.buffer_info()[0] and block.domain in PYTHON_DOMAINS


@pytest.mark.parametrize("address", [0, 8, 4096, 2**47 + 16, 2**63, 2**64 - 1])
def test_addresses_outside_the_python_heap_are_not_found(hooked: None, address: int) -> None:
    assert heapmap.lookup(address) is None
    assert heapmap.find_freed(address) is None


@pytest.fixture
def old_buffer() -> bytearray:
    """A buffer allocated before the heap map is installed (list this fixture first)."""
    return bytearray(2000)


def test_c_memory_and_old_objects_are_not_found(old_buffer: bytearray, hooked: None) -> None:
    cbuf = ptrbridge.CBuffer(256)  # the tracked C allocator: malloc, not Python's
    try:
        assert heapmap.lookup(data_address(cbuf) + 10) is None
    finally:
        cbuf.free()
    assert heapmap.lookup(data_address(old_buffer)) is None  # allocated before install


def test_ffi_new_memory_is_not_seen_by_allocator_hooks(hooked: None) -> None:
    # cffi allocates ffi.new() memory with malloc itself, not through Python's
    # allocators: level 1 (locals, ptrbridge.new, pins) recognises it instead.
    owned = ffi.new("char[]", 100)
    assert heapmap.lookup(int(ffi.cast("uintptr_t", owned))) is None


@pytest.mark.parametrize("bad", [-1, 2**64, -(2**70)])
def test_an_address_must_fit_in_a_pointer(bad: int) -> None:
    with pytest.raises(ValueError, match=r"ptrbridge: heapmap\.lookup\(.*\): an address is an int in 0"):
        heapmap.lookup(bad)
    with pytest.raises(ValueError, match=r"ptrbridge: heapmap\.find_freed\(.*\): an address"):
        heapmap.find_freed(bad)


@pytest.mark.parametrize("bad", ["0x10", 1.5, None])
def test_an_address_must_be_an_int(bad: object) -> None:
    with pytest.raises(TypeError, match=r"ptrbridge: heapmap\.lookup\(\): expected an int address"):
        heapmap.lookup(bad)  # type: ignore[arg-type]


def test_realloc_moves_the_entry(hooked: None) -> None:
    buf = bytearray(b"x" * 64)
    before = data_address(buf)
    buf.extend(bytes(200_000))  # PyObject_Realloc: moved to the raw domain
    after = data_address(buf)
    assert heapmap.lookup(after + 200_000) == (after, buf.__alloc__())
    if after != before:
        assert heapmap.lookup(before) != (before, 65)


# ---- freed blocks ----------------------------------------------------------------------


@pytest.mark.parametrize("n", [30, 400, 5000, 1 << 20])
def test_a_freed_block_leaves_the_map_and_enters_the_history(hooked: None, n: int) -> None:
    heapmap.take_freed()
    buf = bytearray(n)
    start = data_address(buf)
    block = heapmap.lookup(start)
    assert block is not None
    del buf
    assert heapmap.lookup(start) is None  # held back: not reused yet
    assert heapmap.find_freed(start + n - 1) == block
    freed = heapmap.find_freed_block(start)
    # Large ones too keep the outer domain (pymalloc passes them on to the raw domain).
    assert freed is not None and freed.domain in PYTHON_DOMAINS
    taken = heapmap.take_freed()
    assert block in taken
    assert block not in heapmap.take_freed()  # taken once
    assert heapmap.find_freed(start) == block  # the history is kept


def test_find_freed_prefers_the_live_block_and_the_latest_free(hooked: None) -> None:
    heapmap.set_hold(0, 0)
    first = bytearray(48)
    start = data_address(first)
    del first
    assert heapmap.find_freed(start) == (start, 49)
    reused = [bytearray(48) for _ in range(2000)]  # pymalloc hands the block out again
    assert heapmap.lookup(start) is not None, "the freed block was not reused"
    assert heapmap.find_freed(start) is None  # live again: not freed memory
    del reused
    latest = heapmap.find_freed(start)
    assert latest is not None and latest[0] == start and heapmap.lookup(start) is None


def test_never_freed_addresses_have_no_history(hooked: None) -> None:
    live = bytearray(100)
    assert heapmap.find_freed(data_address(live) + 5) is None


def test_the_history_is_bounded(hooked: None) -> None:
    first = bytearray(64)
    start = data_address(first)
    del first
    assert heapmap.find_freed(start) is not None
    from ptrbridge._bindings import lib

    capacity = lib.PB_HEAPMAP_FREED_HISTORY
    for _ in range(capacity // 100_000 + 2):  # more frees than the history holds per path
        junk = [bytes(bytearray(40)) for _ in range(100_000)]
        del junk
    counters = heapmap.stats()
    assert counters.freed_history <= 2 * capacity
    assert counters.freed_dropped > 0 and counters.freed_pending <= 2 * capacity
    found = heapmap.find_freed(start)
    assert found is None or found != (start, 65)  # forgotten, or a later block freed there
    taken = heapmap.take_freed()
    assert capacity <= len(taken) <= 2 * capacity  # everything remembered, once


def test_held_blocks_are_not_reused_and_are_released_on_uninstall() -> None:
    heapmap.install()
    try:
        heapmap.set_hold(1000, 1 << 20)  # room for the 100 blocks below and incidental frees
        doomed = [bytearray(32) for _ in range(50)]
        addresses = {data_address(b) for b in doomed}
        del doomed
        counters = heapmap.stats()
        assert counters.held_blocks >= 50 and counters.held_bytes >= 50 * 33
        fresh = [bytearray(32) for _ in range(50)]
        assert not addresses & {data_address(b) for b in fresh}
        churn = [bytearray(32) for _ in range(1000)]  # pushes the held ones out, oldest first
        del churn
        assert heapmap.stats().held_blocks <= 1000 * len(heapmap.DOMAINS)  # the limit is per domain
    finally:
        heapmap.set_hold()
        heapmap.uninstall()
    assert heapmap.stats().held_blocks == 0 and heapmap.stats().held_bytes == 0
    del fresh


@pytest.mark.parametrize("blocks, nbytes", [(-1, 0), (0, -1), (8193, 1 << 20)])
def test_set_hold_rejects_bad_limits(blocks: int, nbytes: int) -> None:
    with pytest.raises(ValueError, match=r"ptrbridge: heapmap\.set_hold"):
        heapmap.set_hold(blocks, nbytes)


# ---- crossing install and uninstall ----------------------------------------------------


def test_blocks_cross_install_and_uninstall_in_both_directions() -> None:
    before = [bytearray(n) for n in (10, 600, 70_000) for _ in range(30)]
    before_numbers = [[i] * 50 for i in range(200)]
    heapmap.install()
    try:
        during = [bytearray(n) for n in (10, 600, 70_000) for _ in range(30)]
        grown = [bytearray(10) for _ in range(30)]
        del before, before_numbers  # allocated unhooked, freed hooked
        for b in grown:
            b.extend(bytes(5000))  # realloc of a hooked block
    finally:
        heapmap.uninstall()
    for b in during:
        b.extend(bytes(1000))  # realloc of a hooked block, unhooked
    del during, grown  # allocated hooked, freed unhooked
    gc.collect()


def test_crossing_cycles_do_not_leak() -> None:
    held: List[bytearray] = []

    def cycle() -> None:
        held.append(bytearray(256 << 10))  # allocated unhooked ...
        heapmap.install()
        held.append(bytearray(256 << 10))  # ... and hooked
        del held[0]  # unhooked block freed hooked
        heapmap.uninstall()
        del held[0]  # hooked block freed unhooked

    growth = assert_no_growth(cycle, n=200, max_bytes=16 << 20, warmup=5)
    assert growth.calls == 200


# ---- threads ---------------------------------------------------------------------------

RAW_CHURN_C = r"""
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
void *PyMem_RawMalloc(size_t n);
void *PyMem_RawCalloc(size_t n, size_t size);
void *PyMem_RawRealloc(void *p, size_t n);
void PyMem_RawFree(void *p);

static atomic_int stop;
static atomic_ulong total;
static pthread_t threads[16];
static int nthreads;

static void *churn(void *arg) {
    void *keep[64] = {0};
    unsigned long n = (unsigned long)(size_t)arg * 7919;
    while (!atomic_load(&stop)) {
        size_t i = n % 64;
        PyMem_RawFree(keep[i]);
        switch (n % 4) {
        case 0: keep[i] = PyMem_RawMalloc(1 + (n * 37) % 700); break;
        case 1: keep[i] = PyMem_RawCalloc(1 + n % 50, 16); break;
        case 2: keep[i] = PyMem_RawMalloc(70000 + n % 1000); break;
        default: keep[i] = PyMem_RawRealloc(PyMem_RawMalloc(24), 24 + (n * 13) % 3000); break;
        }
        n++;
    }
    for (int i = 0; i < 64; i++) PyMem_RawFree(keep[i]);
    atomic_fetch_add(&total, n);
    return NULL;
}

int raw_churn_start(int k) {
    atomic_store(&stop, 0);
    atomic_store(&total, 0);
    for (nthreads = 0; nthreads < k && nthreads < 16; nthreads++)
        if (pthread_create(&threads[nthreads], NULL, churn, (void *)(size_t)nthreads) != 0) return -1;
    return 0;
}

unsigned long raw_churn_stop(void) {
    atomic_store(&stop, 1);
    for (int i = 0; i < nthreads; i++) pthread_join(threads[i], NULL);
    nthreads = 0;
    return atomic_load(&total);
}

struct job { size_t size; void *ptr; };
static void *alloc_job(void *arg) { struct job *j = arg; j->ptr = PyMem_RawMalloc(j->size); return NULL; }
static void *free_job(void *arg) { struct job *j = arg; PyMem_RawFree(j->ptr); return NULL; }

/* PyMem_RawMalloc/RawFree on a thread that never held the GIL. */
void *raw_alloc_elsewhere(size_t size) {
    struct job j = {size, NULL}; pthread_t t;
    pthread_create(&t, NULL, alloc_job, &j); pthread_join(t, NULL);
    return j.ptr;
}
void raw_free_elsewhere(void *p) {
    struct job j = {0, p}; pthread_t t;
    pthread_create(&t, NULL, free_job, &j); pthread_join(t, NULL);
}
"""


@pytest.fixture(scope="module")
def raw_churn(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A C library whose threads call PyMem_Raw* without the GIL."""
    src = tmp_path_factory.mktemp("rawchurn") / "rawchurn.c"
    src.write_text(RAW_CHURN_C)
    so = src.with_suffix(".so")
    subprocess.run(["gcc", "-std=c11", "-Wall", "-Wextra", "-Werror", "-O1", "-fPIC", "-shared", "-pthread",
                    str(src), "-o", str(so)], check=True, capture_output=True, text=True)
    lib = ctypes.CDLL(str(so))
    lib.raw_churn_start.argtypes = [ctypes.c_int]
    lib.raw_churn_stop.restype = ctypes.c_ulong
    lib.raw_alloc_elsewhere.argtypes = [ctypes.c_size_t]
    lib.raw_alloc_elsewhere.restype = ctypes.c_void_p
    lib.raw_free_elsewhere.argtypes = [ctypes.c_void_p]
    return lib


def test_raw_blocks_from_threads_without_the_gil(hooked: None, raw_churn: Any) -> None:
    heapmap.take_freed()
    for size in (24, 700, 100_000):
        p = raw_churn.raw_alloc_elsewhere(size)
        assert heapmap.lookup_block(p + size - 1) == heapmap.HeapBlock(p, size, "raw")
        raw_churn.raw_free_elsewhere(p)
        assert heapmap.lookup(p) is None or heapmap.lookup(p) != (p, size)
        assert (p, size) in heapmap.take_freed()


@contextlib.contextmanager
def _installed() -> Iterator[None]:
    heapmap.install()
    try:
        yield
    finally:
        heapmap.uninstall()


def test_threads_allocate_while_the_map_is_switched(raw_churn: Any) -> None:
    stop = threading.Event()
    started = threading.Barrier(4)
    errors: List[BaseException] = []

    def python_churn() -> None:
        try:
            started.wait()
            while not stop.is_set():
                junk = [bytes(bytearray(i % 700)) for i in range(300)]
                grown = bytearray(10)
                for _ in range(20):
                    grown.extend(b"y" * 500)
                del junk, grown
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=python_churn) for _ in range(3)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)  # the main thread gets the GIL back sooner from the churners
    for t in threads:
        t.start()
    assert raw_churn.raw_churn_start(3) == 0
    try:
        started.wait()
        for i in range(60):
            # Every sixth round switches the check level (and with it the other level-2
            # features); the others switch the heap map alone.
            with ptrbridge.checking(2) if i % 6 == 0 else _installed():
                probe = bytearray(100 + i)
                assert heapmap.lookup(data_address(probe) + 99) == (data_address(probe), 101 + i)
                heapmap.find_freed(data_address(probe))
                heapmap.take_freed()
                if i % 10 == 0:
                    heapmap.set_hold(i * 100, 1 << 20)
    finally:
        heapmap.set_hold()
        stop.set()
        for t in threads:
            t.join()
        sys.setswitchinterval(interval)
        assert raw_churn.raw_churn_stop() > 0
    assert not errors, errors
    assert not heapmap.installed()


def test_lookups_from_many_threads_during_allocation(hooked: None) -> None:
    keep = [bytearray(n) for n in (32, 400, 4000, 40_000) for _ in range(50)]
    expected = [(data_address(b), b.__alloc__()) for b in keep]
    stop = threading.Event()
    errors: List[BaseException] = []

    def look() -> None:
        try:
            for _ in range(50):
                for start, size in expected:
                    assert heapmap.lookup(start + size - 2) == (start, size)
        except BaseException as exc:
            errors.append(exc)

    def churn() -> None:
        while not stop.is_set():
            junk = [bytearray(i % 600) for i in range(500)]
            del junk

    churner = threading.Thread(target=churn)
    churner.start()
    lookers = [threading.Thread(target=look) for _ in range(3)]
    for t in lookers:
        t.start()
    for t in lookers:
        t.join()
    stop.set()
    churner.join()
    assert not errors, errors


def test_fork_while_threads_allocate_does_not_deadlock_the_child() -> None:
    code = textwrap.dedent("""
        import os, sys, threading
        import ptrbridge
        from ptrbridge import heapmap
        heapmap.install()
        stop = threading.Event()
        def churn():
            while not stop.is_set():
                junk = [bytearray(i % 900) for i in range(200)]
        threads = [threading.Thread(target=churn, daemon=True) for _ in range(2)]
        for t in threads: t.start()
        try:
            for _ in range(20):
                pid = os.fork()
                if pid == 0:  # the child allocates (and so takes the heap map's lock)
                    x = [bytes(bytearray(3000)) for _ in range(100)]
                    os._exit(0 if all(heapmap.lookup(id(b)) == (id(b), sys.getsizeof(b)) for b in x) else 3)
                _, status = os.waitpid(pid, 0)
                assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
        finally:
            stop.set()
            for t in threads: t.join()
        heapmap.uninstall()
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


# ---- other allocator hooks -------------------------------------------------------------


def test_tracemalloc_on_top_keeps_working_after_uninstall() -> None:
    heapmap.install()
    tracemalloc.start()
    try:
        assert heapmap.uninstall() is True  # recording stops; our hook stays, passing through
        assert not heapmap.installed()
        assert heapmap.stats().hooked_domains == ("raw", "mem", "object")
        traced = bytearray(10_000)
        assert tracemalloc.get_object_traceback(traced) is not None
        assert heapmap.lookup(data_address(traced)) is None
        assert heapmap.install() is True  # reuses the hook below tracemalloc
        again = bytearray(10_000)
        assert heapmap.lookup(data_address(again)) == (data_address(again), 10_001)
        assert tracemalloc.get_object_traceback(again) is not None
    finally:
        tracemalloc.stop()  # puts our hook back on top
    assert heapmap.lookup(data_address(again)) == (data_address(again), 10_001)
    assert heapmap.uninstall() is True
    assert heapmap.stats().hooked_domains == ()
    del traced, again


def test_being_cut_out_of_the_chain_is_noticed_and_repaired() -> None:
    tracemalloc.start()
    try:
        heapmap.install()  # on top of tracemalloc
        doomed = bytearray(3000)
        start = data_address(doomed)
        assert heapmap.lookup(start) == (start, 3001)
    finally:
        tracemalloc.stop()  # restores the allocators from before tracemalloc: ours is cut out
    try:
        del doomed  # a free the heap map does not see
        assert heapmap.lookup(start) is None  # the stale entry is not reported: the map was repaired
        assert heapmap.stats().hooked_domains == ("raw", "mem", "object")
        fresh = bytearray(3000)
        assert heapmap.lookup(data_address(fresh)) == (data_address(fresh), 3001)
        assert heapmap.verify() is False
    finally:
        heapmap.uninstall()
    del fresh


# ---- the C interface -------------------------------------------------------------------


def test_c_lookup_for_the_scanner(hooked: None) -> None:
    native = ctypes.CDLL(NATIVE_PATH)
    find = native.pb_heapmap_find
    find.argtypes = [ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)]
    find.restype = ctypes.c_int
    buf = bytearray(777)
    start, size = ctypes.c_size_t(), ctypes.c_size_t()
    assert find(data_address(buf) + 700, ctypes.byref(start), ctypes.byref(size)) == 1
    assert (start.value, size.value) == (data_address(buf), 778)
    assert find(8, ctypes.byref(start), ctypes.byref(size)) == 0
    assert find(data_address(buf), None, None) == 1
    native.pb_heapmap_verify.restype = ctypes.c_int
    assert native.pb_heapmap_verify() == 0


def test_counters(hooked: None) -> None:
    before = heapmap.stats()
    keep = [bytes(bytearray(100)) for _ in range(100)]
    for b in keep:
        heapmap.lookup(id(b))
    after = heapmap.stats()
    assert after.installed and after.live_blocks >= 100 and after.live_bytes >= 100 * 100
    assert after.allocations - before.allocations >= 100
    assert after.lookups - before.lookups >= 100
    assert after.index_bytes > 0 and after.shadow_leaves >= 1 and after.untracked == 0
    del keep
    assert heapmap.stats().frees - after.frees >= 100


# ---- the checker at level 2 ------------------------------------------------------------


def test_a_raw_address_in_a_struct_is_python_owned_only_at_level_2() -> None:
    other = cffi.FFI()
    other.cdef("struct box { char *p; }; int memcmp(const struct box *a, const void *b, size_t n);")
    c = ptrbridge.wrap(other.dlopen(None))

    class Holder:
        pass

    holder = Holder()
    box = other.new("struct box *")
    with ptrbridge.checking(2):
        holder.data = bytearray(b"hidden\0")  # reachable only through an attribute
        box.p = other.cast("char *", data_address(holder.data))
        with pytest.raises(ptrbridge.NestedPointerError, match=r"\.p -> Python memory block"):
            c.memcmp(box, box, 0)
    assert c.memcmp(box, box, 0) == 0  # level 1 does not know it


# ---- numpy (NEP 49) --------------------------------------------------------------------


def test_numpy_array_data_is_found(hooked: None) -> None:
    import numpy as np

    assert heapmap.numpy_hooked()
    data = np.arange(50_000, dtype=np.int64)
    assert heapmap.lookup_block(data.ctypes.data + 8 * 40_000) == heapmap.HeapBlock(
        data.ctypes.data, data.nbytes, "numpy")
    small = np.zeros(3)
    assert heapmap.lookup(small.ctypes.data + 23) == (small.ctypes.data, 24)
    grown = data.copy()
    grown.resize(100_000, refcheck=False)  # realloc through the handler
    assert heapmap.lookup(grown.ctypes.data + 8 * 99_999) == (grown.ctypes.data, grown.nbytes)
    start = data.ctypes.data
    del data
    assert heapmap.find_freed(start + 8) == (start, 400_000)


def test_numpy_handler_is_transparent_and_covers_every_thread() -> None:
    import numpy as np
    from numpy._core import multiarray  # numpy >= 2; numpy 1.x: numpy.core.multiarray

    name = multiarray.get_handler_name()
    before = np.ones(1000)  # made with numpy's own handler
    heapmap.install()
    try:
        assert multiarray.get_handler_name() == name  # the wrapper keeps numpy's name
        made: List[Any] = []
        worker = threading.Thread(target=lambda: made.append(np.ones(2000)))
        worker.start()
        worker.join()
        assert heapmap.lookup(made[0].ctypes.data) == (made[0].ctypes.data, 16_000)
        during = np.ones(1000)
        del before  # numpy's block, freed through the wrapper
    finally:
        heapmap.uninstall()
    assert not heapmap.numpy_hooked() and multiarray.get_handler_name() == name
    del during, made  # made through the wrapper, freed without it


def test_numpy_imported_after_install_is_hooked() -> None:
    code = textwrap.dedent("""
        import sys
        from ptrbridge import heapmap
        assert "numpy" not in sys.modules
        heapmap.install()
        import numpy as np
        a = np.arange(10_000.0)
        assert heapmap.numpy_hooked(), "not hooked"
        assert heapmap.lookup(a.ctypes.data + 8) == (a.ctypes.data, a.nbytes), heapmap.lookup(a.ctypes.data)
        heapmap.uninstall()
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_module_import_has_no_side_effect_but_the_listener() -> None:
    code = textwrap.dedent("""
        import sys
        import ptrbridge.heapmap as heapmap
        from ptrbridge import levels
        assert not heapmap.installed()
        assert not any(type(f).__name__ == "_NumpyWatcher" for f in sys.meta_path)
        assert heapmap._on_level_change in levels._listeners
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != "PTRBRIDGE_CHECK"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_bench_module_measures(tmp_path: Path) -> None:
    bench = Path(__file__).resolve().parent.parent / "bench" / "bench_heapmap.py"
    proc = subprocess.run([sys.executable, str(bench), "--smoke"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "heap map" in proc.stdout and "tracemalloc" in proc.stdout


# ---- foreign blocks (the C API for the interposer) --------------------------------------

_libc = ctypes.CDLL(None)
_libc.malloc.restype = ctypes.c_void_p
_libc.malloc.argtypes = [ctypes.c_size_t]
_libc.free.argtypes = [ctypes.c_void_p]


def test_a_recorded_foreign_block_is_found_and_its_free_enters_the_history(hooked: None) -> None:
    from ptrbridge._bindings import lib

    heapmap.take_freed()
    for size in (24, 700, 100_000):
        p = _libc.malloc(size)
        try:
            lib.pb_heapmap_record_block(ffi.cast("void *", p), size, lib.PB_HEAPMAP_DOMAIN_CFFI)
            assert heapmap.lookup_block(p + size - 1) == heapmap.HeapBlock(p, size, "cffi")
            assert heapmap.lookup_block(p + size) != heapmap.HeapBlock(p, size, "cffi")
            lib.pb_heapmap_forget_block(ffi.cast("void *", p))
            assert heapmap.lookup(p) is None
            assert heapmap.find_freed_block(p + 1) == heapmap.HeapBlock(p, size, "cffi")
            assert (p, size) in heapmap.take_freed()
        finally:
            _libc.free(p)


def test_foreign_calls_leave_python_blocks_and_other_domains_alone(hooked: None) -> None:
    from ptrbridge._bindings import lib

    buf = bytearray(3000)
    start = data_address(buf)
    block = heapmap.lookup_block(start)
    lib.pb_heapmap_forget_block(ffi.cast("void *", start))  # not a foreign block: ignored
    assert heapmap.lookup_block(start) == block
    p = _libc.malloc(64)
    try:
        lib.pb_heapmap_record_block(ffi.cast("void *", p), 64, lib.PB_HEAPMAP_RAW)  # not a foreign domain
        assert heapmap.lookup(p) is None
        lib.pb_heapmap_record_block(ffi.NULL, 64, lib.PB_HEAPMAP_DOMAIN_CFFI)
        lib.pb_heapmap_forget_block(ffi.NULL)
        lib.pb_heapmap_forget_block(ffi.cast("void *", p))  # never recorded
        assert heapmap.find_freed(p) is None
    finally:
        _libc.free(p)


def test_foreign_blocks_are_ignored_while_the_map_is_not_installed() -> None:
    from ptrbridge._bindings import lib

    assert not heapmap.installed()
    p = _libc.malloc(64)
    try:
        lib.pb_heapmap_record_block(ffi.cast("void *", p), 64, lib.PB_HEAPMAP_DOMAIN_CFFI)
        assert lib.pb_heapmap_release_block(ffi.cast("void *", p), ffi.NULL) == 0
        with _installed():
            assert heapmap.lookup(p) is None
    finally:
        _libc.free(p)


def test_a_released_foreign_block_is_held_then_given_to_its_release_function() -> None:
    from ptrbridge._bindings import lib

    released: List[int] = []

    @ffi.callback("void(void *)")
    def release(ptr: Any) -> None:
        released.append(int(ffi.cast("uintptr_t", ptr)))
        _libc.free(int(ffi.cast("uintptr_t", ptr)))

    heapmap.install()
    try:
        heapmap.set_hold(4, 1 << 20)
        blocks = [_libc.malloc(128) for _ in range(6)]
        for p in blocks:
            lib.pb_heapmap_record_block(ffi.cast("void *", p), 128, lib.PB_HEAPMAP_DOMAIN_CFFI)
        for p in blocks:
            assert lib.pb_heapmap_release_block(ffi.cast("void *", p), release) == 1
        assert released == blocks[:2]  # the hold keeps 4: the two oldest were pushed out
        assert heapmap.find_freed_block(blocks[-1]) == heapmap.HeapBlock(blocks[-1], 128, "cffi")
        assert lib.pb_heapmap_release_block(ffi.cast("void *", blocks[0]), release) == 0  # not recorded now
    finally:
        heapmap.set_hold()
        heapmap.uninstall()
    assert sorted(released) == sorted(blocks)  # uninstall gave the rest back


RECORD_THREADS_C = r"""
#include <pthread.h>
#include <stdlib.h>
#include <stdatomic.h>
void pb_heapmap_record_block(void *ptr, size_t size, int domain);
void pb_heapmap_forget_block(void *ptr);
int pb_heapmap_release_block(void *ptr, void (*release)(void *));
static atomic_ulong done;
static void *work(void *arg) {
    (void)arg;
    for (int i = 0; i < 20000; i++) {
        size_t n = 16 + (size_t)(i % 5000);
        void *p = malloc(n);
        pb_heapmap_record_block(p, n, 4);
        if (i & 1) pb_heapmap_forget_block(p), free(p);
        else if (!pb_heapmap_release_block(p, free)) free(p);
    }
    atomic_fetch_add(&done, 1);
    return NULL;
}
unsigned long record_from_threads(int k) {
    pthread_t t[8];
    atomic_store(&done, 0);
    for (int i = 0; i < k && i < 8; i++) pthread_create(&t[i], NULL, work, NULL);
    for (int i = 0; i < k && i < 8; i++) pthread_join(t[i], NULL);
    return atomic_load(&done);
}
"""


def test_foreign_blocks_from_c_threads_without_the_gil(hooked: None, tmp_path: Path) -> None:
    src = tmp_path / "recthreads.c"
    src.write_text(RECORD_THREADS_C)
    so = tmp_path / "librecthreads.so"
    subprocess.run(["gcc", "-std=c11", "-Wall", "-Wextra", "-Werror", "-O1", "-fPIC", "-shared", "-pthread",
                    str(src), "-o", str(so)], check=True, capture_output=True, text=True)
    native = ctypes.CDLL(NATIVE_PATH, mode=ctypes.RTLD_GLOBAL)  # the pb_* symbols
    assert native is not None
    lib = ctypes.CDLL(str(so))
    lib.record_from_threads.restype = ctypes.c_ulong
    before = heapmap.stats()
    assert lib.record_from_threads(4) == 4
    after = heapmap.stats()
    assert after.frees - before.frees >= 4 * 20000 - after.untracked
    assert after.held_blocks <= before.held_blocks + heapmap.DEFAULT_HOLD_BLOCKS


# ---- hooks that keep what they wrap in ctx: nested and repeated hooking ---------------------


@pytest.fixture(scope="module")
def sizehook(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/clib/heapmap_sizehook.c: a PyMem hook that adds a 16-byte header to every block."""
    import sysconfig

    out = tmp_path_factory.mktemp("sizehook") / "libsizehook.so"
    src = Path(__file__).resolve().parent / "clib" / "heapmap_sizehook.c"
    subprocess.run(["gcc", "-std=c11", "-Wall", "-Wextra", "-Werror", "-O1", "-fPIC", "-shared",
                    f"-I{sysconfig.get_paths()['include']}", str(src), "-o", str(out)],
                   check=True, capture_output=True, text=True)
    return out


def _run_with_sizehook(so: Path, body: str) -> None:
    """Run body in a child with the size-changing hook library loaded as `hook`.

    The hook cannot be removed once it has allocated (its blocks carry its header), so each
    scenario runs in a process of its own that ends with os._exit.
    """
    code = textwrap.dedent("""
        import ctypes, os, sys, tracemalloc
        from ptrbridge import heapmap
        from ptrbridge._bindings import ffi
        hook = ctypes.PyDLL(sys.argv[1])
        def addr(obj):
            v = ffi.from_buffer(obj)
            try:
                return int(ffi.cast("uintptr_t", v))
            finally:
                ffi.release(v)
        def contains(block, start, n):
            return block is not None and block[0] <= start and start + n <= block[0] + block[1]
    """) + textwrap.dedent(body) + "\nprint('ok', flush=True)\nos._exit(0)\n"
    proc = subprocess.run([sys.executable, "-c", code, str(so)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    assert proc.stdout.strip().endswith("ok"), proc.stdout


def test_hooking_above_a_hook_that_changes_sizes(sizehook: Path) -> None:
    _run_with_sizehook(sizehook, """
        for d in range(3):
            hook.sizehook_install(d)          # below ours
        for i in range(30):
            assert heapmap.install() is True
            assert heapmap.verify() is False
            b = bytearray(1000 + i)
            assert heapmap.lookup(addr(b)) == (addr(b), 1001 + i)
            grown = bytearray(100); grown.extend(bytes(10_000))
            assert contains(heapmap.lookup(addr(grown)), addr(grown), 10_100)
            assert heapmap.uninstall() is True
            del b, grown
        assert heapmap.stats().hooked_domains == ()
    """)


def test_a_hook_that_changes_sizes_installed_above_ours_is_safe_to_verify(sizehook: Path) -> None:
    # Before hooks kept their allocator in ctx, verify() re-hooked here (its probe's size was
    # changed on the way down) and every allocation then recursed until the stack overflowed.
    _run_with_sizehook(sizehook, """
        assert heapmap.install() is True
        for d in range(3):
            hook.sizehook_install(d)          # above ours
        for i in range(30):
            heapmap.verify()
            assert heapmap.verify() is False
            b = bytearray(3000)
            assert contains(heapmap.lookup(addr(b)), addr(b), 3000)
            del b
            assert heapmap.uninstall() is True    # recording stops; ours stays, passing through
            assert heapmap.stats().hooked_domains == ("raw", "mem", "object")
            junk = [bytes(bytearray(n)) for n in range(0, 5000, 7)]
            assert heapmap.install() is True      # reuses ours below the other hook
            del junk
        tracemalloc.start()                       # a third hook, on top of both
        try:
            assert heapmap.verify() is False
            c = bytearray(5000)
            assert tracemalloc.get_object_traceback(c) is not None
            assert contains(heapmap.lookup(addr(c)), addr(c), 5000)
        finally:
            tracemalloc.stop()
        assert heapmap.verify() is False
        assert heapmap.uninstall() is True
    """)


def test_repeated_install_verify_uninstall_with_tracemalloc_in_every_order() -> None:
    for order in ("below", "above", "around"):
        for _ in range(10):
            if order == "below":
                tracemalloc.start()
            heapmap.install()
            if order in ("above", "around"):
                tracemalloc.start()
            try:
                assert heapmap.verify() is False
                buf = bytearray(4000)
                assert heapmap.lookup(data_address(buf)) == (data_address(buf), 4001)
                assert tracemalloc.get_object_traceback(buf) is not None
            finally:
                if order == "around":
                    heapmap.uninstall()  # ours stays below tracemalloc, passing through
                tracemalloc.stop()
                heapmap.verify()
                heapmap.uninstall()
            assert not heapmap.installed()
            del buf
    assert heapmap.stats().hooked_domains == ()
    fresh = bytearray(100)  # the allocators still work, unhooked
    assert heapmap.lookup(data_address(fresh)) is None


def test_set_hold_off_gives_back_what_is_held_at_once(hooked: None) -> None:
    heapmap.set_hold(1000, 1 << 20)
    doomed = [bytearray(64) for _ in range(200)] + [bytearray(20_000) for _ in range(5)]
    del doomed
    assert heapmap.stats().held_blocks >= 205
    heapmap.set_hold(10, 1 << 20)  # lowered: at most 10 per domain stay
    assert heapmap.stats().held_blocks <= 10 * len(heapmap.DOMAINS)
    heapmap.set_hold(0, 0)
    counters = heapmap.stats()
    assert counters.held_blocks == 0 and counters.held_bytes == 0


# ---- never mask a bug: held blocks are poisoned and, from a page up, inaccessible ------------


def test_a_held_block_is_poisoned(hooked: None) -> None:
    buf = bytearray(b"s" * 200)
    start = data_address(buf)
    del buf
    assert heapmap.find_freed(start) == (start, 201)
    assert ctypes.string_at(start, 201) == b"\xdd" * 201  # not the old bytes


def test_poisoning_can_be_turned_off_for_measuring(hooked: None) -> None:
    assert heapmap.set_poison(False) is True
    try:
        buf = bytearray(b"s" * 200)
        start = data_address(buf)
        del buf
        assert ctypes.string_at(start, 200) == b"s" * 200  # held intact: what poisoning prevents
    finally:
        assert heapmap.set_poison(True) is False


LARGE_AFTER_SMALL = """
import ctypes
from ptrbridge import heapmap
heapmap.install()
medium = [bytearray(b"x" * 1000) for _ in range(8000)]  # 8 MB when freed: the byte limit is full
del medium
before = heapmap.stats().held_bytes
big = bytes(bytearray(b"k" * 60000))
start = ctypes.cast(ctypes.c_char_p(big), ctypes.c_void_p).value
del big
block, size = heapmap.find_freed(start)
# Whole pages inside the held block are inaccessible: read 16 bytes from a partial page at one
# end (the block is 60 033 bytes, so they cannot both be shorter than 16 bytes).
first_page, last_page = (block + 4095) & ~4095, (block + size) & ~4095
where = start if start + 16 <= first_page else block + size - 16
assert where + 16 <= first_page or where >= last_page, (hex(block), size)
print(before >= heapmap.DEFAULT_HOLD_BYTES // 2, ctypes.string_at(where, 16).hex(), flush=True)
for _ in range(20000):  # the frees that follow bring the hold back within its limit
    bytearray(b"y" * 1000)
print(heapmap.stats().held_bytes <= heapmap.DEFAULT_HOLD_BYTES * len(heapmap.DOMAINS))
"""


def test_a_large_block_freed_into_a_hold_full_of_smaller_ones_is_held_and_poisoned() -> None:
    # The byte limit is reached with 1000-byte blocks; then a 60 000-byte bytes is freed.  Four
    # evictions give back 4 000 bytes: the hold must still take it (poisoned), not hand it back
    # with its old contents, which a stale C read would return as if nothing were wrong.
    # (A subprocess: the hold's state in this process depends on the tests before.)
    proc = subprocess.run([sys.executable, "-c", LARGE_AFTER_SMALL], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["True", "dd" * 16, "True"]

def test_a_realloc_that_moves_holds_and_poisons_the_old_block(hooked: None) -> None:
    buf = bytearray(b"r" * 300)
    old = data_address(buf)
    buf.extend(b"+" * 3000)  # grows past its size class: a new block
    assert data_address(buf) != old
    assert buf[:300] == b"r" * 300 and buf[300:] == b"+" * 3000
    assert heapmap.find_freed(old) == (old, 301)
    assert heapmap.lookup(old) is None  # held: not handed out again yet
    assert ctypes.string_at(old, 301) == b"\xdd" * 301


PAGE_READ = """
import ctypes, sys
from ptrbridge import heapmap
heapmap.install()
n = 5 * 4096 + 100
buf = bytearray(b"p" * n)
start = ctypes.addressof((ctypes.c_char * n).from_buffer(buf))
assert heapmap.lookup(start) is not None
del buf
first_page = (start + 4095) & ~4095      # the partial pages at both ends stay readable
last_page = (start + n) & ~4095          # (the block's tail may be only a few bytes of it)
head, tail = first_page - start, start + n - last_page
print(ctypes.string_at(start, head) == b"\\xdd" * head,
      ctypes.string_at(last_page, tail) == b"\\xdd" * tail, flush=True)
ctypes.string_at(first_page + 10, 1)   # a whole page inside the block: no access
print("read freed memory", flush=True)
"""


def test_whole_pages_inside_a_held_block_are_inaccessible() -> None:
    proc = subprocess.run([sys.executable, "-c", PAGE_READ], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -11, (proc.returncode, proc.stdout, proc.stderr[-2000:])  # SIGSEGV
    assert proc.stdout.splitlines() == ["True True"]  # the partial pages around them: poisoned


def test_held_pages_are_accessible_again_once_given_back(hooked: None) -> None:
    heapmap.set_hold(2, 1 << 24)
    big = [bytearray(b"q" * (3 * 4096)) for _ in range(3)]
    starts = [data_address(b) for b in big]
    del big
    heapmap.set_hold(0, 0)  # given back: unprotected before the allocator has them again
    again = [bytearray(b"w" * (3 * 4096)) for _ in range(6)]  # may reuse those addresses
    assert all(b == b"w" * (3 * 4096) for b in again)
    assert len(starts) == 3


STALE_PROGRAM = """
import ctypes, sys
lib = ctypes.CDLL(sys.argv[1])
lib.stale_keep.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
lib.stale_read.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
size = int(sys.argv[2])
unit = bytes(bytearray(b"the-right-answer-%d-" % size))    # made at run time
secret = (unit * (size // len(unit) + 1))[:size]            # exactly size bytes
lib.stale_keep(secret, size)
expected = secret.decode()
del secret                                                  # freed: C's pointer dangles
others = [bytes(bytearray(b"Z" * size)) for _ in range(50)]  # the allocator may hand it out again
out = ctypes.create_string_buffer(size)
lib.stale_read(out, size)                                   # C reads freed memory
print("right" if out.raw.decode("latin-1") == expected else "wrong", flush=True)
"""


@pytest.fixture(scope="module")
def stale_program(tmp_path_factory: pytest.TempPathFactory) -> Tuple[Path, Path]:
    """A ctypes program whose C library reads a freed bytes through a pointer it kept."""
    tmp = tmp_path_factory.mktemp("stale")
    so = tmp / "libstale.so"
    src = Path(__file__).resolve().parent / "clib" / "heapmap_stale.c"
    subprocess.run(["gcc", "-std=c11", "-Wall", "-Wextra", "-Werror", "-O1", "-fPIC", "-shared", str(src),
                    "-o", str(so)], check=True, capture_output=True, text=True)
    prog = tmp / "stale.py"
    prog.write_text(STALE_PROGRAM)
    return prog, so


def _stale(cmd: List[str], env: Any = None) -> Tuple[int, List[str]]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    return proc.returncode, [line for line in proc.stdout.splitlines() if line in ("right", "wrong")]


def test_a_use_after_free_that_fails_plainly_does_not_pass_at_level_2(stale_program: Tuple[Path, Path]) -> None:
    prog, so = stale_program
    size = "40"  # a small bytes: pymalloc reuses its block at once
    assert _stale([sys.executable, str(prog), str(so), size]) == (0, ["wrong"])  # plainly
    rc, out = _stale([sys.executable, "-m", "ptrbridge", "run", "--check", "2", "--", sys.executable, str(prog),
                      str(so), size])
    assert out != ["right"], "level 2 hid the use after free"
    # What poisoning prevents: the hold alone keeps the freed block intact, and the bug passes.
    masked = [sys.executable, "-c", "import sys; from ptrbridge import heapmap; heapmap.set_poison(False); "
              "sys.argv = sys.argv[1:]; exec(open(sys.argv[0]).read())", str(prog), str(so), size]
    assert _stale(masked, env=dict(os.environ, PTRBRIDGE_CHECK="2")) == (0, ["right"])


def test_a_stale_read_of_a_large_freed_buffer_faults_at_level_2(stale_program: Tuple[Path, Path]) -> None:
    prog, so = stale_program
    size = str(64 << 10)  # below malloc's mmap threshold: the block is held, its inner pages PROT_NONE
    cmd = [sys.executable, "-m", "ptrbridge", "run", "--check", "2", "--", sys.executable, str(prog), str(so), size]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    out = [line for line in proc.stdout.splitlines() if line in ("right", "wrong")]
    assert out != ["right"], proc.stdout + proc.stderr
    # the quarantine's shadow of the freed bytes (or, unquarantined, the whole pages inside the
    # held block) is inaccessible: SIGSEGV
    assert proc.returncode != 0, proc.stdout + proc.stderr


# ---- provenance after free: lookups by address with size, domain and free order ------------------


def test_freed_blocks_carry_their_free_order(hooked: None) -> None:
    heapmap.take_freed_blocks()
    first, second = bytearray(b"a" * 70), bytearray(b"b" * 70)
    a, b = data_address(first), data_address(second)
    del first
    del second
    ra, rb = heapmap.find_freed_record(a), heapmap.find_freed_record(b)
    assert ra is not None and rb is not None
    assert (ra.start, ra.size, rb.start, rb.size) == (a, 71, b, 71)
    assert ra.domain in PYTHON_DOMAINS and ra.serial != rb.serial
    if ra.serial & 1 == rb.serial & 1:  # same path: the order is exact
        assert ra.serial < rb.serial
    taken = {blk.start: blk for blk in heapmap.take_freed_blocks()}
    assert taken[a] == ra and taken[b] == rb
    big = bytearray(100_000)
    start = data_address(big)
    del big
    record = heapmap.find_freed_record(start + 99_999)
    assert record is not None and record.start == start and record.serial & 1 == 1  # the locked path


def test_fork_while_c_threads_allocate_without_the_gil(raw_churn: Any) -> None:
    # The raw domain and foreign blocks take the heap map's lock from C threads: a fork must
    # never leave the child with that lock held.
    code = textwrap.dedent("""
        import ctypes, os, sys, warnings
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork with threads
        from ptrbridge import heapmap
        from ptrbridge._bindings import ffi, lib
        churn = ctypes.CDLL(sys.argv[1])
        heapmap.install()
        assert churn.raw_churn_start(2) == 0
        libc = ctypes.CDLL(None)
        libc.malloc.restype = ctypes.c_void_p
        try:
            for _ in range(20):
                pid = os.fork()
                if pid == 0:
                    x = [bytearray(100_000) for _ in range(20)]
                    p = libc.malloc(64)
                    lib.pb_heapmap_record_block(ffi.cast("void *", p), 64, lib.PB_HEAPMAP_DOMAIN_CFFI)
                    ok = heapmap.lookup(p) == (p, 64) and all(heapmap.lookup(id(b)) for b in x)
                    os._exit(0 if ok else 3)
                _, status = os.waitpid(pid, 0)
                assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
        finally:
            churn.raw_churn_stop()
        heapmap.uninstall()
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code, raw_churn._name], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "ok"


def test_a_capped_retire_takes_the_newest_frees(hooked: None) -> None:
    # The end-of-test scan retires a bounded batch: it must be the test's own (newest) frees.
    from ptrbridge._bindings import lib

    heapmap.take_freed()
    cap = 50
    starts, sizes = ffi.new("uintptr_t[]", cap), ffi.new("size_t[]", cap)
    older = [bytearray(b"o" * 3000) for _ in range(200)]
    older_addresses = {data_address(b) for b in older}
    del older  # held: not reused by what follows
    newest = [bytearray(b"n" * 3000) for _ in range(100)]  # more frees than the cap
    addresses = {data_address(b) for b in newest}
    del newest
    n = lib.pb__heapmap_retire_freed(1 << 40, starts, sizes, cap)
    try:
        retired = {int(starts[i]) for i in range(n)}
        assert n == cap and len(addresses & retired) >= cap // 2 - 5  # the locked ring's half
        assert not older_addresses & retired
    finally:
        lib.pb__scan_cancel(0, 2**63)  # leave the scanner's queue as it was
    assert heapmap.stats().freed_dropped >= 200


def test_freed_python_memory_a_library_is_mapped_over_now_is_not_retired(hooked: None) -> None:
    # pymalloc gives an empty arena back (munmap) and dlopen may map a library there: the
    # library's own pointers into its image must not be taken for C keeping freed Python memory.
    # A "Python" block recorded over a loaded library's code stands for that (foreign blocks can be
    # recorded at any address); a twin in anonymous memory must still be retired.
    import mmap
    from ptrbridge._bindings import lib

    heapmap.take_freed()
    libc = ctypes.CDLL(None)
    in_library = ctypes.cast(libc.strlen, ctypes.c_void_p).value
    anon = mmap.mmap(-1, mmap.PAGESIZE)
    elsewhere = data_address(anon)
    assert in_library is not None
    for p in (in_library & ~15, elsewhere):
        lib.pb_heapmap_record_block(ffi.cast("void *", p), 64, lib.PB_HEAPMAP_DOMAIN_CFFI)
        lib.pb_heapmap_forget_block(ffi.cast("void *", p))
    cap = 1 << 12
    starts, sizes = ffi.new("uintptr_t[]", cap), ffi.new("size_t[]", cap)
    n = lib.pb__heapmap_retire_freed(1 << 40, starts, sizes, cap)
    try:
        retired = {(int(starts[i]), int(sizes[i]) & ~lib.PB_HEAPMAP_GIVEN_BACK) for i in range(n)}
        assert (elsewhere, 64) in retired
        assert (in_library & ~15, 64) not in retired
    finally:
        lib.pb__scan_cancel(0, 2**63)  # leave the scanner's queue as it was
        anon.close()
