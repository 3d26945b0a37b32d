"""The checker: rule R1 and use-after-free on the arguments of a C call.

R1. Python may pass C a pointer to Python-owned memory only if that memory
holds no pointer to Python-owned memory that is not pinned.

For each argument the checker finds the memory it points to, and walks it by
its C type - struct and union fields, arrays, nested structs, pointers to
pointers (pointer-typed slots only; raw byte buffers are not scanned).  Every
non-NULL pointer slot is classified:

* inside a region pinned by a :class:`~ptrbridge.Pinner` - allowed, and the
  pinned memory is walked in turn by the slot's pointee type;
* inside Python-owned memory that is not pinned - :class:`NestedPointerError`;
* inside memory ``ptrbridge.new`` allocated and that has since been freed -
  :class:`UseAfterFreeError`;
* anything else (C memory, unknown) - allowed.

Python-owned memory is recognised, at check level 1, when it is:

* registered with ptrbridge: ``ptrbridge.new`` results and pinned objects;
* an argument of the same call: owning cffi cdata (``ffi.new``,
  ``ffi.from_buffer``), ctypes instances, and buffer objects passed for
  ``char *`` parameters;
* kept alive by a ctypes argument's keep-alive records (``_objects``): a
  ``c_char_p`` field set to bytes, a ``POINTER`` field set to another ctypes
  instance;
* a local variable of the calling function or of the two functions above it,
  or an item of a list, tuple or dict held in one (owning cdata, ctypes
  instances, bytes, bytearray, memoryview, array.array, numpy arrays): this is
  how a struct field set to ``ffi.new(...)`` memory that the caller still
  holds is found.

Not recognised at level 1: Python memory reachable only through other
objects (attributes of instances, globals, locals further up the stack), and
the target of a struct field set from a temporary ``ffi.new(...)`` that was
already freed.  Level 2 (the heap map) recognises every Python allocation.
"""
from __future__ import annotations

import array
import ctypes
import functools
import struct
import sys
from collections import OrderedDict
import types
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

from . import findings, heapmap, levels, scanning
from ._bindings import ffi, lib, native
from .callsite import format_location, frame_location, frame_site
from .errors import NestedPointerError, UseAfterFreeError
from .ownership import _FROMBUF_TYPE, cdata_text, type_text
from .ownership import (
    FreedRegion,
    has_freed_history,
    cdata_extent,
    ctypes_extent,
    describe,
    find_freed,
    lookup,
)

__all__ = [
    "Layout",
    "Slot",
    "layout_of",
    "CallCheck",
    "Owner",
    "HINT",
    "MAX_DEPTH",
    "is_opaque",
]

PTR_SIZE = ffi.sizeof("void *")
_PTR_FORMAT = "Q" if PTR_SIZE == 8 else "I"
MAX_DEPTH = 8
_ADDRESS_LIMIT = 1 << (8 * PTR_SIZE)
_PYMALLOC_MAX = 512  # pymalloc serves requests up to this size; larger ones go to malloc
MAX_SLOTS = 1 << 16
MAX_LOCAL_OBJECTS = 512
LOCAL_FRAMES = 3  # the caller and two frames above it
frame_variables = native.frame_variables
_scan_slots = native.scan_slots
_owner_index = native.owner_index
_SLOT_WALKABLE = 1  # PB_SLOT_WALKABLE in csrc/pb_slots.h
HINT = "pin it with ptrbridge.Pinner or copy it with ptrbridge.CBuffer"

_CType = type(ffi.typeof("int"))
# Types whose objects never own Python memory C could point into: skipped
# without further thought when looking through local variables.
_NEVER_OWNING = frozenset({
    int, float, complex, bool, str, type(None), type, types.FunctionType, types.ModuleType,
    types.BuiltinFunctionType, types.MethodType, types.CodeType, types.FrameType, range, slice,
    frozenset, set, property, staticmethod, classmethod,
})
_PointerBase = ctypes._Pointer  # type: ignore[attr-defined]
_SimpleBase = ctypes._SimpleCData  # type: ignore[attr-defined]
_CFuncPtrBase = ctypes.CFUNCTYPE(None).__mro__[1]


