"""The child side of ``python -m ptrbridge run``: collect findings and write a report at exit.

``python -m ptrbridge run`` puts a ``sitecustomize.py`` that calls
:func:`start` on the child's ``PYTHONPATH``.  :func:`start` switches automatic
scans to "collect", watches the requested libraries, remembers the counters,
records uncaught ptrbridge errors, and at exit scans once more and writes
``report-<pid>.json`` into ``PTRBRIDGE_RUN_DIR``.
"""
from __future__ import annotations

import atexit
import json
import os
import sys
from typing import Any, Dict, Iterable, List, Optional

__all__ = ["start", "add_findings", "RUN_DIR_ENV", "WATCH_ENV"]

RUN_DIR_ENV = "PTRBRIDGE_RUN_DIR"
WATCH_ENV = "PTRBRIDGE_WATCH"

_findings: List[str] = []
_started = False
_start_stats: Optional[Any] = None
_pending_watch: List[str] = []


def add_findings(lines: Iterable[str]) -> None:
    """Add findings (already formatted) to this process's report."""
    _findings.extend(lines)


def _watch_pending() -> None:
    import ptrbridge

    for name in list(_pending_watch):
        try:
            ptrbridge.watch_library(name)
        except ValueError:
            continue
        _pending_watch.remove(name)


def start() -> None:
    """Begin collecting (called from the generated sitecustomize; idempotent)."""
    global _started, _start_stats
    if _started or not os.environ.get(RUN_DIR_ENV):
        return
    _started = True
    import ptrbridge
    from .testing import settle

    ptrbridge.set_on_violation("collect")
    _pending_watch.extend(n for n in os.environ.get(WATCH_ENV, "").split(os.pathsep) if n)
    _watch_pending()
    settle()
    _start_stats = ptrbridge.stats()
    previous_hook = sys.excepthook

    def record_pointer_errors(kind: Any, value: Any, tb: Any) -> None:
        if isinstance(value, ptrbridge.PointerError):
            _findings.append(f"uncaught {kind.__name__}: {value}")
        previous_hook(kind, value, tb)

    sys.excepthook = record_pointer_errors
    atexit.register(_write_report)


def _write_report() -> None:
    import ptrbridge
    from . import scanning
    from .testing import leaks, settle

    _watch_pending()
    settle()
    found = [str(r) for r in scanning.scan() + scanning.clear_violations()]
    found += [str(r) for r in scanning.scan_freed_python_memory()]
    now = ptrbridge.stats()
    report: Dict[str, Any] = {
        "pid": os.getpid(),
        "argv": sys.argv,
        "findings": _findings + found,
        "leaks": leaks(_start_stats, now) if _start_stats is not None else [],
        "stats": {name: getattr(now, name) for name in vars(now)},
        "check_level": ptrbridge.check_level(),
    }
    path = os.path.join(os.environ[RUN_DIR_ENV], f"report-{os.getpid()}.json")
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    except OSError as exc:  # the run directory vanished: say so rather than lose it silently
        print(f"ptrbridge: could not write the run report {path}: {exc}", file=sys.stderr)
