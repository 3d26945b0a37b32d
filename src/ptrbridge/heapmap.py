"""The Python heap map (check level 2): every live Python block, known to C.

Go's runtime knows its whole heap.  At check level 2 ptrbridge does too: it
hooks CPython's raw, mem and object allocator domains (``PyMem_SetAllocator``,
the mechanism tracemalloc uses) and numpy's default data-memory handler
(NEP 49), and indexes every block allocated while the hooks record.  The
checker then recognises any address inside a live Python block as
Python-owned - a struct field or iovec set from a raw ``ffi.new``,
``ffi.from_buffer`` or ctypes address that ptrbridge never saw - and keeps a
bounded history of freed blocks for use-after-free reports and the retention
scanner::

    >>> ptrbridge.set_check_level(2)          # installs the hooks
    >>> buf = bytearray(4096)
    >>> heapmap.lookup(address_of_buf + 100)  # any byte of it, not only the first
    (address_of_buf, 4096)

Contract:

* Only blocks allocated while the hooks record are known: an object made
  before level 2 was switched on is not in the map (the other level-1 means
  still recognise it).
* The hooks delegate to the allocators that were installed before them, so a
  block is always freed by the allocator that allocated it, whichever side of
  an install or uninstall it is freed on; switching levels at run time is safe,
  from any thread.
* If another allocator hook (tracemalloc) is installed on top of ptrbridge's,
  :func:`uninstall` stops recording at once but leaves ptrbridge's hook in the
  chain, passing every call through, so that the other hook keeps working; it
  is reused by the next :func:`install`.  If the heap map was cut out of the
  chain (``tracemalloc.stop()`` after tracemalloc was started before
  ptrbridge), a lookup notices, clears the map and hooks in again.
* numpy array data is allocated with ``malloc`` by numpy's default handler,
  not through CPython's allocators.  The heap map wraps that handler (keeping
  its name) as soon as numpy's core is imported, for arrays made in every
  thread; arrays made with a user-installed NEP 49 handler are not seen.
* Blocks of subinterpreters that have their own GIL (Python 3.12+) are not
  recorded.

Cost: on an allocation-heavy pure-Python loop about 1.2x without holding freed
blocks back and 1.3x with the default hold (:func:`set_hold`), against about
10x for tracemalloc (``bench/bench_heapmap.py``).  Small blocks of the mem and
object domains - nearly all of them - are recorded without a lock: those
domains are only called with the GIL held.
"""
from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from typing import Any, List, NamedTuple, Optional, Sequence, Tuple

from . import levels
from ._bindings import check, ffi, lib

__all__ = [
    "HeapBlock",
    "HeapMapStats",
    "DOMAINS",
    "DEFAULT_HOLD_BLOCKS",
    "DEFAULT_HOLD_BYTES",
    "install",
    "uninstall",
    "installed",
    "lookup",
    "lookup_block",
    "find_freed",
    "find_freed_block",
    "take_freed",
    "take_freed_blocks",
    "find_freed_record",
    "FreedBlock",
    "set_hold",
    "set_poison",
    "stats",
    "numpy_hooked",
    "verify",
]

DOMAINS: Sequence[str] = ("raw", "mem", "object", "numpy", "cffi")
"""Names of the allocator domains, indexed by the C ``enum pb_heapmap_domain``.

Which domain a given object's memory comes from is a CPython implementation
detail that changes between versions (a ``bytes`` is ``object`` memory up to
3.12 and ``mem`` memory on 3.13): rely on the block, not on the domain.
``"cffi"`` blocks are entered from C by ``pb_heapmap_record_block`` (memory
``_cffi_backend`` allocates for ``ffi.new``, seen by the interposer).
"""

DEFAULT_HOLD_BLOCKS: int = lib.PB_HEAPMAP_HOLD_BLOCKS
"""Freed blocks held back from their allocator, per domain, by default (see :func:`set_hold`)."""
DEFAULT_HOLD_BYTES: int = lib.PB_HEAPMAP_HOLD_BYTES
"""Bytes of freed blocks held back, per domain, by default."""

_TAKE = 4096  # freed blocks copied out per C call
_lock = threading.RLock()  # install/uninstall and the numpy watcher


class HeapBlock(NamedTuple):
    """A block of the Python heap: ``[start, start + size)`` from allocator ``domain``."""

    start: int
    size: int
    domain: str  # one of DOMAINS


