"""ptrbridge.callback: R4, exceptions across C, released callbacks, Handle userdata."""
from __future__ import annotations

import ctypes
import sys
from pathlib import Path
from typing import Any, List, Tuple

import pytest

import ptrbridge
from ptrbridge import CallbackResultError, Handle, InvalidHandleError, Pinner, ReleasedCallbackError


@pytest.fixture
def cabi(abi: Tuple[Any, Any]) -> Tuple[Any, Any]:
    ffi, raw = abi
    return ffi, ptrbridge.wrap(raw)


@pytest.fixture
def unraisable(monkeypatch: pytest.MonkeyPatch) -> List[Any]:
    seen: List[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u))
    return seen


def test_cffi_callback_round_trip(cabi: Tuple[Any, Any]) -> None:
    ffi, c = cabi
    with ptrbridge.callback(ffi, "int(int)", lambda i: i * 10) as cb:
        assert c.call_each(cb.cdata, 4) == 60
        assert ptrbridge.live_callbacks() >= 1 and "live" in repr(cb)
    assert cb.released


def test_exception_is_reraised_by_the_outer_call_and_c_gets_the_error_value(
        cabi: Tuple[Any, Any], unraisable: List[Any]) -> None:
    ffi, c = cabi
    seen: List[int] = []

    def fn(i: int) -> int:
        seen.append(i)
        if i == 2:
            raise KeyError("boom in callback")
        return 1

    with ptrbridge.callback(ffi, "int(int)", fn, error=-7) as cb:
        with pytest.raises(KeyError, match="boom in callback"):
            c.call_each(cb.cdata, 5)
        assert seen == [0, 1, 2]  # C stopped at the error value -7
        raw_result = ptrbridge.unwrap(c).call_each(cb.cdata, 5)  # unchecked: nobody re-raises
    assert raw_result == -7
    assert len(unraisable) == 1 and isinstance(unraisable[0].exc_value, KeyError)


def test_r4_unpinned_result_is_reported(cabi: Tuple[Any, Any]) -> None:
    ffi, c = cabi
    keep = ffi.new("char[]", b"temporary")
    with ptrbridge.callback(ffi, "const char *(int)", lambda i: keep) as cb:
        with pytest.raises(CallbackResultError) as info:
            c.call_get_len(cb.cdata, 0)
    message = str(info.value)
    assert message.startswith("ptrbridge: callback result is unpinned Python pointer: cdata 'char[]'(10)")
    assert "test_callbacks.py:" in message and "pin it with ptrbridge.Pinner" in message


def test_r4_pinned_and_c_memory_results_pass(cabi: Tuple[Any, Any]) -> None:
    ffi, c = cabi
    data = ffi.new("char[]", b"pinned")
    copy = ptrbridge.cstring("copied!")
    with Pinner() as p:
        ptr = p.pin(data)
        with ptrbridge.callback(ffi, "const char *(int)", lambda i: ptr) as cb:
            assert c.call_get_len(cb.cdata, 0) == 6
    with ptrbridge.callback(ffi, "const char *(int)", lambda i: copy.ptr) as cb:
        assert c.call_get_len(cb.cdata, 0) == 7
    with ptrbridge.callback(ffi, "const char *(int)", lambda i: ffi.NULL) as cb:
        assert c.call_get_len(cb.cdata, 0) == -1


def test_r4_skipped_at_level_zero(cabi: Tuple[Any, Any]) -> None:
    ffi, c = cabi
    keep = ffi.new("char[]", b"abc")
    with ptrbridge.callback(ffi, "const char *(int)", lambda i: keep) as cb:
        with ptrbridge.checking(0):
            assert c.call_get_len(cb.cdata, 0) == 3


def test_released_callback_reports_instead_of_crashing(cabi: Tuple[Any, Any]) -> None:
    """A checked call through a released callback raises; C itself got the error value."""
    ffi, c = cabi
    cb = ptrbridge.callback(ffi, "int(int)", lambda i: 1, error=-1)
    pointer = cb.cdata
    cb.release()
    cb.release()  # twice: harmless
    with pytest.raises(ReleasedCallbackError, match=r"call through a released callback .* released at test_callbacks.py:\d+"):
        c.call_each(pointer, 3)


def test_released_callback_returns_error_value(cabi: Tuple[Any, Any], unraisable: List[Any]) -> None:
    ffi, c = cabi
    cb = ptrbridge.callback(ffi, "int(int)", lambda i: 1, error=-1)
    cb.release()
    assert ptrbridge.unwrap(c).call_each(cb.cdata, 3) == -1
    assert unraisable and isinstance(unraisable[0].exc_value, ReleasedCallbackError)


def test_callback_on_a_c_thread_without_checked_call_is_unraisable(cabi: Tuple[Any, Any], unraisable: List[Any]) -> None:
    ffi, c = cabi

    def fn(i: int) -> int:
        raise ValueError(f"thread {i}")

    with ptrbridge.callback(ffi, "int(int)", fn, error=-5) as cb:
        # the checked call is on this thread; the callback runs on another C thread
        assert c.call_on_thread(cb.cdata, 9) == -5
    assert len(unraisable) == 1
    assert isinstance(unraisable[0].exc_value, ValueError) and "thread 9" in str(unraisable[0].exc_value)


def test_handle_userdata_is_resolved_and_validated(cabi: Tuple[Any, Any]) -> None:
    ffi, c = cabi
    results: List[int] = []
    h = Handle(results)

    def on_item(target: List[int], i: int) -> int:
        target.append(i)
        return i

    with ptrbridge.callback(ffi, "int(void *, int)", on_item, error=-1, userdata=0) as cb:
        assert c.call_with_userdata(cb.cdata, ffi.cast("void *", int(h)), 3) == 3
        assert results == [0, 1, 2]
        h.delete()
        with pytest.raises(InvalidHandleError, match="misuse of an invalid Handle"):
            c.call_with_userdata(cb.cdata, ffi.cast("void *", int(h)), 1)


