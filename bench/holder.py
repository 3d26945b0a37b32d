"""tests/clib/holder.c built as a library would ship (-O2) and opened with cffi, for the benchmarks."""
from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path
from typing import Any, Tuple

REPO = Path(__file__).resolve().parent.parent


def load_holder(cdef: str) -> Tuple[Any, Any]:
    """Compile tests/clib/holder.c into a fresh temporary directory and dlopen it: ``(ffi, lib)``."""
    import cffi

    out = Path(tempfile.mkdtemp(prefix="ptrbridge-bench-")) / "libholder.so"
    subprocess.run(["gcc", "-std=c11", "-O2", "-fPIC", "-shared", "-pthread", str(REPO / "tests/clib/holder.c"),
                    "-o", str(out)], check=True)
    hffi = cffi.FFI()
    hffi.cdef(cdef)
    return hffi, hffi.dlopen(str(out))