class FreedBlock(NamedTuple):
    """A freed block of the Python heap, with the order of its free.

    ``serial`` is unique among the frees remembered while the map is
    installed and orders the frees of one path exactly (``serial & 1`` is the
    path: 0 for small mem/object blocks freed with the GIL, 1 for every other
    block); between the two paths the order is approximate.  The scanning
    side keys what it knows about a block (the call that lent it) by
    ``(start, serial)`` to tell two lives of one address apart.
    """

    start: int
    size: int
    domain: str  # one of DOMAINS
    serial: int


@dataclass(frozen=True)
class HeapMapStats:
    """A snapshot of the heap map's counters (all ints or bools)."""

    installed: bool
    """True while the hooks record."""
    hooked_domains: Tuple[str, ...]
    """PyMem domains whose hook is in the allocator chain (recording or passing through)."""
    numpy: bool
    """True while numpy's default data-memory handler is wrapped."""
    live_blocks: int
    """Blocks in the map."""
    live_bytes: int
    """Bytes in those blocks."""
    allocations: int
    """Blocks entered since the hooks were first installed (a realloc counts as a free and an allocation)."""
    frees: int
    """Blocks removed (freed or moved by realloc)."""
    lookups: int
    """Lookups of live and freed blocks, from Python and C."""
    untracked: int
    """Blocks that could not be indexed for lack of memory (they are simply unknown)."""
    freed_history: int
    """Freed blocks remembered for :func:`find_freed` (at most 2 x 262144: one ring per path)."""
    freed_pending: int
    """Freed blocks not yet taken by :func:`take_freed` or the retention scanner."""
    freed_dropped: int
    """Freed blocks forgotten before they were taken (the history is bounded)."""
    held_blocks: int
    """Freed blocks held back from their allocator (see :func:`set_hold`)."""
    held_bytes: int
    """Bytes in those blocks."""
    index_bytes: int
    """Memory of the map's tables, rings and page bitmap."""
    shadow_leaves: int
    """GiB regions of address space with a shadow map (1/8 of the memory Python uses in them)."""


def _attach_numpy_if_loaded() -> None:
    """Wrap numpy's handler if numpy's core is imported and the map records."""
    with _lock:
        if _watcher in sys.meta_path and lib.pb__heapmap_numpy_attach() != 0:
            # Hooked, or a numpy without NEP 49 handlers: nothing more to watch.  The list
            # is replaced, not mutated, because the import system may be iterating over it.
            sys.meta_path = [finder for finder in sys.meta_path if finder is not _watcher]


class _NumpyWatcher:
    """A meta-path finder that finds nothing: it notices numpy's core being imported.

    numpy imports many submodules after ``_multiarray_umath``, so the first of
    those imports wraps numpy's data-memory handler while numpy is still
    being imported.
    """

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        if "numpy._core._multiarray_umath" in sys.modules or "numpy.core._multiarray_umath" in sys.modules:
            _attach_numpy_if_loaded()
        return None


_watcher = _NumpyWatcher()


def install() -> bool:
    """Install the hooks and start recording; False if they already record.

    Wraps numpy's data-memory handler now if numpy is imported, or when it
    is.  Takes effect process-wide.  Level 2 calls this (see
    :func:`ptrbridge.set_check_level`); call it directly to use the map at
    another level.
    """
    with _lock:
        rc = lib.pb__heapmap_install()
        if rc < 0:
            check(rc, "heapmap.install()")
        if rc == 0 and not lib.pb__heapmap_numpy_attach():
            if _watcher not in sys.meta_path:
                sys.meta_path = [_watcher, *sys.meta_path]
        return bool(rc == 0)


def uninstall() -> bool:
    """Stop recording, forget every block and remove the hooks; False if they did not record.

    Freed blocks held back (see :func:`set_hold`) are given back to their
    allocator.  If another allocator hook was installed on top of
    ptrbridge's (tracemalloc), ptrbridge's stays in the chain, passing every
    call through, until a later :func:`install` reuses it: removing it would
    cut the other hook out.
    """
    with _lock:
        if _watcher in sys.meta_path:
            sys.meta_path = [finder for finder in sys.meta_path if finder is not _watcher]
        return bool(lib.pb__heapmap_uninstall() != 1)


def installed() -> bool:
    """True while the hooks record."""
    return bool(lib.pb__heapmap_installed())


