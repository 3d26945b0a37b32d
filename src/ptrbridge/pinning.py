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
import operator
import warnings
from operator import itemgetter
from typing import TYPE_CHECKING, Any, Callable, Iterable, List, Optional, Tuple

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
            pins = _not_pinned_elsewhere(pins)  # another Pinner pins the rest: C may still hold it
            starts = list(map(itemgetter(1), pins))
            sizes = list(map(itemgetter(2), pins))
            site_ids = list(map(itemgetter(3), pins))
            # Each text made once per batch: one per call site, one per (type, size) of the objects.
            site_texts = {site: native.site_text(site) for site in set(site_ids)}
            sites = list(map(site_texts.__getitem__, site_ids))
            objs = list(map(itemgetter(0), pins))
            if any(issubclass(kind, ffi.CData) for kind in set(map(type, objs))):
                descriptions = list(map(describe, objs, sizes))  # a cdata's text depends on more than its type
            else:
                keys = list(zip(map(type, objs), sizes))
                texts = {key: describe(obj, key[1]) for key, obj in dict(zip(keys, objs)).items()}
                descriptions = list(map(texts.__getitem__, keys))
            scanning.retire_many(starts, sizes, descriptions, "Pinner.pin", sites, "unpinned")
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


def _coverage() -> Optional[Tuple[List[int], List[int]]]:
    """The live pins as ``(starts, max_end)`` for bisecting, or None to ask ``_still_pinned``.

    Sorted starts and, at ``i``, the furthest end of the pins ``0..i``: one pass over the live
    pins for many queries (``_still_pinned`` scans the region array once per query, O(pins in
    flight) each, which made a level-2 unpin of 1000 pins with a few batches in flight cost
    ~20 ms).  Only when every pinned region belongs to a live Pinner (regions added through
    the C API with kind PINNED are not in ``_pins()``).
    """
    pins = list(itertools.chain.from_iterable(pinner._pins() for pinner in native.pinners_live()))
    if len(pins) != lib.pb_region_count(lib.PB_REGION_PINNED):
        return None
    pins.sort(key=itemgetter(1))  # by start (the order among equal starts does not change max_end)
    starts = list(map(itemgetter(1), pins))
    ends = list(map(operator.add, starts, map(itemgetter(2), pins)))
    # max_end[i]: the furthest end of the pins 0..i; the ends themselves when no pin sticks
    # out past a later one (pins that do not overlap), found without a loop in Python
    max_end = ends if ends == sorted(ends) else list(itertools.accumulate(ends, max))
    return starts, max_end


def _pinned_elsewhere() -> Callable[[int, int], bool]:
    """A ``_still_pinned`` for many queries: one pass over the live pins, then a bisect per query."""
    coverage = _coverage()
    if coverage is None:
        return _still_pinned
    return _covered_by(*coverage)


def _covered_by(starts: List[int], max_end: List[int]) -> Callable[[int, int], bool]:
    if not starts:
        return lambda start, size: False

    def covered(start: int, size: int) -> bool:
        if size == 0:
            return _still_pinned(start, size)  # zero-length regions: the C rules exactly
        i = bisect.bisect_right(starts, start)
        return i > 0 and max_end[i - 1] >= start + size

    return covered


_Pin = Tuple[Any, int, int, int]  # (object, start, size, call site id), as _pins() gives them


def _not_pinned_elsewhere(pins: List[_Pin]) -> List[_Pin]:
    """The pins of ``pins`` no live pin covers: ``_pinned_elsewhere`` for a whole batch."""
    coverage = _coverage()
    if coverage is None:
        return [pin for pin in pins if not _still_pinned(pin[1], pin[2])]
    starts, max_end = coverage
    if not starts:
        return pins
    pin_starts = list(map(itemgetter(1), pins))
    pin_sizes = list(map(itemgetter(2), pins))
    if 0 in pin_sizes:  # zero-length regions: the C rules exactly, for those
        covered = _covered_by(starts, max_end)
        return [pin for pin in pins if not covered(pin[1], pin[2])]
    # Covered iff a live pin starting at or before it reaches its end (no loop in Python):
    # reach[i] is the furthest end of the first i live pins (by start).
    reach = [-1] + max_end
    furthest = map(reach.__getitem__, map(bisect.bisect_right, itertools.repeat(starts), pin_starts))
    return list(itertools.compress(pins, map(operator.lt, furthest, map(operator.add, pin_starts, pin_sizes))))


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
