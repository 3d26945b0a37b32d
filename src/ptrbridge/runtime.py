"""The child side of ``python -m ptrbridge run``: check the process and write its report at exit.

``python -m ptrbridge run`` puts a ``sitecustomize.py`` (``ptrbridge/_run_boot.py``)
on the child's ``PYTHONPATH``; it calls :func:`start` just before the process
first imports cffi, ctypes or ptrbridge, and :func:`write_report` at exit.

:func:`start` applies the run's settings (check level from ``PTRBRIDGE_CHECK``;
quarantine, strict mode and instrumentation from ``PTRBRIDGE_QUARANTINE``,
``PTRBRIDGE_STRICT`` and ``PTRBRIDGE_INSTRUMENT``), makes automatic retention
scans *collect* findings instead of raising :class:`~ptrbridge.RetainedPointerError`
in the program (a program that calls :func:`ptrbridge.set_on_violation`
itself gets what it asks for), watches the requested libraries, takes the
registry's counters, and records every ptrbridge error that escapes the
program (uncaught, in a thread, or unraisable) as an ``"error-raised"``
finding.  At exit, after one last scan and the leak check, it writes
``report-<pid>.json`` into ``PTRBRIDGE_RUN_DIR`` for the parent to merge.
"""
from __future__ import annotations

import atexit
import json
import os
import sys
import threading
from typing import Any, Dict, Iterable, List, Optional

from . import findings as _findings
from .findings import Finding

__all__ = ["start", "write_report", "add_findings", "add_tests", "RUN_DIR_ENV", "WATCH_ENV", "INSTRUMENT_ENV"]

RUN_DIR_ENV = "PTRBRIDGE_RUN_DIR"
WATCH_ENV = "PTRBRIDGE_WATCH"
INSTRUMENT_ENV = "PTRBRIDGE_INSTRUMENT"

_lock = threading.Lock()
_findings_kept: List[Finding] = []
_tests: List[Dict[str, Any]] = []
_leaks_reported: Dict[str, int] = {}
_started = False
_written = False
_probe: Optional[Any] = None
_pending_watch: List[str] = []
_matched_watch: List[str] = []
_notes: List[str] = []


def add_findings(found: Iterable[Finding]) -> None:
    """Add findings (already gathered elsewhere, e.g. by the pytest plugin) to this process's report.

    Leak findings count against the leaks found at exit, so a leak reported
    by a test is not reported a second time for the process.
    """
    with _lock:
        for f in found:
            _findings_kept.append(f)
            if f.kind == "leak":
                kind = str(f.extra.get("leak_kind", ""))
                _leaks_reported[kind] = _leaks_reported.get(kind, 0) + int(f.extra.get("count", 0))


def add_tests(records: Iterable[Dict[str, Any]]) -> None:
    """Per-test records (see :mod:`ptrbridge.report`) for this process's report."""
    with _lock:
        _tests.extend(records)


def enabled(env_value: Optional[str], default: bool) -> bool:
    """A boolean setting from the environment ("1"/"0", "true"/"false", ...)."""
    if env_value is None or not env_value.strip():
        return default
    return env_value.strip().lower() in ("1", "true", "yes", "on")


def watch_pending(names: List[str], matched: List[str]) -> None:
    """Watch each name in ``names`` that a loaded library now matches, moving it to ``matched``."""
    import ptrbridge

    for name in list(names):
        try:
            ptrbridge.watch_library(name)
        except ValueError:
            continue
        names.remove(name)
        matched.append(name)


INSTRUMENT_MISSING = ("instrumentation is not available in this ptrbridge (no ptrbridge.instrument): "
                      "only explicitly wrapped libraries were checked")


def instrument_now() -> Optional[str]:
    """Instrument cffi and ctypes with ``ptrbridge.instrument()``; returns a note if it cannot."""
    try:
        from .instrument import instrument
    except ImportError:
        return INSTRUMENT_MISSING
    instrument()
    return None


def start() -> None:
    """Begin checking this process (called from the generated sitecustomize; idempotent)."""
    global _started, _probe
    if _started or not os.environ.get(RUN_DIR_ENV):
        return
    _started = True
    for finder in list(sys.meta_path):  # started by other means (the pytest plugin): the boot finder is done
        if type(finder).__name__ == "_PtrbridgeRunFinder":
            finder.done = True  # type: ignore[attr-defined]
            sys.meta_path.remove(finder)
    import ptrbridge
    from .report import LeakProbe

    ptrbridge.set_on_violation("collect")
    if enabled(os.environ.get("PTRBRIDGE_QUARANTINE"), default=False):
        ptrbridge.set_quarantine(True)
    if ptrbridge.check_level() >= 1 and enabled(os.environ.get(INSTRUMENT_ENV), default=True):
        note = instrument_now()
        if note:
            _notes.append(note)
    _pending_watch.extend(n for n in os.environ.get(WATCH_ENV, "").split(os.pathsep) if n)
    watch_pending(_pending_watch, _matched_watch)
    _probe = LeakProbe()
    _install_error_hooks()
    _open_journal()
    atexit.register(write_report)


