"""Quarantine: lend byte buffers as guard-paged shadow copies - a simulated moving collector.

CPython never moves objects, so a pointer C keeps to a lent buffer usually
"works" until the object is freed or reused, and the bug shows up far away.
With ``PTRBRIDGE_QUARANTINE=1`` (or :func:`set_quarantine`), a byte buffer
lent to a checked call is passed as a shadow copy placed against a guard
page; after the call the data is copied back (writable buffers only), the
shadow is made inaccessible and kept in a bounded FIFO.  A later access by C
faults, and a SIGSEGV handler writes an ASan-style report (the access with
the native backtrace, the Python stack of the lending call, where it was
released, a ``SUMMARY:`` line) to stderr before the process dies of the
signal as it would have.  C reading past the end of a buffer while it is
still lent hits the guard page and is reported as an overrun.

``PTRBRIDGE_QUARANTINE=1/N`` (or ``set_quarantine(sample=N)``) quarantines one
lend in N, chosen at random, like GWP-ASan: cheap enough for production, and
a lend that is not chosen is passed as it is.  Quarantine acts at check level
2 on every checked call, and at level 1 on the sampled ones.

What is shadowed is exactly the memory C treats as bytes:

* passed directly: ``bytes``, ``ffi.from_buffer`` views (bytearray, buffer
  exports), owning cdata arrays/pointers of primitive items (``char[]``,
  ``uint8_t[]``, ``int32_t[]``...); with ctypes, ``bytes``, ctypes arrays of
  simple types, ``byref()``/``pointer()`` of simple instances and ``POINTER``
  arguments to simple types whose target is a known Python buffer (numpy's
  ``arr.ctypes.data_as(...)``);
* reached through pointer slots of struct and array arguments in C memory
  (``iov_base``, ``z_stream.next_in``, ``msg_iov->iov_base``): the slot is
  pointed at the shadow for the call and translated back afterwards, so a
  pointer C advanced inside the shadow ends at the same offset in the original.
  A ``struct T *`` (argument or slot) reaches one T, an array cdata its
  elements: what a C block holds after the T is not read as more Ts (how
  many C reads is the API's business, an ``iovcnt``), so the buffers of
  ``iov[1..]`` in C memory are passed as they are, unquarantined.

Never moved: structs, unions, arrays of pointers, anything pinned (C may keep
a pinned buffer: that is what pinning is for), anything whose address C
may keep as identity (a ``z_stream``: zlib checks ``state->strm == strm``),
and an argument the call would refuse (it raises as it does without us).

The program sees the originals, not the shadows: pointers C returns into a
shadow, stores in an out-parameter or passes to a callback during the call
point into the original (:func:`translate`, :func:`callback_args`), and a
callback during the call sees the buffer as C has it (:func:`enter_call`).
C writing into the shadow of a ``bytes`` is an ``immutable-write`` error, and
the write reaches the object, as it would without the quarantine.

Kept reads.  A read of a closed shadow whose original is a ``bytes`` the heap
map has not seen freed is what C would have read from the original, which
CPython never moves or changes: correct there, against Go's R2 (python-
zstandard's dictionaries kept with ``ZSTD_dlm_byRef``).  The handler reopens
the shadow read-only, refilled from the original, records the report, and the
read goes on; :func:`take_kept_reads` (called by ``report.gather``) makes the
reports portability findings.  When the heap map's free hook sees the
``bytes`` freed, the shadow is closed again and a read is an error.  Without
the heap map (level 1 sampling) the slot holds one reference to the ``bytes``
instead (only up to 64 KiB, so holding is bounded), and it is alive while
anything else references it: a sampled lend closes the adopted shadows of
those the program let go of.  Mutable originals
and writes are always errors: C would go on with a copy that no longer matches.
"""
from __future__ import annotations

import ctypes
import os
import sys
import threading
import random
import dataclasses
import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from . import heapmap, ownership, scanning
from ._bindings import address_of, ffi, lib, native
from .callsite import frame_site
from .checking import CallCheck, Owner, Trap, layout_of, object_extent
from .findings import Finding, record
from .ownership import cdata_address, cdata_extent, ctypes_pointer_value, describe, lookup

__all__ = ["set_quarantine", "quarantine_enabled", "quarantine_sample", "shadow_arguments",
           "shadow_ctypes_arguments", "finish", "held", "due", "findings_from_report", "record_report",
           "set_report_log", "take_kept_reads", "ENV_VAR", "LOG_ENV_VAR"]

ENV_VAR = "PTRBRIDGE_QUARANTINE"
LOG_ENV_VAR = "PTRBRIDGE_QUARANTINE_LOG"  # a file that gets a copy of every fault report
_TRUE = ("1", "true", "yes", "on")
STACK_FRAMES = 8  # Python frames of the lending call kept for the report (as in csrc/pyquarantine.c)
_MAX_FIXUP_DEPTH = 3  # struct -> array of structs -> buffer (msghdr.msg_iov[i].iov_base)

# slot, copy-back address, keeper (object(s), slot fixups), shadow, size, the object's text,
# the original's address
Shadow = Tuple[int, Optional[int], Any, int, int, str, int]
Fixup = Tuple[int, int, int, int]  # slot address, shadow start, size, original start


def _parse(text: str) -> Tuple[bool, int]:
    """(enabled, sample) from the environment: ``1``, ``true``..., or ``1/N``."""
    value = text.strip().lower()
    if value in _TRUE:
        return True, 1
    if value.startswith("1/"):
        try:
            n = int(value[2:])
        except ValueError:
            n = 0
        if n >= 1:
            return True, n
    return False, 1


_enabled, _sample = _parse(os.environ.get(ENV_VAR, ""))
_log_path = os.environ.get(LOG_ENV_VAR)
_rng = random.Random()


def _arm() -> None:
    """Draw the next sampled lend: ``_tick()`` answers False for a random gap (mean N), then True.

    The countdown is in C (csrc/pycall.c), shared with the checked calls' C
    fast path, which draws there with no Python call; ``_tick`` reads the
    same countdown.  The sampled call re-arms it.
    """
    gap = 1 if _sample == 1 else _rng.randint(1, 2 * _sample - 1)  # as GWP-ASan draws its sampling interval
    native.sample_arm(_enabled, gap)


