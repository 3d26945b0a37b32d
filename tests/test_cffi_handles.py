"""ffi.new_handle() results under instrumentation (ptrbridge.cffi_handles)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
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


def test_from_handle_of_a_collected_handle_is_reported_before_cffi_aborts(tmp_path: Path,
                                                                         checked_so: Path) -> None:
    program = tmp_path / "subscribe.py"
    program.write_text(textwrap.dedent(f"""
        import gc, cffi
        ffi = cffi.FFI()
        ffi.cdef("void keep_userdata(int (*fn)(void *, int), void *userdata); int call_kept_userdata(int);")
        lib = ffi.dlopen({str(checked_so)!r})

        @ffi.callback("int(void *, int)")
        def add(userdata, x):
            return ffi.from_handle(userdata).count + x

        class Box:
            count = 1

        def subscribe():
            lib.keep_userdata(add, ffi.new_handle(Box()))  # the handle dies on return

        subscribe()
        gc.collect()
        print(lib.call_kept_userdata(1))
    """))
    plain = subprocess.run([sys.executable, str(program)], capture_output=True, text=True, timeout=120)
    assert plain.returncode == -6 and "ffi.from_handle() detected that the address passed points to garbage" \
        in plain.stderr  # cffi's own abort: the bug is not silent, but says nothing of where
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "ptrbridge", "run", "--check", "1", "--report", str(report), "--",
                           sys.executable, str(program)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 128 + 6, proc.stderr[-3000:]  # cffi still aborts, as without ptrbridge
    found = json.loads(report.read_text())["findings"]
    assert [f["kind"] for f in found] == ["collected-handle"]
    assert found[0]["severity"] == "error" and found[0]["created_at"] == "subscribe.py:15"
    assert found[0]["lent_at"] == "subscribe.py:9" and found[0]["object"] == "ffi.new_handle(Box object)"
    assert found[0]["message"].endswith(
        "SUMMARY: ptrbridge: collected-handle ffi.new_handle(Box object) (subscribe.py:15)")
    assert "ffi.from_handle() was given a collected handle" in proc.stderr  # the run's summary