@dataclass(frozen=True)
class Slot:
    """A pointer-typed slot at ``offset`` inside a type; ``pointee`` is its target type."""

    offset: int
    path: str
    pointee: Any  # cffi CType, ctypes type, or None for void / function pointers


class Layout:
    """The pointer slots of one C type, with a reader that extracts them in one step."""

    __slots__ = ("ctype", "size", "slots", "_unpack", "span", "_arrays", "_plan")

    def __init__(self, ctype: Any, size: int, slots: Sequence[Slot]) -> None:
        unique: Dict[int, Slot] = {}
        for slot in slots:  # union members of pointer type share an offset
            unique.setdefault(slot.offset, slot)
        ordered = sorted(unique.values(), key=lambda s: s.offset)
        self.ctype = ctype
        self.size = size
        self.slots: Tuple[Slot, ...] = tuple(ordered)
        fmt, pos = ["="], 0
        for slot in ordered:
            if slot.offset > pos:
                fmt.append(f"{slot.offset - pos}x")
            fmt.append(_PTR_FORMAT)
            pos = slot.offset + PTR_SIZE
        self.span = pos  # bytes that must be readable for the slots
        self._unpack = struct.Struct("".join(fmt)).unpack_from if ordered else None
        self._arrays: Dict[int, Any] = {}  # count -> unpacker for arrays of this type
        self._plan: Optional[bytes] = None

    @property
    def plan(self) -> bytes:
        """The slots packed for ``native.scan_slots`` (csrc/pb_slots.h), made on first use.

        Made lazily, not in ``__init__``: whether a slot's pointee has slots of
        its own needs the pointee's layout, and a self-referential struct's
        layout is only known once this one is cached.
        """
        plan = self._plan
        if plan is None:
            parts = [struct.pack("=II", self.size, len(self.slots))]
            for slot in self.slots:
                pointee = layout_of(slot.pointee) if slot.pointee is not None else None
                walkable = pointee is not None and bool(pointee.slots) and bool(pointee.size)
                parts.append(struct.pack("=II", slot.offset, _SLOT_WALKABLE if walkable else 0))
            plan = self._plan = b"".join(parts)
        return plan

    def read(self, address: int) -> Tuple[int, ...]:
        """Values of every pointer slot of the object at ``address``."""
        if self._unpack is None:
            return ()
        return self._unpack(ffi.buffer(ffi.cast("char *", address), self.span))  # type: ignore[no-any-return]

    def read_array(self, address: int, count: int) -> Tuple[int, ...]:
        """Slot values of ``count`` consecutive objects at ``address``, element by element."""
        if count == 1:
            return self.read(address)
        if self._unpack is None:
            return ()
        unpack = self._arrays.get(count)
        if unpack is None:
            fmt, pos = ["="], 0
            for i in range(count):
                for slot in self.slots:
                    offset = i * self.size + slot.offset
                    if offset > pos:
                        fmt.append(f"{offset - pos}x")
                    fmt.append(_PTR_FORMAT)
                    pos = offset + PTR_SIZE
            unpack = struct.Struct("".join(fmt)).unpack_from
            if len(self._arrays) < 64:
                self._arrays[count] = unpack
        span = (count - 1) * self.size + self.span
        return unpack(ffi.buffer(ffi.cast("char *", address), span))  # type: ignore[no-any-return]


_layouts: Dict[Any, Layout] = {}


def is_opaque(ctype: Any) -> bool:
    """True for a cffi struct or union whose layout is unknown (``typedef ... T;``, ``struct s;``).

    Never reads ``ctype.fields``: for an API-mode opaque type cffi aborts the
    process on that (an assertion in ``ctypeget_fields``).  An opaque type has
    no size, so ``ffi.sizeof`` is what asks.  Other types are not opaque.
    """
    if not isinstance(ctype, _CType) or ctype.kind not in ("struct", "union"):
        return False
    try:
        ffi.sizeof(ctype)
    except ffi.error:
        return True
    return False


