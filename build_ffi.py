"""cffi build script: compiles csrc/*.c into ``ptrbridge._native`` (API mode).

The cdef is read from the headers, between the ``PB_CDEF_BEGIN`` and
``PB_CDEF_END`` markers, so C declarations live in one place: the public
``csrc/ptrbridge.h`` first, then every other ``csrc/*.h`` that has such a
block (private ``pb_*.h`` headers, one per concept), in name order.

Run through setuptools: ``pip install .`` or ``pip install -e .`` (add ``-v``
to see the compiler's output; the C code is kept free of warnings).

Sanitizer builds: ``PTRBRIDGE_SANITIZE=address,undefined pip install -e .``
compiles and links csrc with ``-fsanitize=address,undefined`` (any list gcc
accepts: ``thread`` for TSan), frame pointers and debug information.  The
interpreter itself is not instrumented, so the sanitizer runtime must be
preloaded when the tests run; ``.ci/sanitize`` shows the exact command.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import List, Tuple

from cffi import FFI

HERE = Path(__file__).resolve().parent
CSRC = HERE / "csrc"
PUBLIC_HEADER = CSRC / "ptrbridge.h"
HEADERS = [PUBLIC_HEADER] + sorted(
    p for p in CSRC.glob("*.h") if p != PUBLIC_HEADER and "PB_CDEF_BEGIN" in p.read_text(encoding="utf-8")
)
SOURCES = sorted(str(p.relative_to(HERE)) for p in CSRC.glob("*.c"))

SANITIZE_ENV = "PTRBRIDGE_SANITIZE"
_SANITIZERS = {"address", "undefined", "thread", "leak"}

_CDEF_BLOCK = re.compile(r"/\* PB_CDEF_BEGIN \*/(.*?)/\* PB_CDEF_END \*/", re.S)


def read_cdef(header: Path) -> str:
    """Return the cffi-readable declarations of one header."""
    text = header.read_text(encoding="utf-8")
    blocks = _CDEF_BLOCK.findall(text)
    if not blocks:
        raise RuntimeError(f"{header}: no PB_CDEF_BEGIN/PB_CDEF_END block")
    # PB_API is a visibility attribute for the compiler; cffi does not need it.
    return "\n".join(re.sub(r"\bPB_API\s+", "", block) for block in blocks)


def sanitizer_flags(value: str) -> Tuple[List[str], List[str]]:
    """Compile and link flags for ``PTRBRIDGE_SANITIZE=<value>`` (e.g. ``address,undefined``).

    An empty value means an ordinary build.  ``thread`` cannot be combined
    with ``address`` or ``leak`` (gcc refuses), which is checked here so the
    error names the variable instead of coming from deep inside the build.
    """
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        return [], []
    unknown = sorted(set(names) - _SANITIZERS)
    if unknown:
        raise SystemExit(f"{SANITIZE_ENV}={value!r}: unknown sanitizer(s) {unknown}; "
                         f"use a comma-separated list of {sorted(_SANITIZERS)}")
    if "thread" in names and ({"address", "leak"} & set(names)):
        raise SystemExit(f"{SANITIZE_ENV}={value!r}: thread cannot be combined with address or leak")
    flag = "-fsanitize=" + ",".join(names)
    compile_flags = [flag, "-fno-omit-frame-pointer", "-g"]
    if "undefined" in names:
        # Report every UB kind, and make it an abort (the test fails) rather than a line on stderr.
        compile_flags.append("-fno-sanitize-recover=undefined")
    return compile_flags, [flag]


SANITIZE_COMPILE, SANITIZE_LINK = sanitizer_flags(os.environ.get(SANITIZE_ENV, ""))

ffibuilder = FFI()
ffibuilder.cdef("\n".join(read_cdef(header) for header in HEADERS))
ffibuilder.set_source(
    "ptrbridge._native",
    "".join(f'#include "{header.name}"\n' for header in HEADERS),
    sources=SOURCES,
    include_dirs=[str(CSRC)],
    # -O1 under a sanitizer keeps reports readable; ordinary builds are -O2.
    extra_compile_args=["-std=c11", "-Wall", "-Wextra", "-O1" if SANITIZE_COMPILE else "-O2", *SANITIZE_COMPILE],
    extra_link_args=SANITIZE_LINK,
    libraries=["pthread", "dl"],
    # pybuffer.c uses the full CPython API, so the module is not abi3.
    py_limited_api=False,
)
