"""Findings: every problem ptrbridge detects, as one structured record.

Every check (the argument checker, the retention scanner, the quarantine, the
callback checks, the leak accounting, an uncaught ptrbridge error) turns what
it saw into a :class:`Finding` and hands it to :func:`record`.  The pytest
plugin and ``python -m ptrbridge run`` read them back with :func:`take` and
print them, write them into the JSON report (``Finding.to_json``), and decide
what fails: a finding whose ``severity`` is ``"error"`` always does, a
``"portability"`` finding only in strict mode (:func:`strict`,
``PTRBRIDGE_STRICT=1`` or ``--ptrbridge-strict``).

Severity:

* ``"error"`` - a memory-safety bug in CPython as it is: a pointer to freed
  Python memory at a call, C using memory after its lend ended, a callback
  result that dies on return, a collected callback called from C, a leak.
* ``"portability"`` - correct under CPython today, wrong under Go's rules taken
  literally or a moving collector: a nested pointer to unpinned live memory,
  C still holding (not shown to use) a pointer into memory it was lent.

Counters (:func:`count`, :func:`counters`) say how much was checked, so a
run that checked nothing can say so.
"""
from __future__ import annotations

import os
import threading
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional

__all__ = [
    "Finding",
    "SEVERITIES",
    "STRICT_ENV",
    "record",
    "take",
    "peek",
    "strict",
    "set_strict",
    "fails",
    "count",
    "counters",
    "reset_counters",
]

SEVERITIES = ("error", "portability")
STRICT_ENV = "PTRBRIDGE_STRICT"
_MAX_KEPT = 10_000  # beyond this, findings are counted but not kept


@dataclass(frozen=True)
class Finding:
    """One problem, with every field a report or a tool needs.

    ``kind`` names what happened, one of:
    ``"dangling-argument"`` (a pointer to freed Python memory passed to C),
    ``"nested-unpinned"`` (R1: nested pointer to unpinned live Python memory),
    ``"retained-live"`` (R2: C still points into live memory it was lent),
    ``"retained-freed"`` (R2: C points into Python memory freed since),
    ``"use-after-release"`` (C touched lent memory after the lend ended),
    ``"use-after-free"`` (C used, during a call, a pointer it had kept into
    memory freed since: a quarantine trap),
    ``"overrun"`` (C accessed past the end of a lent buffer),
    ``"callback-result"`` (R4), ``"collected-callback"``, ``"released-callback"``,
    ``"collected-handle"`` (``ffi.from_handle`` given a handle collected since),
    ``"immutable-write"`` (C wrote into a ``bytes`` it was lent: the quarantine saw it),
    ``"leak"`` (a handle, pin, C block or transferred buffer never given back),
    ``"call-timeout"`` (R3), ``"error-raised"`` (a ptrbridge error raised in
    the program or test).
    """

    kind: str
    severity: str
    rule: str  # "R1".."R4", "leak", "use-after-free", ...
    message: str  # the full human-readable report
    object: Optional[str] = None  # e.g. "bytes(4096)"
    object_size: Optional[int] = None
    created_at: Optional[str] = None  # file:line where the object was created, when known
    function: Optional[str] = None  # the C function of the lending call
    lent_at: Optional[str] = None  # file:line of the lending call
    holder: Optional[str] = None  # where C holds the pointer, in words
    state: Optional[str] = None  # "lent", "returned", "unpinned", "freed", ...
    test: Optional[str] = None  # pytest node id, filled in by the plugin
    extra: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"ptrbridge.Finding: severity must be one of {SEVERITIES}, not {self.severity!r}")

    def to_json(self) -> Dict[str, Any]:
        """A JSON-serialisable dict of every field."""
        return asdict(self)

    def __str__(self) -> str:
        return self.message


_lock = threading.Lock()
_findings: List[Finding] = []
_dropped = 0
_strict: Optional[bool] = None
_counters: Dict[str, int] = {"calls": 0, "callbacks": 0, "lends": 0}


