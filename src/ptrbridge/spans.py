"""Spans: a pointer plus a length into one owner, with bounds checks.

Pointer arithmetic on cffi cdata (``p + n``) happily walks past the end of
the buffer.  A :class:`Span` knows its owner's extent, so an offset or slice
outside it raises ``IndexError`` instead of producing a wild pointer::

    span = ptrbridge.Span(frame)               # the whole bytearray
    header, body = span[:16], span[16:]
    lib.parse(body.ptr, len(body))
    span[4096:]                                # IndexError if frame is shorter

A Span keeps its owner alive and, for buffer objects, holds a buffer export,
so a bytearray cannot be resized while a Span of it exists (call
:meth:`release` or use ``with`` to give the export back).
"""
from __future__ import annotations

from typing import Any, Optional, Union, overload

from ._bindings import ffi
from .cmem import CBuffer
from .ownership import cdata_extent, python_owned_extent

__all__ = ["Span"]


class Span:
    """A bounds-checked ``(pointer, length)`` view of a buffer, cdata or CBuffer."""

    __slots__ = ("_owner", "_keeper", "_base", "_extent", "_start", "_length")

    _owner: Any
    _keeper: Any  # the root Span, the from_buffer view, the CBuffer, or None once released
    _base: int
    _extent: int
    _start: int
    _length: int

    def __init__(self, owner: Any, offset: int = 0, length: Optional[int] = None) -> None:
        if isinstance(owner, Span):
            # A sub-span keeps its root span (which holds the export) alive.
            root = owner._keeper if isinstance(owner._keeper, Span) else owner
            self._owner, self._keeper = owner._owner, root
            self._base, self._extent = owner._base, owner._extent
            base_offset = owner._start
            available = owner._length
        else:
            self._owner = owner
            if isinstance(owner, CBuffer):
                self._keeper = owner
                self._base, self._extent = owner.address, len(owner)
            elif isinstance(owner, ffi.CData) and cdata_extent(owner) is None:
                raise TypeError(
                    f"ptrbridge.Span: {owner!r} does not own its memory, so its extent is unknown; "
                    f"make the Span from the object that owns the memory"
                )
            else:
                self._keeper, self._base, self._extent = python_owned_extent(owner, "ptrbridge.Span", "make a span of")
            base_offset, available = 0, self._extent
        _check_int(offset, "offset")
        if not 0 <= offset <= available:
            raise IndexError(
                f"ptrbridge.Span: offset {offset} is outside the owner's extent of {available} bytes"
            )
        if length is None:
            length = available - offset
        _check_int(length, "length")
        if length < 0 or offset + length > available:
            raise IndexError(
                f"ptrbridge.Span: [{offset}:{offset + length}] is outside the owner's extent "
                f"of {available} bytes"
            )
        self._start = base_offset + offset
        self._length = length

    @property
    def ptr(self) -> Any:
        """A cffi ``char *`` to the first byte."""
        return ffi.cast("char *", self.address)

    @property
    def address(self) -> int:
        """The first byte's address."""
        keeper = self._keeper
        if isinstance(keeper, Span):
            keeper = keeper._keeper
        if keeper is None:
            raise ValueError("ptrbridge.Span: used after release() (of this span or the one it was cut from)")
        if isinstance(keeper, CBuffer):
            return keeper.address + self._start  # raises if the CBuffer was given away
        return self._base + self._start

    @property
    def owner(self) -> Any:
        """The object whose memory this span views."""
        return self._owner

    def __len__(self) -> int:
        return self._length

    @overload
    def __getitem__(self, index: int) -> int: ...

    @overload
    def __getitem__(self, index: slice) -> "Span": ...

    def __getitem__(self, index: Union[int, slice]) -> Union[int, "Span"]:
        if isinstance(index, slice):
            start, stop, step = index.start, index.stop, index.step
            if step not in (None, 1):
                raise ValueError("ptrbridge.Span: slices must be contiguous (step 1)")
            start = 0 if start is None else start
            stop = self._length if stop is None else stop
            _check_int(start, "slice start")
            _check_int(stop, "slice stop")
            if not 0 <= start <= stop <= self._length:
                raise IndexError(
                    f"ptrbridge.Span: slice [{start}:{stop}] is outside the span of {self._length} bytes"
                )
            return Span(self, start, stop - start)
        _check_int(index, "index")
        if not -self._length <= index < self._length:
            raise IndexError(f"ptrbridge.Span: index {index} is outside the span of {self._length} bytes")
        if index < 0:
            index += self._length
        return int(ffi.cast("unsigned char *", self.address)[index])

    def offset(self, n: int) -> "Span":
        """The span starting ``n`` bytes later (``0 <= n <= len(self)``)."""
        return Span(self, n)

    def to_bytes(self) -> bytes:
        """A copy of the bytes."""
        return bytes(ffi.buffer(self.ptr, self._length))

    def release(self) -> None:
        """Give back the buffer export; this span, and spans cut from it, are unusable afterwards.

        Releasing a sub-span only retires that sub-span.
        """
        keeper, self._keeper = self._keeper, None
        if isinstance(keeper, ffi.CData) and keeper is not self._owner:
            ffi.release(keeper)

    def __enter__(self) -> "Span":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<ptrbridge.Span {self._length} bytes at offset {self._start} of {type(self._owner).__name__}>"


def _check_int(value: object, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"ptrbridge.Span: {what} must be an int, not {type(value).__name__}")

