"""ffi.new_handle() results: tokens C keeps, not memory lent to it (instrumented and wrapped calls)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import cffi
import pytest

import ptrbridge
from ptrbridge import findings, scanning
from conftest import CHECKED_CDEF


def _abi(checked_so: Path) -> Any:
    ffi = cffi.FFI()
    ffi.cdef(CHECKED_CDEF)
    return ffi, ffi.dlopen(str(checked_so))


def test_a_handle_c_keeps_is_a_token_not_lent_memory(instrumented: None, checked_so: Path) -> None:
    # ffi.new_handle() as a callback's user data, kept by C while the program keeps the handle:
    # correct code (cffi's documented idiom), at every level, instrumented or wrapped.
    ffi, lib = _abi(checked_so)

    class Box:
        total = 0

    @ffi.callback("int(void *, int)")
    def add(userdata: Any, x: int) -> int:
        box = ffi.from_handle(userdata)
        box.total += x
        return int(box.total)

    box = Box()
    handle = ffi.new_handle(box)
    wrapped = ptrbridge.wrap(ptrbridge.unwrap(lib))
    for level in (0, 1, 2):
        with ptrbridge.checking(level):
            for c in (lib, wrapped):
                c.keep_userdata(add, handle)
                before = box.total
                assert c.call_kept_userdata(3) == before + 3
                if level == 2:  # C keeping the token is not a retained lend
                    token = int(ffi.cast("uintptr_t", handle))
                    assert [r for r in scanning.scan() if r.address == token] == []
    assert [f for f in findings.take() if f.severity == "error"] == []
    with pytest.raises(ptrbridge.UnpinnableError, match=r"ffi.new_handle\(\) result is a token"):
        ptrbridge.Pinner().pin(handle)
    lib.keep_userdata(ffi.NULL, ffi.NULL)
