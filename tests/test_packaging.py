"""What a user installs: the sdist builds a wheel, the wheel holds what the README promises,
the metadata names the supported interpreters, and unsupported ones are refused at import."""
from __future__ import annotations

import email.parser
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path
from typing import Dict, List

import pytest

import ptrbridge
from ptrbridge import _support

ROOT = Path(__file__).resolve().parent.parent
IN_CHECKOUT = (ROOT / "pyproject.toml").is_file() and (ROOT / "csrc" / "ptrbridge.h").is_file()
# Not copied into the scratch checkout: local state, build output, generated files.
IGNORED = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.so",
                                 ".hypothesis", ".pytest_cache", ".nox", "_native.c", "include")

BUILD = """
import sys
from setuptools import build_meta
kind, out = sys.argv[1], sys.argv[2]
name = build_meta.build_sdist(out) if kind == "sdist" else build_meta.build_wheel(out)
print(name)
"""


def _build(kind: str, source: Path, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, "-c", BUILD, kind, str(out)], cwd=source,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return out / done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    """An sdist of this checkout and the wheel built *from that sdist* (as pip does)."""
    if not IN_CHECKOUT:
        pytest.skip("needs the source checkout (pyproject.toml, csrc/) next to tests/")
    tmp = tmp_path_factory.mktemp("dists")
    checkout = tmp / "checkout"
    shutil.copytree(ROOT, checkout, ignore=IGNORED)
    sdist = _build("sdist", checkout, tmp / "sdist")
    with tarfile.open(sdist) as tar:
        if hasattr(tarfile, "data_filter"):  # 3.12+ and the 3.9-3.11 security releases
            tar.extractall(tmp / "unpacked", filter="data")
        else:  # pragma: no cover - older patch releases
            tar.extractall(tmp / "unpacked")  # noqa: S202 - our own archive
    (unpacked,) = (tmp / "unpacked").iterdir()
    wheel = _build("wheel", unpacked, tmp / "wheel")
    return {"sdist": sdist, "wheel": wheel}


def _wheel_names(wheel: Path) -> List[str]:
    with zipfile.ZipFile(wheel) as zf:
        return zf.namelist()


def test_wheel_ships_the_header_typing_marker_and_native_module(dists: Dict[str, Path]) -> None:
    names = _wheel_names(dists["wheel"])
    assert "ptrbridge/include/ptrbridge.h" in names
    assert "ptrbridge/py.typed" in names
    assert "ptrbridge_pytest.py" in names
    assert any(n.startswith("ptrbridge/_native") and n.endswith(".so") for n in names)
    assert not any(n.startswith(("tests/", "csrc/")) for n in names)
    with zipfile.ZipFile(dists["wheel"]) as zf:
        assert zf.read("ptrbridge/include/ptrbridge.h") == (ROOT / "csrc" / "ptrbridge.h").read_bytes()
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        assert "[pytest11]\nptrbridge = ptrbridge_pytest" in zf.read(entry_points).decode()


def test_sdist_has_everything_to_build_and_test(dists: Dict[str, Path]) -> None:
    with tarfile.open(dists["sdist"]) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    for needed in ("setup.py", "build_ffi.py", "pyproject.toml", "csrc/ptrbridge.h", "csrc/alloc.c",
                   "tests/conftest.py", "tests/cbuild.py", "tests/clib/capi_ext.c"):
        assert needed in names, f"{needed} missing from the sdist"


def test_metadata_lists_supported_versions_and_test_requirements(dists: Dict[str, Path]) -> None:
    with zipfile.ZipFile(dists["wheel"]) as zf:
        (metadata,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        meta = email.parser.Parser().parsestr(zf.read(metadata).decode())
    assert meta["Requires-Python"] == ">=3.9"
    assert meta["License-Expression"] == "MIT"
    classifiers = set(meta.get_all("Classifier") or [])
    for major, minor in _support.SUPPORTED:
        assert f"Programming Language :: Python :: {major}.{minor}" in classifiers
    test_requirements = {req.split(";")[0].split(">")[0].split("=")[0].split("<")[0].strip()
                         for req in meta.get_all("Requires-Dist") or [] if "extra == \"test\"" in req}
    # setuptools: cffi compiles through its distutils, gone from the 3.12+ stdlib.
    assert {"pytest", "hypothesis", "numpy", "setuptools"} <= test_requirements


# ---- interpreters refused at import -----------------------------------------------------


def test_this_interpreter_is_supported() -> None:
    assert sys.version_info[:2] in _support.SUPPORTED
    _support.check_interpreter()  # what import did


def test_free_threaded_build_is_refused_with_its_name() -> None:
    with pytest.raises(ImportError, match=r"free-threaded .*CPython 3\.13\.0t.*Py_GIL_DISABLED"):
        _support.check_interpreter("cpython", (3, 13), 1, "CPython 3.13.0t (/usr/bin/python3.13t)")


@pytest.mark.parametrize(("implementation", "version", "reason"), [
    ("pypy", (3, 10), "unsupported Python implementation"),
    ("cpython", (3, 8), "unsupported Python version"),
])
def test_other_interpreters_are_refused(implementation: str, version: tuple, reason: str) -> None:
    with pytest.raises(ImportError, match=reason):
        _support.check_interpreter(implementation, version, 0, "an interpreter")


def test_refusal_happens_before_the_c_module_loads() -> None:
    # A GIL build pretending to be free-threaded: import must stop before _native is loaded.
    code = textwrap.dedent("""
        import sys, sysconfig
        real = sysconfig.get_config_var
        sysconfig.get_config_var = lambda name: 1 if name == "Py_GIL_DISABLED" else real(name)
        try:
            import ptrbridge
        except ImportError as exc:
            print("refused:", exc)
        print("native loaded:", "ptrbridge._native" in sys.modules)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "refused: ptrbridge: the free-threaded CPython build is not supported" in done.stdout
    assert "native loaded: False" in done.stdout
    assert ptrbridge.get_include()  # and this process is unaffected


# ---- PTRBRIDGE_SANITIZE (build_ffi.py) ---------------------------------------------------


@pytest.fixture(scope="module")
def build_ffi():  # type: ignore[no-untyped-def]
    if not IN_CHECKOUT:
        pytest.skip("needs the source checkout (build_ffi.py) next to tests/")
    import importlib.util

    spec = importlib.util.spec_from_file_location("_pb_build_ffi", ROOT / "build_ffi.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sanitize_flags_compile_and_link(build_ffi) -> None:  # type: ignore[no-untyped-def]
    assert build_ffi.sanitizer_flags("") == ([], [])
    compile_flags, link_flags = build_ffi.sanitizer_flags(" address, undefined ")
    assert compile_flags == ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g",
                             "-fno-sanitize-recover=undefined"]
    assert link_flags == ["-fsanitize=address,undefined"]
    assert build_ffi.sanitizer_flags("thread") == (["-fsanitize=thread", "-fno-omit-frame-pointer", "-g"],
                                                   ["-fsanitize=thread"])


@pytest.mark.parametrize(("value", "message"), [
    ("adress", r"PTRBRIDGE_SANITIZE='adress': unknown sanitizer\(s\) \['adress'\]"),
    ("thread,address", r"thread cannot be combined with address"),
])
def test_sanitize_refuses_what_gcc_would(build_ffi, value: str, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit, match=message):
        build_ffi.sanitizer_flags(value)
