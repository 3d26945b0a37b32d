"""The tour behind ``python -m ptrbridge demo``, every part run for real.

It opens with the sanitizer: small cffi programs written the naive way, with
no change for ptrbridge, run plainly and then under ``python -m ptrbridge
run``, and the reports that name their bugs.  Then the explicit API: handles,
pinning, C memory, checked calls breaking each rule and their fixes,
callbacks, R3, level 2's retention scan on real zlib, the quarantine, and the
C API.  Not shown here (see the README and the tests): the pytest plugin,
thread models, ``ptrbridge.new``, the heap map's internals, the Kafka example.
"""
from __future__ import annotations

import gc
import sys
import warnings
from typing import Any, Callable, ClassVar, List, Tuple

import cffi

import ptrbridge

__all__ = ["run_demo"]

_sections: List[Callable[[Any], None]] = []


def _section(fn: Callable[[Any], None]) -> Callable[[Any], None]:
    _sections.append(fn)
    return fn


def _show_error(action: str, fn: Callable[[], Any]) -> None:
    try:
        fn()
    except Exception as exc:  # the demo prints whatever the library raises
        print(f"  {action}\n    -> {type(exc).__name__}: {exc}")
    else:  # pragma: no cover - would mean the library failed to detect misuse
        raise RuntimeError(f"demo: {action} should have raised, but ptrbridge let it through")


def _run_program(argv: List[str]) -> Any:
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    for name in ("PTRBRIDGE_CHECK", "PTRBRIDGE_QUARANTINE", "PTRBRIDGE_STRICT"):
        env.pop(name, None)
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300, env=env)


def _report_lines(text: str) -> List[str]:
    """The lines of a ptrbridge report worth showing: what happened, where, and the summary."""
    keep = ("ptrbridge:", "SUMMARY:", "ERROR:", "portability", "#0 ", "lent to ", "released ", "WRITE ", "READ ",
            "C kept", "checked ")
    return [line.strip() for line in text.splitlines() if line.lstrip().startswith(keep)]


@_section
def sanitizer(c: Any) -> None:
    """The sanitizer: unchanged programs with pointer bugs, run under `python -m ptrbridge run`."""
    from . import demo_programs

    for name, what in (("gather.py", "writev() of an iovec whose bases were freed before the call"),
                       ("stdio_buffer.py", "setvbuf() keeps a temporary buffer; the next fputs() writes "
                                           "into it")):
        program = demo_programs.path(name)
        print(f"  {name}: {what}")
        plain = _run_program([program])
        shown = (plain.stdout.strip().splitlines() or [""])[-1]
        print(f"    plainly: exit status {plain.returncode}; it printed {shown!r}")
        checked = _run_program(["-m", "ptrbridge", "run", "--", sys.executable, program])
        print(f"    under `python -m ptrbridge run -- python {name}`: exit status {checked.returncode}; "
              "the report:")
        for line in _report_lines(checked.stdout + checked.stderr):
            print(f"      {line}")
    fixed = _run_program(["-m", "ptrbridge", "run", "--", sys.executable, demo_programs.path("gather_fixed.py")])
    print(f"  gather_fixed.py, the correct twin (the buffers live as long as the iovec): exit status "
          f"{fixed.returncode}, {fixed.stdout.strip()!r}")
    for line in _report_lines(fixed.stderr):
        if line.startswith("SUMMARY:"):
            print(f"      {line}")


