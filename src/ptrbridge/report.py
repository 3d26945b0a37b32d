"""The harness's verdict and report, shared by the pytest plugin and ``python -m ptrbridge run``.

Every check ends up as a :class:`~ptrbridge.findings.Finding`: the ones other
parts record with :func:`findings.record`, and the ones this module makes
from what the older interfaces return - retentions found by the scanner
(:func:`from_retention`), leaks between two snapshots (:class:`LeakProbe`),
and ptrbridge errors raised in a test or a process (:func:`from_error`).
:func:`gather` collects them all, once each.

The JSON report
---------------
``pytest --ptrbridge-report=FILE.json`` and ``python -m ptrbridge run
--report FILE.json`` write one JSON object, described by :data:`SCHEMA` (a
JSON Schema, draft 2020-12 subset) and checked by :func:`validate`:

``schema``
    ``"ptrbridge-report/1"``.
``tool``
    ``{"name": "ptrbridge", "version": ...}``.
``source``
    ``"pytest"`` or ``"run"``.
``command``
    the command line (list of str) and ``exit_status``, its exit status
    (pytest's session status; for ``run``, the command's).
``status``
    the exit status ptrbridge gave (what the shell sees).
``settings``
    ``check_level``, ``strict``, ``quarantine``, ``instrument`` and
    ``watch`` (libraries named to watch).
``counts``
    ``error``, ``portability`` (findings of each severity), ``failing``
    (those that fail under this run's strictness) and ``total``.
``checked``
    how much was checked: ``calls``, ``callbacks``, ``lends`` (and any other
    counter of :func:`findings.counters`); all zero means nothing was
    instrumented or wrapped, and the report says so in ``notes``.
``findings``
    a list of finding records: every field of :class:`Finding` (``kind``,
    ``severity``, ``rule``, ``message``, ``object``, ``object_size``,
    ``created_at``, ``function``, ``lent_at``, ``holder``, ``state``,
    ``test``, ``extra``) plus ``fails`` (bool) and ``pid`` (int or null).
``tests``
    one record per test that ran under the plugin: ``nodeid``,
    ``outcome``, ``checked`` (its own counters), ``findings`` and
    ``failing`` (how many).
``processes``
    for ``run``: one record per Python process (``pid``, ``argv``,
    ``activated`` - whether ptrbridge was loaded in it at all -,
    ``check_level``, ``checked``, ``stats`` (see :class:`~ptrbridge.Stats`),
    ``findings``, and, for a process whose interpreter could not import
    ptrbridge when the program needed it, ``unavailable`` (the import error)
    and ``executable``); the plugin writes its own process.
``notes``
    sentences a person should read (nothing checked, a watched library that
    never loaded).
"""
from __future__ import annotations

import collections
import dataclasses
import gc
import os
import re
import sys
import traceback
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from . import findings as _findings
from .findings import Finding

__all__ = [
    "SCHEMA",
    "SCHEMA_ID",
    "LeakProbe",
    "from_retention",
    "from_error",
    "gather",
    "counts",
    "checked_note",
    "finding_record",
    "build",
    "validate",
]

SCHEMA_ID = "ptrbridge-report/1"

# --- findings made from the older interfaces -------------------------------------

_SIZE = re.compile(r"\((\d+)(?: bytes)?\)")


def _size_of(description: str) -> Optional[int]:
    match = _SIZE.search(description or "")
    return int(match.group(1)) if match else None


def from_retention(retention: Any) -> Finding:
    """A :class:`Finding` for a :class:`~ptrbridge.Retention` (C holds a pointer it was lent).

    C merely *holding* a pointer is a portability finding: correct libraries
    keep stale pointers (zlib's ``next_in``); only C *using* them is an error,
    which the quarantine and the poisoned hold catch.
    """
    state = getattr(retention, "state", "")
    return Finding(
        kind="retained-freed" if state == "freed" else "retained-live",
        severity="portability",
        rule="R2",
        message=str(retention),
        object=retention.description,
        object_size=_size_of(retention.description),
        function=retention.function,
        lent_at=retention.lent_at,
        holder=retention.root,
        state=state,
        extra={"root_kind": retention.root_kind, "offset": retention.offset,
               "address": retention.address, "object_offset": retention.object_offset},
    )


