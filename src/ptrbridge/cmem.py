"""C memory: copies of Python data on the tracked C heap (the malloc-copy strategy).

When C must keep data beyond a call and pinning is impractical, copy it to C
memory: C may keep a :class:`CBuffer`'s pointer as long as the CBuffer is
alive, or for ever after :meth:`CBuffer.transfer` hands ownership to C.
Blocks come from the tracked allocator, so ``ptrbridge.stats()`` counts them
and a bad free is reported instead of corrupting the heap.

Example: a producer whose delivery callback frees the payload::

    buf = ptrbridge.CBuffer.copy(payload)
    lib.produce(topic, buf.transfer(), len(payload))   # C calls pb_free() later
"""
from __future__ import annotations

from typing import Any, Union

from ._bindings import BufferBase, address_of, check, ffi, lib

_ffi = ffi
from .errors import UseAfterTransferError

__all__ = ["CBuffer", "TypedCBuffer", "cnew", "cstring", "free"]

_TRANSFERRED, _FREED = "transferred", "freed"


def _check_size(size: object) -> int:
    if isinstance(size, bool) or not isinstance(size, int):
        raise TypeError(f"ptrbridge.CBuffer: size must be an int, not {type(size).__name__}")
    if size < 0:
        raise ValueError(f"ptrbridge.CBuffer: size must not be negative, got {size}")
    return size


class CBuffer(BufferBase):  # type: ignore[misc]
    """A block of tracked C memory owned by Python until :meth:`transfer`.

    ``CBuffer(size)`` allocates ``size`` zeroed bytes; :meth:`copy` copies a
    buffer.  ``len(buf)`` is the size, ``memoryview(buf)`` is a zero-copy view,
    ``buf.ptr`` is a cffi ``char *`` for C.  The memory is freed when the
    CBuffer is garbage-collected (or by :meth:`free` / ``with``), unless it
    was transferred to C.  (Allocation, copy and free are done by the C base
    type, so a CBuffer costs about as much as a bytes object.)
    """

    __slots__ = ("_gone",)  # "transferred" or "freed" once the memory is given up

    def __new__(cls, size: int) -> "CBuffer":
        return cls._alloc(_check_size(size))  # type: ignore[no-any-return]

    @classmethod
    def copy(cls, data: Any) -> "CBuffer":
        """Copy any object exporting a contiguous buffer into new C memory."""
        try:
            return cls._copy(data)  # type: ignore[no-any-return]
        except TypeError:
            raise TypeError(f"ptrbridge.CBuffer.copy: {type(data).__name__} does not export a buffer") from None
        except (BufferError, ValueError):  # exporters refuse non-contiguous requests either way
            raise TypeError(
                f"ptrbridge.CBuffer.copy: {type(data).__name__} is not contiguous; copy it to bytes first"
            ) from None

    def _live(self, what: str) -> int:
        if not self._owns:
            raise UseAfterTransferError(
                f"ptrbridge: CBuffer.{what} after its memory was {self.state}; C owns or freed it now"
            )
        return self._address  # type: ignore[no-any-return]

    @property
    def ptr(self) -> Any:
        """A cffi ``char *`` to the memory (valid while this CBuffer owns it)."""
        return ffi.cast("char *", self._live("ptr"))

    @property
    def address(self) -> int:
        """The memory's address as an int."""
        return self._live("address")

    @property
    def state(self) -> str:
        """``"owned"``, ``"transferred"`` or ``"freed"``."""
        return "owned" if self._owns else getattr(self, "_gone", _FREED)

    def to_bytes(self) -> bytes:
        """A bytes copy of the contents."""
        self._live("to_bytes()")
        return bytes(self)

    def __getitem__(self, index: Union[int, slice]) -> Union[int, bytes]:
        self._live("__getitem__")
        with memoryview(self) as view:
            item = view[index]
            return item if isinstance(item, int) else bytes(item)

    def __setitem__(self, index: Union[int, slice], value: Any) -> None:
        self._live("__setitem__")
        with memoryview(self) as view:
            view[index] = value

    def transfer(self) -> Any:
        """Hand ownership to C and return the ``char *``.

        From now on C must free the memory with ``pb_free`` (for instance in a
        delivery callback); until it does, ``stats().transferred`` counts it.
        Python can no longer use this CBuffer.  Raises ``BufferError`` while a
        memoryview of it is alive.
        """
        address = self._live("transfer()")
        self._detach()  # BufferError if exported; the memory is no longer ours
        self._gone = _TRANSFERRED
        check(lib.pb__alloc_set_transferred(ffi.cast("void *", address), 1),
              f"CBuffer.transfer() of {address:#x}")
        return ffi.cast("char *", address)

    def free(self) -> None:
        """Free the memory now (instead of at garbage collection)."""
        self._live("free()")
        self._release_memory()  # BufferError if exported
        self._gone = _FREED

    def __enter__(self) -> "CBuffer":
        return self

    def __exit__(self, *exc: object) -> None:
        if self._owns:
            self.free()

    def __repr__(self) -> str:
        where = f" at {self._address:#x}" if self._owns else ""
        return f"<ptrbridge.{type(self).__name__} {len(self)} bytes{where} {self.state}>"


