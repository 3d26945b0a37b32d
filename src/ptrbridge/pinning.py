"""Pinning: keep a Python buffer alive and unresizable while C holds its address.

Like Go's ``runtime.Pinner``.  ``p.pin(obj)`` returns a ``char *`` to the first
byte of ``obj``; until ``p.unpin()`` the object cannot be freed or resized
(``bytearray.extend`` raises ``BufferError``), so C may keep the pointer across
calls.  Example::

    with ptrbridge.Pinner() as p:
        lib.stream_set_input(stream, p.pin(data), len(data))
        while lib.stream_step(stream) > 0:
            ...
    # unpinned here: C must not use the pointer any more

A :class:`Pinner` that is garbage-collected, or that still holds pins when the
interpreter exits, emits :class:`~ptrbridge.PinLeakWarning` naming what was
pinned and where, then unpins.
"""
from __future__ import annotations

import atexit
import threading
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

from . import levels, scanning
from ._bindings import ffi, lib
from .callsite import caller_frame_location, format_location
from .errors import PinLeakWarning
from .ownership import RegionInfo, describe, lookup, python_owned_extent, register, unregister

__all__ = ["Pinner", "pinned_objects"]

@dataclass
class _Pin:
    obj: Any
    keeper: Any
    pointer: Any
    region: RegionInfo
    location: Tuple[str, int]


_live_pinners: "weakref.WeakSet[Pinner]" = weakref.WeakSet()


class Pinner:
    """Keeps objects alive and unresizable while C holds pointers to them.

    Methods are thread-safe.  The zero-argument constructor is the only way to
    make one; a Pinner can be reused after :meth:`unpin`.
    """

    def __init__(self) -> None:
        self._pins: Dict[int, _Pin] = {}
        self._lock = threading.Lock()
        _live_pinners.add(self)

    def pin(self, obj: Any) -> Any:
        """Pin ``obj`` and return a cffi ``char *`` to its first byte.

        Accepts any object exporting a contiguous buffer (bytes, bytearray,
        memoryview, array.array, numpy arrays, mmap, ffi.buffer, ctypes
        instances) and cffi cdata that owns its memory.  Pinning the same
        object again returns the same pointer.  Raises
        :class:`~ptrbridge.UnpinnableError` (a ``TypeError``) otherwise.
        """
        with self._lock:
            existing = self._pins.get(id(obj))
            if existing is not None and existing.obj is obj:
                return existing.pointer
        keeper, address, size = python_owned_extent(obj)
        location = caller_frame_location()
        scanning.cancel(address, size)  # pinned now: C may hold it
        region = register(lib.PB_REGION_PINNED, address, size, describe(obj, size),
                          format_location(location))
        pin = _Pin(obj, keeper, ffi.cast("char *", address), region, location)
        with self._lock:
            existing = self._pins.get(id(obj))
            if existing is not None and existing.obj is obj:  # another thread won
                _release(pin)
                return existing.pointer
            self._pins[id(obj)] = pin
        return pin.pointer

    def is_pinned(self, obj: Any) -> bool:
        """True if this Pinner currently pins ``obj``."""
        pin = self._pins.get(id(obj))
        return pin is not None and pin.obj is obj

    def unpin(self) -> None:
        """Release every pin of this Pinner.  C must not use the pointers afterwards.

        At check level 2 the unpinned memory is then scanned for (rule R2):
        a pointer C still holds raises :class:`~ptrbridge.RetainedPointerError`
        (or warns / collects, see :func:`ptrbridge.set_on_violation`).
        """
        with self._lock:
            pins, self._pins = list(self._pins.values()), {}
        for pin in pins:
            _release(pin)
        if pins and levels._level == 2:
            for pin in pins:
                region = pin.region
                if _still_pinned(region):
                    continue  # another Pinner pins the same memory: C may still hold it
                scanning.retire(region.start, region.size, region.description, "Pinner.pin",
                                region.site, "unpinned")
            scanning.scan_and_report()

    def __len__(self) -> int:
        return len(self._pins)

    def __enter__(self) -> "Pinner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.unpin()

    def __repr__(self) -> str:
        return f"<ptrbridge.Pinner pins={len(self._pins)}>"

    def _warn_leaks(self) -> None:
        for pin in list(self._pins.values()):
            warnings.warn_explicit(
                f"ptrbridge.Pinner: found leaking pinned pointer; forgot to call unpin()? "
                f"{pin.region.description} pinned at {pin.region.site}",
                PinLeakWarning,
                pin.location[0],
                pin.location[1],
            )

    def __del__(self) -> None:
        if not getattr(self, "_pins", None):
            return
        try:
            self._warn_leaks()
        finally:
            self.unpin()


def _still_pinned(region: RegionInfo) -> bool:
    """True if another live pin covers the whole of ``region`` (after it was released)."""
    other = lookup(region.start)
    return (other is not None and other.kind == "pinned"
            and other.start <= region.start and region.start + region.size <= other.start + other.size)


def _release(pin: _Pin) -> None:
    unregister(pin.region)
    if pin.keeper is not pin.obj:
        # Our own from_buffer view: give the buffer export back now, not at GC
        # time, so a bytearray can be resized again at once.  (A cdata the
        # user passed in is theirs and is left alone.)
        ffi.release(pin.keeper)


def pinned_objects() -> List[Tuple[str, str]]:
    """``(description, location)`` of every object pinned by a live Pinner."""
    out = []
    for pinner in list(_live_pinners):
        for pin in list(pinner._pins.values()):
            out.append((pin.region.description, pin.region.site))
    return out


@atexit.register
def _warn_at_exit() -> None:
    for pinner in list(_live_pinners):
        if pinner._pins:
            try:
                pinner._warn_leaks()
            finally:
                pinner.unpin()