_RULE_OF_ERROR = {
    "NestedPointerError": "R1",
    "UseAfterFreeError": "use-after-free",
    "RetainedPointerError": "R2",
    "CallbackResultError": "R4",
    "ReleasedCallbackError": "released-callback",
    "UseAfterTransferError": "use-after-transfer",
    "DoubleFreeError": "double-free",
    "NotOwnedError": "not-owned",
    "HandleLimitError": "leak",
    "InvalidHandleError": "invalid-handle",
}


def _user_site(tb: Any) -> Optional[str]:
    """file:line of the innermost traceback frame outside ptrbridge (where the user's code raised)."""
    from .callsite import _is_internal, format_location

    site = None
    for frame, lineno in traceback.walk_tb(tb):
        if not _is_internal(frame.f_code.co_filename):
            site = format_location((frame.f_code.co_filename, lineno))
    return site


def from_error(exc: BaseException, where: str = "") -> Finding:
    """A :class:`Finding` (kind ``"error-raised"``) for a ptrbridge error raised in a test or process."""
    name = type(exc).__name__
    site = _user_site(exc.__traceback__)
    at = f" at {site}" if site else ""
    return Finding(
        kind="error-raised",
        severity="error",
        rule=_RULE_OF_ERROR.get(name, "api"),
        message=f"ptrbridge: {name} raised{at}{f' ({where})' if where else ''}: {exc}",
        lent_at=site,
        state="raised",
        extra={"exception": f"{type(exc).__module__}.{type(exc).__qualname__}"},
    )


# --- leaks ------------------------------------------------------------------------

_LEAK_TEXT = {
    "c_memory": "tracked C block(s)",
    "handles": "handle(s)",
    "pins": "pin(s)",
    "transferred": "buffer(s) transferred to C",
}
_LEAK_FIX = {
    "c_memory": "memory from pb_malloc/CBuffer/cnew or a library routed through c_allocator() was never freed",
    "handles": "Handle objects neither deleted (Handle.delete) nor released by C (pb_handle_release)",
    "pins": "a Pinner still holds them (call unpin() or use 'with')",
    "transferred": "never freed by C: CBuffer.transfer() without a matching pb_free",
}


def _leak_kind_of_resource(kind: str) -> str:
    text = kind.lower()
    if "handle" in text:
        return "handles"
    if "pin" in text:
        return "pins"
    if "transfer" in text:
        return "transferred"
    return "c_memory"


ResourceKey = Tuple[str, str, str, Any]


def _live_resources() -> Optional[List[ResourceKey]]:
    """(kind, description, created_at, address) of every live resource, or None where the registry cannot say.

    Uses ``ptrbridge.stats.live_resources()`` (records with ``kind``,
    ``description``, ``created_at`` and ``address``).
    """
    import importlib

    fn = getattr(importlib.import_module("ptrbridge.stats"), "live_resources", None)
    if fn is None:
        return None
    out = []
    for r in fn():
        get = r.get if isinstance(r, dict) else (lambda name, r=r: getattr(r, name, None))
        out.append((str(get("kind") or "?"), str(get("description") or "?"), str(get("created_at") or ""),
                    get("address")))
    return out


def _settle() -> None:
    from .handles import collect_handles

    gc.collect()
    if collect_handles():
        gc.collect()  # dropping released handles' objects may free more


_COUNTED = ("allocations", "frees", "live_blocks", "transferred", "live_handles", "live_pins")


