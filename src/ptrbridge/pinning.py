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
import bisect
import itertools
import warnings
from typing import TYPE_CHECKING, Any, Callable, Iterable, List, Tuple

from . import levels, scanning
from ._bindings import address_of, ffi, lib, native
from .errors import PinLeakWarning
from .ownership import describe, python_owned_extent

__all__ = ["Pinner", "pinned_objects"]


def _slow_extent(obj: Any) -> Tuple[Any, int, int]:
    """``(keeper, address, size)`` for what the C fast path does not pin itself (cffi cdata)."""
    return python_owned_extent(obj, "ptrbridge.Pinner.pin")


native.pins_init(ffi.CData, _slow_extent, vars(levels))


class Pinner(native.PinnerBase):  # type: ignore[misc, name-defined]
    """Keeps objects alive and unresizable while C holds pointers to them.

    ``p.pin(obj)`` pins one object and returns a ``char *``; ``p.pin_many(objs)``
    pins a batch and returns a ``char *[n]``; ``p.unpin()`` releases them all.
    Methods are thread-safe.  The zero-argument constructor is the only way to
    make one; a Pinner can be reused after :meth:`unpin`.  ``len(p)`` is the
    number of pinned objects.

    Pinning is one C call (a buffer export, a registry entry, the call site
    recorded as code object + instruction offset); descriptions and
    ``file.py:line`` texts are made only when a report needs them.
    """

    __slots__ = ()

    if TYPE_CHECKING:  # implemented in C (csrc/pypin.c); declared here for readers and mypy
        def pin(self, obj: Any) -> Any:
            """Pin ``obj`` and return a cffi ``char *`` to its first byte.

            Accepts any object exporting a contiguous buffer (bytes, bytearray,
            memoryview, array.array, numpy arrays, mmap, ffi.buffer, ctypes
            instances) and cffi cdata that owns its memory.  Pinning the same
            object again returns the same pointer.  Raises
            :class:`~ptrbridge.UnpinnableError` (a ``TypeError``) otherwise.
            """

        def is_pinned(self, obj: Any) -> bool:
            """True if this Pinner currently pins ``obj``."""

    def pin_many(self, objs: Iterable[Any]) -> Any:
        """Pin every object of ``objs`` (all or none) and return a cffi ``char *[n]`` of their addresses.

        The batch form of :meth:`pin` for producers handing C many buffers:
        one C call for the whole batch.  Example::

            with ptrbridge.Pinner() as p:
                ptrs = p.pin_many(frames)
                lib.write_frames(ptrs, lengths, len(frames))
        """
        items = objs if isinstance(objs, (list, tuple)) else list(objs)
        out = ffi.new("char *[]", len(items))
        self._pin_many(items, address_of(out))
        return out

    if TYPE_CHECKING:
        def unpin(self) -> None:
            """Release every pin of this Pinner.  C must not use the pointers afterwards.

            At check level 2 the unpinned memory is then scanned for (rule R2):
            a pointer C still holds raises :class:`~ptrbridge.RetainedPointerError`
            (or warns / collects, see :func:`ptrbridge.set_on_violation`).
            """

    def _unpin_scan(self) -> None:
        """``unpin()`` at check level 2 (called by the C method): unpin, retire, scan."""
        pins = self._unpin_all(True)
        if pins:
            still_pinned = _pinned_elsewhere()
            for obj, start, size, site in pins:
                if still_pinned(start, size):
                    continue  # another Pinner pins the same memory: C may still hold it
                scanning.retire(start, size, describe(obj, size), "Pinner.pin", native.site_text(site),
                                "unpinned")
            scanning.scan_and_report()

    def __enter__(self) -> "Pinner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.unpin()

    def __repr__(self) -> str:
        return f"<ptrbridge.Pinner pins={len(self)}>"

    def _warn_leaks(self) -> None:
        for obj, _start, size, site in self._pins():
            filename, lineno = native.site_location(site)
            warnings.warn_explicit(
                f"ptrbridge.Pinner: found leaking pinned pointer; forgot to call unpin()? "
                f"{describe(obj, size)} pinned at {native.site_text(site)}",
                PinLeakWarning,
                filename,
                lineno,
            )

    # Dropped with pins held: the C finalizer calls _warn_leaks() and unpin().


def _pinned_elsewhere() -> Callable[[int, int], bool]:
    """A ``_still_pinned`` for many queries: one pass over the live pins, then a bisect per query.

    ``_still_pinned`` scans the region array once per query (O(pins in flight)
    each, which made a level-2 unpin of 1000 pins with a few batches in flight
    cost ~20 ms).  Used only when every pinned region belongs to a live
    Pinner (regions added through the C API with kind PINNED are not in
    ``_pins()``); otherwise it is ``_still_pinned`` itself.
    """
    extents = sorted((start, start + size) for pinner in native.pinners_live()
                     for _obj, start, size, _site in pinner._pins())
    if len(extents) != lib.pb_region_count(lib.PB_REGION_PINNED):
        return _still_pinned
    if not extents:
        return lambda start, size: False
    starts = [start for start, _end in extents]
    max_end = list(itertools.accumulate((end for _start, end in extents), max))  # furthest end in [0..i]

    def covered(start: int, size: int) -> bool:
        if size == 0:
            return _still_pinned(start, size)  # zero-length regions: the C rules exactly
        i = bisect.bisect_right(starts, start)
        return i > 0 and max_end[i - 1] >= start + size

    return covered


def _still_pinned(start: int, size: int) -> bool:
    """True if another live pin covers ``[start, start + size)`` (after this Pinner's were removed)."""
    region = ffi.new("struct pb_region *")
    if not lib.pb_region_find(ffi.cast("void *", start), region):
        return False
    return bool(region.kind == lib.PB_REGION_PINNED and region.start <= start
                and start + size <= region.start + region.size)


def pinned_objects() -> List[Tuple[str, str]]:
    """``(description, location)`` of every object pinned by a live Pinner."""
    out = []
    for pinner in native.pinners_live():
        for obj, _start, size, site in pinner._pins():
            out.append((describe(obj, size), native.site_text(site)))
    return out


@atexit.register
def _warn_at_exit() -> None:
    for pinner in native.pinners_live():
        try:
            pinner._warn_leaks()
        finally:
            pinner.unpin()