_on_error: Optional[Callable[[Finding], None]] = None  # called for each error recorded (run's journal)


def record(finding: Finding) -> None:
    """Add a finding to the process's list (thread-safe)."""
    global _dropped
    with _lock:
        if len(_findings) < _MAX_KEPT:
            _findings.append(finding)
        else:
            _dropped += 1
    if _on_error is not None and finding.severity == "error":
        _on_error(finding)


def on_error(callback: Optional[Callable[[Finding], None]]) -> None:
    """Call ``callback`` with every error finding as it is recorded (None: stop).

    ``python -m ptrbridge run`` writes them down at once, so that a process
    that dies of the bug (the C code reading freed memory after the call was
    reported) still has them in the run's summary.
    """
    global _on_error
    _on_error = callback


def take() -> List[Finding]:
    """Return every finding recorded since the last ``take`` and forget them."""
    global _findings
    with _lock:
        found, _findings = _findings, []
    return found


def peek() -> List[Finding]:
    """Return the findings recorded since the last ``take``, keeping them."""
    with _lock:
        return list(_findings)


# strict() runs on hot paths (once per nested-unpinned slot when instrumenting): parsing
# os.environ each time costs ~1 us.  The parsed answer is cached against the raw value,
# which is read from os.environ's backing dict (one dict lookup; os.environ, putenv and
# monkeypatch.setenv all update it), so a change of the variable is still seen at once.
_ENV_DATA: Any = getattr(os.environ, "_data", None)
_ENV_KEY: Any = os.environ.encodekey(STRICT_ENV) if _ENV_DATA is not None else None  # type: ignore[attr-defined]
_env_cache: List[Any] = [object(), False]  # [raw value last parsed, its answer]


def _parse_strict(raw: Optional[str]) -> bool:
    return (raw or "").strip().lower() in ("1", "true", "yes", "on")


def strict() -> bool:
    """Whether portability findings fail (``PTRBRIDGE_STRICT=1`` or :func:`set_strict`)."""
    if _strict is not None:
        return _strict
    if _ENV_DATA is None:
        return _parse_strict(os.environ.get(STRICT_ENV))
    raw = _ENV_DATA.get(_ENV_KEY)
    cache = _env_cache
    if raw is not cache[0]:
        cache[1] = _parse_strict(os.environ.get(STRICT_ENV))
        cache[0] = raw
    return cache[1]


def set_strict(on: Optional[bool]) -> Optional[bool]:
    """Set strict mode (``None``: follow ``PTRBRIDGE_STRICT`` again); returns the old setting."""
    global _strict
    if on is not None and not isinstance(on, bool):
        raise TypeError(f"ptrbridge.set_strict: expected True, False or None, not {type(on).__name__}")
    old, _strict = _strict, on
    return old


def fails(finding: Finding) -> bool:
    """Whether ``finding`` fails a test or a run under the current strictness."""
    return finding.severity == "error" or strict()


def count(name: str, n: int = 1) -> None:
    """Add ``n`` to the counter ``name`` ("calls", "callbacks", "lends", or a new one)."""
    # A plain dict update: atomic enough under the GIL for counting, and cheap.
    _counters[name] = _counters.get(name, 0) + n


# The checked calls' C fast path (csrc/pycall.c) counts "calls" and level 2's "lends" in C;
# these take its counts (and zero them), set by calls.py.  Folded in before the counters are
# read or reset.
_take_native_calls: Optional[Callable[[], int]] = None
_take_native_lends: Optional[Callable[[], int]] = None


def _fold_native() -> None:
    for name, take in (("calls", _take_native_calls), ("lends", _take_native_lends)):
        if take is not None:
            n = take()
            if n:
                _counters[name] = _counters.get(name, 0) + n


def counters() -> Dict[str, int]:
    """A copy of the counters."""
    _fold_native()
    return dict(_counters)


def reset_counters() -> Dict[str, int]:
    """Zero the counters and return their values before."""
    _fold_native()
    old = dict(_counters)
    for name in _counters:
        _counters[name] = 0
    return old