@pytest.mark.parametrize("bad", [-1, 2, True, "0"])
def test_bad_userdata_index(cabi: Tuple[Any, Any], bad: object) -> None:
    ffi, _ = cabi
    with pytest.raises(ValueError, match="userdata must be the index of an argument"):
        ptrbridge.callback(ffi, "int(void *, int)", lambda u, i: 0, userdata=bad)  # type: ignore[arg-type]


def test_bad_signatures(cabi: Tuple[Any, Any]) -> None:
    ffi, _ = cabi
    with pytest.raises(TypeError, match="is not a function type"):
        ptrbridge.callback(ffi, ffi.typeof("int"), lambda: 0)
    with pytest.raises(TypeError):
        ptrbridge.callback(ffi, "int(int)")


def test_ctypes_callbacks(checked_so: Path, unraisable: List[Any]) -> None:
    proto = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)
    raw = ctypes.CDLL(str(checked_so))
    raw.call_each.argtypes = [proto, ctypes.c_int]
    c = ptrbridge.wrap(raw)
    with ptrbridge.callback(proto, lambda i: i + 1) as cb:
        assert c.call_each(cb.cdata, 3) == 6

    def bad(i: int) -> int:
        raise RuntimeError("ctypes boom")

    with ptrbridge.callback(proto, bad, error=-2) as cb:
        with pytest.raises(RuntimeError, match="ctypes boom"):
            c.call_each(cb.cdata, 3)
    released = ptrbridge.callback(proto, lambda i: 0, error=-3)
    released.release()
    assert raw.call_each(released.cdata, 1) == -3
    assert isinstance(unraisable[-1].exc_value, ReleasedCallbackError)
    with pytest.raises(TypeError):
        ptrbridge.callback(proto, lambda i: 0, lambda i: 1)


def test_ctypes_pointer_result_checked(checked_so: Path) -> None:
    proto = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_int)
    raw = ctypes.CDLL(str(checked_so))
    raw.call_get_len.argtypes = [proto, ctypes.c_int]
    c = ptrbridge.wrap(raw)
    data = ctypes.create_string_buffer(b"ctypes!")
    with ptrbridge.callback(proto, lambda i: ctypes.addressof(data)) as cb:
        with pytest.raises(CallbackResultError, match="c_char_Array_8"):
            c.call_get_len(cb.cdata, 0)
        with Pinner() as p:
            p.pin(data)
            assert c.call_get_len(cb.cdata, 0) == 7


def test_extern_python_callback(api: Any) -> None:
    c = ptrbridge.wrap(api.lib)
    squares: List[int] = []

    @ptrbridge.extern_callback(api.ffi, name="py_square", error=-1)
    def py_square(i: int) -> int:
        squares.append(i)
        return i * i

    assert c.sum_of_squares(4) == 0 + 1 + 4 + 9
    assert squares == [0, 1, 2, 3]
    py_square.release()
    with pytest.raises(ReleasedCallbackError):
        c.sum_of_squares(2)


def test_r4_on_a_c_thread_without_python_frames(cabi: Tuple[Any, Any], unraisable: List[Any]) -> None:
    """C calls the callback from a thread of its own: the R4 check still runs, C gets NULL."""
    ffi, c = cabi
    keep = ffi.new("char[]", b"temporary")
    with ptrbridge.callback(ffi, "const char *(int)", lambda i: keep) as cb:
        assert c.call_get_len_on_thread(cb.cdata, 0) == -1
    assert len(unraisable) == 1 and isinstance(unraisable[0].exc_value, CallbackResultError)
    copy = ptrbridge.cstring("from C memory")
    with ptrbridge.callback(ffi, "const char *(int)", lambda i: copy.ptr) as cb:
        assert c.call_get_len_on_thread(cb.cdata, 0) == 13


@pytest.mark.parametrize("bad", [1.5, "seven", None])
def test_cffi_callback_result_of_the_wrong_type_is_reraised(cabi: Tuple[Any, Any], unraisable: List[Any],
                                                           bad: object, capfd: pytest.CaptureFixture[str]) -> None:
    ffi, c = cabi
    with ptrbridge.callback(ffi, "int(int)", lambda i: bad, error=-4) as cb:
        with pytest.raises(TypeError):
            c.call_each(cb.cdata, 3)
        assert ptrbridge.unwrap(c).call_each(cb.cdata, 1) == -4  # C got the error value
    assert isinstance(unraisable[-1].exc_value, TypeError)
    assert "From cffi callback" not in capfd.readouterr().err  # not printed and swallowed by cffi


def test_cffi_callback_result_out_of_range_is_reraised(cabi: Tuple[Any, Any]) -> None:
    ffi, c = cabi
    with ptrbridge.callback(ffi, "int(int)", lambda i: 2**40, error=-4) as cb:
        with pytest.raises(OverflowError):
            c.call_each(cb.cdata, 1)
    with ptrbridge.callback(ffi, "int(int)", lambda i: 2) as cb:  # the right type still passes
        assert c.call_each(cb.cdata, 3) == 6


def test_ctypes_callback_result_of_the_wrong_type_is_reraised(checked_so: Path) -> None:
    proto = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)
    raw = ctypes.CDLL(str(checked_so))
    raw.call_each.argtypes = [proto, ctypes.c_int]
    c = ptrbridge.wrap(raw)
    with ptrbridge.callback(proto, lambda i: "x", error=-2) as cb:
        with pytest.raises(TypeError):
            c.call_each(cb.cdata, 2)
