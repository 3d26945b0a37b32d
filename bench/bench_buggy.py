"""ptrbridge against valgrind on examples/buggy (not a test): python bench/bench_buggy.py [--no-valgrind]

Each program of the corpus (a pointer bug as users write it, and its correct
twin) is run three ways, in the same run:

1. plainly: what it prints (``CORRECT`` or ``WRONG``) and its exit status;
2. under ``python -m ptrbridge run --check 2``: whether an error is reported
   (a finding of severity error, or the run's exit status), and the time;
3. under valgrind's memcheck (``PYTHONMALLOC=malloc``, CPython's start-up
   noise suppressed with suppressions generated first from a program that only
   imports what the corpus imports): whether it reports an error.

The table shows, per program: plain output, ptrbridge's verdict and time,
valgrind's verdict and time.  A bug should be reported, a twin should be
clean.  The last lines count both for each tool.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

BUGGY = Path(__file__).resolve().parent.parent / "examples" / "buggy"
PRELUDE = "import ctypes, cffi, random, zlib, sqlite3, os, gc"


def _env() -> Dict[str, str]:
    env = dict(os.environ)
    for name in ("PTRBRIDGE_CHECK", "PTRBRIDGE_QUARANTINE", "PTRBRIDGE_STRICT", "PYTEST_ADDOPTS"):
        env.pop(name, None)
    return env


def _timed(cmd: List[str], cwd: Path, env: Dict[str, str]) -> Tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, errors="replace", timeout=900)
    return proc, time.perf_counter() - start


def _output(proc: subprocess.CompletedProcess) -> str:
    found = re.search(r"\b(CORRECT|WRONG)\b", proc.stdout)
    return found.group(1) if found else f"rc {proc.returncode}"


def _suppressions(work: Path) -> Path:
    """Suppressions for CPython's own start-up reports under memcheck."""
    log = work / "supp.log"
    subprocess.run(["valgrind", "--gen-suppressions=all", f"--log-file={log}", sys.executable, "-c", PRELUDE],
                   env=dict(_env(), PYTHONMALLOC="malloc"), capture_output=True, timeout=900)
    blocks = re.findall(r"^\{\n.*?^\}$", log.read_text(errors="replace"), re.M | re.S)
    supp = work / "python.supp"
    supp.write_text("\n".join(blocks) + "\n")
    return supp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-valgrind", action="store_true", help="skip the valgrind column")
    parser.add_argument("--only", default="", help="only the programs whose name contains this (e.g. p17)")
    args = parser.parse_args()
    valgrind = None if args.no_valgrind else shutil.which("valgrind")
    with tempfile.TemporaryDirectory(prefix="bench-buggy-") as tmp:
        work = Path(tmp)
        for p in BUGGY.glob("p*.py"):
            shutil.copy(p, work / p.name)
        subprocess.run(["gcc", "-O1", "-g", "-shared", "-fPIC", "-o", str(work / "libkeep.so"),
                        str(BUGGY / "keep.c"), "-lpthread"], check=True)
        supp = _suppressions(work) if valgrind else None
        print("| program | plain | ptrbridge L2 | s | valgrind | s |")
        print("| --- | --- | --- | ---: | --- | ---: |")
        score: Dict[str, List[int]] = {"ptrbridge": [0, 0, 0, 0], "valgrind": [0, 0, 0, 0]}
        for name in sorted(p.name for p in work.glob("p*.py") if args.only in p.name):
            bug = name.endswith("_bug.py")
            plain, _ = _timed([sys.executable, name], work, _env())
            report = work / f"{name}.json"
            pb, pb_s = _timed([sys.executable, "-m", "ptrbridge", "run", "--check", "2", "--report", str(report),
                               "--", sys.executable, name], work, _env())
            errors = [f for f in json.loads(report.read_text())["findings"] if f["severity"] == "error"] \
                if report.exists() else []
            pb_hit = bool(errors) or pb.returncode != 0
            vg_cell, vg_s, vg_hit = "-", 0.0, None
            if valgrind and supp is not None:
                vg, vg_s = _timed([valgrind, f"--suppressions={supp}", "--error-exitcode=99", sys.executable, name],
                                  work, dict(_env(), PYTHONMALLOC="malloc"))
                # Its errors, also of a process that then died (p17: cffi aborts after the invalid read).
                summary = re.findall(r"ERROR SUMMARY: (\d+) errors", vg.stderr)
                vg_hit = vg.returncode == 99 or bool(summary and int(summary[-1]) > 0)
                vg_cell = "error" if vg_hit else f"clean ({_output(vg)})"
            pb_cell = (f"error ({len(errors)})" if errors else f"exit {pb.returncode}") if pb_hit else "clean"
            print(f"| {name} | {_output(plain)} | {pb_cell} | {pb_s:.2f} | {vg_cell} | {vg_s:.2f} |")
            for tool, hit in (("ptrbridge", pb_hit), ("valgrind", vg_hit)):
                if hit is None:
                    continue
                s = score[tool]
                if bug:
                    s[0] += hit
                    s[1] += 1
                else:
                    s[2] += not hit
                    s[3] += 1
        for tool, (found, bugs, clean, twins) in score.items():
            if bugs or twins:
                print(f"SUMMARY: {tool}: {found}/{bugs} bugs reported, {clean}/{twins} correct programs clean")


if __name__ == "__main__":
    main()
