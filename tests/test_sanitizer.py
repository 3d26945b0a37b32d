"""End to end: unchanged programs with pointer bugs under ``python -m ptrbridge run``.

The programs are the demo's (``ptrbridge/demo_programs``), written the way a
user who never heard of ptrbridge writes them; each bug has a correct twin
that must be clean.  Each run is compared with the same program run plainly:
ptrbridge must never make a misbehaving program look right.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Set

import pytest

from ptrbridge import demo_programs
from sanitizers import (first_frame_past_the_runtime, is_writev_of_freed_cffi_memory, own_sanitizer_log,
                        sanitizer_active, sanitizer_reports)


def _env() -> Dict[str, str]:
    env = dict(os.environ)
    for name in ("PTRBRIDGE_CHECK", "PTRBRIDGE_QUARANTINE", "PTRBRIDGE_STRICT", "PYTEST_ADDOPTS"):
        env.pop(name, None)
    return env


def _plain(name: str, **env: str) -> "subprocess.CompletedProcess[str]":
    return subprocess.run([sys.executable, demo_programs.path(name)], capture_output=True, text=True,
                          timeout=120, env=dict(_env(), **env))


def _under_run(name: str, tmp_path: Path, *options: str) -> "tuple[subprocess.CompletedProcess[str], List[Any]]":
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "ptrbridge", "run", *options, "--report", str(report), "--",
                           sys.executable, demo_programs.path(name)],
                          capture_output=True, text=True, timeout=300, env=_env())
    found = json.loads(report.read_text())["findings"] if report.exists() else []
    return proc, found


def test_use_after_free_in_an_iovec_is_an_error_naming_the_slot_and_the_call(tmp_path: Path) -> None:
    proc, found = _under_run("gather.py", tmp_path)
    assert proc.returncode == 1, proc.stderr
    (f,) = [f for f in found if f["kind"] == "dangling-argument"]
    assert f["severity"] == "error"
    assert "[0].iov_base -> ffi.new memory" in f["message"]
    assert "in call to writev() at gather.py:29" in f["message"]
    assert "dangling: freed before the call" in f["message"]
    # The freed buffers were poisoned, not left intact: C read the pattern, not the old text.
    assert "hello" not in proc.stdout
    assert "SUMMARY: ptrbridge: 1 error(s)" in proc.stderr


def test_the_bug_is_silent_plainly(tmp_path: Path) -> None:
    # Plainly nothing reports the bug: what writev() reads depends on the allocator (CPython 3.11
    # prints b'world\nworld\n', 3.10 may still find the old bytes intact and print the right text).
    plain = _plain("gather.py", **own_sanitizer_log(tmp_path))
    if not sanitizer_active():
        assert plain.returncode == 0 and plain.stderr == ""
        assert plain.stdout.startswith("writev wrote 12 bytes: ")
        return
    # Under ASan or TSan (.ci/sanitize) "plainly" is not plain: the sanitizer's writev() reads the
    # iovec first and reports the bug, the bases cffi freed - the only report, and not ptrbridge's.
    assert plain.returncode != 0
    (report,) = sanitizer_reports(tmp_path)
    assert is_writev_of_freed_cffi_memory(report), report


def test_the_correct_twin_is_clean(tmp_path: Path) -> None:
    proc, found = _under_run("gather_fixed.py", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert found == []
    assert "writev wrote 12 bytes: b'hello world\\n'" in proc.stdout
    assert "checked 1 call(s)" in proc.stderr


def test_c_using_a_buffer_it_kept_dies_with_a_report(tmp_path: Path) -> None:
    proc, found = _under_run("stdio_buffer.py", tmp_path)
    assert proc.returncode == 128 + signal.SIGSEGV, proc.returncode  # as a shell reports a SIGSEGV death
    err = proc.stderr
    assert ("ptrbridge: C used a pointer to Python memory after the call that lent it returned (R2, caught by "
            "quarantine): bytearray(4096) lent to setvbuf() at ") in err
    assert "stdio_buffer.py:21" in err
    assert "in fputs" in err
    assert "SUMMARY: ptrbridge: use-after-release (WRITE)" in err
    assert "done" not in proc.stdout
    # The dead process wrote no report, but its fault report is a finding of the run.
    (f,) = found
    assert f["kind"] == "use-after-release" and f["severity"] == "error" and f["function"] == "setvbuf"
    assert f["lent_at"].endswith("stdio_buffer.py:21") and f["pid"] is not None
    assert "killed by SIGSEGV" in err and "SUMMARY: ptrbridge: 1 error(s)" in err
    assert "no Python process of the command started ptrbridge" not in err


def test_without_the_quarantine_the_kept_buffer_is_not_caught_at_its_use(tmp_path: Path) -> None:
    # The same program with --no-quarantine: no guard page, so no report of the use (the write
    # lands in memory Python freed, as without ptrbridge).
    proc, _ = _under_run("stdio_buffer.py", tmp_path, "--no-quarantine")
    assert "caught by quarantine" not in proc.stderr


# ---- the corpus of examples/buggy: bugs as users write them, each with a correct twin ------------

BUGGY_DIR = Path(__file__).resolve().parent.parent / "examples" / "buggy"
BUGS = sorted(p.name for p in BUGGY_DIR.glob("p*_bug.py"))
TWINS = sorted(p.name for p in BUGGY_DIR.glob("p*_ok.py"))
# Twins that work on CPython but break rule R2: C *uses* a mutable buffer (ffi.new,
# create_string_buffer, bytearray) after the call that lent it returned, and the program keeps it
# alive without pinning it.  CPython never moves it, so C reads what the object holds: the
# quarantine's shadow is adopted (a kept read, a portability finding) and the run goes on.
KEPT_USE_TWINS = {"p02_ctx_ffinew_ok.py", "p03_static_strbuf_ok.py", "p11_bytearray_extend_ok.py",
                  "p14_bytearray_ctypes_ok.py"}
# Correct twins the run still fails (none now: p05's stale next_out at deflateEnd() is watched by a
# quarantine trap for the call, and deflateEnd() never reads it).
KNOWN_FALSE_ALARMS: Set[str] = set()


@pytest.fixture(scope="module")
def buggy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The programs next to the libkeep.so they load (built from keep.c)."""
    out = tmp_path_factory.mktemp("buggy")
    for p in BUGGY_DIR.glob("p*.py"):
        shutil.copy(p, out / p.name)
    subprocess.run(["gcc", "-std=c11", "-Wall", "-Wextra", "-Werror", "-O1", "-shared", "-fPIC",
                    "-o", str(out / "libkeep.so"), str(BUGGY_DIR / "keep.c"), "-lpthread"],
                   check=True, capture_output=True, text=True)
    return out


