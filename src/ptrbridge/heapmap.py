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
level at run time is safe.  numpy array data does not go through CPython's
allocators; when numpy is imported (before level 2 starts, or at any time
after: the map checks when it is used) a NEP 49 data-memory handler that
wraps numpy's current one indexes it too.  numpy keeps its handler in a
context variable, so this covers arrays made in the thread (context) that
turned level 2 on.  Not covered: memory cffi's ``ffi.new`` allocates (cffi
uses malloc directly; ``ptrbridge.new``, pins and local-variable discovery
cover it).
"""
from __future__ import annotations

import ctypes
import sys
from typing import List, Optional, Tuple

from . import levels
from ._bindings import ffi, lib
from .errors import PointerError

__all__ = ["install", "uninstall", "installed", "lookup", "take_freed", "stats", "numpy_hooked"]

_TAKE = 4096


_numpy_hooked = False
_PYDATAMEM_SET_HANDLER, _PYDATAMEM_GET_HANDLER = 304, 305  # numpy C-API table slots (>= 1.22)


def _numpy_handler_functions() -> Optional[Tuple[int, int]]:
    """Addresses of PyDataMem_SetHandler/GetHandler from numpy's C-API table, if numpy is loaded."""
    numpy = sys.modules.get("numpy")
    if numpy is None:
        return None
    version = tuple(int(part) for part in numpy.__version__.split(".")[:2] if part.isdigit())
    if version < (1, 22):
        return None  # no NEP 49 before numpy 1.22
    try:
        from numpy._core import _multiarray_umath as umath  # type: ignore[attr-defined]  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import _multiarray_umath as umath  # type: ignore[no-redef]
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype = ctypes.c_void_p
    get_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    table = (ctypes.c_void_p * (_PYDATAMEM_GET_HANDLER + 1)).from_address(get_pointer(umath._ARRAY_API, None))
    set_handler, get_handler = table[_PYDATAMEM_SET_HANDLER], table[_PYDATAMEM_GET_HANDLER]
    if not set_handler or not get_handler:
        return None
    return int(set_handler), int(get_handler)


def _sync_numpy() -> None:
    """Wrap numpy's data-memory handler once numpy is loaded and the map is on."""
    global _numpy_hooked
    if _numpy_hooked or "numpy" not in sys.modules:
        return
    functions = _numpy_handler_functions()
    if functions is not None and lib.pb__heapmap_numpy_install(
            ffi.cast("void *", functions[0]), ffi.cast("void *", functions[1])) >= 0:
        _numpy_hooked = True


def _unhook_numpy() -> None:
    global _numpy_hooked
    if _numpy_hooked:
        functions = _numpy_handler_functions()
        if functions is not None:
            lib.pb__heapmap_numpy_uninstall(ffi.cast("void *", functions[0]))
        _numpy_hooked = False


def numpy_hooked() -> bool:
    """True while numpy's array data goes through the heap map's NEP 49 handler."""
    return _numpy_hooked


def install() -> bool:
    """Install the hooks (and numpy's handler, if numpy is loaded); False if already installed."""
    done = lib.pb__heapmap_install() == 0
    _sync_numpy()
    return done


def uninstall() -> bool:
    """Remove the hooks; False if they were not installed.

    Raises :class:`~ptrbridge.PointerError` if another allocator hook was
    installed on top of ptrbridge's (remove that one first, e.g. stop
    tracemalloc), since removing ours would cut it out of the chain.
    """
    rc = lib.pb__heapmap_uninstall()
    if rc != -2:
        _unhook_numpy()
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
    if not _numpy_hooked and "numpy" in sys.modules and installed():
        _sync_numpy()
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
