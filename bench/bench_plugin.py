"""Per-test fixed cost of the pytest plugin: trivial suites, plain vs ``--ptrbridge=1`` / ``=2``.

Each suite is a directory of N trivial tests (``assert x + 1 == ...``) run as
``python -m pytest -q -p no:cacheprovider`` in a subprocess.  Two sizes (SMALL
and LARGE tests) separate the start-up cost (importing ptrbridge, the heap
map) from the per-test cost: per-test cost = (T(LARGE) - T(SMALL)) / (LARGE -
SMALL), and the plugin's per-test fixed cost is that slope minus the plain
run's.  Every variant runs once per round, interleaved; the best round counts.

Targets (issue 10): <= 5 ms per test at level 1, <= 10 ms at level 2.

    python bench/bench_plugin.py [--rounds 5] [--large 200] [--small 20]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

TRIVIAL = "def test_{i}():\n    assert {i} + 1 == {j}\n\n"
VARIANTS = {
    "plain": [],
    "level 1": ["--ptrbridge=1"],
    "level 2": ["--ptrbridge=2"],
}
TARGET_MS = {"level 1": 5.0, "level 2": 10.0}


def make_suite(root: str, n: int) -> str:
    path = os.path.join(root, f"suite{n}")
    os.makedirs(path)
    with open(os.path.join(path, "test_trivial.py"), "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(TRIVIAL.format(i=i, j=i + 1))
    with open(os.path.join(path, "pytest.ini"), "w", encoding="utf-8") as f:
        f.write("[pytest]\n")
    return path


def run_once(suite: str, options: List[str], expect: int) -> float:
    env = dict(os.environ)
    env.pop("PTRBRIDGE_CHECK", None)
    began = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *options],
                          cwd=suite, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - began
    if proc.returncode != 0 or f"{expect} passed" not in proc.stdout:
        raise SystemExit(f"suite failed under {options}:\n{proc.stdout}\n{proc.stderr}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--large", type=int, default=200)
    parser.add_argument("--small", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ptrbridge-bench-plugin-") as root:
        suites = {n: make_suite(root, n) for n in (args.small, args.large)}
        best: Dict[tuple, float] = {}
        for _ in range(args.rounds):
            for name, options in VARIANTS.items():
                for n, suite in suites.items():
                    t = run_once(suite, options, n)
                    best[(name, n)] = min(best.get((name, n), float("inf")), t)
    slope = {name: (best[(name, args.large)] - best[(name, args.small)]) / (args.large - args.small)
             for name in VARIANTS}
    print(f"{'variant':<10} {'T(' + str(args.small) + ')':>9} {'T(' + str(args.large) + ')':>9} "
          f"{'ms/test':>8} {'plugin ms/test':>15} {'target':>7}")
    for name in VARIANTS:
        extra = (slope[name] - slope["plain"]) * 1e3
        target = TARGET_MS.get(name)
        verdict = "" if target is None else ("PASS" if extra <= target else "MISS")
        print(f"{name:<10} {best[(name, args.small)]:>8.2f}s {best[(name, args.large)]:>8.2f}s "
              f"{slope[name] * 1e3:>8.2f} {extra if name != 'plain' else 0.0:>15.2f} "
              f"{'' if target is None else f'<= {target:g}':>7} {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
