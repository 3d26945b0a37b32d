"""Level 2 sees C's own memory: GOT interposition of the malloc family, globals, fault-proof scans.

Everything that patches GOT entries or could crash runs in a subprocess, so a
bug kills that child (asserted: exit status and text), never pytest.  The
programs under tests/clib are plain C written the naive way (libc malloc,
statics, a thread of their own), with a correct twin for each bug.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

import ptrbridge
from ptrbridge import interposition

from cbuild import build_extension, build_shared
from sanitizers import without_asan_quarantine

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


@pytest.fixture(scope="module")
def holder_lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_shared("holder.c", tmp_path_factory.mktemp("holder"))


@pytest.fixture(scope="module")
def cext_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cext")
    build_extension("cextkeep.c", out)
    return out


def _child(code: str, env: Dict[str, str], timeout: int = 120) -> subprocess.CompletedProcess:
    code = "import os\n" + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, HOLDER_CDEF=HOLDER_CDEF, **env), timeout=timeout, cwd=REPO)


HOLDER_CDEF = """
    void set_prefix(const char *); void set_prefix_copy(const char *); size_t prefix_len(void);
    void clear_prefix(void);
    struct ctx; struct ctx *ctx_new(void); void ctx_keep(struct ctx *, const char *);
    void ctx_keep_copy(struct ctx *, const char *, size_t); size_t ctx_len(const struct ctx *);
    void ctx_free(struct ctx *);
    int worker_start(const unsigned char *, size_t); int worker_start_copy(const unsigned char *, size_t);
    uint64_t worker_finish(void); void worker_free(void);
    uint64_t holder_loop(size_t n, size_t size);
    void *holder_alloc(size_t); void *holder_calloc(size_t); void holder_free(void *);
    int holder_start_churn(void); void holder_stop_churn(void);
"""


# --- issue 8: add_root validation and fault-proof scans ---------------------------

def test_add_root_rejects_what_is_not_an_address() -> None:
    for bad in ("x", b"x", 1.5, None, True, [1]):
        with pytest.raises(ptrbridge.RootTypeError, match="ptrbridge.add_root: address must be an int or a cffi "
                                                          "pointer") as info:
            ptrbridge.add_root(bad, 16)
        assert isinstance(info.value, TypeError) and isinstance(info.value, ptrbridge.PointerError)
    ffi = ptrbridge._bindings.ffi
    with pytest.raises(ptrbridge.RootTypeError, match="not int"):
        ptrbridge.add_root(ffi.cast("int", 5), 16)


def test_add_root_rejects_unmapped_and_partly_unmapped_memory() -> None:
    import mmap

    with pytest.raises(ptrbridge.RootError, match=r"add_root: \[0x1000, \+16\) is not readable memory") as info:
        ptrbridge.add_root(0x1000, 16)
    assert isinstance(info.value, ValueError)
    page = mmap.PAGESIZE
    m = mmap.mmap(-1, 2 * page)
    ffi = ptrbridge._bindings.ffi
    base = int(ffi.cast("uintptr_t", ffi.from_buffer(m)))
    rid = ptrbridge.add_root(base, 2 * page)  # mapped: accepted
    ptrbridge.remove_root(rid)
    import cffi

    cffi_ = cffi.FFI()
    cffi_.cdef("void *mmap(void *, size_t, int, int, int, long); int munmap(void *, size_t);")
    libc = cffi_.dlopen(None)
    p2 = libc.mmap(cffi_.NULL, 2 * page, 3, 0x22, -1, 0)
    base2 = int(cffi_.cast("uintptr_t", p2))
    assert libc.munmap(cffi_.cast("void *", base2 + page), page) == 0  # the second page goes
    with pytest.raises(ptrbridge.RootError, match="not readable memory"):
        ptrbridge.add_root(base2, 2 * page)
    rid = ptrbridge.add_root(base2, page)  # the first page alone is fine
    ptrbridge.remove_root(rid)
    libc.munmap(p2, page)


STALE_PROGRAM = """
import sys, warnings
import cffi
import ptrbridge
from ptrbridge._bindings import lib
ptrbridge.set_check_level(2)
ptrbridge.set_scan_batch(1_000_000)
ffi = cffi.FFI()
ffi.cdef("void *mmap(void *, size_t, int, int, int, long); int munmap(void *, size_t); "
         "int mprotect(void *, size_t, int);")
libc = ffi.dlopen(None)
target = bytearray(64)
taddr = int(ffi.cast("uintptr_t", ffi.from_buffer(target)))
case = sys.argv[1]
if case == "munmap":
    p = libc.mmap(ffi.NULL, 8192, 3, 0x22, -1, 0)
    ffi.cast("uintptr_t *", p)[0] = taddr
    rid = ptrbridge.add_root(p, 8192)
    libc.munmap(p, 8192)
elif case == "partly":
    p = libc.mmap(ffi.NULL, 8192, 3, 0x22, -1, 0)
    ffi.cast("uintptr_t *", p)[0] = taddr
    rid = ptrbridge.add_root(p, 8192)
    libc.munmap(ffi.cast("char *", p) + 4096, 4096)
    print("at", hex(int(ffi.cast("uintptr_t", p))))
elif case == "guard":
    p = libc.mmap(ffi.NULL, 4096, 3, 0x22, -1, 0)
    rid = ptrbridge.add_root(p, 4096)
    libc.mprotect(p, 4096, 0)  # PROT_NONE, like a guard page
elif case == "cbuffer":
    buf = ptrbridge.CBuffer(1 << 22)  # big enough for libc to munmap it on free
    rid = ptrbridge.add_root(buf.ptr, len(buf))
    buf.free()
ptrbridge.scanning.retire(taddr, 64, "bytearray(64)", "f", "x.py:1", "returned")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    found = ptrbridge.scan()
    found += ptrbridge.scan()
