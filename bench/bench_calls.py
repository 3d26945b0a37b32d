"""Benchmark of checked calls (not a test): python bench/bench_calls.py [--quick] [--profile]

Measures, in one run, the cost of a call through ``ptrbridge.wrap(lib)`` at
check levels 0, 1 and 2 against the raw call, for a cffi out-of-line API-mode
module and for ctypes, both compiled here from bench/clib/calls_bench.c:

  (a)  cb_two_ints(int, int)
  (b)  cb_one_bytes(const char *) called with a bytes object
  (c)  cb_struct4(const struct cb_s4 *): the struct is Python memory
       (ffi.new / a ctypes Structure passed by byref), its 4 pointer fields
       point at 4 CBuffers (tracked C memory)
  (c0) the same struct with its 4 fields NULL
  (cP) the same struct with its 4 fields pointing at pinned bytearrays
  (d)  cb_iov(const struct iovec *, int) with an iovec[16] (Python memory)
       whose bases point at 16 pinned bytearrays

Method: every variant is a ``timeit`` statement written as a caller writes
it (``lib.cb_two_ints(1, 2)`` / ``wrapped.cb_two_ints(1, 2)``), so the
attribute lookup is included on both sides.  Each round visits the levels in
a rotating order and times every variant once per level (interleaved, so
noise on this 2-core machine hits all variants alike); the empty timeit loop
is measured the same way and subtracted.  Ratios use the minimum over rounds;
the median is printed to show the spread.  The raw baselines are the level-0
measurements (level 2 installs allocator hooks that slow every allocation,
raw calls included: that is shown separately).

Targets (issue 12), each binding against its own raw call: level 0 <= 1.05x
for every case; level 1 <= 1.3x for (a) and (b) with cffi, <= 1.5x with
ctypes, <= 3x for (c), <= 4x for (d); level 2 <= 3x for (b) and <= 8x for (d).

Then the same for instrumentation (``ptrbridge.instrument()``, no source
change): libc's ``abs`` and ``strlen`` through ``ffi.dlopen`` and
``ctypes.CDLL``, and, if brotlicffi can be imported (``--brotli-site DIR``
adds a directory, e.g. the one bench/bench_suites.py installs it into),
``brotlicffi.compress`` / ``decompress`` of 4 KiB: raw (uninstrumented) and
instrumented at level 1, interleaved by turning instrumentation on and off
every round.  Every verdict is also printed as one ``SUMMARY`` line for
bench/run_all.py.

--profile adds a breakdown of level 1 for (a), (b), (c) (cffi and ctypes):
the pieces of ptrbridge's code path timed separately, and per-call counts of
the Python and builtin functions each checked call runs (cProfile).
"""
from __future__ import annotations

import argparse
import cProfile
import ctypes
import importlib
import importlib.util
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Dict, List, Optional, Tuple

import cffi

import ptrbridge
from ptrbridge import heapmap, levels, ownership, quarantine
from ptrbridge._bindings import lib as pb_lib

# ptrbridge.checking and ptrbridge.calls are shadowed by the package's functions of those names
pb_calls = importlib.import_module("ptrbridge.calls")
pb_checking = importlib.import_module("ptrbridge.checking")
from ptrbridge._bindings import address_of

HERE = Path(__file__).resolve().parent
CLIB = HERE / "clib"
C_SOURCE = CLIB / "calls_bench.c"

CDEF = """
    struct cb_s4 { char *a; char *b; char *c; char *d; };
    struct iovec { void *iov_base; size_t iov_len; ...; };
    int cb_two_ints(int a, int b);
    int cb_one_bytes(const char *p);
    int cb_struct4(const struct cb_s4 *s);
    int cb_iov(const struct iovec *v, int n);
"""
NIOV = 16


class S4(ctypes.Structure):
    _fields_ = [(n, ctypes.POINTER(ctypes.c_char)) for n in "abcd"]


class Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


# ---------------------------------------------------------------------------
# Building the C side


def build(tmp: Path) -> Tuple[ModuleType, ctypes.CDLL]:
    """The cffi API-mode module and the ctypes library, from the same C file."""
    so = tmp / "libcalls_bench.so"
    subprocess.run(["gcc", "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-fPIC", "-shared",
                    f"-I{CLIB}", str(C_SOURCE), "-o", str(so)], check=True, capture_output=True, text=True)
    builder = cffi.FFI()
    builder.cdef(CDEF)
    builder.set_source("_calls_bench_cffi", '#include "calls_bench.h"', sources=[str(C_SOURCE)],
                       include_dirs=[str(CLIB)], extra_compile_args=["-std=c11", "-O2"])
    module_so = builder.compile(tmpdir=str(tmp))
    spec = importlib.util.spec_from_file_location("_calls_bench_cffi", module_so)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    clib = ctypes.CDLL(str(so))
    clib.cb_two_ints.argtypes = [ctypes.c_int, ctypes.c_int]
    clib.cb_one_bytes.argtypes = [ctypes.c_char_p]
    clib.cb_struct4.argtypes = [ctypes.POINTER(S4)]
    clib.cb_iov.argtypes = [ctypes.POINTER(Iovec), ctypes.c_int]
    for name in ("cb_two_ints", "cb_one_bytes", "cb_struct4", "cb_iov"):
        getattr(clib, name).restype = ctypes.c_int
    return module, clib


