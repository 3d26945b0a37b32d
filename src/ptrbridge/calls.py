"""Checked calls: ``ptrbridge.wrap(lib)`` enforces the pointer rules on every call.

``wrap`` takes a cffi API-mode ``lib``, a cffi ABI-mode ``ffi.dlopen`` library
or a ``ctypes.CDLL`` and returns an object whose function attributes are
checked versions of the library's functions, with the same signature; other
attributes (constants, types, variables) pass through.

At check level 0 a function without an error convention or thread model *is*
the raw function.  At level 1 each call

1. finds the arguments that point into Python-owned memory,
2. walks the memory they point to by its C type and raises
   :class:`~ptrbridge.NestedPointerError` (rule R1) or
   :class:`~ptrbridge.UseAfterFreeError`, see :mod:`ptrbridge.checking`,
3. calls the C function, watched by the R3 watchdog while it holds lent memory,
4. re-raises an exception that a ``ptrbridge.callback`` raised during the call,
5. applies the declared error convention (``errcheck``).

Example::

    z = ptrbridge.wrap(zlib_lib, errcheck={"deflate": "negative"},
                       error_message=lambda code: zlib_lib.zError(code))
    z.deflate(stream, z.Z_FINISH)
"""
from __future__ import annotations

import ctypes
import os
import sys
import threading
import time
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor
from types import CodeType, FrameType
from typing import Any, Callable, Dict, List, Mapping, Optional, Set, Tuple, Union

from . import levels
from ._bindings import address_of, check, ffi, lib, native
from .callsite import frame_site
from . import findings, quarantine, scanning
from .checking import CallCheck, Owner, layout_of, note_cursors, object_extent
from .errors import CError, CallTimeoutWarning
from .ownership import Lend, cdata_address, cdata_extent, ctypes_pointer_value, describe, lend
from .ownership import _CDATA_OWNING, _HANDLE_TYPE, _lends, _managed
from .ownership import _freed as _freed_history
from .ownership import _shape as _ownership_shape
from .ownership import _shapes as _ownership_shapes
from .ownership import has_freed_history as ownership_history

__all__ = [
    "wrap",
    "declare",
    "unwrap",
    "shutdown",
    "CheckedLibrary",
    "set_call_timeout",
    "call_timeout",
    "defer_exception",
    "ErrorConvention",
]

ErrorConvention = Union[str, Callable[[Any], bool]]
_CONVENTIONS = ("negative", "null", "nonzero")
_THREAD_MODELS = ("free", "serial", "lock")

_CType = type(ffi.typeof("int"))
_CFuncPtr: Any = ctypes.CFUNCTYPE(None).__mro__[1]
_CArgObject = type(ctypes.byref(ctypes.c_int()))
_PointerBase = ctypes._Pointer  # type: ignore[attr-defined]
_PLAIN = (float, bool, str, type(None))  # ctypes arguments that cannot hold pointers
_PLAIN_CFFI = frozenset({bytes, type(None)})  # cffi pointer arguments that hold no pointers
_OWN_CDATA, _FROMBUF_CDATA = _CDATA_OWNING  # the types of ffi.new and ffi.from_buffer results
_scan_slots = native.scan_slots
_fast_callers = native.fastcall_callers
_fast_defer = native.fastcall_defer

# ---------------------------------------------------------------------------
# Exceptions raised inside callbacks, re-raised when the checked call returns

_CHECKED_CODES: Set[CodeType] = set()
_deferred: Dict[int, BaseException] = {}  # id(frame of the checked call) -> exception
_deferred_lock = threading.Lock()


def defer_exception(exc: BaseException) -> bool:
    """Store ``exc`` for the innermost checked call running on this thread.

    Called by ``ptrbridge.callback`` wrappers when the Python callback raised
    (C then gets the declared error value).  The checked call re-raises it
    when C returns.  Returns False when no checked call encloses the callback
    (the caller then reports the exception as unraisable).  The first
    exception of a call wins; later ones are chained as its context.

    A checked call is found by its frame (the Python ``checked`` closure) or,
    for a call the C fast path (csrc/pycall.c) made, which has no frame, by
    the frame that called it: whichever is met first walking out from the
    callback is the innermost.
    """
    fast = _fast_callers()  # {calling frame or None: call}: this thread's fast calls in flight
    frame = sys._getframe(1)
    while frame is not None and frame not in fast and frame.f_code not in _CHECKED_CODES:
        frame = frame.f_back  # type: ignore[assignment]
    if frame in fast:  # None too: a fast call that no Python frame made
        return bool(_fast_defer(fast[frame], exc))  # False if instrumented: it behaves as the raw call
    if frame is None or frame.f_locals.get("record"):
        return False  # no checked call, or an instrumented one: it behaves as the raw call
    with _deferred_lock:
        first = _deferred.get(id(frame))
        if first is None:
            _deferred[id(frame)] = exc
        elif first.__context__ is None and exc is not first:
            first.__context__ = exc
    return True


def _take_deferred(frame: Any) -> Optional[BaseException]:
    with _deferred_lock:
        return _deferred.pop(id(frame), None)


def _raise_deferred(frame: Any) -> None:
    """Raise the exception a callback stored for the checked call running in ``frame``, if any."""
    exc = _take_deferred(frame)
    if exc is not None:
        raise exc


# ---------------------------------------------------------------------------
# R3 watchdog: report calls that hold lent memory for too long

_timeout = 60.0
# The watchdog finds calls in flight from the threads' frames
# (sys._current_frames): checked calls register nothing.
_CALL_CODES: Set[CodeType] = set()
_watch_cond = threading.Condition()
_watchdog: Optional[threading.Thread] = None
timeout_listeners: List[Callable[[str], None]] = []  # called with each report (tests, tools)


def set_call_timeout(seconds: float) -> float:
    """Report (rule R3) checked calls that hold lent memory longer than ``seconds``.

    Returns the previous value.  The default is 60 s.  A call cannot be
    interrupted; it is reported once, with a :class:`~ptrbridge.CallTimeoutWarning`
    naming the function and the lent objects, between ``seconds`` and
    ``1.25 * seconds`` after it started.
    """
    global _timeout
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
        raise ValueError(f"ptrbridge.set_call_timeout: seconds must be a positive number, not {seconds!r}")
    with _watch_cond:
        old, _timeout = _timeout, float(seconds)
        _watch_cond.notify_all()
    return old


def call_timeout() -> float:
    """The current R3 call timeout in seconds."""
    return _timeout