class TypedCBuffer(CBuffer):
    """A :class:`CBuffer` holding one C object of a known type; see :func:`cnew`."""

    __slots__ = ("_ctype",)

    _ctype: Any

    @property
    def c(self) -> Any:
        """A typed cffi pointer to the object (``zs.c.next_in = ...``)."""
        return self._ffi_cast()

    def _ffi_cast(self) -> Any:
        return ffi.cast(self._ctype, self._live("c"))

    @property
    def ctype(self) -> Any:
        """The pointer type of :attr:`c`."""
        return self._ctype


def cnew(ctype: Any, ffi: Any = None) -> TypedCBuffer:
    """Allocate one zeroed C object in tracked C memory and return it as a typed CBuffer.

    ``ctype`` names the pointer type (``"z_stream *"``) or the object type
    (``"z_stream"``), parsed by ``ffi`` (default: ptrbridge's own), or is a
    cffi CType.  Unlike ``ffi.new`` the object is C memory: C may keep
    pointers to it, and at check level 2 it is scanned for pointers it holds
    to Python memory.  ``buf.c`` is the typed pointer.
    """
    parser = ffi if ffi is not None else _ffi
    ct = parser.typeof(ctype) if isinstance(ctype, str) else ctype
    pointer = ct if ct.kind == "pointer" else parser.typeof(parser.getctype(ct, "*"))
    item = pointer.item
    if item.kind in ("void", "function") or (item.kind in ("struct", "union") and item.fields is None):
        raise TypeError(f"ptrbridge.cnew: cannot allocate '{item.cname}': its size is unknown")
    buf = TypedCBuffer._alloc(parser.sizeof(item))
    buf._ctype = pointer
    return buf  # type: ignore[no-any-return]


def cstring(text: Union[str, bytes]) -> CBuffer:
    """A NUL-terminated copy of ``text`` in C memory, like Go's ``C.CString``.

    ``str`` is encoded as UTF-8.  An embedded NUL raises ``ValueError`` (C
    would silently see a shorter string).  ``len()`` includes the NUL.
    """
    if isinstance(text, str):
        data = text.encode("utf-8")
    elif isinstance(text, (bytes, bytearray, memoryview)):
        data = bytes(text)
    else:
        raise TypeError(f"ptrbridge.cstring: expected str or bytes, not {type(text).__name__}")
    if b"\0" in data:
        raise ValueError(
            f"ptrbridge.cstring: embedded NUL at offset {data.index(0)}; C would see a truncated string"
        )
    return CBuffer._copy(data + b"\0")  # type: ignore[no-any-return]


def free(ptr: Any) -> None:
    """Free a block of the tracked allocator given as a cffi pointer or an int.

    For memory that came back from C (``CBuffer.transfer()`` results, blocks C
    allocated with ``pb_malloc``).  Raises :class:`~ptrbridge.DoubleFreeError`
    or :class:`~ptrbridge.NotOwnedError` instead of corrupting the heap.
    """
    if isinstance(ptr, CBuffer):
        ptr.free()
        return
    if not isinstance(ptr, (int, ffi.CData)) or isinstance(ptr, bool):
        raise TypeError(f"ptrbridge.free: expected a cffi pointer or an int, not {type(ptr).__name__}")
    address = address_of(ptr)
    check(lib.pb__free_quiet(ffi.cast("void *", address)), f"free({address:#x})")
