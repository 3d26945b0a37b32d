"""Instrumentation: check every C call of a program with no change to its source.

``ptrbridge.instrument()`` makes the C libraries a program loads checked, the
way ``ptrbridge.wrap`` does by hand, but *recording* what it finds
(:mod:`ptrbridge.findings`) instead of raising, so the program runs exactly
as it would without ptrbridge.  ``python -m ptrbridge run`` and the pytest
plugin call it; :func:`uninstrument` undoes it.  Interception points:

* cffi ABI mode: every library ``cffi.FFI().dlopen()`` returns;
* cffi API (out-of-line) modules: the ``lib`` of every compiled cffi module,
  replaced in the module as it is imported (``from ._mod import ffi, lib``
  then gets the checked one) and, for modules imported before, in every
  module's globals that refer to it.  ``lib.CONSTANT``, C variables (read and
  assigned through ``lib``), ``dir(lib)``, ``repr(lib)``, ``ffi.gc(obj,
  lib.destroy)`` and passing ``lib.f`` where C takes a function pointer work
  as before;
* ctypes: functions of every ``CDLL`` / ``PyDLL`` (and ``cdll.LoadLibrary``)
  created after ``instrument()``, and function pointers made with
  ``CFUNCTYPE(...)(address)``; they stay real ctypes function pointers, so
  ``argtypes``, ``restype`` and ``errcheck`` are ctypes' own;
* callbacks: ``cffi.FFI().callback`` and ctypes ``CFUNCTYPE(...)(fn)``: a
  callback result that points into Python memory dying on return is an error
  (R4); and a callback whose Python object the program dropped while C still
  held its address is kept alive and reported when C calls it ("callback
  on_event created at app.py:12 was collected; C called it") instead of
  crashing the process;
* handles: ``cffi.FFI().new_handle`` results are tokens C may keep (not
  memory it was lent), and ``from_handle`` of one collected since is reported.

What the checks report (:class:`~ptrbridge.findings.Finding`):

* ``"dangling-argument"`` (error): an argument or a nested pointer slot
  points into freed Python memory at the call;
* ``"nested-unpinned"`` (portability, recorded only in strict mode): R1 taken
  literally - a nested pointer to live, unpinned Python memory.  CPython never
  moves objects, so ``ffi.new("uint8_t **", buf)`` with ``buf`` alive is
  correct code and is clean by default;
* ``"callback-result"`` (error or portability), ``"collected-callback"`` (error);
* ``"collected-handle"`` (error): ``ffi.from_handle`` given the address of an
  ``ffi.new_handle`` result collected since (see :mod:`ptrbridge.cffi_handles`).

An instrumented ABI library's function is a checked function, not a cdata:
passing it for a function-pointer or ``void *`` parameter, ``ffi.cast`` and
``ffi.typeof`` of it work as before; storing it in a struct field or an
``ffi.new`` initializer does not (``ptrbridge.unwrap(lib).name`` is the cdata).

Not intercepted (yet): calls through cffi function-pointer cdata
(``ffi.cast("int(*)(int)", p)(...)``), ``ffi.callback`` / ``@ffi.def_extern``
of out-of-line API modules (their ``ffi`` is a C object that cannot be
patched), numpy's ``ndarray.ctypes``, ctypes libraries created before
``instrument()`` whose functions were already fetched, and references to a
``lib`` held outside module globals.  ``ffi.addressof(lib, "name")`` works on
an instrumented ABI-mode library; on the instrumented ``lib`` of an
out-of-line API module it raises TypeError (that ``ffi`` is a C object that
accepts only its own ``lib`` type): use ``ptrbridge.unwrap(lib)`` there.
"""
from __future__ import annotations

import ctypes
import functools
import gc
import importlib
import importlib.machinery
import sys
import threading
import weakref
from collections import OrderedDict
from types import ModuleType
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import calls, cffi_handles, findings, levels, quarantine
from ._bindings import address_of, ffi as _pb_ffi, lib as _pb_lib, native as _pb_native
from .callsite import caller_site, frame_site
from .checking import CallCheck, note_cursors, object_extent
from .ownership import describe, lookup