class LeakProbe:
    """Leaks between construction and :meth:`check`, at as little cost as a clean test allows.

    No garbage collection when nothing of ptrbridge's happened: the registry's
    counters are compared first, and the collector runs only if one of them
    changed.  Creation sites come from ``stats.live_resources()`` when the
    registry has it (snapshot taken only if resources were live at the start).
    """

    def __init__(self) -> None:
        from .stats import stats

        self.before = stats()
        self._before_res: Optional[collections.Counter] = None
        if any(getattr(self.before, n) for n in ("live_blocks", "live_handles", "live_pins", "transferred")):
            res = _live_resources()
            self._before_res = collections.Counter(res) if res is not None else None
        else:
            self._before_res = collections.Counter()

    def check(self, allow: Iterable[str] = ()) -> List[Finding]:
        from .stats import stats
        from .testing import LEAK_KINDS

        allowed = set(allow)
        unknown = allowed - set(LEAK_KINDS)
        if unknown:
            raise ValueError(f"ptrbridge: unknown leak kind(s) {sorted(unknown)}; known: {', '.join(LEAK_KINDS)}")
        now = stats()
        if all(getattr(now, n) == getattr(self.before, n) for n in _COUNTED):
            return []
        _settle()
        now = stats()
        grown = {
            # a transferred block is C's now: it counts as "transferred", not as Python's C memory
            "c_memory": (now.live_blocks - self.before.live_blocks) - (now.transferred - self.before.transferred),
            "handles": now.live_handles - self.before.live_handles,
            "pins": now.live_pins - self.before.live_pins,
            "transferred": now.transferred - self.before.transferred,
        }
        grown = {k: v for k, v in grown.items() if v > 0 and k not in allowed}
        if not grown:
            return []
        sites: Dict[str, List[Tuple[Tuple[str, str, str], int]]] = {}
        res = _live_resources()
        if res is not None and self._before_res is not None:
            new = collections.Counter(res) - self._before_res
            grouped: Dict[Tuple[str, str, str], int] = collections.Counter()
            for key, n in new.items():
                grouped[key[:3]] += n
            for key3, n in sorted(grouped.items()):
                sites.setdefault(_leak_kind_of_resource(key3[0]), []).append((key3, n))
        out = []
        for kind, n in grown.items():
            extra: Dict[str, Any] = {"leak_kind": kind, "count": n}
            size = None
            if kind == "c_memory" and not (now.transferred - self.before.transferred):
                size = now.live_bytes - self.before.live_bytes
                extra["bytes"] = size
            where = sites.get(kind, [])
            if where:
                named = "; ".join(f"{desc}{f' x{k}' if k > 1 else ''} created at {site or '<unknown>'}"
                                  for (_kind, desc, site), k in where[:10])
                more = f"; and {len(where) - 10} more" if len(where) > 10 else ""
                extra["resources"] = [{"kind": r[0], "description": r[1], "created_at": r[2], "count": k}
                                      for r, k in where]
                detail = f": {named}{more}"
            else:
                detail = ""
            bytes_text = f" ({size} bytes)" if size is not None else ""
            out.append(Finding(
                kind="leak",
                severity="error",
                rule="leak",
                message=f"ptrbridge: leaked {n} {_LEAK_TEXT[kind]}{bytes_text}{detail} ({_LEAK_FIX[kind]})",
                object=where[0][0][1] if len(where) == 1 else _LEAK_TEXT[kind],
                object_size=size,
                created_at=(where[0][0][2] or None) if where else None,
                state="live",
                extra=extra,
            ))
        return out


# --- gathering --------------------------------------------------------------------

def _key(f: Finding) -> Tuple[Any, ...]:
    return (f.kind, f.object, f.lent_at, f.holder, f.state, f.message if f.kind in ("leak", "error-raised") else "")


def gather(extra: Sequence[Finding] = ()) -> List[Finding]:
    """Every finding recorded since the last gather (plus ``extra``), each once.

    Takes :func:`findings.take`, the scanner's collected retentions
    (:func:`ptrbridge.clear_violations`), converted with :func:`from_retention`,
    and the quarantine's kept reads (:func:`quarantine.take_kept_reads`).
    """
    from . import quarantine, scanning

    found = (list(extra) + _findings.take() + [from_retention(r) for r in scanning.clear_violations()]
             + quarantine.take_kept_reads())
    seen = set()
    out = []
    for f in found:
        key = _key(f)
        if key in seen:
            continue
        seen.add(key)
        out.append(f)
    return out


def counts(found: Sequence[Finding], strict: bool) -> Dict[str, int]:
    """``{"error", "portability", "failing", "total"}`` for a list of findings."""
    errors = sum(1 for f in found if f.severity == "error")
    portability = len(found) - errors
    return {"error": errors, "portability": portability, "failing": errors + (portability if strict else 0),
            "total": len(found)}


def checked_note(checked: Dict[str, int]) -> Optional[str]:
    """The sentence to print when nothing was checked."""
    if checked.get("calls", 0) == 0:
        return ("checked 0 calls to C: no call went through an instrumented or wrapped library, so no argument or "
                "lend was checked (leaks, retention scans and raised errors still were)")
    return None


