"""Real cffi packages' own test suites, plain and under ``pytest --ptrbridge=2`` (issue 10, item 4).

For each of brotlicffi, argon2-cffi (with its cffi part, argon2-cffi-bindings),
zstandard (its cffi backend: ``PYTHON_ZSTANDARD_IMPORT_POLICY=cffi``), xattr,
cmarkgfm, cairocffi (ABI mode over the system's libcairo; its tests ship
inside the package and need pikepdf and numpy, installed from wheels into the
suite's own directory), pygit2 (API mode over libgit2; installed from its
wheel, which bundles libgit2 1.9: Debian 12's libgit2-dev is 1.5, too old for
the sdist) and misaka (hoedown; its suite is its own runner, not pytest, and
compares HTML through the ``tidy`` program), this script:

1. fetches the sdist with ``pip download --no-binary :all: --no-deps``;
2. builds and installs it with pip into a private target directory (no
   dependencies: cffi, pytest and hypothesis come from this interpreter, the
   one ptrbridge is installed in), or installs the same version's wheel;
3. copies the suite's test directory out of the sdist (so that the tests
   import the installed, compiled package and not the source tree) and runs
   it with ``python -P -m pytest`` plain, then with ``--ptrbridge=LEVEL
   --ptrbridge-report=FILE`` for each ``--level`` (a suite with its own
   runner: under ``python -m ptrbridge run --check LEVEL --report FILE``),
   interleaved over ``--rounds`` rounds (best time kept);
4. prints a table, a row per level: tests, passed/failed (plain and under
   ptrbridge), checked calls (from the JSON report), error / portability
   findings, and the time ratio.

Everything is cached under ``--workdir`` (default
``$TMPDIR/ptrbridge-bench-suites``), so a second run only runs the suites.
Not part of the test suite; it needs the network to reach the package index.

    python bench/bench_suites.py [--rounds 1] [--only zstandard] [--level 1 --level 2] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple


@dataclass
class Suite:
    name: str  # the distribution whose tests run
    tests: str  # the test directory inside the sdist
    install: List[str]  # distributions to build from sdists and install, in order
    env: Dict[str, str] = field(default_factory=dict)
    args: List[str] = field(default_factory=list)  # extra pytest arguments
    no_build_isolation: Tuple[str, ...] = ()  # distributions built with this interpreter's setuptools
    prepare: Optional[str] = None  # Python code run in the suite directory after unpacking
    test_deps: List[str] = field(default_factory=list)  # the suite's own test requirements (wheels, with deps)
    installed_tests: List[str] = field(default_factory=list)  # test files shipped inside the installed package
    wheels: Tuple[str, ...] = ()  # distributions installed from the sdist's version's wheel, not built
    command: List[str] = field(default_factory=list)  # the suite's own runner (python arguments), not pytest
    programs: Tuple[str, ...] = ()  # programs the suite runs, which must be on PATH


# brotlicffi's sdist does not ship libbrotli/tests/testdata, which its conftest lists: make a small
# set of files and their .compressed twins with the installed brotlicffi.
_BROTLI_TESTDATA = """
import os, random, brotlicffi
d = os.path.join("libbrotli", "tests", "testdata")
os.makedirs(d, exist_ok=True)
rng = random.Random(7)
files = {
    "alice29.txt": (b"Alice was beginning to get very tired of sitting by her sister on the bank. " * 2000),
    "random_org_10k.bin": bytes(rng.getrandbits(8) for _ in range(10000)),
    "zeros": bytes(100000),
    "x": b"X",
    "empty": b"",
    "mixed": b"".join(bytes([i % 7]) * (i % 50) for i in range(3000)),
}
for name, data in files.items():
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)
    with open(os.path.join(d, name + ".compressed"), "wb") as f:
        f.write(brotlicffi.compress(data))
