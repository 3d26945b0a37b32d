"""Access to the public C API (``csrc/ptrbridge.h``) for C code loaded by Python."""
from __future__ import annotations

from typing import Any

from ._bindings import NATIVE_PATH, lib

__all__ = ["c_api", "native_library_path"]


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
