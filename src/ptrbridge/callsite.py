"""Where in the user's code something happened: the first frame outside ptrbridge."""
from __future__ import annotations

import os
import sys
from typing import Any, Dict, Optional, Tuple

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
# Modules of the package that act as users of the library: their frames count.
_USER_MODULES = frozenset(os.path.join(_PACKAGE_DIR, name) for name in ("demo.py",))
# The demo's sample programs are user code too (they stand for a user's program).
_USER_DIRS = (os.path.join(_PACKAGE_DIR, "demo_programs") + os.sep,)


def _is_internal(filename: str) -> bool:
    return (filename.startswith(_PACKAGE_DIR) and filename not in _USER_MODULES
            and not filename.startswith(_USER_DIRS))


def _user_frame(frame: Any) -> Any:
    """``frame``, or the nearest frame above it outside this package (None if there is none)."""
    while frame is not None and _is_internal(frame.f_code.co_filename):
        frame = frame.f_back
    return frame


def frame_location(frame: Any) -> Optional[Tuple[str, int]]:
    """``(filename, lineno)`` of ``frame``, or of the nearest frame above it outside this package."""
    frame = _user_frame(frame)
    if frame is None:
        return None
    return frame.f_code.co_filename, frame.f_lineno


_sites: Dict[Tuple[Any, int], str] = {}  # (code, instruction offset) -> "file.py:12"


def frame_site(frame: Any) -> str:
    """``file.py:line`` of ``frame``, or of the nearest frame above it outside this package.

    The text of a (code, instruction offset) is made once: level 2 asks for
    it at every checked call, and the same call site comes back each time.
    """
    frame = _user_frame(frame)
    if frame is None:
        return "<unknown>:0"
    key = (frame.f_code, frame.f_lasti)
    site = _sites.get(key)
    if site is None:
        site = format_location((frame.f_code.co_filename, frame.f_lineno))
        if len(_sites) >= 4096:
            _sites.clear()
        _sites[key] = site
    return site


def caller_frame_location() -> Tuple[str, int]:
    """Return ``(filename, lineno)`` of the innermost frame outside this package."""
    return frame_location(sys._getframe(1)) or ("<unknown>", 0)


def user_stacklevel() -> int:
    """The ``stacklevel`` for :func:`warnings.warn`, called here, that names the user's frame.

    Counted from the caller of this function: 1 is that caller itself, and each
    frame inside this package adds one, so a warning raised deep in ptrbridge is
    attributed to the innermost frame outside it.
    """
    level = 1
    frame = sys._getframe(1)
    while frame is not None and _is_internal(frame.f_code.co_filename):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    return level


def format_location(location: Tuple[str, int]) -> str:
    """Render a location as ``file.py:12`` (the path shortened to its base name)."""
    filename, lineno = location
    return f"{os.path.basename(filename)}:{lineno}"


def caller_site() -> str:
    """Return ``file.py:line`` of the innermost frame outside this package."""
    return format_location(caller_frame_location())
