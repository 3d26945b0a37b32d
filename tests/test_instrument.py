"""ptrbridge.instrument(): every C call checked with no change to the program, findings recorded.

Each interception point has a buggy call (reported: the object, the call with
file:line, the reason) and its correct twin (clean).  Freed Python memory at
the call is seen through the level-2 heap map, which knows bytes / bytearray /
ctypes buffers today; ``ffi.new`` memory joins it once cffi's malloc is
interposed (helper "cheap").
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path
from typing import Any, Iterator, List, Tuple

import cffi
import pytest

import ptrbridge
from ptrbridge import NestedPointerError, UseAfterFreeError, calls, findings, ownership
from ptrbridge._bindings import native
from conftest import CHECKED_CDEF, at_level_1, python_frames_of
from sanitizers import runtime_env

SRC = Path(ptrbridge.__file__).resolve().parent.parent


def _line() -> int:
    return sys._getframe(1).f_lineno


@pytest.fixture
def level2() -> Iterator[None]:
    with ptrbridge.checking(2):
        yield


def _abi(checked_so: Path) -> Tuple[Any, Any]:
    ffi = cffi.FFI()
    ffi.cdef(CHECKED_CDEF)
    return ffi, ffi.dlopen(str(checked_so))


def _only(kind: str) -> List[findings.Finding]:
    return [f for f in findings.take() if f.kind == kind]


# --- switching on and off -----------------------------------------------------------

def test_instrument_is_idempotent_thread_safe_and_reversible() -> None:
    import threading

    was_on = ptrbridge.uninstrument()  # on when the plugin instruments the run (PTRBRIDGE_CHECK=2)
    originals = (cffi.FFI.dlopen, cffi.FFI.callback, cffi.FFI.cast, cffi.FFI.typeof, cffi.FFI.new_handle,
                 cffi.FFI.from_handle, ctypes.CDLL.__init__, ctypes.CFUNCTYPE)
    assert not ptrbridge.instrumented()
    results: List[bool] = []
    threads = [threading.Thread(target=lambda: results.append(ptrbridge.instrument())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False, False, False, True] and ptrbridge.instrumented()
    now = (cffi.FFI.dlopen, cffi.FFI.callback, cffi.FFI.cast, cffi.FFI.typeof, cffi.FFI.new_handle,
           cffi.FFI.from_handle, ctypes.CDLL.__init__, ctypes.CFUNCTYPE)
    assert all(a is not b for a, b in zip(now, originals))
    assert ptrbridge.uninstrument() is True and ptrbridge.uninstrument() is False
    assert (cffi.FFI.dlopen, cffi.FFI.callback, cffi.FFI.cast, cffi.FFI.typeof, cffi.FFI.new_handle,
            cffi.FFI.from_handle, ctypes.CDLL.__init__, ctypes.CFUNCTYPE) == originals
    assert not ptrbridge.instrumented()
    if was_on:
        ptrbridge.instrument()


# --- cffi ABI mode ------------------------------------------------------------------

@pytest.mark.parametrize("level", [0, 1, 2])
def test_abi_library_behaves_like_the_raw_one(instrumented: None, checked_so: Path, level: int) -> None:
    ffi, lib = _abi(checked_so)
    with ptrbridge.checking(level):
        assert isinstance(lib, calls.CheckedLibrary) and repr(lib).startswith("<cffi")
        assert lib.add(2, 3) == 5
        assert lib.text_len(b"four") == 4
        with pytest.raises(TypeError):
            lib.add("x", 1)  # same exception as raw cffi
        assert "add" in dir(lib)
        assert lib.null_pointer() == ffi.NULL
        with ptrbridge.callback(ffi, "int(int)", lambda i: i + 1) as cb:
            assert lib.call_each(cb.cdata, 3) == 6
        # A checked function handed to C where it takes a function pointer is the C function.
        assert isinstance(ptrbridge.unwrap(lib).add, ffi.CData)


def test_abi_dangling_struct_field_is_reported_and_twin_is_clean(instrumented: None, level2: None,
                                                                 checked_so: Path) -> None:
    ffi, lib = _abi(checked_so)
    before = findings.counters()["calls"]
    p = ffi.new("struct person *")
    name = bytearray(b"Ada Lovelace\0")
    p.name = ffi.from_buffer(name)
    assert lib.person_name_len(p) == 12  # correct twin: the buffer is alive
    assert findings.take() == []
    temp = bytearray(b"Grace Hopper\0")
    p.name = ffi.from_buffer(temp)  # the struct field is all that points to it
    del temp
    line = _line() + 1
    lib.person_name_len(p)  # C reads freed memory (held back by the heap map, so no crash)
    found = _only("dangling-argument")
    assert len(found) == 1, found
    f = found[0]
    assert f.severity == "error" and f.rule == "use-after-free" and f.function == "person_name_len"
    assert f.lent_at == f"test_instrument.py:{line}" and f.object is not None and "Python memory block" in f.object
    assert ".name -> " in f.message and "freed Python memory" in f.message and "dangling" in f.message
    assert findings.counters()["calls"] >= before + 2


def test_checked_call_does_not_keep_the_objects_it_saw_alive(instrumented: None, level2: None,
                                                             checked_so: Path) -> None:
    # The check looks at the caller's locals; it must not leave a reference cycle behind that
    # keeps them alive until the next garbage collection (the program would behave differently,
    # and a pointer to an object it dropped would not dangle).
    import weakref

    class Buffer(bytearray):  # bytearray itself takes no weak reference
        pass

    ffi, lib = _abi(checked_so)
    p = ffi.new("struct person *")
    name = Buffer(b"Ada\0")
    p.name = ffi.from_buffer(name)
    gone = weakref.ref(name)
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        lent_line = _line() + 1
        assert lib.person_name_len(p) == 3
        del name
        assert gone() is None, "the instrumented call kept the bytearray alive"
        line = _line() + 1
        lib.person_name_len(p)  # the struct field now dangles: found, and named by the earlier call
    finally:
        if was_enabled:
            gc.enable()
    (f,) = _only("dangling-argument")
    assert f.lent_at == f"test_instrument.py:{line}"
    assert f"Buffer(4) (lent to person_name_len() at test_instrument.py:{lent_line}" in f.message, f.message


def test_in_out_idiom_and_live_structs_are_clean_portable_in_strict_mode(
        instrumented: None, checked_so: Path) -> None:
    ffi, lib = _abi(checked_so)
    buf = ffi.new("char[]", b"hello")
    names = ffi.new("const char **", buf)  # the standard cffi in/out idiom, buf a live local
    iov_data = [bytearray(b"ab"), bytearray(b"cd")]
    iov = ffi.new("struct pb_iov[2]")
    keep = [ffi.from_buffer(d) for d in iov_data]  # kept alive for the call
    for i, k in enumerate(keep):
        iov[i].base = k
        iov[i].len = 2
    for level in (1, 2):
        with ptrbridge.checking(level):
            assert lib.names_total(names, 1) == 5
            assert lib.iov_sum(iov, 2) == sum(b"abcd")
    assert findings.take() == []  # clean by default
    findings.set_strict(True)
    line = _line() + 1
    assert lib.names_total(names, 1) == 5
    assert lib.iov_sum(iov, 2) == sum(b"abcd")
    found = findings.take()
    assert [f.kind for f in found] == ["nested-unpinned"] * 3  # *names, [0].base, [1].base
    assert all(f.severity == "portability" and f.rule == "R1" for f in found)
    assert found[0].lent_at == f"test_instrument.py:{line}" and "unpinned: alive now" in found[0].message
    # Explicit wrap keeps the strict rule: NestedPointerError.
    w = ptrbridge.wrap(ptrbridge.unwrap(lib))
    with pytest.raises(NestedPointerError, match=r"unpinned: alive now"):
        w.names_total(names, 1)
    with pytest.raises(NestedPointerError, match=r"\[0\]\.base -> bytearray\(2\)"):
        w.iov_sum(iov, 2)


def _freed_buffer_chain(ffi: Any) -> Tuple[Any, Any, List[Any]]:
    """A msghdr -> iovec[3] -> buffers chain whose middle buffer was freed."""
    parts = [bytearray(b"one"), bytearray(b"two"), bytearray(b"six")]
    iov = ffi.new("struct pb_iov[3]")
    for i, part in enumerate(parts):
        iov[i].base = ffi.from_buffer(part)
        iov[i].len = 3
    del parts[1], part  # the iovec is all that points to "two"
    msg = ffi.new("struct pb_msg *")
    msg.iov = iov
    msg.iovlen = 3
    return msg, iov, parts


@pytest.mark.parametrize("level", [1, 2])
def test_handles_and_void_pointer_views_as_arguments_and_caller_locals(instrumented: None, level: int) -> None:
    """pygit2 keeps ``ffi.new_handle(payload)`` in a local while it calls C with ``ffi.addressof``
    of a struct field: at level 2 the owner search asked the size a ``void *`` handle points to
    and the call raised ``ffi.error: don't know the size of ctype 'void'``; a handle or a
    ``from_buffer("void *", ...)`` view passed as an argument raised the same."""
    ffi = cffi.FFI()
    ffi.cdef("void *memchr(const void *s, int c, size_t n); void *memset(void *s, int c, size_t n);")
    libc = ffi.dlopen(None)
    payload = object()
    handle = ffi.new_handle(payload)
    opts = ffi.new("struct { void *payload; char field[8]; } *")
    opts.payload = handle
    data = bytearray(b"abcdef")
    view = ffi.from_buffer("void *", data)
    with ptrbridge.checking(level):
        assert libc.memchr(handle, 0, 0) == ffi.NULL
        assert libc.memset(ffi.addressof(opts[0], "field"), ord("x"), 8) == ffi.addressof(opts[0], "field")
        assert libc.memchr(view, ord("d"), len(data)) == ffi.cast("char *", view) + 3
        assert libc.memset(view, ord("z"), 2) == view
    assert ffi.string(opts.field, 8) == b"x" * 8 and data == bytearray(b"zzcdef")
    assert ffi.from_handle(opts.payload) is payload
    assert findings.take() == []
    assert ownership.cdata_extent(handle) is None and ownership.cdata_extent(view) is None
    with pytest.raises(ptrbridge.UnpinnableError):
        ptrbridge.Pinner().pin(handle)


def test_freed_iovec_base_and_msghdr_chain(instrumented: None, level2: None, checked_so: Path) -> None:
    ffi, lib = _abi(checked_so)
    msg, iov, parts = _freed_buffer_chain(ffi)
    gc.collect()
    lib.iov_sum(iov, 3)
    lib.msg_sum(msg)
    found = _only("dangling-argument")
    assert [f.extra["path"] for f in found] == ["[1].base", ".iov->[1].base"], found
    assert all(f.severity == "error" for f in found)
    # Explicit wrap refuses both calls with UseAfterFreeError naming the freed block and the call.
    w = ptrbridge.wrap(ptrbridge.unwrap(lib))
    with pytest.raises(UseAfterFreeError, match=r"argument 1 has pointer to freed Python memory: \[1\]\.base -> "
                                                r"Python memory block \(\d+ bytes, \w+ allocator\).* in call to "
                                                r"iov_sum\(\) at test_instrument\.py:\d+"):
        w.iov_sum(iov, 3)
    with pytest.raises(UseAfterFreeError, match=r"\.iov->\[1\]\.base -> Python memory block"):
        w.msg_sum(msg)
    # Not a NestedPointerError blaming the live iovec: the freed buffer is the bug.
    assert parts[0] == b"one"


@pytest.mark.parametrize("size", [10, 600, 3000], ids=["small", "over-pymalloc", "3000"])  # < a page: no fault
def test_explicit_wrap_names_a_freed_struct_field_at_level_2(level2: None, abi: Tuple[Any, Any], size: int) -> None:
    # Over pymalloc's 512 bytes the freed block is libc heap, but the heap map still holds it
    # back: nothing can have reused it, so the pointer certainly dangles.
    ffi, raw = abi
    w = ptrbridge.wrap(raw)
    p = ffi.new("struct person *")
    temp = bytearray(b"temporary".ljust(size - 1, b"-") + b"\0")
    p.name = ffi.from_buffer(temp)
    del temp
    with pytest.raises(UseAfterFreeError, match=r"\.name -> Python memory block .*person_name_len\(\)"):
        w.person_name_len(p)


ZLIB_CDEF = """typedef struct { unsigned char *next_in; unsigned avail_in; unsigned long total_in;
  unsigned char *next_out; unsigned avail_out; unsigned long total_out; char *msg; void *state;
  void *zalloc, *zfree, *opaque; int data_type; unsigned long adler, reserved; } z_stream;
