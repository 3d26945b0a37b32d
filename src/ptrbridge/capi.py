"""Access to the public C API (``csrc/ptrbridge.h``) for C code loaded by Python."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ._bindings import NATIVE_PATH, lib

__all__ = ["c_api", "get_include", "native_library_path"]

_INCLUDE_DIR = Path(__file__).resolve().parent / "include"


def get_include() -> str:
    """Directory holding the installed ``ptrbridge.h``, for a C extension's include path.

    Like ``numpy.get_include()``::

        Extension("_myext", ["myext.c"], include_dirs=[ptrbridge.get_include()])

    or ``gcc -I"$(python -c 'import ptrbridge; print(ptrbridge.get_include())')"``.
    The extension needs no link flags: the ``pb_*`` symbols resolve when it is
    imported after ``import ptrbridge`` (or call through :func:`c_api`).
    """
    if not (_INCLUDE_DIR / "ptrbridge.h").is_file():
        raise FileNotFoundError(
            f"ptrbridge.get_include(): {_INCLUDE_DIR / 'ptrbridge.h'} is missing: this ptrbridge "
            "was not installed by its build (pip install . or pip install -e . copy it there)")
    return str(_INCLUDE_DIR)


def c_api() -> Any:
    """Return a cffi ``const struct pb_api *``: the table of ``pb_*`` function pointers.

    Hand it to a C library that prefers not to rely on global symbols::

        lib.mylib_init(ptrbridge.c_api())      /* C: api->free(ptr); */

    The table is static: valid for the life of the process.
    """
    return lib.pb_get_api()


def native_library_path() -> str:
    """Path of the compiled module that defines the ``pb_*`` symbols.

    Link a C library against it, or rely on the symbols being global once
    ``import ptrbridge`` has run.
    """
    return NATIVE_PATH