_tick: Callable[[], bool] = native.sample_tick
_arm()


def set_quarantine(on: bool = True, *, sample: Optional[int] = None) -> bool:
    """Turn quarantine on or off; ``sample=N`` quarantines one lend in N.  Returns the previous on/off.

    ``set_quarantine(True)`` (``sample=1``) shadows every lend at check level 2;
    ``set_quarantine(sample=1000)`` one lend in 1000 at random, at levels 1 and 2.
    """
    global _enabled, _sample
    if not isinstance(on, bool):
        raise TypeError(f"ptrbridge.set_quarantine: expected a bool, not {type(on).__name__}")
    if sample is not None and (not isinstance(sample, int) or isinstance(sample, bool) or sample < 1):
        raise ValueError(f"ptrbridge.set_quarantine: sample must be an int >= 1 (one lend in N), not {sample!r}")
    old, _enabled = _enabled, on
    if sample is not None:
        _sample = sample
    elif on:
        _sample = 1
    _arm()
    return old


def quarantine_enabled() -> bool:
    """True if lent buffers are passed as shadows (all of them, or one in :func:`quarantine_sample`)."""
    return _enabled


def quarantine_sample() -> int:
    """N of "one lend in N" (1: every lend)."""
    return _sample


def due() -> bool:
    """Whether the next lend is quarantined (always at ``sample=1``; one in N at random otherwise)."""
    if _tick():
        if _sample != 1:
            _arm()
        return True
    return False


def _always() -> bool:
    return True


_log_fd: Optional[int] = None


def set_report_log(path: Optional[str]) -> None:
    """Append a copy of every fault report to ``path`` (None: stderr only).

    The process dies of the signal right after a report, so this file is how a
    parent (the harness, a test runner) gets the report as findings: pass its
    text to :func:`record_report`.  ``PTRBRIDGE_QUARANTINE_LOG`` sets it at import.
    """
    global _log_fd
    new = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644) if path else -1
    old = lib.pb__quarantine_set_log_fd(new)
    if _log_fd is not None and old == _log_fd:
        os.close(old)
    _log_fd = new if new >= 0 else None


_SUMMARY = re.compile(r"^SUMMARY: ptrbridge: (use-after-release|overrun|use-after-free) \((\w+)\) in (.*?) on (.*) "
                      r"(?:lent|passed) to (\w+)\(\) at (.*)$", re.M)
_OBJECT_SIZE = re.compile(r"\((\d+)\)$")
_RULE = "="* 65


def findings_from_report(text: str) -> List[Finding]:
    """The quarantine reports in ``text`` (a dead process's stderr or report log) as findings."""
    out: List[Finding] = []
    for block in text.split(_RULE):
        match = _SUMMARY.search(block)
        if match is None:
            continue
        kind, access, where, obj, function, site = match.groups()
        size = _OBJECT_SIZE.search(obj)
        state = {"overrun": "lent", "use-after-free": "freed"}.get(kind, "returned")
        out.append(Finding(kind, "error", {"use-after-release": "R2"}.get(kind, kind),
                           block.strip(), object=obj, object_size=int(size.group(1)) if size else None,
                           function=function, lent_at=_site_name(site), holder=f"C code in {where}", state=state,
                           extra={"access": access}))
    return out


_KEPT_SUMMARY = re.compile(r"^SUMMARY: ptrbridge: kept-read \((\w+)\) in (.*?) on (.*) lent to "
                           r"(\w+)\(\) at (.*)$", re.M)
_kept_taken = 0


def _site_name(site: str) -> str:
    """``file.py:line`` of a report's ``/path/to/file.py:line``, as the other findings name call sites."""
    return os.path.basename(site)


def take_kept_reads() -> List[Finding]:
    """The kept reads since the last call, as portability findings (and the uses of traps, as errors).

    A kept read is C reading a closed shadow after the call that lent it
    returned while the original - a ``bytes`` - is alive: what C read is what
    the original holds, and CPython does not move it, so the program is
    correct there, but it breaks Go's rule R2 (a moving collector would break
    it).  The handler reopened the shadow and the read went on; it wrote the
    report into a ring of the last 16, which this turns into findings.
    """
    global _kept_taken
    total = int(lib.pb__quarantine_kept_reads())
    out: List[Finding] = []
    if total == _kept_taken:
        return out
    buf = ffi.new("char[]", 8192)
    for n in range(_kept_taken, total):
        length = int(lib.pb__quarantine_kept_read(n, buf, len(buf)))
        if length < 0:
            continue  # the ring moved on before it was taken
        text = ffi.string(buf, length).decode("utf-8", "replace").strip().strip("=").strip()
        match = _KEPT_SUMMARY.search(text)
        if match is None:
            # A trap C used during the call (freed memory a struct field points into): an error
            # the program survived.
            out.extend(dataclasses.replace(f, extra={**f.extra, "went_on": True})
                       for f in findings_from_report(text))
            continue
        access, where, obj, function, site = match.groups()
        size = _OBJECT_SIZE.search(obj)
        out.append(Finding("use-after-release", "portability", "R2", text, object=obj,
                           object_size=int(size.group(1)) if size else None, function=function,
                           lent_at=_site_name(site),
                           holder=f"C code in {where}", state="returned (object alive)",
                           extra={"access": access, "kept_read": True}))
    _kept_taken = total
    return out


def record_report(text: str) -> int:
    """Record every quarantine report in ``text`` with :func:`ptrbridge.findings.record`; returns how many."""
    found = findings_from_report(text)
    for finding in found:
        record(finding)
    return len(found)


def held() -> int:
    """Number of shadows currently quarantined (inaccessible)."""
    return int(lib.pb__quarantine_held())


def refresh_adopted() -> None:
    """Copy into the adopted shadows of live mutable buffers what the buffers hold now.

    C reads such a shadow in place of the object once it read it after the call
    that lent it (a kept read); a checked call that may run C code refreshes them
    first, so C sees the program's changes as of that call.  One C call, which
    returns at once until a mutable original has been adopted.
    """
    lib.pb__quarantine_refresh_adopted()


