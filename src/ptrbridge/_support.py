"""Refuse interpreters ptrbridge does not support, before the C module loads.

ptrbridge supports CPython 3.9 to 3.13 with the GIL.  Its C core relies on the
GIL in places (the heap map's allocator hooks take a lock-free path under it,
handle objects are kept in Python containers without their own locks), so a
free-threaded build (``python3.13t``, ``Py_GIL_DISABLED``) would race silently.
It is refused here with a message naming the build instead.
"""
from __future__ import annotations

import sys
import sysconfig
from typing import Optional, Tuple

__all__ = ["SUPPORTED", "check_interpreter"]

#: The CPython minor versions the test suite runs on (see ``noxfile.py``).
SUPPORTED: Tuple[Tuple[int, int], ...] = ((3, 9), (3, 10), (3, 11), (3, 12), (3, 13))


def check_interpreter(implementation: Optional[str] = None,
                      version: Optional[Tuple[int, int]] = None,
                      gil_disabled: Optional[object] = None,
                      description: Optional[str] = None) -> None:
    """Raise ImportError if this interpreter cannot run ptrbridge safely.

    The arguments default to the running interpreter; they exist so the test
    suite can check the decision for builds it does not have.
    """
    if implementation is None:
        implementation = sys.implementation.name
    if version is None:
        version = (sys.version_info[0], sys.version_info[1])
    if gil_disabled is None:
        gil_disabled = sysconfig.get_config_var("Py_GIL_DISABLED")
    if description is None:
        description = f"{sys.implementation.name} {sys.version.split()[0]} ({sys.executable})"
    if implementation != "cpython":
        raise ImportError(f"ptrbridge: unsupported Python implementation: {description}; "
                          "ptrbridge's C core uses the CPython C API and needs CPython 3.9 or later")
    if version < SUPPORTED[0]:
        raise ImportError(f"ptrbridge: unsupported Python version: {description}; "
                          "ptrbridge needs CPython 3.9 or later")
    if gil_disabled:
        raise ImportError(
            f"ptrbridge: the free-threaded CPython build is not supported: {description} "
            "was built with Py_GIL_DISABLED (python3.13t). ptrbridge's C registry relies on "
            "the GIL and would race without it; use the standard (GIL) build of the same "
            "Python version.")


check_interpreter()
