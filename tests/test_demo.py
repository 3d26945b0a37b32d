"""``python -m ptrbridge demo`` runs every section for real and shows what each finds."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from sanitizers import is_writev_of_freed_cffi_memory, own_sanitizer_log, sanitizer_active, sanitizer_reports


def test_demo_runs_and_reports_each_bug(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PTRBRIDGE_")}
    proc = subprocess.run([sys.executable, "-m", "ptrbridge", "demo"], capture_output=True, text=True,
                          timeout=600, env=dict(env, **own_sanitizer_log(tmp_path)))
    out = proc.stdout
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Under ASan or TSan (.ci/sanitize) the tour's plain run of gather.py stops at its bug,
    # writev() reading the bases cffi freed: the sanitizer's report of it, the only one expected.
    reports = sanitizer_reports(tmp_path)
    assert len(reports) == (1 if sanitizer_active() else 0), reports
    for report in reports:
        assert is_writev_of_freed_cffi_memory(report), report
        assert re.search(r"gather\.py: writev\(\) of an iovec whose bases were freed before the call\n"
                         r"    plainly: exit status [1-9]", out)
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