const char *zlibVersion(void); int deflateInit_(z_stream *s, int level, const char *v, int size);
int deflate(z_stream *s, int flush); int deflateEnd(z_stream *s);"""


@pytest.mark.parametrize("consumed", [True, False], ids=["all-input-taken", "input-left"])
def test_zlib_next_in_left_at_the_end_of_a_freed_chunk_is_not_dangling(instrumented: None, level2: None,
                                                                       consumed: bool) -> None:
    # A correct streaming loop: each chunk is a temporary; once deflate() has taken all of it,
    # next_in points one past its end (avail_in 0), at none of its bytes.  Left pointing into
    # the chunk with input still to read, it is a use after free at the next call.
    zffi = cffi.FFI()
    zffi.cdef(ZLIB_CDEF)
    z = zffi.dlopen("libz.so.1")
    s = zffi.new("z_stream *")
    pins = ptrbridge.Pinner()
    pins.pin(s)  # zlib keeps a pointer back to its stream: pinned, as R2 asks
    assert z.deflateInit_(s, 6, z.zlibVersion(), zffi.sizeof("z_stream")) == 0
    out = zffi.new("unsigned char[]", 1 << 16)
    s.next_out, s.avail_out = out, 1 << 16

    def feed(text: str) -> None:
        data = (text * 20).encode()  # a temporary bytes of 400 bytes
        s.next_in, s.avail_in = zffi.from_buffer(data), len(data)
        assert z.deflate(s, 0) == 0 and s.avail_in == 0
        if not consumed:
            s.next_in, s.avail_in = zffi.from_buffer(data), 10  # BUG: 10 bytes of it left to read

    feed("0123456789abcdefghij")
    findings.take()
    if not consumed:
        s.avail_in = 0  # (what C would read is poison: keep the stream sane, the check is at the call)
    z.deflate(s, 4)
    z.deflateEnd(s)
    pins.unpin()
    dangling = _only("dangling-argument")
    if consumed:
        assert dangling == []
    else:
        assert [f.extra["path"] for f in dangling] == [".next_in", ".next_in"], dangling
        assert all(f.severity == "error" and "bytes(400) (lent to deflate()" in f.message for f in dangling)


# --- cffi API mode: the lib of compiled modules ---------------------------------------

API_CDEF = """
    #define ANSWER 42
    extern int counter_var;
    typedef ... opaque_state;
    opaque_state *opaque_new(int v);
    int opaque_get(const opaque_state *s);
    void opaque_free(opaque_state *s);
    int read_counter(void);
    struct person { const char *name; int age; };
    int person_name_len(const struct person *p);
    int apply(int (*fn)(int), int v);
    int twice(int v);