def layout_of(ctype: Any) -> Optional[Layout]:
    """The :class:`Layout` of a cffi CType or ctypes type (None for void/opaque)."""
    try:
        return _layouts[ctype]
    except KeyError:
        pass
    except TypeError:  # unhashable: not a type we know
        return None
    if isinstance(ctype, _CType):
        if ctype.kind in ("void", "function") or is_opaque(ctype):
            return None
        if ctype.kind == "array" and ctype.length is None:
            return None
        slots: List[Slot] = []
        _cffi_slots(ctype, 0, "", slots)
        size = ffi.sizeof(ctype)
    elif isinstance(ctype, type) and issubclass(
        ctype, (_SimpleBase, _PointerBase, ctypes.Structure, ctypes.Union, ctypes.Array)
    ):
        slots = []
        _ctypes_slots(ctype, 0, "", slots)
        size = ctypes.sizeof(ctype)
    else:
        return None
    layout = Layout(ctype, size, slots[:MAX_SLOTS])
    _layouts[ctype] = layout
    return layout


def _has_slots(ctype: Any) -> bool:
    layout = layout_of(ctype)
    return layout is not None and bool(layout.slots)


def _cffi_slots(ct: Any, base: int, path: str, out: List[Slot]) -> None:
    kind = ct.kind
    if kind == "pointer":
        item = ct.item
        out.append(Slot(base, path, None if item.kind in ("void", "function") else item))
    elif kind in ("struct", "union"):
        for name, field in ct.fields or ():
            if field.bitsize >= 0:
                continue
            _cffi_slots(field.type, base + field.offset, f"{path}.{name}" if name else path, out)
    elif kind == "array" and ct.length is not None and _has_slots(ct.item):
        step = ffi.sizeof(ct.item)
        for i in range(ct.length):
            if len(out) >= MAX_SLOTS:
                return
            _cffi_slots(ct.item, base + i * step, f"{path}[{i}]", out)


def _ctypes_slots(t: type, base: int, path: str, out: List[Slot]) -> None:
    if issubclass(t, _PointerBase):
        out.append(Slot(base, path, t._type_))  # type: ignore[attr-defined]
    elif issubclass(t, ctypes.c_char_p):
        out.append(Slot(base, path, ctypes.c_char))
    elif issubclass(t, ctypes.c_wchar_p):
        out.append(Slot(base, path, ctypes.c_wchar))
    elif issubclass(t, ctypes.c_void_p):
        out.append(Slot(base, path, None))
    elif issubclass(t, (ctypes.Structure, ctypes.Union)):
        for field in getattr(t, "_fields_", ()):
            if len(field) > 2:  # bit field
                continue
            name, ftype = field[0], field[1]
            _ctypes_slots(ftype, base + getattr(t, name).offset, f"{path}.{name}", out)
    elif issubclass(t, ctypes.Array) and _has_slots(t._type_):
        item: Any = t._type_
        length: int = getattr(t, "_length_")
        step = ctypes.sizeof(item)
        for i in range(length):
            if len(out) >= MAX_SLOTS:
                return
            _ctypes_slots(item, base + i * step, f"{path}[{i}]", out)


def _sizeof(ctype: Any) -> int:
    return int(ffi.sizeof(ctype)) if isinstance(ctype, _CType) else ctypes.sizeof(ctype)


class Owner:
    """What a pointer target belongs to (immutable; compared by value)."""

    __slots__ = ("start", "size", "described", "pinned", "origin")

    def __init__(self, start: int, size: int, described: Any, pinned: bool, origin: str) -> None:
        self.start = start
        self.size = size
        # The description, or a callable making it (caller locals: only when reported).
        self.described = described
        self.pinned = pinned
        self.origin = origin  # e.g. "argument 1", "local variable 'name'", "ptrbridge.new at x.py:3"

    @property
    def description(self) -> str:
        """The object, e.g. ``bytearray(4096)`` (made on first use)."""
        text = self.described
        if callable(text):
            text = self.described = text()
        return str(text)

    @property
    def end(self) -> int:
        return self.start + self.size

    def _key(self) -> Tuple[int, int, bool, str]:
        return (self.start, self.size, self.pinned, self.origin)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Owner) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (f"Owner(start={self.start:#x}, size={self.size}, description={self.description!r}, "
                f"pinned={self.pinned}, origin={self.origin!r})")


