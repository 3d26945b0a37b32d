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

from typing import TYPE_CHECKING, Any, List, Sequence, Union

from ._bindings import BufferBase, check, checked_address, ffi, lib, native
from .errors import NotOwnedError, UseAfterTransferError

_ffi = ffi

__all__ = ["CBuffer", "CBatch", "TypedCBuffer", "cnew", "cstring", "free"]

native.buffers_init(UseAfterTransferError, lib.pb__charp)


def _check_size(size: object) -> int:
    if isinstance(size, bool) or not isinstance(size, int):
        raise TypeError(f"ptrbridge.CBuffer: size must be an int, not {type(size).__name__}")
    if size < 0:
        raise ValueError(f"ptrbridge.CBuffer: size must not be negative, got {size}")
    if size > (1 << 62):
        raise MemoryError(f"ptrbridge: CBuffer(): cannot allocate {size} bytes of C memory: too large")
    return size


class CBuffer(BufferBase):  # type: ignore[misc]
    """A block of tracked C memory owned by Python until :meth:`transfer`.

    ``CBuffer(size)`` allocates ``size`` zeroed bytes; ``CBuffer.copy(data)``
    copies any contiguous buffer.  ``len(buf)`` is the size, ``memoryview(buf)``
    is a zero-copy view, ``buf.ptr`` is a cffi ``char *`` for C.  The memory is
    freed when the CBuffer is garbage-collected (or by ``buf.free()`` / ``with``),
    unless ``buf.transfer()`` handed it to C, which then frees it with ``pb_free``.

    While Python owns the block, ``pb_free`` and :func:`ptrbridge.free` refuse it
    (:class:`~ptrbridge.NotOwnedError` naming this CBuffer).  After
    ``transfer()`` or ``free()`` every use (``len``, ``memoryview``, indexing,
    ``ptr``, ``copy``...) raises :class:`~ptrbridge.UseAfterTransferError`
    saying which of the two happened.  Example::

        buf = ptrbridge.CBuffer.copy(payload)
        n = len(buf)                          # before transfer: len() is gone after
        lib.produce(topic, buf.transfer(), n) # C calls pb_free(ptr) when done

    Allocation, copy, transfer and free are single C calls: a CBuffer costs
    about as much as a bytes object.
    """

    __slots__ = ()

    if TYPE_CHECKING:  # implemented by the C base type (csrc/pybuffer.c)
        state: str
        """``"owned"``, ``"transferred"`` or ``"freed"``."""

        @classmethod
        def copy(cls, data: Any) -> "CBuffer":
            """Copy any object exporting a contiguous buffer into new C memory."""

        def transfer(self) -> Any:
            """Hand ownership to C and return the ``char *`` (C frees it with ``pb_free``).

            Until C frees it, ``stats().transferred`` counts it.  Raises
            ``BufferError`` while a memoryview of it is alive.
            """

        def free(self) -> None:
            """Free the memory now (instead of at garbage collection)."""

    def __new__(cls, size: int) -> "CBuffer":
        return cls._alloc(_check_size(size))  # type: ignore[no-any-return]

    @classmethod
    def copy_many(cls, buffers: Sequence[Any]) -> "CBatch":
        """Copy every buffer of ``buffers`` into its own block of C memory: a :class:`CBatch`.

        One C call for the batch; each block is separately freeable by C with
        ``pb_free`` once :meth:`CBatch.transfer` handed them over.
        """
        return CBatch(buffers)

    def _live(self, what: str) -> int:
        if not self._owns:
            self._usable(f"CBuffer.{what}")  # raises UseAfterTransferError saying what happened
        return self._address  # type: ignore[no-any-return]

    @property
    def ptr(self) -> Any:
        """A cffi ``char *`` to the memory (valid while this CBuffer owns it)."""
        return lib.pb__charp(self._live("ptr"))

    @property
    def address(self) -> int:
        """The memory's address as an int."""
        return self._live("address")

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

    def __enter__(self) -> "CBuffer":
        return self

    def __exit__(self, *exc: object) -> None:
        if self._owns:
            self.free()

    def __repr__(self) -> str:
        where = f" at {self._address:#x}" if self._owns else ""
        return f"<ptrbridge.{type(self).__name__} {self._size} bytes{where} {self.state}>"


