"""Quarantine: lent buffers as guard-paged shadows; a later use by C is a reported crash."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Iterator, List, Optional, Tuple

import cffi
import pytest

import ptrbridge
from ptrbridge import findings, quarantine

from cbuild import build_shared

REPORT = "ptrbridge: C used a pointer to Python memory after the call that lent it returned (R2, caught by quarantine)"


@pytest.fixture(scope="module")
def keeper_so(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_shared("keeper.c", tmp_path_factory.mktemp("qkeeper"))


PROGRAM = """
import cffi, faulthandler, ptrbridge
kffi = cffi.FFI()
kffi.cdef("void keep_global(const char *p); int keep_heap(const char *p); int keep_indirect(const char *p);"
          "int keep_copy(const char *p, size_t n); int keeper_read(void);")
k = ptrbridge.wrap(kffi.dlopen({so!r}))
ptrbridge.set_check_level(2)
ptrbridge.set_quarantine(True)
ptrbridge.set_on_violation("collect")  # let the program go on to the bad read
def fresh(text):
    return bytes(bytearray(text))  # a bytes of its own, freed when the call that lends it returns
{body}
print("read", k.keeper_read(), flush=True)
print("findings", len(ptrbridge.violations()), flush=True)
"""


def _run(so: Path, body: str, *flags: str) -> subprocess.CompletedProcess:
    code = PROGRAM.format(so=str(so), body=textwrap.dedent(body))
    return subprocess.run([sys.executable, *flags, "-c", code], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("keep", ["keep_global", "keep_heap", "keep_indirect"])
def test_kept_pointer_used_later_is_a_reported_crash(keeper_so: Path, keep: str) -> None:
    proc = _run(keeper_so, f'k.{keep}(fresh(b"lent for one call"))')
    assert proc.returncode == -signal.SIGSEGV, proc.stdout + proc.stderr
    assert REPORT in proc.stderr
    assert f"bytes(17) lent to {keep}() at <string>:" in proc.stderr
    assert "is offset 0 into it" in proc.stderr
    assert "pin the object for its whole C lifetime" in proc.stderr
    assert "read" not in proc.stdout


def test_summary_names_library_and_offset_when_the_function_has_no_dynamic_symbol(keeper_so: Path) -> None:
    code = PROGRAM.format(so=str(keeper_so), body='k.keep_global(fresh(b"lent for one call"))').replace(
        "int keeper_read(void);", "int keeper_read(void); int keeper_read_static(void);").replace(
        "k.keeper_read()", "k.keeper_read_static()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGSEGV, proc.stdout + proc.stderr
    assert re.search(r"^SUMMARY: ptrbridge: use-after-release \(READ\) in libkeeper\.so\+0x[0-9a-f]+ on bytes\(17\) "
                     r"lent to keep_global\(\) at <string>:\d+$", proc.stderr, re.M), proc.stderr
    assert "??" not in proc.stderr


def test_report_names_every_frame_of_the_lending_call_with_its_line(keeper_so: Path) -> None:
    """The lending stack is kept as call sites whose text is made once per site: the
    report still names each frame's own line, for a site lent from many times and for
    two lends from one function."""
    body = """
        def lend_it(data, also):
            k.keep_copy(b"same site", 9)  # this site lends many times, correctly
            k.keep_copy(also, len(also))
            k.keep_global(data)
        def outer():
            for _ in range(40):  # more lends than the quarantine holds: slots are reused
                lend_it(fresh(b"not this one"), b"x")
            lend_it(fresh(b"lent for one call"), b"y")
        outer()
    """
    proc = _run(keeper_so, body)
    assert proc.returncode == -signal.SIGSEGV, proc.stdout + proc.stderr
    code = PROGRAM.format(so=str(keeper_so), body=textwrap.dedent(body)).splitlines()
    line = {text.strip(): n for n, text in enumerate(code, 1)}
    kept, last, top = line["k.keep_global(data)"], line['lend_it(fresh(b"lent for one call"), b"y")'], line["outer()"]
    stack = f"    #0 <string>:{kept} in lend_it\n    #1 <string>:{last} in outer\n    #2 <string>:{top} in <module>\n"
    assert f"lent to keep_global() by the Python call (innermost first):\n{stack}\n" in proc.stderr, proc.stderr
    assert re.search(r"^SUMMARY: ptrbridge: use-after-release \(READ\) in keeper_read \(libkeeper\.so\) on "
                     rf"bytes\(17\) lent to keep_global\(\) at <string>:{kept}$", proc.stderr, re.M), proc.stderr
    assert f"bytes(17) lent to keep_global() at <string>:{kept}\n" in proc.stderr


def test_report_comes_before_faulthandler(keeper_so: Path) -> None:
    proc = _run(keeper_so, 'k.keep_global(fresh(b"xyz"))', "-X", "faulthandler")
    assert proc.returncode == -signal.SIGSEGV
    assert REPORT in proc.stderr and "Fatal Python error: Segmentation fault" in proc.stderr
    assert proc.stderr.index(REPORT) < proc.stderr.index("Fatal Python error")


def test_handler_goes_back_on_top_when_faulthandler_came_later(keeper_so: Path) -> None:
    body = """
        k.keep_copy(b"first", 5)        # installs ptrbridge's handler
        faulthandler.enable()          # now faulthandler is on top
        k.keep_global(fresh(b"second call"))  # a quarantined call puts ptrbridge back on top
    """
    proc = _run(keeper_so, body)
    assert proc.returncode == -signal.SIGSEGV
    assert "bytes(11) lent to keep_global()" in proc.stderr
    assert "Fatal Python error" in proc.stderr  # and faulthandler still ran, chained


def test_correct_library_runs_clean(keeper_so: Path) -> None:
    proc = _run(keeper_so, 'k.keep_copy(b"copied", 6)')
    assert proc.returncode == 0, proc.stderr
    assert f"read {ord('c')}" in proc.stdout and "findings 0" in proc.stdout
    assert REPORT not in proc.stderr


@pytest.fixture
def quarantined() -> Iterator[None]:
    old = ptrbridge.set_quarantine(True)
    try:
        with ptrbridge.checking(2):
            yield
    finally:
        ptrbridge.set_quarantine(old)


def test_writable_data_is_copied_back(quarantined: None) -> None:
    libc_ffi = cffi.FFI()
    libc_ffi.cdef("void *memset(void *s, int c, size_t n); size_t strlen(const char *s);")
    libc = ptrbridge.wrap(libc_ffi.dlopen(None))
    small = bytearray(100)
    libc.memset(libc_ffi.from_buffer(small), 0x41, 100)
    assert small == b"A" * 100
    big = bytearray(1 << 20)  # larger than a pool slot: a mapping of its own
    libc.memset(libc_ffi.from_buffer(big), 0x42, len(big))
    assert big == b"B" * len(big)
    owned = libc_ffi.new("char[]", 16)
    libc.memset(owned, 0x43, 15)
    assert libc_ffi.string(owned) == b"C" * 15
    assert libc.strlen(b"read-only input") == 15
    assert 1 <= quarantine.held() <= 16


def test_two_views_of_one_buffer_share_one_shadow(quarantined: None) -> None:
    libc_ffi = cffi.FFI()
    libc_ffi.cdef("void *memmove(void *d, const void *s, size_t n); void *memcpy(void *d, const void *s, size_t n);")
    libc = ptrbridge.wrap(libc_ffi.dlopen(None))
    data = bytearray(b"abcdefgh")
    view = memoryview(data)
    held = quarantine.held()
    d = libc.memmove(libc_ffi.from_buffer(view[0:7]), libc_ffi.from_buffer(view[1:8]), 7)  # overlapping
    assert data == b"bcdefghh"  # as without quarantine: C saw the aliasing, one copy-back
    # memmove returns the pointer it was given, the shadow's: the program gets the original's back
    assert int(libc_ffi.cast("uintptr_t", d)) == int(libc_ffi.cast("uintptr_t", libc_ffi.from_buffer(data)))
    assert quarantine.held() == min(held + 1, 16)  # one shadow for both arguments
    out, src = bytearray(4), bytearray(b"wxyz")
    libc.memcpy(libc_ffi.from_buffer(out), libc_ffi.from_buffer(src), 4)  # disjoint: two shadows
    assert out == b"wxyz"


def test_struct_pointer_argument_reaches_one_struct(quarantined: None) -> None:
    """A ``struct T *`` into a larger C block is one T: the bytes after it are not read as more Ts.

    The block holds a ``struct rec`` and then other data whose word at the
    place of a second record's slot points at a Python buffer (as a batch
    header followed by result slots does).  Only the record's own slot is
    shadowed; the word after it is not C's ``rec[1].p`` and is left alone.
    Reading the rest of the block as records followed whatever those words
    held, and read past the memory they point to (a SIGSEGV now and then).
    """
    libc_ffi = cffi.FFI()
    libc_ffi.cdef("struct rec { void *p; size_t n; }; void *memcpy(void *d, const struct rec *s, size_t n);")
    libc = ptrbridge.wrap(libc_ffi.dlopen(None))
    first, after = bytearray(b"the one record's buffer"), bytearray(b"not a record's buffer")
    address = lambda x: int(libc_ffi.cast("uintptr_t", libc_ffi.from_buffer(x)))  # noqa: E731
    with ptrbridge.CBuffer(3 * libc_ffi.sizeof("struct rec")) as block, ptrbridge.CBuffer(len(block)) as seen:
        words = libc_ffi.cast("uintptr_t *", block.ptr)
        words[0], words[2] = address(first), address(after)
        old = ptrbridge.set_on_violation("collect")  # C memory keeps both pointers after the call (R2)
        try:
            libc.memcpy(seen.ptr, libc_ffi.cast("struct rec *", block.ptr), len(block))  # seen: what C saw
        finally:
            ptrbridge.set_on_violation(old)
        got = libc_ffi.cast("uintptr_t *", seen.ptr)
        assert got[0] != address(first)  # the record's slot pointed at a shadow during the call
        assert words[0] == address(first)  # and was translated back
        assert got[2] == words[2] == address(after)  # the word after the record was never repointed
    ptrbridge.violations()  # drop the R2 findings collected above


def test_many_lends_reuse_slots(quarantined: None) -> None:
    libc_ffi = cffi.FFI()
    libc_ffi.cdef("size_t strlen(const char *s);")
    libc = ptrbridge.wrap(libc_ffi.dlopen(None))
    for i in range(500):
        assert libc.strlen(b"x" * (i % 50)) == i % 50
    assert quarantine.held() == 16  # the FIFO is bounded


def test_set_quarantine_rejects_non_bools() -> None:
    with pytest.raises(TypeError):
        ptrbridge.set_quarantine(1)  # type: ignore[arg-type]
    assert ptrbridge.quarantine_enabled() is False


def test_environment_turns_it_on() -> None:
    env = dict(os.environ, PTRBRIDGE_QUARANTINE="1")
    proc = subprocess.run([sys.executable, "-c", "import ptrbridge; print(ptrbridge.quarantine_enabled())"],
                          env=env, capture_output=True, text=True)
    assert proc.stdout.strip() == "True"


def test_pointers_c_returns_into_a_shadow_point_into_the_original(quarantined: None, checked_so: Path) -> None:
    # strtol's endptr and memchr's result point into the input: under quarantine into its shadow,
    # which the program would do arithmetic on and read after it is closed.
    import ctypes

    libc_ffi = cffi.FFI()
    libc_ffi.cdef("long strtol(const char *s, char **end, int base); double strtod(const char *s, char **end);"
                  "void *memchr(const void *s, int c, size_t n); unsigned long long address_seen(const char *p);")
    libc = ptrbridge.wrap(libc_ffi.dlopen(None))
    findings.take()
    text = b"  1234 rest"
    base = int(libc_ffi.cast("uintptr_t", libc_ffi.from_buffer(text)))
    assert ptrbridge.wrap(libc_ffi.dlopen(str(checked_so))).address_seen(text) != base  # C sees a shadow
    end = libc_ffi.new("char **")
    assert libc.strtol(text, end, 10) == 1234
    assert int(libc_ffi.cast("uintptr_t", end[0])) - base == 6 and libc_ffi.string(end[0]) == b" rest"
    number = libc_ffi.new("char[]", b"3.5e2xyz")
    end = libc_ffi.new("char **")  # (the first one points into text: explicit wrap's R1 says so)
    assert libc.strtod(number, end) == 350.0 and end[0] - number == 5
    found = libc.memchr(number, ord("x"), 8)
    assert libc_ffi.typeof(found) is libc_ffi.typeof("void *")
    assert libc_ffi.cast("char *", found) - number == 5
    assert libc.memchr(number, ord("!"), 8) == libc_ffi.NULL
    crt = ctypes.CDLL(None)
    crt.strtol.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_char_p), ctypes.c_int]
    crt.strtol.restype = ctypes.c_long
    crt.memchr.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    crt.memchr.restype = ctypes.c_void_p
    wrapped = ptrbridge.wrap(crt)
    cend = ctypes.c_char_p()
    assert wrapped.strtol(text, ctypes.byref(cend), 10) == 1234
    assert ctypes.cast(cend, ctypes.c_void_p).value - base == 6 and cend.value == b" rest"
    buf = ctypes.create_string_buffer(b"99 bottles")
    assert wrapped.memchr(buf, ord("b"), 10) - ctypes.addressof(buf) == 3
    crt.memchr.restype = ctypes.POINTER(ctypes.c_char)
    hit = wrapped.memchr(buf, ord("t"), 10)
    assert ctypes.cast(hit, ctypes.c_void_p).value - ctypes.addressof(buf) == 5
    # Nothing read a shadow after its call (a retention scan may report older tests' memory).
    assert [f for f in findings.take() if f.kind in ("use-after-release", "use-after-free")] == []


def test_a_callback_during_a_quarantined_call_sees_the_buffer_as_c_has_it(quarantined: None, instrumented: None,
                                                                         checked_so: Path) -> None:
    # A progress callback reads the buffer C is filling, and writes to it: without the quarantine
    # it sees C's bytes and C sees its own, and so it must with C working on a shadow.  (The
    # callbacks that can: ptrbridge.callback, and instrumented ffi.callback / CFUNCTYPE.)
    import ctypes

    from conftest import CHECKED_CDEF

    ffi = cffi.FFI()
    ffi.cdef(CHECKED_CDEF)
    lib = ptrbridge.wrap(ffi.dlopen(str(checked_so)))
    crt = ptrbridge.wrap(ctypes.CDLL(str(checked_so)))
    progress_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)
    crt.fill_calling.argtypes = [ctypes.c_char_p, ctypes.c_int, progress_type]

    def run(call: Any, buf: Any, view: Any, make: Any) -> Tuple[List[bytes], int]:
        seen: List[bytes] = []

        def progress(done: int) -> int:
            seen.append(bytes(view()[:done]))
            if done == 4:
                view()[0:1] = b"Z"  # C reads buf[0] at the end
            return 0

        with make(progress) as callback:
            return seen, call(buf, getattr(callback, "cdata", callback))  # ptrbridge.Callback: its cdata

    expected = ([b"a", b"ab", b"abc", b"abcd"], ord("Z"))
    data = bytearray(4)
    assert run(lambda b, cb: lib.fill_calling(ffi.from_buffer(b), 4, cb), data, lambda: data,
               lambda fn: ptrbridge.callback(ffi, "int(int)", fn)) == expected
    assert data == b"Zbcd"
    block = ffi.new("char[]", 4)
    assert run(lambda b, cb: lib.fill_calling(b, 4, cb), block, lambda: ffi.buffer(block),
               lambda fn: contextlib.nullcontext(ffi.callback("int(int)", fn))) == expected
    text = ctypes.create_string_buffer(4)
    assert run(lambda b, cb: crt.fill_calling(b, 4, cb), text,
               lambda: memoryview(text).cast("B"),
               lambda fn: contextlib.nullcontext(progress_type(fn))) == expected
    assert text.raw == b"Zbcd"


def test_a_callback_given_a_pointer_into_a_shadow_gets_one_into_the_original(
        quarantined: None, instrumented: None, checked_so: Path) -> None:
    # A tokenizer hands its callback pointers into the text: the program's offsets are start - text.
    import ctypes

    from conftest import CHECKED_CDEF

    ffi = cffi.FFI()
    ffi.cdef(CHECKED_CDEF)
    lib = ptrbridge.wrap(ffi.dlopen(str(checked_so)))
    text = b"to be  or not"
    base = int(ffi.cast("uintptr_t", ffi.from_buffer(text)))
    assert lib.address_seen(text) != base  # C works on a shadow
    words: List[Tuple[int, bytes]] = []

    def on_word(start: Any, length: int) -> int:
        words.append((int(ffi.cast("uintptr_t", start)) - base, ffi.unpack(start, length)))
        return 0

    expected = [(0, b"to"), (3, b"be"), (7, b"or"), (10, b"not")]
    with ptrbridge.callback(ffi, "int(const char *, int)", on_word) as callback:
        assert lib.each_word(text, callback.cdata) == 4 and words == expected
    words.clear()
    assert lib.each_word(text, ffi.callback("int(const char *, int)", on_word)) == 4 and words == expected
    crt = ptrbridge.wrap(ctypes.CDLL(str(checked_so)))
    word_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_char), ctypes.c_int)
    crt.each_word.argtypes = [ctypes.c_char_p, word_type]
    found: List[Tuple[int, bytes]] = []

    def on_ctypes_word(start: Any, length: int) -> int:
        found.append((ctypes.cast(start, ctypes.c_void_p).value - base, ctypes.string_at(start, length)))
        return 0

    assert crt.each_word(text, word_type(on_ctypes_word)) == 4 and found == expected


def test_c_writing_into_a_bytes_is_an_error_and_the_write_goes_through(quarantined: None) -> None:
    # Without the quarantine C's write reaches the bytes object (a memory-safety bug that CPython
    # does not see); with it, the write would stay in the shadow and hide the bug.
    import ctypes

    libc_ffi = cffi.FFI()
    libc_ffi.cdef("void *memset(void *s, int c, size_t n); size_t strlen(const char *s);")
    libc = ptrbridge.wrap(libc_ffi.dlopen(None))
    crt = ptrbridge.wrap(ctypes.CDLL(None))
    crt.memset.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_size_t]
    findings.take()
    data = bytes(range(97, 105))  # made at run time: not a shared constant
    line = sys._getframe().f_lineno + 1
    libc.memset(data, ord("A"), 2)
    assert data == b"AAcdefgh"  # as without the quarantine
    other = bytes(range(97, 105))
    crt.memset(other, ord("B"), 1)
    assert other == b"Bbcdefgh"
    assert libc.strlen(data) == 8  # a read leaves it alone: no finding
    found = [f for f in findings.take() if f.kind == "immutable-write"]
    assert [(f.severity, f.function, f.object) for f in found] == [("error", "memset", "bytes(8)")] * 2
    assert found[0].lent_at == f"test_quarantine.py:{line}"
    assert found[0].message.endswith(f"SUMMARY: ptrbridge: immutable-write bytes(8) passed to memset() at "
                                     f"test_quarantine.py:{line}")
    mutable = bytearray(b"abc")
    libc.memset(libc_ffi.from_buffer(mutable), ord("C"), 1)  # a buffer C may write: no finding
    assert mutable == b"Cbc" and [f for f in findings.take() if f.kind == "immutable-write"] == []


def test_ctypes_arguments_are_shadowed(quarantined: None) -> None:
    import ctypes

    crt = ctypes.CDLL(None)
    crt.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    crt.memset.restype = ctypes.c_void_p
    crt.strlen.argtypes = [ctypes.c_char_p]
    crt.strlen.restype = ctypes.c_size_t
    libc = ptrbridge.wrap(crt)
    held = quarantine.held()
    buf = (ctypes.c_char * 32)()
    back = libc.memset(buf, 0x44, 31)  # returns the pointer it was given, the shadow's, translated back
    assert buf.value == b"D" * 31 and back == ctypes.addressof(buf)
    assert libc.strlen(b"ctypes bytes") == 12
    assert quarantine.held() >= min(held + 2, 16)  # both were shadowed


KEEPER_CTYPES = """
import ctypes, ptrbridge
k = ctypes.CDLL({so!r})
k.keep_global.argtypes = [ctypes.c_char_p]
k.keeper_read.restype = ctypes.c_int
w = ptrbridge.wrap(k)
ptrbridge.set_check_level(2)
ptrbridge.set_quarantine(True)
ptrbridge.set_on_violation("collect")
w.keep_global(bytes(bytearray(b"ctypes lent")))  # freed when the call returns
print("read", w.keeper_read(), flush=True)
"""


def test_ctypes_kept_pointer_is_caught(keeper_so: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", KEEPER_CTYPES.format(so=str(keeper_so))],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGSEGV, proc.stdout + proc.stderr
    assert "bytes(11) lent to keep_global()" in proc.stderr


# ---------------------------------------------------------------------------
# Signal handling that coexists with other SIGSEGV handlers

@pytest.fixture(scope="module")
def foreign_so(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_shared("qforeign.c", tmp_path_factory.mktemp("qforeign"))


SA_NODEFER = 0x40000000
SA_RESETHAND = -0x80000000  # 0x80000000 as a C int

FOREIGN = """
import ctypes, sys, ptrbridge
f = ctypes.CDLL({so!r})
crt = ctypes.CDLL(None)
crt.strlen.argtypes = [ctypes.c_char_p]
crt.strlen.restype = ctypes.c_size_t
libc = ptrbridge.wrap(crt)
ptrbridge.set_check_level(2)
ptrbridge.set_quarantine({quarantine})
if {order!r} == "before":
    assert f.foreign_install({flags}) == 0
