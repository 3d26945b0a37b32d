"""Benchmark of the malloc-family interposer's pair cost (not a test): python bench/bench_interpose.py [--quick]

tests/clib/holder.c (plain libc malloc/free in a C loop, ``holder_loop``) is
compiled -O2 into a temporary directory and loaded with cffi.  One call runs
``n`` malloc(64)+free pairs; its time per pair is measured three ways,
interleaved round by round, best round kept:

* plain - check level 0: the library's GOT points at libc;
* level 2 - ``ptrbridge.set_check_level(2)``: the interposer and the heap map
  on (the hooks record each block, and each free of a C block is stamped with
  the heap map's free clock), which is what issue 9's target is about;
* interposer alone - ``interposition.enable()`` without the heap map.

Printed: ns per pair for each and the extra cost per pair over plain, and the
ratio level 2 / plain.  Target (issue 9): <= 40 ns extra per pair at level 2.

``--lookup`` measures instead ``pb__interpose_find`` (the live block containing an
interior address, which level 2 asks per unresolved slot value) against the
number of live interposed blocks: N blocks of mixed sizes (48 B to 256 KiB) are
allocated by the holder library at level 2, then interior addresses of random
blocks are looked up through cffi; the cost of a trivial native call
(``pb_api_version``) measured interleaved in the same rounds is
subtracted.  Before issue 9's index the lookup walked the whole table (linear
in N); it should now be flat.

``--callgrind`` runs only the level-2 loop once (for
``valgrind --tool=callgrind python bench/bench_interpose.py --callgrind``,
which counts instructions repeatably; compare with ``--callgrind-plain``).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Dict, Tuple

import ptrbridge
from ptrbridge import heapmap, interposition

sys.path.insert(0, str(Path(__file__).parent))
from holder import load_holder as open_holder  # noqa: E402  (bench/ is not a package)
from timing import verdict  # noqa: E402

TARGET_NS = 40.0
SIZE = 64


def load_holder() -> Tuple[Any, Any]:
    return open_holder("uint64_t holder_loop(size_t n, size_t size);")


def _enter(mode: str) -> None:
    if mode == "level 2":
        ptrbridge.set_check_level(2)
    elif mode == "interposer alone":
        interposition.enable()


def _leave(mode: str) -> None:
    if mode == "level 2":
        ptrbridge.set_check_level(0)
    elif mode == "interposer alone":
        interposition.disable()


def measure(quick: bool = False, rounds: int = 0) -> Dict[str, float]:
    """ns per malloc+free pair in each mode (keys: plain, level 2, interposer alone)."""
    _, holder = load_holder()
    ptrbridge.set_check_level(0)
    if heapmap.installed() or interposition.enabled():
        raise RuntimeError("bench_interpose: the heap map or the interposer is already on")
    n = 200_000 if quick else 1_000_000
    rounds = rounds or (5 if quick else 21)
    best = {"plain": float("inf"), "level 2": float("inf"), "interposer alone": float("inf")}
    for _ in range(rounds):
        for mode in best:
            _enter(mode)
            try:
                holder.holder_loop(1000, SIZE)  # warm the table and the shard locks
                began = time.perf_counter_ns()
                holder.holder_loop(n, SIZE)
                best[mode] = min(best[mode], (time.perf_counter_ns() - began) / n)
            finally:
                _leave(mode)
    return best


def measure_lookup(sizes: Tuple[int, ...] = (1_000, 10_000, 100_000), rounds: int = 7) -> Dict[int, float]:
    """ns per interior-address lookup (native call cost subtracted) for each table size."""
    import random

    from ptrbridge._native import ffi, lib

    _, holder = open_holder("void *holder_alloc(size_t); void holder_free(void *);")
    rng = random.Random(9)
    out = ffi.new("struct pb_iblock *")
    result: Dict[int, float] = {}
    ptrbridge.set_check_level(2)
    try:
        for n in sizes:
            blocks = []
            for _ in range(n):
                size = rng.choice((48, 200, 1000, 5000, 30000, 262144))
                blocks.append((holder.holder_alloc(size), size))
            addrs = [int(ffi.cast("uintptr_t", p)) + rng.randrange(size) for p, size in rng.sample(blocks, min(n, 2000))]
            best_find, best_base = float("inf"), float("inf")
            for _ in range(rounds):
                began = time.perf_counter_ns()
                for a in addrs:
                    lib.pb__interpose_find(a, out)
                best_find = min(best_find, (time.perf_counter_ns() - began) / len(addrs))
                began = time.perf_counter_ns()
                for a in addrs:
                    lib.pb_api_version()
                best_base = min(best_base, (time.perf_counter_ns() - began) / len(addrs))
            found = sum(bool(lib.pb__interpose_find(a, out)) for a in addrs)
            if found != len(addrs):
                raise RuntimeError(f"bench_interpose: {len(addrs) - found} interior addresses not resolved")
            result[n] = best_find - best_base
            for p, _ in blocks:
                holder.holder_free(p)
    finally:
        ptrbridge.set_check_level(0)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer pairs and rounds")
    parser.add_argument("--rounds", type=int, default=0, help="interleaved rounds (default 21, 5 with --quick)")
    parser.add_argument("--callgrind", action="store_true", help="one level-2 loop of 100 000 pairs, untimed")
    parser.add_argument("--callgrind-plain", action="store_true", help="the same loop at level 0")
    parser.add_argument("--lookup", action="store_true", help="interior-address lookup cost vs table size")
    args = parser.parse_args()
    if args.lookup:
        print("pb__interpose_find(interior address), native call cost subtracted, best of 7:")
        for n, ns in measure_lookup().items():
            print(f"  {n:7d} live blocks  {ns:8.1f} ns/lookup")
        return 0
    if args.callgrind or args.callgrind_plain:
        _, holder = load_holder()
        if args.callgrind:
            ptrbridge.set_check_level(2)
        holder.holder_loop(100_000, SIZE)
        ptrbridge.set_check_level(0)
        return 0
    best = measure(args.quick, args.rounds)
    plain = best["plain"]
    print(f"malloc({SIZE})+free pair, best of interleaved rounds:")
    for mode, ns in best.items():
        extra = "" if mode == "plain" else f"  +{ns - plain:.1f} ns/pair  ({ns / plain:.2f}x plain)"
        print(f"  {mode:17s} {ns:6.1f} ns/pair{extra}")
    extra2 = best["level 2"] - plain
    print(f"level 2 extra per pair: {extra2:.1f} ns, target <= {TARGET_NS:.0f} ns: {verdict(extra2, TARGET_NS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