# ---------------------------------------------------------------------------
# The cases


class Fixture:
    """Libraries, wrapped libraries and the argument objects of every case."""

    def __init__(self, module: ModuleType, clib: ctypes.CDLL) -> None:
        ffi = self.ffi = module.ffi
        self.lib = module.lib
        self.clib = clib
        self.wlib = ptrbridge.wrap(module.lib)
        self.wclib = ptrbridge.wrap(clib)
        self.pinner = ptrbridge.Pinner()
        self.cbufs = [ptrbridge.CBuffer(64) for _ in range(4)]
        self.payload = b"payload"

        def cptr(address: int) -> Any:
            return ctypes.cast(address, ctypes.POINTER(ctypes.c_char))

        # (c) fields -> CBuffer memory
        self.s_c = ffi.new("struct cb_s4 *")
        self.s_c.a, self.s_c.b, self.s_c.c, self.s_c.d = [b.ptr for b in self.cbufs]
        self.cs_c = S4(*(cptr(b.address) for b in self.cbufs))
        # (c0) NULL fields
        self.s_0 = ffi.new("struct cb_s4 *")
        self.cs_0 = S4()
        # (cP) fields -> pinned bytearrays
        self.pinned4 = [bytearray(64) for _ in range(4)]
        ptrs = [self.pinner.pin(b) for b in self.pinned4]
        self.s_p = ffi.new("struct cb_s4 *")
        self.s_p.a, self.s_p.b, self.s_p.c, self.s_p.d = ptrs
        self.cs_p = S4(*(cptr(address_of(p)) for p in ptrs))
        # (d) iovec[16] -> pinned bytearrays
        self.bufs = [bytearray(256) for _ in range(NIOV)]
        self.iov = ffi.new(f"struct iovec[{NIOV}]")
        self.civ = (Iovec * NIOV)()
        for i, b in enumerate(self.bufs):
            p = self.pinner.pin(b)
            self.iov[i].iov_base = p
            self.iov[i].iov_len = len(b)
            self.civ[i].iov_base = address_of(p)
            self.civ[i].iov_len = len(b)
        self.check_results()

    def check_results(self) -> None:
        """The calls do what they should (and the wrapped ones accept these arguments)."""
        for level in (0, 1, 2):
            with ptrbridge.checking(level):
                for L, W in ((self.lib, self.wlib), (self.clib, self.wclib)):
                    assert L.cb_two_ints(1, 2) == W.cb_two_ints(1, 2) == 3
                    assert L.cb_one_bytes(self.payload) == W.cb_one_bytes(self.payload) == ord("p")
                assert self.wlib.cb_struct4(self.s_c) == self.wclib.cb_struct4(ctypes.byref(self.cs_c)) == 4
                assert self.wlib.cb_struct4(self.s_0) == self.wclib.cb_struct4(ctypes.byref(self.cs_0)) == 0
                assert self.wlib.cb_struct4(self.s_p) == self.wclib.cb_struct4(ctypes.byref(self.cs_p)) == 4
                assert self.wlib.cb_iov(self.iov, NIOV) == self.wclib.cb_iov(self.civ, NIOV) == NIOV * 257

    def cases(self) -> List[Tuple[str, str, Dict[str, Tuple[str, Dict[str, Any]]]]]:
        """(key, title, {binding: (statement, names)}); the statement calls ``L.<fn>``."""
        byref = ctypes.byref
        return [
            ("a", "(a)  two int arguments", {
                "cffi": ("L.cb_two_ints(1, 2)", {}),
                "ctypes": ("L.cb_two_ints(1, 2)", {})}),
            ("b", "(b)  one bytes argument (const char *)", {
                "cffi": ("L.cb_one_bytes(p)", {"p": self.payload}),
                "ctypes": ("L.cb_one_bytes(p)", {"p": self.payload})}),
            ("c", "(c)  struct, 4 pointer fields -> CBuffer (C) memory", {
                "cffi": ("L.cb_struct4(s)", {"s": self.s_c}),
                "ctypes": ("L.cb_struct4(byref(s))", {"s": self.cs_c, "byref": byref})}),
            ("c0", "(c0) struct, 4 pointer fields NULL", {
                "cffi": ("L.cb_struct4(s)", {"s": self.s_0}),
                "ctypes": ("L.cb_struct4(byref(s))", {"s": self.cs_0, "byref": byref})}),
            ("cP", "(cP) struct, 4 pointer fields -> pinned bytearrays", {
                "cffi": ("L.cb_struct4(s)", {"s": self.s_p}),
                "ctypes": ("L.cb_struct4(byref(s))", {"s": self.cs_p, "byref": byref})}),
            ("d", f"(d)  iovec[{NIOV}], bases -> pinned bytearrays", {
                "cffi": ("L.cb_iov(v, n)", {"v": self.iov, "n": NIOV}),
                "ctypes": ("L.cb_iov(v, n)", {"v": self.civ, "n": NIOV})}),
        ]

    def close(self) -> None:
        levels.set_check_level(1)
        self.pinner.unpin()
        for b in self.cbufs:
            b.free()