libc.strlen(b"first lend")  # installs the quarantine's handler
if {order!r} == "after":
    assert f.foreign_install({flags}) == 0  # on top; the next lend puts ptrbridge back on top
for i in range({rounds}):
    assert libc.strlen(b"lend %d" % i) == len(b"lend %d" % i)
    fixed = f.foreign_fault_fix(3)
    print("fixed", fixed, flush=True)
    jumped = f.foreign_fault_jump(2)
print("done", fixed, jumped, "mask", f.foreign_mask_ok(), flush=True)
{tail}
"""


def _foreign(so: Path, order: str, flags: int = 0, tail: str = "", rounds: int = 20,
             quarantine_on: bool = True) -> subprocess.CompletedProcess:
    code = FOREIGN.format(so=str(so), order=order, flags=flags, tail=tail, rounds=rounds,
                          quarantine=quarantine_on)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("order", ["before", "after"])
@pytest.mark.parametrize("flags", [0, SA_NODEFER])
def test_foreign_handler_recovers_from_its_own_faults_every_time(foreign_so: Path, order: str,
                                                                  flags: int) -> None:
    proc = _foreign(foreign_so, order, flags)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "done 60 40 mask 1" in proc.stdout  # 60 fixed faults, 40 siglongjmps, its sa_mask honoured
    assert "ptrbridge" not in proc.stderr


@pytest.mark.parametrize("order", ["before", "after"])
def test_fault_nobody_handles_dies_of_sigsegv(foreign_so: Path, order: str) -> None:
    proc = _foreign(foreign_so, order, tail="f.foreign_null_write()\nprint('survived')")
    assert proc.returncode == -signal.SIGSEGV, proc.stdout + proc.stderr
    assert "done 60 40" in proc.stdout and "survived" not in proc.stdout
    assert "ptrbridge" not in proc.stderr  # not ours: no report


def test_sig_dfl_is_re_raised_without_a_foreign_handler(keeper_so: Path) -> None:
    code = ("import ctypes, ptrbridge\n"
            "crt = ctypes.CDLL(None); crt.strlen.argtypes = [ctypes.c_char_p]\n"
            "libc = ptrbridge.wrap(crt); ptrbridge.set_check_level(2); ptrbridge.set_quarantine(True)\n"
            "libc.strlen(b'installs the handler')\n"
            "ctypes.string_at(16)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGSEGV
    assert "ptrbridge" not in proc.stderr


@pytest.mark.parametrize("order", ["before", "after"])
def test_sa_resethand_of_the_previous_handler_is_honoured(foreign_so: Path, order: str) -> None:
    # SA_RESETHAND: the handler runs once, then the default action applies -
    # with quarantine exactly as without it.
    for quarantine_on in (False, True):
        proc = _foreign(foreign_so, order, SA_RESETHAND, quarantine_on=quarantine_on)
        assert proc.returncode == -signal.SIGSEGV, (quarantine_on, proc.stdout + proc.stderr)
        assert proc.stdout.splitlines() == [], (quarantine_on, proc.stdout)  # 2nd fault of the 3 kills
        assert "ptrbridge" not in proc.stderr


# ---------------------------------------------------------------------------
# The buggy C library: overruns, kept pointers used later, pointers in structs

@pytest.fixture(scope="module")
def buggy_so(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_shared("qbuggy.c", tmp_path_factory.mktemp("qbuggy"), libs=["z"])


BUGGY = """
import cffi, ctypes, sys, threading, ptrbridge
ffi = cffi.FFI()
ffi.cdef('''
    struct iovec { void *iov_base; size_t iov_len; };
    struct msghdr { void *msg_name; unsigned int msg_namelen; struct iovec *msg_iov; size_t msg_iovlen;
                    void *msg_control; size_t msg_controllen; int msg_flags; };
    void keep_msg(const struct msghdr *m);
    typedef struct z_stream_s {
        const unsigned char *next_in; unsigned int avail_in; unsigned long total_in;
        unsigned char *next_out; unsigned int avail_out; unsigned long total_out;
        const char *msg; void *state; void *zalloc; void *zfree; void *opaque;
        int data_type; unsigned long adler; unsigned long reserved;
    } z_stream;
    int produce(const unsigned char *p, size_t n, size_t extra);
    int produce_before(const unsigned char *p, size_t before);
    int produce_in_thread(const unsigned char *p);
    void keep(const unsigned char *p);
    int keep_in_context(const unsigned char *p);
    void keep_iov(const struct iovec *iov, int n);
    void keep_next_in(z_stream *s);
    int first_byte(const unsigned char *p);
    int use_kept(void);
    void write_kept(void);
    void consume(z_stream *s, unsigned n);
    int peek(const z_stream *s);
    unsigned pending(const z_stream *s);
    int use_context(void);
    int use_kept_in_thread(void);
''')
b = @LIB@
ptrbridge.set_check_level(@LEVEL@)
ptrbridge.set_quarantine(@QUARANTINE@)
ptrbridge.set_on_violation("collect")  # let the program go on to the bad access
@BODY@
print("survived", flush=True)
"""


def _buggy(so: Path, body: str, level: int = 2, quarantine_on: str = "True",
           env: Optional[dict] = None, instrumented: bool = False) -> subprocess.CompletedProcess:
    """Run ``body`` after BUGGY's set-up: ``b`` is the library, wrapped, or (``instrumented``) loaded
    under ``ptrbridge.instrument()`` as ``ptrbridge run`` does, so that findings are recorded."""
    lib = "(ptrbridge.instrument(), ffi.dlopen(@SO@))[1]" if instrumented else "ptrbridge.wrap(ffi.dlopen(@SO@))"
    code = (BUGGY.replace("@LIB@", lib).replace("@SO@", repr(str(so))).replace("@LEVEL@", str(level))
            .replace("@QUARANTINE@", quarantine_on).replace("@BODY@", textwrap.dedent(body)))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env=env)


def _summary(stderr: str) -> List[str]:
    return [line for line in stderr.splitlines() if line.startswith("SUMMARY: ptrbridge:")]


def test_overrun_while_lent_is_reported(buggy_so: Path) -> None:
    proc = _buggy(buggy_so, """
        data = bytearray(range(241))
        print("sum", b.produce(ffi.from_buffer(data), 241, 0), flush=True)  # in bounds: fine
        b.produce(ffi.from_buffer(data), 241, 4)                             # reads data[241..244]
    """)
    assert proc.returncode == -signal.SIGSEGV, proc.stdout + proc.stderr
    assert f"sum {sum(range(241))}" in proc.stdout and "survived" not in proc.stdout
    assert "C read past the end of bytearray(241) lent to produce(): 1 byte beyond its end" in proc.stderr
    assert "still lent: the call to produce() has not returned" in proc.stderr
    assert "in produce+" in proc.stderr and "libqbuggy.so" in proc.stderr  # the native frame
    assert "<string>:" in proc.stderr and "in <module>" in proc.stderr  # the Python lending call
    assert _summary(proc.stderr) == [
        next(line for line in proc.stderr.splitlines() if line.startswith("SUMMARY"))]
    assert "SUMMARY: ptrbridge: overrun (READ) in produce (libqbuggy.so) on bytearray(241)" in proc.stderr


def test_overrun_distance_and_underrun(buggy_so: Path) -> None:
    # A large buffer (a mapping of its own) whose size is a multiple of the page
    # size starts on a page boundary: the leading guard catches underruns.
    proc = _buggy(buggy_so, "b.produce_before(ffi.from_buffer(bytearray(1 << 17)), 3)")
    assert proc.returncode == -signal.SIGSEGV, proc.stdout + proc.stderr
    assert "C read before the start of bytearray(131072) lent to produce_before(): 3 bytes before its start" \
        in proc.stderr


def test_overrun_from_another_thread(buggy_so: Path) -> None:
    proc = _buggy(buggy_so, "b.produce_in_thread(ffi.from_buffer(bytearray(8)))")
    assert proc.returncode == -signal.SIGSEGV, proc.stdout + proc.stderr
    assert "C read past the end of bytearray(8) lent to produce_in_thread(): 1 byte beyond its end" \
        in proc.stderr
    assert "in overrunner" not in proc.stderr or "libqbuggy.so" in proc.stderr
    line = next(x for x in proc.stderr.splitlines() if x.startswith("READ at "))
    tid, pid = line.split("by thread ")[1].split(" (pid ")
    assert tid != pid.rstrip("):")  # the C thread, not the main thread


@pytest.mark.parametrize("use, keep", [("use_kept()", "keep"), ("use_context()", "keep_in_context"),
                                       ("use_kept_in_thread()", "keep")])
def test_kept_pointer_used_later(buggy_so: Path, use: str, keep: str) -> None:
    proc = _buggy(buggy_so, f"""
        def lend():
            data = bytearray(b"lent for one call")
            b.{keep}(ffi.from_buffer(data))
        lend()
        b.{use}
    """)
    assert proc.returncode == -signal.SIGSEGV, proc.stdout + proc.stderr
    assert REPORT in proc.stderr
    assert f"bytearray(17) lent to {keep}() at <string>:" in proc.stderr
    assert "is offset 0 into it" in proc.stderr
    assert "in lend\n" in proc.stderr and "in <module>\n" in proc.stderr  # the Python stack, two frames
    assert f"released when the call to {keep}() returned" in proc.stderr
    innermost = "use_kept" if use == "use_kept_in_thread()" else use[:-2]  # the thread reads via use_kept()
    assert f"SUMMARY: ptrbridge: use-after-release (READ) in {innermost} (libqbuggy.so)" in proc.stderr
    if use == "use_kept_in_thread()":
        line = next(x for x in proc.stderr.splitlines() if x.startswith("READ at "))
        tid, pid = line.split("by thread ")[1].split(" (pid ")
        assert tid != pid.rstrip("):")  # the C thread, not the main thread


@pytest.mark.parametrize("use, keep", [("use_kept()", "keep"), ("use_context()", "keep_in_context"),
                                       ("use_kept_in_thread()", "keep")])
def test_kept_read_of_a_live_bytes_runs_as_without_quarantine(buggy_so: Path, use: str, keep: str) -> None:
    """From a global, a malloc'd context and a C thread: the program's output does not change."""
    body = f"""
        from ptrbridge import report
        data = bytes(bytearray(b"kept, and read while alive"))
        b.{keep}(data)
        print("reads", [b.{use} for _ in range(4)], flush=True)
        kept = [f for f in report.gather() if f.extra.get("kept_read")]
        print("kept", [(f.severity, f.object, f.function) for f in kept], flush=True)
    """
    on, off = _buggy(buggy_so, body), _buggy(buggy_so, body, quarantine_on="False")
    assert on.returncode == 0 and off.returncode == 0, on.stdout + on.stderr + off.stderr
    assert on.stdout.splitlines()[0] == off.stdout.splitlines()[0]
    assert f"kept [('portability', 'bytes(26)', '{keep}')]" in on.stdout
    assert "kept []" in off.stdout
    assert "survived" in on.stdout and "SUMMARY" not in on.stderr


def test_kept_read_when_sampling_at_level_1_goes_on_until_the_program_lets_go(buggy_so: Path) -> None:
    """No heap map: the shadow holds the bytes, alive while the program references it too."""
    proc = _buggy(buggy_so, """
        from ptrbridge import report
        data = bytes(bytearray(b"kept while alive"))
        b.keep(data)
        print("reads", [b.use_kept() for _ in range(3)], flush=True)
        print("kept", [(f.severity, f.object) for f in report.gather() if f.extra.get("kept_read")], flush=True)
        del data                                      # the program lets go of it...
        b.first_byte(ffi.from_buffer(bytearray(b"z")))  # ...a sampled lend notices...
        b.use_kept()                                  # ...and this read is a use after free
    """, level=1)
    assert f"reads {[ord('k')] * 3}" in proc.stdout, proc.stdout + proc.stderr
    assert "kept [('portability', 'bytes(16)')]" in proc.stdout
    assert proc.returncode == -signal.SIGSEGV, proc.stdout + proc.stderr
    assert "bytes(16) lent to keep() at <string>:" in proc.stderr
    assert "and the object has been freed since" in proc.stderr
    assert "survived" not in proc.stdout


def test_threads_lending_at_once_each_get_their_own_shadow(buggy_so: Path) -> None:
    """cffi releases the GIL inside the lend: a shadow address must never cross to another thread's call."""
    proc = _buggy(buggy_so, """
        import sys
        sys.setswitchinterval(1e-6)
        bad = []
        def worker(k):
            for i in range(300):
                data = bytes(bytearray(range(k, k + 10 + 7 * k)))   # a length of its own per thread
                got = b.produce(data, len(data), 0)
                if got != sum(data):
                    bad.append((k, i, got, sum(data)))
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        print("bad", bad[:3], flush=True)
    """)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "bad []" in proc.stdout


