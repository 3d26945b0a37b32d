"""Callbacks C can call safely: rule R4 and callback lifetime.

R4. A Python callback called from C may not return a pointer to unpinned
Python-owned memory.

The most common crash in Python FFI code is C calling a callback whose
trampoline was garbage-collected.  A :class:`Callback` is kept alive by the
registry until :meth:`Callback.release`, and even after release its C
trampoline stays valid: a late call from C reports
:class:`~ptrbridge.ReleasedCallbackError` and returns the error value instead
of jumping into freed memory.

An exception raised inside the callback cannot cross C.  It is stored, C gets
the declared ``error`` value, and the exception is raised again in Python
when the checked call (``ptrbridge.wrap``) that led to the callback returns.
Without an enclosing checked call (a callback run by a C thread, say) it is
reported through ``sys.unraisablehook``.

Both sides of the boundary::

    # Python
    def on_item(token, value):
        ptrbridge.handle_value(token).append(value)   # or userdata=0, see below
        return 0

    cb = ptrbridge.callback(ffi, "int(void *, int)", on_item, error=-1, userdata=0)
    lib.for_each(items, cb.cdata, ffi.cast("void *", int(ptrbridge.Handle(results))))
    cb.release()

    /* C */
    for (i = 0; i < n; i++)
        if (fn(userdata, items[i]) != 0) break;
"""
from __future__ import annotations

import ctypes
import sys
import threading
from typing import Any, Callable, Dict, List, Optional

from . import levels, quarantine
from ._bindings import address_of, ffi, write_unraisable
from .callsite import caller_site
from .calls import defer_exception
from .checking import CallCheck, object_extent
from .errors import CallbackResultError, ReleasedCallbackError
from .handles import handle_value
from .ownership import ctypes_pointer_value, describe

__all__ = ["Callback", "callback", "extern_callback", "live_callbacks"]

_CFuncPtr = ctypes.CFUNCTYPE(None).__mro__[1]
_PointerBase = ctypes._Pointer  # type: ignore[attr-defined]
_POINTER_RESTYPES = (ctypes.c_void_p, ctypes.c_char_p, ctypes.c_wchar_p)

_lock = threading.Lock()
_live: Dict[int, "Callback"] = {}
# Released callbacks keep their C trampolines here for the life of the
# process: C may still hold the function pointer.  Their Python function and
# closures are dropped at release, so only the small trampoline remains.
_retired: List[Any] = []


def live_callbacks() -> int:
    """Number of callbacks created and not yet released."""
    return len(_live)


