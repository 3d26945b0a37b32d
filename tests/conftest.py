"""Shared fixtures: compiled test libraries and exact accounting around every test."""
from __future__ import annotations

import functools
import gc
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, List, Tuple

import pytest

import ptrbridge
from ptrbridge import findings
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


def header_cdef(name: str) -> str:
    """The cffi cdef of tests/clib/NAME: its declarations between the CDEF_BEGIN and CDEF_END markers."""
    text = (Path(__file__).parent / "clib" / name).read_text()
    return text.split("/* CDEF_BEGIN */")[1].split("/* CDEF_END */")[0]


CHECKED_CDEF = header_cdef("checked.h")


@pytest.fixture(scope="session")
def checked_so(clib_dir: Path) -> Path:
    """tests/clib/checked.c as a shared library (for cffi ABI mode and ctypes)."""
    return build_shared("checked.c", clib_dir)


@pytest.fixture(scope="session")
def abi(checked_so: Path):  # type: ignore[no-untyped-def]
    """(ffi, raw lib) for checked.c in cffi ABI mode."""
    import cffi

    ffi = cffi.FFI()
    ffi.cdef(CHECKED_CDEF)
    return ffi, ffi.dlopen(str(checked_so))


@pytest.fixture(scope="session")
def api(clib_dir: Path):  # type: ignore[no-untyped-def]
    """The compiled cffi API-mode module for checked.c, with an extern "Python" callback."""
    from cbuild import build_cffi_module

    cdef = CHECKED_CDEF + """
        extern "Python" int py_square(int);
        int sum_of_squares(int n);
    """
    source = """
        #include "checked.h"
        static int py_square(int);
        int sum_of_squares(int n) { int s = 0; for (int i = 0; i < n; i++) s += py_square(i); return s; }
    """
    return build_cffi_module("_checked_api", cdef, source, clib_dir / "api", libraries=["pthread"],
                             extra_sources=["checked.c"])


def at_level_1(test: Callable[..., None]) -> Callable[..., None]:
    """Run ``test`` at level 1 without quarantine.

    In its body: the suite also runs under ``PTRBRIDGE_CHECK=2``, where the
    plugin sets level 2 (and quarantine) around each test's call.
    """
    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        sample = ptrbridge.quarantine.quarantine_sample()
        old = ptrbridge.set_quarantine(False)
        try:
            with ptrbridge.checking(1):
                test(*args, **kwargs)
        finally:
            ptrbridge.set_quarantine(old, sample=sample)
    return run


def python_frames_of(filename: str, run: Callable[[], Any], ignore: Tuple[str, ...] = ()) -> List[str]:
    """The names of the Python functions of ``filename`` that ran during ``run()`` (``ignore``: not these)."""
    seen: List[str] = []

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code.co_filename == filename and frame.f_code.co_name not in ignore:
            seen.append(frame.f_code.co_name)

    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
    return seen


@pytest.fixture
def instrumented() -> Iterator[None]:
    """Instrumentation on (strict mode off) for the test; findings taken before and after.

    Under ``PTRBRIDGE_CHECK=2`` the plugin has instrumented the run already:
    then it stays on after the test.
    """
    findings.take()
    old_strict = findings.set_strict(False)
    turned_on = ptrbridge.instrument()
    assert ptrbridge.instrumented()
    try:
        yield
    finally:
        if turned_on:
            assert ptrbridge.uninstrument() is True
        findings.set_strict(old_strict)
        findings.take()
