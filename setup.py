"""Build hooks that pyproject.toml cannot express.

All metadata lives in pyproject.toml.  Two things need code:

* the cffi module (``cffi_modules``: csrc/*.c compiled into ``ptrbridge._native``);
* the public C header: ``csrc/ptrbridge.h`` is shipped inside the package as
  ``ptrbridge/include/ptrbridge.h`` so that C extensions can build against the
  installed copy (``ptrbridge.get_include()``).  csrc/ stays the one source;
  the copy is made at build time (into the wheel, or into src/ for an editable
  install, where it is git-ignored).
"""
from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
PUBLIC_HEADERS = [HERE / "csrc" / "ptrbridge.h"]


class build_py_with_headers(build_py):  # noqa: N801 - setuptools command naming
    """build_py that also places the public headers in ``ptrbridge/include/``."""

    def run(self) -> None:
        super().run()
        targets = [Path(self.build_lib) / "ptrbridge" / "include"]
        if getattr(self, "editable_mode", False):
            # An editable install imports ptrbridge from src/: put the copy there.
            targets.append(HERE / "src" / "ptrbridge" / "include")
        for target in targets:
            target.mkdir(parents=True, exist_ok=True)
            for header in PUBLIC_HEADERS:
                shutil.copyfile(header, target / header.name)

    def get_outputs(self, include_bytecode: bool = True) -> list:  # type: ignore[type-arg]
        outputs = list(super().get_outputs(include_bytecode))
        include = Path(self.build_lib) / "ptrbridge" / "include"
        return outputs + [str(include / h.name) for h in PUBLIC_HEADERS]


setup(
    cffi_modules=["build_ffi.py:ffibuilder"],
    cmdclass={"build_py": build_py_with_headers},
)