# ---------------------------------------------------------------------------
# Timing

Key = Tuple[str, str, str, int]  # case, binding, "raw"/"wrapped", level


def make_timers(fx: Fixture) -> Dict[Key, timeit.Timer]:
    timers: Dict[Key, timeit.Timer] = {}
    libs = {"cffi": (fx.lib, fx.wlib), "ctypes": (fx.clib, fx.wclib)}
    for key, _title, bindings in fx.cases():
        for binding, (stmt, names) in bindings.items():
            raw, wrapped = libs[binding]
            for kind, L in (("raw", raw), ("wrapped", wrapped)):
                for level in (0, 1, 2):
                    timers[(key, binding, kind, level)] = timeit.Timer(stmt, globals={**names, "L": L})
    return timers


def calibrate(timers: Dict[Key, timeit.Timer], block_s: float) -> Dict[Key, int]:
    """Calls per timed block, so that each block lasts about ``block_s``."""
    numbers: Dict[Key, int] = {}
    for level in (0, 1, 2):
        levels.set_check_level(level)
        for key, timer in timers.items():
            if key[3] != level:
                continue
            timer.timeit(200)  # warm up (first access builds the wrapper, level 2 state settles)
            per_call = min(timer.timeit(200) for _ in range(3)) / 200
            numbers[key] = max(200, int(block_s / max(per_call, 1e-9)))
    return numbers


def measure(timers: Dict[Key, timeit.Timer], numbers: Dict[Key, int], rounds: int,
            ) -> Tuple[Dict[Key, List[float]], List[float]]:
    """ns per call of every timer in every round (loop overhead subtracted), and the loop overhead."""
    empty = timeit.Timer("pass")
    empty_number = 2_000_000 // 8
    samples: Dict[Key, List[float]] = {key: [] for key in timers}
    loop: List[float] = []
    orders = [(0, 1, 2), (1, 2, 0), (2, 0, 1)]
    for r in range(rounds):
        loop_ns = empty.timeit(empty_number) / empty_number * 1e9
        loop.append(loop_ns)
        for level in orders[r % 3]:
            levels.set_check_level(level)
            for key, timer in timers.items():
                if key[3] != level:
                    continue
                n = numbers[key]
                samples[key].append(timer.timeit(n) / n * 1e9)
    overhead = min(loop)
    return {k: [max(v - overhead, 0.1) for v in vs] for k, vs in samples.items()}, loop


def target_for(key: str, binding: str, level: int) -> Optional[float]:
    """Issue 12's target for one case, binding and level (a ratio to the same binding's raw call)."""
    if level == 0:
        return 1.05
    if level == 1:
        if key in ("a", "b"):
            return 1.3 if binding == "cffi" else 1.5
        return {"c": 3.0, "d": 4.0}.get(key)
    return {"b": 3.0, "d": 8.0}.get(key)


SUMMARY: List[Tuple[str, str, str, str]] = []  # (measure, result, target, PASS/MISS)


def summarize(measure: str, ratio: float, target: float) -> bool:
    ok = ratio <= target
    SUMMARY.append((measure, f"{ratio:.2f}x", f"<= {target:g}x", "PASS" if ok else "MISS"))
    return ok


