"""Handles: integer tokens that stand for Python objects, like Go's ``cgo.Handle``.

C code cannot hold a Python object safely, but it can hold an integer.
``Handle(obj)`` gives a nonzero token for ``obj``; C stores it (as userdata, in
a queue, in a struct) and hands it back later; Python turns it into the object
again with :func:`handle_value`.  The object stays alive until the handle is
deleted from Python (:meth:`Handle.delete`) or released from C
(``pb_handle_release(token)``, from any thread, without the GIL).

Tokens encode a slot and a generation, so a stale, forged or twice-deleted
token raises :class:`~ptrbridge.InvalidHandleError` instead of resolving to
some other object.  Token 0 is never valid, so C APIs may use it as "none".

Example, both sides of the boundary::

    # Python
    h = ptrbridge.Handle(request)
    lib.submit(int(h))               # C keeps the token as userdata

    @ffi.def_extern()
    def on_done(token):              # C calls back with the token
        request = ptrbridge.handle_value(token)
        ...

    /* C, when it will never use the token again (any thread): */
    pb_handle_release(token);

A handle is not deleted when the :class:`Handle` object is garbage-collected:
the token may still be inside C.  Delete it explicitly, release it from C, or
use ``with ptrbridge.Handle(obj) as h:`` for handles that only live for a block.
"""
from __future__ import annotations

import threading
from collections import Counter
from typing import Any, Dict, Optional

from ._bindings import HandleBase, ffi, lib, native
from .callsite import caller_site
from .errors import HandleLimitError, InvalidHandleError

__all__ = ["Handle", "HandleTable", "handle_value", "collect_handles"]

_UINTPTR_MAX = (1 << (8 * ffi.sizeof("uintptr_t"))) - 1

# The table of objects lives in C (csrc/pyhandles.c) next to the slot states
# (csrc/handles.c): a lookup is an array read under the GIL, and handles C
# released are dropped on a Python thread at the next handle operation.


def collect_handles() -> int:
    """Drop the Python objects of handles that C released; return how many."""
    return int(native.handles_drain())


def _invalid(token: object, what: str = "") -> InvalidHandleError:
    if isinstance(token, int) and not isinstance(token, bool):
        if token == 0:
            detail = "token 0 is never a valid handle"
        elif token < 0 or token > _UINTPTR_MAX:
            detail = f"token {token} is out of range for uintptr_t"
        else:
            detail = f"token {token:#x} was deleted, released by C, or never issued"
    else:
        detail = f"a handle token must be an int, not {type(token).__name__}"
    return InvalidHandleError(f"ptrbridge: misuse of an invalid Handle{what}: {detail}")


native.handles_init(_invalid)


def _checked_token(token: object, what: str) -> int:
    if isinstance(token, HandleBase):
        return int(token)
    if (
        isinstance(token, bool)
        or not isinstance(token, int)
        or token <= 0
        or token > _UINTPTR_MAX
    ):
        raise _invalid(token, what)
    return token


def handle_value(token: "int | Handle") -> Any:
    """Return the object behind a token that came back from C.

    Raises :class:`~ptrbridge.InvalidHandleError` if the token is 0, forged,
    stale, deleted or released.
    """
    return native.handle_lookup(_checked_token(token, " in handle_value()"), " in handle_value()")


class Handle(HandleBase):  # type: ignore[misc]
    """A nonzero integer token for a Python object, safe to give to C.

    ``Handle(obj)`` creates a handle in the default (unbounded) table;
    :meth:`HandleTable.new` creates one in a bounded table.  ``int(h)`` and
    ``h.token`` are the token; ``h.value()`` returns the object and
    ``h.delete()`` deletes the handle (both raise
    :class:`~ptrbridge.InvalidHandleError` once it was deleted or released by
    C).  Two ``Handle`` objects are equal when their tokens are.
    """

    __slots__ = ()

    @classmethod
    def from_token(cls, token: int) -> "Handle":
        """Return a :class:`Handle` for a live token (for example one C handed back)."""
        tok = _checked_token(token, " in Handle.from_token()")
        return native.handle_attach(cls, tok, " in Handle.from_token()")  # type: ignore[no-any-return]

    def is_valid(self) -> bool:
        """True while the handle has been neither deleted nor released."""
        return bool(lib.pb_handle_is_valid(self.token))

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc: object) -> None:
        if lib.pb_handle_is_valid(self.token):
            self.delete()

    def __repr__(self) -> str:
        state = "live" if lib.pb_handle_is_valid(self.token) else "invalid"
        return f"<ptrbridge.Handle {self.token:#x} {state}>"


class HandleTable:
    """A bounded group of handles.

    ``HandleTable(max_handles=N).new(obj)`` returns a :class:`Handle` like
    ``Handle(obj)``, but refuses with :class:`~ptrbridge.HandleLimitError` once
    N handles of this table are live, naming where the oldest live handles
    were created.  This catches the classic leak of C code that never signals
    completion, so handles pile up without bound.  Tokens from every table
    resolve through :func:`handle_value`.
    """

    def __init__(self, max_handles: Optional[int] = None) -> None:
        if max_handles is not None and (
            isinstance(max_handles, bool) or not isinstance(max_handles, int) or max_handles < 1
        ):
            raise ValueError(
                f"ptrbridge.HandleTable: max_handles must be a positive int or None, not {max_handles!r}"
            )
        self.max_handles = max_handles
        self._sites: Dict[int, str] = {}  # token -> creation site, oldest first
        self._lock = threading.Lock()

    def new(self, obj: Any) -> Handle:
        """Create a handle for ``obj`` in this table."""
        collect_handles()
        site = caller_site()
        with self._lock:
            if self.max_handles is not None and len(self._sites) >= self.max_handles:
                raise self._limit_error()
            h: Handle = native.handle_new_owned(Handle, obj, self)
            self._sites[int(h)] = site
        return h

    def _forget(self, token: int) -> None:
        with self._lock:
            self._sites.pop(token, None)

    def _limit_error(self) -> HandleLimitError:
        oldest = list(self._sites.values())[:64]
        by_site = Counter(oldest)
        where = ", ".join(
            f"{site} (x{count})" if count > 1 else site for site, count in by_site.most_common(5)
        )
        return HandleLimitError(
            f"ptrbridge.HandleTable: handle limit reached: {len(self._sites)} live handles "
            f"(max_handles={self.max_handles}); the oldest live handles were created at {where}; "
            f"does C ever call pb_handle_release(), or Python Handle.delete()?"
        )

    def __len__(self) -> int:
        """Number of live handles of this table (after dropping C releases)."""
        collect_handles()
        return len(self._sites)

    def __repr__(self) -> str:
        return f"<ptrbridge.HandleTable live={len(self._sites)} max_handles={self.max_handles}>"
