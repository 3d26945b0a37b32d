"""Benchmark of level 2 (not a test): python bench/bench_scan.py [--quick]

In one run:
1. scan throughput (GB/s) over 256 MiB of roots (one registered root) with
   10, 1 000 and 100 000 targets, on mostly non-pointer data (zeros and small
   integers) and on pointer-dense data (every word a heap-like address near
   the targets), next to memcpy bandwidth measured the same way.
   Target: non-pointer data with 100 000 targets >= 50% of memcpy.
2. a zlib streaming loop (examples/zlib_stream.py, input pinned for the
   stream's life) at levels 1 and 2 and at level 2 with quarantine.
   Target: level 2 <= 2x level 1.
3. the heap map's overhead on an allocation-heavy pure-Python loop, next to
   tracemalloc's on the same loop.  Target: <= 1.5x.
"""
from __future__ import annotations

import argparse
import ctypes
import importlib.util
import os
import sys
import time
from pathlib import Path

import ptrbridge
from ptrbridge._bindings import ffi, lib

sys.path.insert(0, str(Path(__file__).parent))
from timing import verdict  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def _best(fn, rounds: int) -> float:  # type: ignore[no-untyped-def]
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_scan(quick: bool) -> None:
    size = (64 if quick else 256) << 20
    rounds = 2 if quick else 4
    root = ctypes.create_string_buffer(size)
    other = ctypes.create_string_buffer(size)
    copy_s = _best(lambda: ctypes.memmove(other, root, size), rounds)
    memcpy_gbs = size / copy_s / 1e9
    print(f"1. scan of {size >> 20} MiB; memcpy bandwidth {memcpy_gbs:.1f} GB/s")
    words = (ctypes.c_uint64 * (size // 8)).from_buffer(root)
    targets_mem = ffi.new("char[]", 100_000 * 64)
    base = int(ffi.cast("uintptr_t", targets_mem))
    for data in ("non-pointer", "pointer-dense"):
        if data == "non-pointer":
            ctypes.memset(root, 0, size)
            for i in range(0, size // 8, 4096):
                words[i] = i  # a few small integers
        else:
            step = 97
            for i in range(0, size // 8, 512):  # fill pages sparsely, then replicate: fast to build
                words[i] = base + 64 * 100_000 + (i * step) % (1 << 24)  # near the targets, outside them
            chunk = bytes(root[: 1 << 20])
            for off in range(1 << 20, size, 1 << 20):
                ctypes.memmove(ctypes.addressof(root) + off, chunk, 1 << 20)
        for n in (10, 1_000, 100_000):
            stride = 64 * 100_000 // n
            for i in range(n):
                lib.pb__scan_retire(base + i * stride, 32, i + 1)
            seconds = _best(lambda: lib.pb__scan_buffer(ffi.cast("void *", ctypes.addressof(root)), size), rounds)
            lib.pb__scan_run(ffi.NULL, 0, 0, ffi.NULL)  # drop the targets
            gbs = size / seconds / 1e9
            line = f"   {data:13s} {n:>7d} targets: {gbs:6.1f} GB/s = {gbs / memcpy_gbs:5.0%} of memcpy"
            if data == "non-pointer" and n == 100_000:
                line += f"  (target >= 50%)  {verdict(gbs / memcpy_gbs, 0.5, higher_is_better=True)}"
            print(line)


def bench_zlib(quick: bool) -> None:
    spec = importlib.util.spec_from_file_location("zlib_stream", REPO / "examples" / "zlib_stream.py")
    z = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(z)  # type: ignore[union-attr]
    chunks = [os.urandom(1 << 16) for _ in range(8 if quick else 32)]

    def run() -> None:
        with ptrbridge.Pinner() as pinner:
            z.compress(chunks, lambda d, c: d.feed_pinned(c, pinner))

    results = {}
    for label, level, quarantined in (("level 1", 1, False), ("level 2", 2, False), ("level 2 + quarantine", 2, True)):
        old_q = ptrbridge.set_quarantine(quarantined)
        with ptrbridge.checking(level):
            results[label] = _best(run, 3 if quick else 5)
        ptrbridge.set_quarantine(old_q)
    print(f"2. zlib streaming loop, {len(chunks)} x 64 KiB")
    for label, seconds in results.items():
        print(f"   {label:22s} {seconds * 1e3:8.1f} ms")
    ratio = results["level 2"] / results["level 1"]
    print(f"   level 2 / level 1 = {ratio:.2f}x  (target <= 2x)  {verdict(ratio, 2.0)}")
    print(f"   level 2 + quarantine / level 1 = {results['level 2 + quarantine'] / results['level 1']:.2f}x")


def bench_heapmap(quick: bool) -> None:
    import bench_heapmap  # the same directory; measured there, reported here

    print("3. " + bench_heapmap.report(bench_heapmap.measure(quick)).replace("\n", "\n   "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(f"ptrbridge {ptrbridge.__version__}")
    bench_scan(args.quick)
    bench_zlib(args.quick)
    bench_heapmap(args.quick)


if __name__ == "__main__":
    main()
