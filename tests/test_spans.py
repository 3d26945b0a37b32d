"""Span: bounds-checked pointer + length views."""
from __future__ import annotations

import pytest

import ptrbridge
from ptrbridge import Span
from ptrbridge._bindings import ffi


def test_span_of_bytearray() -> None:
    data = bytearray(b"0123456789")
    with Span(data) as span:
        assert len(span) == 10 and span.owner is data
        assert span.to_bytes() == bytes(data)
        assert span[0] == ord("0") and span[-1] == ord("9")
        middle = span[2:5]
        assert middle.to_bytes() == b"234" and len(middle) == 3
        assert middle.address == span.address + 2
        assert span.offset(7).to_bytes() == b"789"
        assert span[10:].to_bytes() == b"" and span[:0].to_bytes() == b""
        with pytest.raises(BufferError):
            data.extend(b"!")  # the span holds an export
    data.extend(b"!")


@pytest.mark.parametrize("bad", [slice(5, 11), slice(-1, 3), slice(4, 2)])
def test_slices_outside_the_extent(bad: slice) -> None:
    span = Span(bytearray(10))
    with pytest.raises(IndexError, match="outside"):
        span[bad]
    span.release()


def test_indexes_and_offsets_outside() -> None:
    span = Span(b"abc")
    for index in (3, -4, 100):
        with pytest.raises(IndexError, match=f"index {index} is outside the span of 3 bytes"):
            span[index]
    with pytest.raises(IndexError):
        span.offset(4)
    with pytest.raises(IndexError):
        Span(b"abc", 1, 3)
    with pytest.raises(ValueError, match="step 1"):
        span[::2]
    with pytest.raises(TypeError, match="must be an int"):
        span["1"]  # type: ignore[index]
    span.release()


def test_sub_span_of_released_span_is_unusable() -> None:
    span = Span(bytearray(8))
    sub = span[2:4]
    span.release()
    with pytest.raises(ValueError, match="used after release"):
        sub.ptr
    sub.release()


def test_span_of_cdata_and_cbuffer() -> None:
    owner = ffi.new("char[]", b"cdata!")
    span = Span(owner)
    assert len(span) == 7 and span[1:3].to_bytes() == b"da"
    with pytest.raises(TypeError, match="does not own its memory"):
        Span(ffi.cast("char *", owner))
    buf = ptrbridge.CBuffer.copy(b"c memory")
    cspan = Span(buf)[2:]
    assert cspan.to_bytes() == b"memory"
    ptrbridge.free(buf.transfer())
    with pytest.raises(ptrbridge.UseAfterTransferError):
        cspan.ptr
