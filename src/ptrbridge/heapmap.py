"""The Python heap map (check level 2): every live Python block, known to C.

At level 2 ptrbridge installs allocator hooks on CPython's raw, mem and object
domains (``PyMem_SetAllocator``, the mechanism tracemalloc uses) that record
every block allocated while they are on.  The checker then recognises any
address inside a live Python block as Python-owned - a struct field or iovec
set from a raw ``ffi.from_buffer`` or ctypes address of a bytes, bytearray
or ctypes object that ptrbridge never saw - and the retention scanner can
look for pointers into Python blocks freed since the last look.  Freed
blocks are held in a bounded quarantine first, so their memory is not
reused before that look.

Blocks allocated before the hooks were installed are not in the map.  The
hooks delegate to the allocators that were there before, so switching the
level at run time is safe.  Not covered, because it does not go through
CPython's allocators: memory cffi's ``ffi.new`` allocates (cffi uses malloc
directly; ``ptrbridge.new``, pins and local-variable discovery cover it) and
numpy array data (numpy's own ``PyDataMem`` handler; no NEP 49 handler is
installed yet).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

from . import levels
from ._bindings import ffi, lib
from .errors import PointerError

__all__ = ["install", "uninstall", "installed", "lookup", "take_freed", "stats"]

_TAKE = 4096


def install() -> bool:
    """Install the hooks; False if they already are."""
    return lib.pb__heapmap_install() == 0


def uninstall() -> bool:
    """Remove the hooks; False if they were not installed.

    Raises :class:`~ptrbridge.PointerError` if another allocator hook was
    installed on top of ptrbridge's (remove that one first, e.g. stop
    tracemalloc), since removing ours would cut it out of the chain.
    """
    rc = lib.pb__heapmap_uninstall()
    if rc == -2:
        raise PointerError(
            "ptrbridge: cannot remove the heap map hooks: another allocator hook "
            "(tracemalloc?) was installed after them; remove it first"
        )
    return rc == 0


def installed() -> bool:
    """True while the hooks are installed."""
    out = ffi.new("struct pb_heapmap_stats *")
    lib.pb__heapmap_get_stats(out)
    return bool(out.installed)


def lookup(address: int) -> Optional[Tuple[int, int]]:
    """``(start, size)`` of the live Python block containing ``address``, or None."""
    start = ffi.new("uintptr_t *")
    size = ffi.new("size_t *")
    if lib.pb__heapmap_find(address, start, size):
        return int(start[0]), int(size[0])
    return None


def take_freed() -> List[Tuple[int, int]]:
    """``(start, size)`` of every block freed since the last call (oldest first, bounded)."""
    starts = ffi.new("uintptr_t[]", _TAKE)
    sizes = ffi.new("size_t[]", _TAKE)
    found: List[Tuple[int, int]] = []
    while True:
        n = lib.pb__heapmap_take_freed(starts, sizes, _TAKE, ffi.NULL)
        found.extend((int(starts[i]), int(sizes[i])) for i in range(n))
        if n < _TAKE:
            return found


def stats() -> dict:
    """The heap map's counters."""
    out = ffi.new("struct pb_heapmap_stats *")
    lib.pb__heapmap_get_stats(out)
    return {name: int(getattr(out, name)) for name in
            ("live_blocks", "live_bytes", "allocations", "frees", "freed_pending", "installed")}


def _on_level_change(old: int, new: int) -> None:
    if new == 2 and old != 2:
        install()
    elif old == 2 and new != 2:
        try:
            uninstall()
        except PointerError:
            pass  # someone hooked on top: leave ours in place rather than break their chain


levels.add_level_listener(_on_level_change)
