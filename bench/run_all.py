"""Run every benchmark quickly and print one table: measure, result, target, PASS/MISS.

    python bench/run_all.py [--full] [--only calls,core] [--suites]

Each benchmark runs in its own subprocess (its quick mode unless ``--full``)
and prints its verdicts; this script collects them.  bench_calls prints
``SUMMARY: measure: result (target ...) PASS|MISS`` lines; the other
benchmarks print free-form lines that end in PASS or MISS, which are shown
as they are (the whole line is the measure).  Every figure is a ratio or a
time measured inside one benchmark run, interleaved against its baseline
(see each benchmark's docstring); nothing here times anything itself.
``--suites`` adds bench_suites.py (real packages' test suites: fetches
sdists, takes minutes).  A benchmark that fails or finds nothing to report
shows up as a row saying so.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from typing import List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))

# (name, script, quick arguments, full arguments)
BENCHES: List[Tuple[str, str, List[str], List[str]]] = [
    ("calls", "bench_calls.py", ["--quick"], []),
    ("core", "bench_core.py", ["--quick"], []),
    ("heapmap", "bench_heapmap.py", ["--quick"], []),
    ("quarantine", "bench_quarantine.py", ["--quick"], []),
    ("scan", "bench_scan.py", ["--quick"], []),
    ("plugin", "bench_plugin.py", ["--rounds", "1", "--large", "60", "--small", "10"], []),
    ("kafka", "bench_kafka.py", ["--quick"], []),
]
SUITES = ("suites", "bench_suites.py", ["--rounds", "1"], ["--rounds", "3"])

_SUMMARY = re.compile(r"^SUMMARY: (?P<measure>.*?): (?P<result>\S+) \(target (?P<target>[^)]*)\) (?P<mark>PASS|MISS)$")
_TARGET = re.compile(r"\(?(target\s*[^)]*?)\)?\s+(PASS|MISS)\s*$|(<=\s*[\d.]+\s*\w*)\s+(PASS|MISS)")


def verdict_rows(name: str, text: str) -> List[Tuple[str, str, str, str]]:
    """(measure, result, target, mark) rows from one benchmark's output."""
    rows: List[Tuple[str, str, str, str]] = []
    summary = [m for m in (_SUMMARY.match(line.strip()) for line in text.splitlines()) if m]
    if summary:
        return [(f"{name}: {m['measure']}", m["result"], m["target"], m["mark"]) for m in summary]
    for line in text.splitlines():
        line = line.strip()
        if not line.endswith(("PASS", "MISS")) or line.startswith("SUMMARY"):
            continue
        mark = line[-4:]
        body = line[:-4].rstrip()
        target = ""
        found = re.search(r"\(?target ([^)]*)\)?\s*$", body) or re.search(r"(<=\s*\S+)\s*$", body)
        if found:
            target = found.group(1)
            body = body[:found.start()].rstrip()
        rows.append((f"{name}: {body}", "", target, mark))
    return rows


def run(name: str, script: str, args: List[str], timeout: float) -> Tuple[List[Tuple[str, str, str, str]], float]:
    began = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, os.path.join(HERE, script), *args], capture_output=True,
                              text=True, timeout=timeout, cwd=HERE)
    except subprocess.TimeoutExpired:
        return [(f"{name}: did not finish in {timeout:.0f} s", "", "", "-")], time.perf_counter() - began
    seconds = time.perf_counter() - began
    rows = verdict_rows(name, proc.stdout)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1][:100]
        rows.append((f"{name}: exited with status {proc.returncode}: {tail}", "", "", "-"))
    elif not rows:
        rows.append((f"{name}: ran, printed no verdicts", "", "", "-"))
    return rows, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--full", action="store_true", help="each benchmark's full mode (slower, steadier)")
    parser.add_argument("--only", default="", help="comma-separated benchmark names (calls, core, ...)")
    parser.add_argument("--suites", action="store_true", help="also run bench_suites.py (network, minutes)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per benchmark")
    opts = parser.parse_args()
    chosen = BENCHES + ([SUITES] if opts.suites else [])
    only = {n.strip() for n in opts.only.split(",") if n.strip()}
    if only:
        chosen = [b for b in BENCHES + [SUITES] if b[0] in only]
    table: List[Tuple[str, str, str, str]] = []
    for name, script, quick, full in chosen:
        rows, seconds = run(name, script, full if opts.full else quick, opts.timeout)
        print(f"[{name}: {len(rows)} rows in {seconds:.0f} s]", file=sys.stderr)
        table.extend(rows)
    width = min(max((len(r[0]) for r in table), default=10), 80)
    print(f"{'measure':<{width}}  {'result':>9}  {'target':<14}  verdict")
    for measure, result, target, mark in table:
        print(f"{measure[:width]:<{width}}  {result:>9}  {target[:14]:<14}  {mark}")
    passed = sum(r[3] == "PASS" for r in table)
    missed = sum(r[3] == "MISS" for r in table)
    print(f"\n{passed} PASS, {missed} MISS, {len(table) - passed - missed} without a verdict")
    return 0


if __name__ == "__main__":
    sys.exit(main())
