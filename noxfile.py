"""nox sessions for developers: ``nox -s tests`` runs the suite on every supported CPython.

``nox -s tests-3.12 -- tests/test_capi.py`` runs one version (arguments after ``--``
go to pytest); ``nox -s sanitize`` runs ``.ci/sanitize`` (ASan+UBSan), and
``nox -s sanitize -- --tsan`` the TSan build.  nox finds ``python3.X`` on PATH
(with pyenv: ``pyenv global 3.11.7 3.9.18 3.10.13 3.12.1 3.13.0`` makes every
shim work).  An interpreter it cannot find is reported as skipped.

CI does not need nox: ``.ci/run`` runs the same on every interpreter it finds.
"""
from __future__ import annotations

import nox

PYTHONS = ["3.9", "3.10", "3.11", "3.12", "3.13"]

nox.options.sessions = ["tests"]
nox.options.error_on_missing_interpreters = False  # "Skipping ...: Python interpreter 3.X not found."


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """Install ptrbridge with its test extra into a fresh venv and run the suite."""
    session.install(".[test]")
    session.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider", *session.posargs)


@nox.session(python=False)
def sanitize(session: nox.Session) -> None:
    """csrc under ASan+UBSan (or ``-- --tsan``), in a fresh venv made by the script."""
    session.run("bash", ".ci/sanitize", *session.posargs, external=True)
