"""ptrbridge.wrap: levels, pass-through, error conventions, errno, thread models, R3 watchdog."""
from __future__ import annotations

import ctypes
import errno
import os
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, List, Tuple

import cffi
import pytest

import ptrbridge
from ptrbridge import CError, NestedPointerError, Pinner, calls, findings, ownership
from ptrbridge._bindings import native
from conftest import CHECKED_CDEF, at_level_1, header_cdef, python_frames_of

libc_ffi = cffi.FFI()
libc_ffi.cdef("""
    struct iovec { void *iov_base; size_t iov_len; };
    ssize_t writev(int fd, const struct iovec *iov, int iovcnt);
    int close(int fd);
    int open(const char *path, int flags, ...);
    char *getenv(const char *name);
    const char *strerror(int errnum);
    #define EBADF 9
""")
LIBC = libc_ffi.dlopen(None)


def test_writev_with_iovecs_into_bytearrays() -> None:
    libc = ptrbridge.wrap(LIBC, errcheck={"writev": "negative"}, use_errno=True)
    read_end, write_end = os.pipe()
    try:
        parts = [bytearray(b"hello, "), bytearray(b"world")]
        iov = libc_ffi.new("struct iovec[2]")
        for i, part in enumerate(parts):
            iov[i].iov_base = libc_ffi.from_buffer(part)
            iov[i].iov_len = len(part)
        with pytest.raises(NestedPointerError, match=r"argument 2 .*: \[0\]\.iov_base -> bytearray\(7\)"):
            libc.writev(write_end, iov, 2)
        os.set_blocking(read_end, False)
        with pytest.raises(BlockingIOError):
            os.read(read_end, 1)  # the rejected call never reached C: nothing was written
        os.set_blocking(read_end, True)
        with Pinner() as p:
            for i, part in enumerate(parts):
                iov[i].iov_base = p.pin(part)
            assert libc.writev(write_end, iov, 2) == 12
        assert os.read(read_end, 64) == b"hello, world"
    finally:
        os.close(read_end)
        os.close(write_end)


def test_level_zero_returns_the_raw_function(abi: Tuple[Any, Any]) -> None:
    ffi, raw = abi
    c = ptrbridge.wrap(raw)
    with ptrbridge.checking(0):
        assert c.add is raw.add
    assert c.add is not raw.add
    assert c.add(2, 3) == 5
    assert c.add.__name__ == "add" and c.add.__wrapped__ is raw.add


def test_level_change_reaches_cached_functions(abi: Tuple[Any, Any]) -> None:
    ffi, raw = abi
    c = ptrbridge.wrap(raw)
    person_name_len = c.person_name_len  # fetched at level 1
    name = ffi.new("char[]", b"x")
    person = ffi.new("struct person *")
    person.name = name
    with ptrbridge.checking(0):
        assert person_name_len(person) == 1
    with pytest.raises(NestedPointerError):
        person_name_len(person)


def test_non_functions_pass_through(api: Any) -> None:
    c = ptrbridge.wrap(api.lib)
    with pytest.raises(AttributeError):
        c.no_such_function
    assert "add" in dir(c)
    assert ptrbridge.unwrap(c) is api.lib
    libc = ptrbridge.wrap(LIBC)
    assert libc.EBADF == 9


