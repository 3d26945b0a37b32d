"""The public C API: pb_* by name after `import ptrbridge`, and the pb_api table."""
from __future__ import annotations

import ctypes
import importlib.util
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import cffi
import pytest

import ptrbridge
from cbuild import CLIB, CSRC, sanitizer_env
from ptrbridge._bindings import ffi, lib


def test_symbols_are_global_for_libraries_loaded_later(uses_pb_lib: Path) -> None:
    c = ctypes.CDLL(str(uses_pb_lib))  # its pb_* references resolve from ptrbridge
    c.by_name_roundtrip.argtypes = [ctypes.c_size_t]
    base = ptrbridge.stats()
    assert c.by_name_roundtrip(100) == 0
    now = ptrbridge.stats()
    assert now.allocations == base.allocations + 1 and now.frees == base.frees + 1


def test_memory_allocated_in_c_shows_in_stats(uses_pb_lib: Path) -> None:
    c = ctypes.CDLL(str(uses_pb_lib))
    c.by_name_alloc.restype = ctypes.c_void_p
    c.by_name_alloc.argtypes = [ctypes.c_size_t]
    base = ptrbridge.stats()
    block = c.by_name_alloc(48)
    assert ptrbridge.stats().live_bytes == base.live_bytes + 48
    ptrbridge.free(block)
    assert ptrbridge.stats().live_bytes == base.live_bytes


def test_dlopen_none_finds_the_symbols() -> None:
    other = cffi.FFI()
    other.cdef("int pb_api_version(void); const char *pb_strerror(int);")
    c = other.dlopen(None)
    assert c.pb_api_version() == 1
    assert other.string(c.pb_strerror(-5)).startswith(b"misuse of an invalid handle")


def test_c_api_table(uses_pb_lib: Path) -> None:
    api = ptrbridge.c_api()
    assert ffi.typeof(api) is ffi.typeof("const struct pb_api *")
    assert api.version == lib.pb_api_version() == 1
    block = api.malloc(16)
    assert api.alloc_size(block) == 16
    assert api.free(block) == lib.PB_OK
    assert api.free(block) == lib.PB_ERR_DOUBLE_FREE
    c = ctypes.CDLL(str(uses_pb_lib))
    c.by_table_roundtrip.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    assert c.by_table_roundtrip(int(ffi.cast("uintptr_t", api)), 64) == 0
    assert c.by_table_roundtrip(None, 64) == -100


def test_release_from_c_both_ways(uses_pb_lib: Path) -> None:
    c = ctypes.CDLL(str(uses_pb_lib))
    c.by_name_release.argtypes = [ctypes.c_size_t]
    c.by_table_release.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    api = int(ffi.cast("uintptr_t", ptrbridge.c_api()))
    first, second = ptrbridge.Handle("a"), ptrbridge.Handle("b")
    assert c.by_name_release(int(first)) == lib.PB_OK
    assert c.by_table_release(api, int(second)) == lib.PB_OK
    assert c.by_name_release(int(first)) == lib.PB_ERR_INVALID_HANDLE
    assert not first.is_valid() and not second.is_valid()
    ptrbridge.collect()


def test_status_strings() -> None:
    for status in (0, -1, -2, -3, -4, -5, -6, 12345):
        assert ffi.string(lib.pb_strerror(status))
    assert ffi.string(lib.pb_strerror(12345)) == b"unknown ptrbridge status"


def test_native_library_path() -> None:
    path = Path(ptrbridge.native_library_path())
    assert path.exists() and path.name.startswith("_native")


# ---- the installed header: ptrbridge.get_include() ----------------------------------


def test_get_include_is_the_installed_copy_of_the_header() -> None:
    include = Path(ptrbridge.get_include())
    package = Path(ptrbridge.__file__).resolve().parent
    assert include == package / "include"  # shipped inside the package, not csrc/
    header = include / "ptrbridge.h"
    assert "#define PB_API_VERSION 1" in header.read_text()
    if CSRC.is_dir():  # from a source checkout: the copy must be the current header
        assert header.read_bytes() == (CSRC / "ptrbridge.h").read_bytes(), (
            "the installed ptrbridge.h differs from csrc/ptrbridge.h: reinstall (pip install -e .)")


SETUP_PY = """
import ptrbridge
from setuptools import Extension, setup

setup(
    name="capi-ext",
    ext_modules=[Extension(
        "_capi_ext", ["capi_ext.c"],
        include_dirs=[ptrbridge.get_include()],
        extra_compile_args=["-std=c11", "-Wall", "-Wextra", "-Werror"] + EXTRA_COMPILE,
        extra_link_args=EXTRA_LINK,
    )],
)
"""


@pytest.fixture(scope="session")
def capi_ext(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    """tests/clib/capi_ext.c built by setuptools, as an extension author would, with
    only ``ptrbridge.get_include()`` on the include path (not csrc/)."""
    work = tmp_path_factory.mktemp("capi_ext")
    shutil.copy(CLIB / "capi_ext.c", work / "capi_ext.c")
    env, extra_compile, extra_link = sanitizer_env()
    (work / "setup.py").write_text(
        f"EXTRA_COMPILE = {extra_compile!r}\nEXTRA_LINK = {extra_link!r}\n" + textwrap.dedent(SETUP_PY))
    done = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=work, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"-I{ptrbridge.get_include()}" in done.stdout + done.stderr  # the include path used
    (so,) = work.glob("_capi_ext*.so")
    spec = importlib.util.spec_from_file_location("_capi_ext", so)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_extension_sees_the_runtime_it_was_compiled_for(capi_ext: ModuleType) -> None:
    assert capi_ext.versions() == (1, lib.pb_api_version())


def test_extension_allocates_and_python_frees(capi_ext: ModuleType) -> None:
    base = ptrbridge.stats()
    block = capi_ext.copy_to_c(b"hello, C")
    assert capi_ext.block_size(block) == 8
    assert ffi.buffer(ffi.cast("char *", block), 8)[:] == b"hello, C"
    now = ptrbridge.stats()
    assert (now.live_blocks, now.live_bytes) == (base.live_blocks + 1, base.live_bytes + 8)
    ptrbridge.free(block)
    with pytest.raises(ptrbridge.DoubleFreeError):
        ptrbridge.free(block)


def test_extension_frees_and_sees_the_status_codes(capi_ext: ModuleType) -> None:
    block = capi_ext.copy_to_c(bytearray(100))
    assert capi_ext.release_block(block) == lib.PB_OK
    assert capi_ext.release_block(block) == lib.PB_ERR_DOUBLE_FREE
    assert capi_ext.strerror(lib.PB_ERR_DOUBLE_FREE) == ffi.string(lib.pb_strerror(lib.PB_ERR_DOUBLE_FREE)).decode()


def test_extension_releases_a_handle_without_the_gil(capi_ext: ModuleType) -> None:
    handle = ptrbridge.Handle(["payload"])
    assert capi_ext.release_handle(int(handle)) == lib.PB_OK
    assert capi_ext.release_handle(int(handle)) == lib.PB_ERR_INVALID_HANDLE
    assert not handle.is_valid()
    ptrbridge.collect()