def _buffer_extent(obj: Any) -> Optional[Tuple[int, int]]:
    """``(address, size)`` of ``obj``'s buffer, if it exports a contiguous one (else it owns nothing)."""
    return _native_buffer_extent(obj)  # type: ignore[no-any-return]


_native_buffer_extent = native.buffer_extent


def object_extent(obj: Any) -> Optional[Tuple[int, int]]:
    """``(address, size)`` of any Python-owned object, or None."""
    if isinstance(obj, ffi.CData):
        return cdata_extent(obj)
    if isinstance(obj, (ctypes.Structure, ctypes.Union, ctypes.Array, _PointerBase, _SimpleBase)):
        return ctypes_extent(obj)
    # __array_interface__ is looked up on the type (numpy's is a descriptor there): an object
    # whose __getattr__ answers every name is not an array.
    if isinstance(obj, (bytes, bytearray, memoryview)) or type(obj) is _ArrayType or hasattr(
            type(obj), "__array_interface__"):
        return _buffer_extent(obj)
    return None


class Trap(NamedTuple):
    """A struct field C itself moved at an earlier call (a :class:`Cursor`) that points into
    Python memory freed since, at an instrumented level-2 call with the quarantine on.

    Presence alone is not a bug (zlib's ``next_out`` into a freed output buffer at
    ``deflateEnd()``, which never reads it): the quarantine points the field at a
    closed region standing for the freed memory while the call runs, so a use by C
    is caught and reported as a use after free, and a field C never touches is only
    a portability finding.  ``error`` records the error finding instead, when no
    trap can be set.  A field the program set to freed memory is an error at the call.
    """

    slot: int  # address of the pointer field
    value: int  # what it holds: a pointer into the freed block
    start: int  # the freed block
    size: int
    text: str  # what the freed block was
    error: Callable[[], None]  # records the use-after-free error (no trap could be set)
    suspect: Callable[[], None]  # records the portability finding (trap set, C did not use it)


class Cursor(NamedTuple):
    """A struct field of a level-2 call's argument that points into live Python memory, before the call."""

    slot: int  # address of the field
    value: int  # what it held


_cursors: "OrderedDict[int, int]" = OrderedDict()  # field address -> the pointer C left there
_CURSORS_MAX = 4096


def note_cursors(lent: Sequence[Any]) -> None:
    """After a level-2 call: remember the pointer fields C moved (zlib's ``next_in``, ``next_out``).

    A field C itself left pointing into a buffer the program has freed since is a
    stale cursor, which correct libraries leave behind; one the program set to
    freed memory is a bug at the call (:meth:`CallCheck.dangling`).
    """
    for item in lent:
        if type(item) is Cursor:
            now = int(ffi.cast("uintptr_t *", item.slot)[0])
            if now != item.value and now:
                _cursors[item.slot] = now
                _cursors.move_to_end(item.slot)
                if len(_cursors) > _CURSORS_MAX:
                    _cursors.popitem(last=False)