def test_adopted_shadows_do_not_use_up_the_quarantine(buggy_so: Path) -> None:
    """More live bytes read through kept pointers than the pool has slots: later lends are still caught."""
    proc = _buggy(buggy_so, """
        from ptrbridge._bindings import lib as native
        live = [bytes(bytearray(b"live %d" % i)) for i in range(48)]  # the pool has 32 slots
        for data in live:
            b.keep(data)
            b.use_kept()  # a kept read: the shadow stays open for as long as data lives
        print("kept reads", native.pb__quarantine_kept_reads(), flush=True)
        def lend():
            b.keep(ffi.from_buffer(bytearray(b"lent for one call")))
        lend()
        b.use_kept()
    """)
    assert "kept reads 48" in proc.stdout, proc.stdout + proc.stderr
    assert proc.returncode == -signal.SIGSEGV, proc.stdout + proc.stderr
    assert "bytearray(17) lent to keep() at <string>:" in proc.stderr
    assert "survived" not in proc.stdout


def test_iovec_base_reached_through_a_struct(buggy_so: Path) -> None:
    proc = _buggy(buggy_so, """
        iov = ptrbridge.CBuffer(ffi.sizeof("struct iovec"))
        v = ffi.cast("struct iovec *", iov.ptr)  # a struct iovec * is one iovec
        first = bytearray(b"first buffer")
        v.iov_base, v.iov_len = ffi.from_buffer(first), 12
        before = int(ffi.cast("uintptr_t", v.iov_base))
        b.keep_iov(v, 1)
        after = int(ffi.cast("uintptr_t", v.iov_base))
        print("restored", before == after, flush=True)  # the slot points at the original again
        print("read", b.use_kept(), flush=True)  # C kept the shadow's address: a kept read, alive
        from ptrbridge import report
        print("kept", [(f.severity, f.object, f.function) for f in report.gather() if f.extra.get("kept_read")],
              flush=True)
        del first                                # freed: the shadow is closed again
        b.use_kept()
    """)
    assert proc.returncode == -signal.SIGSEGV, proc.stdout + proc.stderr
    assert "restored True" in proc.stdout
    assert f"read {ord('f')}" in proc.stdout
    assert "kept [('portability', 'bytearray(12)', 'keep_iov')]" in proc.stdout
    assert "bytearray(12) lent to keep_iov() at <string>:" in proc.stderr
    assert "and the object has been freed since" in proc.stderr
    assert "SUMMARY: ptrbridge: use-after-release (READ) in use_kept" in proc.stderr