def verify() -> bool:
    """Check that the hooks are still in the allocator chain; True if the map had to be repaired.

    ``tracemalloc.stop()``, when tracemalloc was started before the heap map,
    restores the allocators tracemalloc saved and so cuts the heap map out:
    frees go unseen and the map would go stale.  A repair clears the map and
    hooks in again.  :func:`lookup` does this by itself when a block it finds
    might be stale.
    """
    return bool(lib.pb__heapmap_verify() == 1)


def _bad_address(where: str, address: object) -> Exception:
    if isinstance(address, int):
        return ValueError(f"ptrbridge: heapmap.{where}({address}): an address is an int in 0..2**"
                          f"{8 * ffi.sizeof('uintptr_t')}-1")
    return TypeError(f"ptrbridge: heapmap.{where}(): expected an int address, not {type(address).__name__}")


def lookup_block(address: int) -> Optional[HeapBlock]:
    """The live Python block containing ``address`` (any byte of it), or None.

    None for C memory, for Python blocks allocated before the hooks were
    installed, and when the map is not installed.  Thread-safe, no lock
    for small blocks.  Raises TypeError for a non-int and ValueError for an
    int that is not an address.
    """
    try:
        block = lib.pb__heapmap_lookup(address)
    except (TypeError, OverflowError):
        raise _bad_address("lookup", address) from None
    if block.status == 2:  # the allocator chain changed since it was last checked
        lib.pb__heapmap_verify()
        block = lib.pb__heapmap_lookup(address)
    if block.status == 0:
        return None
    return HeapBlock(int(block.start), int(block.size), DOMAINS[block.domain])


def lookup(address: int) -> Optional[Tuple[int, int]]:
    """``(start, size)`` of the live Python block containing ``address``, or None (see :func:`lookup_block`)."""
    block = lookup_block(address)
    return None if block is None else (block.start, block.size)


def find_freed_block(address: int) -> Optional[HeapBlock]:
    """The most recently freed Python block that contained ``address``, or None.

    Only the last 262144 frees of each path are remembered, and None is
    returned while ``address`` is inside a live block (its memory was reused).
    For use-after-free reports: a pointer C still holds into such a block
    points at freed memory.  Mind the domain: memory of the ``"mem"`` and
    ``"object"`` domains (pymalloc) is reused only by Python, but a freed
    ``"raw"``, ``"numpy"`` or large block is libc heap that C's own malloc may
    hand out again once it is no longer held back (:func:`set_hold`).
    Raises like :func:`lookup_block`.
    """
    try:
        block = lib.pb__heapmap_find_freed(address)
    except (TypeError, OverflowError):
        raise _bad_address("find_freed", address) from None
    if not block.status:
        return None
    return HeapBlock(int(block.start), int(block.size), DOMAINS[block.domain])


def find_freed(address: int) -> Optional[Tuple[int, int]]:
    """``(start, size)`` of the most recently freed Python block that contained ``address``, or None.

    See :func:`find_freed_block`.
    """
    block = find_freed_block(address)
    return None if block is None else (block.start, block.size)


