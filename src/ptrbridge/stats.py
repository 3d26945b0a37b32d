"""Counters of the registry: C memory, transfers, handles and pins.

``ptrbridge.stats()`` returns the counters; ``ptrbridge.stats.live_resources()``
lists every live resource with where it was created, for leak reports::

    >>> h = ptrbridge.Handle(object())
    >>> [r for r in ptrbridge.stats.live_resources() if r.kind == "handle"][-1]
    Resource(kind='handle', description='object', created_at='<stdin>:1', address=...)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

from ._bindings import ffi, lib, native
from .handles import collect_handles

__all__ = ["Stats", "Resource", "stats", "live_resources"]


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


@dataclass(frozen=True)
class Resource:
    """One live resource of the registry, as leak reports name it."""

    kind: str
    """``"handle"``, ``"cbuffer"`` (a CBuffer Python owns), ``"pin"`` or ``"transferred"``
    (a block handed to C by ``CBuffer.transfer()`` that C has not freed)."""
    description: str
    """What it is: ``"bytearray(100)"``, ``"CBuffer(64)"``, ``"dict"`` (a handle's object type)."""
    created_at: str
    """``file.py:12`` of the user's code that created it (``<unknown>:0`` if no Python frame)."""
    address: int
    """The memory's address, or the handle's token."""


def live_resources() -> List[Resource]:
    """Every live handle, owning CBuffer, pin and transferred block, with its creation site.

    Cheap to keep (each creation records an interned code-object + offset
    site id) and only formatted here.  Handles released by C are collected
    first.  Used by the test harness to name leaks, e.g.::

        before = {(r.kind, r.address) for r in ptrbridge.stats.live_resources()}
        ...
        leaked = [r for r in ptrbridge.stats.live_resources() if (r.kind, r.address) not in before]
    """
    from .cmem import _describe_cbuffer  # cmem imports this module's siblings; avoid a cycle
    from .ownership import describe

    out: List[Resource] = []
    for token, obj, site in native.handles_live():
        out.append(Resource("handle", type(obj).__name__, native.site_text(site), token))
    for buf in native.buffers_live():
        out.append(Resource("cbuffer", _describe_cbuffer(buf), buf._site, buf._address))
    for pinner in native.pinners_live():
        for obj, start, size, site in pinner._pins():
            out.append(Resource("pin", describe(obj, size), native.site_text(site), start))
    for address, size, site in native.transferred_blocks():
        out.append(Resource("transferred", f"CBuffer({size})", native.site_text(site), address))
    return out


def _stats() -> Stats:
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


class _StatsFunction:
    """``ptrbridge.stats()``: the counters; ``ptrbridge.stats.live_resources()``: what is alive, and where from."""

    def __call__(self) -> Stats:
        """Return the current counters (handles released by C are collected first)."""
        return _stats()

    @staticmethod
    def live_resources() -> List[Resource]:
        """See :func:`ptrbridge.stats.live_resources`."""
        return live_resources()

    def __repr__(self) -> str:
        return "<function ptrbridge.stats>"


stats = _StatsFunction()
stats.__doc__ = _stats.__doc__