class CBatch:
    """C copies of a list of buffers, for producers that hand C many payloads at once.

    ``batch = CBuffer.copy_many(payloads)`` copies each payload into its own
    block of tracked C memory in one C call.  ``batch.pointers`` is a cffi
    ``char *[n]`` and ``batch.lengths`` a ``size_t[n]``, ready for a C function
    taking arrays.  Python owns the blocks (freed with the batch) until
    :meth:`transfer` hands every block to C, which frees each one with
    ``pb_free`` (for instance in a per-message delivery callback)::

        batch = ptrbridge.CBuffer.copy_many(payloads)
        lib.produce_batch(topic, batch.pointers, batch.lengths, len(batch))
        batch.transfer()      # only if C accepted them: C now frees each pointer
    """

    __slots__ = ("pointers", "lengths", "_n", "_state", "_site")

    def __init__(self, buffers: Sequence[Any]) -> None:
        items = buffers if isinstance(buffers, (list, tuple)) else list(buffers)
        n = len(items)
        self._n = n
        self._state = "failed"
        self.pointers: Any = ffi.new("char *[]", n)
        self.lengths: Any = ffi.new("size_t[]", n)
        self._site: int = native.batch_copy(items, int(ffi.cast("uintptr_t", self.pointers)),
                                            int(ffi.cast("uintptr_t", self.lengths)))
        self._state = "owned"

    def __len__(self) -> int:
        return self._n

    @property
    def state(self) -> str:
        """``"owned"``, ``"transferred"`` or ``"freed"``."""
        return self._state

    def _release(self, transfer: bool, what: str) -> None:
        if self._state != "owned":
            raise UseAfterTransferError(
                f"ptrbridge: CBatch.{what} after the batch was {self._state}; "
                f"created at {native.site_text(self._site)}")
        native.batch_release(int(ffi.cast("uintptr_t", self.pointers)), self._n, transfer)
        self._state = "transferred" if transfer else "freed"

    def transfer(self) -> Any:
        """Hand every block to C and return :attr:`pointers`; C frees each with ``pb_free``."""
        self._release(True, "transfer()")
        return self.pointers

    def free(self) -> None:
        """Free every block now (instead of when the batch is garbage-collected)."""
        self._release(False, "free()")

    def __del__(self) -> None:
        if getattr(self, "_state", None) == "owned":
            native.batch_release(int(ffi.cast("uintptr_t", self.pointers)), self._n, False)
            self._state = "freed"

    def __repr__(self) -> str:
        return f"<ptrbridge.CBatch {self._n} buffers {self._state}>"


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
    # Never read .fields: cffi aborts on an opaque struct (typedef ... T;).
    # sizeof raises ffi.error for a type of unknown size instead.
    size = None
    if item.kind not in ("void", "function"):
        try:
            size = parser.sizeof(item)
        except (parser.error, TypeError):
            size = None
    if size is None:
        raise TypeError(f"ptrbridge.cnew: cannot allocate '{item.cname}': its size is unknown (an opaque "
                        f"or incomplete type); allocate it with the library's own constructor")
    buf = TypedCBuffer._alloc(size)
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
    or :class:`~ptrbridge.NotOwnedError` instead of corrupting the heap; a block
    that a live CBuffer owns is refused with ``NotOwnedError`` naming it (free
    the CBuffer with ``buf.free()``, or ``transfer()`` it first).  An integer
    outside ``0 .. UINTPTR_MAX`` is a ``ValueError``, other types ``TypeError``.
    """
    if isinstance(ptr, CBuffer):
        ptr.free()
        return
    address = checked_address(ptr, "free()")
    status = lib.pb__free_quiet(ffi.cast("void *", address))
    if status == lib.PB_ERR_PY_OWNED:
        owner = native.buffer_owner(address)
        what = (f"{_describe_cbuffer(owner)} created at {owner._site}" if owner is not None
                else "a live CBuffer")
        raise NotOwnedError(
            f"ptrbridge: free({address:#x}): the block belongs to {what}, which still uses and "
            f"will free it; call its .free(), or .transfer() it to C first")
    check(status, f"free({address:#x})")


def _describe_cbuffer(buf: Any) -> str:
    """``CBuffer(100)`` or ``TypedCBuffer 'z_stream *'(112)`` for messages."""
    name = type(buf).__name__
    ctype = getattr(buf, "_ctype", None)
    if ctype is not None:
        return f"{name} '{ctype.cname}'({buf._size})"
    return f"{name}({buf._size})"


def live_cbuffers() -> List[Any]:
    """Every CBuffer that still owns its memory (newest first)."""
    return native.buffers_live()  # type: ignore[no-any-return]
