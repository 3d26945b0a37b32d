"""The exception and warning hierarchy."""
from __future__ import annotations

import warnings

import pytest

import ptrbridge
from ptrbridge import errors

BUILTIN = {
    "ConfigurationError": ValueError,
    "InvalidHandleError": ValueError,
    "HandleLimitError": RuntimeError,
    "AllocatorError": ValueError,
    "NotOwnedError": ValueError,
    "DoubleFreeError": ValueError,
    "UnpinnableError": TypeError,
    "UseAfterTransferError": RuntimeError,
    "NestedPointerError": ValueError,
    "UseAfterFreeError": ValueError,
    "CallbackResultError": ValueError,
    "ReleasedCallbackError": RuntimeError,
    "CError": RuntimeError,
}


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_every_error_is_a_pointer_error_and_its_builtin(name: str) -> None:
    cls = getattr(ptrbridge, name)
    assert issubclass(cls, ptrbridge.PointerError) and issubclass(cls, BUILTIN[name])
    assert cls is getattr(errors, name)


def test_retained_pointer_error_is_in_the_tree() -> None:
    assert issubclass(ptrbridge.RetainedPointerError, ptrbridge.PointerError)
    assert issubclass(ptrbridge.RetainedPointerError, RuntimeError)


@pytest.mark.parametrize("cls", [ptrbridge.PinLeakWarning, ptrbridge.CallTimeoutWarning,
                                 ptrbridge.RetainedPointerWarning])
def test_warnings_are_runtime_warnings_and_fail_under_error(cls: type) -> None:
    assert issubclass(cls, ptrbridge.PointerWarning) and issubclass(cls, RuntimeWarning)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(cls):
            warnings.warn("x", cls)


def test_cerror_carries_code_and_function() -> None:
    exc = ptrbridge.CError("ptrbridge: f() failed", -3, "f")
    assert exc.code == -3 and exc.function == "f" and str(exc) == "ptrbridge: f() failed"