def report(fx: Fixture, samples: Dict[Key, List[float]]) -> Tuple[int, int]:
    best = {k: min(v) for k, v in samples.items()}
    med = {k: statistics.median(v) for k, v in samples.items()}
    passed = missed = 0
    head = f"  {'variant':<24}{'min ns':>9}{'med ns':>9}{'x raw cffi':>12}{'x raw ctypes':>14}   target"
    for key, title, bindings in fx.cases():
        raw_cffi = best[(key, "cffi", "raw", 0)]
        raw_ctypes = best[(key, "ctypes", "raw", 0)]
        print(f"\n{title}")
        print(head)
        for binding in ("cffi", "ctypes"):
            k0 = (key, binding, "raw", 0)
            print(f"  {'raw ' + binding:<24}{best[k0]:9.1f}{med[k0]:9.1f}"
                  f"{best[k0] / raw_cffi:11.2f}x{best[k0] / raw_ctypes:13.2f}x")
        for binding in ("cffi", "ctypes"):
            own = raw_cffi if binding == "cffi" else raw_ctypes
            for level in (0, 1, 2):
                k = (key, binding, "wrapped", level)
                ratio = best[k] / own
                target = target_for(key, binding, level)
                against = f"raw {binding}"
                line = (f"  {binding + ' wrapped L' + str(level):<24}{best[k]:9.1f}{med[k]:9.1f}"
                        f"{best[k] / raw_cffi:11.2f}x{best[k] / raw_ctypes:13.2f}x")
                if target is not None:
                    ok = summarize(f"{title.split(')', 1)[0]}) {binding} L{level}", ratio, target)
                    passed += ok
                    missed += not ok
                    line += f"   <= {target:.2f}x {against}: {ratio:.2f}x {'PASS' if ok else 'MISS'}"
                print(line)
        for binding in ("cffi", "ctypes"):
            k0, k2 = (key, binding, "raw", 0), (key, binding, "raw", 2)
            print(f"  (raw {binding} while level 2's allocator hooks are installed: {best[k2]:.1f} ns, "
                  f"{best[k2] / best[k0]:.2f}x its level-0 time)")
    return passed, missed


# ---------------------------------------------------------------------------
# Instrumentation (no source change)


def instrumented_cases(brotli_site: Optional[str]) -> List[Tuple[str, Callable[[], Any], Callable[[], Any], float]]:
    """(title, raw call, instrumented call, target); the instrumented objects are made while on."""
    import os

    libc_ffi = cffi.FFI()
    libc_ffi.cdef("int abs(int); size_t strlen(const char *);")
    raw_c = libc_ffi.dlopen(None)
    raw_ct = ctypes.CDLL(None)
    raw_ct.strlen.argtypes, raw_ct.strlen.restype = [ctypes.c_char_p], ctypes.c_size_t
    brotli: Any = None
    if brotli_site:
        sys.path.insert(0, os.path.abspath(brotli_site))
    try:
        brotli = importlib.import_module("brotlicffi")
    except ImportError:
        brotli = None
    ptrbridge.instrument()
    try:
        inst_c = libc_ffi.dlopen(None)
        inst_ct = ctypes.CDLL(None)
        inst_ct.strlen.argtypes, inst_ct.strlen.restype = [ctypes.c_char_p], ctypes.c_size_t
    finally:
        ptrbridge.uninstrument()
    text = b"x" * 100
    cases: List[Tuple[str, Callable[[], Any], Callable[[], Any], float]] = [
        ("cffi ABI abs(-5)", lambda: raw_c.abs(-5), lambda: inst_c.abs(-5), 1.3),
        ("cffi ABI strlen(bytes)", lambda: raw_c.strlen(text), lambda: inst_c.strlen(text), 1.3),
        ("ctypes abs(-5)", lambda: raw_ct.abs(-5), lambda: inst_ct.abs(-5), 1.5),
        ("ctypes strlen(bytes)", lambda: raw_ct.strlen(text), lambda: inst_ct.strlen(text), 1.5),
    ]
    if brotli is not None:
        data = bytes(range(256)) * 16
        packed = brotli.compress(data)
        assert brotli.decompress(packed) == data
        # brotlicffi reads its module's `lib`, which instrument() replaces: the same call is
        # raw or instrumented depending on the state the round sets.
        cases.append(("brotlicffi.compress(4 KiB)", lambda: brotli.compress(data), lambda: brotli.compress(data), 3.0))
        cases.append(("brotlicffi.decompress(4 KiB)", lambda: brotli.decompress(packed),
                      lambda: brotli.decompress(packed), 3.0))
    return cases


def measure_instrumented(brotli_site: Optional[str], rounds: int, block_s: float) -> None:
    levels.set_check_level(1)
    cases = instrumented_cases(brotli_site)
    numbers = []
    for _title, raw, inst, _target in cases:
        start = time.perf_counter()
        for _ in range(50):
            raw()
        per = max((time.perf_counter() - start) / 50, 1e-8)
        numbers.append(max(50, int(block_s / per)))
    best: Dict[Tuple[int, str], float] = {}

    def timed(fn: Callable[[], Any], n: int) -> float:
        start = time.perf_counter_ns()
        for _ in range(n):
            fn()
        return (time.perf_counter_ns() - start) / n

    for r in range(rounds):
        for state in (("raw", "inst") if r % 2 == 0 else ("inst", "raw")):
            if state == "inst":
                ptrbridge.instrument()
            try:
                for i, (_title, raw, inst, _target) in enumerate(cases):
                    ns = timed(inst if state == "inst" else raw, numbers[i])
                    best[(i, state)] = min(best.get((i, state), float("inf")), ns)
            finally:
                if state == "inst":
                    ptrbridge.uninstrument()
    print("\nInstrumentation (ptrbridge.instrument(), level 1) against the uninstrumented call, "
          f"best of {rounds} interleaved rounds")
    print(f"  {'call':<32}{'raw ns':>10}{'instr. ns':>11}{'ratio':>8}   target")
    for i, (title, _raw, _inst, target) in enumerate(cases):
        raw_ns, inst_ns = best[(i, "raw")], best[(i, "inst")]
        ratio = inst_ns / raw_ns
        ok = summarize(f"instrumented L1 {title}", ratio, target)
        print(f"  {title:<32}{raw_ns:10.1f}{inst_ns:11.1f}{ratio:7.2f}x   <= {target:g}x {'PASS' if ok else 'MISS'}")