def _run_buggy(directory: Path, name: str, **env: str) -> "tuple[subprocess.CompletedProcess[str], List[Any]]":
    report = directory / f"{name}.json"
    proc = subprocess.run([sys.executable, "-m", "ptrbridge", "run", "--check", "2", "--report", str(report), "--",
                           sys.executable, str(directory / name)],
                          capture_output=True, text=True, errors="replace", timeout=300, env=dict(_env(), **env),
                          cwd=directory)
    return proc, json.loads(report.read_text())["findings"]


def test_the_corpus_is_whole() -> None:
    assert len(BUGS) == 17 and len(TWINS) == 18
    assert {b.replace("_bug.py", "") for b in BUGS} <= {t.replace("_ok.py", "") for t in TWINS}


@pytest.mark.parametrize("name", BUGS)
def test_every_bug_of_the_corpus_is_an_error_naming_the_program(buggy_dir: Path, name: str) -> None:
    logs = buggy_dir / f"{name}.reports"
    proc, found = _run_buggy(buggy_dir, name, **own_sanitizer_log(logs))
    assert proc.returncode != 0, proc.stdout + proc.stderr[-3000:]
    # Under a sanitizer (.ci/sanitize) a program's bug may be its report too, after ptrbridge's:
    # under ASan p08's snprintf("%s") runs off the freed name ptrbridge holds, poisoned (0xDD, no
    # NUL left), into the redzone.  Each report must be an access by the corpus's own C code.
    for report in sanitizer_reports(logs):
        assert "libkeep.so" in first_frame_past_the_runtime(report), report
    errors = [f for f in found if f["severity"] == "error"]
    assert errors, proc.stderr[-3000:]
    # the report names the program's line: where the object was lent, or the call that failed
    assert any(f"{name}:" in f["message"] for f in errors), [f["message"] for f in errors]
    assert "SUMMARY: ptrbridge:" in proc.stderr


@pytest.mark.parametrize("name", [pytest.param(t, marks=pytest.mark.xfail(strict=True, reason="known false alarm"))
                                  if t in KNOWN_FALSE_ALARMS else t for t in TWINS])
def test_every_correct_twin_of_the_corpus_is_clean(buggy_dir: Path, name: str) -> None:
    plain = subprocess.run([sys.executable, str(buggy_dir / name)], capture_output=True, text=True,
                           timeout=120, env=_env(), cwd=buggy_dir)
    assert plain.returncode == 0 and "CORRECT" in plain.stdout, plain.stdout + plain.stderr
    proc, found = _run_buggy(buggy_dir, name)
    assert [f["message"] for f in found if f["severity"] == "error"] == []
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "CORRECT" in proc.stdout


@pytest.mark.parametrize("name", sorted(KEPT_USE_TWINS))
def test_a_twin_that_uses_a_live_mutable_buffer_after_the_call_is_a_portability_finding(buggy_dir: Path,
                                                                                      name: str) -> None:
    proc, found = _run_buggy(buggy_dir, name)
    assert proc.returncode == 0 and "CORRECT" in proc.stdout, proc.stderr[-3000:]
    kept = [f for f in found if f["kind"] == "use-after-release"]
    assert kept and all(f["severity"] == "portability" and f["rule"] == "R2" for f in kept), kept
    assert any(f"{name}:" in f["message"] for f in kept), [f["message"] for f in kept]
