"""Build the C code the tests need: shared libraries from tests/clib and cffi API-mode modules."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Dict, List, Optional, Sequence, Tuple

TESTS = Path(__file__).resolve().parent
CLIB = TESTS / "clib"
CSRC = TESTS.parent / "csrc"


def sanitizer_flags() -> Tuple[List[str], List[str]]:
    """Compile and link flags matching ``PTRBRIDGE_SANITIZE`` (see build_ffi.py), or none.

    Under ``.ci/sanitize`` the C the tests compile is instrumented like csrc,
    so a bug in a test library is reported too and not mistaken for one in
    ptrbridge.
    """
    value = ",".join(n.strip() for n in os.environ.get("PTRBRIDGE_SANITIZE", "").split(",") if n.strip())
    if not value:
        return [], []
    return [f"-fsanitize={value}", "-fno-omit-frame-pointer", "-g"], [f"-fsanitize={value}"]


def sanitizer_env() -> Tuple[Dict[str, str], List[str], List[str]]:
    """(environment, compile flags, link flags) for a build run in a subprocess."""
    compile_flags, link_flags = sanitizer_flags()
    return dict(os.environ), compile_flags, link_flags


_SAN_COMPILE, _SAN_LINK = sanitizer_flags()
CFLAGS = ["-std=c11", "-Wall", "-Wextra", "-Werror", "-fPIC", "-shared", "-pthread", "-O1",
          *_SAN_COMPILE, *_SAN_LINK]


def build_shared(source: str, outdir: Path, libs: Sequence[str] = ()) -> Path:
    """Compile tests/clib/<source> into <outdir>/lib<stem>.so and return its path.

    Symbols from ptrbridge (pb_*) are left undefined: they resolve when the
    library is loaded after ``import ptrbridge``.
    """
    src = CLIB / source
    out = Path(outdir) / f"lib{src.stem}.so"
    cmd = ["gcc", *CFLAGS, f"-I{CSRC}", f"-I{CLIB}", str(src), "-o", str(out), *[f"-l{lib}" for lib in libs]]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out


def build_cffi_module(name: str, cdef: str, source: str, outdir: Path,
                      libraries: Sequence[str] = (), extra_sources: Optional[Sequence[str]] = None) -> ModuleType:
    """Compile and import a cffi out-of-line API-mode module ``name``."""
    import cffi

    builder = cffi.FFI()
    builder.cdef(cdef)
    builder.set_source(
        name,
        source,
        libraries=list(libraries),
        include_dirs=[str(CSRC), str(CLIB)],
        sources=[str(CLIB / s) for s in (extra_sources or ())],
        extra_compile_args=["-std=c11", "-Wall", "-Wextra", *_SAN_COMPILE],
        extra_link_args=list(_SAN_LINK),
    )
    so = builder.compile(tmpdir=str(outdir))
    spec = importlib.util.spec_from_file_location(name, so)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the compiled module {so}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def build_extension(source: str, outdir: Path) -> Path:
    """Compile tests/clib/<source> as a CPython extension module named ``_<stem>``.

    Returns the path of the .so (named with the interpreter's EXT_SUFFIX);
    ``pb_*`` symbols stay undefined and resolve from ptrbridge, which must be
    imported before the extension.
    """
    import sysconfig

    src = CLIB / source
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    out = Path(outdir) / f"_{src.stem}{suffix}"
    include = sysconfig.get_paths()["include"]
    cmd = ["gcc", *CFLAGS, f"-I{CSRC}", f"-I{include}", str(src), "-o", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out