@_section
def handles(c: Any) -> None:
    """Handles: a token C may keep; stale and forged tokens are refused."""
    request = {"id": 7, "payload": "hello"}
    h = ptrbridge.Handle(request)
    token = int(h)
    print(f"  Handle(request) -> token {token:#x} (what C stores as userdata)")
    print(f"  handle_value(token) -> {ptrbridge.handle_value(token)}")
    rc = c.pb_handle_release(token)  # what C does when it is done, from any thread
    print(f"  C calls pb_handle_release(token) -> {rc} (PB_OK); object dropped on the next collect: "
          f"{ptrbridge.collect()} dropped")
    _show_error("handle_value(token) after C released it", lambda: ptrbridge.handle_value(token))
    _show_error("handle_value(12345), a forged token", lambda: ptrbridge.handle_value(12345))
    table = ptrbridge.HandleTable(max_handles=3)
    kept = [table.new(i) for i in range(3)]
    _show_error("a 4th handle in HandleTable(max_handles=3) (C never signalled completion)",
                lambda: table.new(3))
    for k in kept:
        k.delete()


@_section
def pinning(c: Any) -> None:
    """Pinning: a buffer C holds stays put and cannot be resized."""
    data = bytearray(b"streaming input")
    with ptrbridge.Pinner() as p:
        ptr = p.pin(data)
        print(f"  Pinner.pin(bytearray(15)) -> {ptr}; live_pins={ptrbridge.stats().live_pins}")
        _show_error("bytearray.extend() while C holds the pointer", lambda: data.extend(b"!"))
    data.extend(b"!")
    print(f"  after unpin the bytearray can grow again: {bytes(data)!r}")
    _show_error("Pinner.pin(42)", lambda: ptrbridge.Pinner().pin(42))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        forgotten = ptrbridge.Pinner()
        forgotten.pin(bytearray(16))
        del forgotten
        gc.collect()
    for w in caught:
        print(f"  a Pinner dropped with pins held warns:\n    -> {w.category.__name__}: {w.message}")


@_section
def c_memory(c: Any) -> None:
    """malloc-copy: C-heap copies with ownership transfer."""
    before = ptrbridge.stats()
    buf = ptrbridge.CBuffer.copy(b"payload for a background thread")
    view = memoryview(buf)
    view[0:7] = b"PAYLOAD"
    print(f"  CBuffer.copy(...) -> {buf!r}; memoryview writes through: {buf.to_bytes()[:7]!r}")
    view.release()
    raw = buf.transfer()
    print(f"  buf.transfer() -> {raw}; transferred={ptrbridge.stats().transferred}")
    _show_error("buf.to_bytes() after transfer", buf.to_bytes)
    rc = c.pb_free(raw)  # what a C delivery callback does
    print(f"  C frees it with pb_free() -> {rc}; transferred={ptrbridge.stats().transferred}")
    _show_error("ptrbridge.free() of the same pointer again", lambda: ptrbridge.free(raw))
    name = ptrbridge.cstring("héllo")
    print(f"  cstring('héllo') -> {name.to_bytes()!r} ({len(name)} bytes with the NUL)")
    del name
    after = ptrbridge.stats()
    print(f"  C memory: {after.allocations - before.allocations} allocations, "
          f"{after.frees - before.frees} frees, live_blocks back to {after.live_blocks}")


