"""Quarantine: lend buffers as guard-paged shadow copies (check level 2) - a simulated moving collector.

CPython never moves objects, so a pointer C keeps to a lent buffer usually
"works" until the object is freed or reused, and the bug shows up far away.
With ``PTRBRIDGE_QUARANTINE=1`` (or :func:`set_quarantine`) at check level 2,
a buffer passed directly to a checked cffi function is passed as a shadow
copy placed against a guard page; after the call the data is copied back
(writable buffers only), the shadow is made inaccessible and kept in a
bounded FIFO.  A later access by C faults, and a SIGSEGV handler writes a
report - the call that lent the buffer, the object, the faulting address -
to stderr before the process dies of the signal as it would have.

Covered: bytes, buffer views (``ffi.from_buffer``) and owning cffi cdata
passed as pointer arguments of cffi functions; bytes, ctypes arrays and
``byref()``/pointer-passed ctypes instances passed to ctypes functions.  Not
covered: structs passed by value (C gets a copy anyway) and Python memory
reached through struct fields (the retention scan looks for those).
"""
from __future__ import annotations

import ctypes
import os
from typing import Any, List, Optional, Sequence, Tuple

from ._bindings import address_of, ffi, lib
from .callsite import frame_site
from .ownership import cdata_extent, describe

__all__ = ["set_quarantine", "quarantine_enabled", "shadow_arguments", "shadow_ctypes_arguments",
           "finish", "held", "ENV_VAR"]

ENV_VAR = "PTRBRIDGE_QUARANTINE"
_TRUE = ("1", "true", "yes", "on")
_enabled = os.environ.get(ENV_VAR, "").strip().lower() in _TRUE

Shadow = Tuple[int, Optional[int], Any, int, int, str]  # slot, copy-back address, keeper, shadow, size, text


def set_quarantine(on: bool) -> bool:
    """Turn quarantine on or off (it acts at check level 2); returns the previous setting."""
    global _enabled
    if not isinstance(on, bool):
        raise TypeError(f"ptrbridge.set_quarantine: expected a bool, not {type(on).__name__}")
    old, _enabled = _enabled, on
    return old


def quarantine_enabled() -> bool:
    """True if lent buffers are passed as shadows at check level 2."""
    return _enabled


def held() -> int:
    """Number of shadows currently quarantined (inaccessible)."""
    return int(lib.pb__quarantine_held())


def _source(arg: Any) -> Optional[Tuple[Any, int, int, bool]]:
    """(keeper, address, size, writable) of a directly passed Python buffer, or None."""
    if isinstance(arg, bytes):
        # cffi passes bytes as a NUL-terminated char *: the shadow keeps the NUL.
        keeper = ffi.from_buffer(arg)
        return keeper, address_of(keeper), len(arg) + 1, False
    if isinstance(arg, ffi.CData):
        extent = cdata_extent(arg)
        if extent is None or ffi.typeof(arg).kind not in ("pointer", "array"):
            return None
        return arg, extent[0], extent[1], True
    return None


def shadow_arguments(args: Tuple[Any, ...], params: Sequence[Tuple[int, Any]], function: str,
                     frame: Any) -> Tuple[Tuple[Any, ...], List[Shadow]]:
    """Replace directly passed buffers by shadows; returns the new arguments and what to finish."""
    new_args = list(args)
    shadows: List[Shadow] = []
    site = frame_site(frame)
    for i, param in params:
        if i >= len(args):
            break
        source = _source(args[i])
        if source is None:
            continue
        keeper, address, size, writable = source
        text = f"{describe(args[i], size)} lent to {function}() at {site}"
        lent = _lend_one(address, size, text)
        if lent is None:
            continue  # no free shadow: pass the buffer itself, unquarantined
        slot, shadow = lent
        target = param if param.kind == "pointer" else ffi.typeof(ffi.getctype(param.item, "*"))
        new_args[i] = ffi.cast(target, shadow)
        shadows.append((slot, address if writable else None, keeper, shadow, size, text))
    return tuple(new_args), shadows


def _lend_one(address: int, size: int, text: str) -> Optional[Tuple[int, int]]:
    """(slot, shadow address) of a new shadow, or None when no shadow is free."""
    out = ffi.new("uintptr_t *")
    slot = lib.pb__quarantine_lend(ffi.cast("void *", address), size, text.encode("utf-8", "replace"), out)
    return None if slot < 0 else (int(slot), int(out[0]))


_CArgObject = type(ctypes.byref(ctypes.c_int()))
_CTYPES_MEMORY = (ctypes.Array, ctypes.Structure, ctypes.Union)


def shadow_ctypes_arguments(args: Tuple[Any, ...], argtypes: Sequence[Any], function: str,
                            frame: Any) -> Tuple[Tuple[Any, ...], List[Shadow]]:
    """The ctypes edition of :func:`shadow_arguments` (bytes, arrays, ``byref`` instances)."""
    new_args = list(args)
    shadows: List[Shadow] = []
    site = frame_site(frame)
    for i, arg in enumerate(args):
        declared = argtypes[i] if i < len(argtypes) else None
        obj = getattr(arg, "_obj") if isinstance(arg, _CArgObject) else arg
        if isinstance(obj, bytes):
            keeper: Any = ffi.from_buffer(obj)
            address, size, writable = address_of(keeper), len(obj) + 1, False
        elif isinstance(obj, ctypes.Array) or (isinstance(obj, _CTYPES_MEMORY) and obj is not arg):
            keeper, address, size, writable = obj, ctypes.addressof(obj), ctypes.sizeof(obj), True
        else:
            continue  # by-value structs and plain values: C gets a copy
        text = f"{describe(obj, size)} lent to {function}() at {site}"
        lent = _lend_one(address, size, text)
        if lent is None:
            continue  # no free shadow: pass the object itself, unquarantined
        slot, shadow = lent
        if isinstance(declared, type) and issubclass(declared, ctypes._Pointer):  # type: ignore[attr-defined]
            new_args[i] = ctypes.cast(ctypes.c_void_p(shadow), declared)
        elif declared is ctypes.c_char_p:
            new_args[i] = ctypes.c_char_p(shadow)
        else:
            new_args[i] = ctypes.c_void_p(shadow)
        shadows.append((slot, address if writable else None, keeper, shadow, size, text))
    return tuple(new_args), shadows


def finish(shadows: List[Shadow]) -> None:
    """After the call: copy writable data back and quarantine the shadows."""
    for slot, copy_back, _keeper, _shadow, _size, _text in shadows:
        lib.pb__quarantine_finish(slot, ffi.cast("void *", copy_back) if copy_back else ffi.NULL)