def test_wrap_rejects_bad_arguments(abi: Tuple[Any, Any]) -> None:
    _, raw = abi
    with pytest.raises(ValueError, match="threads must be one of"):
        ptrbridge.wrap(raw, threads="parallel")
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="max_concurrency must be a positive int"):
            ptrbridge.wrap(raw, max_concurrency=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown error convention 'zero'"):
        ptrbridge.wrap(raw, errcheck={"add": "zero"})
    with pytest.raises(TypeError, match="already wrapped"):
        ptrbridge.wrap(ptrbridge.wrap(raw))
    with pytest.raises(TypeError):
        ptrbridge.declare(raw, "add", errcheck="negative")  # type: ignore[arg-type]


# --- error conventions ------------------------------------------------------------

@pytest.mark.parametrize("mode", ["api", "abi", "ctypes"])
def test_error_conventions(mode: str, api: Any, abi: Tuple[Any, Any], checked_so: Path) -> None:
    if mode == "api":
        lib = api.lib
    elif mode == "abi":
        lib = abi[1]
    else:
        lib = ctypes.CDLL(str(checked_so))
        lib.null_pointer.restype = ctypes.c_void_p
    c = ptrbridge.wrap(lib, errcheck={"fail_with": "negative", "null_pointer": "null"},
                       error_message=lambda code: f"code {code} means trouble")
    assert c.fail_with(0) == 0 and c.fail_with(7) == 7
    with pytest.raises(CError, match=r"^ptrbridge: fail_with\(\) failed with result -3: code -3 means trouble$") as info:
        c.fail_with(-3)
    assert info.value.code == -3 and info.value.function == "fail_with"
    with pytest.raises(CError, match=r"null_pointer\(\) failed"):
        c.null_pointer()
    ptrbridge.declare(c, "fail_with", errcheck="nonzero")
    with pytest.raises(CError):
        c.fail_with(7)
    ptrbridge.declare(c, "fail_with", errcheck=lambda r: r == 42)
    assert c.fail_with(7) == 7
    with pytest.raises(CError):
        c.fail_with(42)


def test_broken_message_function_does_not_hide_the_failure(abi: Tuple[Any, Any]) -> None:
    c = ptrbridge.wrap(abi[1], errcheck={"fail_with": "negative"}, error_message=lambda code: 1 / 0)
    with pytest.raises(CError, match="error_message failed: ZeroDivisionError"):
        c.fail_with(-1)


def test_errno_cffi_is_fresh() -> None:
    libc = ptrbridge.wrap(LIBC, errcheck={"close": "negative", "open": "negative"}, use_errno=True)
    with pytest.raises(OSError) as info:
        libc.close(-1)
    assert info.value.errno == errno.EBADF and "from close()" in str(info.value)
    with pytest.raises(FileNotFoundError):
        libc.open(b"/nonexistent/ptrbridge", os.O_RDONLY)
    # errno is still ENOENT from the failed open; a succeeding call must not see it
    fd = libc.open(b"/dev/null", os.O_RDONLY)
    libc.close(fd)


def test_errno_ctypes_is_fresh() -> None:
    crt = ctypes.CDLL(None)
    crt.close.argtypes = [ctypes.c_int]
    libc = ptrbridge.wrap(crt, errcheck={"close": "negative"}, use_errno=True)
    with pytest.raises(OSError) as info:
        libc.close(-1)
    assert info.value.errno == errno.EBADF
    fd = os.open("/dev/null", os.O_RDONLY)
    assert libc.close(fd) == 0


def test_errno_zero_failure_is_a_cerror() -> None:
    libc = ptrbridge.wrap(LIBC, errcheck={"getenv": "null"}, use_errno=True)
    with pytest.raises(CError, match="errno 0"):
        libc.getenv(b"PTRBRIDGE_SURELY_UNSET_VARIABLE")


# --- thread models ----------------------------------------------------------------

def _run_threads(target: Any, n: int) -> None:
    threads = [threading.Thread(target=target) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_serial_runs_every_call_on_one_thread(abi: Tuple[Any, Any]) -> None:
    c = ptrbridge.wrap(abi[1], threads="serial")
    seen: List[int] = []
    _run_threads(lambda: seen.extend(c.thread_id() for _ in range(20)), 4)
    try:
        assert len(seen) == 80 and len(set(seen)) == 1
        assert seen[0] != abi[1].thread_id()  # not the caller's thread
    finally:
        ptrbridge.shutdown(c)


def test_lock_serialises_a_racy_function(abi: Tuple[Any, Any]) -> None:
    _, raw = abi
    c = ptrbridge.wrap(raw, threads="lock")
    raw.counter_reset()
    _run_threads(lambda: [c.counter_bump(50) for _ in range(20)], 4)
    assert raw.counter_value() == 4 * 20 * 50


def test_max_concurrency_bounds_calls_in_flight(abi: Tuple[Any, Any]) -> None:
    _, raw = abi
    c = ptrbridge.wrap(raw, max_concurrency=2)
    raw.gate_reset()
    threads = [threading.Thread(target=c.gate_pass) for _ in range(5)]
    for t in threads:
        t.start()
    raw.gate_wait_inside(2)  # two are in; the others wait for a slot in Python
    raw.gate_open()
    for t in threads:
        t.join()
    assert raw.gate_most_inside() == 2


# --- R3 watchdog ------------------------------------------------------------------

def test_watchdog_reports_a_call_that_holds_lent_memory(abi: Tuple[Any, Any]) -> None:
    ffi, raw = abi
    c = ptrbridge.wrap(raw)
    reported = threading.Event()
    messages: List[str] = []

    def listener(message: str) -> None:
        messages.append(message)
        reported.set()

    read_end, write_end = os.pipe()
    buffer = bytearray(64)
    old = ptrbridge.set_call_timeout(0.05)
    calls.timeout_listeners.append(listener)
    result: List[int] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            worker = threading.Thread(target=lambda: result.append(c.read_into(read_end, ffi.from_buffer(buffer), 64)))
            worker.start()
            assert reported.wait(30), "the watchdog never reported the blocked call"
            os.write(write_end, b"done")
            worker.join()
        assert result == [4] and bytes(buffer[:4]) == b"done"
        assert "read_into() called at test_calls.py:" in messages[0]
        assert "has held bytearray(64)" in messages[0]
        assert "R3: a C call that received Python memory must return" in messages[0]
        assert any(issubclass(w.category, ptrbridge.CallTimeoutWarning) for w in caught)
    finally:
        calls.timeout_listeners.remove(listener)
        ptrbridge.set_call_timeout(old)
        os.close(read_end)
        os.close(write_end)


@pytest.mark.parametrize("bad", [0, -1, True, "1", None])
def test_call_timeout_rejects(bad: object) -> None:
    with pytest.raises(ValueError, match="seconds must be a positive number"):
        ptrbridge.set_call_timeout(bad)  # type: ignore[arg-type]
    assert ptrbridge.call_timeout() == 60.0


# --- robustness: opaque types, any call depth, ctypes configuration, validation ----------

OPAQUE_CDEF = """
    typedef ... opaque_state;
    opaque_state *opaque_new(int v);
    int opaque_get(const opaque_state *s);
    void opaque_free(opaque_state *s);
"""
OPAQUE_SOURCE = """
    #include <stdlib.h>
    typedef struct { int v; } opaque_state;
    opaque_state *opaque_new(int v) { opaque_state *s = malloc(sizeof *s); if (s) s->v = v; return s; }
    int opaque_get(const opaque_state *s) { return s->v; }
    void opaque_free(opaque_state *s) { free(s); }
"""


@pytest.fixture(scope="module")
def opaque_mod(clib_dir: Path) -> Any:
    from cbuild import build_cffi_module

    return build_cffi_module("_calls_opaque", OPAQUE_CDEF, OPAQUE_SOURCE, clib_dir / "opaque")


@pytest.mark.parametrize("level", [1, 2])
def test_opaque_pointer_types_are_not_walked(opaque_mod: Any, level: int) -> None:
    # brotlicffi declares its states this way; reading .fields of such a type aborts inside cffi.
    from ptrbridge.checking import is_opaque, layout_of

    ffi, raw = opaque_mod.ffi, opaque_mod.lib
    item = ffi.typeof("opaque_state *").item
    assert is_opaque(item) and layout_of(item) is None
    assert not is_opaque(ffi.typeof("int")) and not is_opaque(libc_ffi.typeof("struct iovec"))
    w = ptrbridge.wrap(raw)
    with ptrbridge.checking(level):
        state = w.opaque_new(41)
        assert w.opaque_get(state) == 41
        w.opaque_free(state)


def test_wrapped_destructor_runs_at_any_depth_and_at_shutdown(opaque_mod: Any, tmp_path: Path) -> None:
    # ffi.gc(obj, lib.destroy) calls the checked function from the collector, with no Python
    # caller at interpreter shutdown: that raised "call stack is not deep enough".
    import subprocess
    import sys

    script = tmp_path / "gc_destructor.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(opaque_mod.__file__).parent)!r})\n"
        "import ptrbridge, _calls_opaque as m\n"
        "w = ptrbridge.wrap(m.lib)\n"
        "calls = []\n"
        "def destroy(s):\n"
        "    calls.append(1)\n"
        "    w.opaque_free(s)\n"
        "    print('destroyed', len(calls), flush=True)\n"
        "kept = m.ffi.gc(w.opaque_new(1), w.opaque_free)\n"
        "kept2 = m.ffi.gc(w.opaque_new(2), destroy)\n"
        "t = m.ffi.gc(w.opaque_new(3), w.opaque_free)\n"
        "del t\n"
        "print('ok', flush=True)\n"
    )
    done = subprocess.run([sys.executable, "-X", "dev", str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "ok" in done.stdout and "destroyed 1" in done.stdout
    assert "not deep enough" not in done.stderr and "Traceback" not in done.stderr
    # And directly from a thread's bottom frame: the callable is the thread's target itself.
    w = ptrbridge.wrap(opaque_mod.lib)
    state = w.opaque_new(5)
    errors: List[BaseException] = []
    thread = threading.Thread(target=w.opaque_free, args=(state,))
    thread.start()
    thread.join()
    assert not errors


@pytest.mark.parametrize("level", [0, 1, 2])
def test_ctypes_configuration_set_on_a_wrapped_function_reaches_c(level: int) -> None:
    with ptrbridge.checking(level):
        w = ptrbridge.wrap(ctypes.CDLL(None))
        labs = w.labs
        labs.argtypes = [ctypes.c_long]
        labs.restype = ctypes.c_long
        assert labs(-(2 ** 40)) == 2 ** 40  # without restype/argtypes: truncated to int
        assert w.labs.restype is ctypes.c_long and list(w.labs.argtypes) == [ctypes.c_long]
        strtoul = w.strtoul
        strtoul.restype = ctypes.c_ulong
        strtoul.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int]
        assert strtoul(b"18446744073709551615", None, 10) == 2 ** 64 - 1
        strtoul.errcheck = lambda result, func, args: result + 1
        assert strtoul(b"5", None, 10) == 6
        del strtoul.errcheck
        assert w.strtoul(b"5", None, 10) == 5
        raw = ptrbridge.unwrap(w).strtoul
        assert raw.restype is ctypes.c_ulong  # the real function was configured
        assert ctypes.cast(w.strtoul, ctypes.c_void_p).value == ctypes.cast(raw, ctypes.c_void_p).value


def test_ctypes_configuration_survives_level_changes() -> None:
    w = ptrbridge.wrap(ctypes.CDLL(None))
    with ptrbridge.checking(0):
        w.labs.restype = ctypes.c_long
        w.labs.argtypes = [ctypes.c_long]
    with ptrbridge.checking(1):
        assert w.labs(-(2 ** 40)) == 2 ** 40
    with ptrbridge.checking(2):
        assert w.labs(-(2 ** 41)) == 2 ** 41


def test_use_errno_follows_argtypes_set_later() -> None:
    w = ptrbridge.wrap(ctypes.CDLL(None, use_errno=True), errcheck={"strtol": "nonzero"}, use_errno=False)
    ptrbridge.declare(w, "close", errcheck="negative", use_errno=True)
    w.close.argtypes = [ctypes.c_int]
    with pytest.raises(OSError) as info:
        w.close(-1)
    assert info.value.errno == errno.EBADF


@pytest.mark.parametrize("bad", [None, 42, "libc.so.6", b"libc.so.6", os, object()])
def test_wrap_rejects_what_is_not_a_library(bad: Any) -> None:
    with pytest.raises(TypeError, match=r"ptrbridge\.wrap: expected a cffi API-mode lib, a cffi ffi\.dlopen\(\) "
                                        r"library or a ctypes\.CDLL"):
        ptrbridge.wrap(bad)


def test_wrap_rejects_a_bad_ffi(abi: Tuple[Any, Any]) -> None:
    ffi, raw = abi
    with pytest.raises(TypeError, match="ffi must be a cffi FFI instance or None, not int"):
        ptrbridge.wrap(raw, ffi=42)
    assert ptrbridge.wrap(raw, ffi=ffi).add(1, 2) == 3


def test_unknown_function_names_are_errors(abi: Tuple[Any, Any], api: Any) -> None:
    _, raw = abi
    for lib_ in (raw, api.lib, ctypes.CDLL(None)):
        with pytest.raises(AttributeError, match="has no function 'typo'"):
            ptrbridge.wrap(lib_, errcheck={"typo": "negative"})
    w = ptrbridge.wrap(raw)
    with pytest.raises(AttributeError, match=r"ptrbridge\.declare: cffi library .* has no function 'nosuch'"):
        ptrbridge.declare(w, "nosuch", errcheck="nonzero")
    with pytest.raises(TypeError, match="errcheck must map"):
        ptrbridge.wrap(raw, errcheck=["add"])  # type: ignore[arg-type]


# --- constants, variables and functions with nothing to check ---------------------------

def test_cffi_constants_are_cached_and_variables_read_through(tmp_path: Path) -> None:
    """A constant becomes a plain attribute of the wrapped library; a C variable is read anew."""
    sys.path.insert(0, str(Path(__file__).parent))
    from cbuild import build_cffi_module

    mod = build_cffi_module(
        "_speed_consts", "#define SPEED_K 7\nenum { SPEED_E = 3 };\nextern int speed_var;\nvoid speed_set(int);",
        "#define SPEED_K 7\nenum { SPEED_E = 3 };\nint speed_var = 1;\nvoid speed_set(int v) { speed_var = v; }",
        tmp_path)
    for library in (ptrbridge.wrap(mod.lib), ptrbridge.wrap(mod.lib)):
        assert library.SPEED_K == 7 and library.SPEED_E == 3
        assert library.__dict__["SPEED_K"] == 7  # cached: no __getattr__ from now on
        assert library.speed_var == 1
        assert "speed_var" not in library.__dict__
        mod.lib.speed_set(42)  # C changes the variable
        assert library.speed_var == 42
        library.speed_var = 1  # assigned in C through the wrapped library
        assert mod.lib.speed_var == 1


def test_cffi_abi_constants_are_cached_and_variables_read_through() -> None:
    ffi = cffi.FFI()
    ffi.cdef("#define SPEED_ABI_K 11\nextern int opterr;")
    raw = ffi.dlopen(None)
    w = ptrbridge.wrap(raw)
    old = raw.opterr
    try:
        assert w.SPEED_ABI_K == 11 and w.__dict__["SPEED_ABI_K"] == 11
        assert w.opterr == old
        raw.opterr = old + 5
        assert w.opterr == old + 5 and "opterr" not in w.__dict__
    finally:
        raw.opterr = old


FNVALUES_CDEF = header_cdef("fnvalues.h")


@pytest.fixture(scope="module")
def fnvalues_api(clib_dir: Path) -> Any:
    from cbuild import build_cffi_module

    mod = build_cffi_module("_fnvalues_api", FNVALUES_CDEF + 'extern "Python" int fv_py(const int *);',
                            "#include \"fnvalues.h\"\nstatic int fv_py(const int *);",
                            clib_dir / "fnvalues_api", extra_sources=["fnvalues.c"])

    @mod.ffi.def_extern()
    def fv_py(p: Any) -> int:
        return int(p[0]) + 100

    return mod


@pytest.mark.parametrize("level", [0, 1, 2])
def test_extern_python_function_and_function_pointer_variable_stay_values(fnvalues_api: Any, level: int) -> None:
    """pygit2 does ``opts.callbacks.credentials = C._credentials_cb``: the extern "Python" function
    is a cdata the program assigns to struct fields, so the wrapped lib gives it as it is (it was a
    checked function, which cffi refuses there); a function-pointer variable is read anew."""
    ffi, raw = fnvalues_api.ffi, fnvalues_api.lib
    lib = ptrbridge.wrap(raw)
    two = ffi.new("int *", 2)
    with ptrbridge.checking(level):
        try:
            assert lib.fv_py is raw.fv_py
            ops = ffi.new("struct fv_ops *")
            ops.fn = lib.fv_py
            assert lib.fv_call_ops(ops, 1) == 101
            lib.fv_hook = lib.fv_py  # assigned in C
            assert lib.fv_call_hook(2) == 102 and raw.fv_hook == raw.fv_py
            lib.fv_hook_reset()
            assert lib.fv_hook(two) == 6
            lib.fv_hook_set_quadruple()  # C changes the variable
            assert lib.fv_hook(two) == 8 and "fv_hook" not in lib.__dict__
        finally:
            raw.fv_hook_reset()


def test_abi_function_pointer_variable_is_read_anew_when_instrumented(clib_dir: Path) -> None:
    from cbuild import build_shared

    ffi = cffi.FFI()
    ffi.cdef(FNVALUES_CDEF)
    findings.take()
    started = ptrbridge.instrument()  # False: already on (the suite under the plugin)
    try:
        lib = ffi.dlopen(str(build_shared("fnvalues.c", clib_dir)))
        assert type(lib).__name__ == "CheckedLibrary"
        two = ffi.new("int *", 2)
        with ptrbridge.checking(1):
            assert lib.fv_hook(two) == 6
            lib.fv_hook_set_quadruple()
            assert lib.fv_hook(two) == 8  # was the first value read, kept as a checked function
            assert lib.fv_call_hook(2) == 8
    finally:
        if started:
            ptrbridge.uninstrument()
        findings.take()


def test_instrumented_function_without_pointers_is_the_raw_one(abi: Tuple[Any, Any]) -> None:
    """Recording, a function with no pointer or function parameter has nothing to do: it is raw."""
    inst = __import__("importlib").import_module("ptrbridge.instrument")

    _ffi, raw = abi
    proxy = inst._proxy(raw)
    with ptrbridge.checking(1):
        assert proxy.add(2, 3) == 5
        assert proxy.add is raw.add
        assert proxy.person_name_len is not raw.person_name_len  # has a pointer parameter
    wrapped = ptrbridge.wrap(raw)  # explicit wrap keeps its wrapper (callback exceptions)
    with ptrbridge.checking(1):
        assert wrapped.add is not raw.add and wrapped.add(2, 3) == 5


@pytest.mark.parametrize("level", [1, 2])
def test_a_ctypes_pointer_argument_is_not_kept_alive_by_the_check(level: int) -> None:
    # numpy's arr.ctypes.data_as(...) keeps the array alive: ctypes.cast() inside the check
    # made the pointer its own _objects (a cycle), so the array outlived the program's last
    # reference until the garbage collector ran (cairocffi-style refcount tests see it).
    libc = ctypes.CDLL(None)
    libc.memset.argtypes = [ctypes.POINTER(ctypes.c_double), ctypes.c_int, ctypes.c_size_t]
    libc.memset.restype = ctypes.c_void_p
    w = ptrbridge.wrap(libc)
    value = ctypes.c_double(1.5)
    p = ctypes.pointer(value)
    before = sys.getrefcount(p)
    with ptrbridge.checking(level):
        w.memset(p, 0, ctypes.sizeof(value))
    assert value.value == 0.0
    assert sys.getrefcount(p) == before


# --- the C fast path (csrc/pycall.c) --------------------------------------------------

memchr_ffi = cffi.FFI()
memchr_ffi.cdef("char *memchr(const char *s, int c, size_t n);")


def _closure_frames(run: Any) -> List[str]:
    """The names of ptrbridge.calls' Python functions that ran during ``run()``."""
    return python_frames_of(calls.__file__, run)


@at_level_1
def test_level_1_common_calls_run_no_python_frame(abi: Tuple[Any, Any]) -> None:
    ffi, raw = abi
    c = ptrbridge.wrap(raw)
    assert isinstance(c.text_len, native.CheckedCall) and isinstance(c.add, native.CheckedCall)
    # Identity: what the Python closure showed.
    assert c.text_len.__name__ == "text_len" and c.text_len.__qualname__ == "CheckedLibrary.text_len"
    assert c.text_len.__doc__ == "Checked call of the C function text_len()."
    assert c.text_len.__wrapped__ is raw.text_len and c.text_len.__module__ == "ptrbridge.calls"
    assert c.text_len._ptrbridge_checked and not c.text_len._ptrbridge_semantic
    assert "text_len" in repr(c.text_len)
    view = ffi.from_buffer(bytearray(b"ab\0"))
    c.text_len(view)  # the first call of a cdata type: the closure learns its shape
    assert _closure_frames(lambda: (c.text_len(b"abc"), c.text_len(view), c.add(1, 2))) == []
    assert (c.text_len(b"abc"), c.text_len(view), c.add(1, 2)) == (3, 2, 3)
    # A struct whose pointer fields are NULL, pinned or C memory is settled in C too...
    p = ffi.new("struct person *")
    c.person_name_len(p)  # the closure learns the shape of "struct person *"
    name = bytearray(b"ada\0")
    with ptrbridge.Pinner() as pinner:
        frames = _closure_frames(lambda: c.person_name_len(p))
        p.name = pinner.pin(name)
        frames += _closure_frames(lambda: c.person_name_len(p))
        assert c.person_name_len(p) == 3
        assert frames == []
    # ...but one to an unpinned Python buffer is the closure's, which says what is wrong.
    text = ffi.new("char[]", b"grace")
    p.name = text
    with pytest.raises(ptrbridge.NestedPointerError, match=r"argument 1 has Python pointer to unpinned"):
        c.person_name_len(p)
    # (The owner is looked for in the caller and two frames above it: the lambda holds it.)
    assert "checked" in _closure_frames(
        lambda text=text: pytest.raises(ptrbridge.NestedPointerError, c.person_name_len, p))
    p.name = ffi.NULL
    # ...level 2: bytes, and ffi.new memory or from_buffer views whose pointers are settled, are
    # lent in C too (csrc/pylends.c); a pointer into unpinned Python memory is the closure's.
    with ptrbridge.checking(2):
        assert _closure_frames(lambda: (c.text_len(b"abc"), c.person_name_len(p), c.text_len(view))) == []
        p.name = text
        assert "checked" in _closure_frames(lambda text=text: pytest.raises(ptrbridge.NestedPointerError,
                                                                            c.person_name_len, p))
        p.name = ffi.NULL
    # Keyword arguments: the closure raises as it did.
    with pytest.raises(TypeError, match="unexpected keyword"):
        c.text_len(s=b"abc")
    # At level 0 the library hands out the raw function; the checked one still calls C directly.
    fast = c.text_len
    with ptrbridge.checking(0):
        assert c.text_len is raw.text_len
        assert _closure_frames(lambda: fast(b"abcd")) == [] and fast(b"abcd") == 4


@at_level_1
def test_fast_path_raises_what_the_raw_call_raises(abi: Tuple[Any, Any]) -> None:
    ffi, raw = abi
    c = ptrbridge.wrap(raw)
    for bad in ((3,), (None,), (b"a", b"b"), ()):
        with pytest.raises(TypeError) as raw_error:
            raw.text_len(*bad)
        with pytest.raises(TypeError) as checked_error:
            c.text_len(*bad)
        assert str(checked_error.value) == str(raw_error.value)
    with pytest.raises(TypeError) as raw_error:
        raw.add("1", 2)
    with pytest.raises(TypeError) as checked_error:
        c.add("1", 2)
    assert str(checked_error.value) == str(raw_error.value)


@at_level_1
def test_fast_path_counts_exactly_when_instrumented(checked_so: Path) -> None:
    ffi = cffi.FFI()
    ffi.cdef(CHECKED_CDEF)
    ptrbridge.instrument()
    try:
        lib = ffi.dlopen(str(checked_so))
    finally:
        ptrbridge.uninstrument()
    assert isinstance(lib.text_len, native.CheckedCall)
    data = ffi.from_buffer(bytearray(b"xyz\0"))  # NUL-terminated: text_len reads to the NUL
    before = findings.counters()["calls"]
    for _ in range(100):
        lib.text_len(b"abc")
        lib.text_len(data)
    assert findings.counters()["calls"] - before == 200
    with ptrbridge.checking(2):
        lib.text_len(b"abc")  # the closure counts this one
    with ptrbridge.checking(0):
        lib.text_len(b"abc")  # the raw function: not counted
    assert findings.counters()["calls"] - before == 201
    for _ in range(7):
        lib.text_len(b"")
    assert findings.reset_counters()["calls"] - before == 208
    assert findings.counters()["calls"] == 0  # the C count is zeroed too
    # The count is under the GIL: threads calling at once lose none.
    threads = [threading.Thread(target=lambda: [lib.text_len(b"ab") for _ in range(2000)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert findings.counters()["calls"] == 8000


def _shadowed(c: Any, data: bytes) -> bool:
    """Whether C saw a copy of ``data`` (a quarantine shadow) rather than ``data`` itself."""
    home = int(memchr_ffi.cast("uintptr_t", memchr_ffi.from_buffer(data)))
    return int(c.address_seen(data)) != home


@at_level_1
def test_sampling_draws_on_the_fast_path(abi: Tuple[Any, Any]) -> None:
    c = ptrbridge.wrap(abi[1])
    assert isinstance(c.address_seen, native.CheckedCall)
    data = b"sampled bytes"
    old = ptrbridge.quarantine_enabled()
    try:
        assert not _shadowed(c, data)
        ptrbridge.set_quarantine(True, sample=1)  # level 1, every call drawn: every call shadowed
        assert all(_shadowed(c, data) for _ in range(20))
        ptrbridge.set_quarantine(True, sample=3)  # a random gap of 1..5 calls: about one call in 3
        drawn = sum(_shadowed(c, data) for _ in range(600))
        assert 100 <= drawn <= 400
        ptrbridge.set_quarantine(False)
        assert not any(_shadowed(c, data) for _ in range(20))
    finally:
        ptrbridge.set_quarantine(old)


@at_level_1
def test_callback_exception_in_a_fast_call_is_reraised(abi: Tuple[Any, Any]) -> None:
    ffi, raw = abi
    c = ptrbridge.wrap(raw)
    assert isinstance(c.call_kept, native.CheckedCall)  # call_kept(int): C calls the kept callback

    def boom(i: int) -> int:
        raise KeyError(f"boom {i}")

    with ptrbridge.callback(ffi, "int(int)", boom, error=-7) as cb:
        c.keep_callback(cb.cdata)
        with pytest.raises(KeyError, match="boom 3"):
            c.call_kept(3)
        c.keep_callback(ffi.NULL)


@at_level_1
def test_callback_exception_goes_to_the_innermost_checked_call(abi: Tuple[Any, Any]) -> None:
    ffi, raw = abi
    c = ptrbridge.wrap(raw)
    caught: List[str] = []

    def inner(i: int) -> int:
        raise KeyError(f"inner {i}")

    def outer_fast(i: int) -> int:  # runs inside the fast call_kept: makes a closure call
        try:
            c.call_each(inner_cb.cdata, 1)
        except KeyError as exc:
            caught.append(f"closure {exc}")
        return 5

    def outer_closure(i: int) -> int:  # runs inside the closure's call_each: makes a fast call
        try:
            c.call_kept(i)
        except KeyError as exc:
            caught.append(f"fast {exc}")
        return 1

    with ptrbridge.callback(ffi, "int(int)", inner, error=-7) as inner_cb, \
            ptrbridge.callback(ffi, "int(int)", outer_fast, error=-8) as outer_fast_cb, \
            ptrbridge.callback(ffi, "int(int)", outer_closure, error=-9) as outer_closure_cb:
        c.keep_callback(outer_fast_cb.cdata)
        assert c.call_kept(1) == 5  # the inner exception went to the inner (closure) call
        c.keep_callback(inner_cb.cdata)
        assert c.call_each(outer_closure_cb.cdata, 2) == 2  # ...and here to the inner fast call
        c.keep_callback(ffi.NULL)
    assert caught == ["closure 'inner 0'", "fast 'inner 0'", "fast 'inner 1'"]


@at_level_1
def test_watchdog_sees_a_blocked_fast_call_and_a_forked_child_does_not(abi: Tuple[Any, Any]) -> None:
    ffi, raw = abi
    c = ptrbridge.wrap(raw)
    read_end, write_end = os.pipe()
    buffer = bytearray(16)
    worker = threading.Thread(target=lambda: c.read_into(read_end, ffi.from_buffer(buffer), 16))
    try:
        worker.start()
        for _ in range(10_000):
            live = calls._calls_in_flight()
            if any(name == "read_into" for _identity, name, _args, _frame in live.values()):
                break
            threading.Event().wait(0.001)
        found = [entry for entry in live.values() if entry[1] == "read_into"]
        assert len(found) == 1 and found[0][0] is None  # a fast call: no frame of the closure
        assert calls._lent_arguments(found[0][2]) == ["bytearray(16)"]
        assert found[0][3] is not None and found[0][3].f_code.co_name == "<lambda>"
        if hasattr(os, "fork"):
            pid = os.fork()
            if pid == 0:  # the child: the worker thread and its call are gone
                ok = not native.fastcall_in_flight() and c.text_len(b"abc") == 3
                os._exit(0 if ok else 1)
            _pid, status = os.waitpid(pid, 0)
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    finally:
        os.write(write_end, b"x")
        worker.join()
        os.close(read_end)
        os.close(write_end)
    assert not native.fastcall_in_flight()


class _Person(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("age", ctypes.c_int)]


@at_level_1
def test_ctypes_struct_with_settled_pointers_runs_no_python_frame(checked_so: Path) -> None:
    c = ptrbridge.wrap(ctypes.CDLL(str(checked_so)))
    c.person_name_len.argtypes = [ctypes.POINTER(_Person)]
    person, team = _Person(None, 1), (_Person * 2)()
    c.person_name_len(ctypes.byref(person))  # the closure learns the struct's plan
    c.team_total(team, 2)
    # The aggregates alone decide with a count of 0: a positive int is an address the closure
    # checks while freed memory is on record, which an earlier test may have left.
    assert _closure_frames(lambda: (c.person_name_len(ctypes.byref(person)), c.team_total(team, 0))) == []
    if not ownership.has_freed_history():
        assert _closure_frames(lambda: c.team_total(team, 2)) == []
    name = ctypes.create_string_buffer(b"ada")
    with ptrbridge.Pinner() as pinner:
        pinner.pin(name)
        person.name = ctypes.addressof(name)  # type: ignore[assignment]
        assert _closure_frames(lambda: c.person_name_len(ctypes.byref(person))) == []
        assert c.person_name_len(ctypes.byref(person)) == 3
    # Unpinned now: the closure takes the call and says what is wrong.
    with pytest.raises(ptrbridge.NestedPointerError, match=r"argument 1 has Python pointer to unpinned"):
        c.person_name_len(ctypes.byref(person))
    person.name = None


@at_level_1
def test_ctypes_checked_function_calls_c_from_the_fast_path(checked_so: Path) -> None:
    c = ptrbridge.wrap(ctypes.CDLL(str(checked_so)))
    c.text_len.argtypes = [ctypes.c_char_p]
    c.add.argtypes = [ctypes.c_int, ctypes.c_int]
    assert isinstance(type(c.text_len).__dict__["__call__"].__func__, native.CheckedCall)
    assert _closure_frames(lambda: (c.text_len(b"abc"), c.text_len(None), c.add(-2, 0))) == []
    assert c.text_len(b"abc") == 3 and c.add(-2, 0) == -2
    if not ownership.has_freed_history():  # an int is an address to check only then
        assert _closure_frames(lambda: c.add(2, 3)) == []
    with pytest.raises(ctypes.ArgumentError) as raw_error:
        ptrbridge.unwrap(c).text_len(3.5)
    with pytest.raises(ctypes.ArgumentError) as checked_error:
        c.text_len(3.5)
    assert str(checked_error.value) == str(raw_error.value)
