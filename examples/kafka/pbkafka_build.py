"""Build the ``_pbkafka`` cffi module (out-of-line API mode) on first use.

The module links librdkafka (Debian: ``librdkafka-dev``) and compiles
``pbkafka.c`` (the delivery-report callback).  Its declarations come from
files, not Python strings: the ``PBK_CDEF`` block of ``pbkafka.h`` and
``rdkafka.cdef`` (the librdkafka subset Python calls).

The compiled module goes into a cache directory keyed by a hash of the
sources, the header of ptrbridge, the Python and cffi versions, so a second
run only loads it: ``$PBKAFKA_CACHE`` or ``~/.cache/ptrbridge/kafka``.
``python pbkafka_build.py [DIR]`` builds it ahead of time.
"""
from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import re
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from types import ModuleType
from typing import Optional

import cffi

HERE = Path(__file__).resolve().parent
MODULE = "_pbkafka"
SOURCES = ("pbkafka.c", "pbkafka.h", "rdkafka.cdef", "pbkafka_build.py")
_lock = threading.Lock()
_loaded: Optional[ModuleType] = None


class BuildError(RuntimeError):
    """The example could not be compiled (librdkafka or a compiler missing)."""


def ptrbridge_include_dir() -> Path:
    """The directory holding ``ptrbridge.h``.

    ``ptrbridge.get_include()`` when the installed ptrbridge provides it,
    else the ``csrc/`` of the source checkout this example lives in.
    """
    import ptrbridge

    get_include = getattr(ptrbridge, "get_include", None)
    if get_include is not None:
        return Path(get_include())
    csrc = HERE.parent.parent / "csrc"
    if (csrc / "ptrbridge.h").is_file():
        return csrc
    raise BuildError("pbkafka: cannot find ptrbridge.h (no ptrbridge.get_include(), no ../../csrc)")


def rdkafka_header() -> Optional[Path]:
    """``rdkafka.h`` if librdkafka's development files are installed."""
    for base in ("/usr/include", "/usr/local/include"):
        header = Path(base) / "librdkafka" / "rdkafka.h"
        if header.is_file():
            return header
    return None


def _cdef_block(header: Path) -> str:
    match = re.search(r"/\* PBK_CDEF_BEGIN \*/(.*?)/\* PBK_CDEF_END \*/", header.read_text(), re.S)
    if match is None:
        raise BuildError(f"pbkafka: no PBK_CDEF_BEGIN/END block in {header}")
    return match.group(1)


def make_ffi() -> cffi.FFI:
    """The FFI builder: declarations from rdkafka.cdef and pbkafka.h."""
    ffibuilder = cffi.FFI()
    ffibuilder.cdef((HERE / "rdkafka.cdef").read_text())
    ffibuilder.cdef(_cdef_block(HERE / "pbkafka.h"))
    ffibuilder.set_source(
        MODULE,
        '#include "pbkafka.h"\n#include <librdkafka/rdkafka_mock.h>\n',
        sources=[str(HERE / "pbkafka.c")],
        include_dirs=[str(HERE), str(ptrbridge_include_dir())],
        libraries=["rdkafka", "pthread"],
        extra_compile_args=["-std=c11", "-O2", "-Wall", "-Wextra", "-D_GNU_SOURCE"],
    )
    return ffibuilder


def cache_key() -> str:
    """A hash of everything the compiled module depends on."""
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update((HERE / name).read_bytes())
    digest.update((ptrbridge_include_dir() / "ptrbridge.h").read_bytes())
    header = rdkafka_header()
    if header is not None:
        digest.update(header.read_bytes())
    digest.update(f"{sys.version} {cffi.__version__}".encode())
    return digest.hexdigest()[:16]


def default_cache_dir() -> Path:
    env = os.environ.get("PBKAFKA_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ptrbridge" / "kafka"


def _suffix() -> str:
    return importlib.machinery.EXTENSION_SUFFIXES[0]


def build(cache_dir: Optional[Path] = None) -> Path:
    """Compile the module into ``cache_dir/<key>/`` unless it is there; return its path.

    Builds in a temporary directory and renames, so concurrent builds are safe.
    """
    if rdkafka_header() is None:
        raise BuildError("pbkafka: librdkafka is not installed (apt-get install librdkafka-dev)")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target_dir = root / cache_key()
    target = target_dir / (MODULE + _suffix())
    if target.is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="build-", dir=root))
    try:
        try:
            built = Path(make_ffi().compile(tmpdir=str(tmp), verbose=False))
        except Exception as exc:  # distutils/setuptools raise several types
            raise BuildError(f"pbkafka: compiling {MODULE} failed: {exc}") from exc
        target_dir.mkdir(parents=True, exist_ok=True)
        staged = target_dir / f".{built.name}.{os.getpid()}"
        shutil.copy2(built, staged)
        os.replace(staged, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load(cache_dir: Optional[Path] = None) -> ModuleType:
    """Build if needed and import ``_pbkafka``; the module has ``ffi`` and ``lib``.

    ptrbridge is imported first: its ``pb_*`` symbols must be global before
    the module (which calls ``pb_free`` and ``pb_handle_release`` by name)
    is loaded.
    """
    global _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        import ptrbridge  # noqa: F401  (makes the pb_* symbols global)

        path = build(cache_dir)
        spec = importlib.util.spec_from_file_location(MODULE, path)
        if spec is None or spec.loader is None:
            raise BuildError(f"pbkafka: cannot load {path}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _loaded = module
        return module


if __name__ == "__main__":
    print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
