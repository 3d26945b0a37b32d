"""Benchmark of the quarantine (not a test): python bench/bench_quarantine.py [--quick]

Two questions, each answered as a ratio against a baseline measured in the
same run, interleaved (every variant once per round, best round kept):

1. Sampling for production: a call-heavy loop at check level 1 with
   ``set_quarantine(sample=1000)`` against level 1 without quarantine.
   Target: <= 1.02x.
2. The cost of one quarantined lend: a call lending 256 bytes at level 2 with
   quarantine on (every lend shadowed) against the same call at level 2
   without quarantine.  Target: <= 1 us extra per lend.  Shown for both ways
   of closing a shadow (MADV_GUARD_INSTALL, and the mprotect fallback).

The C function is libc's ``memchr`` (through cffi ABI mode) on a 256-byte
``bytearray`` passed with ``ffi.from_buffer``, so the call lends exactly 256 B
and reads all of it; the loop is written as a caller writes it.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import cffi

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ptrbridge  # noqa: E402
from ptrbridge import quarantine  # noqa: E402
from ptrbridge._bindings import lib as native  # noqa: E402
from timing import verdict  # noqa: E402

ffi = cffi.FFI()
ffi.cdef("void *memchr(const void *s, int c, size_t n);")
libc = ptrbridge.wrap(ffi.dlopen(None))
DATA = bytearray(b"x" * 256)
VIEW = ffi.from_buffer(DATA)


def loop(n: int) -> None:
    memchr, view = libc.memchr, VIEW
    for _ in range(n):
        memchr(view, 0, 256)


def configure(level: int, on: bool, sample: int, mprotect: bool) -> None:
    ptrbridge.set_check_level(level)
    quarantine.set_quarantine(on, sample=sample)
    native.pb__quarantine_force_mprotect(1 if mprotect else 0)


Variant = Tuple[int, bool, int, bool]  # level, quarantine on, sample, force mprotect


def measure(variants: Dict[str, Variant], number: int, rounds: int) -> Dict[str, float]:
    """ns per call of each variant: the minimum over interleaved rounds."""
    best = {name: float("inf") for name in variants}
    names = list(variants)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotating order
            configure(*variants[name])
            loop(number // 10)  # warm the configuration
            start = time.perf_counter_ns()
            loop(number)
            best[name] = min(best[name], (time.perf_counter_ns() - start) / number)
    configure(0, False, 1, False)
    return best


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer calls and rounds")
    args = parser.parse_args(argv)
    number, rounds = (20_000, 5) if args.quick else (100_000, 9)

    sampling = measure({
        "level 1": (1, False, 1, False),
        "level 1, sample=1000": (1, True, 1000, False),
    }, number, rounds)
    lends = measure({
        "level 2": (2, False, 1, False),
        "level 2, quarantine (guard regions)": (2, True, 1, False),
        "level 2, quarantine (mprotect)": (2, True, 1, True),
    }, number // 10, rounds)

    ratio = sampling["level 1, sample=1000"] / sampling["level 1"]
    print(f"{'variant':42s} {'ns/call':>10s}")
    for table in (sampling, lends):
        for name, ns in table.items():
            print(f"{name:42s} {ns:10.0f}")
    print()
    print(f"sampling 1/1000 at level 1: {ratio:.3f}x level 1  (target <= 1.02x)  {verdict(ratio, 1.02)}")
    for how in ("guard regions", "mprotect"):
        extra_us = (lends[f"level 2, quarantine ({how})"] - lends["level 2"]) / 1000
        print(f"quarantined 256 B lend ({how}): +{extra_us:.2f} us per lend vs level 2  "
              f"(target <= 1 us)  {verdict(extra_us, 1.0)}")
    print(f"(guard installs that fell back to mprotect: {native.pb__quarantine_fallbacks()})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
