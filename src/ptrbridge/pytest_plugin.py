"""The active part of the pytest plugin (see ``ptrbridge_pytest``): loaded only when ptrbridge is on."""
from __future__ import annotations

from typing import Any, Dict, Generator, List

import pytest

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


class Harness:
    """The active part of the plugin, registered only when ptrbridge is on."""

    def __init__(self, level: int, watch: List[str]) -> None:
        import ptrbridge

        self.level = level
        self.pending_watch = list(watch)
        self.findings: Dict[str, List[str]] = {}
        ptrbridge.set_check_level(level)
        ptrbridge.set_on_violation("collect")  # findings are attributed to tests at teardown

    def _watch_loaded_libraries(self) -> None:
        import ptrbridge

        for name in list(self.pending_watch):
            try:
                ptrbridge.watch_library(name)
            except ValueError:
                continue  # not loaded yet; try again at the next test
            self.pending_watch.remove(name)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: Any) -> Generator[None, Any, Any]:
        import ptrbridge
        from . import scanning
        from .testing import leaks, settle

        marker = item.get_closest_marker("ptrbridge")
        level = self.level
        allow: List[str] = []
        if marker is not None:
            level = marker.kwargs.get("level", level)
            allow = list(marker.kwargs.get("allow_leaks", ()))
        self._watch_loaded_libraries()
        old = ptrbridge.set_check_level(level)
        try:
            settle()
            scanning.clear_violations()
            before = ptrbridge.stats()
            result = yield  # the test body; its own failure propagates unchanged
            self._watch_loaded_libraries()
            problems = leaks(before, self._after(), allow)
            problems += [str(r) for r in scanning.scan() + scanning.clear_violations()]
            problems += [str(r) for r in scanning.scan_freed_python_memory()]
        finally:
            ptrbridge.set_check_level(old)
        if problems:
            self.findings[item.nodeid] = problems
            pytest.fail(
                "ptrbridge found problems in this test:\n  " + "\n  ".join(problems), pytrace=False
            )
        return result

    @staticmethod
    def _after() -> Any:
        import ptrbridge
        from .testing import settle

        settle()
        return ptrbridge.stats()

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.findings:
            terminalreporter.write_sep("-", "ptrbridge: no pointer problems found")
            return
        terminalreporter.section("ptrbridge findings")
        for nodeid, problems in self.findings.items():
            terminalreporter.write_line(nodeid)
            for problem in problems:
                terminalreporter.write_line(f"    {problem}")
        _record_for_runner(self.findings)


def _record_for_runner(findings: Dict[str, List[str]]) -> None:
    """Hand findings to ``python -m ptrbridge run`` when the suite runs under it."""
    from . import runtime

    runtime.add_findings(f"{nodeid}: {problem}" for nodeid, problems in findings.items() for problem in problems)