"""
API_SOURCE = """
    #include <stdlib.h>
    #include <string.h>
    #define ANSWER 42
    int counter_var;
    typedef struct { int v; } opaque_state;
    opaque_state *opaque_new(int v) { opaque_state *s = malloc(sizeof *s); if (s) s->v = v; return s; }
    int opaque_get(const opaque_state *s) { return s->v; }
    void opaque_free(opaque_state *s) { free(s); }
    int read_counter(void) { return counter_var; }
    struct person { const char *name; int age; };
    int person_name_len(const struct person *p) { return (int)strlen(p->name); }
    int apply(int (*fn)(int), int v) { return fn(v); }
    int twice(int v) { return 2 * v; }
"""


@pytest.fixture(scope="module")
def api_dir(clib_dir: Path) -> Path:
    """Compiles the module without importing it here (the subprocess imports it instrumented)."""
    builder = cffi.FFI()
    builder.cdef(API_CDEF)
    builder.set_source("_instr_api", API_SOURCE)
    out = clib_dir / "instr_api"
    out.mkdir(exist_ok=True)
    builder.compile(tmpdir=str(out))
    return out


def _run(script: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    # A minimal environment (nothing of this run's PTRBRIDGE_* settings), but the sanitizer
    # runtime's preload and options when there is one: without the preload an instrumented
    # _native cannot load.
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300,
                          env={"PYTHONPATH": f"{cwd}:{SRC}", "PATH": "/usr/bin:/bin", **runtime_env()})


def test_api_module_imported_after_instrument(api_dir: Path) -> None:
    done = _run(script := """
        import gc, json, sys
        import ptrbridge
        from ptrbridge import findings
        ptrbridge.instrument()
        ptrbridge.set_check_level(2)
        from _instr_api import ffi, lib
        import _instr_api
        out = {"type": type(lib).__name__, "same": _instr_api.lib is lib, "answer": lib.ANSWER,
               "dir": "opaque_new" in dir(lib)}
        lib.counter_var = 7
        out["var"] = [lib.counter_var, lib.read_counter()]
        s = ffi.gc(lib.opaque_new(5), lib.opaque_free)   # the destructor is a checked function
        out["opaque"] = lib.opaque_get(s)
        del s; gc.collect()
        out["apply"] = lib.apply(lib.twice, 21)           # lib.f where C takes a function pointer
        p = ffi.new("struct person *")
        name = bytearray(b"Ada\\0")
        p.name = ffi.from_buffer(name)
        out["good"] = lib.person_name_len(p)
        out["clean"] = [f.kind for f in findings.take()]
        temp = bytearray(b"Grace\\0")
        p.name = ffi.from_buffer(temp)
        del temp
        lib.person_name_len(p)   # LINE-BUG
        out["bug"] = [(f.kind, f.severity, f.function, f.lent_at) for f in findings.take()]
        out["calls"] = findings.counters()["calls"]
        print(json.dumps(out))
    """, api_dir)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    bug_line = next(i for i, text in enumerate(textwrap.dedent(script).splitlines(), 1) if "LINE-BUG" in text)
    assert out["type"] == "CheckedLibrary" and out["same"] and out["answer"] == 42 and out["dir"]
    assert out["var"] == [7, 7] and out["opaque"] == 5 and out["apply"] == 42 and out["good"] == 3
    assert out["clean"] == []
    assert out["bug"] == [["dangling-argument", "error", "person_name_len", f"<string>:{bug_line}"]]
    assert out["calls"] >= 3


def test_api_module_imported_before_instrument(api_dir: Path) -> None:
    done = _run("""
        import json, sys
        import ptrbridge
        from _instr_api import ffi, lib as early
        import _instr_api
        raw = _instr_api.lib
        ptrbridge.instrument()
        out = [type(_instr_api.lib).__name__, type(early).__name__, early.twice(4)]
        ptrbridge.uninstrument()
        out += [_instr_api.lib is raw, early is raw]
        print(json.dumps(out))
    """, api_dir)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == ["CheckedLibrary", "CheckedLibrary", 8, True, True]


def test_wrapping_an_instrumented_lib_wraps_the_library(instrumented: None, checked_so: Path) -> None:
    ffi, lib = _abi(checked_so)
    w = ptrbridge.wrap(lib)  # a program that wraps by hand still works under `ptrbridge run`
    assert ptrbridge.unwrap(w) is ptrbridge.unwrap(lib)
    keep = ffi.new("char[]", b"x")
    names = ffi.new("const char **", keep)
    with pytest.raises(NestedPointerError):
        w.names_total(names, 1)


# --- ctypes -------------------------------------------------------------------------

@pytest.mark.parametrize("level", [0, 1, 2])
def test_ctypes_functions_stay_ctypes_functions(instrumented: None, checked_so: Path, level: int) -> None:
    with ptrbridge.checking(level):
        lib = ctypes.CDLL(str(checked_so))
        f = lib.text_len
        assert isinstance(f, calls._CFuncPtr)  # a real ctypes function pointer
        assert f(b"abc") == 3
        libc = ctypes.CDLL(None)
        libc.labs.argtypes = [ctypes.c_long]
        libc.labs.restype = ctypes.c_long
        assert libc.labs(-(2 ** 40)) == 2 ** 40
        libc.labs.errcheck = lambda result, func, args: result + 1
        assert libc.labs(-1) == 2
        with pytest.raises(ctypes.ArgumentError):
            libc.labs("x")  # the same exception as raw ctypes
        assert ctypes.cast(lib.add, ctypes.c_void_p).value


@contextlib.contextmanager
def freed_history(entries: List[Any]) -> Iterator[None]:
    """Run with ``entries`` as the freed-memory history (its presence is what the fast path reads)."""
    saved = list(ownership._freed)
    ownership._freed.clear()
    ownership._freed.extend(entries)
    try:
        yield
    finally:
        ownership._freed.clear()
        ownership._freed.extend(saved)


def _instrument_frames(run: Any) -> List[str]:
    """The names of ptrbridge.instrument's Python functions that ran during ``run()``.

    Not its garbage collector callback (``_on_gc``): a collection may run anywhere.
    """
    return python_frames_of(sys.modules["ptrbridge.instrument"].__file__, run, ignore=("_on_gc",))


@at_level_1
def test_ctypes_level_1_common_calls_run_no_python_frame(instrumented: None, checked_so: Path) -> None:
    lib = ctypes.CDLL(str(checked_so))
    call = type(lib.text_len).__dict__["__call__"]
    assert isinstance(call, native.CheckedMethod)  # a method: slot_tp_call runs no Python frame
    lib.text_len.argtypes = [ctypes.c_char_p]
    lib.add.argtypes = [ctypes.c_int, ctypes.c_int]
    lib.add.errcheck = lambda result, func, args: result * 10  # ctypes' own errcheck still applies
    before = findings.counters()["calls"]
    with freed_history([]):  # an int is an address to check only while freed memory is on record
        assert _instrument_frames(lambda: [(lib.text_len(b"abc"), lib.text_len(None), lib.add(2, 3))
                                           for _ in range(10)]) == []
        assert (lib.text_len(b"abc"), lib.text_len(None), lib.add(2, 3)) == (3, 0, 50)  # slen(NULL) is 0
    with freed_history([object()]):
        assert "_ctypes_call" in _instrument_frames(lambda: lib.add(2, 3))
        assert _instrument_frames(lambda: lib.add(-2, 0)) == []  # not an address
    assert findings.counters()["calls"] - before == 35  # counted exactly
    struct = ctypes.create_string_buffer(8)
    with freed_history([object()]):
        assert "_ctypes_call" in _instrument_frames(lambda: lib.text_len(struct))  # the rest: the Python path
    with ptrbridge.checking(2):
        assert "_ctypes_call" in _instrument_frames(lambda: lib.text_len(b"abc"))
    assert findings.counters()["calls"] - before == 37
    with ptrbridge.checking(0):
        assert _instrument_frames(lambda: lib.text_len(b"abc")) == []
    assert findings.counters()["calls"] - before == 37
    for bad in (3.5, object()):  # the same exception as the uninstrumented function
        with pytest.raises(ctypes.ArgumentError) as checked_error:
            lib.text_len(bad)
        raw = calls._CFuncPtr.__call__
        with pytest.raises(ctypes.ArgumentError) as raw_error:
            raw(lib.text_len, bad)
        assert str(checked_error.value) == str(raw_error.value)
    with pytest.raises(TypeError):
        call(object(), b"abc")  # not a function pointer: the Python path raises


@at_level_1
def test_calls_whose_walk_could_find_nothing_run_no_python_frame(
        instrumented: None, checked_so: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # At level 1 an instrumented call's walk can only find pointers into freed ptrbridge memory
    # or, in strict mode, live unpinned ones: with neither possible, C takes any arguments.
    ffi, lib = _abi(checked_so)
    buf = ffi.new("char[]", b"hello")
    names = ffi.new("const char **", buf)  # a pointer to a live local: a strict-mode finding
    clib = ctypes.CDLL(str(checked_so))
    clib.names_total.argtypes = [ctypes.c_void_p, ctypes.c_int]
    cnames = (ctypes.c_char_p * 1)(b"abc")

    def cffi_frames() -> List[str]:
        return python_frames_of(calls.__file__, lambda buf=buf: lib.names_total(names, 1))

    def ctypes_frames() -> List[str]:
        return _instrument_frames(lambda: clib.names_total(cnames, 1))

    findings.set_strict(None)  # follow PTRBRIDGE_STRICT, which C reads as findings.strict() does
    monkeypatch.delenv("PTRBRIDGE_STRICT", raising=False)
    before = findings.counters()["calls"]
    with freed_history([]):
        assert lib.names_total(names, 1) == 5 and clib.names_total(cnames, 1) == 3
        assert cffi_frames() == [] and ctypes_frames() == []
        monkeypatch.setenv("PTRBRIDGE_STRICT", "1")  # seen at the next call
        assert "checked" in cffi_frames() and "_ctypes_call" in ctypes_frames()
        assert [f.kind for f in findings.take()] == ["nested-unpinned"] * 2  # *names -> buf, cnames[0]
        monkeypatch.setenv("PTRBRIDGE_STRICT", "0")
        assert cffi_frames() == [] and ctypes_frames() == []
        findings.set_strict(True)  # and set_strict, which findings._strict holds
        assert "checked" in cffi_frames() and "_ctypes_call" in ctypes_frames()
        assert len(findings.take()) == 2
        findings.set_strict(False)
        assert cffi_frames() == [] and ctypes_frames() == []
    with freed_history([object()]):  # freed memory on record: walks again
        assert "checked" in cffi_frames() and "_ctypes_call" in ctypes_frames()
    assert findings.counters()["calls"] - before == 14  # counted exactly, either way
    assert findings.take() == []


@at_level_1
def test_ctypes_sampling_draws_on_the_fast_path(instrumented: None, checked_so: Path) -> None:
    address_seen = ctypes.CDLL(str(checked_so)).address_seen
    address_seen.argtypes = [ctypes.c_char_p]
    address_seen.restype = ctypes.c_ulonglong  # a number: what C saw, not translated back
    data = b"sampled bytes"
    home = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value

    def shadowed() -> bool:
        return address_seen(data) != home

    old = ptrbridge.quarantine_enabled()
    try:
        assert not shadowed()
        ptrbridge.set_quarantine(True, sample=1)  # level 1, every call drawn: every call shadowed
        assert all(shadowed() for _ in range(20))
        ptrbridge.set_quarantine(True, sample=3)
        assert 100 <= sum(shadowed() for _ in range(600)) <= 400
    finally:
        ptrbridge.set_quarantine(old)
    assert not shadowed()


def test_ctypes_dangling_address_is_reported_and_twin_is_clean(instrumented: None, level2: None,
                                                               checked_so: Path) -> None:
    lib = ctypes.CDLL(str(checked_so))
    lib.text_len.argtypes = [ctypes.c_void_p]
    live = ctypes.create_string_buffer(b"alive", 40)
    assert lib.text_len(ctypes.addressof(live)) == 5
    assert findings.take() == []
    temp = ctypes.create_string_buffer(b"gone", 40)
    address = ctypes.addressof(temp)
    del temp
    line = _line() + 1
    lib.text_len(address)
    found = _only("dangling-argument")
    assert len(found) == 1 and found[0].lent_at == f"test_instrument.py:{line}" and found[0].function == "text_len"
    assert "argument 1 is a pointer into freed Python memory" in found[0].message


def test_cfunctype_pointer_from_an_address_is_checked(instrumented: None, level2: None, checked_so: Path) -> None:
    lib = ctypes.CDLL(str(checked_so))
    proto = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)
    text_len = proto(ctypes.cast(lib.text_len, ctypes.c_void_p).value)
    live = ctypes.create_string_buffer(b"alive", 40)
    assert text_len(ctypes.addressof(live)) == 5 and findings.take() == []
    temp = ctypes.create_string_buffer(b"gone", 40)
    address = ctypes.addressof(temp)
    del temp
    text_len(address)
    assert len(_only("dangling-argument")) == 1


# --- callbacks ----------------------------------------------------------------------

_KEPT: List[Any] = []


def test_cffi_callback_result_that_dies_on_return(instrumented: None, checked_so: Path) -> None:
    ffi, lib = _abi(checked_so)
    raw = ptrbridge.unwrap(lib)

    def temporary(i: int) -> Any:
        return ffi.new("char[]", b"temporary")  # freed as soon as the callback returns

    def kept(i: int) -> Any:
        return _KEPT[0]

    _KEPT[:] = [ffi.new("char[]", b"kept!")]
    good = ffi.callback("const char *(int)", kept)
    assert raw.call_get_len(good, 1) == 5
    assert findings.take() == []  # alive after the return: clean (portability only in strict mode)
    bad = ffi.callback("const char *(int)", temporary)
    raw.call_get_len(bad, 1)
    found = _only("callback-result")
    assert len(found) == 1 and found[0].severity == "error" and "dies on return" in found[0].message
    assert "temporary" in found[0].message and "test_instrument.py:" in found[0].message
    findings.set_strict(True)
    raw.call_get_len(good, 1)
    assert [f.severity for f in _only("callback-result")] == ["portability"]
    assert findings.counters()["callbacks"] >= 3
    _KEPT.clear()


def test_exception_in_a_callback_goes_where_it_went(instrumented: None, checked_so: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    ffi, lib = _abi(checked_so)
    seen: List[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u))

    def boom(i: int) -> int:
        raise KeyError("in callback")

    with ptrbridge.callback(ffi, "int(int)", boom, error=-9) as cb:
        assert lib.call_each(cb.cdata, 2) == -9  # not re-raised: the raw call does not either
    assert seen and isinstance(seen[0].exc_value, KeyError)


def test_what_a_dropped_callback_references_dies_at_the_next_full_collection(
        instrumented: None, checked_so: Path) -> None:
    # cairocffi's test_target_lifetime, reduced: a write callback closes over a file object;
    # once the program drops the callback and collects, the file object's refcount is back
    # to what it was, as without ptrbridge (the trampoline is kept, the function is not).
    ffi, _lib = _abi(checked_so)

    class Target:
        pass

    for make in ("cffi", "ctypes"):
        target = Target()
        before = sys.getrefcount(target)
        gone = weakref.ref(target)

        def write(i: int, target: Any = target) -> int:
            return i

        cb = (ffi.callback("int(int)", write) if make == "cffi"
              else ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)(write))
        assert sys.getrefcount(target) == before + 1, make  # the function's default
        del cb, write
        gc.collect()
        assert sys.getrefcount(target) == before, make
        del target
        assert gone() is None, make


COLLECTED = """
    import ctypes, gc, json, sys
    import cffi, ptrbridge
    from ptrbridge import findings
    sys.path.insert(0, {tests!r})
    from conftest import CHECKED_CDEF
    ptrbridge.instrument()
    ffi = cffi.FFI()
    ffi.cdef(CHECKED_CDEF)
    lib = ffi.dlopen({so!r})

    def on_event(i):
        return i * 3

    cb = ffi.callback("int(int)", on_event)        # LINE-CFFI
    lib.keep_callback(cb)
    first = lib.call_kept(2)
    del cb, on_event
    gc.collect()
    late = lib.call_kept_on_thread(5)             # C calls it after the program dropped it

    proto = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)
    clib = ctypes.CDLL({so!r})
    clib.keep_callback.argtypes = [proto]
    ccb = proto(lambda i: i + 100)                 # LINE-CTYPES
    clib.keep_callback(ccb)
    cfirst = clib.call_kept(1)
    del ccb
    gc.collect()
    clate = clib.call_kept_on_thread(1)
    found = [(f.kind, f.severity, f.created_at, f.message) for f in findings.take() if f.kind == "collected-callback"]
    print(json.dumps([first, late, cfirst, clate, found]))
