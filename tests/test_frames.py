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
