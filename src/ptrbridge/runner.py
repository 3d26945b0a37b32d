"""``python -m ptrbridge run``: run a program or a test command with the checks on.

The command runs in a child process with ``PTRBRIDGE_CHECK`` (and the
quarantine, strict and instrumentation settings) in its environment and a
``sitecustomize.py`` on its ``PYTHONPATH`` (``ptrbridge/_run_boot.py``) that
starts :mod:`ptrbridge.runtime` in every Python process of the command - just
before the process first imports cffi, ctypes or ptrbridge, so that a program
that never touches C is not changed at all and pytest can still rewrite its
plugins' asserts - and then runs the ``sitecustomize`` it hides.

Two things differ from running the program plainly, on purpose:

* automatic retention scans *record* their findings instead of raising
  :class:`~ptrbridge.RetainedPointerError` in the program (the mode of
  ``ptrbridge.set_on_violation("collect")``); a program that calls
  ``set_on_violation`` itself gets the mode it asks for;
* cffi and ctypes are instrumented (``--no-instrument`` turns it off) and, at
  level 2, lent buffers are passed as guard-paged shadow copies
  (``--no-quarantine`` turns it off).

When the command ends, the reports of all its Python processes are merged,
a summary is printed, and ``--report FILE.json`` writes them (the schema is
in :mod:`ptrbridge.report`).  A process the quarantine kills (C used a buffer
after its call returned) cannot write its report; the fault report it printed
is also appended to a log in the run directory and recorded from there.
Exit status: the command's if it failed (128 + N, as a shell says it, when it
was killed by signal N); else 1 if a finding fails (an error, or a portability
finding with ``--strict``); else 2 if a library named with ``--watch-library``
was never loaded, or a Python process imported cffi, ctypes or ptrbridge in
an interpreter that cannot import ptrbridge (nothing in it was checked);
else 0.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Set, TextIO

from . import report as _report
from .runtime import INSTRUMENT_ENV, RUN_DIR_ENV, WATCH_ENV

__all__ = ["run_command"]

_BOOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_run_boot.py")


def run_command(command: Sequence[str], check: int = 2, quarantine: bool = True,
                watch: Sequence[str] = (), report: Optional[str] = None, strict: bool = False,
                instrument: bool = True, out: TextIO = sys.stderr) -> int:
    """Run ``command`` under ptrbridge and return the exit status described above."""
    if not command:
        print("ptrbridge run: no command given (usage: python -m ptrbridge run [options] -- COMMAND ...)",
              file=out)
        return 2
    for name in watch:
        if not name.strip():
            print("ptrbridge run: --watch-library: the library name is empty", file=out)
            return 2
    strict = strict or os.environ.get("PTRBRIDGE_STRICT", "").strip().lower() in ("1", "true", "yes", "on")
    run_dir = tempfile.mkdtemp(prefix="ptrbridge-run-")
    try:
        shutil.copyfile(_BOOT, os.path.join(run_dir, "sitecustomize.py"))
        env = dict(os.environ)
        env["PTRBRIDGE_CHECK"] = str(check)
        env[RUN_DIR_ENV] = run_dir
        env[WATCH_ENV] = os.pathsep.join(watch)
        env["PTRBRIDGE_QUARANTINE"] = "1" if quarantine else "0"
        env[INSTRUMENT_ENV] = "1" if instrument else "0"
        if strict:
            env["PTRBRIDGE_STRICT"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(p for p in (run_dir, env.get("PYTHONPATH", "")) if p)
        # A copy of every quarantine fault report, for processes that die of one (a log the
        # user asked for is theirs: it may hold older reports, so it is left alone).
        fault_log = os.path.join(run_dir, "quarantine.log") if not env.get(_LOG_ENV) else None
        if fault_log:
            env[_LOG_ENV] = fault_log
        try:
            status = subprocess.call(list(command), env=env)
        except OSError as exc:
            print(f"ptrbridge run: cannot run {command[0]!r}: {exc}", file=out)
            return 127
        reports = _read_reports(run_dir)
        faults = _read_faults(fault_log, strict) if fault_log else []
        journals = _read_journals(run_dir, {r["process"]["pid"] for r in reports})
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    summary = _merge(command, status, reports, check, strict, quarantine, instrument, watch, faults, journals)
    _print_summary(summary, out)
    if report:
        with open(report, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    return int(summary["status"])


def _read_reports(run_dir: str) -> List[Dict[str, Any]]:
    reports = []
    for path in sorted(glob.glob(os.path.join(run_dir, "report-*.json"))):
        try:
            with open(path, encoding="utf-8") as f:
                reports.append(json.load(f))
        except (OSError, ValueError) as exc:  # a process died while writing: say so
            reports.append({"process": {"pid": -1, "argv": [path], "activated": False, "check_level": None,
                                        "checked": {"calls": 0, "callbacks": 0, "lends": 0}, "stats": None,
                                        "findings": 0},
                            "findings": [], "tests": [], "watch_matched": [],
                            "notes": [f"could not read the report {os.path.basename(path)}: {exc}"]})
    return reports


def _read_journals(run_dir: str, reported: Set[int]) -> Dict[int, Dict[str, Any]]:
    """The journals (runtime._open_journal) of processes that started ptrbridge and wrote no report.

    pid -> {"argv": [...], "findings": [records]}: the errors such a process
    found before it died.
    """
    out: Dict[int, Dict[str, Any]] = {}
    for path in sorted(glob.glob(os.path.join(run_dir, "journal-*.jsonl"))):
        try:
            pid = int(os.path.basename(path)[len("journal-"):-len(".jsonl")])
        except ValueError:
            continue
        if pid in reported:
            continue
        entry: Dict[str, Any] = {"argv": [], "findings": []}
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    try:
                        item = json.loads(line)
                    except ValueError:
                        continue  # a line cut short by the crash
                    if "started" in item:
                        entry["argv"] = list(item["started"].get("argv", []))
                    elif "finding" in item:
                        entry["findings"].append(item["finding"])
        except OSError:
            continue
        out[pid] = entry
    return out


_LOG_ENV = "PTRBRIDGE_QUARANTINE_LOG"  # ptrbridge.quarantine.LOG_ENV_VAR: importing that module here
# would open a log the user set for the parent too, so the name is repeated.
_FAULT_PID = re.compile(r"^(?:READ|WRITE|ACCESS)\b.* by thread \d+ \(pid (\d+)\):", re.M)


def _read_faults(path: str, strict: bool) -> List[Dict[str, Any]]:
    """The quarantine fault reports appended to ``path`` by the command's processes, as records."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return []  # no process faulted
    from .quarantine import findings_from_report
    from .report import finding_record

    records = []
    for finding in findings_from_report(text):
        match = _FAULT_PID.search(finding.message)
        records.append(finding_record(finding, strict, int(match.group(1)) if match else None))
    return records