@_section
def rules(c: Any) -> None:
    """Checked calls: each pointer rule broken, then the fixed version running clean."""
    import ctypes
    import os

    ffi = cffi.FFI()
    ffi.cdef("""
        struct iovec { void *iov_base; size_t iov_len; };
        ssize_t writev(int fd, const struct iovec *iov, int iovcnt);
        size_t strlen(const char *s);
        int close(int fd);
    """)
    libc = ptrbridge.wrap(ffi.dlopen(None), errcheck={"writev": "negative", "close": "negative"},
                          use_errno=True)
    read_end, write_end = os.pipe()
    try:
        parts = [bytearray(b"hello "), bytearray(b"world")]
        iov = ffi.new("struct iovec[2]")
        for i, part in enumerate(parts):
            iov[i].iov_base = ffi.from_buffer(part)
            iov[i].iov_len = len(part)
        print("  R1: an iovec[] whose iov_base fields point at unpinned bytearrays")
        _show_error("libc.writev(fd, iov, 2)", lambda: libc.writev(write_end, iov, 2))
        with ptrbridge.Pinner() as pinner:
            for i, part in enumerate(parts):
                iov[i].iov_base = pinner.pin(part)
            n = libc.writev(write_end, iov, 2)
            print(f"  fixed by pinning the bytearrays: writev wrote {n} bytes, "
                  f"the pipe holds {os.read(read_end, 64)!r}")
    finally:
        os.close(read_end)
        os.close(write_end)

    class TM(ctypes.Structure):  # glibc's struct tm; strftime("%Z") reads tm_zone
        _fields_: ClassVar[List[Tuple[str, Any]]] = [
            (name, ctypes.c_int) for name in
            ("tm_sec", "tm_min", "tm_hour", "tm_mday", "tm_mon", "tm_year", "tm_wday", "tm_yday", "tm_isdst")
        ] + [("tm_gmtoff", ctypes.c_long), ("tm_zone", ctypes.c_char_p)]

    crt = ctypes.CDLL(None)
    crt.strftime.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.POINTER(TM)]
    crt.strftime.restype = ctypes.c_size_t
    ct = ptrbridge.wrap(crt)
    tm = TM(tm_hour=12, tm_mday=1, tm_year=126, tm_zone=b"XYZ")
    out = ctypes.create_string_buffer(32)
    print("  R1 with ctypes: a struct tm whose tm_zone (a c_char_p) holds an unpinned bytes")
    _show_error('strftime(out, 32, b"%H:%M %Z", byref(tm))',
                lambda: ct.strftime(out, 32, b"%H:%M %Z", ctypes.byref(tm)))
    zone = ptrbridge.cstring("XYZ")
    tm.tm_zone = ctypes.cast(zone.address, ctypes.c_char_p)
    n = ct.strftime(out, 32, b"%H:%M %Z", ctypes.byref(tm))
    print(f"  fixed by copying the zone name to C memory with cstring(): strftime wrote {n} bytes, "
          f"{out.value!r} (it read tm_zone)")
    del zone

    print("  use after free: a pointer kept after its ptrbridge.new owner was freed")
    owner = ptrbridge.new("char[]", b"temporary")
    dangling = ffi.cast("char *", owner)
    del owner
    _show_error("libc.strlen(dangling)", lambda: libc.strlen(dangling))
    owner = ptrbridge.new("char[]", b"kept alive")
    print(f"  fixed by keeping the owner alive: strlen -> {libc.strlen(ffi.cast('char *', owner))}")

    print("  error conventions: errno read right after the call")
    _show_error("libc.close(-1) declared errcheck='negative', use_errno=True", lambda: libc.close(-1))
    span = ptrbridge.Span(bytearray(16))
    print(f"  Span: bounds-checked pointers: {span!r}")
    _show_error("span[8:32]", lambda: span[8:32])
    span.release()
    with ptrbridge.checking(0):
        print(f"  at check level 0 a wrapped function is the raw one: "
              f"{libc.strlen is ptrbridge.unwrap(libc).strlen}")


