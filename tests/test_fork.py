"""Fork safety: a child forked while a C thread holds a registry lock must not deadlock."""
from __future__ import annotations

import ctypes
import os
import signal
from pathlib import Path

import pytest

import ptrbridge
from cbuild import build_shared
from ptrbridge._bindings import lib

CHILD_TIMEOUT = 10  # seconds before SIGALRM kills a deadlocked child


def _child() -> None:
    """Everything a child does with the registry; exits 0 only if all of it worked."""
    signal.alarm(CHILD_TIMEOUT)  # a deadlocked child dies of SIGALRM instead of hanging the test
    code = 1
    try:
        p = lib.pb_malloc(32)
        assert lib.pb_free(p) == lib.PB_OK
        h = ptrbridge.Handle(object())
        h.delete()
        with ptrbridge.Pinner() as pinner:
            pinner.pin(bytearray(16))
        ptrbridge.CBuffer.copy(b"child").free()
        code = 0
    finally:
        os._exit(code)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_children_forked_while_a_c_thread_uses_the_registry_do_not_deadlock(clib_dir: Path) -> None:
    churn = ctypes.CDLL(str(build_shared("pb_churn.c", clib_dir)))
    churn.churn_loops.restype = ctypes.c_long
    assert churn.churn_start() == 0
    results = []
    try:
        for _ in range(20):
            start = churn.churn_loops()
            while churn.churn_loops() < start + 100:  # the thread is inside the registry right now
                pass
            pid = os.fork()
            if pid == 0:
                _child()
            _, status = os.waitpid(pid, 0)
            results.append(status)
    finally:
        churn.churn_stop()
    failed = [(os.WTERMSIG(s) if os.WIFSIGNALED(s) else os.WEXITSTATUS(s)) for s in results
              if not (os.WIFEXITED(s) and os.WEXITSTATUS(s) == 0)]
    assert not failed, (f"{len(failed)} of 20 children failed (signal {signal.SIGALRM} = deadlocked "
                        f"past {CHILD_TIMEOUT}s): {failed}")