__all__ = ["instrument", "uninstrument", "instrumented"]

_lock = threading.RLock()
_on = False
_patches: List[Tuple[Any, str, Any]] = []  # (owner, attribute, original) to restore
_globals: List[Tuple[Dict[str, Any], str, Any, Any]] = []  # (namespace, name, raw lib, proxy)
_proxies: Dict[int, Tuple[Any, calls.CheckedLibrary]] = {}  # id(raw lib) -> (raw, proxy)
_LIB_TYPE: type = calls._LIB_TYPE
_CFuncPtr: Any = calls._CFuncPtr
_base_call = _CFuncPtr.__call__
_PLAIN = (float, bool, str, type(None))


def instrumented() -> bool:
    """True between :func:`instrument` and :func:`uninstrument`."""
    return _on


def instrument() -> bool:
    """Check the C calls of cffi and ctypes libraries with no source change; False if already on.

    Idempotent and thread-safe.  The checks follow the check level (0: none,
    1: arguments, 2: also the heap map and retention scans).
    """
    global _on
    with _lock:
        if _on:
            return False
        cffi: Any = importlib.import_module("cffi")
        _patch(cffi.FFI, "dlopen", _make_dlopen(cffi.FFI.dlopen))
        _patch(cffi.FFI, "callback", _make_cffi_callback(cffi.FFI.callback))
        _patch(cffi.FFI, "cast", _make_unwrapping(cffi.FFI.cast, 2))
        _patch(cffi.FFI, "typeof", _make_unwrapping(cffi.FFI.typeof, 1))
        _patch(cffi.FFI, "new_handle", cffi_handles.make_new_handle(cffi.FFI.new_handle))
        _patch(cffi.FFI, "from_handle", cffi_handles.make_from_handle(cffi.FFI.from_handle))
        _patch(ctypes.CDLL, "__init__", _make_cdll_init(ctypes.CDLL.__init__))
        _patch(ctypes, "CFUNCTYPE", _make_cfunctype(ctypes.CFUNCTYPE))
        _patch(importlib.machinery.ExtensionFileLoader, "exec_module",
               _make_exec_module(importlib.machinery.ExtensionFileLoader.exec_module))
        _on = True
        for module in list(sys.modules.values()):
            if isinstance(module, ModuleType):
                _instrument_module(module)
        _replace_references()
        return True


def uninstrument() -> bool:
    """Undo :func:`instrument`: the original functions and ``lib`` objects are back; False if off.

    Libraries and callbacks created while instrumented keep their checks.
    """
    global _on
    with _lock:
        if not _on:
            return False
        while _patches:
            owner, name, original = _patches.pop()
            setattr(owner, name, original)
        while _globals:
            namespace, name, raw, proxy = _globals.pop()
            if namespace.get(name) is proxy:
                namespace[name] = raw
        _on = False
        return True


def _patch(owner: Any, name: str, replacement: Any) -> None:
    _patches.append((owner, name, owner.__dict__[name] if name in getattr(owner, "__dict__", {}) else getattr(owner, name)))
    setattr(owner, name, replacement)


# ---------------------------------------------------------------------------
# cffi libraries


_CHECKED_FUNCTIONS = (_pb_native.CheckedCall, _pb_native.CheckedMethod)


def _make_unwrapping(original: Callable[..., Any], position: int) -> Callable[..., Any]:
    """``FFI.cast`` / ``FFI.typeof`` that take an instrumented ABI library's function as its cdata.

    In ABI mode ``lib.f`` is a function-pointer cdata; instrumented, it is a
    checked function, which ``ffi.cast("void *", lib.f)`` and
    ``ffi.typeof(lib.f)`` would refuse: argument ``position`` (counting
    ``self``) is the raw function then.
    """
    @functools.wraps(original)
    def unwrapping(*args: Any, **kwargs: Any) -> Any:
        if len(args) > position and type(args[position]) in _CHECKED_FUNCTIONS:
            wrapped = getattr(args[position], "__wrapped__", None)
            if wrapped is not None:
                args = args[:position] + (wrapped,) + args[position + 1:]
        return original(*args, **kwargs)
    return unwrapping