def _exit_status(status: int) -> int:
    """The command's status as a shell reports it: 128 + N for a child killed by signal N."""
    return 128 - status if status < 0 else status


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _merge(command: Sequence[str], status: int, reports: List[Dict[str, Any]], check: int, strict: bool,
           quarantine: bool, instrument: bool, watch: Sequence[str],
           faults: Sequence[Dict[str, Any]] = (), journals: Optional[Dict[int, Dict[str, Any]]] = None
           ) -> Dict[str, Any]:
    journals = journals or {}
    records = []
    for r in reports:
        for record in r["findings"]:
            record = dict(record, fails=record["severity"] == "error" or strict)
            records.append(record)
    for entry in journals.values():
        records.extend(dict(record, fails=True) for record in entry["findings"])
    records.extend(faults)
    checked: Dict[str, int] = {}
    for r in reports:
        for name, n in r["process"]["checked"].items():
            checked[name] = checked.get(name, 0) + int(n)
    notes: List[str] = []
    for r in reports:
        for note in r.get("notes", []):
            if note not in notes:
                notes.append(note)
    if status < 0:
        notes.append(f"the command was killed by {_signal_name(-status)}")
    reported = {r["process"]["pid"] for r in reports}
    lost = sorted({f["pid"] for f in faults if f["pid"] is not None and f["pid"] not in reported})
    if lost:
        notes.append(f"process(es) {', '.join(map(str, lost))} died of a quarantine fault (recorded above) "
                     f"before writing a report, so their other findings and counts are lost")
    silent = []
    for pid in sorted(pid for pid in journals if pid not in lost):
        found = len(journals[pid]["findings"])
        if not found:
            silent.append(pid)  # e.g. a forked worker that ended with os._exit
            continue
        argv = " ".join(journals[pid]["argv"]) or "?"
        notes.append(f"process {pid} ({argv}) started ptrbridge and died before writing its report: "
                     f"the {found} error(s) it recorded before are listed above; its other findings and "
                     f"its counts are lost")
    if silent:
        notes.append(f"{len(silent)} process(es) ({', '.join(map(str, silent))}) started ptrbridge and wrote no "
                     f"report (they died, or ended with os._exit): their findings and counts are lost")
    activated = [r for r in reports if r["process"]["activated"]]
    unavailable = [r["process"] for r in reports if r["process"].get("unavailable")]
    for executable in sorted({p.get("executable") or "?" for p in unavailable}):
        pids = ", ".join(str(p["pid"]) for p in unavailable if (p.get("executable") or "?") == executable)
        notes.append(f"process(es) {pids} imported cffi, ctypes or ptrbridge but {executable} cannot import "
                     f"ptrbridge, so nothing in them was checked: install ptrbridge into that interpreter, "
                     f"or run the command with {sys.executable}")
    if reports and not activated and not unavailable:
        notes.append("ptrbridge was never loaded: no Python process of the command imported cffi, ctypes "
                     "or ptrbridge")
    elif not reports and not faults and not journals:  # a process that died did start ptrbridge
        notes.append("no Python process of the command started ptrbridge (not Python, or run with -S/-I)")
    note = _report.checked_note(checked) if reports else None  # no report: nothing was counted
    if note:
        notes.append(note)
    matched = {name for r in reports for name in r.get("watch_matched", [])}
    unmatched = [name for name in watch if name not in matched]
    if unmatched:
        notes.append("--watch-library " + ", ".join(repr(n) for n in unmatched)
                     + ": matched no loaded library in any process, so no globals of it were scanned "
                     "(a name matches a loaded library whose path contains it)")
    failing = sum(1 for record in records if record["fails"])
    if status != 0:
        final = _exit_status(status)
    elif failing:
        final = 1
    elif unmatched or unavailable:
        final = 2
    else:
        final = 0
    return _report.build(
        "run", command, _exit_status(status), final, _report.settings(check, strict, quarantine, instrument, watch),
        records, checked, tests=[t for r in reports for t in r.get("tests", [])],
        processes=[r["process"] for r in reports], notes=notes,
    )


