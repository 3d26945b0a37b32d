"""cffi handles under instrumentation: ``ffi.from_handle`` of a handle collected since.

``ffi.new_handle(obj)`` gives C a ``void *`` token for a Python object, and
C hands it back to ``ffi.from_handle`` (typically as a callback's user
data).  The token is the address of the handle object: it is valid only
while the program keeps the handle alive.  The classic bug drops it at once::

    lib.ev_register(on_event, ffi.new_handle(counter))  # the handle dies on return

C keeps the address, and the next callback's ``ffi.from_handle`` reads
freed memory: cffi aborts the process ("points to garbage") or, if the
memory was reused, returns the wrong object.  While instrumented (see
:mod:`ptrbridge.instrument`), ``new_handle`` notes where each handle was
made and ``from_handle`` of an address whose handle was collected records a
``"collected-handle"`` error first, naming both sites; then cffi does what it
does without ptrbridge.  The error reaches ``ptrbridge run``'s summary even
when cffi then aborts (errors are journaled as they are recorded).

Only ``cffi.FFI`` instances are covered (ABI mode and in-line API mode): the
``ffi`` of an out-of-line API module is a C object whose methods cannot be
patched.
"""
from __future__ import annotations

import functools
import threading
import weakref
from collections import OrderedDict
from typing import Any, Callable, Dict, Tuple

from . import findings, levels
from ._bindings import address_of
from .callsite import caller_site

__all__ = ["make_new_handle", "make_from_handle"]

_Entry = Tuple[str, str]  # (description, created at)

_lock = threading.RLock()  # re-entrant: a collection inside new_handle may run a handle's callback
_live: Dict[int, Tuple[Any, _Entry]] = {}  # address -> (weak reference, entry) of the live handles
_dead: "OrderedDict[int, _Entry]" = OrderedDict()  # address -> entry of collected handles, newest last
_DEAD_KEPT = 4096  # collected handles remembered (the oldest are forgotten)


def _collected(address: int, entry: _Entry) -> None:
    with _lock:
        live = _live.get(address)
        if live is not None and live[1] is entry:  # not a newer handle made at the same address
            del _live[address]
        _dead[address] = entry
        _dead.move_to_end(address)
        while len(_dead) > _DEAD_KEPT:
            _dead.popitem(last=False)


def make_new_handle(original: Callable[..., Any]) -> Callable[..., Any]:
    """``FFI.new_handle`` that notes where each handle was made, and when it is collected."""
    @functools.wraps(original)
    def new_handle(self: Any, x: Any) -> Any:
        handle = original(self, x)
        address = address_of(handle)
        entry = (f"ffi.new_handle({type(x).__name__} object)", caller_site())
        ref = weakref.ref(handle, lambda _ref: _collected(address, entry))
        with _lock:
            _live[address] = (ref, entry)
            _dead.pop(address, None)
        return handle
    return new_handle


def make_from_handle(original: Callable[..., Any]) -> Callable[..., Any]:
    """``FFI.from_handle`` that records a ``"collected-handle"`` error before reading a dead handle."""
    @functools.wraps(original)
    def from_handle(self: Any, x: Any) -> Any:
        if _dead and levels._level:
            try:
                address = address_of(x)
            except (TypeError, ValueError):
                address = 0  # not a pointer: cffi raises as it does
            with _lock:
                entry = _dead.get(address) if address not in _live else None
            if entry is not None:
                _report(entry, caller_site())
        return original(self, x)
    return from_handle


def _report(entry: _Entry, used_at: str) -> None:
    description, created_at = entry
    message = (
        f"ptrbridge: ffi.from_handle() was given a collected handle: {description} created at "
        f"{created_at} was collected (the program dropped its last reference), but C kept its address "
        f"and passed it back to ffi.from_handle() at {used_at}; it points to freed memory, so cffi "
        f"aborts or returns whatever object lives there now. Keep the handle alive (a reference in "
        f"Python) for as long as C may pass it back\n"
        f"SUMMARY: ptrbridge: collected-handle {description} ({created_at})"
    )
    findings.record(findings.Finding(
        kind="collected-handle", severity="error", rule="handle", message=message, object=description,
        created_at=created_at, lent_at=used_at, state="collected"))
