"""The sanitizer runtime the tests may run under (``.ci/sanitize``), as child processes see it.

``.ci/sanitize`` preloads ASan+UBSan (or TSan) into the interpreter and sends every
report to a log directory; any report there fails the run.  A test that starts a
child process uses these helpers where the runtime changes what the child does:

- ``runtime_env()``: what a child with a minimal environment must still inherit;
- ``without_asan_quarantine()``: for a child whose test is about what libc does with
  freed memory at once (hands it to the next malloc, unmaps a big block);
- ``own_sanitizer_log(directory)`` / ``sanitizer_reports(directory)``: for a child that
  runs a program buggy on purpose, whose report is expected and checked by the test
  (``is_writev_of_freed_cffi_memory``: the demo's gather.py run plainly).

Outside a sanitizer run each is a no-op (an empty environment, no reports).
"""
from __future__ import annotations

import ctypes
import functools
import os
import re
from pathlib import Path
from typing import Dict, List, Optional

RUNTIME_VARIABLES = ("LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS", "TSAN_OPTIONS", "LSAN_OPTIONS")


@functools.lru_cache(maxsize=None)
def sanitizer_active() -> Optional[str]:
    """``"asan"`` or ``"tsan"``: the sanitizer runtime in this process (``.ci/sanitize`` preloads it), or None.

    Under ASan its malloc replaces libc's for everything, csrc and the interpreter alike.
    """
    process = ctypes.CDLL(None)
    for name in ("asan", "tsan"):
        try:
            getattr(process, f"__{name}_init")
        except AttributeError:
            continue
        return name
    return None


def asan_active() -> bool:
    """Whether AddressSanitizer's runtime is in this process."""
    return sanitizer_active() == "asan"


def runtime_env() -> Dict[str, str]:
    """The variables a child process needs to run under this process's sanitizer runtime.

    The preload (ASan must come first in the library list, or the child exits at once)
    and the options (the log directory above all).  Empty in an ordinary run.
    """
    return {name: os.environ[name] for name in RUNTIME_VARIABLES if name in os.environ}


def _options(variable: str, *extra: str) -> Dict[str, str]:
    options = [o for o in os.environ.get(variable, "").split(":") if o]
    return {variable: ":".join([*options, *extra])}  # the last value of a flag wins


def without_asan_quarantine() -> Dict[str, str]:
    """Environment for a child whose test needs libc's immediate reuse of freed memory.

    ASan keeps a freed block out of reuse for a while (its quarantine: a global one,
    ``quarantine_size_mb``, and a per-thread one, ``thread_local_quarantine_size_kb``,
    which gcc 12's runtime leaves at 1 MiB when the global one is 0): the block is
    neither handed to the next malloc of its size nor unmapped, as glibc does at once.
    With both off, ASan recycles a freed block into its size class at once (the next
    request of that class gets it, last in first out) and unmaps a block it mapped on
    its own (every block over 128 KiB).  Empty without ASan.
    """
    if not asan_active():
        return {}
    return _options("ASAN_OPTIONS", "quarantine_size_mb=0", "thread_local_quarantine_size_kb=0")


def own_sanitizer_log(directory: Path) -> Dict[str, str]:
    """Environment sending a child's ASan or TSan reports to ``directory``, not the run's log.

    For a child that runs a program with a memory bug on purpose: the sanitizer rightly
    reports it, the test reads the report with ``sanitizer_reports(directory)`` and
    asserts it is the program's bug; ``.ci/sanitize`` never sees it.  Creates
    ``directory``.  Empty without a sanitizer (and nothing created).  UBSan writes to
    the child's stderr whatever its options say.
    """
    name = sanitizer_active()
    if name is None:
        return {}
    Path(directory).mkdir(parents=True, exist_ok=True)
    return _options(f"{name.upper()}_OPTIONS", f"log_path={Path(directory) / name}")


def sanitizer_reports(directory: Path) -> List[str]:
    """The texts of the reports a child started with ``own_sanitizer_log(directory)`` wrote."""
    return [p.read_text(errors="replace") for p in sorted(Path(directory).glob("[at]san.*"))]


def first_frame_past_the_runtime(report: str) -> str:
    """The first frame of a report's access stack that is not the sanitizer's own (an interceptor)."""
    access = report.strip("=\n").split("\n\n")[0]
    frames = re.findall(r"^    #\d+ (?:0x[0-9a-f]+ in )?(.*)$", access, re.M)
    return next(f for f in frames if "libsanitizer" not in f)


def is_writev_of_freed_cffi_memory(report: str) -> bool:
    """Whether a report is gather.py's bug, run plainly, and nothing else.

    A heap-use-after-free read by the sanitizer's writev() interceptor (it checks the
    iovec's buffers) of memory cffi freed (``cdata_dealloc``), with no frame of
    ptrbridge's.  ASan's words and TSan's.
    """
    asan = ("ERROR: AddressSanitizer: heap-use-after-free" in report
            and re.search(r"#1 0x[0-9a-f]+ in __interceptor_writev ", report) is not None
            and re.search(r"freed by thread T0 here:\n.*\n    #1 0x[0-9a-f]+ in cdata_dealloc ", report) is not None)
    tsan = ("WARNING: ThreadSanitizer: heap-use-after-free" in report
            and re.search(r"by main thread:\n    #0 writev ", report) is not None
            and re.search(r"Previous write .* by main thread:\n    #0 free .*\n    #1 cdata_dealloc ", report) is not None)
    return (asan or tsan) and re.search(r"ptrbridge/_native|csrc/", report) is None