class Callback:
    """A Python function C can call; see :func:`callback` and :func:`extern_callback`.

    ``cdata`` is what to hand to C: the cffi function pointer, the ctypes
    function object, or (for ``extern "Python"``) the name it was registered
    under.  Use ``with`` or :meth:`release` when C will not call it any more.
    """

    def __init__(self, fn: Callable[..., Any], name: str, error: Any, userdata: Optional[int],
                 pointer_result: bool) -> None:
        self._fn: Optional[Callable[..., Any]] = fn
        self.name = name
        self.error = error
        self.userdata = userdata
        self.pointer_result = pointer_result
        self.defined_at = caller_site()
        self.released_at: Optional[str] = None
        self.cdata: Any = None
        # Converts the result as cffi/ctypes will, so that a result of the wrong
        # type is an exception of the callback (re-raised by the enclosing
        # checked call) instead of a message cffi prints and swallows.
        self._convert: Optional[Callable[[Any], Any]] = None

    @property
    def released(self) -> bool:
        """True after :meth:`release`."""
        return self._fn is None

    def release(self) -> None:
        """Stop accepting calls: a later call from C reports ReleasedCallbackError.

        Releasing twice is harmless.  The C trampoline itself is never freed.
        """
        with _lock:
            if self._fn is None:
                return
            self._fn = None
            self.released_at = caller_site()
            _live.pop(id(self), None)
            _retired.append(self.cdata)

    def __enter__(self) -> "Callback":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        state = f"released at {self.released_at}" if self.released else "live"
        return f"<ptrbridge.Callback {self.name} defined at {self.defined_at} {state}>"

    # -- the trampoline's body ---------------------------------------------
    def _invoke(self, args: tuple) -> Any:
        fn = self._fn
        if fn is None:
            _deliver(ReleasedCallbackError(
                f"ptrbridge: call through a released callback {self.name} (defined at "
                f"{self.defined_at}, released at {self.released_at}); C kept the function pointer "
                f"after release() - release only when C can no longer call it"
            ), self)
            return self.error
        synced = quarantine.callback_entered()  # a quarantined call in flight: C's view of its buffers
        try:
            if self.userdata is not None:
                args = self._resolve_userdata(args)
            result = fn(*quarantine.callback_args(args, synced))
            if self._convert is not None:
                self._convert(result)
            if self.pointer_result and levels._level and result is not None:
                self._check_result(result, fn)
            return result
        except BaseException as exc:  # nothing may unwind through C frames
            _deliver(exc, self)
            return self.error
        finally:
            quarantine.callback_left(synced)

    def _resolve_userdata(self, args: tuple) -> tuple:
        index = self.userdata
        if index is None:
            return args
        raw = args[index]
        token = 0 if raw is None else address_of(raw) if isinstance(raw, ffi.CData) else int(raw)
        items = list(args)
        items[index] = handle_value(token)  # InvalidHandleError for a bad token
        return tuple(items)

    def _check_result(self, result: Any, fn: Callable[..., Any]) -> None:
        """R4: the pointer returned to C must not be unpinned Python-owned memory.

        Besides the registry, the owners considered are the result itself, the
        callback's closure variables, and the locals of the Python code that
        made the C call (when C calls back on the same thread).
        """
        extent = object_extent(result)
        if isinstance(result, ffi.CData) and extent is None:
            address = address_of(result)
        elif isinstance(result, int):
            address = result
        elif isinstance(result, _PointerBase):
            address = ctypes_pointer_value(result)
            extent = None
        elif extent is not None:
            address = extent[0]
        else:
            return
        known = (result,) + tuple(cell.cell_contents for cell in getattr(fn, "__closure__", None) or ()
                                  if _cell_filled(cell))
        # Frames: _check_result, _invoke, the trampoline; above them the Python
        # code that made the C call - none when C calls from a thread of its own.
        frame: Any = sys._getframe(0)
        for _ in range(3):
            frame = frame.f_back if frame is not None else None
        owner = CallCheck(self.name, frame, known).classify(address) if address else None
        if owner is None and extent is not None:  # the object itself is Python memory
            return self._fail(describe(result, extent[1]), "returned by")
        if owner is not None and not owner.pinned:
            self._fail(owner.description, "returned by")

    def _fail(self, what: str, verb: str) -> None:
        raise CallbackResultError(
            f"ptrbridge: callback result is unpinned Python pointer: {what} {verb} {self.name} "
            f"(defined at {self.defined_at}) (pin it with ptrbridge.Pinner for as long as C uses "
            f"it, or return C memory from ptrbridge.CBuffer / ptrbridge.cstring)"
        )


def _cell_filled(cell: Any) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # an empty cell
        return False
    return True


def _deliver(exc: BaseException, cb: Callback) -> None:
    """Hand an exception to the enclosing checked call, or report it as unraisable."""
    if not defer_exception(exc):
        write_unraisable(exc, f"ptrbridge callback {cb.name}")


def _register(cb: Callback) -> Callback:
    with _lock:
        _live[id(cb)] = cb
    return cb


