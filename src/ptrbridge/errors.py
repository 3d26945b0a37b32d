"""The exception and warning hierarchy of ptrbridge.

Every error derives from :class:`PointerError`, and also from the builtin
exception that fits, so callers may catch either::

    try:
        ptrbridge.handle_value(token)
    except ValueError:          # or ptrbridge.InvalidHandleError / PointerError
        ...

Every warning derives from :class:`PointerWarning`, a :class:`RuntimeWarning`
subclass: shown by default, and turned into an error by ``-W error``.
"""
from __future__ import annotations

__all__ = [
    "PointerError",
    "ConfigurationError",
    "InvalidHandleError",
    "HandleLimitError",
    "AllocatorError",
    "NotOwnedError",
    "DoubleFreeError",
    "UnpinnableError",
    "UseAfterTransferError",
    "PointerWarning",
    "PinLeakWarning",
]


class PointerError(Exception):
    """Base class of every error ptrbridge raises."""


class ConfigurationError(PointerError, ValueError):
    """A setting (such as ``PTRBRIDGE_CHECK``) has a value ptrbridge does not accept."""


class InvalidHandleError(PointerError, ValueError):
    """A handle token is zero, forged, stale, deleted or released."""


class HandleLimitError(PointerError, RuntimeError):
    """A bounded :class:`~ptrbridge.HandleTable` is full."""


class AllocatorError(PointerError, ValueError):
    """The tracked C allocator refused a pointer it was given."""


class NotOwnedError(AllocatorError):
    """The pointer was never allocated by the ptrbridge allocator."""


class DoubleFreeError(AllocatorError):
    """The pointer was allocated by ptrbridge but has already been freed."""


class UnpinnableError(PointerError, TypeError):
    """The object cannot be pinned (no contiguous buffer, or not Python-owned)."""


class UseAfterTransferError(PointerError, RuntimeError):
    """A :class:`~ptrbridge.CBuffer` was used after its memory was given to C or freed."""


class PointerWarning(RuntimeWarning):
    """Base class of every warning ptrbridge emits."""


class PinLeakWarning(PointerWarning):
    """A :class:`~ptrbridge.Pinner` was dropped, or the interpreter exited, with pins held."""
