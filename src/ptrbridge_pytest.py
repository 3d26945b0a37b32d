"""pytest plugin: run a test suite under ptrbridge (the inert entry point).

Registered through the ``pytest11`` entry point, so it is present whenever
ptrbridge is installed.  This module lives outside the ``ptrbridge`` package
so that loading it imports nothing of ptrbridge: the plugin is inert unless
turned on with ``pytest --ptrbridge`` (level 2), ``--ptrbridge=LEVEL`` or a
``PTRBRIDGE_CHECK`` environment variable.  When on:

* cffi and ctypes are instrumented (``ptrbridge.instrument()``; off with
  ``--ptrbridge-no-instrument`` or ``PTRBRIDGE_INSTRUMENT=0``), and at level 2
  lent buffers go through the quarantine (off with ``--ptrbridge-no-quarantine``);
* automatic retention scans *collect* their findings (``set_on_violation("collect")``)
  instead of raising in the middle of a test: they are attributed to the test;
* for each test: the check level is applied (``@pytest.mark.ptrbridge(level=...)``
  overrides); leaks of handles, pins, tracked C memory and transferred buffers
  during the test body are findings, named with where each was created
  (``allow_leaks=[...]`` in the marker lists kinds to tolerate: ``"c_memory"``,
  ``"handles"``, ``"pins"``, ``"transferred"``); a retention scan looks for
  pointers C kept (rule R2; at level 2 also into Python memory freed during
  the test); every finding recorded by the checks counts, and so does a
  ptrbridge error that fails the test;
* a test fails on *error* findings; *portability* findings (Go's rules taken
  literally, C merely holding a stale pointer) fail it only in strict mode
  (``--ptrbridge-strict`` or ``PTRBRIDGE_STRICT=1``).

The fixture ``ptrbridge_stats`` gives a test its own before/now snapshots.  A
"ptrbridge" section at the end lists every finding by test, with counts and how
many calls, callbacks and lends were checked; ``--ptrbridge-report=FILE.json``
writes it as JSON (schema: :mod:`ptrbridge.report`).
"""
from __future__ import annotations

import os
from typing import Any

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
        help="also scan the globals of the loaded library whose path contains NAME (repeatable); "
        "a name that matches no loaded library by the end of the session is a usage error",
    )
    group.addoption("--ptrbridge-strict", action="store_true", default=False,
                    help="portability findings fail tests too (also PTRBRIDGE_STRICT=1)")
    group.addoption("--ptrbridge-no-instrument", action="store_true", default=False,
                    help="do not instrument cffi and ctypes: check only libraries wrapped by hand "
                    "(also PTRBRIDGE_INSTRUMENT=0)")
    group.addoption("--ptrbridge-no-quarantine", action="store_true", default=False,
                    help="at level 2, lend buffers directly instead of as guard-paged shadow copies "
                    "(also PTRBRIDGE_QUARANTINE=0)")
    group.addoption("--ptrbridge-report", default=None, metavar="FILE.json",
                    help="write the findings, counts and checked calls as JSON (schema: ptrbridge.report)")


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
    if str(level).strip() not in ("0", "1", "2"):
        raise pytest.UsageError(f"{ENV_VAR}={level!r}: the check level must be 0, 1 or 2")
    watch = list(config.getoption("ptrbridge_watch", default=[]) or [])
    for name in watch:
        if not name.strip():
            raise pytest.UsageError("--ptrbridge-watch: the library name is empty")
    strict = bool(config.getoption("ptrbridge_strict", default=False))
    instrument = not config.getoption("ptrbridge_no_instrument", default=False) and _env_flag(
        "PTRBRIDGE_INSTRUMENT", True)
    quarantine = not config.getoption("ptrbridge_no_quarantine", default=False) and _env_flag(
        "PTRBRIDGE_QUARANTINE", True)
    from ptrbridge.pytest_plugin import Harness

    harness = Harness(int(level), watch, strict=strict, instrument=instrument, quarantine=quarantine,
                      report_path=config.getoption("ptrbridge_report", default=None))
    if harness.quarantine and config.getoption("capture", default="fd") == "fd":
        # A quarantine report is written to fd 2 as the process dies of the signal: inside a test
        # that is pytest's capture file, lost with the process.  fd 2 is the terminal here (the
        # global capture is suspended while plugins configure, as for pytest's faulthandler).
        harness.report_to_copy_of_stderr()
    config.pluginmanager.register(harness, "ptrbridge-harness")


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    return value in ("1", "true", "yes", "on")


@pytest.fixture
def ptrbridge_stats() -> Any:
    """Snapshots of ``ptrbridge.stats()``: ``.before`` (at setup), ``.now()``, ``.delta()``."""
    from ptrbridge.pytest_plugin import StatsProbe

    return StatsProbe()

