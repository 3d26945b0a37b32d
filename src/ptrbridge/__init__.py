"""ptrbridge: safe memory passing between Python and C.

Three ways to give C access to Python data, as in Go's cgo:

* :class:`Handle` - an integer token C may keep; the object stays in Python.
* :class:`Pinner` - keep a buffer alive and unresizable while C holds it.
* :class:`CBuffer` / :func:`cstring` - copy to the tracked C heap; C may own it.

plus the registry's counters (:func:`stats`) and check levels like
``GODEBUG=cgocheck`` (:func:`check_level`, ``PTRBRIDGE_CHECK``).
"""
from __future__ import annotations

from .allocators import CAllocator, c_allocator
from .callbacks import Callback, callback, extern_callback, live_callbacks
from .calls import CheckedLibrary, call_timeout, declare, set_call_timeout, shutdown, unwrap, wrap
from .instrument import instrument, instrumented, uninstrument
from .capi import c_api, native_library_path
from .cmem import CBatch, CBuffer, TypedCBuffer, cnew, cstring, free
from .errors import (
    AllocatorError,
    CallbackResultError,
    CallTimeoutWarning,
    CError,
    ConfigurationError,
    DoubleFreeError,
    HandleLimitError,
    InvalidHandleError,
    NestedPointerError,
    NotOwnedError,
    PinLeakWarning,
    PointerError,
    PointerWarning,
    ReleasedCallbackError,
    UnpinnableError,
    UseAfterFreeError,
    UseAfterTransferError,
)
from .handles import Handle, HandleTable, collect_handles, handle_value
from .levels import check_level, checking, set_check_level
from .ownership import new
from .pinning import Pinner
from .quarantine import quarantine_enabled, set_quarantine
from .report import validate as validate_report
from .scanning import (
    RetainedPointerError,
    RetainedPointerWarning,
    Retention,
    add_root,
    clear_violations,
    remove_root,
    scan,
    set_on_violation,
    set_scan_batch,
    unwatch_library,
    violations,
    watch_library,
)
from .spans import Span
from .stats import Stats, stats

__version__ = "0.1.0"


def collect() -> int:
    """Do the registry's deferred Python-side work now.

    Drops the objects of handles that C released with ``pb_handle_release``
    (otherwise done at the next handle operation) and returns how many.
    """
    return collect_handles()


__all__ = [
    "AllocatorError",
    "Callback",
    "callback",
    "extern_callback",
    "live_callbacks",
    "CAllocator",
    "RetainedPointerError",
    "RetainedPointerWarning",
    "Retention",
    "TypedCBuffer",
    "add_root",
    "c_allocator",
    "clear_violations",
    "cnew",
    "remove_root",
    "scan",
    "set_on_violation",
    "set_quarantine",
    "quarantine_enabled",
    "set_scan_batch",
    "unwatch_library",
    "violations",
    "watch_library",
    "CBatch",
    "CBuffer",
    "CError",
    "CallTimeoutWarning",
    "CallbackResultError",
    "CheckedLibrary",
    "ConfigurationError",
    "DoubleFreeError",
    "Handle",
    "HandleLimitError",
    "HandleTable",
    "InvalidHandleError",
    "NestedPointerError",
    "NotOwnedError",
    "PinLeakWarning",
    "Pinner",
    "PointerError",
    "PointerWarning",
    "ReleasedCallbackError",
    "Span",
    "Stats",
    "UnpinnableError",
    "UseAfterFreeError",
    "UseAfterTransferError",
    "c_api",
    "call_timeout",
    "check_level",
    "checking",
    "collect",
    "cstring",
    "declare",
    "free",
    "handle_value",
    "instrument",
    "instrumented",
    "native_library_path",
    "new",
    "set_call_timeout",
    "set_check_level",
    "shutdown",
    "stats",
    "uninstrument",
    "unwrap",
    "validate_report",
    "wrap",
]
