"""Who owns a piece of memory: the Python side of the region registry.

The C registry (``csrc/regions.c``) records address ranges; this module keeps
what the messages need about each one (what object, created where), a
bounded history of freed regions for use-after-free reports, and recognises
Python-owned objects (buffers, owning cffi cdata, ctypes instances) so the
checker can tell Python memory from C memory.

``ptrbridge.new`` lives here: an ``ffi.new`` that the registry knows about, so
that a struct field pointing at it is recognised, and a pointer to it after it
was freed is reported instead of silently reading freed memory.
"""
from __future__ import annotations

import ctypes
import re
import threading
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any, Deque, Dict, List, NamedTuple, Optional, Tuple

from . import levels, scanning
from ._bindings import address_of, check, ffi, lib, native
from .callsite import caller_site
from .errors import UnpinnableError

__all__ = [
    "RegionInfo",
    "FreedRegion",
    "new",
    "managed_extent",
    "describe",
    "python_owned_extent",
    "cdata_extent",
    "ctypes_extent",
    "register",
    "unregister",
    "lookup",
    "find_freed",
    "note_freed",
    "FREED_HISTORY",
]

KIND_NAMES = {1: "pinned", 2: "lent", 3: "managed"}
FREED_HISTORY = 4096
_PAGE_SHIFT = 12
_LARGE_PAGES = 64  # regions spanning more pages are kept in a short list instead

# native.cdata_address reads a cdata's address through cffi's exported C API, a tenth
# of ffi.cast("uintptr_t", p); None if this cffi exports none.
_fast_address: Any = native.cdata_address if native.slots_init(ffi.typeof("void *")) else None

# Types of cffi cdata that own (or hold) Python memory.
_OWN_TYPE = type(ffi.new("char[]", 1))
_FROMBUF_TYPE = type(ffi.from_buffer(b""))
_CDATA_OWNING = (_OWN_TYPE, _FROMBUF_TYPE)
# ffi.new_handle() results: a subclass of _OWN_TYPE whose 'void *' value is the address of the
# handle object itself.  An opaque token, not memory: C may keep it for as long as the handle
# lives and gives it back through ffi.from_handle(), never reading what it points to.
_HANDLE_TYPE = type(ffi.new_handle(None))


def is_handle(obj: Any) -> bool:
    """Whether ``obj`` is an ``ffi.new_handle()`` result (of any FFI instance)."""
    return type(obj) is _HANDLE_TYPE


@dataclass(frozen=True)
class RegionInfo:
    """A region the registry knows: ``[start, start + size)``."""

    id: int
    start: int
    size: int
    kind: str  # "pinned", "lent" or "managed"
    description: str  # e.g. "bytearray(4096)"
    site: str  # file:line where it was created, pinned or lent


@dataclass(frozen=True)
class FreedRegion:
    """A region whose memory has been freed (for use-after-free reports)."""

    start: int
    size: int
    description: str
    site: str  # where it was created
    freed_at: str  # where it was freed (file:line), or "garbage collection"


_lock = threading.Lock()
_regions: Dict[int, RegionInfo] = {}
_freed: Deque[FreedRegion] = deque()
_freed_pages: Dict[int, List[FreedRegion]] = {}
_freed_large: List[FreedRegion] = []


_FROM_BUFFER_SOURCE = re.compile(r" from '([^']+)' object>$")
_view_sources: Dict[int, Tuple[Any, str]] = {}  # id of an ffi.from_buffer view -> (weakref, viewed type)


def describe(obj: Any, size: int) -> str:
    """Short description of an object for messages: ``bytearray(4096)``.

    An ``ffi.from_buffer`` view is described by the object it views.
    """
    if isinstance(obj, _FROMBUF_TYPE):
        # The viewed object's type is only in the view's repr: read once per view (a loop
        # passes the same view at every call), checked through a weak reference.
        cached = _view_sources.get(id(obj))
        if cached is not None and cached[0]() is obj:
            return f"{cached[1]}({size})"
        source = _FROM_BUFFER_SOURCE.search(repr(obj))
        if source is not None:
            if len(_view_sources) >= 4096:
                _view_sources.clear()
            _view_sources[id(obj)] = (weakref.ref(obj), source.group(1))
            return f"{source.group(1)}({size})"
    if isinstance(obj, ffi.CData):
        return cdata_text(ffi.typeof(obj), size)
    return type_text(type(obj), size)


def cdata_text(ctype: Any, size: int) -> str:
    """:func:`describe`'s text for a cdata of ``ctype``: ``cdata 'char[]'(64)``."""
    return f"cdata '{ctype.cname}'({size})"


def type_text(kind: type, size: int) -> str:
    """:func:`describe`'s text for an object of type ``kind``: ``bytearray(4096)``."""
    return f"{kind.__name__}({size})"


