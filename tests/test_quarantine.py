"""Quarantine: lent buffers as guard-paged shadows; a later use by C is a reported crash."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Iterator

import cffi
import pytest

import ptrbridge
from ptrbridge import quarantine

from cbuild import build_shared

REPORT = "ptrbridge: C used a pointer to Python memory after the call that lent it returned (R2, caught by quarantine)"


@pytest.fixture(scope="module")
def keeper_so(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_shared("keeper.c", tmp_path_factory.mktemp("qkeeper"))


PROGRAM = """
import cffi, faulthandler, ptrbridge
kffi = cffi.FFI()
kffi.cdef("void keep_global(const char *p); int keep_heap(const char *p); int keep_indirect(const char *p);"
          "int keep_copy(const char *p, size_t n); int keeper_read(void);")
k = ptrbridge.wrap(kffi.dlopen({so!r}))
ptrbridge.set_check_level(2)
ptrbridge.set_quarantine(True)
ptrbridge.set_on_violation("collect")  # let the program go on to the bad read
{body}
print("read", k.keeper_read(), flush=True)
print("findings", len(ptrbridge.violations()), flush=True)
"""


def _run(so: Path, body: str, *flags: str) -> subprocess.CompletedProcess:
    code = PROGRAM.format(so=str(so), body=textwrap.dedent(body))
    return subprocess.run([sys.executable, *flags, "-c", code], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("keep", ["keep_global", "keep_heap", "keep_indirect"])
def test_kept_pointer_used_later_is_a_reported_crash(keeper_so: Path, keep: str) -> None:
    proc = _run(keeper_so, f'k.{keep}(b"lent for one call")')
    assert proc.returncode == -signal.SIGSEGV, proc.stdout + proc.stderr
    assert REPORT in proc.stderr
    assert f"bytes(18) lent to {keep}() at <string>:" in proc.stderr  # with the NUL C may read
    assert "is offset 0 into it" in proc.stderr
    assert "pin the object for its whole C lifetime" in proc.stderr
    assert "read" not in proc.stdout


def test_report_comes_before_faulthandler(keeper_so: Path) -> None:
    proc = _run(keeper_so, 'k.keep_global(b"xyz")', "-X", "faulthandler")
    assert proc.returncode == -signal.SIGSEGV
    assert REPORT in proc.stderr and "Fatal Python error: Segmentation fault" in proc.stderr
    assert proc.stderr.index(REPORT) < proc.stderr.index("Fatal Python error")


def test_handler_goes_back_on_top_when_faulthandler_came_later(keeper_so: Path) -> None:
    body = """
        k.keep_copy(b"first", 5)        # installs ptrbridge's handler
        faulthandler.enable()          # now faulthandler is on top
        k.keep_global(b"second call")  # a quarantined call puts ptrbridge back on top
    """
    proc = _run(keeper_so, body)
    assert proc.returncode == -signal.SIGSEGV
    assert "bytes(12) lent to keep_global()" in proc.stderr
    assert "Fatal Python error" in proc.stderr  # and faulthandler still ran, chained


def test_correct_library_runs_clean(keeper_so: Path) -> None:
    proc = _run(keeper_so, 'k.keep_copy(b"copied", 6)')
    assert proc.returncode == 0, proc.stderr
    assert f"read {ord('c')}" in proc.stdout and "findings 0" in proc.stdout
    assert REPORT not in proc.stderr


@pytest.fixture
def quarantined() -> Iterator[None]:
    old = ptrbridge.set_quarantine(True)
    try:
        with ptrbridge.checking(2):
            yield
    finally:
        ptrbridge.set_quarantine(old)


def test_writable_data_is_copied_back(quarantined: None) -> None:
    libc_ffi = cffi.FFI()
    libc_ffi.cdef("void *memset(void *s, int c, size_t n); size_t strlen(const char *s);")
    libc = ptrbridge.wrap(libc_ffi.dlopen(None))
    small = bytearray(100)
    libc.memset(libc_ffi.from_buffer(small), 0x41, 100)
    assert small == b"A" * 100
    big = bytearray(1 << 20)  # larger than a pool slot: a mapping of its own
    libc.memset(libc_ffi.from_buffer(big), 0x42, len(big))
    assert big == b"B" * len(big)
    owned = libc_ffi.new("char[]", 16)
    libc.memset(owned, 0x43, 15)
    assert libc_ffi.string(owned) == b"C" * 15
    assert libc.strlen(b"read-only input") == 15
    assert 1 <= quarantine.held() <= 16


def test_many_lends_reuse_slots(quarantined: None) -> None:
    libc_ffi = cffi.FFI()
    libc_ffi.cdef("size_t strlen(const char *s);")
    libc = ptrbridge.wrap(libc_ffi.dlopen(None))
    for i in range(500):
        assert libc.strlen(b"x" * (i % 50)) == i % 50
    assert quarantine.held() == 16  # the FIFO is bounded


def test_set_quarantine_rejects_non_bools() -> None:
    with pytest.raises(TypeError):
        ptrbridge.set_quarantine(1)  # type: ignore[arg-type]
    assert ptrbridge.quarantine_enabled() is False


def test_environment_turns_it_on() -> None:
    env = dict(os.environ, PTRBRIDGE_QUARANTINE="1")
    proc = subprocess.run([sys.executable, "-c", "import ptrbridge; print(ptrbridge.quarantine_enabled())"],
                          env=env, capture_output=True, text=True)
    assert proc.stdout.strip() == "True"


def test_ctypes_arguments_are_shadowed(quarantined: None) -> None:
    import ctypes

    crt = ctypes.CDLL(None)
    crt.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    crt.memset.restype = ctypes.c_void_p
    crt.strlen.argtypes = [ctypes.c_char_p]
    crt.strlen.restype = ctypes.c_size_t
    libc = ptrbridge.wrap(crt)
    held = quarantine.held()
    buf = (ctypes.c_char * 32)()
    shadow = libc.memset(buf, 0x44, 31)  # returns the pointer it was given: the shadow
    assert buf.value == b"D" * 31 and shadow != ctypes.addressof(buf)
    assert libc.strlen(b"ctypes bytes") == 12
    assert quarantine.held() >= min(held + 2, 16)


KEEPER_CTYPES = """
import ctypes, ptrbridge
k = ctypes.CDLL({so!r})
k.keep_global.argtypes = [ctypes.c_char_p]
k.keeper_read.restype = ctypes.c_int
w = ptrbridge.wrap(k)
ptrbridge.set_check_level(2)
ptrbridge.set_quarantine(True)
ptrbridge.set_on_violation("collect")
w.keep_global(b"ctypes lent")
print("read", w.keeper_read(), flush=True)
"""


def test_ctypes_kept_pointer_is_caught(keeper_so: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", KEEPER_CTYPES.format(so=str(keeper_so))],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGSEGV, proc.stdout + proc.stderr
    assert "bytes(12) lent to keep_global()" in proc.stderr
