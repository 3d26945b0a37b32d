"""Check levels, like Go's ``GODEBUG=cgocheck``.

* ``0`` - no checks: wrapped C functions are the raw functions.
* ``1`` - (default) every checked call enforces the pointer-passing rules on
  its arguments.
* ``2`` - adds the expensive checks: scanning C memory for pointers it kept.

The level is process-wide.  It is read from ``PTRBRIDGE_CHECK`` when ptrbridge
is imported and can be changed with :func:`set_check_level` or, for a block,
with ``with ptrbridge.checking(2): ...``.
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, List, Optional

from .errors import ConfigurationError

__all__ = ["check_level", "set_check_level", "checking", "add_level_listener", "VALID_LEVELS", "ENV_VAR"]

ENV_VAR = "PTRBRIDGE_CHECK"
VALID_LEVELS = (0, 1, 2)
DEFAULT_LEVEL = 1

_lock = threading.RLock()
_listeners: List[Callable[[int, int], None]] = []


def add_level_listener(listener: Callable[[int, int], None]) -> None:
    """Call ``listener(old, new)`` whenever the level changes (and once now, as ``(0, level)``
    if the current level is above 0), so features of higher levels can switch on and off."""
    with _lock:
        _listeners.append(listener)
        if _level:
            listener(0, _level)


def _validate(level: object, source: str) -> int:
    if isinstance(level, bool) or not isinstance(level, int) or level not in VALID_LEVELS:
        raise ConfigurationError(
            f"ptrbridge: invalid check level {level!r} from {source}; "
            f"valid values are 0 (off), 1 (check arguments) and 2 (also scan C memory)"
        )
    return level


def _level_from_environment(value: Optional[str]) -> int:
    if value is None or value.strip() == "":
        return DEFAULT_LEVEL
    text = value.strip()
    if text not in ("0", "1", "2"):
        raise ConfigurationError(
            f"ptrbridge: invalid {ENV_VAR}={value!r}; "
            f"valid values are 0 (off), 1 (check arguments) and 2 (also scan C memory)"
        )
    return int(text)


_level = _level_from_environment(os.environ.get(ENV_VAR))


def check_level() -> int:
    """Return the current process-wide check level (0, 1 or 2)."""
    return _level


def set_check_level(level: int) -> int:
    """Set the process-wide check level and return the previous one.

    Raises :class:`~ptrbridge.ConfigurationError` (a ``ValueError``) for anything
    but 0, 1 or 2.
    """
    global _level
    new = _validate(level, "set_check_level()")
    with _lock:
        old = _level
        if old != new:
            for listener in list(_listeners):
                listener(old, new)  # switch features first: level-2 hooks before level 2 is seen
        _level = new
    return old


@contextmanager
def checking(level: int) -> Iterator[int]:
    """Run a block at ``level`` and restore the previous level afterwards.

    The level is process-wide, so other threads see the change too::

        with ptrbridge.checking(2):
            run_suspicious_code()
    """
    old = set_check_level(level)
    try:
        yield level
    finally:
        set_check_level(old)