_journal_fd: Optional[int] = None


def _open_journal() -> None:
    """Start ``journal-<pid>.jsonl`` in the run directory: this process started, and its errors.

    Each error finding is appended as it is recorded, so a process that dies
    of the bug (a SIGSEGV in the C call right after the check reported it)
    is still in the run's summary with what it found.  The report written at
    exit supersedes it.
    """
    if not _open_journal_file():
        return
    _findings.on_error(_journal_error)
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_journal_after_fork)


def _journal_after_fork() -> None:
    """A forked child keeps a journal of its own (it writes its own report too)."""
    global _journal_fd
    fd, _journal_fd = _journal_fd, None
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass
        _open_journal_file()


def _open_journal_file() -> bool:
    global _journal_fd
    run_dir = os.environ.get(RUN_DIR_ENV)
    if not run_dir:
        return False
    try:
        _journal_fd = os.open(os.path.join(run_dir, f"journal-{os.getpid()}.jsonl"),
                              os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    except OSError:
        return False
    _journal_write({"started": {"pid": os.getpid(), "argv": [str(a) for a in sys.argv]}})
    return True


def _journal_write(entry: Dict[str, Any]) -> None:
    fd = _journal_fd
    if fd is None:
        return
    try:
        os.write(fd, (json.dumps(entry) + "\n").encode("utf-8"))
    except (OSError, TypeError, ValueError):
        pass  # the journal is a fallback: never fail the program for it


def _journal_error(finding: Finding) -> None:
    from .report import finding_record

    _journal_write({"finding": finding_record(finding, _findings.strict(), os.getpid())})


def _record_error(exc: BaseException, where: str) -> None:
    import ptrbridge
    from .report import from_error

    if isinstance(exc, ptrbridge.PointerError):
        _findings.record(from_error(exc, where))


def _install_error_hooks() -> None:
    previous_excepthook = sys.excepthook
    previous_threadhook = threading.excepthook
    previous_unraisable = sys.unraisablehook

    def excepthook(kind: Any, value: Any, tb: Any) -> None:
        _record_error(value, "uncaught")
        previous_excepthook(kind, value, tb)

    def threadhook(args: Any) -> None:
        _record_error(args.exc_value, f"uncaught in thread {getattr(args.thread, 'name', '?')}")
        previous_threadhook(args)

    def unraisablehook(unraisable: Any) -> None:
        if unraisable.exc_value is not None:
            _record_error(unraisable.exc_value, "unraisable")
        previous_unraisable(unraisable)

    sys.excepthook = excepthook
    threading.excepthook = threadhook
    sys.unraisablehook = unraisablehook


def _process_findings() -> List[Finding]:
    """The process's findings at exit: kept ones, the last scans, and leaks not already reported."""
    from . import scanning

    watch_pending(_pending_watch, _matched_watch)
    # The scans first, freed Python memory first of all: every allocation made before its
    # scan (an import, say) may reuse a block the heap map has given back (its hold is
    # bounded), hiding a pointer C kept into it.
    retentions = scanning.scan_freed_python_memory()
    retentions += scanning.scan()
    from .report import from_retention, gather

    found = [from_retention(r) for r in retentions]
    if _probe is not None:
        for leak in _probe.check():
            kind = str(leak.extra.get("leak_kind", ""))
            already = _leaks_reported.get(kind, 0)
            if int(leak.extra.get("count", 0)) > already:
                found.append(leak)
    with _lock:
        kept = list(_findings_kept)
    return kept + gather(found)


def write_report(activated: bool = True) -> None:
    """Write ``report-<pid>.json`` into the run directory (once per process)."""
    global _written
    run_dir = os.environ.get(RUN_DIR_ENV)
    if _written or not run_dir:
        return
    _written = True
    if activated and _started:
        found = _process_findings()  # first: it scans
        import ptrbridge

        from .report import finding_record

        strict = _findings.strict()
        now = ptrbridge.stats()
        process: Dict[str, Any] = {
            "pid": os.getpid(),
            "argv": [str(a) for a in sys.argv],
            "activated": True,
            "check_level": ptrbridge.check_level(),
            "checked": _findings.counters(),
            "stats": {name: getattr(now, name) for name in vars(now)},
            "findings": len(found),
        }
        records = [finding_record(f, strict, os.getpid()) for f in found]
    else:
        process = {"pid": os.getpid(), "argv": [str(a) for a in sys.argv], "activated": False,
                   "check_level": None, "checked": {"calls": 0, "callbacks": 0, "lends": 0},
                   "stats": None, "findings": 0}
        records = []
    report = {"process": process, "findings": records, "tests": list(_tests),
              "watch_matched": list(_matched_watch), "notes": list(_notes)}
    path = os.path.join(run_dir, f"report-{os.getpid()}.json")
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    except OSError as exc:  # the run directory vanished: say so rather than lose it silently
        print(f"ptrbridge: could not write the run report {path}: {exc}", file=sys.stderr)