print("found", [r.root for r in found])
print("stale", ptrbridge.scanning.stale_roots())
print("warnings", [(w.category.__name__, str(w.message)) for w in caught])
"""


@pytest.mark.parametrize("read", ["in-place", "copy"])
@pytest.mark.parametrize("case", ["munmap", "partly", "guard", "cbuffer"])
def test_a_root_unmapped_after_add_root_is_skipped_and_reported_never_a_crash(case: str, read: str,
                                                                             tmp_path: Path) -> None:
    """Both readers: in place with SIGSEGV recovery (the default) and the process_vm_readv copy."""
    script = tmp_path / "stale.py"
    script.write_text(STALE_PROGRAM)
    # The cbuffer case needs free() to unmap the block at once, as glibc does (ASan would keep it).
    env = dict(os.environ, PTRBRIDGE_SCAN_READ="copy" if read == "copy" else "", **without_asan_quarantine())
    proc = subprocess.run([sys.executable, str(script), case], capture_output=True, text=True, timeout=120,
                          env=env)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-3000:]}"
    out = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    # The readable part of a partly unmapped root is still scanned (the pointer is on its first page).
    assert out["found"] == ("[]" if case != "partly" else f"['registered root #1 (8192 bytes at {out['at']})']")
    assert "'root'" in out["stale"] and "'unreadable'" in out["stale"], out
    warned = eval(out["warnings"])  # list of (category, message) printed by the child
    assert [c for c, _ in warned] == ["StaleRootWarning"], warned  # once, not once per scan
    assert re.search(r"skipped registered root #\d+ \(\d+ bytes at 0x[0-9a-f]+\): it is unreadable now "
                     r"\(remove it with ptrbridge.remove_root\(\) before freeing its memory\)", warned[0][1])


def test_a_partly_unmapped_root_is_still_scanned_where_readable(tmp_path: Path) -> None:
    code = """
    import cffi
    import ptrbridge
    from ptrbridge._bindings import lib
    ffi = cffi.FFI()
    ffi.cdef("void *mmap(void *, size_t, int, int, int, long); int munmap(void *, size_t);")
    libc = ffi.dlopen(None)
    target = bytearray(64)
    taddr = int(ffi.cast("uintptr_t", ffi.from_buffer(target)))
    p = libc.mmap(ffi.NULL, 3 * 4096, 3, 0x22, -1, 0)
    words = ffi.cast("uintptr_t *", p)
    words[0] = taddr            # page 0
    words[2 * 512 + 3] = taddr  # page 2
    libc.munmap(ffi.cast("char *", p) + 4096, 4096)  # page 1 goes
    lib.pb__scan_retire(taddr, 64, 7)
    print(lib.pb__scan_buffer_safe(p, 3 * 4096))
    """
    proc = _child(code, {})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["2"]


@pytest.mark.parametrize("faulthandler", [False, True])
def test_a_fault_outside_a_scan_still_kills_the_process(faulthandler: bool) -> None:
    """The scanner's SIGSEGV handler recovers only its own reads: any other fault goes to the
    handler installed before it (faulthandler here) or to the default action."""
    proc = _child(f"""
    import ctypes, faulthandler
    if {faulthandler}:
        faulthandler.enable()
    import ptrbridge
    ptrbridge.set_check_level(2)
    target = bytearray(64)
    ptrbridge.scanning.retire(ctypes.addressof((ctypes.c_char * 64).from_buffer(target)), 64, "t", "f", "x:1",
                              "returned")
    ptrbridge.scan()          # installs the handler
    print("scanned", flush=True)
    ctypes.string_at(16)      # a real crash
    print("survived")
    """, {})
    assert proc.returncode == -11, (proc.returncode, proc.stderr[-2000:])
    assert proc.stdout.split() == ["scanned"]
    if faulthandler:
        assert "Fatal Python error: Segmentation fault" in proc.stderr


def test_watched_library_after_dlclose_is_skipped_not_read(holder_lib: Path) -> None:
    code = f"""
    import warnings
    import cffi, ptrbridge
    from ptrbridge._bindings import ffi as pffi, lib as plib
    ptrbridge.set_check_level(2)
    ffi = cffi.FFI()
    ffi.cdef("void set_prefix(const char *);")
    h = ffi.dlopen({str(holder_lib)!r})
    ptrbridge.watch_library("libholder")
    ffi.dlclose(h)
    target = bytearray(64)
    ptrbridge.scanning.retire(int(pffi.cast("uintptr_t", pffi.from_buffer(target))), 64, "t", "f", "x:1",
                              "returned")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        print(ptrbridge.scan())
    print(ptrbridge.scanning.stale_roots())
    print([str(w.message) for w in caught])
    """
    proc = _child(code, {})
    assert proc.returncode == 0, proc.stderr
    found, stale, warned = proc.stdout.splitlines()
    assert found == "[]"
    assert "'unloaded'" in stale
    assert "watched library 'libholder'" in warned and "unloaded now" in warned
    assert "unwatch it with ptrbridge.unwatch_library() before unloading it" in warned


def test_fork_while_c_threads_hold_the_scan_and_interposer_locks(holder_lib: Path) -> None:
    """A C thread allocating through the interposer and one adding roots while the main thread forks:
    every child must be able to allocate, scan and add roots (no lock inherited held)."""
    code = f"""
    import os, threading, time
    import cffi, ptrbridge
    ptrbridge.set_check_level(2)
    ffi = cffi.FFI()
    ffi.cdef(os.environ["HOLDER_CDEF"])
    h = ffi.dlopen({str(holder_lib)!r})
    assert h.holder_start_churn() == 0
    stop = threading.Event()
    buf = ptrbridge.CBuffer(64)
    def roots():
        while not stop.is_set():
            ptrbridge.remove_root(ptrbridge.add_root(buf.ptr, 64))
    t = threading.Thread(target=roots)
    t.start()
    stuck = 0
    for i in range(20):
        pid = os.fork()
        if pid == 0:
            h.holder_loop(100, 64)
            ptrbridge.remove_root(ptrbridge.add_root(buf.ptr, 64))
            ptrbridge.scan()
            os._exit(0)
        deadline = time.monotonic() + 20
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
                break
            if time.monotonic() > deadline:
                stuck += 1
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                break
            time.sleep(0.01)
    stop.set()
    t.join()
    h.holder_stop_churn()
    print("stuck", stuck)
    """
    proc = _child(code, {}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["stuck", "0"]


# --- the interposer itself ----------------------------------------------------------

def test_interposer_patches_a_library_loaded_later_and_restores_every_entry(holder_lib: Path) -> None:
    code = f"""
    import ctypes
    import cffi, ptrbridge
    from ptrbridge import interposition as ip
    ptrbridge.set_check_level(2)
    before = ip.stats()
    h = ctypes.CDLL({str(holder_lib)!r})   # loaded after level 2: patched by the dlopen hook
    h.holder_alloc.restype = ctypes.c_void_p
    h.holder_free.argtypes = [ctypes.c_void_p]
    kinds = {{o.path.rsplit('/', 1)[-1]: o.klass for o in ip.objects()}}
    p = h.holder_alloc(100)
    block = ip.find_block(p + 10)
    print("block", block[0] == p, block[1], ip.describe_code(block[2] - 1))
    h.holder_free(ctypes.c_void_p(p))
    print("after_free", ip.find_block(p))
    print("classes", kinds["libholder.so"], kinds["libc.so.6"], kinds.get("libpython3.11.so.1.0", "system"))
    ptrbridge.set_check_level(1)
    st = ip.stats()
    print("off", st.enabled, st.slots_patched, st.live_blocks)
    q = h.holder_alloc(100)           # libc again: nothing recorded, nothing breaks
    print("unrecorded", ip.find_block(q))
    h.holder_free(ctypes.c_void_p(q))
    ptrbridge.set_check_level(2)
    print("again", ip.stats().objects_patched >= 1, ip.find_block(0) is None)
    """
    proc = _child(code, {})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    assert lines["block"] == "True 100 holder_alloc() in libholder.so"
    assert lines["after_free"] == "None"
    assert lines["classes"] == "patched skipped system"
    assert lines["off"] == "False 0 0"
    assert lines["unrecorded"] == "None"
    assert lines["again"] == "True True"


def test_an_interior_pointer_into_a_live_c_block_of_any_size_is_resolved(holder_lib: Path) -> None:
    """find_block answers from the index (page bitmaps for small blocks, a sorted array for big ones):
    an address anywhere inside a live block - its first byte, its last, past a page boundary, deep in
    a 1 MiB block - names that block, one past the end or after its free names none, and on a table of
    thousands of blocks every answer agrees with a brute-force walk of ip.blocks()."""
    code = f"""
    import ctypes, random
    import ptrbridge
    from ptrbridge import interposition as ip
    ptrbridge.set_check_level(2)
    h = ctypes.CDLL({str(holder_lib)!r})
    h.holder_alloc.restype = ctypes.c_void_p
    h.holder_free.argtypes = [ctypes.c_void_p]
    sizes = [16, 24, 64, 100, 4000, 4096, 5000, 16384, 16385, 40000, 1 << 20, 3 << 20]
    blocks = {{}}
    for size in sizes:
        p = h.holder_alloc(size)
        blocks[p] = size
        ok = all((ip.find_block(a) or (0, 0))[:2] == (p, size)
                 for a in (p, p + 1, p + size // 2, p + size - 1, max(p, (p + size - 1) & ~4095)))
        print("size", size, ok)
    big = max(blocks, key=blocks.get)
    print("past_end", ip.find_block(big + blocks[big]) is None or ip.find_block(big + blocks[big])[0] != big)
    rng = random.Random(9)
    many = [h.holder_alloc(rng.choice((16, 48, 200, 3000, 9000, 70000))) for _ in range(3000)]
    for p in many[::3]:
        h.holder_free(ctypes.c_void_p(p))
    # C blocks only: the array ip.blocks() fills is itself ffi.new memory, freed when it returns
    live = sorted((b[0], b[1]) for b in ip.blocks() if not b[3])
    import bisect
    starts = [b[0] for b in live]
    def brute(a):
        i = bisect.bisect_right(starts, a) - 1
        return live[i] if i >= 0 and a - live[i][0] < max(live[i][1], 1) else None
    probes = [p + rng.randrange(0, 80000) for p in many] + [p + d for p in many for d in (0, 15, 16)]
    def find_c(a):
        b = ip.find_block(a)
        return None if b is None or b[3] else b[:2]
    mismatch = [a for a in probes if find_c(a) != brute(a)]
    print("agree", len(probes), len(mismatch))
    for p in many[1::3] + many[2::3]:
        h.holder_free(ctypes.c_void_p(p))
    h.holder_free(ctypes.c_void_p(big))
    print("freed", ip.find_block(big + 12345) is None, ip.find_block(big) is None)
    """
    proc = _child(code, {})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout.splitlines()
    assert [line for line in out if line.startswith("size")] == [f"size {n} True" for n in
                                                                (16, 24, 64, 100, 4000, 4096, 5000, 16384,
                                                                 16385, 40000, 1 << 20, 3 << 20)]
    assert "past_end True" in out
    agree = next(line for line in out if line.startswith("agree")).split()
    assert int(agree[1]) > 9000 and agree[2] == "0"
    assert "freed True True" in out


def test_the_hold_of_freed_ffi_new_memory_is_bounded_in_bytes() -> None:
    """Freed ffi.new blocks are held back from libc (poisoned) within a byte limit, not only a count:
    a program freeing one 64 KiB (or 8 KB) array per iteration keeps at most DEFAULT_HOLD_BYTES held,
    the newest, and the oldest go back to libc (4096 held blocks of any size had a Kafka producer's
    soak at level 2 grow by 32 MiB over 4096 batches)."""
    code = """
    import cffi, ptrbridge
    from ptrbridge import heapmap, interposition as ip
    from ptrbridge._bindings import ffi as pffi, lib as plib
    ptrbridge.set_check_level(2)
    ffi = cffi.FFI()
    start, size = pffi.new("uintptr_t[1]"), pffi.new("size_t[1]")
    def held(a):  # the block starts before the data: cffi allocates the cdata object with it
        return plib.pb__interpose_find_held(a, start, size) == 1 and start[0] <= a and a + n <= start[0] + size[0]
    for n in (65536, 8000):
        addresses = []
        for _ in range(600):      # 37.5 / 4.6 MiB, far fewer than 4096 blocks
            a = ffi.new("char[]", n)
            addresses.append(int(ffi.cast("uintptr_t", a)))
            del a
        st = ip.stats()
        kept = [a for a in set(addresses) if held(a)]  # an address given back may have been reused
        print(n, st.held_bytes <= heapmap.DEFAULT_HOLD_BYTES, held(addresses[-1]),
              len(kept) * n <= heapmap.DEFAULT_HOLD_BYTES, len(kept) >= heapmap.DEFAULT_HOLD_BYTES // n // 2)
    """
    proc = _child(code, {})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == ["65536 True True True True", "8000 True True True True"]


def test_dlclose_forgets_the_library_globals_and_blocks_stay_safe(holder_lib: Path) -> None:
    code = f"""
    import cffi, ptrbridge
    from ptrbridge import interposition as ip
    ptrbridge.set_check_level(2)
    ptrbridge.set_scan_batch(1_000_000)
    ffi = cffi.FFI()
    ffi.cdef(os.environ["HOLDER_CDEF"])
    h = ffi.dlopen({str(holder_lib)!r})
    lib = ptrbridge.wrap(h)
    data = b"kept in a static" * 4
    lib.set_prefix(data)
    print("before", [r.root for r in ptrbridge.scan()])
    lib.set_prefix(data)
    ffi.dlclose(h)            # the hook re-reads the loaded objects: libholder's segments are gone
    print("loaded", any("libholder" in o.path for o in ip.objects()))
    print("after", [r.root for r in ptrbridge.scan()])
    """
    proc = _child(code, {})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    assert lines["before"] == "['static variable g_prefix of libholder.so']"
    assert lines["loaded"] == "False"
    assert lines["after"] == "[]"


def test_blocks_freed_by_code_that_is_not_interposed_never_break_a_scan(holder_lib: Path) -> None:
    """A block a patched library allocates and CPython (not patched) frees stays in the table; the
    memory goes back to libc (big blocks are unmapped): the scan reads it fault-proof."""
    code = f"""
    import ctypes
    import ptrbridge
    from ptrbridge import interposition as ip
    from ptrbridge._bindings import ffi, lib
    ptrbridge.set_check_level(2)
    h = ctypes.CDLL({str(holder_lib)!r})
    h.holder_alloc.restype = ctypes.c_void_p
    libc = ctypes.CDLL(None)
    libc.free.argtypes = [ctypes.c_void_p]
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    ptrs = [h.holder_alloc(n) for n in (64, 1 << 20, 1 << 22)]
    # A PROT_NONE page right below the big blocks keeps their holes holes until the scan: the
    # next large mapping goes right below the lowest one, over them if they are lowest (under
    # ASan the 128 MiB shadow the heap map reserves for each GiB Python memory reaches did).
    libc.mmap((min(ptrs[1:]) & ~0xfff) - 0x2000, 0x1000, 0, 0x22, -1, 0)
    for p in ptrs:
        libc.free(p)       # straight to libc: the table still has them
    target = bytearray(64)
    ptrbridge.scanning.retire(int(ffi.cast("uintptr_t", ffi.from_buffer(target))), 64, "t", "f", "x:1",
                              "returned")
    print(len(ptrbridge.scan()))
    st = ffi.new("uint64_t *")
    lib.pb__scan_stale(ffi.NULL, 0, st)
    print(st[0] >= 1)
    """
    proc = _child(code, without_asan_quarantine())  # free() unmaps the big blocks at once, as glibc does
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["0", "True"]


def test_threads_allocating_through_the_interposer_while_scanning(holder_lib: Path) -> None:
    code = f"""
    import threading
    import cffi, ptrbridge
    from ptrbridge import interposition as ip
    ptrbridge.set_check_level(2)
    ffi = cffi.FFI()
    ffi.cdef(os.environ["HOLDER_CDEF"])
    h = ffi.dlopen({str(holder_lib)!r})
    def work():
        for _ in range(50):
            h.holder_loop(2000, 48)   # cffi releases the GIL: real concurrency
    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads: t.start()
    target = bytearray(64)
    from ptrbridge._bindings import ffi as pffi, lib as plib
    for i in range(50):
        ptrbridge.scanning.retire(int(pffi.cast("uintptr_t", pffi.from_buffer(target))), 64, "t", "f", "x:1",
                                  "returned")
        ptrbridge.scan()
    for t in threads: t.join()
    st = ip.stats()
    print(st.allocations >= 400_000, st.frees >= 400_000, st.live_blocks < 1000)
    """
    proc = _child(code, {}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["True", "True", "True"]


def test_static_function_and_static_variable_names_come_from_the_symtab(holder_lib: Path) -> None:
    code = f"""
    import cffi, ptrbridge
    from ptrbridge import interposition as ip
    ptrbridge.set_check_level(2)
    ffi = cffi.FFI()
    ffi.cdef(os.environ["HOLDER_CDEF"])
    h = ffi.dlopen({str(holder_lib)!r})
    data = bytes(64)
    assert h.worker_start(data, 64) == 0      # the job is calloc'd by the static function start()
    job = [b for b in ip.blocks() if not b[3] and ip.describe_code(b[2] - 1).startswith("start()")]
    print(len(job), ip.describe_code(job[0][2] - 1))
    h.worker_finish(); h.worker_free()
    """
    proc = _child(code, {})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "1 start() in libholder.so"


def test_system_library_list_is_documented() -> None:
    assert interposition.SYSTEM_OBJECTS and all(isinstance(s, str) for s in interposition.SYSTEM_OBJECTS)
    classify = ptrbridge._bindings.lib.pb__interpose_classify
    cases = {"": 1, "/lib/x86_64-linux-gnu/libc.so.6": 3, "/lib64/ld-linux-x86-64.so.2": 3,
             "/usr/lib/libm.so.6": 1, "/x/lib/libpython3.11.so.1.0": 1,
             "/x/lib/python3.11/lib-dynload/_ctypes.cpython-311.so": 1,
             "/x/site-packages/_cffi_backend.cpython-311.so": 2, "/usr/lib/libz.so.1": 0,
             "/usr/lib/libsqlite3.so.0": 0, "/x/numpy/_core/_multiarray_umath.cpython-311.so": 1}
    for path, klass in cases.items():
        assert classify(path.encode()) == klass, path


# --- programs run unchanged under `python -m ptrbridge run --check 2` ---------------

PROGRAM = r'''
"""A program written the naive way: C keeps pointers to Python memory (mode in argv[1])."""
import gc, os, sys
import cffi

MODE = sys.argv[1]
ffi = cffi.FFI()
ffi.cdef(os.environ["HOLDER_CDEF"])
lib = ffi.dlopen(os.environ["HOLDER_LIB"])


def label(name):
    return f"[{name}] ".encode() * 8   # a new bytes each time, freed when the call returns


if MODE == "static":
    lib.set_prefix(label("app"))
elif MODE == "static-twin":
    lib.set_prefix_copy(label("app"))
elif MODE in ("ctx", "ctx-twin"):
    ctx = lib.ctx_new()
    data = label("ctx")
    if MODE == "ctx":
        lib.ctx_keep(ctx, data)
    else:
        lib.ctx_keep_copy(ctx, data, len(data))
    del data
elif MODE in ("thread", "thread-twin"):
    start = lib.worker_start if MODE == "thread" else lib.worker_start_copy
    start(bytes(range(256)) * 4, 1024)
    print("sum", lib.worker_finish())
elif MODE in ("sqlite", "sqlite-twin"):
    sq = cffi.FFI()
    sq.cdef("""typedef struct sqlite3 sqlite3; typedef struct sqlite3_stmt sqlite3_stmt;
        int sqlite3_open(const char *, sqlite3 **); int sqlite3_exec(sqlite3 *, const char *, void *, void *, char **);
        int sqlite3_prepare_v2(sqlite3 *, const char *, int, sqlite3_stmt **, const char **);
        int sqlite3_bind_blob(sqlite3_stmt *, int, const void *, int, void (*)(void *));
        int sqlite3_step(sqlite3_stmt *); int sqlite3_reset(sqlite3_stmt *);""")
    s = sq.dlopen("libsqlite3.so.0")
    db = sq.new("sqlite3 **")
    assert s.sqlite3_open(b":memory:", db) == 0
    assert s.sqlite3_exec(db[0], b"create table t(b blob)", sq.NULL, sq.NULL, sq.NULL) == 0
    stmt = sq.new("sqlite3_stmt **")
    assert s.sqlite3_prepare_v2(db[0], b"insert into t values (?)", -1, stmt, sq.NULL) == 0
    how = sq.cast("void (*)(void *)", 0 if MODE == "sqlite" else -1)  # SQLITE_STATIC / SQLITE_TRANSIENT
    s.sqlite3_bind_blob(stmt[0], 1, bytes([7]) * 300, 300, how)   # the bytes dies after the call
    assert s.sqlite3_step(stmt[0]) == 101
    s.sqlite3_reset(stmt[0])     # the statement is kept for reuse, with its binding
elif MODE in ("zlib-ffi-new", "zlib-ffi-new-twin", "zlib-calloc", "zlib-calloc-twin"):
    z = cffi.FFI()
    z.cdef("""typedef struct z_stream_s { const unsigned char *next_in; unsigned avail_in; unsigned long total_in;
        unsigned char *next_out; unsigned avail_out; unsigned long total_out; const char *msg; void *state;
        void *zalloc; void *zfree; void *opaque; int data_type; unsigned long adler; unsigned long reserved;
        } z_stream;
        int deflateInit_(z_stream *, int, const char *, int); int deflate(z_stream *, int);
        int deflateEnd(z_stream *); const char *zlibVersion(void);""")
    zl = z.dlopen("libz.so.1")
    if MODE.startswith("zlib-ffi-new"):
        keep = z.new("z_stream *")
        assert zl.deflateInit_(keep, 6, zl.zlibVersion(), z.sizeof("z_stream")) == 0
        if MODE == "zlib-ffi-new":
            stream = z.cast("z_stream *", keep)
            del keep   # BUG: the cast keeps no reference: the ffi.new memory is freed, zlib's state
            gc.collect()  # still points to it
    else:
        stream = z.cast("z_stream *", lib.holder_calloc(z.sizeof("z_stream")))
        assert zl.deflateInit_(stream, 6, zl.zlibVersion(), z.sizeof("z_stream")) == 0
        out = lib.holder_alloc(16)
        data = os.urandom(4096)
        if MODE == "zlib-calloc":
            stream.next_in = z.from_buffer(data)   # BUG: zlib keeps next_in into the bytes
        else:
            copy = lib.holder_alloc(len(data))
            z.memmove(z.cast("unsigned char *", copy), data, len(data))
            stream.next_in = z.cast("unsigned char *", copy)
        stream.avail_in = len(data)
        stream.next_out = z.cast("unsigned char *", out)
        stream.avail_out = 16      # a small output buffer: input is left over
        assert zl.deflate(stream, 0) == 0
        del data
elif MODE in ("cext", "cext-twin"):
    sys.path.insert(0, os.environ["CEXT_DIR"])
    import _cextkeep
    (_cextkeep.keep if MODE == "cext" else _cextkeep.keep_copy)(label("ext"))
    print("len", _cextkeep.name_len())
elif MODE in ("numpy", "numpy-twin"):
    import numpy as np
    ctx = lib.ctx_new()
    a = np.arange(4096, dtype=np.uint8) | 1
    if MODE == "numpy":
        lib.ctx_keep(ctx, ffi.cast("char *", a.ctypes.data))
    else:
        lib.ctx_keep_copy(ctx, ffi.cast("char *", a.ctypes.data), a.nbytes)
    del a
gc.collect()
print("done", MODE)
'''


def _run(tmp_path: Path, mode: str, holder_lib: Path, cext_dir: Path,
         strict: bool = True) -> Tuple[subprocess.CompletedProcess, List[str]]:
    script = tmp_path / "prog.py"
    script.write_text(PROGRAM)
    report = tmp_path / f"report-{mode}.json"
    env = dict(os.environ, HOLDER_LIB=str(holder_lib), HOLDER_CDEF=HOLDER_CDEF, CEXT_DIR=str(cext_dir))
    # --strict: C merely holding a pointer is a portability finding, which fails only in strict mode.
    # --no-quarantine: this is about what the scan sees (with the quarantine on, the programs whose C
    # reads the kept pointer - thread, sqlite - die at the read, caught by it: tests/test_quarantine.py).
    proc = subprocess.run([sys.executable, "-m", "ptrbridge", "run", "--check", "2", "--no-quarantine",
                           *(["--strict"] if strict else []),
                           "--report", str(report), "--", sys.executable, str(script), mode],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert f"done {mode}" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    records = json.loads(report.read_text())["findings"]
    # Go's R2 as written: C keeps zlib's state->strm pointing at a z_stream that lives in ffi.new
    # memory (a live, correct back-pointer).  A portability finding, expected in the twin too.
    findings: List[str] = [f["message"] for f in records
                           if not (mode == "zlib-ffi-new-twin" and f["kind"] == "retained-live"
                                   and "cdata 'z_stream *'" in f["message"]
                                   and "allocated by deflateInit2_() in libz.so.1, at offset 0 " in f["message"])]
    return proc, findings


# Instrumented calls lend their arguments, so a pointer found right after the call names the call
# ("after the call returned", the object still alive); one found once the object is gone says so.
KEPT = re.compile(r"ptrbridge: C kept a pointer to Python memory after (the call returned|the object was freed) "
                  r"\(R2\): ")

CASES = {
    "static": r"is still pointed to by static variable g_prefix of libholder\.so ",
    "ctx": r"is still pointed to by a 64-byte block allocated by ctx_new\(\) in libholder\.so, at offset 8 ",
    "thread": r"is still pointed to by a \d+-byte block allocated by start\(\) in libholder\.so, at offset \d+ ",
    "sqlite": r"(Python memory block \(333 bytes\)|bytes\(300\)) \(\+32\) .*is still pointed to by a \d+-byte block "
              r"allocated by .* libsqlite3\.so\.0.*, at offset \d+ ",
    "zlib-ffi-new": r"(ffi\.new memory \(\d+ bytes\)|cdata 'z_stream \*'\(112\)).* is still pointed to by a \d+-byte "
                    r"block allocated by .* in libz\.so\.1, at offset 0 ",
    "zlib-calloc": r"is still pointed to by a 112-byte block allocated by holder_calloc\(\) in libholder\.so, "
                   r"at offset 0 ",
    "cext": r"is still pointed to by static variable g_name of _cextkeep\.cpython-[^ ]+\.so ",
    "numpy": r"is still pointed to by a 64-byte block allocated by ctx_new\(\) in libholder\.so, at offset 8 ",
}


@pytest.mark.parametrize("mode", list(CASES))
def test_unchanged_program_keeping_freed_python_memory_is_reported(mode: str, tmp_path: Path, holder_lib: Path,
                                                                   cext_dir: Path) -> None:
    proc, findings = _run(tmp_path, mode, holder_lib, cext_dir)
    assert proc.returncode == 1, proc.stderr[-3000:]  # findings make `run` fail
    mine = [f for f in findings if re.search(CASES[mode], f)]
    assert mine, "\n".join(findings) or proc.stderr[-3000:]
    assert all(KEPT.match(f) for f in mine), mine


@pytest.mark.parametrize("mode", [f"{m}-twin" for m in CASES])
def test_correct_twin_is_clean(mode: str, tmp_path: Path, holder_lib: Path, cext_dir: Path) -> None:
    proc, findings = _run(tmp_path, mode, holder_lib, cext_dir, strict=False)
    assert findings == [], "\n".join(findings)
    assert proc.returncode == 0, proc.stderr[-3000:]


# --- memory Python freed that libc then gave to C is C's -----------------------------

REUSE_CDEF = """
    struct conn; struct conn *conn_new(void); void *conn_cache(struct conn *, size_t, uintptr_t);
    void conn_uncache(struct conn *); void conn_keep(struct conn *, const char *);
    void conn_free(struct conn *); uintptr_t scratch(size_t);
"""

# b"x" * n (n = 991) is one 1024-byte block (header, data, NUL) from libc's malloc (bytes(991) would be
# calloc'd), like sqlite-twin's 1024-byte Python blocks; with the hold off, Python's free gives
# it straight back to libc, which hands it out again: the tests make sure it did.
REUSE_PRELUDE = """
import cffi, ptrbridge
from ptrbridge import heapmap, scanning
from ptrbridge._bindings import lib as plib
ptrbridge.set_check_level(2)
heapmap.set_hold(0, 0)
ffi = cffi.FFI()
ffi.cdef(os.environ["REUSE_CDEF"])
r = ffi.dlopen(os.environ["REUSE_LIB"])
scanning.scan_freed_python_memory()      # an empty queue: only this test's frees
c = r.conn_new()
n = 991                                  # a variable: b"x" * 991 would be a constant, never freed
def into(start):
    return [f for f in scanning.scan_freed_python_memory() if start <= f.address < start + 1024]
"""


@pytest.fixture(scope="module")
def reuse_lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_shared("reuse.c", tmp_path_factory.mktemp("reuse"))


def _reuse_child(body: str, reuse_lib: Path) -> List[str]:
    # The tests need libc's reuse of a freed block by the next malloc of its size (ASan's
    # quarantine would keep it out of reuse: the block would never come back).
    proc = _child(REUSE_PRELUDE + textwrap.dedent(body),
                  {"REUSE_LIB": str(reuse_lib), "REUSE_CDEF": REUSE_CDEF, **without_asan_quarantine()})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.splitlines()


def test_stale_pointer_c_keeps_into_memory_it_freed_after_python_is_not_python_memory(reuse_lib: Path) -> None:
    # sqlite-twin's false positive, reduced: Python frees a block, libc hands its memory to C,
    # C frees it and keeps a stale pointer into it.  That pointer is C's own, into C's freed memory.
    out = _reuse_child("""
    b = b"x" * n
    start = id(b)
    del b
    block = int(ffi.cast("uintptr_t", r.conn_cache(c, 1024, start)))
    print(block == start, plib.pb__interpose_c_reused(start + 8))
    r.conn_uncache(c)
    print(plib.pb__interpose_c_reused(start + 8), plib.pb__interpose_c_reused(start + 2048))
    for f in into(start):
        print(f)
    """, reuse_lib)
    assert out[0] == "True 1", out  # the chunk was reused (the test means something), live C memory
    assert out[1] == "2 0", out     # freed by C after Python's free; next door: nothing known
    assert out[2:] == []


def test_stale_pointer_c_kept_from_before_python_had_the_memory_is_not_python_memory(reuse_lib: Path) -> None:
    # sqlite-twin's flaky false positive on 3.12, reduced: C frees a block and keeps a stale
    # pointer into it; Python is handed the same memory, frees it, and the hold keeps it
    # (poisoned).  The word is C's own, from before: no checked call lent the Python block.
    out = _reuse_child("""
    heapmap.set_hold()                   # Python's free is held, as by default
    block = int(ffi.cast("uintptr_t", r.conn_cache(c, 1024, 0)))
    r.conn_uncache(c)                    # freed by C; conn keeps block + 8
    b = b"x" * n                         # the same size: libc hands the block back at once
    start = id(b)
    del b
    print(block == start, plib.pb__interpose_c_before(start + 8), plib.pb__interpose_c_before(start + 4096))
    for f in into(start):
        print(f)
    """, reuse_lib)
    assert out[0] == "True 1 0", out  # Python got C's freed block; C had it before; next door: nothing
    assert out[1:] == []


def test_pointer_c_keeps_into_freed_python_memory_is_reported_though_c_freed_there_before(
        reuse_lib: Path) -> None:
    # The order matters: C's free of a block at the same address *before* Python got it
    # does not make Python's block C's.  C keeping Python's pointer is the bug, reported.
    # (Lent by a checked call: libc-backed memory the hold gave back, as here with no hold,
    # is reported only when a lend says C got it from Python.)
    out = _reuse_child("""
    where = r.scratch(1024)
    tries = []
    while len(tries) < 64 and (not tries or id(tries[-1]) != where):
        tries.append(b"x" * n)
    b = tries.pop()
    del tries
    start = id(b)
    ptrbridge.set_scan_batch(1_000_000)  # the scan below, not one after the call
    ptrbridge.wrap(r).conn_keep(c, b)
    del b
    print(where == start, plib.pb__interpose_c_reused(start + 32))
    for f in into(start):
        print(f)
    """, reuse_lib)
    assert out[0] == "True 0", out
    assert len(out) == 2, out
    assert KEPT.match(out[1]), out
    assert "after the object was freed (R2): bytes(991) (+32) lent to conn_keep() at <string>:" in out[1], out
    assert "is still pointed to by a 24-byte block allocated by conn_new() in libreuse.so, at offset 16 " in out[1]


def test_pointer_c_keeps_into_freed_memory_libc_got_back_is_not_reported_without_a_lend(
        reuse_lib: Path) -> None:
    # The same memory, handed to C by a call ptrbridge did not check, and given back to libc
    # (no hold): libc may have handed it to C code no hook sees since, so nothing is known.
    # The same object small enough for pymalloc would be reported (see the tests above).
    out = _reuse_child("""
    b = b"x" * n
    start = id(b)
    r.conn_keep(c, b)
    del b
    print(len(into(start)))
    """, reuse_lib)
    assert out == ["0"], out


# --- with ptrbridge.wrap: the lending call is named, live and freed kept apart -------

WRAPPED = r'''
import gc, os, sys
import cffi, ptrbridge
from ptrbridge import findings
ffi = cffi.FFI()
ffi.cdef(os.environ["HOLDER_CDEF"])
raw = ffi.dlopen(os.environ["HOLDER_LIB"])
lib = ptrbridge.wrap(raw)
ptrbridge.set_check_level(2)
ptrbridge.set_on_violation("collect")
ptrbridge.set_scan_batch(1_000_000)
ctx = raw.ctx_new()
live = b"still alive" * 4
lib.ctx_keep(ctx, live)                         # LIVE
found = ptrbridge.scan()
lib.set_prefix(f"dies after the call {os.getpid()}".encode())      # FREED
gc.collect()
found += ptrbridge.scanning.scan_freed_python_memory()
for f in findings.take():
    if f.rule == "R2":
        print(f.kind, f.severity, f.function, f.lent_at.rsplit("/", 1)[-1], f.state, f.holder, sep="|")
'''


def test_wrapped_calls_name_the_lend_and_tell_live_from_freed(tmp_path: Path, holder_lib: Path) -> None:
    script = tmp_path / "wrapped.py"
    script.write_text(WRAPPED)
    env = dict(os.environ, HOLDER_LIB=str(holder_lib), HOLDER_CDEF=HOLDER_CDEF)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = {line.split("|")[0]: line.split("|") for line in proc.stdout.splitlines()}
    live_line = next(i for i, s in enumerate(WRAPPED.splitlines(), 1) if "# LIVE" in s)
    freed_line = next(i for i, s in enumerate(WRAPPED.splitlines(), 1) if "# FREED" in s)
    assert lines["retained-live"] == ["retained-live", "portability", "ctx_keep", f"wrapped.py:{live_line}",
                                      "returned", "a 64-byte block allocated by ctx_new() in libholder.so, at offset 8"]
    assert lines["retained-freed"] == ["retained-freed", "portability", "set_prefix", f"wrapped.py:{freed_line}",
                                       "freed", "static variable g_prefix of libholder.so"]


def test_interposition_can_be_turned_off_with_the_environment(holder_lib: Path) -> None:
    proc = _child("""
    import ptrbridge
    ptrbridge.set_check_level(2)
    print(ptrbridge.interposition.enabled())
    """, {"PTRBRIDGE_INTERPOSE": "0"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False"]


def test_a_target_a_library_is_mapped_over_now_is_not_reported() -> None:
    """Freed Python memory can go back to the kernel and dlopen map a library there: the library's
    own pointers into its image are not C keeping Python memory.  A target over libc's code stands
    for that; a pointer to it in a registered root is not reported, while its twin in anonymous
    memory is."""
    import ctypes
    import mmap

    ffi = ptrbridge._bindings.ffi
    in_library = ctypes.cast(ctypes.CDLL(None).strlen, ctypes.c_void_p).value
    assert in_library is not None
    anon = mmap.mmap(-1, mmap.PAGESIZE)
    elsewhere = int(ffi.cast("uintptr_t", ffi.from_buffer(anon)))
    root = mmap.mmap(-1, mmap.PAGESIZE)
    words = ffi.cast("uintptr_t *", ffi.from_buffer(root))
    words[0], words[1] = in_library + 8, elsewhere + 8
    base = int(ffi.cast("uintptr_t", words))
    rid = ptrbridge.add_root(base, mmap.PAGESIZE)
    try:
        ptrbridge.scanning.retire(in_library, 64, "bytes(64)", "f", "x.py:1", "freed")
        ptrbridge.scanning.retire(elsewhere, 64, "bytes(64)", "f", "x.py:2", "freed")
        found = ptrbridge.scan()
    finally:
        ptrbridge.remove_root(rid)
    assert [r.lent_at for r in found] == ["x.py:2"]
    assert found[0].address == elsewhere + 8


def test_memory_a_library_constructor_took_after_python_freed_it_is_not_python_memory(
        tmp_path: Path) -> None:
    # libpixman's and libX11's false "freed Python memory" under cairocffi, reduced: Python
    # gives a block back to libc, then dlopen runs a constructor (not yet interposed) that is
    # handed the same memory and keeps it in a global.  Nothing says C got it from Python.
    lib = build_shared("ctoralloc.c", tmp_path)
    out = _child(f"""
    import sys
    import cffi, ptrbridge
    from ptrbridge import heapmap, scanning
    ptrbridge.set_check_level(2)
    heapmap.set_hold(0, 0)                      # the block goes back to libc at once
    ffi = cffi.FFI()
    ffi.cdef("uintptr_t ctoralloc_table(void);")
    scanning.scan_freed_python_memory()         # only this test's frees from here
    # A size libc keeps in its per-thread cache (over pymalloc's 512 bytes, under tcache's
    # 1032): a free lands there, and only a request of the same size class takes it back,
    # last in first out.  A larger block would go to the unsorted bin, where dlopen's own
    # allocations may split it first (CI saw that happen).
    n = 867                                     # a variable: not a constant, freed for real
    b = b"p" * n
    start = id(b)
    os.environ["CTORALLOC_SIZE"] = str(sys.getsizeof(b))  # the same size: libc's same bin
    del b
    c = ffi.dlopen({str(lib)!r})
    table = c.ctoralloc_table()
    print(start <= table < start + n + 64)
    print([str(f) for f in scanning.scan_freed_python_memory() if start <= f.address < start + n + 64])
    """, without_asan_quarantine())  # libc's reuse of the freed block (ASan's quarantine would keep it)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0] == "True", lines  # libc handed the constructor Python's freed memory
    assert lines[1] == "[]", lines
