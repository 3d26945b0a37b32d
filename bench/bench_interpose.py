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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer pairs and rounds")
    parser.add_argument("--rounds", type=int, default=0, help="interleaved rounds (default 21, 5 with --quick)")
    parser.add_argument("--callgrind", action="store_true", help="one level-2 loop of 100 000 pairs, untimed")
    parser.add_argument("--callgrind-plain", action="store_true", help="the same loop at level 0")
    args = parser.parse_args()
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