def _proxy(raw: Any) -> calls.CheckedLibrary:
    """The checked, recording stand-in for a cffi library (one per library)."""
    with _lock:
        entry = _proxies.get(id(raw))
        if entry is None or entry[0] is not raw:
            proxy = calls.CheckedLibrary(raw, None, {}, False, None, "free", None)
            proxy._mode = "record"
            entry = (raw, proxy)
            _proxies[id(raw)] = entry
        return entry[1]


def _make_dlopen(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def dlopen(self: Any, *args: Any, **kwargs: Any) -> Any:
        return _proxy(original(self, *args, **kwargs))
    return dlopen


def _is_own(module: ModuleType) -> bool:
    return module.__dict__.get("lib") is _pb_lib


def _instrument_module(module: ModuleType) -> None:
    """Replace the ``lib`` of a compiled cffi module by its checked proxy."""
    namespace = module.__dict__
    raw = namespace.get("lib")
    if type(raw) is not _LIB_TYPE or raw is _pb_lib or "ffi" not in namespace:
        return
    proxy = _proxy(raw)
    namespace["lib"] = proxy
    _globals.append((namespace, "lib", raw, proxy))


def _replace_references() -> None:
    """Modules imported before: ``from ._mod import lib`` copied the raw lib into their globals."""
    raws = {key: entry for key, entry in _proxies.items()}
    if not raws:
        return
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict) or module.__name__.startswith("ptrbridge"):
            continue
        for name, value in list(namespace.items()):
            entry = raws.get(id(value))
            if entry is not None and entry[0] is value and type(value) is _LIB_TYPE:
                namespace[name] = entry[1]
                _globals.append((namespace, name, value, entry[1]))


