"""Counters of the registry: C memory, transfers, handles and pins."""
from __future__ import annotations

from dataclasses import dataclass

from ._bindings import ffi, lib
from .handles import collect_handles

__all__ = ["Stats", "stats"]


@dataclass(frozen=True)
class Stats:
    """A snapshot of the registry's counters (all ints).

    Unlike Go's runtime metrics, these see C memory: every block of the
    tracked allocator is counted, including those handed to C.
    """

    allocations: int
    """Blocks ever allocated by the tracked allocator."""
    frees: int
    """Blocks ever freed."""
    live_blocks: int
    """Blocks allocated and not yet freed."""
    live_bytes: int
    """Bytes in live blocks."""
    peak_bytes: int
    """The highest ``live_bytes`` has been."""
    transferred: int
    """Blocks handed to C with ``CBuffer.transfer()`` and not yet freed."""
    live_handles: int
    """Handles neither deleted nor released."""
    handle_high_water: int
    """The highest ``live_handles`` has been."""
    live_pins: int
    """Objects pinned by live Pinners."""


def stats() -> Stats:
    """Return the current counters (handles released by C are collected first)."""
    collect_handles()
    alloc = ffi.new("struct pb_alloc_stats *")
    lib.pb_alloc_get_stats(alloc)
    live = ffi.new("uint64_t *")
    high = ffi.new("uint64_t *")
    lib.pb__handle_get_counts(live, high)
    return Stats(
        allocations=int(alloc.allocations),
        frees=int(alloc.frees),
        live_blocks=int(alloc.live_blocks),
        live_bytes=int(alloc.live_bytes),
        peak_bytes=int(alloc.peak_bytes),
        transferred=int(alloc.transferred),
        live_handles=int(live[0]),
        handle_high_water=int(high[0]),
        live_pins=int(lib.pb_region_count(lib.PB_REGION_PINNED)),
    )
