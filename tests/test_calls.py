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
from ptrbridge import CError, NestedPointerError, Pinner, calls

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
