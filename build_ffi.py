"""cffi build script: compiles csrc/*.c into ``ptrbridge._native`` (API mode).

The cdef is read from the headers, between the ``PB_CDEF_BEGIN`` and
``PB_CDEF_END`` markers, so C declarations live in one place: the public
``csrc/ptrbridge.h`` first, then every other ``csrc/*.h`` that has such a
block (private ``pb_*.h`` headers, one per concept), in name order.

Run through setuptools: ``pip install .`` or ``pip install -e .`` (add ``-v``
to see the compiler's output; the C code is kept free of warnings).
"""
from __future__ import annotations

import re
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
CSRC = HERE / "csrc"
PUBLIC_HEADER = CSRC / "ptrbridge.h"
HEADERS = [PUBLIC_HEADER] + sorted(
    p for p in CSRC.glob("*.h") if p != PUBLIC_HEADER and "PB_CDEF_BEGIN" in p.read_text(encoding="utf-8")
)
SOURCES = sorted(str(p.relative_to(HERE)) for p in CSRC.glob("*.c"))

_CDEF_BLOCK = re.compile(r"/\* PB_CDEF_BEGIN \*/(.*?)/\* PB_CDEF_END \*/", re.S)


def read_cdef(header: Path) -> str:
    """Return the cffi-readable declarations of one header."""
    text = header.read_text(encoding="utf-8")
    blocks = _CDEF_BLOCK.findall(text)
    if not blocks:
        raise RuntimeError(f"{header}: no PB_CDEF_BEGIN/PB_CDEF_END block")
    # PB_API is a visibility attribute for the compiler; cffi does not need it.
    return "\n".join(re.sub(r"\bPB_API\s+", "", block) for block in blocks)


ffibuilder = FFI()
ffibuilder.cdef("\n".join(read_cdef(header) for header in HEADERS))
ffibuilder.set_source(
    "ptrbridge._native",
    "".join(f'#include "{header.name}"\n' for header in HEADERS),
    sources=SOURCES,
    include_dirs=[str(CSRC)],
    extra_compile_args=["-std=c11", "-Wall", "-Wextra", "-O2"],
    libraries=["pthread", "dl"],
    # pybuffer.c uses the full CPython API, so the module is not abi3.
    py_limited_api=False,
)