# ---------------------------------------------------------------------------
# One lend.  native.quarantine_lend (csrc/pyquarantine.c) takes the slot,
# copies the buffer and records the Python stack of the lending call as site
# ids, in one C call; the text of a stack frame is made once per call site
# (csrc/pysite.c), for the signal handler, which can only copy bytes.

# Flags of native.quarantine_lend(_arg); _QL_MUTABLE_BLOCK: the heap map watches the block of a
# mutable original, so that C reading its closed shadow while it lives is a kept read.
_QL_CHECK_PINNED, _QL_HELD, _QL_IMMUTABLE, _QL_WRITABLE, _QL_MUTABLE_BLOCK = 1, 2, 4, 8, 16


def _lend_one(address: int, size: int, original: Optional[bytes], mapped: bool, obj_text: str, function: str,
              frame: Any, check_pinned: bool = False) -> Optional[Tuple[int, int]]:
    """(slot, shadow address) of a new shadow, or None when no shadow is free (or, with
    ``check_pinned``, the buffer is pinned).

    ``original``: the ``bytes`` the buffer is the data of, else None.  A read
    of the closed shadow while it lives is a kept read (recorded, the read
    goes on).  With the heap map (``mapped``) its free is seen; without it the
    slot holds a reference to it, and it is alive while anything else has one.
    """
    if original is not None and not mapped and (size or len(original) + 1) > _HELD_MAX:
        original = None  # not held (it could stay alive until its slot is lent again): reads are errors
    flags = _QL_CHECK_PINNED if check_pinned else 0
    if original is not None:
        flags |= _QL_IMMUTABLE if mapped else _QL_IMMUTABLE | _QL_HELD
    elif mapped:
        flags |= _QL_MUTABLE_BLOCK
    lent_one: Optional[Tuple[int, int]] = native.quarantine_lend(original, address, size, flags, obj_text,
                                                                 function, frame)
    if lent_one is None:
        return None
    if original is not None and not mapped:
        _held[lent_one[0]] = original
    elif _held:
        _held.pop(lent_one[0], None)
    return lent_one


_held: Dict[int, bytes] = {}  # slot -> the bytes its shadow copies, while no heap map sees frees
_HELD_MAX = 64 << 10  # bytes held that way are at most a pool slot each: a few MiB over every slot


def _release_dropped() -> None:
    """Close again the adopted shadows whose held ``bytes`` only ptrbridge still references.

    Run at sampled lends once there are kept reads: the program let go of the
    object, so a read by C from now on is a use after free.
    """
    for slot in [k for k in _held if sys.getrefcount(_held[k]) <= 2]:  # _held's and the argument's
        if lib.pb__quarantine_adopted(slot):
            original = _held.pop(slot)
            lib.pb__quarantine_owner_freed_slow(id(original))


def _pinned(address: int) -> bool:
    region = lookup(address)
    return region is not None and region.kind == "pinned"


# ---------------------------------------------------------------------------
# cffi

_BYTE_ITEM_KINDS = ("primitive",)


def _source(arg: Any) -> Optional[Tuple[Any, int, int, bool]]:
    """(keeper, address, size, writable) of a directly passed byte buffer, or None."""
    if type(arg) is bytes:
        # cffi passes bytes as a NUL-terminated char *: the shadow keeps the NUL.
        keeper = ffi.from_buffer(arg)
        return keeper, address_of(keeper), len(arg) + 1, False
    if isinstance(arg, ffi.CData):
        ctype = ffi.typeof(arg)
        if ctype.kind not in ("pointer", "array") or ctype.item.kind not in _BYTE_ITEM_KINDS:
            return None  # a struct (identity), an array of pointers, void *, a function
        extent = cdata_extent(arg)
        if extent is None or _pinned(extent[0]):
            return None
        return arg, extent[0], extent[1], True
    return None


class _Classifier:
    """Who owns a slot's target: the lent owners the check found, else the check's own classification."""

    def __init__(self, owners: Sequence[Owner], function: str, frame: Any, args: Sequence[Any]) -> None:
        self.owners = list(owners)
        self._function, self._frame, self._args = function, frame, args
        self._check: Optional[CallCheck] = None

    def owner(self, value: int) -> Optional[Owner]:
        for known in self.owners:
            if known.start <= value <= known.start + known.size:
                return known if _movable(known) else None
        if self._check is None:
            # Memory the argument check does not walk (C memory reached from C
            # memory: msghdr.msg_iov[i].iov_base): classify it the same way.
            self._check = CallCheck(self._function, self._frame, self._args)
        owner = self._check.classify(value)
        if owner is None or owner.pinned:
            return None
        self.owners.append(owner)
        return owner if _movable(owner) else None


def _movable(owner: Owner) -> bool:
    """Whether a buffer C reaches through a pointer slot may be moved for the call.

    Only a Python buffer object known by name (an argument, a caller's local,
    ``ptrbridge.new``): not a block the heap map found (it may be a PyObject a
    ``void *`` carries as identity, such as ``ffi.new_handle``), not a struct.
    """
    if owner.pinned or owner.origin == "found by the level-2 heap map":
        return False
    text = owner.description
    return not (text.startswith("cdata '") and ("struct " in text or "union " in text))


