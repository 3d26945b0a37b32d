"""pytest plugin: run a test suite under ptrbridge.

Registered through the ``pytest11`` entry point, so it is present whenever
ptrbridge is installed, and inert (it does not even import ptrbridge) unless
turned on with ``pytest --ptrbridge`` (level 2), ``--ptrbridge=LEVEL`` or a
``PTRBRIDGE_CHECK`` environment variable.  When on, for each test:

* the check level is applied (``@pytest.mark.ptrbridge(level=...)`` overrides);
* :func:`ptrbridge.stats` is taken before and after the test body, after
  garbage collection, and the test fails if it leaked handles, pins, tracked C
  memory or transferred buffers (``allow_leaks=[...]`` in the marker lists
  kinds to tolerate: ``"c_memory"``, ``"handles"``, ``"pins"``, ``"transferred"``);
* a retention scan runs and the test fails if C kept pointers to Python memory
  (rule R2), including pointers into Python memory freed during the test when
  the heap map is on (level 2).

The fixture ``ptrbridge_stats`` gives a test its own before/now snapshots.  A
"ptrbridge" section at the end of the run lists every finding by test.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Generator, List

import pytest

ENV_VAR = "PTRBRIDGE_CHECK"
BARE_FLAG_LEVEL = "2"


def pytest_addoption(parser: Any) -> None:
    group = parser.getgroup("ptrbridge", "ptrbridge: pointer rules, leaks and retained pointers")
    group.addoption(
        "--ptrbridge",
        nargs="?",
        const=BARE_FLAG_LEVEL,
        default=None,
        choices=("0", "1", "2"),
        metavar="LEVEL",
        help="run every test under ptrbridge at check LEVEL (bare flag: 2); "
        "write it as --ptrbridge=LEVEL or after the test paths",
    )
    group.addoption(
        "--ptrbridge-watch",
        action="append",
        default=[],
        metavar="NAME",
        help="also scan the globals of the loaded library whose path contains NAME (repeatable)",
    )


def pytest_configure(config: Any) -> None:
    config.addinivalue_line(
        "markers",
        "ptrbridge(level=None, allow_leaks=()): check level for this test and leak kinds to tolerate "
        "(c_memory, handles, pins, transferred)",
    )
    level = config.getoption("ptrbridge", default=None)
    if level is None:
        level = os.environ.get(ENV_VAR) or None
    if level is None:
        return
    watch = list(config.getoption("ptrbridge_watch", default=[]) or [])
    config.pluginmanager.register(Harness(int(level), watch), "ptrbridge-harness")


@pytest.fixture
def ptrbridge_stats() -> "StatsProbe":
    """Snapshots of ``ptrbridge.stats()``: ``.before`` (at setup), ``.now()``, ``.delta()``."""
    return StatsProbe()


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