def callback(target: Any, signature: Any = None, fn: Optional[Callable[..., Any]] = None, *,
             error: Any = None, userdata: Optional[int] = None, name: Optional[str] = None) -> Callback:
    """Make a C-callable callback that is kept alive until released.

    cffi: ``callback(ffi, "int(int, void *)", fn, error=-1)`` (``signature`` is
    a C function type string or CType); ctypes: ``callback(CFUNCTYPE(c_int,
    c_void_p), fn, error=-1)``.  ``error`` is what C gets when ``fn`` raises
    (default: 0, or NULL for pointer results); ``userdata=i`` says that
    argument ``i`` carries a :class:`~ptrbridge.Handle` token: it is validated
    and ``fn`` receives the object instead.  Returns a :class:`Callback`;
    pass ``cb.cdata`` to C.
    """
    if isinstance(target, type) and issubclass(target, _CFuncPtr):
        if fn is not None or not callable(signature):
            raise TypeError("ptrbridge.callback: with a ctypes prototype, call callback(proto, fn, ...)")
        fn = signature
        restype = getattr(target, "_restype_", None)
        pointer = isinstance(restype, type) and issubclass(restype, _POINTER_RESTYPES + (_PointerBase,))
        _check_userdata(userdata, len(getattr(target, "_argtypes_", ()) or ()))
        cb = Callback(fn, str(name or getattr(fn, "__qualname__", "callback")), error, userdata, pointer)
        cb._convert = _ctypes_converter(restype)
        proto: Any = target
        cb.cdata = proto(lambda *args: cb._invoke(args))
        return _register(cb)
    if signature is None or fn is None or not callable(fn):
        raise TypeError("ptrbridge.callback: call callback(ffi, 'ret(args)', fn, ...) for cffi")
    ctype = _function_type(target, signature) if isinstance(signature, str) else signature
    if ctype.kind != "function":
        raise TypeError(f"ptrbridge.callback: {ctype.cname!r} is not a function type")
    pointer = ctype.result.kind == "pointer"
    _check_userdata(userdata, len(ctype.args))
    if error is None and ctype.result.kind in ("primitive", "enum"):
        error = 0
    elif error is None and pointer:
        error = target.NULL
    cb = Callback(fn, str(name or getattr(fn, "__qualname__", "callback")), error, userdata, pointer)
    cb._convert = cffi_converter(target, ctype.result)
    cb.cdata = target.callback(ctype, lambda *args: cb._invoke(args), error=error)
    return _register(cb)


def extern_callback(ffi_: Any, name: Optional[str] = None, *, error: Any = None,
                    userdata: Optional[int] = None, pointer_result: bool = False) -> Callable[[Callable[..., Any]], Callback]:
    """Decorator for cffi API-mode ``extern "Python"`` functions, with the same checks.

    ::

        @ptrbridge.extern_callback(ffi, error=-1)
        def on_item(value):       # declared in the cdef as extern "Python" int on_item(int);
            ...

    The C function ``lib.on_item`` exists for the life of the process; after
    ``release()`` a call reports ReleasedCallbackError and returns ``error``.
    Set ``pointer_result=True`` when the C declaration returns a pointer, so
    the R4 check runs.
    """
    def decorate(fn: Callable[..., Any]) -> Callback:
        cb = Callback(fn, name or fn.__name__, error, userdata, pointer_result)
        trampoline = lambda *args: cb._invoke(args)  # noqa: E731 - registered under the C name
        kwargs = {"name": cb.name} if error is None else {"name": cb.name, "error": error}
        ffi_.def_extern(**kwargs)(trampoline)
        cb.cdata = cb.name
        return _register(cb)

    return decorate


def cffi_converter(ffi_: Any, result: Any) -> Optional[Callable[[Any], Any]]:
    """A function that converts a callback's result to ``result`` as cffi will (or raises)."""
    if result.kind == "void":
        return None
    slot = ffi_.new(ffi_.getctype(result, "[1]"))

    def convert(value: Any) -> None:
        slot[0] = value  # TypeError / OverflowError exactly where cffi's conversion fails

    return convert


def _ctypes_converter(restype: Any) -> Optional[Callable[[Any], Any]]:
    """Likewise for a ctypes callback with a simple, non-pointer result type."""
    simple = ctypes._SimpleCData  # type: ignore[attr-defined]
    if not (isinstance(restype, type) and issubclass(restype, simple)) or issubclass(restype, _POINTER_RESTYPES):
        return None

    def convert(value: Any) -> None:
        if value is not None and not isinstance(value, restype):
            restype(value)

    return convert


def _function_type(ffi_: Any, signature: str) -> Any:
    """The function-pointer CType of ``"int(int, void *)"`` or ``"int(*)(int, void *)"``."""
    if "(*)" in signature:
        return ffi_.typeof(signature)
    head, paren, rest = signature.partition("(")
    return ffi_.typeof(f"{head}(*)({rest}" if paren else signature)


def _check_userdata(userdata: Optional[int], nargs: int) -> None:
    if userdata is None:
        return
    if isinstance(userdata, bool) or not isinstance(userdata, int) or not 0 <= userdata < max(nargs, 1):
        raise ValueError(
            f"ptrbridge.callback: userdata must be the index of an argument (0..{nargs - 1}), "
            f"not {userdata!r}"
        )

