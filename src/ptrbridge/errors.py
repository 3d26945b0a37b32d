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
    "NestedPointerError",
    "UseAfterFreeError",
    "CallbackResultError",
    "ReleasedCallbackError",
    "CError",
    "PointerWarning",
    "PinLeakWarning",
    "CallTimeoutWarning",
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


class NestedPointerError(PointerError, ValueError):
    """Rule R1: memory passed to C holds a pointer to unpinned Python-owned memory."""


class UseAfterFreeError(PointerError, ValueError):
    """A pointer passed to C points into Python-owned memory that was already freed."""


class CallbackResultError(PointerError, ValueError):
    """Rule R4: a callback returned a pointer to unpinned Python-owned memory."""


class ReleasedCallbackError(PointerError, RuntimeError):
    """C called a callback after it was released."""


class CError(PointerError, RuntimeError):
    """A checked C function reported failure through its declared error convention.

    ``code`` is the value the function returned, ``function`` its name.
    """

    def __init__(self, message: str, code: object = None, function: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.function = function


class RootError(PointerError, ValueError):
    """A scan root given to :func:`ptrbridge.add_root` is not readable memory (unmapped, partly
    unmapped, or out of the address range)."""


class RootTypeError(PointerError, TypeError):
    """:func:`ptrbridge.add_root` was given something that is not an address (an int or a cffi
    pointer)."""


class PointerWarning(RuntimeWarning):
    """Base class of every warning ptrbridge emits."""


class PinLeakWarning(PointerWarning):
    """A :class:`~ptrbridge.Pinner` was dropped, or the interpreter exited, with pins held."""


class CallTimeoutWarning(PointerWarning):
    """Rule R3: a checked call has held lent Python memory longer than the call timeout."""


class StaleRootWarning(PointerWarning):
    """A scan skipped a root that is no longer readable (freed or unmapped after
    :func:`ptrbridge.add_root`, or a watched library unloaded): remove it with
    :func:`ptrbridge.remove_root`."""
