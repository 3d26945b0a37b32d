"""pytest plugin: run a test suite under ptrbridge (the inert entry point).

Registered through the ``pytest11`` entry point, so it is present whenever
ptrbridge is installed.  This module lives outside the ``ptrbridge`` package
so that loading it imports nothing of ptrbridge: the plugin is inert unless
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
    from ptrbridge.pytest_plugin import Harness

    config.pluginmanager.register(Harness(int(level), watch), "ptrbridge-harness")


@pytest.fixture
def ptrbridge_stats() -> Any:
    """Snapshots of ``ptrbridge.stats()``: ``.before`` (at setup), ``.now()``, ``.delta()``."""
    from ptrbridge.pytest_plugin import StatsProbe

    return StatsProbe()