def cdata_extent(obj: Any) -> Optional[Tuple[int, int]]:
    """``(address, size)`` of the memory a cffi cdata owns, or None if it owns none.

    ``ffi.new`` results and ``ffi.from_buffer`` views are Python-owned; casts,
    pointers from C, ``ffi.gc`` results and handles (``ffi.new_handle``) are not,
    nor is a ``from_buffer`` view typed ``void *`` (its length is unknown).
    """
    if type(obj) not in _CDATA_OWNING:  # exact types: a handle (a subclass) owns no memory
        if _managed and isinstance(obj, ffi.CData) and type(obj) is not _HANDLE_TYPE:
            return managed_extent(address_of(obj)) if ffi.typeof(obj).kind in ("pointer", "array") else None
        return None
    ctype = ffi.typeof(obj)
    shape = _shapes.get(ctype)
    if shape is None:
        shape = _shape(ctype)
    kind, item_size = shape
    if kind == "pointer":  # ffi.new("struct s *"): the struct it points to
        return cdata_address(obj), item_size
    if kind == "array":
        return cdata_address(obj), ffi.sizeof(obj)
    if kind in ("struct", "union"):
        # A struct or union value that refers to its owner, e.g. ffi.new("struct s *")[0].
        return cdata_address(ffi.addressof(obj)), ffi.sizeof(obj)
    return None  # e.g. a callback's function pointer: code, not data


_shapes: Dict[Any, Tuple[str, int]] = {}  # ctype -> (kind, size of an item of a pointer or array)


def _shape(ctype: Any) -> Tuple[str, int]:
    kind = ctype.kind
    item_size = 0
    if kind == "array":
        item_size = ffi.sizeof(ctype.item)
    elif kind == "pointer":
        try:
            item_size = ffi.sizeof(ctype.item)
        except ffi.error:
            # void * or an opaque struct: an ffi.new_handle (an identity, not memory C
            # reads) or ffi.from_buffer("void *", ...), whose length cffi does not give.
            kind = "unsized"
    shape = (kind, item_size)
    if len(_shapes) < 4096:
        _shapes[ctype] = shape
    return shape


def cdata_address(obj: Any) -> int:
    """The address of a pointer or array cdata (cffi's C API; ``ffi.cast("uintptr_t", p)`` without it)."""
    if _fast_address is not None:
        return _fast_address(obj)  # type: ignore[no-any-return]
    return int(ffi.cast("uintptr_t", obj))


def ctypes_pointer_value(ptr: Any) -> int:
    """The address a ctypes pointer instance holds (0 for NULL).

    Not ``ctypes.cast(ptr, c_void_p).value``: ``cast`` puts ``ptr`` into its own
    ``_objects`` (a reference cycle), so the pointer - and the numpy array or
    buffer it keeps alive - would outlive the program's last reference until
    the garbage collector runs.
    """
    return ctypes.c_void_p.from_address(ctypes.addressof(ptr)).value or 0


def ctypes_extent(obj: Any) -> Optional[Tuple[int, int]]:
    """``(address, size)`` of a ctypes instance's memory, or None for other objects."""
    if isinstance(obj, ctypes._SimpleCData) or isinstance(  # type: ignore[attr-defined]
        obj, (ctypes.Structure, ctypes.Union, ctypes.Array, ctypes._Pointer)  # type: ignore[attr-defined]
    ):
        return ctypes.addressof(obj), ctypes.sizeof(obj)
    return None


def python_owned_extent(obj: Any, api: str = "ptrbridge.Pinner.pin", verb: str = "pin") -> Tuple[Any, int, int]:
    """Return ``(keeper, address, size)`` for a Python-owned object.

    ``keeper`` holds the memory in place while referenced: for buffer objects
    it is a new ``ffi.from_buffer`` view (so a bytearray cannot be resized);
    for owning cdata it is the cdata itself.  Raises
    :class:`~ptrbridge.UnpinnableError` (a ``TypeError``) for anything else;
    messages name ``api``, the function the user called.
    """
    if isinstance(obj, ffi.CData):
        extent = cdata_extent(obj)
        if extent is None and type(obj) is _HANDLE_TYPE:
            raise UnpinnableError(
                f"{api}: cannot {verb} {obj!r}: an ffi.new_handle() result is a token, not memory C "
                f"reads; keep the handle alive (a reference in Python) for as long as C may pass it "
                f"back to ffi.from_handle()"
            )
        if extent is None:
            raise UnpinnableError(
                f"{api}: cannot {verb} {obj!r}: it does not own its memory "
                f"(only ffi.new/ffi.from_buffer results, ptrbridge.new results and buffer "
                f"objects are Python-owned; C memory needs no pinning)"
            )
        return obj, extent[0], extent[1]
    try:
        view = memoryview(obj)
    except TypeError:
        raise UnpinnableError(
            f"{api}: cannot {verb} {type(obj).__name__}: it does not export a buffer "
            f"(accepted: bytes, bytearray, memoryview, array.array, numpy arrays, mmap, ctypes "
            f"instances, ffi.buffer objects or owning cffi cdata)"
        ) from None
    with view:
        if not view.contiguous:
            raise UnpinnableError(
                f"{api}: cannot {verb} a non-contiguous {type(obj).__name__} "
                f"(shape {view.shape}, strides {view.strides}): C expects one block of memory; "
                f"copy it first (e.g. bytes(obj) or numpy.ascontiguousarray)"
            )
        size = view.nbytes
    keeper = ffi.from_buffer("char[]", obj, require_writable=False)
    return keeper, address_of(keeper), size