@_section
def callbacks_and_time(c: Any) -> None:
    """Callbacks (exceptions across C, released callbacks, R4) and R3 (a call that never returns)."""
    import os
    import sys
    import threading

    from . import calls

    ffi = cffi.FFI()
    ffi.cdef("""
        void qsort(void *base, size_t n, size_t size, int (*cmp)(const void *, const void *));
        ssize_t read(int fd, void *buf, size_t n);
    """)
    libc = ptrbridge.wrap(ffi.dlopen(None))
    numbers = ffi.new("int[4]", [3, 1, 4, 1])

    def compare(a: Any, b: Any) -> int:
        x, y = ffi.cast("int *", a)[0], ffi.cast("int *", b)[0]
        if x == 4:
            raise ValueError("the comparator found a 4")
        return (x > y) - (x < y)

    cmp = ptrbridge.callback(ffi, "int(const void *, const void *)", compare, error=0)
    _show_error("qsort() whose Python comparator raises (C got 0, the call re-raises)",
                lambda: libc.qsort(numbers, 4, 4, cmp.cdata))
    cmp.release()
    _show_error("qsort() through the released comparator (no crash)",
                lambda: libc.qsort(numbers, 4, 4, cmp.cdata))
    with ptrbridge.callback(ffi, "int(const void *, const void *)",
                            lambda a, b: ffi.cast("int *", a)[0] - ffi.cast("int *", b)[0]) as good:
        libc.qsort(numbers, 4, 4, good.cdata)
    print(f"  a comparator that does not raise sorts: {list(numbers)}")

    # R4: a thread's start routine returns its result to C (pthread_join).
    ffi.cdef("""
        typedef unsigned long pthread_t;
        int pthread_create(pthread_t *thread, void *attr, void *(*start)(void *), void *arg);
        int pthread_join(pthread_t thread, void **result);
    """)
    reports = []
    old_hook = sys.unraisablehook
    sys.unraisablehook = lambda report: reports.append(report.exc_value)
    try:
        for label, make in (("a temporary ffi.new", lambda: ffi.new("char[]", b"result")),
                            ("a cstring (C memory)", lambda: ptrbridge.cstring("result"))):
            kept: List[Any] = []

            def start(arg: Any, make: Any = make, kept: List[Any] = kept) -> Any:
                value = make()
                kept.append(value)
                return value.ptr if isinstance(value, ptrbridge.CBuffer) else value

            with ptrbridge.callback(ffi, "void *(void *)", start) as routine:
                thread = ffi.new("pthread_t *")
                out = ffi.new("void **")
                libc.pthread_create(thread, ffi.NULL, routine.cdata, ffi.NULL)
                libc.pthread_join(thread[0], out)
            got = ffi.string(ffi.cast("char *", out[0])) if out[0] != ffi.NULL else None
            print(f"  R4: a thread start routine returns {label}: C got {got!r}")
            for exc in reports:
                print(f"    -> {type(exc).__name__}: {exc}")
            reports.clear()
    finally:
        sys.unraisablehook = old_hook

    read_end, write_end = os.pipe()
    reported = threading.Event()
    def show(message: str) -> None:
        print(f"  R3 watchdog:\n    -> {message}")
        reported.set()

    calls.timeout_listeners.append(show)
    old = ptrbridge.set_call_timeout(0.2)
    buf = bytearray(16)
    try:
        print("  R3: read() blocks on an empty pipe holding a lent bytearray (timeout 0.2 s)")
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ptrbridge.CallTimeoutWarning)
            reader = threading.Thread(target=lambda: libc.read(read_end, ffi.from_buffer(buf), 16))
            reader.start()
            reported.wait(10)
            os.write(write_end, b"unblocked")
            reader.join()
        print(f"  the call returned once data arrived: {bytes(buf[:9])!r}")
    finally:
        calls.timeout_listeners.pop()
        ptrbridge.set_call_timeout(old)
        os.close(read_end)
        os.close(write_end)


_ZLIB_CDEF = """
    typedef struct {
        const unsigned char *next_in; unsigned int avail_in; unsigned long total_in;
        unsigned char *next_out; unsigned int avail_out; unsigned long total_out;
        const char *msg; void *state;
        void *(*zalloc)(void *, unsigned int, unsigned int); void (*zfree)(void *, void *);
        void *opaque; int data_type; unsigned long adler; unsigned long reserved;
    } z_stream;
    const char *zlibVersion(void);
    int deflateInit_(z_stream *strm, int level, const char *version, int stream_size);
    int deflate(z_stream *strm, int flush);
    int deflateEnd(z_stream *strm);
"""