# ---------------------------------------------------------------------------
# Level-1 breakdown (--profile)


def closure_of(fn: Callable[..., Any]) -> Dict[str, Any]:
    """The closure variables of a checked function (cffi: the function; ctypes: its ``__call__``)."""
    if not hasattr(fn, "__code__") and not hasattr(fn, "_ptrbridge_slow"):
        fn = type(fn).__dict__["__call__"].__func__  # a ctypes CheckedFunction: a _FuncPtr whose __call__ is it
    fn = getattr(fn, "_ptrbridge_slow", fn)  # the C fast path (csrc/pycall.c): its Python closure
    return {name: cell.cell_contents
            for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ())}


def profile_level1(fx: Fixture, number: int, passes: int) -> None:
    levels.set_check_level(1)
    ffi = fx.ffi
    CallCheck = pb_checking.CallCheck
    frame = sys._getframe()
    # a thunk that sits where `checked` sits: two frames above CallCheck's caller
    base = {"sys": sys, "CallCheck": CallCheck, "F": frame, "ffi": ffi, "lib": fx.lib, "clib": fx.clib,
            "W": fx.wlib, "CW": fx.wclib, "lookup": ownership.lookup, "pb_lib": pb_lib,
            "address_of": address_of, "cdata_extent": ownership.cdata_extent,
            "layout_of": pb_checking.layout_of, "has_freed_history": ownership.has_freed_history,
            "find_freed": ownership.find_freed, "byref": ctypes.byref,
            "check_cffi_arg": pb_calls._check_cffi_arg, "check_ctypes_arg": pb_calls._check_ctypes_arg,
            "Owner": pb_checking.Owner, "heapmap": heapmap}

    def show(title: str, rows: List[Tuple[str, float]], total: float, raw: float) -> None:
        print(f"\n{title}")
        print(f"  {'piece':<66}{'ns':>8}{'% of overhead':>15}")
        over = total - raw
        for label, ns in rows:
            share = f"{100 * ns / over:13.0f}%" if over > 0 and not label.startswith(("=", "raw", "checked")) else ""
            print(f"  {label:<66}{ns:8.1f}{share:>15}")

    # pieces() runs the same measurements in the same order on every pass: the i-th
    # measurement of a pass is the i-th timer, and each pass adds one sample to it.
    timers: List[Tuple[str, timeit.Timer, List[float]]] = []
    position = [0]
    empty = timeit.Timer("pass")
    empty_samples: List[float] = []

    def t(stmt: str, **names: Any) -> float:
        """One more sample of ``stmt`` (ns per call); returns the minimum so far."""
        i = position[0]
        position[0] += 1
        if i == len(timers):
            timer = timeit.Timer(stmt, globals={**base, **names})
            timer.timeit(min(number, 1000))
            timers.append((stmt, timer, []))
        assert timers[i][0] == stmt
        timers[i][2].append(timers[i][1].timeit(number) / number * 1e9)
        return min(timers[i][2])

    def n(stmt: str, **names: Any) -> float:  # net of the timeit loop
        return max(t(stmt, **names) - min(empty_samples), 0.0)

    def pieces(show: Callable[[str, List[Tuple[str, float]], float, float], None]) -> None:
        # ---- (a), (b) cffi: callables bound to names (R raw, C checked, F minimal wrappers), so
        # the attribute fetch is measured on its own
        raw2, raw1 = fx.lib.cb_two_ints, fx.lib.cb_one_bytes

        def star2(*args: Any) -> Any:  # the shape of `checked`, nothing else
            return raw2(*args)

        def fixed2(a: Any, b: Any) -> Any:
            return raw2(a, b)

        def star1(*args: Any) -> Any:
            return raw1(*args)

        def fixed1(p: Any) -> Any:
            return raw1(p)

        def fixed1_test(p: Any) -> Any:  # the same type test on a named argument
            if type(p) is not bytes and p is not None:
                raise AssertionError
            return raw1(p)

        for key, name, call, raw_fn, star, fixed, extra in (
            ("a", "cb_two_ints", "(1, 2)", raw2, star2, fixed2, None),
            ("b", "cb_one_bytes", "(p)", raw1, star1, fixed1, fixed1_test),
        ):
            names = dict(R=raw_fn, C=getattr(fx.wlib, name), p=fx.payload)
            total, rawt = n(f"W.{name}{call}", **names), n(f"lib.{name}{call}", **names)
            bound_c, bound_r = n(f"C{call}", **names), n(f"R{call}", **names)
            rows = [
                (f"checked: W.{name}{call}", total),
                (f"raw: lib.{name}{call}", rawt),
                ("= overhead", total - rawt),
                ("  attribute fetch: W.x - lib.x (instance dict behind __getattr__)",
                 n(f"W.{name}", **names) - n(f"lib.{name}", **names)),
                ("  checked(*args) called by name - raw called by name", bound_c - bound_r),
                ("    of which a bare `def f(*args): return raw(*args)`", n(f"F{call}", F=star, **names) - bound_r),
                ("    of which a bare `def f(a, b): return raw(a, b)` would cost" if key == "a" else
                 "    of which a bare `def f(p): return raw(p)` would cost", n(f"F{call}", F=fixed, **names) - bound_r),
                ("    the rest of checked's body (by difference)",
                 bound_c - n(f"F{call}", F=star, **names)),
            ]
            if extra is not None:
                rows.append(("    (`def f(p)` + the bytes/None type test inline would cost)",
                             n(f"F{call}", F=extra, **names) - bound_r))
            body = ("raw(*args); if _deferred: ..." if key == "a" else
                    "level, len and type tests; raw(*args); if _deferred: ...")
            show(f"({key}) cffi {name}{call}, level 1 - checked(*args): {body}", rows, total, rawt)
        # ---- (c) cffi struct with 4 fields -> CBuffer memory
        for label, s in (("fields -> 4 CBuffers (C memory)", fx.s_c), ("fields -> 4 pinned bytearrays", fx.s_p),
                         ("fields NULL", fx.s_0)):
            fn = fx.wlib.cb_struct4
            cells = closure_of(fn)
            check_args = cells["check_args"]
            param = dict(closure_of(check_args)["plan"])[0]
            ctype = ffi.typeof(s)
            item = ctype.item
            layout = pb_checking.layout_of(item)
            addr = address_of(s)
            values = layout.read_array(addr, 1)
            live = [v for v in values if v]
            cc = CallCheck("cb_struct4", frame, (s,))
            names = dict(s=s, A=(s,), check_args=check_args, param=param, item=item, layout=layout, addr=addr,
                         cc=cc, v=live[0] if live else 0)
            total, rawt = n("W.cb_struct4(s)", **names), n("lib.cb_struct4(s)", **names)
            t_args = n("check_args(A)", **names)
            t_cc = n("CallCheck('cb_struct4', sys._getframe(0), A)", **names)
            t_arg = n("check_cffi_arg(CallCheck('cb_struct4', F, A), 1, s, param, [])", **names) - t_cc
            t_walk = n("CallCheck('cb_struct4', F, A).walk(1, addr, item, 1, 'Python')", **names) - t_cc
            t_typeof = n("ffi.typeof(s).kind", **names)
            t_extent = n("cdata_extent(s)", **names)
            t_addr = n("address_of(s)", **names)
            t_sizeof = n("ffi.sizeof(item)", **names)
            t_layout = n("layout_of(item)", **names)
            t_read = n("layout.read_array(addr, 1)", **names)
            rows = [
                ("checked: W.cb_struct4(s)", total),
                ("raw: lib.cb_struct4(s)", rawt),
                ("= overhead", total - rawt),
                ("  wrapper: frame, *args, level tests, _deferred (overhead - check_args)", total - rawt - t_args),
                ("  check_args(args)", t_args),
                ("    its own loop (by difference)", t_args - t_cc - t_arg),
                ("    CallCheck(name, sys._getframe(2), args)  [incl. _getframe, set()]", t_cc),
                ("    _check_cffi_arg(...)  (without CallCheck)", t_arg),
                ("      its own code: isinstance, kind tests, arithmetic (by difference)",
                 t_arg - t_typeof - t_extent - t_addr - t_sizeof - t_layout - t_walk),
                ("      ffi.typeof(arg).kind", t_typeof),
                ("      cdata_extent(arg)  [isinstance, typeof, address_of, sizeof]", t_extent),
                ("      address_of(arg) again  [int(ffi.cast('uintptr_t', p))]", t_addr),
                ("      ffi.sizeof(item) + layout_of(item)", t_sizeof + t_layout),
                ("      check.walk(1, address, item, 1, 'Python')", t_walk),
                ("        layout.read_array(address, 1)  [cast + ffi.buffer + unpack]", t_read),
            ]
            if live:
                pinned = fx.pinner.is_pinned(fx.pinned4[0]) and s is fx.s_p
                t_classify = n("cc.classify(v)", **names)
                t_lookup = n("lookup(v)", **names)
                t_lookup_c = n("pb_lib.pb__region_lookup(v)", **names)
                t_block = n("pb_lib.pb__alloc_block_size(v)", **names)
                t_fh = n("has_freed_history()", **names)
                t_owner = n("Owner(1, 2, 'x', True, 'pinned at x.py:1')", **names)
                k = len(live)
                per_value = t_classify + (0.0 if pinned else t_fh)
                rows += [
                    ("        walk's own code: layout_of, visited set, loop (by difference)",
                     t_walk - t_read - k * per_value),
                    (f"        classify(value) x {k}" + ("" if pinned else " + has_freed_history() x 4"),
                     k * per_value),
                    ("          per value: classify(value)", t_classify),
                ]
                if pinned:
                    rows += [
                        ("            ownership.lookup(value): hit, a pinned region", t_lookup),
                        ("              lib.pb__region_lookup(value) (the C call alone)", t_lookup_c),
                        ("            Owner(...) frozen-dataclass construction", t_owner),
                        ("            rest: kind test, f-string origin (by difference)", t_classify - t_lookup - t_owner),
                    ]
                else:
                    rows += [
                        ("            ownership.lookup(value) + lookup(value - 1): misses", 2 * t_lookup),
                        ("              lib.pb__region_lookup(value) x 2 (the C calls alone)", 2 * t_lookup_c),
                        ("            lib.pb__alloc_block_size(value) (C call): a CBuffer block", t_block),
                        ("            rest (by difference)", t_classify - 2 * t_lookup - t_block),
                        ("          per value: has_freed_history()", t_fh),
                    ]
            else:
                rows.append(("        walk's own code: layout_of, visited set, loop over 4 NULLs (by difference)",
                             t_walk - t_read))
            show(f"(c) cffi cb_struct4(s), {label}, level 1", rows, total, rawt)

        # ---- ctypes: (a), (b), (c)
        fn = fx.wclib.cb_two_ints
        cells = closure_of(fn)
        check_args = cells["check_args"]
        total, rawt = n("CW.cb_two_ints(1, 2)"), n("clib.cb_two_ints(1, 2)")
        show("(a) ctypes cb_two_ints(1, 2), level 1 (generic path: check_args walks every argument)", [
            ("checked: CW.cb_two_ints(1, 2)", total),
            ("raw: clib.cb_two_ints(1, 2)", rawt),
            ("= overhead", total - rawt),
            ("  check_args((1, 2))", n("check_args(A)", check_args=check_args, A=(1, 2))),
            ("    has_freed_history() (called once per nonzero int argument)", n("has_freed_history()")),
            ("  wrapper frame, *args, level tests, _deferred (overhead - check_args)",
             total - rawt - n("check_args(A)", check_args=check_args, A=(1, 2))),
        ], total, rawt)
        fn = fx.wclib.cb_one_bytes
        check_args = closure_of(fn)["check_args"]
        total, rawt = n("CW.cb_one_bytes(p)", p=fx.payload), n("clib.cb_one_bytes(p)", p=fx.payload)
        t_args = n("check_args(A)", check_args=check_args, A=(fx.payload,))
        t_cc = n("CallCheck('cb_one_bytes', sys._getframe(0), A)", A=(fx.payload,))
        show("(b) ctypes cb_one_bytes(b'payload'), level 1", [
            ("checked: CW.cb_one_bytes(p)", total),
            ("raw: clib.cb_one_bytes(p)", rawt),
            ("= overhead", total - rawt),
            ("  check_args((p,))", t_args),
            ("    CallCheck(...) (built for a bytes argument)", t_cc),
            ("    _check_ctypes_arg(...) (isinstance chain, lent.append)",
             n("check_ctypes_arg(CallCheck('x', F, A), 1, p, [])", A=(fx.payload,), p=fx.payload) - t_cc),
            ("  wrapper frame, *args, level tests, _deferred (overhead - check_args)", total - rawt - t_args),
        ], total, rawt)
        fn = fx.wclib.cb_struct4
        check_args = closure_of(fn)["check_args"]
        for label, s in (("fields -> 4 CBuffers (C memory)", fx.cs_c), ("fields -> 4 pinned bytearrays", fx.cs_p)):
            names = dict(s=s, check_args=check_args)
            total, rawt = n("CW.cb_struct4(byref(s))", **names), n("clib.cb_struct4(byref(s))", **names)
            t_args = n("check_args((byref(s),))", **names) - n("(byref(s),)", **names)
            t_cc = n("CallCheck('cb_struct4', sys._getframe(0), A)", A=(ctypes.byref(s),))
            t_walk = n("CallCheck('x', F, A).walk(1, ctypes.addressof(s), S4, 1, 'Python')",
                       A=(ctypes.byref(s),), ctypes=ctypes, S4=S4, s=s) - t_cc
            show(f"(c) ctypes cb_struct4(byref(s)), {label}, level 1", [
                ("checked: CW.cb_struct4(byref(s))", total),
                ("raw: clib.cb_struct4(byref(s))", rawt),
                ("= overhead", total - rawt),
                ("  check_args((byref(s),))", t_args),
                ("    CallCheck(...)", t_cc),
                ("    check.walk(...) (4 classify calls, as for cffi)", t_walk),
                ("    rest of _check_ctypes_arg (isinstance chain, addressof)", t_args - t_cc - t_walk),
                ("  wrapper frame, *args, level tests, _deferred (overhead - check_args)", total - rawt - t_args),
            ], total, rawt)

    # Every pass takes one sample of every piece, interleaved; the last pass prints the minima.
    for i in range(passes):
        position[0] = 0
        empty_samples.append(empty.timeit(number * 4) / (number * 4) * 1e9)
        pieces(show if i == passes - 1 else (lambda *_args: None))

    # ---- cProfile: functions run per checked call
    print("\ncProfile, level 1: calls per checked call and own time (cProfile inflates small functions;"
          " read the counts, and the time only as a ranking)")
    calls_n = 20_000
    for title, stmt, names in (
        ("(b) cffi  W.cb_one_bytes(p)", "W.cb_one_bytes(p)", {"p": fx.payload}),
        ("(c) cffi  W.cb_struct4(s), fields -> CBuffers", "W.cb_struct4(s)", {"s": fx.s_c}),
        ("(cP) cffi W.cb_struct4(s), fields -> pinned", "W.cb_struct4(s)", {"s": fx.s_p}),
        ("(b) ctypes CW.cb_one_bytes(p)", "CW.cb_one_bytes(p)", {"p": fx.payload}),
        ("(b) cffi  W.cb_one_bytes(p) AT LEVEL 2 (for comparison)", "W.cb_one_bytes(p)", {"p": fx.payload}),
    ):
        levels.set_check_level(2 if "LEVEL 2" in title else 1)
        code = compile(f"for _ in range({calls_n}):\n    {stmt}\n", "<bench>", "exec")
        glb = {**base, **names}
        prof = cProfile.Profile()
        prof.enable()
        exec(code, glb)
        prof.disable()
        st = pstats.Stats(prof)
        entries = []
        for (filename, line, func), (cc, nc, tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
            where = f"{Path(filename).name}:{line}" if filename != "~" else "builtin"
            entries.append((tt, nc / calls_n, f"{func} ({where})"))
        entries.sort(reverse=True)
        count = sum(e[1] for e in entries)
        print(f"\n  {title}: {count:.0f} function calls per checked call")
        levels.set_check_level(1)
        for tt, per, label in entries[:12]:
            print(f"    {per:5.1f}/call {tt / calls_n * 1e9:8.0f} ns  {label[:90]}")


# ---------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 rounds of ~2 ms blocks (~2 s; ~8 s with --profile) instead of 21 of ~10 ms (~20 s)")
    parser.add_argument("--profile", action="store_true", help="add the level-1 breakdown")
    parser.add_argument("--brotli-site", default=None,
                        help="a directory to import brotlicffi from (default: only if importable)")
    opts = parser.parse_args()
    rounds, block_s = (5, 0.002) if opts.quick else (21, 0.010)
    started = time.perf_counter()
    initial = levels.check_level()
    with tempfile.TemporaryDirectory(prefix="bench_calls_") as tmp:
        module, clib = build(Path(tmp))
        fx = Fixture(module, clib)
        try:
            timers = make_timers(fx)
            numbers = calibrate(timers, block_s)
            samples, loop = measure(timers, numbers, rounds)
            print(f"ptrbridge {ptrbridge.__version__}, Python {sys.version.split()[0]}, cffi {cffi.__version__}; "
                  f"quarantine {'on' if quarantine.quarantine_enabled() else 'off'}")
            print(f"ns per call: min and median of {rounds} interleaved rounds of ~{block_s * 1e3:.0f} ms "
                  f"per variant, net of the empty timeit loop ({min(loop):.1f} ns); ratios from the minima; "
                  f"raw = level-0 measurement")
            print("level 2 = heap map (PyMem allocator hooks) + lending registry + adaptive retention "
                  "scans (it is implemented in this tree)")
            passed, missed = report(fx, samples)
            measure_instrumented(opts.brotli_site, rounds, block_s)
            passed = sum(row[3] == "PASS" for row in SUMMARY)
            missed = len(SUMMARY) - passed
            print(f"\ntargets: {passed} PASS, {missed} MISS")
            for what, result, target, mark in SUMMARY:
                print(f"SUMMARY: {what}: {result} (target {target}) {mark}")
            if opts.profile:
                profile_level1(fx, 20_000 if opts.quick else 40_000, 3 if opts.quick else 5)
        finally:
            fx.close()
            levels.set_check_level(initial)
    print(f"\n(total {time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    main()