def take_freed() -> List[Tuple[int, int]]:
    """``(start, size)`` of the blocks freed since the last call, each block once.

    At most the history's capacity (2 x 262144) per call; blocks freed while
    this runs may be left for the next call.  The retention scanner takes
    freed blocks the same way, and only one of the two sees a given block.
    """
    starts = ffi.new("uintptr_t[]", _TAKE)
    sizes = ffi.new("size_t[]", _TAKE)
    found: List[Tuple[int, int]] = []
    # At most what the two rings hold: other threads may free faster than this takes.
    for _ in range(2 * lib.PB_HEAPMAP_FREED_HISTORY // _TAKE):
        n = lib.pb__heapmap_take_freed(starts, sizes, _TAKE, ffi.NULL)
        found.extend((int(starts[i]), int(sizes[i])) for i in range(n))
        if n < _TAKE:
            break
    return found


def take_freed_blocks() -> List[FreedBlock]:
    """Like :func:`take_freed`, with each block's domain and serial (see :class:`FreedBlock`)."""
    out = ffi.new("struct pb_heapmap_block[]", _TAKE)
    found: List[FreedBlock] = []
    for _ in range(2 * lib.PB_HEAPMAP_FREED_HISTORY // _TAKE):
        n = lib.pb__heapmap_take_freed_blocks(out, _TAKE, ffi.NULL)
        found.extend(FreedBlock(int(b.start), int(b.size), DOMAINS[b.domain], int(b.serial))
                     for b in (out[i] for i in range(n)))
        if n < _TAKE:
            break
    return found


def find_freed_record(address: int) -> Optional[FreedBlock]:
    """The most recently freed block that contained ``address``, with its serial, or None.

    See :func:`find_freed_block` and :class:`FreedBlock`.
    """
    try:
        block = lib.pb__heapmap_find_freed(address)
    except (TypeError, OverflowError):
        raise _bad_address("find_freed", address) from None
    if not block.status:
        return None
    return FreedBlock(int(block.start), int(block.size), DOMAINS[block.domain], int(block.serial))


def set_poison(on: bool) -> bool:
    """Whether freed blocks held back are poisoned; returns the previous setting.

    On by default: a held block is filled with ``0xDD`` (as with
    ``PYTHONMALLOC=debug``) and the whole pages inside a block of a page or
    more are made inaccessible until it is given back, so a program that
    reads freed memory misbehaves at least as visibly as without ptrbridge
    instead of reading the old bytes.  Applies to blocks held from now on.
    Turning it off is for measuring its cost only.
    """
    return bool(lib.pb__heapmap_set_poison(1 if on else 0))


def set_hold(max_blocks: int = DEFAULT_HOLD_BLOCKS, max_bytes: int = DEFAULT_HOLD_BYTES) -> None:
    """Hold up to ``max_blocks`` freed blocks (and ``max_bytes`` bytes) per domain back from their allocator.

    A held block is not reused until it is pushed out by later frees of its
    domain (oldest first), so the retention scanner can still find pointers
    that C kept into it - the quarantine of memory sanitizers.  Held blocks
    are poisoned (see :func:`set_poison`), so holding them never hides a use
    after free.  Lowering the limits gives back what is held beyond them at
    once; ``set_hold(0, 0)`` gives back everything.  A ``realloc`` that would
    move a block of up to 4 KiB is done as allocate + copy + free, so that
    the old block is held too.  It costs time
    on allocation-heavy code (pymalloc cannot reuse the blocks it just freed)
    and up to ``max_bytes`` per domain; briefly up to twice that, because a
    block larger than what a few evictions give back (a large buffer freed
    after many small ones) is held all the same and the frees after it bring
    the total back within the limit.  ``set_hold(0, 0)`` turns it off;
    ``max_blocks`` is at most ``lib.PB_HEAPMAP_HOLD_MAX``.  Raises
    ValueError for a negative or too large value.
    """
    if max_blocks < 0 or max_bytes < 0 or max_blocks > lib.PB_HEAPMAP_HOLD_MAX:
        raise ValueError(
            f"ptrbridge: heapmap.set_hold({max_blocks!r}, {max_bytes!r}): max_blocks must be 0.."
            f"{lib.PB_HEAPMAP_HOLD_MAX} and max_bytes at least 0"
        )
    check(lib.pb__heapmap_set_hold(max_blocks, max_bytes), "heapmap.set_hold()")


def numpy_hooked() -> bool:
    """True while numpy's default data-memory handler is wrapped by the heap map."""
    return stats().numpy


def stats() -> HeapMapStats:
    """A consistent snapshot of the heap map's counters."""
    out = ffi.new("struct pb_heapmap_stats *")
    lib.pb__heapmap_get_stats(out)
    return HeapMapStats(
        installed=bool(out.installed),
        hooked_domains=tuple(name for i, name in enumerate(DOMAINS[:3]) if out.hooked & (1 << i)),
        numpy=bool(out.numpy),
        live_blocks=int(out.live_blocks),
        live_bytes=int(out.live_bytes),
        allocations=int(out.allocations),
        frees=int(out.frees),
        lookups=int(out.lookups),
        untracked=int(out.untracked),
        freed_history=int(out.freed_history),
        freed_pending=int(out.freed_pending),
        freed_dropped=int(out.freed_dropped),
        held_blocks=int(out.held_blocks),
        held_bytes=int(out.held_bytes),
        index_bytes=int(out.index_bytes),
        shadow_leaves=int(out.shadow_leaves),
    )


def _on_level_change(old: int, new: int) -> None:
    """Level 2 records; leaving level 2 stops recording."""
    if new == 2:
        install()
    elif old == 2:
        uninstall()


levels.add_level_listener(_on_level_change)
