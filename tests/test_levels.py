"""Check levels: PTRBRIDGE_CHECK, set_check_level, checking()."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import ptrbridge
from ptrbridge import ConfigurationError


def _level_in_subprocess(value: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PTRBRIDGE_CHECK=value)
    return subprocess.run([sys.executable, "-c", "import ptrbridge; print(ptrbridge.check_level())"],
                          env=env, capture_output=True, text=True)


@pytest.mark.parametrize("value, level", [("0", 0), ("1", 1), ("2", 2), ("", 1), (" 2 ", 2)])
def test_environment_sets_the_level(value: str, level: int) -> None:
    proc = _level_in_subprocess(value)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(level)


def test_default_level_is_one() -> None:
    env = {k: v for k, v in os.environ.items() if k != "PTRBRIDGE_CHECK"}
    proc = subprocess.run([sys.executable, "-c", "import ptrbridge; print(ptrbridge.check_level())"],
                          env=env, capture_output=True, text=True)
    assert proc.stdout.strip() == "1"


@pytest.mark.parametrize("value", ["3", "x", "-1", "1.0"])
def test_invalid_environment_fails_the_import(value: str) -> None:
    proc = _level_in_subprocess(value)
    assert proc.returncode != 0
    assert f"invalid PTRBRIDGE_CHECK={value!r}" in proc.stderr
    assert "valid values are 0 (off), 1 (check arguments) and 2 (also scan C memory)" in proc.stderr


def test_set_check_level_returns_previous() -> None:
    old = ptrbridge.set_check_level(0)
    try:
        assert ptrbridge.check_level() == 0
        assert ptrbridge.set_check_level(2) == 0
        assert ptrbridge.check_level() == 2
    finally:
        ptrbridge.set_check_level(old)


@pytest.mark.parametrize("bad", [3, -1, True, "1", 1.0, None])
def test_set_check_level_rejects(bad: object) -> None:
    with pytest.raises(ConfigurationError, match="valid values are 0") as info:
        ptrbridge.set_check_level(bad)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)


def test_checking_restores_even_on_error() -> None:
    before = ptrbridge.check_level()
    with pytest.raises(KeyError):
        with ptrbridge.checking(0) as level:
            assert level == 0 and ptrbridge.check_level() == 0
            raise KeyError("boom")
    assert ptrbridge.check_level() == before
    with pytest.raises(ConfigurationError):
        with ptrbridge.checking(7):
            pass
    assert ptrbridge.check_level() == before


def test_level_listeners_see_changes() -> None:
    from ptrbridge import levels

    seen = []
    levels.add_level_listener(lambda old, new: seen.append((old, new)))
    try:
        with ptrbridge.checking(1):
            with ptrbridge.checking(2):
                pass
            with ptrbridge.checking(1):
                pass  # no change, no call
        assert seen[-2:] == [(1, 2), (2, 1)]
    finally:
        levels._listeners.pop()