def _calls_in_flight() -> Dict[Any, Tuple[Any, str, Tuple[Any, ...], Optional[FrameType]]]:
    """Every checked call running now: key -> (identity, function name, arguments, calling frame).

    Calls of the closure are found by their frames (key: thread and frame
    id; identity: the argument tuple, told apart from a later call from the
    same frame address), calls the C fast path made by its list of calls in
    flight (key: their sequence number, never reused; identity: None).
    """
    found: Dict[Any, Tuple[Any, str, Tuple[Any, ...], Optional[FrameType]]] = {}
    for thread_id, top in sys._current_frames().items():
        frame: Optional[FrameType] = top
        while frame is not None:
            if frame.f_code in _CALL_CODES:
                local = frame.f_locals
                args = local.get("args")
                found[(thread_id, id(frame))] = (args, local.get("name", "?"), tuple(args or ()), frame.f_back)
            frame = frame.f_back
    for seq, name, args, caller in native.fastcall_in_flight():
        found[("fast", seq)] = (None, name, args, caller)
    return found


def _lent_arguments(args: Tuple[Any, ...]) -> List[str]:
    held = []
    for arg in args:
        if isinstance(arg, (bytes, bytearray)) or object_extent(arg) is not None:
            held.append(_describe_lent(arg))
    return held


def _watch() -> None:
    # key -> (the call's identity, first seen, reported); see _calls_in_flight.
    # Holding the argument tuple keeps its identity from being reused, so a
    # later call from the same frame address is told apart from this one.
    seen: Dict[Any, List[Any]] = {}
    while True:
        with _watch_cond:
            _watch_cond.wait(max(_timeout / 4, 0.005))
        now = time.monotonic()
        live = _calls_in_flight()
        for key in [k for k in seen if k not in live]:
            del seen[key]
        for key, (identity, name, args, caller) in live.items():
            entry = seen.get(key)
            if entry is None or entry[0] is not identity:
                seen[key] = entry = [identity, now, False]
            if entry[2] or now - entry[1] < _timeout:
                continue
            entry[2] = True
            held = _lent_arguments(args)
            if not held:
                continue  # R3 is about calls that hold Python memory
            message = (
                f"ptrbridge: call holds lent Python memory longer than the call timeout "
                f"({_timeout:g} s): {name}() called at {frame_site(caller)} "
                f"has held {', '.join(held)} (R3: a C call that received Python memory must "
                f"return; if C keeps the memory on purpose, pin it or copy it to a CBuffer)"
            )
            warnings.warn(message, CallTimeoutWarning, stacklevel=1)
            for listener in list(timeout_listeners):
                listener(message)


def _describe_lent(arg: Any) -> str:
    if isinstance(arg, Owner):
        return arg.description
    extent = cdata_extent(arg) if isinstance(arg, ffi.CData) else None
    if extent is not None:
        return describe(arg, extent[1])
    try:
        with memoryview(arg) as view:
            return describe(arg, view.nbytes)
    except TypeError:
        return type(arg).__name__


def _start_watchdog() -> None:
    global _watchdog
    with _watch_cond:
        if _watchdog is None:
            _watchdog = threading.Thread(target=_watch, name="ptrbridge-watchdog", daemon=True)
            _watchdog.start()


# ---------------------------------------------------------------------------
# Argument plans


def _cffi_param_plan(param: Any) -> Optional[str]:
    """How to check one cffi parameter: None (skip), "pointer" or "struct"."""
    if param.kind in ("pointer", "array"):
        return "pointer"
    if param.kind in ("struct", "union"):
        return "struct"
    return None


# Per C type, what a cdata argument of that type needs: (_FLAT, None, _, _) for pointers and
# arrays whose items hold no pointers (void, char, opaque, function), (_WALK, plan, _, _) for
# those whose items do, (_OTHER, None, _, _) for the rest (struct by value, scalars); the
# third item says whether the type is an array, the fourth is the size of an item (-1: none,
# as void or an opaque struct), so that an ffi.new result's extent is its count of items
# times it (ownership.cdata_extent).
_FLAT, _WALK, _OTHER = 0, 1, 2  # csrc/pycall.c reads these tuples (FC_SHAPE_WALK)
_arg_shapes: Dict[Any, Tuple[int, Any, bool, int]] = {}


def _item_size(ctype: Any) -> int:
    """The item size ownership.cdata_extent uses for a pointer or array type, or -1 (none)."""
    kind, size = _ownership_shapes.get(ctype) or _ownership_shape(ctype)
    return size if kind in ("pointer", "array") else -1


def _arg_shape(ctype: Any) -> Tuple[int, Any, bool, int]:
    shape = _arg_shapes.get(ctype)
    if shape is None:
        kind = ctype.kind
        if kind in ("pointer", "array"):
            layout = layout_of(ctype.item)
            if layout is not None and layout.slots and layout.size:
                shape = (_WALK, layout.plan, kind == "array", _item_size(ctype))
            else:
                shape = (_FLAT, None, kind == "array", _item_size(ctype))
        else:
            shape = (_OTHER, None, False, -1)
        if len(_arg_shapes) < 4096:
            _arg_shapes[ctype] = shape
    return shape


def _settled_cffi(arg: Any, lent: List[Any]) -> bool:
    """The common cdata arguments, settled without a CallCheck; False: take the full path.

    True only where the full path (:func:`_check_cffi_arg`) would find
    nothing and lend the same objects: an owning pointer or array whose
    slots ``native.scan_slots`` settles in C (NULL, pinned, C memory), and a
    non-owning pointer to items without pointers while nothing was freed
    (level 1, no freed ptrbridge.new memory, no live ptrbridge.new block
    that a non-owning cdata could point to).
    """
    if not isinstance(arg, ffi.CData):
        return False
    ctype = ffi.typeof(arg)
    shape, plan, is_array, _size = _arg_shapes.get(ctype) or _arg_shape(ctype)
    if shape == _OTHER:
        return False
    if type(arg) in _CDATA_OWNING:
        if shape == _WALK:
            # As the full path: the owner's extent in items (an owning pointer has one).
            count = max(1, len(arg)) if is_array else 1
            if _scan_slots(arg, plan, count, _level == 2) is not None:
                return False
        lent.append(arg)
        return True
    if _level == 2 or ownership_history() or _managed:
        return False
    return shape == _FLAT or not cdata_address(arg)