def test_msg_iov_base_reached_through_two_structs(buggy_so: Path) -> None:
    proc = _buggy(buggy_so, """
        iovs = ptrbridge.CBuffer(ffi.sizeof("struct iovec"))
        v = ffi.cast("struct iovec *", iovs.ptr)  # msg_iov is followed into one iovec
        body = bytearray(b"message body")
        v.iov_base, v.iov_len = ffi.from_buffer(body), 12
        msg = ptrbridge.cnew("struct msghdr *", ffi=ffi)
        msg.c.msg_iov, msg.c.msg_iovlen = v, 1
        b.keep_msg(msg.c)
        print("restored", int(ffi.cast("uintptr_t", v.iov_base)) == int(ffi.cast("uintptr_t", ffi.from_buffer(body))),
              flush=True)
        b.use_kept()
        from ptrbridge import report
        print("kept", [(f.severity, f.object, f.function) for f in report.gather() if f.extra.get("kept_read")],
              flush=True)
        del body
        b.use_kept()
    """)
    assert proc.returncode == -signal.SIGSEGV, proc.stdout + proc.stderr
    assert "restored True" in proc.stdout
    assert "kept [('portability', 'bytearray(12)', 'keep_msg')]" in proc.stdout
    assert "bytearray(12) lent to keep_msg() at <string>:" in proc.stderr
    assert "and the object has been freed since" in proc.stderr