@_section
def retained(c: Any) -> None:
    """Level 2: finding the pointer C kept (R2) - zlib's next_in into a temporary."""
    import os

    ffi = cffi.FFI()
    ffi.cdef(_ZLIB_CDEF)
    raw = ffi.dlopen("libz.so.1")
    z = ptrbridge.wrap(raw, errcheck={"deflateInit_": "nonzero"})
    zs = ptrbridge.cnew("z_stream *", ffi=ffi)          # the stream in tracked C memory
    ptrbridge.c_allocator().use_for_zlib(zs.c)           # zlib's own state too
    z.deflateInit_(zs.c, 6, raw.zlibVersion(), ffi.sizeof("z_stream"))
    out = ptrbridge.CBuffer(4096)
    print(f"  z_stream and zlib's state are tracked: {ptrbridge.stats().live_blocks} live C blocks")

    def step(chunk: bytes) -> None:
        zs.c.next_in = ffi.from_buffer(chunk)            # BUG: zlib keeps next_in after deflate()
        zs.c.avail_in = len(chunk)
        zs.c.next_out = ffi.cast("unsigned char *", out.ptr)
        zs.c.avail_out = len(out)
        z.deflate(zs.c, 0)

    old_batch = ptrbridge.set_scan_batch(1)  # report at the very call
    with ptrbridge.checking(2):
        _show_error("deflate() of a temporary input it cannot take in one call",
                    lambda: step(os.urandom(1 << 18)))
    ptrbridge.set_scan_batch(old_batch)
    zs.c.next_in, zs.c.avail_in = ffi.NULL, 0
    raw.deflateEnd(zs.c)
    zs.free()
    out.free()
    print(f"  after deflateEnd every block is freed again: live_blocks={ptrbridge.stats().live_blocks}")


_QUARANTINE_PROGRAM = """
import cffi, ptrbridge
ffi = cffi.FFI()
ffi.cdef("typedef struct FILE FILE; FILE *fopen(const char *, const char *);"
         "int setvbuf(FILE *, char *, int, size_t); int fputs(const char *, FILE *);")
libc = ptrbridge.wrap(ffi.dlopen(None))
ptrbridge.set_check_level(2)
ptrbridge.set_quarantine(True)
out = libc.fopen(b"/dev/null", b"w")
libc.setvbuf(out, ffi.from_buffer(bytearray(4096)), 0, 4096)  # stdio keeps the buffer (R2)
libc.fputs(b"this write lands in the buffer stdio kept", out)
print("not reached")
"""


@_section
def quarantine(c: Any) -> None:
    """Quarantine: C using a pointer it kept becomes an explained crash (run in a child process)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _QUARANTINE_PROGRAM], capture_output=True, text=True,
                          timeout=60)
    print("  setvbuf() keeps a lent bytearray as the stdio buffer; the next fputs() writes into it")
    report = [line for line in proc.stderr.splitlines() if line.startswith("ptrbridge:")]
    print(f"  child exited with status {proc.returncode} (-11: SIGSEGV) and reported:")
    for line in report:
        print(f"    -> {line}")


@_section
def c_api(c: Any) -> None:
    """The public C API: global pb_* symbols and the pb_api table."""
    api = ptrbridge.c_api()
    block = api.malloc(64)
    print(f"  ffi.dlopen(None).pb_api_version() -> {c.pb_api_version()}; "
          f"c_api().version -> {api.version}")
    print(f"  c_api().malloc(64) -> tracked: pb_alloc_size = {c.pb_alloc_size(block)}, "
          f"live_blocks = {ptrbridge.stats().live_blocks}")
    api.free(block)


def run_demo() -> int:
    """Run every section; return 0."""
    ffi = cffi.FFI()
    ffi.cdef("""
        int pb_handle_release(uintptr_t token);
        int pb_free(void *ptr);
        size_t pb_alloc_size(const void *ptr);
        int pb_api_version(void);
    """)
    c = ffi.dlopen(None)  # the pb_* symbols are global once ptrbridge is imported
    print(f"ptrbridge {ptrbridge.__version__} demo (check level {ptrbridge.check_level()})")
    for section in _sections:
        print(f"\n== {section.__doc__}")
        section(c)
    print(f"\n== Counters\n  {ptrbridge.stats()}")
    return 0