def _collect_fixups(address: int, ctype: Any, count: int, owners: _Classifier, depth: int,
                    found: List[Tuple[int, Owner]], seen: set) -> None:
    """Pointer slots of ``count`` objects of ``ctype`` at ``address`` that point into a lent owner."""
    layout = layout_of(ctype)
    if layout is None or not layout.slots or depth > _MAX_FIXUP_DEPTH or (address, id(layout)) in seen:
        return
    seen.add((address, id(layout)))
    slots = layout.slots
    width = len(slots)
    for k, value in enumerate(layout.read_array(address, min(count, 4096 // width or 1))):
        if not value:
            continue
        element, index = divmod(k, width)
        slot = slots[index]
        slot_address = address + element * layout.size + slot.offset
        pointee = slot.pointee
        pointee_kind = getattr(pointee, "kind", None) if pointee is not None else "void"
        if pointee_kind in ("primitive", "void"):
            owner = owners.owner(value)
            if owner is not None:
                found.append((slot_address, owner))
            continue
        if pointee_kind in ("struct", "union", "array"):
            # Follow into C memory (or pinned Python memory) that holds more slots:
            # one T, and only where the whole T is inside memory known to hold it.
            try:
                step = ffi.sizeof(pointee)
            except ffi.error:
                continue  # opaque: nothing to look into
            if step and _holds(value, step):
                _collect_fixups(value, pointee, 1, owners, depth + 1, found, seen)


def _holds(address: int, size: int) -> bool:
    """Whether ``size`` bytes at ``address`` lie inside a tracked C block starting there, or a pin."""
    block = int(lib.pb__alloc_block_size(address))
    if block:
        return size <= block
    region = lookup(address)
    return region is not None and region.kind == "pinned" and address + size <= region.start + region.size


class _Use:
    """One way C reaches a buffer in this call: an argument, or a pointer slot in C memory."""

    __slots__ = ("start", "size", "writable", "keeper", "text", "arg", "target", "slot", "immutable")

    def __init__(self, start: int, size: int, writable: bool, keeper: Any, text: str, arg: int = -1,
                 target: Any = None, slot: int = 0, immutable: Optional[bytes] = None) -> None:
        self.start, self.size, self.writable, self.keeper, self.text = start, size, writable, keeper, text
        self.arg, self.target, self.slot = arg, target, slot  # argument index and type, or slot address
        self.immutable = immutable  # the bytes this is the data of, else None


def _lend_uses(uses: List[_Use], function: str, frame: Any, draw: Callable[[], bool],
               new_args: List[Any], shadows: List[Shadow]) -> None:
    """Lend one shadow per group of overlapping uses, and point every use of it at the shadow.

    Two arguments that view one buffer (``memmove(b, b + 1)``), or an argument
    and a struct slot reaching the same buffer, see one shadow: C sees the
    same aliasing as without quarantine, and one copy-back ends the call.
    """
    groups: List[List[_Use]] = []
    if len(uses) == 1:
        groups.append(uses)
    else:
        uses.sort(key=lambda u: u.start)
        end = -1
        for use in uses:
            if groups and use.start < end:
                groups[-1].append(use)
                end = max(end, use.start + use.size)
            else:
                groups.append([use])
                end = use.start + use.size
    if _held and lib.pb__quarantine_kept_reads():
        _release_dropped()
    mapped: Optional[bool] = None  # the heap map is on (level 2): frees are seen, lends are remembered
    for group in groups:
        if not draw():
            continue
        if mapped is None:
            mapped = heapmap.installed()
        start = group[0].start
        if len(group) == 1:
            size, text = group[0].size, group[0].text
        else:
            size = max(u.start + u.size for u in group) - start
            text = max(group, key=lambda u: u.size).text
        lent_one = _lend_one(start, size, _immutable_original(group), mapped, text, function, frame)
        if lent_one is None:
            continue  # no free shadow: pass the buffers themselves, unquarantined
        slot, shadow = lent_one
        if mapped:
            # The original, for the heap map's later use-after-free reports (file.py:line as
            # other findings show it).  Without the heap map nothing would read it.
            scanning.remember_lend(start, size, text, function, frame_site(frame))
        fixups: List[Fixup] = []
        for use in group:
            if use.arg >= 0:
                new_args[use.arg] = _pointing(use.target, shadow + (use.start - start))
            else:
                cell = ffi.cast("uintptr_t *", use.slot)
                cell[0] = shadow + (int(cell[0]) - start)
                fixups.append((use.slot, shadow, size, start))
        writable = any(u.writable for u in group)
        shadows.append((slot, start if writable else None, ([u.keeper for u in group], tuple(fixups)), shadow,
                        size, text, start))


def _immutable_original(group: List[_Use]) -> Optional[bytes]:
    """The ``bytes`` every use of the group views, else None.

    A read of its closed shadow while it lives is what C would read from the
    original on CPython (a kept read: recorded, the read goes on); once it is
    freed a read is an error.
    """
    original = group[0].immutable
    if original is None or any(u.immutable is not original for u in group):
        return None
    return original


def _pointing(target: Any, address: int) -> Any:
    """An argument of type ``target`` (a cffi CType or a callable) for ``address``."""
    if isinstance(target, ffi.CType):
        return ffi.cast(target, address)
    return target(address)


_address: Callable[[Any], int] = ownership._fast_address or cdata_address  # no Python frame when it can
_OWN_CDATA: Any = type(ffi.new("char[]", 1))  # as ownership._CDATA_OWNING
_FROMBUF_CDATA: Any = type(ffi.from_buffer(b""))
_SKIP, _DIRECT, _FULL = 0, 1, 2
# ctype of a cdata argument -> (what it is, size of a pointer's item): _DIRECT a
# pointer or array of primitive items (its own memory, if it owns any: bytes to
# shadow), _SKIP a pointer or array that reaches nothing to shadow, _FULL one
# the full path looks into (structs, unions, arrays: pointer slots).
_cdata_kinds: Dict[Any, Tuple[int, int]] = {}
_shadow_types: Dict[Any, Any] = {}  # parameter ctype -> the type a shadow is passed as


def _cdata_kind(ctype: Any) -> Tuple[int, int]:
    found = _cdata_kinds.get(ctype)
    if found is None:
        found = (_SKIP, 0)
        if ctype.kind in ("pointer", "array"):
            item = ctype.item.kind
            if item in _BYTE_ITEM_KINDS:
                found = (_DIRECT, ffi.sizeof(ctype.item) if ctype.kind == "pointer" else 0)
            elif item in ("struct", "union", "array"):
                found = (_FULL, 0)
        if len(_cdata_kinds) < 4096:
            _cdata_kinds[ctype] = found
    return found


def _shadow_type(param: Any) -> Any:
    target = _shadow_types.get(param)
    if target is None:
        target = param if param.kind == "pointer" else ffi.typeof(ffi.getctype(param.item, "*"))
        if len(_shadow_types) < 4096:
            _shadow_types[param] = target
    return target


_bytes_params: Dict[Any, bool] = {}  # parameter ctype -> whether a call takes a bytes for it


def _call_accepts(param: Any, arg: Any) -> bool:
    """Whether the call itself takes ``arg`` for the pointer parameter ``param``.

    A shadow is cast to the parameter's type, which cffi then takes whatever
    the original was: a wrong argument (an ``int *`` for a ``char *``, a bytes
    for an ``int *``) is passed unshadowed instead, so that the call fails as
    it does without the quarantine.  cdata are judged by cffi's own
    conversion; a bytes by cffi's rule for it (``void *`` and pointers to
    one-byte integers, not ``_Bool``, whose conversion checks each byte).
    """
    if type(arg) is bytes:
        accepted = _bytes_params.get(param)
        if accepted is None:
            item = _shadow_type(param).item
            accepted = item.kind == "void" or (
                item.kind == "primitive" and ffi.sizeof(item) == 1 and item.cname != "_Bool")
            if len(_bytes_params) < 4096:
                _bytes_params[param] = accepted
        return accepted
    if not isinstance(arg, ffi.CData):
        return True  # a buffer object: as the full path found it (bytearray for char *)
    try:
        return bool(native.pointer_accepts(_shadow_type(param), arg))
    except Exception:  # a released cdata, say: passed as it is, the call raises what it raises
        return False


def shadow_arguments(args: Tuple[Any, ...], params: Sequence[Tuple[int, Any]], function: str,
                     frame: Any, lent: Sequence[Any] = (), sampled: bool = False
                     ) -> Tuple[Tuple[Any, ...], List[Shadow]]:
    """Replace lent byte buffers by shadows, and set the argument check's traps (:func:`set_traps`).

    Returns the new arguments and what to :func:`finish`; see :func:`_shadow_lends`.
    """
    new_args, shadows = _shadow_lends(args, params, function, frame, lent, sampled)
    if lent and any(type(item) is Trap for item in lent):
        shadows += set_traps(lent, function, frame)
    return new_args, shadows


def set_traps(lent: Sequence[Any], function: str, frame: Any) -> List[Shadow]:
    """Point each dangling struct field the check found (a :class:`~ptrbridge.checking.Trap`)
    at a closed region standing for the freed memory, for the call; what to :func:`finish`.

    C using the field during the call faults there and is reported as a use after free (the
    process ends, as with ASan); a field C leaves alone is a stale pointer: a portability
    finding, and :func:`finish` points it back at the freed address.  With no trap to spare
    the error is recorded at once, as without the quarantine.
    """
    shadows: List[Shadow] = []
    for trap in lent:
        if type(trap) is not Trap:
            continue
        cell = ffi.cast("uintptr_t *", trap.slot)
        if int(cell[0]) != trap.value:
            continue  # two paths reached the same field: set once
        made = native.quarantine_trap(trap.size, trap.text, function, frame)
        if made is None:
            trap.error()
            continue
        slot, region = made
        cell[0] = region + (trap.value - trap.start)
        shadows.append((slot, None, ((), ((trap.slot, region, trap.size, trap.start),)), region, trap.size,
                        trap.text, trap.start))
        trap.suspect()
    return shadows


def _shadow_lends(args: Tuple[Any, ...], params: Sequence[Tuple[int, Any]], function: str,
                  frame: Any, lent: Sequence[Any] = (), sampled: bool = False
                  ) -> Tuple[Tuple[Any, ...], List[Shadow]]:
    """Replace lent byte buffers by shadows; returns the new arguments and what to :func:`finish`.

    ``lent`` is what the argument check found lent through C memory
    (:class:`~ptrbridge.checking.Owner` records): those buffers are shadowed
    in place, through the pointer slots that reach them.  ``sampled``: the
    caller already drew this call (:func:`due`), shadow every buffer of it.

    The usual call passes its buffers directly (``bytes``, a ``from_buffer``
    view, a ``char[]``): one C call per buffer lends it.  Struct arguments
    whose pointer slots reach buffers, buffers of ``ptrbridge.new`` reached
    through non-owning pointers, and two buffers that overlap take the full
    path (:func:`_shadow_arguments_full`).
    """
    if sampled:
        _arm()
    refresh_adopted()
    direct: List[Tuple[int, Any, int, int, Any]] = []  # index, arg, address (0: a bytes), size, parameter ctype
    for i, param in params:
        if i >= len(args):
            break
        arg = args[i]
        kind = type(arg)
        if kind is bytes:
            if _call_accepts(param, arg):
                direct.append((i, arg, 0, len(arg) + 1, param))
        elif kind is _OWN_CDATA or kind is _FROMBUF_CDATA:
            ctype = ffi.typeof(arg)
            what, item_size = _cdata_kinds.get(ctype) or _cdata_kind(ctype)
            if what == _DIRECT:
                if _call_accepts(param, arg):
                    direct.append((i, arg, _address(arg), item_size or ffi.sizeof(arg), param))
            elif what == _FULL:
                return _shadow_arguments_full(args, params, function, frame, lent, sampled)
        elif isinstance(arg, ffi.CData):
            if ownership._managed or _cdata_kind(ffi.typeof(arg))[0] == _FULL:
                return _shadow_arguments_full(args, params, function, frame, lent, sampled)
    if not direct:
        return args, []
    if len(direct) > 1 and _overlapping(direct):
        return _shadow_arguments_full(args, params, function, frame, lent, sampled)
    if _held and lib.pb__quarantine_kept_reads():
        _release_dropped()
    mapped = lib.pb__heapmap_installed()
    new_args = list(args)
    shadows: List[Shadow] = []
    for i, arg, address, size, param in direct:
        if not sampled and not _tick():
            continue
        if _sample != 1 and not sampled:
            _arm()  # as due() does: the next draw
        if address:
            text, held = describe(arg, size), False
            flags = _QL_CHECK_PINNED | _QL_WRITABLE | _QL_MUTABLE_BLOCK if mapped else _QL_CHECK_PINNED | _QL_WRITABLE
        else:  # a bytes: described by its length, as everywhere; the shadow also holds the NUL
            text, held = f"bytes({size - 1})", not mapped and size <= _HELD_MAX
            flags = (_QL_IMMUTABLE | _QL_HELD if held else _QL_IMMUTABLE) if mapped or held else 0
        target = _shadow_types.get(param) or _shadow_type(param)
        lent_one = native.quarantine_lend_arg(arg, address, size, flags, text, function, frame, target)
        if lent_one is None:
            continue  # pinned, or no free shadow: passed as it is, unquarantined
        new_arg, shadow_record = lent_one
        if held:
            _held[shadow_record[0]] = arg
        elif _held:
            _held.pop(shadow_record[0], None)
        if mapped:
            for known in lent:
                if known is arg:
                    break
            else:
                # The original, for the heap map's later use-after-free reports (a level-2
                # call's own lend records what it lent: calls._return_lent).
                start = address or address_of(ffi.from_buffer(arg))
                scanning.remember_lend(start, size, text, function, frame_site(frame))
        new_args[i] = ffi.cast(target, shadow_record[3]) if new_arg is None else new_arg
        shadows.append(shadow_record)
    return tuple(new_args), shadows


def _overlapping(direct: List[Tuple[int, Any, int, int, Any]]) -> bool:
    """Whether two of the directly passed buffers overlap (they then share one shadow)."""
    extents = sorted((address or address_of(ffi.from_buffer(arg)), size) for _i, arg, address, size, _p in direct)
    return any(extents[k][0] < extents[k - 1][0] + extents[k - 1][1] for k in range(1, len(extents)))


def _shadow_arguments_full(args: Tuple[Any, ...], params: Sequence[Tuple[int, Any]], function: str,
                           frame: Any, lent: Sequence[Any], sampled: bool) -> Tuple[Tuple[Any, ...], List[Shadow]]:
    """:func:`shadow_arguments` for every kind of argument (``_arm`` already done)."""
    new_args = list(args)
    shadows: List[Shadow] = []
    uses: List[_Use] = []
    owners = _Classifier([o for o in lent if isinstance(o, Owner) and not o.pinned], function, frame, args)
    for i, param in params:
        if i >= len(args):
            break
        arg = args[i]
        source = _source(arg)
        if source is None:
            if isinstance(arg, ffi.CData):
                _slot_uses(arg, owners, uses)
            continue
        if not _call_accepts(param, arg):
            continue  # the call raises on it, as without the quarantine
        keeper, address, size, writable = source
        target = param if param.kind == "pointer" else ffi.typeof(ffi.getctype(param.item, "*"))
        # bytes: described by its length, as everywhere else; the shadow also holds the NUL
        text = describe(arg, len(arg) if type(arg) is bytes else size)
        uses.append(_Use(address, size, writable, keeper, text, i, target,
                         immutable=arg if type(arg) is bytes else None))
    if uses:
        _lend_uses(uses, function, frame, _always if sampled else due, new_args, shadows)
    return tuple(new_args), shadows


def _slot_uses(arg: Any, owners: _Classifier, uses: List[_Use]) -> None:
    """The lent buffers that pointer slots of a struct argument (in C memory) reach."""
    ctype = ffi.typeof(arg)
    if ctype.kind not in ("pointer", "array") or ctype.item.kind not in ("struct", "union", "array"):
        return
    try:
        # sizeof first: reading .fields of an opaque struct of an API-mode
        # module aborts inside cffi (brotlicffi's BrotliEncoderState).
        step = ffi.sizeof(ctype.item)
    except ffi.error:
        return  # opaque (sqlite3 *): nothing to look into
    if layout_of(ctype.item) is None:
        return
    address = address_of(arg)
    if not address or not step:
        return
    # A T * is one T, whatever the block it points into holds after it (a batch
    # header followed by result slots, say): how many Ts C reads there is the
    # API's business (an iovcnt), and reading the rest of the block as Ts
    # follows words that are no pointers.  An array's type says its length.
    count = len(arg) if ctype.kind == "array" else 1
    found: List[Tuple[int, Owner]] = []
    _collect_fixups(address, ctype.item, count, owners, 0, found, set())
    for slot_address, owner in found:
        uses.append(_Use(owner.start, owner.size, True, None, owner.description, slot=slot_address))


# ---------------------------------------------------------------------------
# ctypes

_CArgObject = type(ctypes.byref(ctypes.c_int()))
_SimpleCData = ctypes._SimpleCData  # type: ignore[attr-defined]
_PointerBase = ctypes._Pointer  # type: ignore[attr-defined]
_POINTER_SIMPLE = (ctypes.c_char_p, ctypes.c_void_p, ctypes.c_wchar_p)
# ctypes out-parameters whose pointer slots translate() looks at
_CTYPES_OUT = (ctypes.Structure, ctypes.Union, ctypes.Array, _PointerBase) + _POINTER_SIMPLE


def _simple(t: Any) -> bool:
    """A ctypes simple type that is not itself a pointer (c_char, c_uint8, c_double...)."""
    return isinstance(t, type) and issubclass(t, _SimpleCData) and not issubclass(t, _POINTER_SIMPLE)


def _byte_array(t: Any) -> bool:
    while isinstance(t, type) and issubclass(t, ctypes.Array):
        t = t._type_
    return _simple(t)


def _pointer_target(ptr: Any, lent: Sequence[Any]) -> Optional[Tuple[Any, int, int, int]]:
    """(keeper, start, size, offset) of the Python buffer a POINTER(simple) points into, or None.

    The buffer is the one the pointer keeps alive (numpy's ``data_as`` keeps
    the array in ``_arr``, ``ctypes.cast`` in ``_objects``) or one the argument
    check found lent (an :class:`~ptrbridge.checking.Owner`).
    """
    target = ctypes_pointer_value(ptr)
    if not target:
        return None
    candidates: List[Any] = []
    arr = getattr(ptr, "_arr", None)  # numpy's arr.ctypes.data_as() keeps the array here
    if arr is not None:
        candidates.append(arr)
    kept = getattr(ptr, "_objects", None)
    stack: List[Any] = [kept] if kept else []
    while stack and len(candidates) < 16:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif item is not None:
            candidates.append(item)
            inner = getattr(item, "_objects", None)
            if inner:
                stack.append(inner)
    for obj in candidates:
        if isinstance(obj, (ctypes.Structure, ctypes.Union)) or (
            isinstance(obj, ctypes.Array) and not _byte_array(type(obj))
        ):
            continue
        extent = object_extent(obj)
        if extent is not None and extent[0] <= target < extent[0] + extent[1]:
            if _pinned(extent[0]):
                return None
            return obj, extent[0], extent[1], target - extent[0]
    for owner in lent:
        if isinstance(owner, Owner) and not owner.pinned and owner.start <= target < owner.start + owner.size:
            return owner, owner.start, owner.size, target - owner.start
    return None


def _ctypes_converter(declared: Any, obj: Any, offset: int) -> Callable[[int], Any]:
    """How to pass ``address + offset`` for a parameter declared ``declared`` (None: undeclared)."""
    if isinstance(declared, type) and issubclass(declared, _PointerBase):
        return lambda a: ctypes.cast(ctypes.c_void_p(a + offset), declared)
    if isinstance(obj, _PointerBase) and declared is None:
        kind = type(obj)
        return lambda a: ctypes.cast(ctypes.c_void_p(a + offset), kind)
    if declared is ctypes.c_char_p:
        return lambda a: ctypes.c_char_p(a + offset)
    return lambda a: ctypes.c_void_p(a + offset)


def _ctypes_accepts(declared: Any, arg: Any) -> bool:
    """Whether ctypes converts ``arg`` for an argument declared ``declared`` (its ``from_param``).

    The shadow is passed in a form the declared type takes: a wrong argument
    is passed as it is instead, so that the call raises what it raises
    without the quarantine (:func:`_call_accepts` for cffi).
    """
    from_param = getattr(declared, "from_param", None)
    if from_param is None:
        return True  # not a ctypes type: ctypes raises on the argtypes themselves, shadowed or not
    try:
        from_param(arg)
    except Exception:
        return False
    return True


def shadow_ctypes_arguments(args: Tuple[Any, ...], argtypes: Sequence[Any], function: str,
                            frame: Any, lent: Sequence[Any] = (), sampled: bool = False
                            ) -> Tuple[Tuple[Any, ...], List[Shadow]]:
    """The ctypes edition of :func:`shadow_arguments`."""
    new_args, shadows = _shadow_ctypes_lends(args, argtypes, function, frame, lent, sampled)
    if lent and any(type(item) is Trap for item in lent):
        shadows += set_traps(lent, function, frame)
    return new_args, shadows


def _shadow_ctypes_lends(args: Tuple[Any, ...], argtypes: Sequence[Any], function: str,
                         frame: Any, lent: Sequence[Any] = (), sampled: bool = False
                         ) -> Tuple[Tuple[Any, ...], List[Shadow]]:
    """:func:`shadow_ctypes_arguments` for the lent buffers."""
    if sampled:
        _arm()
    refresh_adopted()
    new_args = list(args)
    shadows: List[Shadow] = []
    uses: List[_Use] = []
    for i, arg in enumerate(args):
        declared = argtypes[i] if i < len(argtypes) else None
        obj = getattr(arg, "_obj") if isinstance(arg, _CArgObject) else arg
        offset = 0
        if type(obj) is bytes:
            keeper: Any = ffi.from_buffer(obj)
            address, size, writable = address_of(keeper), len(obj) + 1, False
        elif isinstance(obj, ctypes.Array) and _byte_array(type(obj)):
            keeper, address, size, writable = obj, ctypes.addressof(obj), ctypes.sizeof(obj), True
        elif isinstance(obj, _SimpleCData) and obj is not arg and _simple(type(obj)):
            keeper, address, size, writable = obj, ctypes.addressof(obj), ctypes.sizeof(obj), True
        elif isinstance(obj, _PointerBase) and _simple(obj._type_):
            found = _pointer_target(obj, lent)
            if found is None:
                continue
            keeper, address, size, offset = found
            writable = True
        else:
            continue  # structs (identity), by-value values, raw addresses: not moved
        if declared is not None and not _ctypes_accepts(declared, arg):
            continue  # the call raises on it (ctypes' own conversion), as without the quarantine
        if _pinned(address):
            continue
        if isinstance(keeper, Owner):
            text = keeper.description
        elif type(obj) is bytes:
            text = describe(obj, len(obj))
        else:
            text = describe(keeper if isinstance(obj, _PointerBase) else obj, size)
        uses.append(_Use(address, size, writable, keeper, text, i, _ctypes_converter(declared, obj, offset),
                         immutable=obj if type(obj) is bytes else None))
    if uses:
        _lend_uses(uses, function, frame, _always if sampled else due, new_args, shadows)
    return tuple(new_args), shadows


# The shadows of the quarantined calls in flight on this thread, innermost last, as _Span
# lists: a Python callback C calls during one of them sees (and changes) the originals, and
# gets its pointer arguments into them translated (see enter_call).
_in_flight = threading.local()


def enter_call(shadows: List[Shadow]) -> bool:
    """Before a quarantined call: callbacks during it see the buffers as C has them.

    Without the quarantine a callback that reads the buffer C is filling
    (a progress callback) sees what C wrote so far, and what it writes C
    sees.  With it, C works on the shadow: :func:`callback_entered` copies
    each writable shadow to its original when a callback starts and
    :func:`callback_left` copies it back when the callback returns.  True:
    call :func:`leave_call` after the call.
    """
    if not shadows:
        return False
    stack = getattr(_in_flight, "stack", None)
    if stack is None:
        stack = _in_flight.stack = []
    stack.append(_spans(shadows))
    return True


def _spans(shadows: List[Shadow]) -> List[_Span]:
    return [(record[6], record[3], record[4], record[1] is not None) for record in shadows]


def leave_call(entered: bool) -> None:
    """After the call :func:`enter_call` was told of."""
    if entered:
        _in_flight.stack.pop()


_Span = Tuple[int, int, int, bool]  # original, shadow, size, writable


def callback_entered() -> Optional[List[_Span]]:
    """A Python callback starts: copy this thread's in-flight writable shadows to their originals."""
    stack = getattr(_in_flight, "stack", None)
    if not stack:
        return None
    spans = [span for frame in stack for span in frame]
    for origin, shadow, size, writable in spans:
        if writable:
            ctypes.memmove(origin, shadow, size)
    return spans


def callback_args(args: Tuple[Any, ...], spans: Optional[List[_Span]]) -> Tuple[Any, ...]:
    """A callback's pointer arguments into an in-flight shadow, pointing into the original instead.

    C hands callbacks pointers into the buffer it works on (a tokenizer's
    ``on_token(start, len)``): the program computes ``start - text`` and reads
    there, as it would without the quarantine.
    """
    if not spans:
        return args
    items: Optional[List[Any]] = None
    for i, arg in enumerate(args):
        if isinstance(arg, ffi.CData):
            ctype = ffi.typeof(arg)
            if ctype.kind != "pointer":
                continue
            value = address_of(arg)
        elif isinstance(arg, _PointerBase):
            value = ctypes_pointer_value(arg)
        else:
            continue
        moved = _into_original(value, spans)
        if moved is not None:
            if items is None:
                items = list(args)
            items[i] = ffi.cast(ctype, moved) if isinstance(arg, ffi.CData) else ctypes.cast(
                ctypes.c_void_p(moved), type(arg))
    return args if items is None else tuple(items)


def _into_original(value: int, spans: List[_Span]) -> Optional[int]:
    """``value`` moved from inside a shadow (or one past its end) to the same offset in its original."""
    for origin, shadow, size, _writable in spans:
        if shadow <= value <= shadow + size:
            return origin + (value - shadow)
    return None


def callback_left(spans: Optional[List[_Span]]) -> None:
    """The callback returned: what it left in the originals is what C sees on."""
    if spans:
        for origin, shadow, size, writable in spans:
            if writable:
                ctypes.memmove(shadow, origin, size)


def translate(result: Any, args: Sequence[Any], shadows: List[Shadow], pointer_result: bool = False) -> Any:
    """Pointers C made into a shadow during the call point into the original afterwards.

    C returns pointers into its input (``strchr``, ``memchr``, ``strstr``)
    and stores them in out-parameters (``strtol``'s ``char **endptr``): with
    the buffer shadowed they point into the shadow, which the program would
    do arithmetic on (``end - text``) and read after the shadow is closed.
    The result (a cffi pointer, a ctypes pointer, or an int when
    ``pointer_result``: ctypes' ``c_void_p`` restype) and the pointer slots of
    the Python-owned out-parameters among ``args`` (cffi ``ffi.new`` memory;
    ctypes instances, and what a ``byref()`` refers to) that point into a
    shadow, or one past its end, are moved to the same offset in the
    original.  Returns the result.
    """
    spans = _spans(shadows)

    def back(value: int) -> Optional[int]:
        return _into_original(value, spans)

    for arg in args:
        if type(arg) is _OWN_CDATA:
            ctype = ffi.typeof(arg)
            if ctype.kind not in ("pointer", "array"):
                continue
            layout = layout_of(ctype.item)
            count = len(arg) if ctype.kind == "array" else 1
            address = address_of(arg)
        else:
            obj = getattr(arg, "_obj") if type(arg) is _CArgObject else arg
            if not isinstance(obj, _CTYPES_OUT):
                continue
            layout, count, address = layout_of(type(obj)), 1, ctypes.addressof(obj)
        if layout is None or not layout.slots or not layout.size:
            continue
        for element in range(min(count, 4096)):
            for slot in layout.slots:
                cell = ffi.cast("uintptr_t *", address + element * layout.size + slot.offset)
                moved = back(int(cell[0])) if cell[0] else None
                if moved is not None:
                    cell[0] = moved
    if isinstance(result, ffi.CData):
        ctype = ffi.typeof(result)
        if ctype.kind == "pointer" and type(result) not in (_OWN_CDATA, _FROMBUF_CDATA):
            moved = back(address_of(result))
            if moved is not None:
                return ffi.cast(ctype, moved)
    elif pointer_result and type(result) is int:
        moved = back(result)
        if moved is not None:
            return moved
    elif isinstance(result, (_PointerBase, ctypes.c_void_p)):
        value = ctypes.c_void_p.from_address(ctypes.addressof(result)).value or 0
        moved = back(value)
        if moved is not None:
            return ctypes.cast(ctypes.c_void_p(moved), type(result))
    return result


def finish(shadows: List[Shadow], function: str = "", frame: Any = None) -> None:
    """After the call: translate repointed slots back, copy writable data back, quarantine the shadows.

    ``function`` and ``frame`` (the call's) name the call in the error when C
    wrote into the shadow of a ``bytes`` (:func:`_wrote_immutable`).
    """
    for slot, copy_back, keeper, _shadow, size, text, _origin in shadows:
        for slot_address, shadow, fixed_size, start in keeper[1]:
            cell = ffi.cast("uintptr_t *", slot_address)
            value = int(cell[0])
            if shadow <= value <= shadow + fixed_size:
                cell[0] = start + (value - shadow)  # C advanced it inside the shadow: same offset
        if lib.pb__quarantine_finish_at(slot, copy_back or 0) == lib.PB_QUARANTINE_WROTE_IMMUTABLE:
            _wrote_immutable(text, size, function, frame)


def _wrote_immutable(text: str, size: int, function: str, frame: Any) -> None:
    """C changed a ``bytes`` it was lent: an error (the change reached the object, as without the quarantine)."""
    what = text.split(" lent to ")[0]
    site = frame_site(frame) if frame is not None else "<unknown>:0"
    call = f"{function}() at {site}" if function else "a checked call"
    message = (
        f"ptrbridge: C wrote into an immutable object: {what} passed to {call} was changed by C during "
        f"the call. CPython shares bytes objects (constants, interned and cached values), so the write "
        f"corrupts every user of that object; it went through, as without ptrbridge. Give C a buffer it "
        f"may write (a bytearray, ffi.new(\"char[]\", n), ctypes.create_string_buffer)\n"
        f"SUMMARY: ptrbridge: immutable-write {what} passed to {call}"
    )
    record(Finding("immutable-write", "error", "immutable", message, object=what, object_size=size,
                   function=function or None, lent_at=site, state="lent"))


if _log_path:
    set_report_log(_log_path)
