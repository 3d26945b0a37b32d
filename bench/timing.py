"""Interleaved timing for the benchmarks: every variant is measured in each round, best round kept."""
from __future__ import annotations

import time
from typing import Callable, Dict


def best_ns(variants: Dict[str, Callable[[], object]], number: int, rounds: int) -> Dict[str, float]:
    """Nanoseconds per call of each variant: the minimum over ``rounds`` interleaved rounds.

    Interleaving makes noise on this 2-core machine hit every variant alike;
    the minimum is the least disturbed measurement.
    """
    best = {name: float("inf") for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            start = time.perf_counter_ns()
            for _ in range(number):
                fn()
            best[name] = min(best[name], (time.perf_counter_ns() - start) / number)
    return best


def verdict(ratio: float, target: float, higher_is_better: bool = False) -> str:
    """PASS/MISS for a ratio against its target."""
    ok = ratio >= target if higher_is_better else ratio <= target
    return "PASS" if ok else "MISS"
