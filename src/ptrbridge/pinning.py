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
import re
import threading
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

from ._bindings import address_of, check, ffi, lib
from .callsite import caller_frame_location, format_location
from .errors import PinLeakWarning, UnpinnableError

__all__ = ["Pinner", "describe", "python_owned_extent"]

_OWNING_CDATA = re.compile(r" owning (\d+) bytes>$")
_BUFFER_CDATA = re.compile(r" buffer len (\d+) from '.*' object>$")


def describe(obj: Any, size: int) -> str:
    """Short description of an object for messages: ``bytearray(4096)``."""
    if isinstance(obj, ffi.CData):
        return f"cdata '{ffi.typeof(obj).cname}'({size})"
    return f"{type(obj).__name__}({size})"


def _cdata_extent(obj: Any) -> Tuple[Any, int]:
    """(keep-alive object, size) for cdata that owns its memory; else UnpinnableError."""
    text = repr(obj)
    match = _OWNING_CDATA.search(text) or _BUFFER_CDATA.search(text)
    if match is None:
        raise UnpinnableError(
            f"ptrbridge.Pinner: cannot pin {text}: it does not own its memory "
            f"(only ffi.new/ffi.from_buffer results, ptrbridge.new results and buffer objects "
            f"are Python-owned; C memory needs no pinning)"
        )
    return obj, int(match.group(1))


def python_owned_extent(obj: Any) -> Tuple[Any, int, int]:
    """Return ``(keeper, address, size)`` for a Python-owned object.

    ``keeper`` holds the object's memory in place while it is referenced: a
    ``from_buffer`` cdata holds a buffer export (so a bytearray cannot be
    resized), an owning cdata is the memory itself.  Raises
    :class:`~ptrbridge.UnpinnableError` (a ``TypeError``) for objects without a
    contiguous buffer.
    """
    if isinstance(obj, ffi.CData):
        keeper, size = _cdata_extent(obj)
        return keeper, address_of(ffi.cast("char *", obj)), size
    try:
        view = memoryview(obj)
    except TypeError:
        raise UnpinnableError(
            f"ptrbridge.Pinner: cannot pin {type(obj).__name__}: it does not export a buffer "
            f"(pin bytes, bytearray, memoryview, array.array, numpy arrays, mmap, ctypes "
            f"instances, ffi.buffer objects or owning cffi cdata)"
        ) from None
    with view:
        if not view.contiguous:
            raise UnpinnableError(
                f"ptrbridge.Pinner: cannot pin a non-contiguous {type(obj).__name__} "
                f"(shape {view.shape}, strides {view.strides}): C expects one block of memory; "
                f"copy it first (e.g. bytes(obj) or numpy.ascontiguousarray)"
            )
        size = view.nbytes
    keeper = ffi.from_buffer("char[]", obj, require_writable=False)
    return keeper, address_of(keeper), size


@dataclass
class _Pin:
    obj: Any
    keeper: Any
    pointer: Any
    region_id: int
    size: int
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
        region = ffi.new("uint64_t *")
        check(lib.pb_region_add(ffi.cast("void *", address), size, lib.PB_REGION_PINNED, region),
              f"Pinner.pin({describe(obj, size)})")
        pin = _Pin(obj, keeper, ffi.cast("char *", address), int(region[0]), size, location)
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
        """Release every pin of this Pinner.  C must not use the pointers afterwards."""
        with self._lock:
            pins, self._pins = list(self._pins.values()), {}
        for pin in pins:
            _release(pin)

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
                f"{describe(pin.obj, pin.size)} pinned at {format_location(pin.location)}",
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


def _release(pin: _Pin) -> None:
    lib.pb_region_remove(pin.region_id)
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
            out.append((describe(pin.obj, pin.size), format_location(pin.location)))
    return out


@atexit.register
def _warn_at_exit() -> None:
    for pinner in list(_live_pinners):
        if pinner._pins:
            try:
                pinner._warn_leaks()
            finally:
                pinner.unpin()