def checked_text(checked: Dict[str, int]) -> str:
    return (f"checked {checked.get('calls', 0)} call(s), {checked.get('callbacks', 0)} callback(s), "
            f"{checked.get('lends', 0)} lend(s)")


def finding_record(f: Finding, strict: bool, pid: Optional[int] = None) -> Dict[str, Any]:
    """The JSON record of one finding."""
    data = f.to_json()
    data["extra"] = _jsonable(data.get("extra") or {})
    data["fails"] = f.severity == "error" or strict
    data["pid"] = pid
    return data


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def settings(check_level: int, strict: bool, quarantine: bool, instrument: bool,
             watch: Sequence[str]) -> Dict[str, Any]:
    return {"check_level": check_level, "strict": strict, "quarantine": quarantine, "instrument": instrument,
            "watch": list(watch)}


def build(source: str, command: Sequence[str], exit_status: int, status: int, settings: Dict[str, Any],
          records: List[Dict[str, Any]], checked: Dict[str, int], tests: Sequence[Dict[str, Any]] = (),
          processes: Sequence[Dict[str, Any]] = (), notes: Sequence[str] = ()) -> Dict[str, Any]:
    """Assemble a report (see the module docstring); ``records`` are :func:`finding_record` dicts."""
    from . import __version__

    errors = sum(1 for r in records if r["severity"] == "error")
    return {
        "schema": SCHEMA_ID,
        "tool": {"name": "ptrbridge", "version": __version__},
        "source": source,
        "command": list(command),
        "exit_status": exit_status,
        "status": status,
        "settings": settings,
        "counts": {"error": errors, "portability": len(records) - errors,
                   "failing": sum(1 for r in records if r["fails"]), "total": len(records)},
        "checked": {"calls": 0, "callbacks": 0, "lends": 0, **checked},
        "findings": records,
        "tests": list(tests),
        "processes": list(processes),
        "notes": list(notes),
    }


# --- the schema --------------------------------------------------------------------

_STR_OR_NULL = {"type": ["string", "null"]}
_COUNTERS = {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0},
             "required": ["calls", "callbacks", "lends"]}
FINDING_SCHEMA: Dict[str, Any] = {
    "type": "object",
    "required": ["kind", "severity", "rule", "message", "object", "object_size", "created_at", "function",
                 "lent_at", "holder", "state", "test", "extra", "fails", "pid"],
    "additionalProperties": False,
    "properties": {
        "kind": {"enum": ["dangling-argument", "nested-unpinned", "retained-live", "retained-freed",
                          "use-after-release", "use-after-free", "overrun", "callback-result",
                          "collected-callback", "released-callback", "collected-handle", "immutable-write", "leak",
                          "call-timeout", "error-raised"]},
        "severity": {"enum": list(_findings.SEVERITIES)},
        "rule": {"type": "string"},
        "message": {"type": "string", "minLength": 1},
        "object": _STR_OR_NULL,
        "object_size": {"type": ["integer", "null"]},
        "created_at": _STR_OR_NULL,
        "function": _STR_OR_NULL,
        "lent_at": _STR_OR_NULL,
        "holder": _STR_OR_NULL,
        "state": _STR_OR_NULL,
        "test": _STR_OR_NULL,
        "extra": {"type": "object"},
        "fails": {"type": "boolean"},
        "pid": {"type": ["integer", "null"]},
    },
}
SCHEMA: Dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "ptrbridge report",
    "type": "object",
    "required": ["schema", "tool", "source", "command", "exit_status", "status", "settings", "counts",
                 "checked", "findings", "tests", "processes", "notes"],
    "additionalProperties": False,
    "properties": {
        "schema": {"const": SCHEMA_ID},
        "tool": {"type": "object", "required": ["name", "version"],
                 "properties": {"name": {"const": "ptrbridge"}, "version": {"type": "string"}}},
        "source": {"enum": ["pytest", "run"]},
        "command": {"type": "array", "items": {"type": "string"}},
        "exit_status": {"type": "integer"},
        "status": {"type": "integer"},
        "settings": {
            "type": "object",
            "required": ["check_level", "strict", "quarantine", "instrument", "watch"],
            "properties": {
                "check_level": {"enum": [0, 1, 2]},
                "strict": {"type": "boolean"},
                "quarantine": {"type": "boolean"},
                "instrument": {"type": "boolean"},
                "watch": {"type": "array", "items": {"type": "string"}},
            },
        },
        "counts": {"type": "object", "required": ["error", "portability", "failing", "total"],
                   "additionalProperties": {"type": "integer", "minimum": 0}},
        "checked": _COUNTERS,
        "findings": {"type": "array", "items": FINDING_SCHEMA},
        "tests": {"type": "array", "items": {
            "type": "object", "required": ["nodeid", "outcome", "checked", "findings", "failing"],
            "properties": {"nodeid": {"type": "string"}, "outcome": {"enum": ["passed", "failed", "skipped"]},
                           "checked": _COUNTERS, "findings": {"type": "integer", "minimum": 0},
                           "failing": {"type": "integer", "minimum": 0}}}},
        "processes": {"type": "array", "items": {
            "type": "object", "required": ["pid", "argv", "activated", "check_level", "checked", "stats", "findings"],
            "properties": {"pid": {"type": "integer"}, "argv": {"type": "array", "items": {"type": "string"}},
                           "activated": {"type": "boolean"}, "check_level": {"enum": [0, 1, 2, None]},
                           "checked": _COUNTERS, "stats": {"type": ["object", "null"]},
                           "findings": {"type": "integer", "minimum": 0},
                           "unavailable": {"type": "string"}, "executable": {"type": "string"}}}},
        "notes": {"type": "array", "items": {"type": "string"}},
    },
}

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _type_ok(value: Any, name: str) -> bool:
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _TYPES[name])