"""


SUITES = [
    Suite("brotlicffi", "test", ["brotlicffi"], prepare=_BROTLI_TESTDATA),
    Suite("argon2-cffi", "tests", ["argon2-cffi-bindings", "argon2-cffi"]),
    Suite("zstandard", "tests", ["zstandard"], env={"PYTHON_ZSTANDARD_IMPORT_POLICY": "cffi"}),
    Suite("xattr", "tests", ["xattr"]),
    Suite("cmarkgfm", "tests", ["cmarkgfm"]),
    # ABI mode over the system's libcairo (Debian's libcairo2); its tests live in the package.
    Suite("cairocffi", "", ["cairocffi"], test_deps=["pikepdf", "numpy"],
          installed_tests=["cairocffi/test_cairo.py", "cairocffi/test_numpy.py"]),
    # API mode; most of pygit2 is its C extension, the cffi lib does remotes, callbacks,
    # options, blame, rebase. Tests needing the network skip themselves.
    Suite("pygit2", "test", ["pygit2"], wheels=("pygit2",)),
    # chibitest, misaka's own runner (prints "N passed; M failed."); Debian's tidy package.
    Suite("misaka", "tests", ["misaka"], command=["tests/run_tests.py"], programs=("tidy",)),
    # API mode over the libsodium its sdist bundles (built with it, a few minutes).
    Suite("pynacl", "tests", ["pynacl"]),
]


def _run(cmd: List[str], **kwargs: object) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]


def fetch(dist: str, sdists: str) -> str:
    stem = dist.replace("-", "_")
    found = glob.glob(os.path.join(sdists, f"{stem}-*.tar.gz")) + glob.glob(os.path.join(sdists, f"{dist}-*.tar.gz"))
    if not found:
        proc = _run([sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps",
                     "-d", sdists, dist])
        if proc.returncode != 0:
            raise RuntimeError(f"pip download {dist} failed:\n{proc.stderr[-3000:]}")
        found = glob.glob(os.path.join(sdists, f"{stem}-*.tar.gz")) + glob.glob(os.path.join(sdists, f"{dist}-*.tar.gz"))
    return sorted(found)[-1]


def install(dist: str, sdist: str, site: str, isolated: bool, wheel: bool = False) -> None:
    marker = os.path.join(site, f".installed-{dist}")
    if os.path.exists(marker):
        return
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, sdist]
    if wheel:  # the wheel of the sdist's version (pygit2-1.21.0.tar.gz -> pygit2==1.21.0)
        version = os.path.basename(sdist)[:-len(".tar.gz")].rsplit("-", 1)[1]
        cmd[-1:] = ["--only-binary", ":all:", f"{dist}=={version}"]
    elif not isolated:
        cmd.insert(4, "--no-build-isolation")
    proc = _run(cmd)
    if proc.returncode != 0:
        raise RuntimeError(f"pip install {dist} failed:\n{proc.stderr[-3000:]}")
    open(marker, "w").close()


def install_test_deps(dists: List[str], target: str) -> None:
    marker = os.path.join(target, ".installed")
    if os.path.exists(marker):
        return
    proc = _run([sys.executable, "-m", "pip", "install", "-q", "--target", target, *dists])
    if proc.returncode != 0:
        raise RuntimeError(f"pip install {' '.join(dists)} failed:\n{proc.stderr[-3000:]}")
    open(marker, "w").close()


def unpack_tests(sdist: str, tests: str, dest: str, site: str, prepare: Optional[str]) -> str:
    target = os.path.join(dest, "suite")
    if os.path.isdir(target):
        return target
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp)
        (top,) = os.listdir(tmp)
        os.makedirs(target)
        shutil.copytree(os.path.join(tmp, top, tests), os.path.join(target, os.path.basename(tests)))
        # The sdist's pytest configuration (markers, filterwarnings) without its import paths.
        with open(os.path.join(target, "pytest.ini"), "w", encoding="utf-8") as f:
            f.write("[pytest]\n")
    if prepare:
        env = dict(os.environ, PYTHONPATH=site)
        proc = _run([sys.executable, "-P", "-c", prepare], cwd=target, env=env)
        if proc.returncode != 0:
            shutil.rmtree(target)
            raise RuntimeError(f"preparing {target} failed:\n{proc.stderr[-3000:]}")
    return target


@dataclass
class Result:
    seconds: float
    passed: int
    failed: int
    errors: int
    skipped: int
    report: Optional[dict]
    tail: str


def _outcomes(text: str) -> Dict[str, int]:
    import re

    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    lines = [line for line in text.splitlines() if " in " in line and re.search(r"\d+ (passed|failed|error)", line)]
    lines = lines or [line for line in text.splitlines() if re.fullmatch(r"\d+ passed; \d+ failed\.", line)]
    if lines:
        for n, what in re.findall(r"(\d+) (passed|failed|errors?|skipped)", lines[-1]):
            counts["error" if what.startswith("error") else what] += int(n)
    return counts


def run_suite(suite: Suite, path: str, site: str, level: Optional[str], report: Optional[str]) -> Result:
    """One run of the suite: plain (``level`` None) or under ptrbridge at ``level``."""
    env = dict(os.environ)
    env.pop("PTRBRIDGE_CHECK", None)
    env.update(suite.env)
    deps = os.path.join(os.path.dirname(site), "deps") if suite.test_deps else ""
    env["PYTHONPATH"] = os.pathsep.join(p for p in (site, deps, env.get("PYTHONPATH", "")) if p)
    if suite.command:
        # Its own runner, with the script's directory first on sys.path (no -P), as it expects.
        cmd = [sys.executable, *suite.command, *suite.args]
        if level is not None:
            cmd[:0] = [sys.executable, "-m", "ptrbridge", "run", "--check", level,
                       *([f"--report={report}"] if report else []), "--"]
    else:
        cmd = [sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
               *suite.args, *([f"--ptrbridge={level}"] if level is not None else [])]
        if report:
            cmd.append(f"--ptrbridge-report={report}")
    if report and os.path.exists(report):
        os.remove(report)  # a run that dies before writing it must not show the last one's
    began = time.perf_counter()
    proc = _run(cmd, cwd=path, env=env)
    seconds = time.perf_counter() - began
    counts = _outcomes(proc.stdout)
    data = None
    if report and os.path.exists(report):
        with open(report, encoding="utf-8") as f:
            data = json.load(f)
    return Result(seconds, counts["passed"], counts["failed"], counts["error"], counts["skipped"], data,
                  (proc.stdout + proc.stderr)[-4000:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "ptrbridge-bench-suites"))
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--only", action="append", default=[], help="run only this suite (repeatable)")
    parser.add_argument("--level", action="append", choices=("1", "2"),
                        help="check level under ptrbridge (repeatable; default 2)")
    parser.add_argument("--show-failures", action="store_true", help="print the tail of failing runs")
    args = parser.parse_args()
    levels = args.level or ["2"]
    sdists = os.path.join(args.workdir, "sdists")
    os.makedirs(sdists, exist_ok=True)
    rows: List[Tuple[str, str, Optional[Result], Optional[Result]]] = []
    for suite in SUITES:
        if args.only and suite.name not in args.only:
            continue
        base = os.path.join(args.workdir, suite.name)
        site = os.path.join(base, "site")
        os.makedirs(site, exist_ok=True)
        try:
            missing = [p for p in suite.programs if shutil.which(p) is None]
            if missing:
                raise RuntimeError(f"the suite runs {', '.join(missing)}, which is not on PATH")
            sdist = ""
            for dist in suite.install:
                sdist = fetch(dist, sdists)
                install(dist, sdist, site, isolated=dist not in suite.no_build_isolation,
                        wheel=dist in suite.wheels)
            if suite.test_deps:
                install_test_deps(suite.test_deps, os.path.join(base, "deps"))
            if suite.installed_tests:
                path = site
                suite.args = [*suite.installed_tests, *suite.args]
            else:
                path = unpack_tests(sdist, suite.tests, base, site, suite.prepare)
        except (RuntimeError, OSError) as exc:
            print(f"{suite.name}: could not set up: {exc}", file=sys.stderr)
            rows.append((suite.name, "", None, None))
            continue
        best_plain: Optional[Result] = None
        best_pb: Dict[str, Result] = {}
        for _ in range(args.rounds):
            plain_run = run_suite(suite, path, site, None, None)
            if best_plain is None or plain_run.seconds < best_plain.seconds:
                best_plain = plain_run
            for level in levels:
                pb_run = run_suite(suite, path, site, level, os.path.join(base, f"report-{level}.json"))
                if level not in best_pb or pb_run.seconds < best_pb[level].seconds:
                    best_pb[level] = pb_run
        for level in levels:
            rows.append((suite.name, level, best_plain, best_pb[level]))
            if args.show_failures and (best_pb[level].failed or best_pb[level].errors):
                print(f"--- {suite.name} at level {level}:\n{best_pb[level].tail}\n", file=sys.stderr)
    print(f"{'suite':<13} {'level':>5} {'tests':>6} {'plain p/f/e':>12} {'ptrbridge p/f/e':>16} {'calls':>8} "
          f"{'callbacks':>9} {'lends':>7} {'errors':>6} {'portab.':>7} {'plain s':>8} {'pb s':>7} {'ratio':>6}")
    for name, level, plain, pb in rows:
        if plain is None or pb is None:
            print(f"{name:<13} (not set up)")
            continue
        tests = plain.passed + plain.failed + plain.errors + plain.skipped
        report = pb.report or {}
        checked = report.get("checked", {})
        counts = report.get("counts", {})
        print(f"{name:<13} {level:>5} {tests:>6} {f'{plain.passed}/{plain.failed}/{plain.errors}':>12} "
              f"{f'{pb.passed}/{pb.failed}/{pb.errors}':>16} {checked.get('calls', '?'):>8} "
              f"{checked.get('callbacks', '?'):>9} {checked.get('lends', '?'):>7} "
              f"{counts.get('error', '?'):>6} {counts.get('portability', '?'):>7} "
              f"{plain.seconds:>8.1f} {pb.seconds:>7.1f} {pb.seconds / plain.seconds:>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