class CallCheck:
    """Checks the arguments of one call.  Create one per call; not thread-shared."""

    __slots__ = ("function", "args", "record", "_frame", "_known", "_visited", "_pending", "_c_heap", "traps",
                 "cursors", "_watch")

    def __init__(self, function: str, frame: Any, args: Sequence[Any], record: bool = False) -> None:
        self.function = function
        self.args = args
        self.record = record  # instrumentation: findings are recorded, never raised
        self._pending: Optional[NestedPointerError] = None
        self._frame = frame  # the caller's frame: its locals, and the call site for messages
        self._known: Any = None  # native.owner_index of this call, made on first need
        self._visited: set = set()
        self._c_heap: Optional[Dict[int, bool]] = None  # address -> in a live interposed C block
        self.traps: List[Trap] = []  # dangling struct fields for the quarantine to watch (see Trap)
        self.cursors: List[Cursor] = []  # pointer fields into live Python memory (see note_cursors)
        self._watch = record and levels._level == 2 and _quarantine_on()

    # -- ownership -----------------------------------------------------
    def _local_owner(self, address: int) -> Optional[Owner]:
        """The argument, caller local or object a ctypes argument keeps alive that owns ``address``.

        The candidates are read once per call, in C (``native.owner_index``,
        csrc/pyframes.c): the arguments (and what a ``ctypes.byref`` wraps),
        the variables of the caller and the two frames above it with the items
        of lists, tuples and dicts among them, and what ctypes instances keep
        alive for their pointer fields (``_objects``).  The frames' variables
        are read without ``f_locals``, whose snapshot would keep them alive.
        """
        index = self._known
        if index is None:
            index = self._known = _owner_index(self.args, self._frame, LOCAL_FRAMES, MAX_LOCAL_OBJECTS)
        hit = index.find(address)
        if hit is None:
            return None
        start, size, obj, origin = hit
        return Owner(start, size, _describer(obj, size), False, origin)

    def classify(self, address: int) -> Optional[Owner]:
        """Who owns ``address``: a pinned/unpinned Python owner, or None for C/unknown."""
        region = lookup(address)
        if region is not None:
            pinned = region.kind == "pinned"
            origin = f"{'pinned' if pinned else 'ptrbridge.new'} at {region.site}"
            return Owner(region.start, region.size, region.description, pinned, origin)
        edge = lookup(address - 1)
        if edge is not None and edge.kind == "pinned" and address == edge.start + edge.size:
            # One past the end of a pinned buffer, as C keeps end pointers
            # (zlib's next_in after consuming everything): part of the pin.
            return Owner(edge.start, edge.size, edge.description, True, f"pinned at {edge.site}")
        if lib.pb__alloc_block_size(address):
            return None  # the start of a tracked C block: C memory
        if levels._level == 2 and self._in_c_heap(address):
            # Inside a live block that libc's malloc gave an interposed C library: C memory.
            # No Python object can live there, so the caller-locals search (the slow part,
            # for pointer-heavy C structures such as librdkafka's) is skipped.
            return None
        return self._classify_unknown(address)

    def _classify_unknown(self, address: int) -> Optional[Owner]:
        """:meth:`classify` for an address in no region and not C memory (as scan_slots found)."""
        owner = self._local_owner(address)
        if owner is not None:
            return owner
        if levels._level == 2:
            block = heapmap.lookup_block(address)
            if block is not None:
                return Owner(block.start, block.size,
                             f"Python memory block ({block.size} bytes, {block.domain} allocator)", False,
                             "found by the level-2 heap map")
        return None

    def _in_c_heap(self, address: int) -> bool:
        """:func:`_in_c_heap_block`, remembered for the call (classify and the freed search ask both)."""
        memo = self._c_heap
        if memo is None:
            memo = self._c_heap = {}
        known = memo.get(address)
        if known is None:
            known = memo[address] = _in_c_heap_block(address)
        return known

    # -- messages --------------------------------------------------------
    def _where(self) -> str:
        return f"in call to {self.function}() at {self.site()}"

    def site(self) -> str:
        """``file.py:line`` of the call (``<unknown>:0`` when C or the interpreter made it)."""
        return frame_site(self._frame)

    def _lazy_site(self) -> Any:
        """A function making :meth:`site`'s text later, holding the file name and line, not the frame."""
        location = frame_location(self._frame)
        return "<unknown>:0" if location is None else functools.partial(format_location, location)

    def _nested_error(self, argno: int, path: str, owner: Owner, holder: str) -> NestedPointerError:
        shown = path if path else "*"
        return NestedPointerError(
            f"ptrbridge: argument {argno} has {holder} pointer to unpinned Python pointer: "
            f"{shown} -> {owner.description} ({owner.origin}) (unpinned: alive now, but nothing "
            f"keeps it alive and in place for C){self._reused_note(owner.start)} {self._where()} ({HINT})"
        )

    @staticmethod
    def _reused_note(address: int) -> str:
        """A truthful aside when a freed ptrbridge.new object lived at ``address`` before."""
        if not has_freed_history():
            return ""
        freed = find_freed(address)
        if freed is None:
            return ""
        return (f" (the address was reused: {freed.description} created at {freed.site} and freed at "
                f"{freed.freed_at} lived there before; if the pointer was set from it, it is dangling)")

    def _freed_error(self, argno: int, path: Optional[str], freed: FreedRegion) -> UseAfterFreeError:
        what = f"{path} -> " if path else ""
        lead = "has pointer to" if path else "is a pointer into"
        if freed.site.startswith("<unknown>"):
            # Seen only by level 2's allocator hooks: say who saw it, not an unknown site.
            seen = freed.site[len("<unknown>"):].strip() or "(seen at level 2)"
            history = f" {seen}"
        else:
            history = f" created at {freed.site}, freed at {freed.freed_at}"
        return UseAfterFreeError(
            f"ptrbridge: argument {argno} {lead} freed Python memory: {what}{freed.description}"
            f"{history} (dangling: freed before the call) "
            f"{self._where()} (keep the object alive, or pin it, for as long as C uses it)"
        )

    # -- verdicts: raise (explicit wrap) or record (instrumentation) -------
    def _find_freed(self, address: int) -> Optional[FreedRegion]:
        """The freed Python memory ``address`` points into, from the registry or the heap map."""
        if has_freed_history():
            freed = find_freed(address)
            if freed is not None and lookup(address) is None:
                return freed
        if levels._level == 2:
            if self._in_c_heap(address):
                # Live C memory from an interposed library's malloc: whatever Python freed
                # there before was given back and reused by C, so nothing dangles.  (And the
                # heap map's freed-block search is the slow part of a level-2 call that
                # passes a C object, such as a decoder state.)
                return None
            block = heapmap.find_freed_block(address)  # None while a live block holds the address
            # Certain: pymalloc's small blocks (nobody but Python reuses them, and a reuse would
            # be a live block), and any block the heap map still holds back from its allocator.
            # A freed raw, numpy or large block given back is libc heap that C's own malloc may
            # have handed out again (ptrbridge's C blocks included), which only an interposed C
            # heap could tell apart: not reported.
            if block is not None and (
                    (block.domain in ("mem", "object") and block.size <= _PYMALLOC_MAX)
                    or lib.pb__heapmap_held_large(address)):
                lent = scanning.lent_record(block.start, block.size)
                if lent is not None:  # the object an earlier checked call was lent
                    if address == lent[0] + lent[1]:
                        # One past its end: it points at none of its bytes.  zlib's next_in once
                        # all the input is consumed (and avail_in is 0) is this, in every correct
                        # streaming loop.
                        return None
                    return FreedRegion(block.start, block.size, lent[2],
                                       f"<unknown> (lent to {lent[3]}() at {lent[4]}, freed since; "
                                       f"seen by the level-2 heap map)", "<unknown>")
                return FreedRegion(block.start, block.size,
                                   f"Python memory block ({block.size} bytes, {block.domain} allocator)",
                                   "<unknown> (freed, seen by the level-2 heap map)", "<unknown>")
            # Freed ffi.new memory that the interposer still holds back (poisoned, not yet given
            # back to libc): certainly not reused, so a pointer into it is dangling.
            held = ffi.new("uintptr_t[1]")
            held_size = ffi.new("size_t[1]")
            if lib.pb__interpose_find_held(address, held, held_size):
                size = int(held_size[0])
                return FreedRegion(int(held[0]), size, f"ffi.new memory ({size} bytes)",
                                   "<unknown> (freed, seen by the level-2 malloc interposer)", "<unknown>")
        return None

    def dangling(self, argno: int, path: Optional[str], freed: FreedRegion, slot: int = 0,
                 value: int = 0) -> None:
        """A pointer to freed Python memory: UseAfterFreeError, or an error finding when recording.

        ``slot``: the address of the struct field or array slot that holds ``value``.
        """
        exc = self._freed_error(argno, path, freed)
        if not self.record:
            raise exc
        # An element of a pointer array ("[5]", no struct field on the way) may be an output slot
        # holding a stale value from an earlier call (cffi drops const, so input and output
        # arrays look alike): a suspect, not an error.  Struct fields (iov_base) stay errors,
        # unless the quarantine can watch them for the call (Trap).
        severity = "portability" if path and "." not in path else "error"
        created = freed.site if not freed.site.startswith("<unknown>") else None

        def finding(severity: str = severity, exc: BaseException = exc) -> None:
            _record(self, "dangling-argument", severity, "use-after-free", exc, freed.description, freed.size,
                    created, path, "freed")

        if severity == "error" and slot and self._watch and _cursors.get(slot) == value:
            # A pointer C left there at an earlier call, into memory freed since: a use is the bug.
            def suspect() -> None:
                if findings.strict():
                    finding("portability", UseAfterFreeError(
                        f"{exc} (C did not use it during the call: a stale pointer, watched by the quarantine)"))
            self.traps.append(Trap(slot, value, freed.start, freed.size,
                                   f"{freed.description} (freed before the call; argument {argno} {path})",
                                   finding, suspect))
            return
        finding()

    def unpinned(self, argno: int, path: str, owner: Owner, holder: str) -> None:
        """R1: a nested pointer to live unpinned Python memory.

        Explicit wrap raises NestedPointerError once the walk is over (a
        dangling pointer found further on wins); instrumentation records a
        portability finding in strict mode and nothing otherwise (CPython
        never moves the object and it is alive for the call).
        """
        if not self.record:
            if self._pending is None:
                self._pending = self._nested_error(argno, path, owner, holder)
            return
        if levels._level == 2:  # C was handed it: name it if C's pointer dangles later
            # The texts are made only if a report needs them (neither callable holds the
            # object or the frame, which must stay free to die).
            scanning.remember_lend(owner.start, owner.size, owner.described, self.function, self._lazy_site())
        if findings.strict():
            exc = self._nested_error(argno, path, owner, holder)
            _record(self, "nested-unpinned", "portability", "R1", exc, owner.description, owner.size,
                    None, path, "unpinned")

    def finish(self) -> None:
        """End of the call's checks: raise the R1 violation found, if any (explicit wrap)."""
        # The owner index may hold a frame above the caller (the next one it would read):
        # dropped here, so that a raised error's traceback, which holds this check, makes
        # no reference cycle through the caller's frames (they must die when the caller drops them).
        self._known = None
        pending, self._pending = self._pending, None
        if pending is not None:
            raise pending

    # -- checks ----------------------------------------------------------
    def check_address(self, argno: int, address: int) -> None:
        """A raw address argument (int, non-owning pointer cdata): use-after-free check."""
        if 0 < address < _ADDRESS_LIMIT and (has_freed_history() or levels._level == 2):
            freed = self._find_freed(address)
            # A live object (a local ffi.new, say) may have reused the freed address: not dangling.
            if freed is not None and self.classify(address) is None:
                self.dangling(argno, None, freed)

    def walk(self, argno: int, address: int, ctype: Any, count: int, holder: str,
             lend: Optional[List[Owner]] = None) -> None:
        """Check ``count`` consecutive objects of ``ctype`` at ``address`` (memory known readable).

        With ``lend`` (for C memory passed to C), an unpinned Python target is
        not an R1 violation: it is lent to the call and appended to ``lend``.
        """
        self._walk(argno, address, layout_of(ctype), count, "", holder, 0, lend)

    def _walk(self, argno: int, address: int, layout: Optional[Layout], count: int, prefix: str,
              holder: str, depth: int, lend: Optional[List[Owner]] = None, indexed: bool = False) -> None:
        if layout is None or not layout.slots or count <= 0 or depth > MAX_DEPTH:
            return
        key = (address, id(layout))
        if key in self._visited:
            return
        self._visited.add(key)
        count = min(count, MAX_SLOTS // len(layout.slots) or 1)
        slots = layout.slots
        width = len(slots)
        indexed = indexed or count > 1  # what a pointer points to is shown as p->[i]
        hits = _scan_slots(address, layout.plan, count, levels._level == 2)
        if hits is None:  # every slot NULL, C memory, or pinned with nothing to walk on
            return
        for i in range(0, len(hits), 3):
            k, value = hits[i], hits[i + 1]
            # NEEDS_OWNER (2): scan_slots found it in no region and not C memory.
            owner = self._classify_unknown(value) if hits[i + 2] == 2 else self.classify(value)
            if owner is None:
                freed = self._find_freed(value)
                if freed is not None:
                    element, index = divmod(k, width)
                    self.dangling(argno, _path(prefix, k, width, indexed, slots), freed,
                                  address + element * layout.size + slots[index].offset, value)
                continue
            if self._watch:
                element, index = divmod(k, width)
                self.cursors.append(Cursor(address + element * layout.size + slots[index].offset, value))
            if not owner.pinned:
                if lend is not None:
                    if owner not in lend:
                        lend.append(owner)
                    continue
                self.unpinned(argno, _path(prefix, k, width, indexed, slots), owner, holder)
            # Walk on, pinned or not: a dangling pointer further down is the worse bug.
            slot = slots[k % width]
            pointee = layout_of(slot.pointee) if slot.pointee is not None else None
            if pointee is not None and pointee.slots and pointee.size:
                fits = max(1, (owner.end - value) // pointee.size)
                path = _path(prefix, k, width, indexed, slots)
                self._walk(argno, value, pointee, fits, f"{path}->",
                           "pinned Python" if owner.pinned else "Python", depth + 1, lend, indexed=True)


def _quarantine_on() -> bool:
    """Whether the quarantine shadows lends now (it imports this module: read lazily)."""
    quarantine = sys.modules.get("ptrbridge.quarantine")
    return bool(quarantine is not None and quarantine._enabled)


_reported: set = set()
_reported_for: List[int] = [0]


def _record(check: CallCheck, kind: str, severity: str, rule: str, exc: BaseException, what: str,
            size: int, created_at: Optional[str], path: Optional[str], state: str) -> None:
    """Record one finding of an instrumented call, once per (kind, function, site, slot) per take()."""
    site = check.site()
    batch = id(getattr(findings, "_findings", None))  # take() starts a new list: report again
    if _reported_for[0] != batch:
        _reported.clear()
        _reported_for[0] = batch
    key = (kind, check.function, site, path)
    if key in _reported:
        return
    if len(_reported) < 10_000:
        _reported.add(key)
    findings.record(findings.Finding(
        kind=kind, severity=severity, rule=rule, message=str(exc), object=what, object_size=size,
        created_at=created_at, function=check.function, lent_at=site, holder=None, state=state,
        extra={"path": path} if path else {},
    ))


def _describer(obj: Any, size: int) -> Any:
    """What :func:`~ptrbridge.ownership.describe` says of ``obj``, as a function that does not hold it.

    The text is made when a report needs it, possibly after the object died;
    an ``ffi.from_buffer`` view is named by its source, which only its repr
    tells, so its text is made now.
    """
    if isinstance(obj, _FROMBUF_TYPE):
        return describe(obj, size)
    if isinstance(obj, ffi.CData):
        return functools.partial(cdata_text, ffi.typeof(obj), size)
    return functools.partial(type_text, type(obj), size)


def _path(prefix: str, k: int, width: int, indexed: bool, slots: Tuple[Slot, ...]) -> str:
    """The readable path of the k-th slot value of a walk (only built for messages)."""
    element, index = divmod(k, width)
    return f"{prefix}[{element}]{slots[index].path}" if indexed else f"{prefix}{slots[index].path}"


def caller_frame(depth: int) -> Any:
    """The frame ``depth`` levels above the caller of this function."""
    return sys._getframe(depth + 1)


def iter_slots(ctype: Any) -> Iterable[Slot]:
    """The pointer slots of a type (for tests and tools)."""
    layout = layout_of(ctype)
    return layout.slots if layout is not None else ()


def _in_c_heap_block(address: int) -> bool:
    """Whether ``address`` is inside a live block an interposed C library got from malloc.

    Blocks the interposer marks as Python memory (``ffi.new`` through
    ``_cffi_backend``) are Python's, so they do not count.
    """
    return bool(native.in_c_heap(address))


_ArrayType = array.array
native.owners_init(
    _NEVER_OWNING, ffi.CData, cdata_extent,
    (ctypes.Structure, ctypes.Union, ctypes.Array, _PointerBase, _SimpleBase), ctypes_extent,
    type(ctypes.byref(ctypes.c_int())), array.array,
)
