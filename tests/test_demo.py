"""``python -m ptrbridge demo`` runs every section for real and shows what each finds."""
from __future__ import annotations

import os
import subprocess
import sys


def test_demo_runs_and_reports_each_bug() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PTRBRIDGE_")}
    proc = subprocess.run([sys.executable, "-m", "ptrbridge", "demo"], capture_output=True, text=True,
                          timeout=600, env=env)
    out = proc.stdout
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # The sanitizer opens the tour: the unchanged buggy programs and what ptrbridge said.
    first = out.index("== ")
    assert out[first:].startswith("== The sanitizer")
    assert "ERROR: ptrbridge: argument 2 has pointer to freed Python memory: [0].iov_base" in out
    assert "caught by quarantine): bytearray(4096) lent to setvbuf() at" in out
    assert "gather_fixed.py, the correct twin" in out and "hello world" in out
    # Every rule broken is reported, and its fix runs.
    for text in ("NestedPointerError", "UseAfterFreeError", "UseAfterTransferError", "DoubleFreeError",
                 "InvalidHandleError", "HandleLimitError", "PinLeakWarning", "CallbackResultError",
                 "RetainedPointerError", "R3 watchdog", "it read tm_zone"):
        assert text in out, text