"""


def test_collected_callback_called_from_a_c_thread_is_reported_not_a_crash(checked_so: Path, tmp_path: Path) -> None:
    script = COLLECTED.format(tests=str(Path(__file__).parent), so=str(checked_so))
    done = _run(script, tmp_path)
    assert done.returncode == 0, done.stderr
    first, late, cfirst, clate, found = json.loads(done.stdout.strip().splitlines()[-1])
    assert (first, cfirst) == (6, 101)
    assert (late, clate) == (0, 0)  # the callback's error value, not a jump into freed memory
    assert [(k, s) for k, s, _, _ in found] == [("collected-callback", "error")] * 2
    lines = textwrap.dedent(script).splitlines()
    cffi_line = next(i for i, text in enumerate(lines, 1) if "LINE-CFFI" in text)
    ctypes_line = next(i for i, text in enumerate(lines, 1) if "LINE-CTYPES" in text)
    assert found[0][2] == f"<string>:{cffi_line}" and "callback on_event created at" in found[0][3]
    assert found[1][2] == f"<string>:{ctypes_line}" and "was collected" in found[1][3]


def _pointer_arguments(ffi: Any, lib: Any) -> List[Tuple[str, Any]]:
    """Every kind of object a program may pass for a pointer parameter, right or wrong."""
    other = cffi.FFI()
    malloc_ffi = cffi.FFI()
    malloc_ffi.cdef("void *malloc(size_t); void free(void *);")
    libc = malloc_ffi.dlopen(None)
    allocate = ffi.new_allocator(libc.malloc, libc.free)
    released = ffi.from_buffer(bytearray(4))
    ffi.release(released)
    person = ffi.new("struct person *")
    return [
        ("NULL", ffi.NULL), ("None", None), ("bytes", b"abc"), ("bytearray", bytearray(b"abc")),
        ("str", "abc"), ("int", 3), ("zero", 0), ("float", 1.5), ("list", [1, 2]), ("object", object()),
        ("tuple", (1, 2)), ("list of bytes", [b"a"]), ("bool bytes", b"\x01\x00"),
        ("ffi.new char[]", ffi.new("char[]", b"ab")), ("ffi.new int *", ffi.new("int *", 7)),
        ("ffi.new int[3]", ffi.new("int[3]")), ("struct pointer", person), ("struct value", person[0]),
        ("from_buffer", ffi.from_buffer(bytearray(b"xy"))), ("released from_buffer", released),
        ("new_handle", ffi.new_handle(object())), ("gc cast", ffi.gc(ffi.cast("void *", 1), lambda p: None)),
        ("cast", ffi.cast("char *", 0)), ("callback", ffi.callback("int(int)", lambda x: x)),
        ("function", lib.text_len), ("other ffi's new", other.new("char[]", 2)),
        ("custom allocator", allocate("char[]", 8)), ("ctypes buffer", ctypes.create_string_buffer(4)),
        ("ffi.buffer", ffi.buffer(ffi.new("char[]", 2))), ("memoryview", memoryview(b"ab")),
    ]


def _outcome(call: Any, arg: Any) -> Tuple[str, Any]:
    try:
        return "result", call(arg)
    except Exception as exc:  # the same exception, type and text, as the raw call
        return type(exc).__name__, str(exc)


def test_every_kind_of_pointer_argument_behaves_as_the_raw_call(instrumented: None, checked_so: Path) -> None:
    # Instrumented and wrapped code must do what the raw call does with whatever the program
    # passes for a pointer, right or wrong (a handle once raised ffi.error here).
    ffi, lib = _abi(checked_so)
    raw = ptrbridge.unwrap(lib)
    wrapped = ptrbridge.wrap(raw)
    cases = _pointer_arguments(ffi, raw)
    old = ptrbridge.quarantine_enabled()
    for level, quarantined in ((0, False), (1, False), (2, False), (2, True)):
        ptrbridge.set_quarantine(quarantined)
        with ptrbridge.checking(level):
            for name in ("is_null", "is_null_text", "is_null_int"):
                for what, arg in cases:
                    expected = _outcome(getattr(raw, name), arg)
                    where = (level, quarantined, name, what)
                    assert _outcome(getattr(lib, name), arg) == expected, where
                    assert _outcome(getattr(wrapped, name), arg) == expected, where
    ptrbridge.set_quarantine(old)
    assert [f for f in findings.take() if f.severity == "error"] == []


def _ctypes_arguments() -> List[Tuple[str, Any]]:
    class Holder(ctypes.Structure):
        _fields_ = [("p", ctypes.c_char_p)]

    number, numbers = ctypes.c_int(5), (ctypes.c_int * 3)()
    text = ctypes.create_string_buffer(b"ab", 8)
    return [
        ("None", None), ("bytes", b"abc"), ("bytearray", bytearray(b"ab")), ("str", "abc"), ("int", 3),
        ("zero", 0), ("float", 1.5), ("object", object()), ("c_int", number), ("byref c_int", ctypes.byref(number)),
        ("pointer c_int", ctypes.pointer(number)), ("int array", numbers), ("string buffer", text),
        ("byref buffer", ctypes.byref(text)), ("c_char_p", ctypes.c_char_p(b"x")), ("c_void_p", ctypes.c_void_p(0)),
        ("struct", Holder()), ("byref struct", ctypes.byref(Holder())), ("memoryview", memoryview(b"ab")),
        ("cast", ctypes.cast(text, ctypes.POINTER(ctypes.c_int))),
    ]


def test_every_kind_of_ctypes_argument_behaves_as_the_raw_call(instrumented: None, checked_so: Path) -> None:
    # As above for ctypes, with and without argtypes: a shadow must not make a wrong argument right.
    old = ptrbridge.quarantine_enabled()
    declared = (None, [ctypes.c_char_p], [ctypes.c_void_p], [ctypes.POINTER(ctypes.c_int)],
                [ctypes.POINTER(ctypes.c_char)])
    for level, quarantined in ((0, False), (1, False), (2, False), (2, True)):
        ptrbridge.set_quarantine(quarantined)
        with ptrbridge.checking(level):
            for argtypes in declared:
                instrumented_fn = ctypes.CDLL(str(checked_so)).is_null
                wrapped = ptrbridge.wrap(ctypes.CDLL(str(checked_so)))
                wrapped_fn, raw_wrapped = wrapped.is_null, ptrbridge.unwrap(wrapped).is_null
                if argtypes is not None:
                    instrumented_fn.argtypes = argtypes
                    wrapped_fn.argtypes = argtypes
                for what, arg in _ctypes_arguments():
                    where = (level, quarantined, argtypes, what)
                    expected = _outcome(lambda a: calls._CFuncPtr.__call__(instrumented_fn, a), arg)
                    assert _outcome(instrumented_fn, arg) == expected, where
                    assert _outcome(raw_wrapped, arg) == expected, where
                    assert _outcome(wrapped_fn, arg) == expected, where
    ptrbridge.set_quarantine(old)
    assert [f for f in findings.take() if f.severity == "error"] == []


def test_addressof_an_instrumented_abi_library_is_the_raw_one(instrumented: None, checked_so: Path) -> None:
    ffi, lib = _abi(checked_so)
    raw = ptrbridge.unwrap(lib)
    assert lib is not raw
    for c in (lib, ptrbridge.wrap(raw)):
        pointer = ffi.addressof(c, "add")
        assert pointer == ffi.addressof(raw, "add") and ffi.typeof(pointer) is ffi.typeof("int(*)(int, int)")
    with pytest.raises(AttributeError):
        ffi.addressof(lib, "no_such_function")
    wrapped_ctypes = ptrbridge.wrap(ctypes.CDLL(str(checked_so)))
    with pytest.raises(TypeError, match="expected a 'cdata' object"):  # as cffi says for a non-library
        ffi.addressof(wrapped_ctypes, "add")



@at_level_1
def test_an_instrumented_abi_function_passes_for_its_cdata(instrumented: None, checked_so: Path) -> None:
    # In ABI mode lib.f is a function-pointer cdata, which programs pass to C, cast and typeof.
    ffi, lib = _abi(checked_so)
    raw = ptrbridge.unwrap(lib)
    assert isinstance(lib.text_len, native.CheckedCall)
    assert ffi.cast("void *", lib.text_len) == ffi.cast("void *", raw.text_len)
    assert ffi.cast("uintptr_t", lib.text_len) == ffi.cast("uintptr_t", raw.text_len)
    assert ffi.typeof(lib.text_len) is ffi.typeof(raw.text_len) is ffi.typeof("int(*)(char *)")
    for level in (1, 2):
        with ptrbridge.checking(level):
            assert lib.is_null(lib.text_len) == 0  # a void * parameter takes a function pointer
    with pytest.raises(TypeError) as raw_error:
        raw.call_each(raw.text_len, 0)  # the wrong function type: the same error
    with pytest.raises(TypeError) as checked_error:
        lib.call_each(lib.text_len, 0)
    assert str(checked_error.value) == str(raw_error.value)
    assert [f for f in findings.take() if f.severity == "error"] == []  # (scans: older tests' memory)


def test_instrumented_ctypes_pointer_results_point_into_the_original(instrumented: None) -> None:
    # Under the quarantine C sees a shadow; a pointer it returns into it is given back translated.
    old = ptrbridge.set_quarantine(True)
    try:
        with ptrbridge.checking(2):
            crt = ctypes.CDLL(None)
            crt.memchr.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
            crt.memchr.restype = ctypes.c_void_p
            crt.strtol.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int]
            crt.strtol.restype = ctypes.c_long
            buf = ctypes.create_string_buffer(b"42 and more")
            assert crt.memchr(buf, ord("a"), 11) == ctypes.addressof(buf) + 3
            end = ctypes.c_void_p()
            assert crt.strtol(buf, ctypes.byref(end), 10) == 42 and end.value == ctypes.addressof(buf) + 2
    finally:
        ptrbridge.set_quarantine(old)
    # No read of a closed shadow (kept reads are use-after-release); scans may report older tests' memory.
    assert [f for f in findings.take() if f.severity == "error" or f.kind == "use-after-release"] == []