def _unwalked_lent(args: Tuple[Any, ...]) -> List[Any]:
    """The buffers an instrumented level-1 call lends, for the quarantine's sample, with no walk.

    What an instrumented call's walk records at level 1 is a pointer into
    freed ptrbridge memory (none is on record) or, in strict mode only, a
    portability finding: when neither can be, :func:`check_args` skips the
    walk (its cost, the owner search through the caller's frames, was most of
    brotlicffi's).  csrc/pycall.c takes the same calls with no Python frame.
    """
    return [arg for arg in args if type(arg) in _LENDS or isinstance(arg, _CTYPES_LENDS)]


def _check_cffi_arg(check: CallCheck, argno: int, arg: Any, param: Any, lent: List[Any]) -> None:
    if isinstance(arg, ffi.CData):
        if type(arg) is _HANDLE_TYPE:
            return  # ffi.new_handle(): a token C may keep while the handle lives, not lent memory
        ctype = ffi.typeof(arg)
        kind = ctype.kind
        if kind in ("struct", "union"):  # by value: C gets a copy, its pointer slots still count
            check.walk(argno, address_of(ffi.addressof(arg)), ctype, 1, "Python")
            return
        if kind not in ("pointer", "array"):
            return
        extent = cdata_extent(arg)
        address = address_of(arg)
        item = ctype.item
        layout = layout_of(item)  # None for void, function and opaque types: nothing to walk
        if extent is not None:
            lent.append(arg)
            if layout is not None and layout.size:
                count = max(1, (extent[0] + extent[1] - address) // layout.size)
                check.walk(argno, address, item, count, "Python")
            return
        if not address:
            return
        if layout is not None and layout.slots:
            owner = check.classify(address)
            if owner is not None:
                count = max(1, (owner.end - address) // layout.size)
                check.walk(argno, address, item, count, "Python")
                return
            block = int(lib.pb__alloc_block_size(address))
            if block:
                # C memory from the tracked allocator (cnew, CBuffer): Python
                # memory it points to is lent to this call (rule R2 after it).
                # A `T *` reaches one T (a block may hold a T and more after it:
                # those words are not Ts); an array argument reaches its items.
                count = 1 if kind == "pointer" else max(1, block // layout.size)
                check.walk(argno, address, item, count, "C", lend=lent)
                return
        if levels._level == 2:
            owner = check.classify(address)  # the heap map knows raw Python addresses
            if owner is not None and not owner.pinned:
                lent.append(owner)
                return
        check.check_address(argno, address)
        return
    if isinstance(arg, (list, tuple)):  # cffi builds a temporary array from it
        item = param.item
        if item.kind == "pointer":
            for j, element in enumerate(arg):
                if isinstance(element, ffi.CData) and ffi.typeof(element).kind in ("pointer", "array"):
                    target = address_of(element)
                    owner = check.classify(target) if target else None
                    if owner is not None and not owner.pinned:
                        check.unpinned(argno, f"[{j}]", owner, "Python")
                    elif owner is None and target:
                        check.check_address(argno, target)
        return
    if arg is not None:
        lent.append(arg)  # bytes / buffer for char *: lent for the call


def _settled_ctypes(arg: Any, lent: List[Any]) -> bool:
    """A ctypes structure, union or array (or a byref() of one) whose slots are settled in C.

    True only where :func:`_check_ctypes_arg` would find nothing and lend the same object.
    """
    obj = getattr(arg, "_obj") if type(arg) is _CArgObject else arg
    kind = type(obj)
    plan = _ctypes_plans.get(kind, False)
    if plan is False:
        if not issubclass(kind, _CTYPES_AGGREGATES):
            return False
        layout = layout_of(kind)
        plan = layout.plan if layout is not None and layout.slots else None
        if len(_ctypes_plans) < 4096:
            _ctypes_plans[kind] = plan
    if plan is not None and _scan_slots(ctypes.addressof(obj), plan, 1, _level == 2) is not None:
        return False
    lent.append(obj)
    return True


_CTYPES_AGGREGATES = (ctypes.Structure, ctypes.Union, ctypes.Array)
_LENDS = frozenset((bytes, bytearray, _OWN_CDATA, _FROMBUF_CDATA))  # lent whole (see _unwalked_lent)
_CTYPES_LENDS = _CTYPES_AGGREGATES + (_CArgObject,)
# ctypes structure, union and array types -> their walk plan, or None when they hold no pointers
# (a plain dict, as checking's layout cache that holds the same types).
_ctypes_plans: Dict[type, Optional[bytes]] = {}


def _check_ctypes_arg(check: CallCheck, argno: int, arg: Any, lent: List[Any]) -> None:
    obj = getattr(arg, "_obj") if isinstance(arg, _CArgObject) else arg
    if isinstance(obj, (ctypes.Structure, ctypes.Union, ctypes.Array)):
        lent.append(obj)
        check.walk(argno, ctypes.addressof(obj), type(obj), 1, "Python")
    elif isinstance(obj, _PointerBase):
        target = ctypes_pointer_value(obj)
        layout = layout_of(obj._type_)
        if target and layout is not None and layout.slots:
            owner = check.classify(target)
            if owner is not None:
                check.walk(argno, target, obj._type_, max(1, (owner.end - target) // layout.size), "Python")
                return
        if target and levels._level == 2:
            owner = check.classify(target)  # numpy's data_as(): Python memory lent to the call
            if owner is not None and not owner.pinned:
                lent.append(owner)
                return
        check.check_address(argno, target)
    elif isinstance(obj, ctypes.c_void_p):
        check.check_address(argno, obj.value or 0)
    elif isinstance(obj, int) and not isinstance(obj, bool):
        check.check_address(argno, obj)
    elif isinstance(obj, (bytes, bytearray)):
        lent.append(obj)


# ---------------------------------------------------------------------------
# The checked function


def _lend(lent: List[Any]) -> List[Lend]:
    """Level 2: record the lent arguments in the registry for the call's duration."""
    regions = []
    for obj in lent:
        if isinstance(obj, Owner):  # Python memory reached through C memory
            regions.append(lend(obj.start, obj.size, obj.description))
            continue
        extent = object_extent(obj)
        if extent is not None:
            regions.append(lend(extent[0], extent[1], describe(obj, extent[1])))
    if regions:
        findings.count("lends", len(regions))
    return regions


def _return_lent(regions: List[Lend], function: str, frame: Any) -> None:
    """Level 2: the call returned; C must not hold what it was lent unless it is pinned.

    Each lend is returned, queued for the scan and recorded for reports in one C
    call (csrc/pylends.c), as the C fast path's are.
    """
    site = frame_site(frame)
    for region in regions:
        _lends.pop(region.id, None)
        queued = _native_lend_return(region.id, region.start, region.size, region.description, function, site)
        if queued < 0:
            check(queued, f"queueing {region.description} for the scan")
    scanning.after_call()


_native_lend_return = native.lend_return


def _finish_shadows(shadows: List[Any], regions: List[Lend], function: str, frame: Any) -> None:
    """Level 2 with quarantine, after the call: close the shadows; the scan looks for them too."""
    quarantine.finish(shadows, function, frame)
    for _slot, _back, _keeper, shadow, size, text, _origin in shadows:
        # C must not keep the shadow either: look for it too.
        regions.append(lend(shadow, size, text.split(" lent to ")[0]))


def _errcheck_fn(convention: ErrorConvention, is_pointer: bool) -> Callable[[Any], bool]:
    if callable(convention):
        return convention
    if convention == "negative":
        return lambda r: r < 0
    if convention == "nonzero":
        return lambda r: r != 0
    if convention == "null":
        if is_pointer:
            return lambda r: r is None or (isinstance(r, ffi.CData) and r == ffi.NULL) or r == 0
        return lambda r: not r
    raise ValueError(
        f"ptrbridge.wrap: unknown error convention {convention!r}; "
        f"use one of {', '.join(map(repr, _CONVENTIONS))} or a callable(result) -> bool"
    )


class _Spec:
    """What wrap() knows about one function."""

    def __init__(self, errcheck: Optional[ErrorConvention], use_errno: bool,
                 error_message: Optional[Callable[[Any], Any]]) -> None:
        self.errcheck = errcheck
        self.use_errno = use_errno
        self.error_message = error_message


def _message_text(value: Any) -> str:
    if isinstance(value, ffi.CData):
        return "" if value == ffi.NULL else ffi.string(value).decode("utf-8", "replace")
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


_INTERNAL = frozenset({
    "_lib", "_ffi", "_is_ctypes", "_mode", "_specs", "_error_message", "_use_errno", "_threads",
    "_lock", "_executor", "_worker_ident", "_limit", "_cache", "_cache_lock", "_plain", "__dict__",
    "__class__",
})


def _is_cffi_constant(library: Any, name: str, value: Any) -> bool:
    """Whether ``library.name`` is a constant (``#define``, enum) of a cffi library: it never changes.

    An ABI-mode library caches constants in its instance dict and reads
    variables through properties; an API-mode ``lib`` cannot take the address
    of a constant (it can of a variable).
    """
    if isinstance(library, ctypes.CDLL):
        return False
    if type(library) is _LIB_TYPE:
        try:
            ffi.addressof(library, name)
        except AttributeError as exc:
            return "constant" in str(exc)
        except Exception:
            return False
        return False
    try:
        return vars(library).get(name, _MISSING) is value
    except TypeError:
        return False


_MISSING = object()


def _is_function_value(library: Any, name: str, raw: Any) -> bool:
    """Whether ``library.name`` is a function-pointer value of a cffi library, not one of its functions.

    An API-mode ``lib`` gives its functions as built-in functions, and as cdata
    both a C variable of function-pointer type (C may change it: it is read anew)
    and an ``extern "Python"`` function (a pointer the program hands C as a
    callback, assigning it to struct fields and variables: it must stay the
    cdata it is). An ABI-mode library reads its variables through properties of
    its class. Calls through such a value are not checked, as calls through any
    function pointer the program reads from C are not.
    """
    if type(library) is _LIB_TYPE:
        return isinstance(raw, ffi.CData)
    if _is_cffi_abi_library(library):
        return isinstance(getattr(type(library), name, None), property)
    return False


def _unwrap_functions(args: Tuple[Any, ...], positions: Tuple[int, ...]) -> Tuple[Any, ...]:
    """Checked functions passed where C takes a function pointer: pass the real function."""
    items = list(args)
    for i in positions:
        if i < len(items) and getattr(items[i], "_ptrbridge_checked", False):
            items[i] = items[i].__wrapped__
    return tuple(items)


class CheckedLibrary:
    """A C library whose functions check the pointer rules; see :func:`wrap`."""

    def __init__(self, lib: Any, ffi_: Any, errcheck: Mapping[str, Any], use_errno: bool,
                 error_message: Optional[Callable[[Any], Any]], threads: str,
                 max_concurrency: Optional[int]) -> None:
        self._lib = lib
        self._ffi = ffi_
        self._is_ctypes = _library_kind(lib, ffi_, "ptrbridge.wrap") == "ctypes"
        self._mode = "raise"  # explicit wrap raises; instrument() sets "record"
        self._specs: Dict[str, _Spec] = {}
        self._error_message = error_message
        self._use_errno = use_errno
        self._threads = threads
        self._lock = threading.RLock() if threads == "lock" else None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="ptrbridge-serial") if threads == "serial" else None
        self._worker_ident: Optional[int] = None
        self._limit = threading.BoundedSemaphore(max_concurrency) if max_concurrency else None
        self._cache: Dict[str, Tuple[Any, Any]] = {}
        self._plain: Set[str] = set()  # names that are not functions (constants, types, variables)
        self._cache_lock = threading.Lock()
        _libraries.add(self)
        for name, convention in errcheck.items():
            declare(self, name, errcheck=convention)

    # -- attribute access ------------------------------------------------
    # The first access of a name builds its checked function and stores the
    # right object for the current level in the instance dict, so later
    # accesses are plain attribute lookups; a level change re-points them.
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        if name in self._plain:
            return getattr(self._lib, name)
        cached = self._cache.get(name)
        if cached is None:
            raw = getattr(self._lib, name)
            checked = None if _is_function_value(self._lib, name, raw) else self._build(name, raw)
            if checked is None:
                if _is_cffi_constant(self._lib, name, raw):
                    self.__dict__[name] = raw  # a constant never changes: a plain attribute from now on
                elif len(self._plain) < 65536:
                    # A type or C variable: read through every time, so that a variable
                    # C changes is never seen stale (the name is remembered, so that is
                    # all a later read does).
                    self._plain.add(name)
                return raw
            if getattr(checked, "_ptrbridge_trivial", False):
                checked = None  # nothing to check and nothing to do: the raw function at every level
            cached = (raw, checked)
            with self._cache_lock:
                self._cache[name] = cached
        current = _for_level(cached, levels._level)
        self.__dict__[name] = current
        return current

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _INTERNAL:
            object.__setattr__(self, name, value)
        else:
            setattr(self._lib, name, value)  # a C global variable: assign it in C

    def _repoint(self, level: int) -> None:
        with self._cache_lock:
            for name, cached in self._cache.items():
                self.__dict__[name] = _for_level(cached, level)

    def __addressof__(self, *fields: Any) -> Any:
        """``ffi.addressof(lib, "name")`` of a cffi ABI-mode library, as on the library itself.

        cffi's ``FFI.addressof`` asks the type of a non-cdata argument for
        ``__addressof__``; its ABI libraries have one.  (The ``ffi`` of an
        out-of-line API module is a C object that asks for its own ``lib``
        type: ``ffi.addressof(ptrbridge.unwrap(lib), "name")`` there.)
        """
        raw = self._lib
        method = type(raw).__dict__.get("__addressof__")
        if method is None:
            raise TypeError("expected a 'cdata' object")  # what cffi says for a non-library
        return method(raw, *fields)

    # Every public name belongs to the library (libc has close(), others
    # may have declare() or raw()): configuration is in module functions.
    def __dir__(self) -> List[str]:
        return sorted(dir(self._lib))

    def __repr__(self) -> str:
        if self._mode == "record":
            return repr(self._lib)  # instrumentation shows the program what it had
        return f"<ptrbridge.CheckedLibrary of {self._lib!r} threads={self._threads!r}>"

    # -- building checked functions --------------------------------------
    def _signature(self, raw: Any) -> Optional[Tuple[List[Any], Any, bool]]:
        """(parameter types, result type, result is pointer) or None if not a function."""
        if self._is_ctypes:
            if not isinstance(raw, _CFuncPtr):
                return None
            fn: Any = raw
            restype = fn.restype
            is_ptr = isinstance(restype, type) and issubclass(
                restype, (ctypes.c_void_p, ctypes.c_char_p, ctypes.c_wchar_p, _PointerBase)
            )
            return list(fn.argtypes or ()), restype, is_ptr
        try:
            ctype = ffi.typeof(raw)
        except (TypeError, ffi.error):
            return None
        if not isinstance(ctype, _CType) or ctype.kind != "function":
            return None
        return list(ctype.args), ctype.result, ctype.result.kind == "pointer"

    def _build(self, name: str, raw: Any) -> Optional[Callable[..., Any]]:
        checked = self._build_closure(name, raw)
        if checked is None or not self._is_ctypes:
            return checked
        # ctypes: the checked function is itself a ctypes function pointer (same
        # address, so cast()/byref()/passing it to C work) whose argtypes,
        # restype and errcheck are the raw function's: whichever object the
        # user configures, at whichever level, configures the real function.
        kind = _ctypes_checked_type(self._lib, checked)
        proxy: Any = kind(ctypes.cast(raw, ctypes.c_void_p).value or 0)
        proxy._raw = raw

        def refresh() -> None:
            rebuilt = self._build_closure(name, raw)
            if rebuilt is not None:  # still a function: its configuration changed
                setattr(kind, "__call__", staticmethod(rebuilt))

        proxy._refresh = refresh
        proxy.__name__ = getattr(raw, "__name__", name)
        proxy.__wrapped__ = raw
        proxy._ptrbridge_semantic = checked._ptrbridge_semantic  # type: ignore[attr-defined]
        return proxy  # type: ignore[no-any-return]

    def _build_closure(self, name: str, raw: Any) -> Optional[Callable[..., Any]]:
        signature = self._signature(raw)
        if signature is None:
            return None
        params, _result, result_is_ptr = signature
        spec = self._specs.get(name) or _Spec(None, self._use_errno, self._error_message)
        failed = _errcheck_fn(spec.errcheck, result_is_ptr) if spec.errcheck is not None else None
        if self._is_ctypes:
            if spec.use_errno and failed is not None:
                raw = _with_ctypes_errno(raw)
            plan: List[Tuple[int, Any]] = [(i, None) for i in range(len(params))]
            takes_functions: Tuple[int, ...] = ()
        else:
            plan = [(i, p) for i, p in enumerate(params) if _cffi_param_plan(p)]
            takes_functions = tuple(i for i, p in enumerate(params) if p.kind == "function")
        # Where a checked function passed as an argument is replaced by the raw one: function
        # parameters, and (cffi) void * ones, which take an ABI library's function cdata too.
        unwrap_at = takes_functions if self._is_ctypes else takes_functions + tuple(
            i for i, p in enumerate(params) if p.kind == "pointer" and p.item.kind == "void")
        is_ctypes = self._is_ctypes
        int_is_pointer = is_ctypes and result_is_ptr  # a c_void_p restype: ctypes returns the address as an int
        lib_self = self
        record = self._mode == "record"
        count_call = findings.count
        semantic = failed is not None or self._threads != "free" or self._limit is not None
        checks_args = bool(plan) or is_ctypes
        get_errno: Callable[[], int] = ctypes.get_errno if is_ctypes else (lambda: ffi.errno)

        def set_errno_zero() -> None:
            if is_ctypes:
                ctypes.set_errno(0)
            else:
                ffi.errno = 0

        def invoke(args: Tuple[Any, ...]) -> Tuple[Any, int, Optional[BaseException]]:
            # Runs on the thread that calls C; the frame identifies this call
            # for exceptions raised inside callbacks.
            if failed is not None and spec.use_errno:
                set_errno_zero()
            result = raw(*args)
            err = get_errno() if failed is not None and spec.use_errno else 0
            exc = _take_deferred(sys._getframe()) if _deferred else None
            return result, err, exc

        def dispatch(args: Tuple[Any, ...]) -> Tuple[Any, int, Optional[BaseException]]:
            if lib_self._executor is not None:
                if threading.get_ident() == lib_self._worker_ident:
                    return invoke(args)  # re-entered from a callback on the worker
                return lib_self._executor.submit(_on_worker, lib_self, invoke, args).result()
            if lib_self._lock is not None:
                with lib_self._lock:
                    return invoke(args)
            return invoke(args)

        def finish(result: Any, err: int, exc: Optional[BaseException]) -> Any:
            if exc is not None:
                raise exc
            if failed is not None and failed(result):
                raise _failure(name, result, err, spec)
            return result

        def check_args(args: Tuple[Any, ...]) -> List[Any]:
            # Called from `checked`: the user's frame is the one above it, or
            # None when C or the interpreter called `checked` directly (an
            # ffi.gc destructor at shutdown, a thread with no Python caller).
            lent: List[Any] = []
            check: Optional[CallCheck] = None
            if record:
                count_call("calls")
                if _level == 1 and not _freed_history and not findings.strict():
                    return _unwalked_lent(args)  # nothing a walk could find (see there)
            if is_ctypes:
                history = None
                for i, arg in enumerate(args):
                    kind = type(arg)
                    if kind is int:
                        if history is None:
                            history = ownership_history() or _level == 2
                        if not (arg > 0 and history):
                            continue  # a raw address is checked only against freed memory
                    elif kind in _PLAIN:
                        continue
                    elif kind is bytes or kind is bytearray:
                        lent.append(arg)  # a buffer: lent, holds no pointers
                        continue
                    elif _settled_ctypes(arg, lent):
                        continue
                    if check is None:
                        check = CallCheck(name, sys._getframe(1).f_back, args, record)
                    _check_ctypes_arg(check, i + 1, arg, lent)
                if check is not None:
                    check.finish()
                    lent.extend(check.traps)  # dangling struct fields for the quarantine (level 2)
                    lent.extend(check.cursors)
                return lent
            for i, param in plan:
                if i >= len(args):
                    break
                arg = args[i]
                kind = type(arg)
                if kind is bytes or kind is bytearray:
                    lent.append(arg)  # a buffer for char *: lent, holds no pointers
                    continue
                if arg is None or _settled_cffi(arg, lent):
                    continue
                if check is None:
                    check = CallCheck(name, sys._getframe(1).f_back, args, record)
                _check_cffi_arg(check, i + 1, arg, param, lent)
            if check is not None:
                check.finish()
                lent.extend(check.traps)
                lent.extend(check.cursors)
            return lent

        def run_level2(function: str, args: Tuple[Any, ...], lent: List[Any], frame: Any) -> Any:
            # `function` is passed (not read from the closure) so that every
            # checked frame has `name` among its locals, for the R3 watchdog.
            shadows = None
            if quarantine._enabled:
                if is_ctypes:
                    args, shadows = quarantine.shadow_ctypes_arguments(args, params, function, frame, lent)
                else:
                    args, shadows = quarantine.shadow_arguments(args, plan, function, frame, lent)
            regions = _lend(lent)
            entered = quarantine.enter_call(shadows) if shadows else False
            try:
                result, err, exc = dispatch(args)
            finally:
                if shadows:
                    quarantine.leave_call(entered)
                    _finish_shadows(shadows, regions, function, frame)
                if lent:
                    note_cursors(lent)
                _return_lent(regions, function, frame)
            if shadows:
                result = quarantine.translate(result, args, shadows, int_is_pointer)
            return finish(result, err, exc)

        def run_sampled(function: str, args: Tuple[Any, ...], frame: Any) -> Any:
            # Level 1 with quarantine sampling: this lend was drawn (one in N).
            if is_ctypes:
                args, shadows = quarantine.shadow_ctypes_arguments(args, params, function, frame, (), True)
            else:
                args, shadows = quarantine.shadow_arguments(args, plan, function, frame, (), True)
            entered = quarantine.enter_call(shadows)
            try:
                result, err, exc = dispatch(args)
            finally:
                quarantine.leave_call(entered)
                quarantine.finish(shadows, function, frame)
            if shadows:
                result = quarantine.translate(result, args, shadows, int_is_pointer)
            return finish(result, err, exc)

        only = plan[0][0] if len(plan) == 1 and not is_ctypes else None

        if not semantic and not checks_args:
            # No pointer parameters: only exceptions from callbacks to re-raise (explicit wrap).
            def checked(*args: Any) -> Any:
                if unwrap_at:
                    args = _unwrap_functions(args, unwrap_at)
                if record and _level:
                    count_call("calls")  # nothing to check, but a call the run checked
                if _level == 2:
                    quarantine.refresh_adopted()  # C may read a kept buffer's shadow in this call
                result = raw(*args)
                if _deferred and not record:
                    _raise_deferred(sys._getframe())
                return result
        elif not semantic and only is not None:
            # One pointer parameter: bytes or NULL for it needs no walk at level 1.
            def checked(*args: Any) -> Any:
                if unwrap_at:
                    args = _unwrap_functions(args, unwrap_at)
                level = _level
                if level:
                    if level == 2:
                        lent = check_args(args)
                        if lent or quarantine._enabled:
                            return run_level2(name, args, lent, sys._getframe().f_back)
                    elif len(args) > only:
                        arg = args[only]
                        kind = type(arg)
                        if kind in _PLAIN_CFFI:
                            if record:  # bytes or NULL: no walk at level 1
                                count_call("calls")
                        elif not record and (kind is _OWN_CDATA or kind is _FROMBUF_CDATA):
                            # Inlined _settled_cffi for an owning cdata (level 1 ignores `lent`):
                            # a flat item type, or slots scan_slots settles in C, need no CallCheck.
                            ctype = ffi.typeof(arg)
                            shape, walk, is_array, _size = _arg_shapes.get(ctype) or _arg_shape(ctype)
                            if shape == _OTHER or (shape == _WALK and _scan_slots(
                                    arg, walk, max(1, len(arg)) if is_array else 1, False) is not None):
                                check_args(args)
                        else:
                            check_args(args)
                    if level == 1 and quarantine._enabled and quarantine._tick():
                        return run_sampled(name, args, sys._getframe().f_back)
                result = raw(*args)
                if _deferred and not record:
                    _raise_deferred(sys._getframe())
                return result
        elif not semantic:
            def checked(*args: Any) -> Any:
                if unwrap_at:
                    args = _unwrap_functions(args, unwrap_at)
                if _level:
                    lent = check_args(args)
                    if _level == 2 and (lent or quarantine._enabled):
                        return run_level2(name, args, lent, sys._getframe().f_back)
                    if lent and quarantine._enabled and quarantine._tick():
                        return run_sampled(name, args, sys._getframe().f_back)
                result = raw(*args)
                if _deferred and not record:
                    _raise_deferred(sys._getframe())
                return result
        else:
            def checked(*args: Any) -> Any:
                if unwrap_at:
                    args = _unwrap_functions(args, unwrap_at)
                level = _level
                lent = check_args(args) if level and checks_args else None
                limit = lib_self._limit
                if limit is not None:
                    limit.acquire()
                try:
                    if level == 2 and lent is not None and (lent or quarantine._enabled):
                        return run_level2(name, args, lent, sys._getframe().f_back)
                    if lent and quarantine._enabled and quarantine._tick():
                        return run_sampled(name, args, sys._getframe().f_back)
                    result, err, exc = dispatch(args)
                finally:
                    if limit is not None:
                        limit.release()
                return finish(result, err, exc)

        _CHECKED_CODES.add(invoke.__code__)
        _CHECKED_CODES.add(checked.__code__)
        if checks_args or semantic:
            _CALL_CODES.add(checked.__code__)
        result: Any = checked
        if not semantic and not takes_functions:
            # Level 1's common case (buffers, NULL, scalars) in C, with no Python frame;
            # every other call goes to `checked` unchanged (csrc/pycall.c).
            flags = (native.FC_RECORD if record else 0) | (native.FC_CTYPES if is_ctypes else 0)
            if only is not None:
                flags |= native.FC_TICK_ALWAYS  # as `checked` above: every call draws
            result = native.CheckedCall(raw, checked, name, [i for i, _p in plan], flags)
            result.__module__ = __name__
        targets: List[Any] = [checked] if result is checked else [checked, result]
        for target in targets:
            target.__name__ = name
            target.__qualname__ = f"CheckedLibrary.{name}"
            target.__doc__ = f"Checked call of the C function {name}()."
            target.__wrapped__ = raw
            target._ptrbridge_semantic = semantic
            target._ptrbridge_checked = True
            # Instrumented (record mode), a function with no pointer and no function parameters
            # behaves exactly as the raw one (it re-raises nothing and counts nothing): the raw
            # function is handed out, and its calls are neither checked nor counted.
            target._ptrbridge_trivial = record and not semantic and not checks_args and not takes_functions
        return result  # type: ignore[no-any-return]


_LIB_TYPE: type = type(lib)  # _cffi_backend's Lib: API-mode libs and out-of-line ABI dlopen results
_FFI_TYPE = type(ffi)
_ACCEPTED = ("a cffi API-mode lib, a cffi ffi.dlopen() library or a ctypes.CDLL "
             "(ctypes.cdll.LoadLibrary, PyDLL)")


def _is_cffi_abi_library(obj: Any) -> bool:
    kind = type(obj)
    return kind.__name__.startswith("FFILibrary") and kind.__module__ == "cffi.api"


def _library_kind(library: Any, ffi_: Any, api: str) -> str:
    """"cffi" or "ctypes" for a library ``wrap`` accepts; TypeError naming what is accepted."""
    if ffi_ is not None:
        is_ffi = isinstance(ffi_, _FFI_TYPE) or any(
            c.__name__ == "FFI" and c.__module__ == "cffi.api" for c in type(ffi_).__mro__)
        if not is_ffi:
            raise TypeError(f"{api}: ffi must be a cffi FFI instance or None, not {type(ffi_).__name__}")
    if isinstance(library, ctypes.CDLL):
        return "ctypes"
    if type(library) is _LIB_TYPE or _is_cffi_abi_library(library):
        return "cffi"
    hint = ""
    if isinstance(library, (str, bytes, os.PathLike)):
        hint = f" (load it first: ctypes.CDLL({library!r}) or ffi.dlopen({library!r}))"
    raise TypeError(f"{api}: expected {_ACCEPTED}, not {type(library).__name__}{hint}")


def _library_name(library: Any) -> str:
    if isinstance(library, ctypes.CDLL):
        return f"ctypes library {getattr(library, '_name', None)!r}"
    return f"cffi library {library!r}"


def _config(field: str) -> property:
    """A property of a checked ctypes function that reads and writes the raw function's ``field``."""
    def get(self: Any) -> Any:
        return getattr(self._raw, field)

    def put(self: Any, value: Any) -> None:
        setattr(self._raw, field, value)
        self._refresh()  # the result type (NULL convention) and errno copy follow it

    def delete(self: Any) -> None:
        delattr(self._raw, field)
        self._refresh()

    return property(get, put, delete, f"The raw function's {field} (shared with it).")


def _ctypes_checked_type(library: Any, checked: Callable[..., Any]) -> type:
    """The class of one checked function of a ctypes library: a subclass of its ``_FuncPtr``.

    One class per function, whose ``__call__`` is the checked function itself
    (a staticmethod: no extra Python frame between the caller and the check).
    """
    base = library._FuncPtr
    made = type("CheckedFunction", (base,), {
            "__call__": staticmethod(checked),
            "__doc__": "A checked ctypes function (ptrbridge.wrap); configuration is the raw function's.",
            "argtypes": _config("argtypes"),
            "restype": _config("restype"),
            "errcheck": _config("errcheck"),
            "_flags_": base._flags_,
            "_restype_": getattr(base, "_restype_", ctypes.c_int),
        })
    return made


def _for_level(cached: Tuple[Any, Any], level: int) -> Any:
    """The raw function at level 0 (unless its wrapper changes behaviour), else the checked one."""
    raw, checked = cached
    if checked is None or (level == 0 and not checked._ptrbridge_semantic):
        return raw
    return checked


_libraries: "weakref.WeakSet[CheckedLibrary]" = weakref.WeakSet()
_level = levels.check_level()  # mirrors levels._level, kept current by _on_level_change


def _on_level_change(old: int, new: int) -> None:
    global _level
    _level = new  # a module global is the cheapest read on the hot path
    native.fastcall_level(new)  # and the C fast path's copy
    if (old == 0) != (new == 0):
        for library in list(_libraries):
            library._repoint(new)


native.fastcall_level(_level)
levels.add_level_listener(_on_level_change)
# The C fast path (csrc/pycall.c) reads the freed-memory history and the cdata shapes
# from these very objects; a cdata's C type is read from the cdata when cffi's layout
# is the one it knows (checked on a sample).
_sample_cdata = ffi.new("char[]", 1)
native.fastcall_init(_freed_history, _arg_shapes, _FLAT, _sample_cdata, ffi.typeof(_sample_cdata), _FROMBUF_CDATA)
del _sample_cdata
native.fastcall_init_ctypes(_ctypes_plans, _CArgObject)  # ctypes aggregates' plans, as _settled_ctypes fills them
native.fastcall_init_strict(vars(findings), findings.strict, findings._ENV_DATA, findings._ENV_KEY, _CTYPES_LENDS)
findings._take_native_calls = native.fastcall_take_calls  # the calls the fast path counted
findings._take_native_lends = native.fastcall_take_lends  # and the level-2 lends it made
native.fastcall_init_l2(scanning._fast_calls_due, check, describe)  # level 2's lends in C (csrc/pylends.c)
os.register_at_fork(after_in_child=native.fastcall_after_fork)  # other threads' calls are gone


def _on_worker(lib_self: CheckedLibrary, invoke: Callable[..., Any], args: Tuple[Any, ...]) -> Any:
    lib_self._worker_ident = threading.get_ident()
    return invoke(args)


def _with_ctypes_errno(raw: Any) -> Any:
    """A copy of a ctypes function that saves errno (``use_errno=True``)."""
    proto = ctypes.CFUNCTYPE(raw.restype, *(raw.argtypes or ()), use_errno=True)
    func: Any = proto(ctypes.cast(raw, ctypes.c_void_p).value or 0)
    if raw.argtypes is None:
        func.argtypes = None
    func.__name__ = raw.__name__
    return func


def _failure(name: str, result: Any, err: int, spec: _Spec) -> BaseException:
    if spec.use_errno:
        if err:
            return OSError(err, f"{os.strerror(err)} (from {name}())")
        return CError(f"ptrbridge: {name}() failed with result {result!r} and errno 0", result, name)
    text = ""
    if spec.error_message is not None:
        try:
            text = _message_text(spec.error_message(result))
        except Exception as exc:  # a broken message function must not hide the failure
            text = f"<error_message failed: {exc!r}>"
    code = result if not isinstance(result, ffi.CData) else None
    detail = f": {text}" if text else ""
    return CError(f"ptrbridge: {name}() failed with result {code!r}{detail}", code, name)


def declare(library: CheckedLibrary, name: str, *, errcheck: Optional[ErrorConvention] = None,
            use_errno: Optional[bool] = None,
            error_message: Optional[Callable[[Any], Any]] = None) -> None:
    """Declare the error convention of one function of a wrapped library.

    ``errcheck`` is ``"negative"`` (result < 0 fails), ``"null"`` (NULL
    fails), ``"nonzero"`` (anything but 0 fails) or a callable that returns
    True for a failing result.  With ``use_errno`` a failure raises
    ``OSError`` from the ``errno`` the call left (zeroed before the call, read
    at once after it, so never stale); otherwise ``CError`` with the result as
    ``code`` and the text of ``error_message(code)`` if given.
    """
    if not isinstance(library, CheckedLibrary):
        raise TypeError(f"ptrbridge.declare: expected a library from ptrbridge.wrap(), not {type(library).__name__}")
    if errcheck is not None and not callable(errcheck) and errcheck not in _CONVENTIONS:
        _errcheck_fn(errcheck, False)  # raises the helpful ValueError
    if not isinstance(name, str) or not _has_function(library._lib, name):
        raise AttributeError(
            f"ptrbridge.declare: {_library_name(library._lib)} has no function {name!r}; "
            f"an error convention for it would never apply (check the spelling)"
        )
    library._specs[name] = _Spec(
        errcheck,
        library._use_errno if use_errno is None else use_errno,
        error_message or library._error_message,
    )
    with library._cache_lock:
        library._cache.pop(name, None)
        library.__dict__.pop(name, None)


def _has_function(library: Any, name: str) -> bool:
    """Whether ``library`` has ``name`` (resolving it; for ctypes that is a dlsym)."""
    try:
        getattr(library, name)
    except (AttributeError, ffi.error):
        return False
    except Exception:  # cffi raises e.g. NotImplementedError for names it cannot build
        return True
    return True


def unwrap(library: CheckedLibrary) -> Any:
    """The raw library behind a wrapped one."""
    if not isinstance(library, CheckedLibrary):
        raise TypeError(f"ptrbridge.unwrap: expected a library from ptrbridge.wrap(), not {type(library).__name__}")
    return library._lib


def shutdown(library: CheckedLibrary) -> None:
    """Stop a ``threads="serial"`` library's worker thread (pending calls finish first)."""
    if not isinstance(library, CheckedLibrary):
        raise TypeError(f"ptrbridge.shutdown: expected a library from ptrbridge.wrap(), not {type(library).__name__}")
    if library._executor is not None:
        library._executor.shutdown(wait=True)


def wrap(lib: Any, ffi: Any = None, *, errcheck: Optional[Mapping[str, ErrorConvention]] = None,
         use_errno: bool = False, error_message: Optional[Callable[[Any], Any]] = None,
         threads: str = "free", max_concurrency: Optional[int] = None) -> CheckedLibrary:
    """Wrap a C library so that its functions check the pointer rules.

    ``lib`` is a cffi API-mode ``lib``, an ABI-mode ``ffi.dlopen`` result or a
    ``ctypes.CDLL``.  ``errcheck`` maps function names to an error convention
    (see :func:`declare`); ``error_message(code)`` turns a
    failing result into text (e.g. ``sqlite3_errstr``); ``use_errno`` makes
    failures raise ``OSError`` from ``errno``.  :func:`declare` adds a
    convention later, :func:`unwrap` gives back the raw library.

    ``threads`` is the thread model for libraries that are not thread-safe:
    ``"free"`` (default; calls run on the caller's thread, concurrently),
    ``"lock"`` (calls are serialised by a re-entrant lock) or ``"serial"``
    (every call runs on one dedicated worker thread, also right for
    thread-bound state such as GL contexts).  ``max_concurrency=N`` bounds the
    calls in flight.
    """
    _start_watchdog()
    if threads not in _THREAD_MODELS:
        raise ValueError(f"ptrbridge.wrap: threads must be one of {_THREAD_MODELS}, not {threads!r}")
    if max_concurrency is not None and (
        isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) or max_concurrency < 1
    ):
        raise ValueError(f"ptrbridge.wrap: max_concurrency must be a positive int, not {max_concurrency!r}")
    if isinstance(lib, CheckedLibrary) and lib._mode == "record":
        lib = lib._lib  # instrumented by ptrbridge.instrument(): wrap the library itself
    if isinstance(lib, CheckedLibrary):
        raise TypeError("ptrbridge.wrap: the library is already wrapped")
    _library_kind(lib, ffi, "ptrbridge.wrap")
    if errcheck is not None and not isinstance(errcheck, Mapping):
        raise TypeError(f"ptrbridge.wrap: errcheck must map function names to conventions, "
                        f"not {type(errcheck).__name__}")
    return CheckedLibrary(lib, ffi, dict(errcheck or {}), use_errno, error_message, threads, max_concurrency)