def test_z_stream_next_in_reached_through_a_struct(buggy_so: Path) -> None:
    proc = _buggy(buggy_so, """
        zs = ptrbridge.cnew("z_stream *", ffi=ffi)
        data = bytearray(b"input zlib would read")
        zs.c.next_in = ffi.from_buffer(data)
        zs.c.avail_in = len(data)
        b.keep_next_in(zs.c)
        b.use_kept()
        from ptrbridge import report
        print("kept", [(f.severity, f.object, f.function) for f in report.gather() if f.extra.get("kept_read")],
              flush=True)
        del data
        b.use_kept()
    """)
    assert proc.returncode == -signal.SIGSEGV, proc.stdout + proc.stderr
    assert "kept [('portability', 'bytearray(21)', 'keep_next_in')]" in proc.stdout
    assert "bytearray(21) lent to keep_next_in() at <string>:" in proc.stderr
    assert "and the object has been freed since" in proc.stderr


def test_numpy_data_as_pointer(buggy_so: Path) -> None:
    np = pytest.importorskip("numpy")
    assert np is not None
    code = textwrap.dedent(f"""
        import ctypes, numpy as np, ptrbridge
        lib = ctypes.CDLL({str(buggy_so)!r})
        lib.keep_doubles.argtypes = [ctypes.POINTER(ctypes.c_double)]
        lib.use_kept.restype = ctypes.c_int
        w = ptrbridge.wrap(lib)
        ptrbridge.set_check_level(2)
        ptrbridge.set_quarantine(True)
        ptrbridge.set_on_violation("collect")
        arr = np.arange(8.0)
        w.keep_doubles(arr.ctypes.data_as(ctypes.POINTER(ctypes.c_double)))
        w.use_kept()
        from ptrbridge import report
        print("kept", [(f.severity, f.object, f.function) for f in report.gather() if f.extra.get("kept_read")],
              flush=True)
        del arr
        w.use_kept()
        print("survived")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGSEGV, proc.stdout + proc.stderr
    assert "kept [('portability', 'ndarray(64)', 'keep_doubles')]" in proc.stdout
    assert "ndarray(64) lent to keep_doubles() at <string>:" in proc.stderr
    assert "and the object has been freed since" in proc.stderr


CURSOR = """
    from ptrbridge import report
    zs = ffi.new("z_stream *")
    def feed():
        data = bytearray(b"input the stream consumes")
        zs.next_in, zs.avail_in = ffi.from_buffer(data), 25
        b.consume(zs, 5)                  # C moves the cursor (data is alive)
    feed()                                # data is freed: the cursor C left is stale
    print("got", b.@USE@(zs), flush=True)
    found = [f for f in report.gather() if f.kind != "leak"]
    print("found", [(f.kind, f.severity) for f in found], flush=True)
    for f in found:
        print(f.message, flush=True)
"""


def _cursor(so: Path, use: str, *, moved: bool = True) -> subprocess.CompletedProcess:
    # zlib's next_in, reduced: the program sets the cursor, C advances it, the buffer is freed,
    # and a later call gets the struct with the stale cursor C left in it.
    body = CURSOR.replace("@USE@", use)
    if not moved:  # the program's own pointer, never moved by C
        body = body.replace("        b.consume(zs, 5)                  # C moves the cursor (data is alive)\n", "")
    return _buggy(so, body, instrumented=True)


def test_a_stale_cursor_c_left_into_freed_memory_is_clean_when_c_does_not_use_it(buggy_so: Path) -> None:
    proc = _cursor(buggy_so, "pending")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "got 20" in proc.stdout
    assert "found []" in proc.stdout, proc.stdout


def test_a_stale_cursor_c_left_into_freed_memory_is_a_use_after_free_when_c_reads_it(buggy_so: Path) -> None:
    proc = _cursor(buggy_so, "peek")
    assert proc.returncode == 0, proc.stdout + proc.stderr  # the read went on
    assert f"got {0xDB}" in proc.stdout  # what freed memory reads as under ptrbridge
    assert "found [('use-after-free', 'error')]" in proc.stdout, proc.stdout
    assert "C read freed Python memory through a pointer the call was passed" in proc.stdout
    assert "(freed before the call; argument 1 .next_in) passed to peek() at <string>:" in proc.stdout
    assert re.search(r"^SUMMARY: ptrbridge: use-after-free \(READ\) in peek \(libqbuggy\.so\)", proc.stdout, re.M)


def test_a_field_the_program_set_to_freed_memory_is_an_error_at_the_call(buggy_so: Path) -> None:
    # Not a cursor C left: the program stored a pointer to a buffer that died (gather.py's iov_base).
    proc = _cursor(buggy_so, "pending", moved=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "found [('dangling-argument', 'error')]" in proc.stdout, proc.stdout
    assert ".next_in -> " in proc.stdout


def test_correct_twin_runs_clean(buggy_so: Path) -> None:
    proc = _buggy(buggy_so, """
        for i in range(100):
            data = bytearray(b"%d" % i)
            assert b.first_byte(ffi.from_buffer(data)) == data[0]
            assert b.produce(ffi.from_buffer(data), len(data), 0) == sum(data)
    """)
    assert proc.returncode == 0, proc.stderr
    assert "survived" in proc.stdout and "ptrbridge" not in proc.stderr


# ---------------------------------------------------------------------------
# Sampling

def test_sampling_one_in_one_catches_at_level_1(buggy_so: Path) -> None:
    env = dict(os.environ, PTRBRIDGE_QUARANTINE="1/1")
    proc = _buggy(buggy_so, """
        assert ptrbridge.quarantine_enabled()
        b.keep(ffi.from_buffer(bytearray(b"sampled")))
        b.use_kept()
    """, level=1, quarantine_on="ptrbridge.quarantine_enabled()", env=env)
    assert proc.returncode == -signal.SIGSEGV, proc.stdout + proc.stderr
    assert "bytearray(7) lent to keep() at <string>:" in proc.stderr


def test_sampling_large_n_runs_correct_code_unchanged(buggy_so: Path) -> None:
    proc = _buggy(buggy_so, """
        ptrbridge.set_quarantine(sample=50)
        total = 0
        for i in range(2000):
            data = bytearray(b"abc%d" % i)
            total += b.produce(ffi.from_buffer(data), len(data), 0)
        print("total", total, "held", ptrbridge.quarantine.held(), flush=True)
    """, level=1)
    assert proc.returncode == 0, proc.stderr
    expected = sum(sum(b"abc%d" % i) for i in range(2000))
    assert f"total {expected} " in proc.stdout
    held = int(proc.stdout.split("held ")[1].split()[0])
    assert 1 <= held <= 16  # some lends (about 40 of 2000) were quarantined, not all


def test_sample_argument_is_validated() -> None:
    with pytest.raises(ValueError):
        ptrbridge.set_quarantine(sample=0)
    with pytest.raises(ValueError):
        ptrbridge.set_quarantine(sample=True)  # type: ignore[arg-type]
    assert ptrbridge.quarantine_enabled() is False


@pytest.mark.parametrize("value, expected", [("1", (True, 1)), ("1/1000", (True, 1000)), ("0", (False, 1)),
                                             ("1/0", (False, 1)), ("1/x", (False, 1)), ("", (False, 1))])
def test_environment_parsing(value: str, expected: Tuple[bool, int]) -> None:
    assert quarantine._parse(value) == expected


# ---------------------------------------------------------------------------
# Correct programs behave identically with quarantine on

ZLIB_CORRECT = '''
import cffi, hashlib, sys, zlib as py_zlib, ptrbridge
ffi = cffi.FFI()
ffi.cdef("""
    typedef struct z_stream_s {
        const unsigned char *next_in; unsigned int avail_in; unsigned long total_in;
        unsigned char *next_out; unsigned int avail_out; unsigned long total_out;
        const char *msg; void *state; void *zalloc; void *zfree; void *opaque;
        int data_type; unsigned long adler; unsigned long reserved;
    } z_stream;
    const char *zlibVersion(void);
    int deflateInit_(z_stream *strm, int level, const char *version, int stream_size);
    int deflate(z_stream *strm, int flush);
    int deflateEnd(z_stream *strm);
""")
raw = ffi.dlopen("libz.so.1")
z = ptrbridge.wrap(raw)
ptrbridge.set_check_level(2)
ptrbridge.set_scan_batch(1)  # a scan after every call: the findings do not depend on timing
ptrbridge.set_quarantine(sys.argv[1] == "1")
data = bytes(range(256)) * 300 + b"tail"
version = raw.zlibVersion()

# 1. Fully pinned: a Python-owned z_stream (zlib checks state->strm == strm), pinned buffers.
pinner = ptrbridge.Pinner()
zs = ffi.new("z_stream *")
pinner.pin(zs)
src, out = bytearray(data), bytearray(1 << 12)
zs.next_in = ffi.cast("unsigned char *", pinner.pin(src))
zs.avail_in = len(src)
assert z.deflateInit_(zs, 6, version, ffi.sizeof("z_stream")) == 0
pieces = []
while True:
    zs.next_out = ffi.cast("unsigned char *", pinner.pin(out))
    zs.avail_out = len(out)
    rc = z.deflate(zs, 4)
    assert rc in (0, 1), rc
    pieces.append(bytes(out[:len(out) - zs.avail_out]))
    if rc == 1:
        break
z.deflateEnd(zs)
pinner.unpin()
pinned = b"".join(pieces)
assert py_zlib.decompress(pinned) == data
print("pinned", len(pieces), hashlib.sha256(pinned).hexdigest())

# 2. A z_stream in C memory, input and output lent for one call (all consumed in it).
ptrbridge.set_on_violation("collect")
cs = ptrbridge.cnew("z_stream *", ffi=ffi)
assert z.deflateInit_(cs.c, 6, version, ffi.sizeof("z_stream")) == 0
big_out = bytearray(len(data) + 1024)
cs.c.next_in = ffi.from_buffer(data)
cs.c.avail_in = len(data)
cs.c.next_out = ffi.from_buffer(big_out)
cs.c.avail_out = len(big_out)
start_in = int(ffi.cast("uintptr_t", cs.c.next_in))
start_out = int(ffi.cast("uintptr_t", cs.c.next_out))
assert z.deflate(cs.c, 4) == 1
n = len(big_out) - cs.c.avail_out
# next_in/next_out advanced inside the shadows end at the same offsets in the originals
assert int(ffi.cast("uintptr_t", cs.c.next_in)) == start_in + len(data)
assert int(ffi.cast("uintptr_t", cs.c.next_out)) == start_out + n
z.deflateEnd(cs.c)
assert py_zlib.decompress(bytes(big_out[:n])) == data
print("lent", n, hashlib.sha256(bytes(big_out[:n])).hexdigest(), "held", ptrbridge.quarantine.held() > 0)
# the level-2 scan sees next_in/next_out left in the C-memory z_stream either way: same findings
print("findings", [type(v).__name__ for v in ptrbridge.violations()])
'''

SQLITE_CORRECT = '''
import cffi, hashlib, sys, ptrbridge
ffi = cffi.FFI()
ffi.cdef("""
    typedef struct sqlite3 sqlite3; typedef struct sqlite3_stmt sqlite3_stmt;
    int sqlite3_open(const char *filename, sqlite3 **db);
    int sqlite3_close(sqlite3 *db);
    int sqlite3_exec(sqlite3 *db, const char *sql, void *cb, void *arg, char **err);
    int sqlite3_prepare_v2(sqlite3 *db, const char *sql, int n, sqlite3_stmt **stmt, const char **tail);
    int sqlite3_bind_text(sqlite3_stmt *stmt, int i, const char *text, int n, void (*destructor)(void *));
    int sqlite3_bind_blob(sqlite3_stmt *stmt, int i, const void *data, int n, void (*destructor)(void *));
    int sqlite3_step(sqlite3_stmt *stmt);
    int sqlite3_reset(sqlite3_stmt *stmt);
    int sqlite3_finalize(sqlite3_stmt *stmt);
    const unsigned char *sqlite3_column_text(sqlite3_stmt *stmt, int i);
    int sqlite3_column_bytes(sqlite3_stmt *stmt, int i);
    const void *sqlite3_column_blob(sqlite3_stmt *stmt, int i);
""")
s = ptrbridge.wrap(ffi.dlopen("libsqlite3.so.0"))
ptrbridge.set_check_level(2)
ptrbridge.set_quarantine(sys.argv[1] == "1")
TRANSIENT = ffi.cast("void (*)(void *)", -1)  # sqlite copies the value
pdb = ffi.new("sqlite3 **")
assert s.sqlite3_open(b":memory:", pdb) == 0
db = pdb[0]
assert s.sqlite3_exec(db, b"create table t(k text, v blob)", ffi.NULL, ffi.NULL, ffi.NULL) == 0
pst = ffi.new("sqlite3_stmt **")
assert s.sqlite3_prepare_v2(db, b"insert into t values(?, ?)", -1, pst, ffi.NULL) == 0
for i in range(300):
    key, blob = b"key-%d" % i, bytearray(b"%d" % (i * i)) * 3
    assert s.sqlite3_bind_text(pst[0], 1, key, len(key), TRANSIENT) == 0
    assert s.sqlite3_bind_blob(pst[0], 2, ffi.from_buffer(blob), len(blob), TRANSIENT) == 0
    assert s.sqlite3_step(pst[0]) == 101
    s.sqlite3_reset(pst[0])
s.sqlite3_finalize(pst[0])
assert s.sqlite3_prepare_v2(db, b"select k, v from t order by k", -1, pst, ffi.NULL) == 0
rows = []
while s.sqlite3_step(pst[0]) == 100:
    k = ffi.string(s.sqlite3_column_text(pst[0], 0))
    v = ffi.buffer(s.sqlite3_column_blob(pst[0], 1), s.sqlite3_column_bytes(pst[0], 1))[:]
    rows.append((k, v))
s.sqlite3_finalize(pst[0])
s.sqlite3_close(db)
print(len(rows), rows[0], rows[-1], hashlib.sha256(repr(rows).encode()).hexdigest())
'''

WRITEV_CORRECT = '''
import cffi, os, sys, tempfile, ptrbridge
ffi = cffi.FFI()
ffi.cdef("struct iovec { void *iov_base; size_t iov_len; }; long writev(int fd, const struct iovec *iov, int n);")
libc = ptrbridge.wrap(ffi.dlopen(None))
ptrbridge.set_check_level(2)
ptrbridge.set_quarantine(sys.argv[1] == "1")
ptrbridge.set_on_violation("collect")  # the iovec array in C memory keeps its pointers: reported either way
fd, path = tempfile.mkstemp()
iov = ptrbridge.CBuffer(3 * ffi.sizeof("struct iovec"))
v = ffi.cast("struct iovec *", iov.ptr)
for i in range(50):
    parts = [b"alpha%d " % i, bytearray(b"beta "), b"gamma\\n"]
    views = [ffi.from_buffer(p) for p in parts]
    for j, (p, view) in enumerate(zip(parts, views)):
        v[j].iov_base, v[j].iov_len = view, len(p)
    assert libc.writev(fd, v, 3) == sum(map(len, parts))
os.close(fd)
with open(path, "rb") as f:
    content = f.read()
print(content.count(b"beta"), len(content), content[:30], len(ptrbridge.violations()) > 0)
os.unlink(path)
'''


SENDMSG_CORRECT = '''
import cffi, socket, sys, ptrbridge
ffi = cffi.FFI()
ffi.cdef("""
    struct iovec { void *iov_base; size_t iov_len; };
    struct msghdr { void *msg_name; unsigned int msg_namelen; struct iovec *msg_iov; size_t msg_iovlen;
                    void *msg_control; size_t msg_controllen; int msg_flags; };
    long sendmsg(int fd, const struct msghdr *msg, int flags);
    long recvmsg(int fd, struct msghdr *msg, int flags);
""")
libc = ptrbridge.wrap(ffi.dlopen(None))
ptrbridge.set_check_level(2)
ptrbridge.set_quarantine(sys.argv[1] == "1")
ptrbridge.set_on_violation("collect")  # the C-memory iovecs keep their pointers: reported either way
a, b = socket.socketpair()
iovs = ptrbridge.CBuffer(2 * ffi.sizeof("struct iovec"))
v = ffi.cast("struct iovec *", iovs.ptr)
msg = ptrbridge.cnew("struct msghdr *", ffi=ffi)
got = []
for i in range(30):
    head, body = bytearray(b"head%02d:" % i), b"body of message %d" % i
    v[0].iov_base, v[0].iov_len = ffi.from_buffer(head), len(head)
    v[1].iov_base, v[1].iov_len = ffi.from_buffer(body), len(body)
    msg.c.msg_iov, msg.c.msg_iovlen = v, 2
    assert libc.sendmsg(a.fileno(), msg.c, 0) == len(head) + len(body)
    rhead, rbody = bytearray(7), bytearray(64)  # received through the same C-memory records
    v[0].iov_base, v[0].iov_len = ffi.from_buffer(rhead), 7
    v[1].iov_base, v[1].iov_len = ffi.from_buffer(rbody), 64
    n = libc.recvmsg(b.fileno(), msg.c, 0)
    got.append(bytes(rhead) + bytes(rbody[:n - 7]))
print(got[0], got[-1], len(got), ptrbridge.quarantine.held() > 0)
'''


@pytest.mark.parametrize("program", [ZLIB_CORRECT, SQLITE_CORRECT, WRITEV_CORRECT, SENDMSG_CORRECT],
                         ids=["zlib", "sqlite3", "writev", "sendmsg"])
def test_correct_program_is_unchanged_under_quarantine(program: str) -> None:
    runs = [subprocess.run([sys.executable, "-c", program, flag], capture_output=True, text=True, timeout=120)
            for flag in ("0", "1")]
    for proc in runs:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "ptrbridge" not in proc.stderr and "Warning" not in proc.stderr
    off, on = (proc.stdout.replace("held False", "held True").replace("False\n", "True\n") for proc in runs)
    assert off == on
    if program is ZLIB_CORRECT:
        assert "held True" in runs[1].stdout  # quarantine really lent shadows through the C-memory z_stream
    if program is SENDMSG_CORRECT:
        assert runs[1].stdout.rstrip().endswith("True")  # msg_iov[i].iov_base were shadowed


def test_numpy_program_unchanged_under_quarantine(buggy_so: Path) -> None:
    pytest.importorskip("numpy")
    program = textwrap.dedent("""
        import ctypes, sys, numpy as np, ptrbridge
        crt = ctypes.CDLL(None)
        crt.memcpy.argtypes = [ctypes.POINTER(ctypes.c_double), ctypes.POINTER(ctypes.c_double), ctypes.c_size_t]
        crt.memcpy.restype = ctypes.c_void_p
        libc = ptrbridge.wrap(crt)
        ptrbridge.set_check_level(2)
        ptrbridge.set_quarantine(sys.argv[1] == "1")
        src, dst = np.arange(1000.0), np.zeros(1000)
        P = ctypes.POINTER(ctypes.c_double)
        for _ in range(20):
            libc.memcpy(dst.ctypes.data_as(P), src.ctypes.data_as(P), src.nbytes)
            src += 1
        print(dst.sum(), ptrbridge.quarantine.held() > 0)
    """)
    runs = [subprocess.run([sys.executable, "-c", program, flag], capture_output=True, text=True, timeout=120)
            for flag in ("0", "1")]
    for proc in runs:
        assert proc.returncode == 0, proc.stderr
    assert runs[0].stdout.split()[0] == runs[1].stdout.split()[0] == str(sum(range(1000)) + 19000.0)
    assert runs[1].stdout.split()[1] == "True"  # the numpy pointers were shadowed, written back


# ---------------------------------------------------------------------------
# Kept reads: C reading a live, immutable original after the call is correct
# on CPython (a portability finding, the program goes on); after the original
# is freed it is an error.

KEPT_ALIVE = """
    from ptrbridge import report
    from ptrbridge._bindings import lib as native
    native.pb__quarantine_force_mprotect({mprotect})
    data = fresh(b"kept, and alive")
    k.keep_global(data)
    reads = [k.keeper_read() for _ in range(3)]  # the first faults and is adopted, the rest just read
    kept = [f for f in report.gather() if f.extra.get("kept_read")]
    print("reads", reads, "expected", data[0], flush=True)
    print("kept", len(kept), kept[0].severity, kept[0].rule, kept[0].object, kept[0].function, kept[0].lent_at,
          flush=True)
    print(kept[0].message, flush=True)
    del data  # freed: the shadow is closed again, and the read at the end is a use after free
"""


@pytest.mark.parametrize("mprotect", [0, 1], ids=["guard-region", "mprotect"])
def test_kept_read_of_a_live_bytes_goes_on_then_a_read_after_its_free_dies(keeper_so: Path, mprotect: int) -> None:
    proc = _run(keeper_so, KEPT_ALIVE.format(mprotect=mprotect))
    out = proc.stdout
    assert "reads [107, 107, 107] expected 107" in out, out + proc.stderr
    assert "kept 1 portability R2 bytes(15) keep_global <string>:" in out
    assert "the original is alive and immutable, so the read went on" in out
    assert "is offset 0 into it" in out
    assert "#0 <string>:" in out  # the lending call's Python stack
    assert re.search(r"^SUMMARY: ptrbridge: kept-read \(READ\) in .* on bytes\(15\) lent to keep_global\(\) at "
                     r"<string>:\d+$", out, re.M)
    # after `del data`: an error, and the process dies of it
    assert proc.returncode == -signal.SIGSEGV, out + proc.stderr
    assert REPORT in proc.stderr
    assert "and the object has been freed since" in proc.stderr
    assert "\nread " not in out


KEPT_ALIVE_MUTABLE = """
    from ptrbridge import report
    from ptrbridge._bindings import lib as native
    native.pb__quarantine_force_mprotect({mprotect})
    data = bytearray(b"kept, and alive")
    k.keep_global(kffi.from_buffer(data))
    first = k.keeper_read()       # faults on the closed shadow: adopted, a kept read
    data[0] = ord("Z")            # the program changes its buffer ...
    second = k.keeper_read()      # ... and C sees it: a checked call refreshes the adopted shadow
    kept = [f for f in report.gather() if f.extra.get("kept_read")]
    print("reads", first, second, flush=True)
    print("kept", len(kept), kept[0].severity, kept[0].object, kept[0].function, flush=True)
    print(kept[0].message, flush=True)
    del data  # freed: the shadow is closed again, and the read at the end is a use after free
"""


@pytest.mark.parametrize("mprotect", [0, 1], ids=["guard-region", "mprotect"])
def test_kept_read_of_a_live_bytearray_sees_its_changes_then_a_read_after_its_free_dies(
        keeper_so: Path, mprotect: int) -> None:
    # cairocffi's cairo_surface_set_mime_data, reduced: C keeps a mutable buffer the program
    # keeps alive, and reads it later.  Correct on CPython (a portability finding), and C reads
    # what the object holds, changes included; after the free it is an error.
    proc = _run(keeper_so, KEPT_ALIVE_MUTABLE.format(mprotect=mprotect))
    out = proc.stdout
    assert f"reads {ord('k')} {ord('Z')}" in out, out + proc.stderr
    assert "kept 1 portability bytearray(15) keep_global" in out
    assert "portability: the object is alive, so the read went on" in out
    assert proc.returncode == -signal.SIGSEGV, out + proc.stderr
    assert "and the object has been freed since" in proc.stderr
    assert "\nread " not in out


def test_a_write_through_a_kept_pointer_to_a_live_bytearray_is_an_error(buggy_so: Path) -> None:
    # C's writes would land in the shadow, which the object never sees: the run stops there.
    proc = _buggy(buggy_so, """
        data = bytearray(b"kept and written")
        b.keep(ffi.from_buffer(data))
        b.use_kept()          # a read: adopted (read-only)
        b.write_kept()        # a write: an error
    """)
    assert proc.returncode == -signal.SIGSEGV, proc.stdout + proc.stderr
    assert "then wrote through it" in proc.stderr
    assert "SUMMARY: ptrbridge: use-after-release (WRITE)" in proc.stderr


ZSTD_BY_REFERENCE = r'''
import cffi, hashlib, os, sys
ffi = cffi.FFI()
ffi.cdef("""
    typedef struct ZSTD_CCtx_s ZSTD_CCtx; typedef struct ZSTD_DCtx_s ZSTD_DCtx; typedef struct ZSTD_DDict_s ZSTD_DDict;
    ZSTD_CCtx *ZSTD_createCCtx(void); size_t ZSTD_freeCCtx(ZSTD_CCtx *);
    ZSTD_DCtx *ZSTD_createDCtx(void); size_t ZSTD_freeDCtx(ZSTD_DCtx *);
    size_t ZSTD_compress_usingDict(ZSTD_CCtx *, void *dst, size_t cap, const void *src, size_t n,
                                   const void *dict, size_t dictSize, int level);
    ZSTD_DDict *ZSTD_createDDict_byReference(const void *dict, size_t dictSize);
    size_t ZSTD_freeDDict(ZSTD_DDict *);
    size_t ZSTD_decompress_usingDDict(ZSTD_DCtx *, void *dst, size_t cap, const void *src, size_t n,
                                      const ZSTD_DDict *);
    unsigned ZSTD_isError(size_t);
""")
z = ffi.dlopen("libzstd.so.1")
if sys.argv[1] != "plain":
    import ptrbridge
    z = ptrbridge.wrap(z)
    ptrbridge.set_check_level(2)
    ptrbridge.set_quarantine(True)
    ptrbridge.set_on_violation("collect")
dictionary = b"".join(b"record %d: the quick brown fox jumps over the lazy dog; " % i for i in range(300))
copy = bytes(bytearray(dictionary))
cctx, dctx = z.ZSTD_createCCtx(), z.ZSTD_createDCtx()
ddict = z.ZSTD_createDDict_byReference(dictionary, len(dictionary))  # zstd keeps the pointer: by reference
out = []
for i in range(20):
    if i == 10 and sys.argv[1] == "drop":
        del dictionary  # a real bug: zstd goes on reading it
    msg = b"record %d: the quick brown fox jumps over the lazy dog; again and again" % (i * 7)
    comp = ffi.new("char[]", 4096)
    n = z.ZSTD_compress_usingDict(cctx, comp, 4096, msg, len(msg), copy, len(copy), 3)
    back = ffi.new("char[]", 4096)
    m = z.ZSTD_decompress_usingDDict(dctx, back, 4096, comp, n, ddict)  # reads the kept dictionary
    assert not z.ZSTD_isError(m), m
    out.append(ffi.buffer(back, m)[:])
    assert out[-1] == msg
z.ZSTD_freeDDict(ddict)
print(len(out), hashlib.sha256(b"".join(out)).hexdigest(), flush=True)
if sys.argv[1] != "plain":
    from ptrbridge import report
    print("findings", sorted({(f.kind, f.severity, f.object) for f in report.gather()}))
'''


def test_zstd_dictionary_by_reference_runs_unchanged_under_quarantine() -> None:
    """python-zstandard's case: ZSTD_createDDict_byReference on a live bytes, read by later calls."""
    plain, checked = (subprocess.run([sys.executable, "-c", ZSTD_BY_REFERENCE, mode], capture_output=True,
                                     text=True, timeout=120) for mode in ("plain", "quarantine"))
    assert plain.returncode == 0 and checked.returncode == 0, plain.stderr + checked.stderr
    assert checked.stdout.splitlines()[0] == plain.stdout.splitlines()[0]
    assert "('use-after-release', 'portability', 'bytes(16990)')" in checked.stdout
    assert "'error'" not in checked.stdout
    assert "SUMMARY" not in checked.stderr  # nothing fatal was reported


def test_zstd_dictionary_freed_while_zstd_reads_it_dies() -> None:
    proc = subprocess.run([sys.executable, "-c", ZSTD_BY_REFERENCE, "drop"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGSEGV, proc.stdout + proc.stderr
    assert REPORT in proc.stderr
    assert "bytes(16990) lent to ZSTD_createDDict_byReference()" in proc.stderr
    assert "and the object has been freed since" in proc.stderr
    # the innermost frame is whatever copies for zstd (libc's memcpy, or ASan's under .ci/sanitize)
    assert re.search(r"^SUMMARY: ptrbridge: use-after-release \(READ\) in \S.* on bytes\(16990\) lent to "
                     r"ZSTD_createDDict_byReference\(\) at <string>:\d+$", proc.stderr, re.M)


def test_mprotect_fallback_still_catches_and_reuses_slots(keeper_so: Path) -> None:
    body = """
        from ptrbridge._bindings import lib as native
        native.pb__quarantine_force_mprotect(1)
        for i in range(100):
            k.keep_copy(b"x" * (i % 40 + 1), i % 40 + 1)  # slots closed with mprotect, reopened the same way
        native.pb__quarantine_force_mprotect(0)
        for i in range(40):
            k.keep_copy(b"y" * 5, 5)  # the guard-region slots and the mprotect ones mix in the FIFO
        native.pb__quarantine_force_mprotect(1)
        k.keep_global(fresh(b"caught anyway"))
    """
    proc = _run(keeper_so, body)
    assert proc.returncode == -signal.SIGSEGV, proc.stdout + proc.stderr
    assert "bytes(13) lent to keep_global()" in proc.stderr


def test_report_log_becomes_findings(buggy_so: Path, tmp_path: Path) -> None:
    log = tmp_path / "quarantine.log"
    env = dict(os.environ, PTRBRIDGE_QUARANTINE_LOG=str(log))
    proc = _buggy(buggy_so, """
        b.keep(ffi.from_buffer(bytearray(b"kept past the call")))
        b.use_kept()
    """, env=env)
    assert proc.returncode == -signal.SIGSEGV, proc.stdout + proc.stderr
    text = log.read_text()
    assert text.strip() and text.strip() in proc.stderr  # the same report, in the file too
    found = quarantine.findings_from_report(text)
    assert len(found) == 1
    finding = found[0]
    assert (finding.kind, finding.severity, finding.object, finding.object_size, finding.function) == (
        "use-after-release", "error", "bytearray(18)", 18, "keep")
    assert finding.lent_at is not None and finding.lent_at.startswith("<string>:")
    assert finding.extra == {"access": "READ"} and "use_kept" in (finding.holder or "")
    assert quarantine.findings_from_report("no report here") == []
