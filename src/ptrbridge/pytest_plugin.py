"""The active part of the pytest plugin (see ``ptrbridge_pytest``): loaded only when ptrbridge is on."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Generator, List, Optional

import pytest

from . import findings as _findings
from .findings import Finding

__all__ = ["Harness", "StatsProbe"]


class StatsProbe:
    """What the ``ptrbridge_stats`` fixture returns."""

    def __init__(self) -> None:
        from .testing import settle
        from .stats import stats

        settle()
        self.before = stats()

    def now(self) -> Any:
        """Current counters (after garbage collection)."""
        from .testing import settle
        from .stats import stats

        settle()
        return stats()

    def delta(self) -> Dict[str, int]:
        """How each counter changed since setup."""
        now = self.now()
        return {name: getattr(now, name) - getattr(self.before, name) for name in vars(now)}


def _delta(before: Dict[str, int], after: Dict[str, int]) -> Dict[str, int]:
    names = set(before) | set(after) | {"calls", "callbacks", "lends"}
    return {name: after.get(name, 0) - before.get(name, 0) for name in sorted(names)}


def _has_python_visible_roots() -> bool:
    """Whether any C memory a retention scan reads exists: tracked blocks, roots, watched libraries."""
    from . import scanning
    from .stats import stats

    return bool(stats().live_blocks or getattr(scanning, "_roots", True) or getattr(scanning, "_libraries", True))


class Harness:
    """The active part of the plugin, registered only when ptrbridge is on.

    Per test: the leak probe (counters compared, garbage collected only if
    one changed), a scan for what the test's calls lent (queued targets), at
    level 2 a scan for pointers into Python memory freed during the test
    when there is C memory to scan, the findings recorded by the checks, and
    a ptrbridge error that fails the test.  Error findings fail the test;
    portability findings only in strict mode.
    """

    def __init__(self, level: int, watch: List[str], strict: bool = False, instrument: bool = True,
                 quarantine: bool = True, report_path: Optional[str] = None) -> None:
        import ptrbridge
        from . import runtime
        from .report import gather

        runtime.start()  # under `python -m ptrbridge run` (a no-op otherwise): the process's side first
        self.level = level
        self.pending_watch = list(watch)
        self.watch = list(watch)
        self.matched_watch: List[str] = []
        self.report_path = report_path
        self.notes: List[str] = []
        ptrbridge.set_check_level(level)
        # Retention findings are recorded and attributed to tests at teardown, not raised mid-test.
        ptrbridge.set_on_violation("collect")
        if strict:
            _findings.set_strict(True)
        self.quarantine = bool(quarantine and level >= 2)
        if self.quarantine:
            ptrbridge.set_quarantine(True)
        self.instrument = bool(instrument and level >= 1)
        if self.instrument:
            from .runtime import instrument_now

            note = instrument_now()
            if note:
                self.notes.append(note)
                self.instrument = False
        self.session_findings: List[Finding] = gather()  # anything recorded before the session
        self.start_counters = _findings.counters()
        self.test_findings: Dict[str, List[Finding]] = {}
        self.tests: Dict[str, Dict[str, Any]] = {}
        self._pending: Dict[str, List[Finding]] = {}
        self._counters: Dict[str, Dict[str, int]] = {}

    def report_to_copy_of_stderr(self) -> None:
        """Send a copy of quarantine fault reports to a duplicate of today's fd 2.

        Unless a report log is set already (``python -m ptrbridge run`` sets one
        to collect the reports of the processes it runs).
        """
        from . import quarantine
        from ._bindings import lib

        if os.environ.get(quarantine.LOG_ENV_VAR):
            return
        fd = os.dup(2)
        os.set_inheritable(fd, False)
        old = int(lib.pb__quarantine_set_log_fd(fd))
        if old >= 0:  # someone set a log already: keep theirs
            lib.pb__quarantine_set_log_fd(old)
            os.close(fd)

    # --- settings read at the end ---------------------------------------------------

    @property
    def strict(self) -> bool:
        return _findings.strict()

    def _watch_loaded_libraries(self) -> None:
        if self.pending_watch:
            from .runtime import watch_pending

            watch_pending(self.pending_watch, self.matched_watch)

    # --- per test -------------------------------------------------------------------

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: Any) -> Generator[None, Any, Any]:
        import ptrbridge
        from . import scanning
        from .report import LeakProbe, from_error, from_retention, gather

        marker = item.get_closest_marker("ptrbridge")
        level = self.level
        allow: List[str] = []
        if marker is not None:
            level = marker.kwargs.get("level", level)
            allow = list(marker.kwargs.get("allow_leaks", ()))
        self._watch_loaded_libraries()
        old = ptrbridge.set_check_level(level) if level != ptrbridge.check_level() else None
        raised: Optional[BaseException] = None
        try:
            found = gather()  # recorded since the setup phase's report: this test's fixtures
            before = _findings.counters()
            probe = LeakProbe()
            try:
                return (yield)  # the test body; its own failure propagates unchanged
            except BaseException as exc:
                raised = exc
                raise
            finally:
                self._watch_loaded_libraries()
                extra = []
                if isinstance(raised, ptrbridge.PointerError):
                    extra.append(from_error(raised, "failed the test"))
                extra += probe.check(allow)  # collects garbage: the test's objects are freed now
                if level >= 2:  # before anything else allocates (see runtime._process_findings)
                    extra += [from_retention(r) for r in self._scan_freed()]
                extra += [from_retention(r) for r in scanning.scan()]
                self._counters[item.nodeid] = _delta(before, _findings.counters())
                self._pending[item.nodeid] = found + gather(extra)
        finally:
            if old is not None:
                ptrbridge.set_check_level(old)

    @staticmethod
    def _scan_freed() -> List[Any]:
        """Pointers into Python memory freed during the test, if there is C memory that could hold one."""
        from . import heapmap, scanning

        if not heapmap.installed() or not _has_python_visible_roots():
            return []
        return scanning.scan_freed_python_memory()

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: Any, call: Any) -> Generator[None, Any, Any]:
        from .report import gather, replace_test

        report = yield
        nodeid = item.nodeid
        if call.when == "call":
            found = self._pending.pop(nodeid, [])
        else:
            found = gather()
        found = [replace_test(f, nodeid) for f in found]
        record = self.tests.setdefault(nodeid, {"nodeid": nodeid, "outcome": "passed",
                                                "checked": _delta({}, {}), "findings": 0, "failing": 0})
        if call.when == "call":
            record["checked"] = self._counters.pop(nodeid, record["checked"])
        if found:
            self.test_findings.setdefault(nodeid, []).extend(found)
            strict = self.strict
            failing = [f for f in found if f.severity == "error" or strict]
            record["findings"] += len(found)
            record["failing"] += len(failing)
            text = _format_findings(found, strict)
            if failing and report.passed:
                report.outcome = "failed"
                report.longrepr = f"ptrbridge found problems in this test ({call.when}):\n{text}"
            else:
                report.sections.append((f"ptrbridge findings ({call.when})", text))
        if report.failed:
            record["outcome"] = "failed"
        elif report.skipped and record["outcome"] != "failed":
            record["outcome"] = "skipped"
        return report

    # --- the end ----------------------------------------------------------------------

    def _session_end_findings(self) -> None:
        from . import heapmap, scanning
        from .report import from_retention, gather

        self._watch_loaded_libraries()
        extra = []
        if self.level >= 2 and heapmap.installed():
            extra += [from_retention(r) for r in scanning.scan_freed_python_memory()]
        extra += [from_retention(r) for r in scanning.scan()]
        self.session_findings += gather(extra)

    def _all(self) -> List[Finding]:
        return [f for fs in self.test_findings.values() for f in fs] + self.session_findings

    def pytest_sessionfinish(self, session: Any, exitstatus: Any) -> None:
        self._session_end_findings()
        strict = self.strict
        if any(f.severity == "error" or strict for f in self.session_findings) and session.exitstatus == 0:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
        if self.pending_watch:
            self.notes.append(
                "ptrbridge: --ptrbridge-watch " + ", ".join(repr(n) for n in self.pending_watch)
                + ": matched no loaded library during the whole session, so no globals of it were scanned "
                "(a name matches a loaded library whose path contains it)"
            )
            if session.exitstatus == 0:
                session.exitstatus = pytest.ExitCode.USAGE_ERROR
        checked = _delta(self.start_counters, _findings.counters())
        from .report import checked_note

        note = checked_note(checked)
        if note:
            self.notes.append(note)
        self._checked = checked
        from . import runtime

        if os.environ.get(runtime.RUN_DIR_ENV):  # under `python -m ptrbridge run`: hand everything over
            runtime.add_findings(self._all())
            runtime.add_tests(self.tests.values())
        if self.report_path:
            self._write_report(int(session.exitstatus))

    def _records(self) -> List[Dict[str, Any]]:
        from .report import finding_record

        strict = self.strict
        return [finding_record(f, strict, os.getpid()) for f in self._all()]

    def _write_report(self, status: int) -> None:
        import sys

        import ptrbridge
        from . import report

        now = ptrbridge.stats()
        process = {"pid": os.getpid(), "argv": [str(a) for a in sys.argv], "activated": True,
                   "check_level": self.level, "checked": self._checked,
                   "stats": {name: getattr(now, name) for name in vars(now)}, "findings": len(self._all())}
        data = report.build(
            "pytest", [str(a) for a in sys.argv], status, status,
            report.settings(self.level, self.strict, self.quarantine, self.instrument, self.watch),
            self._records(), self._checked, tests=list(self.tests.values()), processes=[process],
            notes=self.notes,
        )
        with open(self.report_path, "w", encoding="utf-8") as f:  # type: ignore[arg-type]
            json.dump(data, f, indent=2)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        from .report import checked_text, counts

        strict = self.strict
        found = self._all()
        c = counts(found, strict)
        checked = getattr(self, "_checked", _delta(self.start_counters, _findings.counters()))
        ntests = len(self.tests)
        if not found:
            terminalreporter.write_sep("-", f"ptrbridge: no pointer problems found; {checked_text(checked)} "
                                            f"in {ntests} test(s)")
        else:
            mode = "strict: portability findings fail" if strict else "not strict: portability findings do not fail"
            terminalreporter.section(f"ptrbridge findings: {c['error']} error(s), {c['portability']} "
                                     f"portability finding(s) ({mode})")
            terminalreporter.write_line(f"{checked_text(checked)} in {ntests} test(s)")
            for nodeid, fs in self.test_findings.items():
                t = self.tests.get(nodeid, {}).get("checked", {})
                terminalreporter.write_line(f"{nodeid} ({checked_text(t)})")
                for line in _format_findings(fs, strict).splitlines():
                    terminalreporter.write_line(f"    {line}")
            if self.session_findings:
                terminalreporter.write_line("outside any test:")
                for line in _format_findings(self.session_findings, strict).splitlines():
                    terminalreporter.write_line(f"    {line}")
        for note in self.notes:
            terminalreporter.write_line(f"ptrbridge: {note}" if not note.startswith("ptrbridge") else note)


def _format_findings(found: List[Finding], strict: bool) -> str:
    lines = []
    for f in sorted(found, key=lambda f: f.severity != "error"):
        if f.severity == "error":
            tag = "ERROR"
        else:
            tag = "portability" + ("" if strict else " (does not fail: not strict)")
        lines.append(f"{tag}: {f.message}")
    return "\n".join(lines)
