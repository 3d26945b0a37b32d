"""The sanitizer runtime the tests may run under (``.ci/sanitize``), as child processes see it.

``.ci/sanitize`` preloads ASan+UBSan (or TSan) into the interpreter and sends every
report to a log directory; any report there fails the run.  A test that starts a
child process uses these helpers where the runtime changes what the child does:

- ``runtime_env()``: what a child with a minimal environment must still inherit;
- ``without_asan_quarantine()``: for a child whose test is about what libc does with
  freed memory at once (hands it to the next malloc, unmaps a big block);
- ``own_asan_log(directory)`` / ``asan_reports(directory)``: for a child that runs a
  program buggy on purpose, whose ASan report is expected and checked by the test
  (``is_writev_of_freed_cffi_memory``: the demo's gather.py run plainly).

Outside a sanitizer run each is a no-op (an empty environment, no reports).
"""
from __future__ import annotations

import ctypes
import functools
import os
import re
from pathlib import Path
from typing import Dict, List

RUNTIME_VARIABLES = ("LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS", "TSAN_OPTIONS", "LSAN_OPTIONS")


@functools.lru_cache(maxsize=None)
def asan_active() -> bool:
    """Whether AddressSanitizer's runtime is in this process (preloaded by ``.ci/sanitize``).

    Its malloc then replaces libc's for everything, csrc and the interpreter alike.
    """
    try:
        getattr(ctypes.CDLL(None), "__asan_init")
    except AttributeError:
        return False
    return True


def runtime_env() -> Dict[str, str]:
    """The variables a child process needs to run under this process's sanitizer runtime.

    The preload (ASan must come first in the library list, or the child exits at once)
    and the options (the log directory above all).  Empty in an ordinary run.
    """
    return {name: os.environ[name] for name in RUNTIME_VARIABLES if name in os.environ}


def _asan_options(*extra: str) -> Dict[str, str]:
    if not asan_active():
        return {}
    options = [o for o in os.environ.get("ASAN_OPTIONS", "").split(":") if o]
    return {"ASAN_OPTIONS": ":".join([*options, *extra])}  # the last value of a flag wins


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
    return _asan_options("quarantine_size_mb=0", "thread_local_quarantine_size_kb=0")


def own_asan_log(directory: Path) -> Dict[str, str]:
    """Environment sending a child's ASan reports to ``directory`` instead of the run's log.

    For a child that runs a program with a memory bug on purpose: ASan rightly reports
    it, the test reads the report with ``asan_reports(directory)`` and asserts it is the
    program's bug; ``.ci/sanitize`` never sees it.  Creates ``directory``.  Empty without
    ASan (and nothing created).
    """
    env = _asan_options(f"log_path={Path(directory) / 'asan'}")
    if env:
        Path(directory).mkdir(parents=True, exist_ok=True)
    return env


def asan_reports(directory: Path) -> List[str]:
    """The texts of the ASan reports a child started with ``own_asan_log(directory)`` wrote."""
    return [p.read_text(errors="replace") for p in sorted(Path(directory).glob("asan.*"))]


def is_writev_of_freed_cffi_memory(report: str) -> bool:
    """Whether an ASan report is gather.py's bug, run plainly, and nothing else.

    A heap-use-after-free read by ASan's writev() interceptor (it checks the iovec's
    buffers) of memory cffi freed (``cdata_dealloc``), with no frame of ptrbridge's.
    """
    return ("ERROR: AddressSanitizer: heap-use-after-free" in report
            and re.search(r"#1 0x[0-9a-f]+ in __interceptor_writev ", report) is not None
            and re.search(r"freed by thread T0 here:\n.*\n    #1 0x[0-9a-f]+ in cdata_dealloc ", report) is not None
            and re.search(r"ptrbridge/_native|csrc/", report) is None)
