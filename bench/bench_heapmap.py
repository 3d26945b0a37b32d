"""Benchmark of the level-2 heap map (not a test): python bench/bench_heapmap.py [--quick | --smoke]

An allocation-heavy pure-Python loop (building and dropping dicts, lists,
tuples and strings: the allocations per iteration that the heap map sees
are counted and printed) is timed five ways, interleaved round by round,
best round kept:

* baseline - no hooks;
* heap map - ptrbridge.heapmap installed with its default hold of freed
  blocks, poisoned (what check level 2 runs);
* heap map, hold not poisoned - ``set_poison(False)``: the cost of poisoning;
* heap map, no hold - the hooks and the index alone (``set_hold(0, 0)``);
* tracemalloc - ``tracemalloc.start()``, the reference to beat.

Target: heap map <= 1.5x the baseline.  ``measure(quick)`` returns the
figures as a dict, for other benchmarks (the scan benchmark) to report.
"""
from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from typing import Callable, Dict, Union

from ptrbridge import heapmap

TARGET = 1.5


def allocation_loop(n: int) -> None:
    """Build and drop small containers and strings: the allocator's hot path."""
    for i in range(n):
        name = str(i)
        row = {"id": i, "name": name, "tags": [i, i + 1, i + 2], "pair": (i, -i), "label": f"item-{name}"}
        rows = [row, (name, i), [name] * 3, {"k": row["tags"]}]
        del row, rows


def _time(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _with_heapmap(n: int, hold: bool, poison: bool = True) -> float:
    heapmap.install()
    if not hold:
        heapmap.set_hold(0, 0)
    old_poison = heapmap.set_poison(poison)
    try:
        return _time(lambda: allocation_loop(n))
    finally:
        heapmap.set_poison(old_poison)
        heapmap.set_hold()
        heapmap.uninstall()


def _with_tracemalloc(n: int) -> float:
    tracemalloc.start()
    try:
        return _time(lambda: allocation_loop(n))
    finally:
        tracemalloc.stop()


def measure(quick: bool = False, *, iterations: int = 0, rounds: int = 0) -> Dict[str, Union[int, float, bool]]:
    """Time the loop four ways and return the figures.

    Keys: ``iterations``, ``rounds``, ``allocations_per_iteration``,
    ``baseline_ms``, ``heapmap_ms``, ``heapmap_no_poison_ms``, ``heapmap_no_hold_ms``,
    ``tracemalloc_ms``, ``heapmap_ratio``, ``heapmap_no_poison_ratio``, ``heapmap_no_hold_ratio``,
    ``tracemalloc_ratio``, ``ns_per_allocation`` (heap map cost per
    allocation and its free), ``target`` and ``passed``.  Leaves the heap
    map as it found it only if it was not installed (the benchmark
    installs and uninstalls it).
    """
    if heapmap.installed():
        raise RuntimeError("ptrbridge: bench_heapmap.measure(): the heap map is installed "
                           "(check level 2?); run at level 0 or 1")
    n = iterations or (40_000 if quick else 200_000)
    rounds = rounds or (5 if quick else 9)
    heapmap.install()
    before = heapmap.stats().allocations
    allocation_loop(100)
    per_iteration = (heapmap.stats().allocations - before) // 100
    heapmap.uninstall()
    variants: Dict[str, Callable[[], float]] = {
        "baseline": lambda: _time(lambda: allocation_loop(n)),
        "heapmap": lambda: _with_heapmap(n, hold=True),
        "heapmap_no_poison": lambda: _with_heapmap(n, hold=True, poison=False),
        "heapmap_no_hold": lambda: _with_heapmap(n, hold=False),
        "tracemalloc": lambda: _with_tracemalloc(n),
    }
    best = {name: float("inf") for name in variants}
    allocation_loop(n // 10)  # warm up
    for _ in range(rounds):
        for name, run in variants.items():
            best[name] = min(best[name], run())
    base = best["baseline"]
    ratio = best["heapmap"] / base
    return {
        "iterations": n,
        "rounds": rounds,
        "allocations_per_iteration": per_iteration,
        "baseline_ms": base * 1e3,
        "heapmap_ms": best["heapmap"] * 1e3,
        "heapmap_no_poison_ms": best["heapmap_no_poison"] * 1e3,
        "heapmap_no_hold_ms": best["heapmap_no_hold"] * 1e3,
        "tracemalloc_ms": best["tracemalloc"] * 1e3,
        "heapmap_ratio": ratio,
        "heapmap_no_poison_ratio": best["heapmap_no_poison"] / base,
        "heapmap_no_hold_ratio": best["heapmap_no_hold"] / base,
        "tracemalloc_ratio": best["tracemalloc"] / base,
        "ns_per_allocation": (best["heapmap"] - base) / max(1, n * per_iteration) * 1e9,
        "target": TARGET,
        "passed": ratio <= TARGET,
    }


def report(figures: Dict[str, Union[int, float, bool]]) -> str:
    """The figures as the lines the benchmark prints."""
    verdict = "PASS" if figures["passed"] else "MISS"
    return "\n".join([
        f"allocation-heavy loop: {figures['iterations']} iterations x {figures['allocations_per_iteration']} "
        f"allocations, best of {figures['rounds']} interleaved rounds",
        f"  baseline            {figures['baseline_ms']:9.1f} ms",
        f"  heap map (poisoned) {figures['heapmap_ms']:9.1f} ms = {figures['heapmap_ratio']:.2f}x  "
        f"(target <= {figures['target']}x)  {verdict}   "
        f"+{figures['ns_per_allocation']:.1f} ns per allocation+free",
        f"  heap map, no poison {figures['heapmap_no_poison_ms']:9.1f} ms = "
        f"{figures['heapmap_no_poison_ratio']:.2f}x",
        f"  heap map, no hold   {figures['heapmap_no_hold_ms']:9.1f} ms = {figures['heapmap_no_hold_ratio']:.2f}x",
        f"  tracemalloc         {figures['tracemalloc_ms']:9.1f} ms = {figures['tracemalloc_ratio']:.2f}x  (reference)",
    ])


def main(argv: object = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="fewer iterations and rounds")
    group.add_argument("--smoke", action="store_true", help="a few iterations: checks that it runs")
    args = parser.parse_args(argv if isinstance(argv, list) else None)
    if args.smoke:
        figures = measure(True, iterations=2_000, rounds=1)
    else:
        figures = measure(args.quick)
    print(report(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