def register(kind: int, start: int, size: int, description: str, site: str) -> RegionInfo:
    """Record a region in the C registry and keep its description."""
    out = ffi.new("uint64_t *")
    check(lib.pb_region_add(ffi.cast("void *", start), size, kind, out), f"registering {description}")
    info = RegionInfo(int(out[0]), start, size, KIND_NAMES[kind], description, site)
    with _lock:
        _regions[info.id] = info
    return info


def unregister(info: RegionInfo, freed_at: Optional[str] = None) -> None:
    """Forget a region; with ``freed_at``, also remember it as freed memory."""
    lib.pb_region_remove(info.id)
    with _lock:
        _regions.pop(info.id, None)
    if freed_at is not None:
        note_freed(info.start, info.size, info.description, info.site, freed_at)


_pin_infos: Dict[int, RegionInfo] = {}  # region id -> RegionInfo of a pin made in C, built on demand


class Lend(NamedTuple):
    """Memory a level-2 call lends to C, while the call runs (a ``PB_REGION_LENT`` region)."""

    id: int
    start: int
    size: int
    description: str


# region id -> the Lend of a call in flight.  Lends are added by one C call
# (lends.c) and kept as tuples: a RegionInfo is made only if a check asks.
_lends: Dict[int, Lend] = {}


def lend(start: int, size: int, description: str) -> Lend:
    """Lend ``[start, start + size)`` to a call: a lent region, and no scan target for it until it returns."""
    region = lib.pb__lend_add(start, size)
    if not region:
        raise MemoryError(f"ptrbridge: registering {description}: out of memory")
    entry = Lend(region, start, size, description)
    _lends[region] = entry
    return entry


def lookup(address: int) -> Optional[RegionInfo]:
    """The live region containing ``address`` (a pinned one if several), or None."""
    packed = lib.pb__region_lookup(address)
    if not packed:
        return None
    region_id = packed >> 2
    info = _regions.get(region_id)
    if info is None and (packed & 3) == lib.PB_REGION_LENT:
        entry = _lends.get(region_id)
        if entry is not None:
            return RegionInfo(region_id, entry.start, entry.size, "lent", entry.description, "<in call>")
        fast = native.fastcall_lent_region(region_id)  # lent by a level-2 call on the C fast path
        if fast is not None:
            return RegionInfo(region_id, fast[0], fast[1], "lent", fast[2], "<in call>")
    if info is None and (packed & 3) == lib.PB_REGION_PINNED:
        # Pins are registered by one C call (csrc/pypin.c); their description
        # and site text are made here, the first time a check asks.  Region ids
        # are never reused, so a cached entry can only be stale, never wrong.
        info = _pin_infos.get(region_id)
        if info is None:
            pin = native.pin_region(region_id)
            if pin is None:
                return None
            obj, start, size, site = pin
            info = RegionInfo(region_id, start, size, "pinned", describe(obj, size), native.site_text(site))
            if len(_pin_infos) >= 4096:
                _pin_infos.clear()
            _pin_infos[region_id] = info
    return info


def _pages(start: int, size: int) -> range:
    return range(start >> _PAGE_SHIFT, ((start + max(size, 1) - 1) >> _PAGE_SHIFT) + 1)


def note_freed(start: int, size: int, description: str, site: str, freed_at: str) -> None:
    """Remember that ``[start, start + size)`` was freed (bounded history)."""
    entry = FreedRegion(start, size, description, site, freed_at)
    with _lock:
        if len(_freed) >= FREED_HISTORY:
            _drop_freed(_freed.popleft())
        _freed.append(entry)
        pages = _pages(start, size)
        if len(pages) > _LARGE_PAGES:
            _freed_large.append(entry)
        else:
            for page in pages:
                _freed_pages.setdefault(page, []).append(entry)


def _drop_freed(entry: FreedRegion) -> None:
    pages = _pages(entry.start, entry.size)
    if len(pages) > _LARGE_PAGES:
        _freed_large.remove(entry)
        return
    for page in pages:
        bucket = _freed_pages.get(page)
        if bucket is not None:
            bucket.remove(entry)
            if not bucket:
                del _freed_pages[page]


