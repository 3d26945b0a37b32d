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
import warnings
from typing import TYPE_CHECKING, Any, Iterable, List, Tuple

from . import levels, scanning
from ._bindings import address_of, ffi, lib, native
from .errors import PinLeakWarning
from .ownership import describe, python_owned_extent

__all__ = ["Pinner", "pinned_objects"]


def _slow_extent(obj: Any) -> Tuple[Any, int, int]:
    """``(keeper, address, size)`` for what the C fast path does not pin itself (cffi cdata)."""
    return python_owned_extent(obj, "ptrbridge.Pinner.pin")


native.pins_init(ffi.CData, _slow_extent, lib.pb__charp)


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

    def unpin(self) -> None:
        """Release every pin of this Pinner.  C must not use the pointers afterwards.

        At check level 2 the unpinned memory is then scanned for (rule R2):
        a pointer C still holds raises :class:`~ptrbridge.RetainedPointerError`
        (or warns / collects, see :func:`ptrbridge.set_on_violation`).
        """
        if levels._level != 2:
            self._unpin_all(False)
            return
        pins = self._unpin_all(True)
        if pins:
            for obj, start, size, site in pins:
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

    def __del__(self) -> None:
        if not len(self):
            return
        try:
            self._warn_leaks()
        finally:
            self.unpin()


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