def validate(data: Any, schema: Optional[Dict[str, Any]] = None, path: str = "$") -> List[str]:
    """Check ``data`` against :data:`SCHEMA` (or ``schema``); returns the problems, [] if none.

    Implements the keywords the schema uses: ``type``, ``enum``, ``const``,
    ``required``, ``properties``, ``additionalProperties``, ``items``,
    ``minimum``, ``minLength``.
    """
    schema = SCHEMA if schema is None else schema
    problems: List[str] = []
    types = schema.get("type")
    if types is not None:
        names = types if isinstance(types, list) else [types]
        if not any(_type_ok(data, n) for n in names):
            return [f"{path}: expected {' or '.join(names)}, got {type(data).__name__} {data!r:.60}"]
    if "enum" in schema and data not in schema["enum"]:
        problems.append(f"{path}: {data!r} is not one of {schema['enum']}")
    if "const" in schema and data != schema["const"]:
        problems.append(f"{path}: {data!r} is not {schema['const']!r}")
    if "minimum" in schema and isinstance(data, (int, float)) and data < schema["minimum"]:
        problems.append(f"{path}: {data} < {schema['minimum']}")
    if "minLength" in schema and isinstance(data, str) and len(data) < schema["minLength"]:
        problems.append(f"{path}: shorter than {schema['minLength']}")
    if isinstance(data, dict):
        for name in schema.get("required", ()):
            if name not in data:
                problems.append(f"{path}: missing {name!r}")
        props = schema.get("properties", {})
        additional = schema.get("additionalProperties", True)
        for name, value in data.items():
            if name in props:
                problems += validate(value, props[name], f"{path}.{name}")
            elif additional is False:
                problems.append(f"{path}: unexpected property {name!r}")
            elif isinstance(additional, dict):
                problems += validate(value, additional, f"{path}.{name}")
    if isinstance(data, list) and "items" in schema:
        for i, value in enumerate(data):
            problems += validate(value, schema["items"], f"{path}[{i}]")
    return problems


def print_findings(found: Sequence[Dict[str, Any]], write: Any, indent: str = "    ") -> None:
    """Write each finding record's message, errors first, marking the ones that do not fail."""
    for record in sorted(found, key=lambda r: r["severity"] != "error"):
        tag = "ERROR" if record["severity"] == "error" else "portability"
        where = f" [{record['test']}]" if record.get("test") else ""
        message = record["message"]
        if "\n" in message:  # a quarantine fault report, printed in full when it happened
            message = message.split("\n", 1)[0] + " (full report above, and in the JSON report)"
        write(f"{indent}{tag}{'' if record['fails'] else ' (does not fail: not strict)'}{where}: {message}")


def pid() -> int:
    return os.getpid()


def argv() -> List[str]:
    return [str(a) for a in sys.argv]


def replace_test(f: Finding, nodeid: str) -> Finding:
    return f if f.test == nodeid else dataclasses.replace(f, test=nodeid)
