"""csrc/pyframes.c: a frame's variables read without the f_locals snapshot that keeps them alive."""
from __future__ import annotations

import gc
import sys
import weakref
from typing import Any, Dict

import pytest

from ptrbridge._bindings import native


class _Thing:
    pass


def test_locals_cells_and_free_variables() -> None:
    def outer(a: int, b: int = 2) -> Dict[str, Any]:
        shared = [1]  # a cell variable: inner() reads it
        unbound: int  # declared, never assigned: no value to report

        def inner() -> Any:
            return shared, a

        return dict(native.frame_variables(sys._getframe()))

    got = outer(1)
    assert set(got) == {"a", "b", "shared", "inner"}
    assert got["a"] == 1 and got["b"] == 2 and got["shared"] == [1]

    def closure() -> Any:
        x = "free"

        def reads() -> Any:
            return x, dict(native.frame_variables(sys._getframe()))

        return reads()

    _, inside = closure()
    assert inside["x"] == "free"  # a free variable is read through its cell


def test_module_and_class_frames_read_their_namespace() -> None:
    namespace: Dict[str, Any] = {}
    exec("import sys\nfrom ptrbridge._bindings import native\nv = 5\nseen = dict(native.frame_variables(sys._getframe()))",
         namespace)
    assert namespace["seen"]["v"] == 5

    class Body:
        field = "class body"
        seen = dict(native.frame_variables(sys._getframe()))

    assert Body.seen["field"] == "class body"


def test_reading_a_frame_keeps_nothing_alive() -> None:
    obj = _Thing()
    gone = weakref.ref(obj)
    enabled = gc.isenabled()
    gc.disable()
    try:
        assert any(value is obj for _, value in native.frame_variables(sys._getframe()))
        del obj
        assert gone() is None  # f_locals (before 3.13) would have kept a reference in the frame
    finally:
        if enabled:
            gc.enable()


def test_a_non_frame_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="frame_variables\\(\\) takes a frame object, not int"):
        native.frame_variables(3)


def test_owner_index_finds_a_variable_before_the_items_of_a_long_list() -> None:
    # brotlicffi's decompressor, reduced: `chunks` (hundreds of output chunks) comes before
    # `in_buffer` among the variables.  Read item by item first, the chunks filled the index's
    # limit and the buffer a pointer points into was never found (and every frame was read).
    import cffi

    import ptrbridge  # noqa: F401  (owners_init ran on import)

    ffi = cffi.FFI()

    def decompress() -> Any:
        chunks = [bytes([i % 256]) * 8 for i in range(600)]
        in_buffer = ffi.new("uint8_t[]", b"input")
        index = native.owner_index((), sys._getframe(), 1, 512)
        hit = index.find(int(ffi.cast("uintptr_t", in_buffer)) + 2)
        first_chunk = index.find(native.buffer_extent(chunks[0])[0])
        return hit, first_chunk, ffi.sizeof(in_buffer)

    hit, first_chunk, size = decompress()
    assert hit is not None and hit[1] == size and hit[3] == "local variable 'in_buffer'"
    assert first_chunk is not None and first_chunk[3] == "local variable 'chunks[0]'"  # items still read