def forget_freed(start: int, size: int) -> None:
    """Drop history entries overlapping ``[start, start + size)``: the memory is live again."""
    end = start + max(size, 1)
    with _lock:
        stale = [e for e in _candidates(start, end) if e.start < end and start < e.start + max(e.size, 1)]
        for entry in stale:
            _freed.remove(entry)
            _drop_freed(entry)


def _candidates(start: int, end: int) -> List[FreedRegion]:
    found: List[FreedRegion] = list(_freed_large)
    for page in _pages(start, end - start):
        found.extend(_freed_pages.get(page, ()))
    return found


def has_freed_history() -> bool:
    """True if any freed region is remembered (a cheap pre-check)."""
    return bool(_freed)


def find_freed(address: int) -> Optional[FreedRegion]:
    """The most recently freed region containing ``address``, or None."""
    if not _freed:
        return None
    with _lock:
        best = None
        for entry in _candidates(address, address + 1):
            if entry.start <= address < entry.start + max(entry.size, 1):
                best = entry  # later entries are newer
        return best


# ptrbridge.new memory comes from its own allocator so that a freed block can
# be held back (quarantined) while the freed-region history still names it:
# a pointer into it is then certainly a use after free, never a new object
# that happens to reuse the address.
QUARANTINE_BYTES = 16 << 20
QUARANTINE_BLOCKS = 1024
_managed: Dict[int, RegionInfo] = {}  # start address -> region, for live ptrbridge.new blocks
_quarantine: Deque[Tuple[int, int]] = deque()
_quarantine_bytes = 0


def _managed_alloc(size: int) -> Any:
    ptr = lib.pb__untracked_calloc(size)
    if ptr == ffi.NULL:
        raise MemoryError(f"ptrbridge.new: cannot allocate {size} bytes")
    return ptr


def _managed_free(ptr: Any) -> None:
    global _quarantine_bytes
    address = address_of(ptr)
    info = _managed.pop(address, None)
    size = 0
    if info is not None:
        size = info.size
        unregister(info, freed_at=caller_site())
        if levels._level == 2:
            # Looked for at the next scan; the block stays in quarantine until then.
            scanning.retire(info.start, info.size, info.description, "ptrbridge.new", info.site, "freed")
    with _lock:
        _quarantine.append((address, size))
        _quarantine_bytes += size
        evicted = []
        while len(_quarantine) > QUARANTINE_BLOCKS or _quarantine_bytes > QUARANTINE_BYTES:
            old, old_size = _quarantine.popleft()
            _quarantine_bytes -= old_size
            evicted.append((old, old_size))
    for old, old_size in evicted:
        forget_freed(old, old_size)  # the memory may be reused from now on
        lib.pb__untracked_free(ffi.cast("void *", old))


_allocator = ffi.new_allocator(alloc=_managed_alloc, free=_managed_free, should_clear_after_alloc=False)


def managed_extent(address: int) -> Optional[Tuple[int, int]]:
    """``(start, size)`` of the live ``ptrbridge.new`` block starting at ``address``."""
    info = _managed.get(address)
    return None if info is None else (info.start, info.size)


def new(ctype: Any, init: Any = None, ffi: Any = None) -> Any:
    """``ffi.new(ctype, init)`` that ptrbridge knows about.

    ``ctype`` is a C type string parsed by ``ffi`` (default: ptrbridge's own,
    which knows the standard C types) or a cffi CType.  The result is zeroed
    (or initialised from ``init``) like ``ffi.new``, and registered as
    Python-owned memory: the checker recognises a struct field that points at
    it, and after it is freed a pointer that still refers to it raises
    :class:`~ptrbridge.UseAfterFreeError` naming where it was created and
    freed.  Keep the result alive as long as C uses it (or pin it).
    """
    parser = ffi if ffi is not None else _default_ffi
    ctype_obj = parser.typeof(ctype) if isinstance(ctype, str) else ctype
    if ctype_obj.kind not in ("pointer", "array"):
        raise TypeError(
            f"ptrbridge.new: expected a pointer or array type, like ffi.new, not '{ctype_obj.cname}'"
        )
    cdata = _allocator(ctype_obj) if init is None else _allocator(ctype_obj, init)
    address = address_of(cdata)
    size = ffi_sizeof_target(cdata, ctype_obj)
    info = register(lib.PB_REGION_MANAGED, address, size, describe(cdata, size), caller_site())
    _managed[address] = info
    return cdata


def ffi_sizeof_target(cdata: Any, ctype_obj: Any) -> int:
    """Bytes a pointer/array cdata made by ``ptrbridge.new`` refers to."""
    if ctype_obj.kind == "array":
        return int(_default_ffi.sizeof(cdata))
    return int(_default_ffi.sizeof(ctype_obj.item))


_default_ffi = ffi
