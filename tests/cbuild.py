"""Build the C code the tests need: shared libraries from tests/clib and cffi API-mode modules."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Optional, Sequence

TESTS = Path(__file__).resolve().parent
CLIB = TESTS / "clib"
CSRC = TESTS.parent / "csrc"
CFLAGS = ["-std=c11", "-Wall", "-Wextra", "-Werror", "-fPIC", "-shared", "-pthread", "-O1"]


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
        extra_compile_args=["-std=c11", "-Wall", "-Wextra"],
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