def _make_exec_module(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def exec_module(self: Any, module: ModuleType) -> None:
        original(self, module)
        if _on:
            try:
                _instrument_module(module)
            except Exception:  # never break an import
                pass
    return exec_module


# ---------------------------------------------------------------------------
# ctypes functions


def _ctypes_check(fn: Any, args: Tuple[Any, ...], frame: Any) -> List[Any]:
    """Check the arguments of one instrumented ctypes call; the lent objects.

    The same checks as a wrapped ctypes function's (calls.py): ints only
    against freed memory, buffers lent without a look, structures, unions
    and arrays whose slots native.scan_slots settles without a CallCheck.
    """
    findings.count("calls")
    if calls._level == 1 and not calls.ownership_history() and not findings.strict():
        return calls._unwalked_lent(args)  # nothing a walk could find
    lent: List[Any] = []
    check: Optional[CallCheck] = None
    history = None
    for i, arg in enumerate(args):
        kind = type(arg)
        if kind is int:
            if history is None:
                history = calls.ownership_history() or calls._level == 2
            if not (arg > 0 and history):
                continue
        elif kind in _PLAIN:
            continue
        elif kind is bytes or kind is bytearray:
            lent.append(arg)
            continue
        elif calls._settled_ctypes(arg, lent):
            continue
        if check is None:
            check = CallCheck(getattr(fn, "__name__", "<C function>"), frame, args, True)
        calls._check_ctypes_arg(check, i + 1, arg, lent)
    if check is not None:
        lent.extend(check.traps)  # dangling struct fields for the quarantine (level 2)
        lent.extend(check.cursors)
    return lent


_counters = findings._counters  # findings.count("calls"), inlined below
_NO_WALK = (float, bool, str, type(None), bytes, bytearray)


def _ctypes_call(self: Any, *args: Any) -> Any:
    level = calls._level
    if not level:
        return _base_call(self, *args)
    if level == 1 and not quarantine._enabled:
        # Level 1's common case, settled here: scalars, strings and byte buffers need no walk
        # (bytes are lent, which matters only for the quarantine), and an int is an address to
        # check only when freed memory is on record.
        for arg in args:
            kind = type(arg)
            if kind is int:
                if arg > 0 and calls.ownership_history():
                    break
            elif kind not in _NO_WALK:
                break
        else:
            _counters["calls"] = _counters.get("calls", 0) + 1
            return _base_call(self, *args)
    frame = sys._getframe().f_back
    lent = _ctypes_check(self, args, frame)
    if level == 2 and (lent or quarantine._enabled):
        # As a wrapped ctypes function's level-2 call (calls.py): byte buffers go to C as
        # quarantine shadows, closed when the call returns, so that C's later use faults.
        name = getattr(self, "__name__", "<C function>")
        shadows = None
        if quarantine._enabled:
            args, shadows = quarantine.shadow_ctypes_arguments(args, self.argtypes or (), name, frame, lent)
        regions = calls._lend(lent)
        entered = quarantine.enter_call(shadows) if shadows else False
        try:
            result = _base_call(self, *args)
        finally:
            if shadows:
                quarantine.leave_call(entered)
                calls._finish_shadows(shadows, regions, name, frame)
            if lent:
                note_cursors(lent)
            calls._return_lent(regions, name, frame)
        return quarantine.translate(result, args, shadows, _returns_address(self)) if shadows else result
    if level == 1 and quarantine._enabled and quarantine._tick():  # sampling drew this call
        name = getattr(self, "__name__", "<C function>")
        args, shadows = quarantine.shadow_ctypes_arguments(args, self.argtypes or (), name, frame, (), True)
        entered = quarantine.enter_call(shadows)
        try:
            result = _base_call(self, *args)
        finally:
            quarantine.leave_call(entered)
            quarantine.finish(shadows, name, frame)
        return quarantine.translate(result, args, shadows, _returns_address(self)) if shadows else result
    return _base_call(self, *args)


def _returns_address(fn: Any) -> bool:
    """Whether ctypes returns ``fn``'s pointer result as an int (a ``c_void_p`` restype)."""
    restype = getattr(fn, "restype", None)
    return isinstance(restype, type) and issubclass(restype, ctypes.c_void_p)


# The __call__ of instrumented ctypes function pointers: level 1's common case (as the
# first branch of _ctypes_call) in C with no Python frame, a method of the function
# pointer; every other call goes to _ctypes_call unchanged (csrc/pycall.c).
_ctypes_fast_call = _pb_native.CheckedMethod(
    _CFuncPtr, _ctypes_call, "<ctypes function>", (),
    _pb_native.FC_METHOD | _pb_native.FC_CTYPES | _pb_native.FC_TICK_ALWAYS)
_ctypes_fast_call.__name__ = _ctypes_fast_call.__qualname__ = "__call__"
_ctypes_fast_call.__wrapped__ = _ctypes_call
_ctypes_types: "weakref.WeakKeyDictionary[type, type]" = weakref.WeakKeyDictionary()


def _instrumented_type(base: type) -> type:
    """A subclass of a ctypes function-pointer class whose calls are checked."""
    if getattr(base, "_ptrbridge_instrumented", False):
        return base
    made = _ctypes_types.get(base)
    if made is None:
        namespace: Dict[str, Any] = {
            "__call__": _ctypes_fast_call,
            "_ptrbridge_instrumented": True,
            "_flags_": base._flags_,  # type: ignore[attr-defined]
            "__module__": base.__module__,
            "__qualname__": base.__qualname__,
        }
        for attr in ("_restype_", "_argtypes_"):
            if attr in base.__dict__:
                namespace[attr] = base.__dict__[attr]
        if "_argtypes_" in namespace:  # a CFUNCTYPE prototype: also a callback factory
            namespace["__new__"] = _callback_new
        made = type(base.__name__, (base,), namespace)
        _ctypes_types[base] = made
    return made


def _make_cdll_init(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        if _on:
            self._FuncPtr = _instrumented_type(self._FuncPtr)
    return __init__


def _make_cfunctype(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def CFUNCTYPE(restype: Any, *argtypes: Any, **kw: Any) -> Any:
        proto = original(restype, *argtypes, **kw)
        return _instrumented_type(proto) if _on else proto
    return CFUNCTYPE


# ---------------------------------------------------------------------------
# Callbacks: R4 on results, and C calling a callback the program dropped

_MAX_DROPPED = 4096  # dropped callbacks kept alive (oldest really freed beyond this)
_kept: "OrderedDict[int, _Shim]" = OrderedDict()  # id(shim) -> shim, while kept
_dropped: "OrderedDict[int, _Shim]" = OrderedDict()


class _Shim:
    """The Python callable C really calls: counts, checks R4, reports a dropped callback."""

    __slots__ = ("fn", "name", "created_at", "error", "pointer_result", "owner", "reported", "__weakref__")

    def __init__(self, fn: Callable[..., Any], error: Any, pointer_result: bool) -> None:
        self.fn: Optional[Callable[..., Any]] = fn
        self.name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
        self.created_at = caller_site()
        self.error = error
        self.pointer_result = pointer_result
        self.owner: Any = None  # the cdata / ctypes object whose life the program controls
        self.reported = False

    @property
    def __wrapped__(self) -> Optional[Callable[..., Any]]:
        """The program's function (None once the program dropped the callback and it was swept)."""
        return self.fn

    def __call__(self, *args: Any) -> Any:
        findings.count("callbacks")
        owner = self.owner
        # Refs: self.owner, the getrefcount argument, and ours held in _kept: anything
        # more is the program's.  None left means the program dropped the callback.
        if owner is not None and sys.getrefcount(owner) <= 3:
            return self._collected()
        fn = self.fn
        if fn is None:
            return self._collected()
        synced = quarantine.callback_entered()  # a quarantined call in flight: C's view of its buffers
        try:
            result = fn(*quarantine.callback_args(args, synced))
        finally:
            quarantine.callback_left(synced)
        if self.pointer_result and levels._level and result is not None:
            # References: `result` and getrefcount's argument.  No other means
            # that the object dies when C gets its address (R4: dangling result).
            dies = sys.getrefcount(result) <= 2
            _check_callback_result(self, result, dies)
        return result

    def __repr__(self) -> str:
        return repr(self.fn) if self.fn is not None else f"<collected callback {self.name}>"

    def _collected(self) -> Any:
        if not self.reported:
            self.reported = True
            message = (
                f"ptrbridge: C called a collected callback: callback {self.name} created at "
                f"{self.created_at} was collected (the program dropped its last reference); C kept "
                f"the function pointer and called it - without ptrbridge this jumps into freed "
                f"memory. Keep the callback object alive for as long as C may call it "
                f"(ptrbridge.callback does that until release())\nSUMMARY: ptrbridge: "
                f"collected-callback {self.name} ({self.created_at})"
            )
            findings.record(findings.Finding(
                kind="collected-callback", severity="error", rule="R4", message=message,
                object=f"callback {self.name}", created_at=self.created_at, state="collected"))
        return self.error


def _check_callback_result(shim: _Shim, result: Any, dies: bool) -> None:
    extent = object_extent(result)
    if extent is None:
        if isinstance(result, _pb_ffi.CData):
            address = address_of(result)
            region = lookup(address) if address else None
            if region is None or region.kind == "pinned":
                return
            what, size = region.description, region.size
            dies = False
        else:
            return
    else:
        region = lookup(extent[0])
        if region is not None and region.kind == "pinned":
            return
        what, size = describe(result, extent[1]), extent[1]
    severity = "error" if dies else "portability"
    if severity == "portability" and not findings.strict():
        return
    state = "freed on return" if dies else "unpinned"
    message = (
        f"ptrbridge: callback result is {'Python memory that dies on return' if dies else 'unpinned Python pointer'}: "
        f"{what} returned by {shim.name} (created at {shim.created_at}) (R4: "
        f"{'C gets a dangling pointer: keep the object alive and pinned' if dies else 'pin it'} for as long as C "
        f"uses it, or return C memory from ptrbridge.CBuffer / ptrbridge.cstring)"
    )
    findings.record(findings.Finding(
        kind="callback-result", severity=severity, rule="R4", message=message, object=what,
        object_size=size, created_at=shim.created_at, function=shim.name, state=state))


def _keep(shim: _Shim, owner: Any) -> None:
    """Keep the callback's trampoline alive even after the program drops it."""
    shim.owner = owner
    with _lock:
        _kept[id(shim)] = shim
        if len(_kept) > 2 * _MAX_DROPPED:
            _sweep()


def _on_gc(phase: str, info: Dict[str, Any]) -> None:
    """After a full collection, let go of the Python functions of the callbacks the program dropped.

    What a dropped callback's function references (a closure's cells, a file
    object a write callback writes to) dies when the program drops the callback
    without ptrbridge; kept until the next sweep, it would outlive it, which a
    program can see (``sys.getrefcount``, weak references, ``__del__``).  A
    full collection is where a program that waits for objects to go calls for
    it (``gc.collect()``).  The trampoline stays, for the report if C calls it.
    """
    if phase != "stop" or info.get("generation") != 2 or not _kept:
        return
    if _sweeping or not _lock.acquire(blocking=False):
        return  # a collection inside a sweep, or another thread is keeping or sweeping
    try:
        _sweep()
    finally:
        _lock.release()


_sweeping = False  # a sweep is running (a collection it triggers must not start another)


gc.callbacks.append(_on_gc)


def _sweep() -> None:
    """Move callbacks the program dropped to the dropped list; free the oldest beyond the bound."""
    global _sweeping  # _lock is held
    if _sweeping:
        return
    _sweeping = True
    try:
        for key, shim in list(_kept.items()):
            if shim.owner is not None and sys.getrefcount(shim.owner) <= 2:
                shim.fn = None  # its closures go now; the small trampoline stays
                _dropped[key] = _kept.pop(key)
        while len(_dropped) > _MAX_DROPPED:
            _key, old = _dropped.popitem(last=False)
            old.owner = None  # C calling this one now is what it would have been without ptrbridge
    finally:
        _sweeping = False


def _make_cffi_callback(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def callback(self: Any, cdecl: Any, python_callable: Any = None, error: Any = None,
                 onerror: Any = None) -> Any:
        if python_callable is None:  # used as a decorator
            def decorate(fn: Callable[..., Any]) -> Any:
                return callback(self, cdecl, fn, error, onerror)
            return decorate
        if not callable(python_callable):
            return original(self, cdecl, python_callable, error, onerror)
        ctype = self._typeof(cdecl, consider_function_as_funcptr=True) if isinstance(cdecl, str) else cdecl
        result = getattr(ctype, "result", None)
        pointer = result is not None and result.kind == "pointer"
        value = error if error is not None else (self.NULL if pointer else 0 if result is not None
                                                 and result.kind in ("primitive", "enum") else None)
        shim = _Shim(python_callable, value, pointer)
        cdata = original(self, cdecl, shim, error, onerror)
        _keep(shim, cdata)
        return cdata
    return callback


def _callback_new(cls: Any, *args: Any) -> Any:
    base_new = _CFuncPtr.__new__
    if len(args) == 1 and callable(args[0]) and not isinstance(args[0], (int, _CFuncPtr)):
        restype = getattr(cls, "_restype_", None)
        pointer = isinstance(restype, type) and issubclass(
            restype, (ctypes.c_void_p, ctypes.c_char_p, ctypes.c_wchar_p, ctypes._Pointer))  # type: ignore[attr-defined]
        error = None if restype is None else 0 if not pointer else None
        shim = _Shim(args[0], error, pointer)
        obj = base_new(cls, shim)
        _keep(shim, obj)
        return obj
    return base_new(cls, *args)


def _site_of(frame: Any) -> str:
    return frame_site(frame)


_ = _pb_lib  # the bindings are loaded before any library is instrumented
