"""Benchmark of checked calls (not a test): python bench/bench_calls.py [--quick]

Ratios measured in one run against the raw cffi call (API mode, compiled
here) and the raw ctypes call, at check levels 0, 1 and 2, for
  (a) two int arguments,
  (b) one bytes argument (const char *),
  (c) a struct with 4 pointer fields, pointing at C memory (CBuffer) and,
      separately, at pinned Python memory,
  (d) an iovec[16] whose bases point at pinned bytearrays.
Targets: level 0 <= 1.05x raw; level 1 <= 2x raw cffi for (a) and (b).
"""
from __future__ import annotations

import argparse
import ctypes
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict

import cffi

import ptrbridge

sys.path.insert(0, str(Path(__file__).parent))
from timing import best_ns, verdict  # noqa: E402

CDEF = """
    struct s4 { char *a, *b, *c, *d; };
    struct iov { void *base; size_t len; };
    int two_ints(int a, int b);
    int one_bytes(const char *p);
    int struct4(const struct s4 *s);
    int iov16(const struct iov *v, int n);
"""
SOURCE = """
    struct s4 { char *a, *b, *c, *d; };
    struct iov { void *base; size_t len; };
    int two_ints(int a, int b) { return a + b; }
    int one_bytes(const char *p) { return p[0]; }
    int struct4(const struct s4 *s) { return s->a != 0; }
    int iov16(const struct iov *v, int n) { int t = 0; for (int i = 0; i < n; i++) t += (int)v[i].len; return t; }
"""


class S4(ctypes.Structure):
    _fields_ = [(n, ctypes.c_char_p) for n in "abcd"]


class Iov(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def build(tmp: Path) -> Any:
    builder = cffi.FFI()
    builder.cdef(CDEF)
    builder.set_source("_bench_calls", SOURCE)
    so = builder.compile(tmpdir=str(tmp))
    import importlib.util

    spec = importlib.util.spec_from_file_location("_bench_calls", so)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module, so


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    number, rounds = (5_000, 3) if args.quick else (30_000, 7)
    with tempfile.TemporaryDirectory() as tmp:
        module, so = build(Path(tmp))
        ffi, lib = module.ffi, module.lib
        checked = ptrbridge.wrap(lib)
        clib = ctypes.CDLL(str(so))
        clib.one_bytes.argtypes = [ctypes.c_char_p]
        clib.struct4.argtypes = [ctypes.POINTER(S4)]
        clib.iov16.argtypes = [ctypes.POINTER(Iov), ctypes.c_int]
        cchecked = ptrbridge.wrap(clib)
        pinner = ptrbridge.Pinner()
        cmem = ptrbridge.CBuffer(16)
        s_c = ffi.new("struct s4 *")
        s_c.a = s_c.b = s_c.c = s_c.d = ffi.cast("char *", cmem.ptr)
        s_pinned = ffi.new("struct s4 *")
        pinned = [bytearray(16) for _ in range(4)]
        s_pinned.a, s_pinned.b, s_pinned.c, s_pinned.d = [ffi.cast("char *", pinner.pin(b)) for b in pinned]
        bufs = [bytearray(64) for _ in range(16)]
        iov = ffi.new("struct iov[16]")
        for i, b in enumerate(bufs):
            iov[i].base = pinner.pin(b)
            iov[i].len = len(b)
        cs4 = S4(*(ctypes.cast(cmem.address, ctypes.c_char_p) for _ in range(4)))
        civ = (Iov * 16)(*(Iov(ctypes.addressof((ctypes.c_char * 64).from_buffer(b)), 64) for b in bufs))
        payload = b"payload"
        cases: Dict[str, Dict[str, Callable[[], object]]] = {
            "(a) two ints": {"cffi": lambda: lib.two_ints(1, 2), "wrapped": lambda: checked.two_ints(1, 2),
                             "ctypes": lambda: clib.two_ints(1, 2), "ctypes wrapped": lambda: cchecked.two_ints(1, 2)},
            "(b) one bytes": {"cffi": lambda: lib.one_bytes(payload), "wrapped": lambda: checked.one_bytes(payload),
                              "ctypes": lambda: clib.one_bytes(payload),
                              "ctypes wrapped": lambda: cchecked.one_bytes(payload)},
            "(c) struct of 4 C pointers": {"cffi": lambda: lib.struct4(s_c), "wrapped": lambda: checked.struct4(s_c),
                                           "ctypes": lambda: clib.struct4(ctypes.byref(cs4)),
                                           "ctypes wrapped": lambda: cchecked.struct4(ctypes.byref(cs4))},
            "(c') struct of 4 pinned pointers": {"cffi": lambda: lib.struct4(s_pinned),
                                                 "wrapped": lambda: checked.struct4(s_pinned)},
            "(d) iovec[16], pinned bases": {"cffi": lambda: lib.iov16(iov, 16), "wrapped": lambda: checked.iov16(iov, 16),
                                            "ctypes": lambda: clib.iov16(civ, 16),
                                            "ctypes wrapped": lambda: cchecked.iov16(civ, 16)},
        }
        print(f"ptrbridge {ptrbridge.__version__}: ns per call (best of {rounds} interleaved rounds)")
        for case, variants in cases.items():
            results: Dict[str, float] = {}
            for level in (0, 1, 2):
                with ptrbridge.checking(level):
                    # fetch the attribute at this level, as a caller would
                    measured = best_ns(variants, number, rounds)
                for name, value in measured.items():
                    if "wrapped" in name:
                        results[f"{name} L{level}"] = value
                    else:
                        results[name] = min(results.get(name, value), value)
            print(f"\n{case}")
            for name, value in results.items():
                print(f"   {name:22s} {value:9.0f}")
            for level in (0, 1, 2):
                ratio = results[f"wrapped L{level}"] / results["cffi"]
                target = {0: 1.05, 1: 2.0}.get(level) if case[:3] in ("(a)", "(b)") or level == 0 else None
                note = f"(target <= {target}x) {verdict(ratio, target)}" if target else ""
                print(f"   level {level} / raw cffi   = {ratio:6.2f}x  {note}")
                if "ctypes" in variants:
                    print(f"   level {level} / raw ctypes = {results[f'ctypes wrapped L{level}'] / results['ctypes']:6.2f}x")
        pinner.unpin()
        cmem.free()
    print("\nlevel 2 adds, per call that lends Python memory, a registry entry for the call and a "
          "retention scan (batched adaptively); level 0 returns the raw function, so the ratio "
          "reflects the attribute access of the wrapper object in the lambda.")


if __name__ == "__main__":
    main()
