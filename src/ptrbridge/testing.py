"""Helpers for testing C code under ptrbridge: leak accounting and growth checks.

:func:`leaks` compares two :class:`~ptrbridge.Stats` snapshots and says, in
words, what was not given back; :func:`assert_no_growth` calls a function many
times and fails if resident memory or tracked C memory keeps growing - the
loop-of-a-million-calls check that catches most C leaks.
"""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, List, Optional

from .errors import PointerError
from .handles import collect_handles
from .stats import Stats, stats

__all__ = [
    "GrowthError",
    "Growth",
    "LEAK_KINDS",
    "leaks",
    "settle",
    "rss_bytes",
    "assert_no_growth",
]

LEAK_KINDS = ("c_memory", "handles", "pins", "transferred")


class GrowthError(PointerError, AssertionError):
    """Memory kept growing across repeated calls (:func:`assert_no_growth`)."""


def settle() -> None:
    """Collect garbage and drop released handles, so counters show only what is really held."""
    gc.collect()
    collect_handles()
    gc.collect()


def leaks(before: Stats, after: Stats, allow: Iterable[str] = ()) -> List[str]:
    """What grew between two snapshots, one readable line per kind not in ``allow``.

    Kinds: ``"c_memory"`` (tracked allocator blocks/bytes), ``"handles"``,
    ``"pins"`` and ``"transferred"`` (CBuffers handed to C and never freed).
    """
    allowed = set(allow)
    unknown = allowed - set(LEAK_KINDS)
    if unknown:
        raise ValueError(f"ptrbridge: unknown leak kind(s) {sorted(unknown)}; known: {', '.join(LEAK_KINDS)}")
    found = []
    blocks = after.live_blocks - before.live_blocks
    if "c_memory" not in allowed and blocks > 0:
        found.append(
            f"leaked {blocks} tracked C block(s) ({after.live_bytes - before.live_bytes} bytes): "
            f"memory from pb_malloc/CBuffer/cnew or a library routed through c_allocator() "
            f"was never freed"
        )
    handles = after.live_handles - before.live_handles
    if "handles" not in allowed and handles > 0:
        found.append(
            f"leaked {handles} handle(s): Handle objects neither deleted (Handle.delete) "
            f"nor released by C (pb_handle_release)"
        )
    pins = after.live_pins - before.live_pins
    if "pins" not in allowed and pins > 0:
        found.append(f"leaked {pins} pin(s): a Pinner still holds them (call unpin() or use 'with')")
    transferred = after.transferred - before.transferred
    if "transferred" not in allowed and transferred > 0:
        found.append(
            f"{transferred} buffer(s) transferred to C were never freed by C "
            f"(CBuffer.transfer() without a matching pb_free)"
        )
    return found


def rss_bytes() -> int:
    """The process's resident set size in bytes (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


@dataclass(frozen=True)
class Growth:
    """What :func:`assert_no_growth` measured."""

    calls: int
    rss_bytes: int
    tracked_bytes: int
    tracked_blocks: int

    @property
    def rss_per_call(self) -> float:
        return self.rss_bytes / self.calls

    @property
    def tracked_per_call(self) -> float:
        return self.tracked_bytes / self.calls


def assert_no_growth(fn: Callable[[], Any], n: int = 100_000, max_bytes: int = 1 << 20,
                     warmup: Optional[int] = None) -> Growth:
    """Call ``fn()`` ``n`` times and fail if memory grows by more than ``max_bytes``.

    Both resident memory (RSS) and the tracked C allocator's live bytes are
    measured, after ``warmup`` calls (default ``n // 10``, at least 1) that let
    caches and pools fill.  Tracked C memory must not grow by more than
    ``max_bytes`` either.  Raises :class:`GrowthError` (an ``AssertionError``)
    naming the growth per call; returns the measurement otherwise.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"ptrbridge.testing.assert_no_growth: n must be a positive int, not {n!r}")
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
        raise ValueError(
            f"ptrbridge.testing.assert_no_growth: max_bytes must be a non-negative int, not {max_bytes!r}"
        )
    for _ in range(warmup if warmup is not None else max(1, n // 10)):
        fn()
    settle()
    rss_before, c_before = rss_bytes(), stats()
    for _ in range(n):
        fn()
    settle()
    rss_after, c_after = rss_bytes(), stats()
    growth = Growth(
        calls=n,
        rss_bytes=rss_after - rss_before,
        tracked_bytes=c_after.live_bytes - c_before.live_bytes,
        tracked_blocks=c_after.live_blocks - c_before.live_blocks,
    )
    name = getattr(fn, "__qualname__", repr(fn))
    if growth.tracked_bytes > max_bytes:
        raise GrowthError(
            f"ptrbridge: tracked C memory grew by {growth.tracked_bytes} bytes "
            f"({growth.tracked_blocks} blocks) over {n} calls of {name}: "
            f"{growth.tracked_per_call:.1f} bytes per call (limit {max_bytes} bytes in total)"
        )
    if growth.rss_bytes > max_bytes:
        raise GrowthError(
            f"ptrbridge: resident memory grew by {growth.rss_bytes} bytes over {n} calls of {name}: "
            f"{growth.rss_per_call:.1f} bytes per call (limit {max_bytes} bytes in total); "
            f"tracked C memory grew by {growth.tracked_bytes} bytes, so the rest is untracked "
            f"(malloc in C, or Python objects kept alive)"
        )
    return growth
