"""The only module that imports the compiled ``ptrbridge._native``.

It exposes ``ffi`` and ``lib``, makes the ``pb_*`` symbols globally visible to
C libraries loaded later, and turns C status codes into exceptions with
:func:`check` (one place, instead of ``if rc:`` scattered over the package).
"""
from __future__ import annotations

import ctypes
import os
from typing import Any, Dict, Type

from . import _native  # type: ignore[attr-defined]  # the compiled module
from .errors import (
    AllocatorError,
    DoubleFreeError,
    InvalidHandleError,
    NotOwnedError,
    PointerError,
)

ffi: Any = _native.ffi
lib: Any = _native.lib

if lib.pb__py_init() != 0:  # pragma: no cover - only on a broken build
    raise ImportError("ptrbridge: could not initialise the native module")
BufferBase: Any = _native.BufferBase  # type: ignore[attr-defined]
HandleBase: Any = _native.HandleBase  # type: ignore[attr-defined]
native: Any = _native  # the CPython-API functions registered by pb__py_init
write_unraisable: Any = _native.write_unraisable  # type: ignore[attr-defined]

from .callsite import _is_internal  # noqa: E402  (creation sites skip ptrbridge's own frames)

native.sites_init(_is_internal)

# Python loads extension modules with RTLD_LOCAL, which hides pb_* from
# libraries loaded afterwards.  Re-opening the already-loaded object with
# RTLD_NOLOAD | RTLD_GLOBAL promotes its symbols to the global scope.
_GLOBAL_SELF = ctypes.CDLL(
    _native.__file__, mode=os.RTLD_GLOBAL | getattr(os, "RTLD_NOLOAD", 0)
)
NATIVE_PATH: str = _native.__file__

_STATUS_ERRORS: Dict[int, Type[PointerError]] = {
    lib.PB_ERR_NOT_OWNED: NotOwnedError,
    lib.PB_ERR_PY_OWNED: NotOwnedError,
    lib.PB_ERR_DOUBLE_FREE: DoubleFreeError,
    lib.PB_ERR_INVALID_HANDLE: InvalidHandleError,
    lib.PB_ERR_INVALID: AllocatorError,
}


def status_text(status: int) -> str:
    """The C library's description of a status code."""
    return str(ffi.string(lib.pb_strerror(status)).decode())


def check(status: int, context: str) -> None:
    """Raise the exception for a nonzero C status, with ``context`` leading the message.

    ``context`` names where it happened, e.g. ``"ptrbridge.free(0x1234)"``.
    """
    if status == lib.PB_OK:
        return
    if status == lib.PB_ERR_NOMEM:
        raise MemoryError(f"ptrbridge: {context}: out of memory")
    cls = _STATUS_ERRORS.get(status, PointerError)
    raise cls(f"ptrbridge: {context}: {status_text(status)}")


UINTPTR_MAX: int = (1 << (8 * ffi.sizeof("uintptr_t"))) - 1


def address_of(ptr: Any) -> int:
    """Integer address of a cffi pointer/array cdata (or an int, returned as is)."""
    if isinstance(ptr, int):
        return ptr
    return int(ffi.cast("uintptr_t", ptr))


def checked_address(value: Any, api: str) -> int:
    """The address ``value`` stands for: a cffi pointer/array or an int in ``[0, UINTPTR_MAX]``.

    Raises ``TypeError`` (other types, bool) or ``ValueError`` (negative or too
    large for a pointer) naming ``api``, the function the user called; a
    silent truncation would free or read some other address.
    """
    if isinstance(value, ffi.CData):
        if ffi.typeof(value).kind not in ("pointer", "array"):
            raise TypeError(f"ptrbridge: {api}: expected a pointer, not cdata '{ffi.typeof(value).cname}'")
        return int(ffi.cast("uintptr_t", value))
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"ptrbridge: {api}: an address must be a cffi pointer or an int, "
                        f"not {type(value).__name__}")
    if not 0 <= value <= UINTPTR_MAX:
        raise ValueError(f"ptrbridge: {api}: address {value:#x} is out of range for a pointer "
                         f"(0 .. {UINTPTR_MAX:#x})")
    return value
