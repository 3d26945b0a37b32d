"""Shared fixtures: compiled test libraries and exact accounting around every test."""
from __future__ import annotations

import gc
from pathlib import Path
from typing import Iterator

import pytest

import ptrbridge
from cbuild import build_shared

ACCOUNTED = ("live_blocks", "live_bytes", "transferred", "live_handles", "live_pins")


@pytest.fixture(autouse=True)
def exact_accounting() -> Iterator[None]:
    """Every test gives back what it took: C blocks, transfers, handles and pins."""
    gc.collect()
    ptrbridge.collect()
    before = ptrbridge.stats()
    level = ptrbridge.check_level()
    yield
    gc.collect()
    ptrbridge.collect()
    after = ptrbridge.stats()
    changed = {name: (getattr(before, name), getattr(after, name))
               for name in ACCOUNTED if getattr(before, name) != getattr(after, name)}
    assert not changed, f"test leaked registry resources: {changed}"
    assert ptrbridge.check_level() == level, "test did not restore the check level"


@pytest.fixture(scope="session")
def clib_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("clib")


@pytest.fixture(scope="session")
def threads_lib(clib_dir: Path) -> Path:
    """tests/clib/threads.c: a C thread that releases handles it is given."""
    return build_shared("threads.c", clib_dir)


@pytest.fixture(scope="session")
def uses_pb_lib(clib_dir: Path) -> Path:
    """tests/clib/uses_pb.c: calls the pb_* API by name and through struct pb_api."""
    return build_shared("uses_pb.c", clib_dir)