def _print_summary(summary: Dict[str, Any], out: TextIO) -> None:
    def write(line: str) -> None:
        print(line, file=out)

    c = summary["counts"]
    mode = "strict" if summary["settings"]["strict"] else "not strict: portability findings do not fail"
    write(f"\nptrbridge run: {' '.join(summary['command'])} -> exit status {summary['exit_status']}, "
          f"{len(summary['processes'])} Python process(es) checked")
    write(f"  {_report.checked_text(summary['checked'])}")
    write(f"  findings: {c['total']} ({c['error']} error(s), {c['portability']} portability; {mode})")
    _report.print_findings(summary["findings"], write)
    for p in summary["processes"]:
        s = p.get("stats")
        if p.get("unavailable"):
            write(f"  pid {p['pid']}: ptrbridge not loaded: {p.get('executable') or 'its interpreter'} cannot "
                  f"import it ({p['unavailable']})")
            continue
        if not p["activated"] or not s:
            write(f"  pid {p['pid']}: ptrbridge not loaded (no cffi, ctypes or ptrbridge imported)")
            continue
        write(
            f"  C memory (pid {p['pid']}): {s['allocations']} allocations, {s['frees']} frees, "
            f"{s['live_blocks']} live blocks ({s['live_bytes']} bytes), peak {s['peak_bytes']} bytes, "
            f"{s['transferred']} transferred, {s['live_handles']} live handles, {s['live_pins']} live pins"
        )
    for note in summary["notes"]:
        write(f"  note: {note}")
    if summary["status"] != summary["exit_status"]:
        write(f"  ptrbridge run exits with status {summary['status']}")
    write(f"SUMMARY: ptrbridge: {c['error']} error(s), {c['portability']} portability finding(s), "
          f"{c['failing']} failing; {_report.checked_text(summary['checked'])}")
