"""The tracked C allocator and C memory from Python: CBuffer, cstring, cnew, free."""
from __future__ import annotations

import array
import gc
from typing import Any, Dict

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import ptrbridge
from ptrbridge import CBuffer, DoubleFreeError, NotOwnedError, UseAfterTransferError
from ptrbridge._bindings import ffi, lib



# --- the allocator ----------------------------------------------------------------

def test_free_null_is_ok() -> None:
    assert lib.pb_free(ffi.NULL) == lib.PB_OK


def test_calloc_overflow_returns_null() -> None:
    assert lib.pb_calloc(1 << 62, 1 << 8) == ffi.NULL


def _foreign_block() -> Any:
    """Memory ptrbridge never allocated, at an address pb_free cannot have seen (an mmap).

    (A libc malloc block could reuse an address pb_free just gave back, which
    the allocator would then call a double free.)
    """
    import mmap

    return mmap.mmap(-1, 4096)


def test_foreign_and_double_free_are_refused_and_reported(capfd: pytest.CaptureFixture) -> None:
    region = _foreign_block()
    view = ffi.from_buffer(region)
    foreign = int(ffi.cast("uintptr_t", view))
    try:
        assert lib.pb_free(ffi.cast("void *", foreign)) == lib.PB_ERR_NOT_OWNED
        err = capfd.readouterr().err
        assert f"ptrbridge: pb_free: {foreign:#x} was not allocated by the ptrbridge allocator" in err
    finally:
        ffi.release(view)
        region.close()
    p = lib.pb_malloc(16)
    assert lib.pb_free(p) == lib.PB_OK
    assert lib.pb_free(p) == lib.PB_ERR_DOUBLE_FREE
    assert "double free" in capfd.readouterr().err
    assert lib.pb_realloc(p, 64) == ffi.NULL  # realloc of a freed block: refused too
    assert "pb_realloc" in capfd.readouterr().err


def test_foreach_enumerates_live_blocks() -> None:
    blocks = {int(ffi.cast("uintptr_t", lib.pb_malloc(n))): n for n in (1, 10, 100)}
    seen: Dict[int, int] = {}

    @ffi.callback("int(void *, size_t, void *)")
    def visit(ptr, size, ctx):  # type: ignore[no-untyped-def]
        seen[int(ffi.cast("uintptr_t", ptr))] = size
        return 0

    try:
        assert lib.pb_alloc_foreach(visit, ffi.NULL) == 0
        for address, size in blocks.items():
            assert seen[address] == size
    finally:
        for address in blocks:
            lib.pb_free(ffi.cast("void *", address))
    assert lib.pb_alloc_foreach(ffi.NULL, ffi.NULL) == lib.PB_ERR_INVALID


class AllocatorModel(RuleBasedStateMachine):
    """pb_malloc/calloc/realloc/free against a dict of address -> contents."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks: Dict[int, bytes] = {}
        self.freed: list = []
        self.base = ptrbridge.stats()

    def _stats(self) -> ptrbridge.Stats:
        return ptrbridge.stats()

    @rule(size=st.integers(0, 4096), fill=st.integers(0, 255))
    def malloc(self, size: int, fill: int) -> None:
        p = lib.pb_malloc(size)
        assert p != ffi.NULL
        ffi.memmove(p, bytes([fill]) * size, size)
        self.blocks[int(ffi.cast("uintptr_t", p))] = bytes([fill]) * size

    @rule(count=st.integers(0, 64), size=st.integers(0, 64))
    def calloc(self, count: int, size: int) -> None:
        p = lib.pb_calloc(count, size)
        assert p != ffi.NULL
        assert ffi.buffer(p, count * size)[:] == bytes(count * size)
        self.blocks[int(ffi.cast("uintptr_t", p))] = bytes(count * size)

    @precondition(lambda self: self.blocks)
    @rule(data=st.data(), size=st.integers(1, 8192))
    def realloc(self, data: st.DataObject, size: int) -> None:
        address = data.draw(st.sampled_from(sorted(self.blocks)))
        old = self.blocks.pop(address)
        status = ffi.new("int *")
        q = lib.pb__realloc_quiet(ffi.cast("void *", address), size, status)
        assert q != ffi.NULL and status[0] == lib.PB_OK
        kept = min(len(old), size)
        assert ffi.buffer(q, kept)[:] == old[:kept]
        ffi.memmove(q + kept, b"\x5a" * (size - kept), size - kept)
        self.blocks[int(ffi.cast("uintptr_t", q))] = old[:kept] + b"\x5a" * (size - kept)

    @precondition(lambda self: self.blocks)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        address = data.draw(st.sampled_from(sorted(self.blocks)))
        contents = self.blocks.pop(address)
        assert lib.pb_alloc_size(ffi.cast("void *", address)) == len(contents)
        assert ffi.buffer(ffi.cast("char *", address), len(contents))[:] == contents
        assert lib.pb__free_quiet(ffi.cast("void *", address)) == lib.PB_OK
        self.freed.append(address)

    @precondition(lambda self: self.freed)
    @rule(data=st.data())
    def double_free(self, data: st.DataObject) -> None:
        address = data.draw(st.sampled_from(self.freed))
        if address in self.blocks:  # the address was handed out again: no longer a double free
            return
        assert lib.pb__free_quiet(ffi.cast("void *", address)) == lib.PB_ERR_DOUBLE_FREE
        assert lib.pb_alloc_size(ffi.cast("void *", address)) == 0

    @rule(offset=st.integers(1, 15))
    def interior_pointer_is_not_owned(self, offset: int) -> None:
        for address, contents in self.blocks.items():
            if len(contents) > offset:
                status = lib.pb__free_quiet(ffi.cast("void *", address + offset))
                assert status == lib.PB_ERR_NOT_OWNED
                return

    @invariant()
    def counters(self) -> None:
        now = self._stats()
        assert now.live_blocks == self.base.live_blocks + len(self.blocks)
        assert now.live_bytes == self.base.live_bytes + sum(map(len, self.blocks.values()))
        assert now.allocations - now.frees == now.live_blocks
        assert now.peak_bytes >= now.live_bytes

    def teardown(self) -> None:
        for address in self.blocks:
            assert lib.pb__free_quiet(ffi.cast("void *", address)) == lib.PB_OK


AllocatorModel.TestCase.settings = settings(max_examples=50, stateful_step_count=40, deadline=None,
                                            derandomize=True, database=None,
                                            suppress_health_check=list(HealthCheck))
test_allocator_model = AllocatorModel.TestCase


def test_threads_allocate_and_free_concurrently() -> None:
    import threading

    base = ptrbridge.stats()

    def work() -> None:
        for i in range(20_000):
            p = lib.pb_malloc(i % 257)
            assert lib.pb_free(p) == lib.PB_OK

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    now = ptrbridge.stats()
    assert now.live_blocks == base.live_blocks
    assert now.allocations - base.allocations == 80_000 == now.frees - base.frees


# --- CBuffer --------------------------------------------------------------------

def test_cbuffer_zeroed_and_zero_copy() -> None:
    buf = CBuffer(16)
    assert len(buf) == 16 and buf.to_bytes() == bytes(16) and buf.state == "owned"
    view = memoryview(buf)
    view[0:4] = b"abcd"
    assert ffi.buffer(buf.ptr, 4)[:] == b"abcd"  # same memory
    buf.ptr[4] = b"e"
    assert bytes(view[:5]) == b"abcde"
    assert buf[0] == ord("a") and buf[1:3] == b"bc"
    buf[5:7] = b"xy"
    assert buf.to_bytes()[:7] == b"abcdexy"
    view.release()
    assert buf.address == int(ffi.cast("uintptr_t", buf.ptr))
    assert "16 bytes" in repr(buf)


@pytest.mark.parametrize(
    "source",
    [b"bytes data", bytearray(b"bytearray"), memoryview(b"view"), array.array("i", [1, 2, 3]),
     np.arange(5, dtype=np.int64), b""],
    ids=["bytes", "bytearray", "memoryview", "array", "numpy", "empty"],
)
def test_copy_of_buffer_kinds(source: object) -> None:
    expected = bytes(memoryview(source).cast("B"))  # type: ignore[arg-type]
    buf = CBuffer.copy(source)
    assert len(buf) == len(expected) and buf.to_bytes() == expected
    assert ptrbridge.stats().live_blocks >= 1


def test_copy_rejects_bad_sources() -> None:
    with pytest.raises(TypeError, match="does not export a buffer"):
        CBuffer.copy(42)
    with pytest.raises(TypeError, match="not contiguous"):
        CBuffer.copy(np.arange(10)[::2])


@pytest.mark.parametrize("size, exc", [(-1, ValueError), (1.5, TypeError), (True, TypeError), ("8", TypeError)])
def test_bad_sizes(size: object, exc: type) -> None:
    with pytest.raises(exc):
        CBuffer(size)  # type: ignore[arg-type]


def test_garbage_collection_frees_once() -> None:
    base = ptrbridge.stats()
    buf = CBuffer.copy(b"x" * 100)
    assert ptrbridge.stats().live_bytes == base.live_bytes + 100
    del buf
    gc.collect()
    now = ptrbridge.stats()
    assert now.live_blocks == base.live_blocks and now.frees == base.frees + 1


def test_explicit_free_and_with() -> None:
    buf = CBuffer(8)
    buf.free()
    assert buf.state == "freed"
    with pytest.raises(UseAfterTransferError, match=r"CBuffer.to_bytes\(\) after its memory was freed by Python"):
        buf.to_bytes()
    with pytest.raises(UseAfterTransferError, match="freed by Python"):
        memoryview(buf)
    with CBuffer(8) as scoped:
        assert scoped.state == "owned"
    assert scoped.state == "freed"


def test_transfer_hands_ownership_to_c() -> None:
    base = ptrbridge.stats()
    buf = CBuffer.copy(b"payload")
    raw = buf.transfer()
    assert ffi.typeof(raw) is ffi.typeof("char *")
    assert ffi.string(raw, 7) == b"payload"
    assert ptrbridge.stats().transferred == base.transferred + 1
    for use in (lambda: buf.ptr, buf.to_bytes, buf.transfer, buf.free, lambda: buf[0]):
        with pytest.raises(UseAfterTransferError, match="transferred"):
            use()
    with pytest.raises(UseAfterTransferError, match="transferred to C"):
        memoryview(buf)
    del buf
    gc.collect()  # Python must not free what C owns
    assert ptrbridge.stats().transferred == base.transferred + 1
    assert lib.pb_free(raw) == lib.PB_OK  # C frees it (e.g. in a delivery callback)
    assert ptrbridge.stats().transferred == base.transferred
    with pytest.raises(DoubleFreeError):
        ptrbridge.free(raw)


def test_transfer_refused_while_exported() -> None:
    buf = CBuffer(8)
    view = memoryview(buf)
    with pytest.raises(BufferError, match="1 memoryview"):
        buf.transfer()
    with pytest.raises(BufferError):
        buf.free()
    view.release()
    ptrbridge.free(buf.transfer())


def test_free_by_address_and_errors() -> None:
    region = _foreign_block()
    view = ffi.from_buffer(region)
    foreign = int(ffi.cast("uintptr_t", view))
    p = lib.pb_malloc(4)
    ptrbridge.free(int(ffi.cast("uintptr_t", p)))
    with pytest.raises(DoubleFreeError, match="double free"):
        ptrbridge.free(p)
    try:
        with pytest.raises(NotOwnedError, match="not allocated by the ptrbridge allocator"):
            ptrbridge.free(foreign)
    finally:
        ffi.release(view)
        region.close()
    with pytest.raises(TypeError):
        ptrbridge.free("0x1234")  # type: ignore[arg-type]
    buf = CBuffer(4)
    ptrbridge.free(buf)
    assert buf.state == "freed"


# --- cstring and cnew -------------------------------------------------------------

def test_cstring() -> None:
    s = ptrbridge.cstring("héllo")
    assert s.to_bytes() == "héllo".encode() + b"\0" and len(s) == 7
    assert ffi.string(s.ptr) == "héllo".encode()
    assert ptrbridge.cstring(b"raw").to_bytes() == b"raw\0"
    with pytest.raises(ValueError, match="embedded NUL at offset 1"):
        ptrbridge.cstring("a\0b")
    with pytest.raises(TypeError):
        ptrbridge.cstring(5)  # type: ignore[arg-type]


def test_cnew_typed_c_memory() -> None:
    import cffi

    other = cffi.FFI()
    other.cdef("struct point { int x, y; char *label; };")
    pt = ptrbridge.cnew("struct point *", ffi=other)
    assert len(pt) == other.sizeof("struct point")
    pt.c.x, pt.c.y = 3, 4
    assert (pt.c.x, pt.c.y, pt.c.label) == (3, 4, other.NULL)
    assert ptrbridge.cnew("struct point", ffi=other).ctype == other.typeof("struct point *")
    assert lib.pb_alloc_size(ffi.cast("void *", pt.address)) == len(pt)
    with pytest.raises(TypeError, match="size is unknown"):
        ptrbridge.cnew("void *")


# --- ownership of blocks, addresses from Python (issue 8) --------------------------

def _line_of(marker: str) -> str:
    """``test_cmem.py:N`` of the line holding ``marker`` in this file."""
    import inspect

    for n, line in enumerate(inspect.getsource(inspect.getmodule(_line_of)).splitlines(), 1):  # type: ignore[arg-type]
        if marker in line and "_line_of" not in line:
            return f"test_cmem.py:{n}"
    raise AssertionError(marker)


def test_free_of_a_block_a_live_cbuffer_owns_is_refused_naming_the_owner() -> None:
    buf = CBuffer.copy(b"still mine")  # OWNER-SITE
    with pytest.raises(NotOwnedError, match=rf"CBuffer\(10\) created at {_line_of('OWNER-SITE')}"):
        ptrbridge.free(buf.ptr)
    with pytest.raises(NotOwnedError, match="belongs to"):
        ptrbridge.free(buf.address)
    assert lib.pb_free(buf.ptr) == lib.PB_ERR_PY_OWNED  # C is refused too
    assert lib.pb_realloc(buf.ptr, 100) == ffi.NULL
    assert buf.to_bytes() == b"still mine" and buf.state == "owned"  # nothing was freed
    buf.free()


def test_typed_cbuffers_are_protected_too() -> None:
    zs = ptrbridge.cnew("uint64_t[4]")
    with pytest.raises(NotOwnedError, match=r"TypedCBuffer 'uint64_t\(\*\)\[4\]'\(32\)"):
        ptrbridge.free(zs.address)
    zs.free()


def test_a_transferred_block_is_cs_to_free() -> None:
    raw = CBuffer.copy(b"c owns").transfer()
    ptrbridge.free(raw)  # what C would do with pb_free
    with pytest.raises(DoubleFreeError):
        ptrbridge.free(raw)


@pytest.mark.parametrize("offset", [1 << 64, 1 << 65, -(1 << 64)])
def test_addresses_out_of_range_are_value_errors_and_free_nothing(offset: int) -> None:
    p = lib.pb_malloc(8)
    address = int(ffi.cast("uintptr_t", p))
    before = ptrbridge.stats().live_blocks
    with pytest.raises(ValueError, match="out of range for a pointer"):
        ptrbridge.free(address + offset)
    assert ptrbridge.stats().live_blocks == before  # not silently truncated to `address`
    ptrbridge.free(p)


@pytest.mark.parametrize("bad", [1 << 64, -1, -(1 << 70)])
def test_free_of_an_impossible_integer_is_a_value_error(bad: int) -> None:
    with pytest.raises(ValueError, match=r"free\(\): address"):
        ptrbridge.free(bad)


@pytest.mark.parametrize("bad", [1.5, "0x10", True, None, b"\0" * 8])
def test_free_of_a_non_address_is_a_type_error(bad: object) -> None:
    with pytest.raises(TypeError, match=r"free\(\)"):
        ptrbridge.free(bad)


def test_buffer_base_views_reject_out_of_range_addresses() -> None:
    from ptrbridge._bindings import BufferBase

    with pytest.raises(ValueError, match="out of range"):
        BufferBase(1 << 64, 0)
    with pytest.raises(TypeError, match="must be an int"):
        BufferBase("x", 0)


# --- truthful CBuffer errors -----------------------------------------------------

USES = {
    "len": lambda b: len(b),
    "memoryview": lambda b: memoryview(b),
    "bytes": lambda b: bytes(b),
    "index": lambda b: b[0],
    "slice": lambda b: b[0:2],
    "setitem": lambda b: b.__setitem__(0, 1),
    "ptr": lambda b: b.ptr,
    "address": lambda b: b.address,
    "to_bytes": lambda b: b.to_bytes(),
    "copy": lambda b: CBuffer.copy(b),
    "copy_many": lambda b: CBuffer.copy_many([b]),
    "transfer": lambda b: b.transfer(),
    "free": lambda b: b.free(),
    "numpy": lambda b: np.frombuffer(b, dtype=np.uint8),
    "Span": lambda b: ptrbridge.Span(b),
}


@pytest.mark.parametrize("use", sorted(USES))
def test_every_use_after_transfer_says_so(use: str) -> None:
    buf = CBuffer.copy(b"payload")  # TRANSFER-SITE
    raw = buf.transfer()
    with pytest.raises(UseAfterTransferError,
                       match=rf"after its memory was transferred to C .*CBuffer\(7\) created at "
                             rf"{_line_of('TRANSFER-SITE')}"):
        USES[use](buf)
    assert "7 bytes" in repr(buf) and "transferred" in repr(buf)  # repr never raises
    lib.pb_free(raw)


@pytest.mark.parametrize("use", sorted(USES))
def test_every_use_after_free_says_python_freed_it(use: str) -> None:
    buf = CBuffer(5)
    buf.free()
    with pytest.raises(UseAfterTransferError, match=r"after its memory was freed by Python"):
        USES[use](buf)


def test_second_free_does_not_blame_c() -> None:
    buf = CBuffer(4)
    buf.free()
    with pytest.raises(UseAfterTransferError) as info:
        buf.free()
    assert "freed by Python" in str(info.value) and "C owns" not in str(info.value)


def test_huge_cbuffer_says_how_big() -> None:
    with pytest.raises(MemoryError, match=str(1 << 46)):
        CBuffer(1 << 46)  # 64 TiB: more than this machine's memory and swap
    with pytest.raises(MemoryError, match=str(1 << 63)):
        CBuffer(1 << 63)


def test_copy_gives_the_real_reason() -> None:
    view = memoryview(b"gone")
    view.release()
    with pytest.raises(ValueError, match="released memoryview"):
        CBuffer.copy(view)
    with pytest.raises(TypeError, match="not contiguous"):
        CBuffer.copy(np.arange(10)[::2])
    with pytest.raises(TypeError, match="int does not export a buffer"):
        CBuffer.copy(42)


# --- batches ------------------------------------------------------------------------

def test_copy_many_gives_c_one_block_per_buffer() -> None:
    payloads = [b"alpha", bytearray(b"be"), memoryview(b"gamma!"), np.arange(3, dtype=np.uint8)]
    base = ptrbridge.stats()
    batch = CBuffer.copy_many(payloads)
    assert len(batch) == 4 and batch.state == "owned"
    assert ffi.typeof(batch.pointers) is ffi.typeof("char *[]") and len(batch.pointers) == 4
    for i, data in enumerate(payloads):
        assert batch.lengths[i] == len(bytes(data))
        assert ffi.buffer(batch.pointers[i], batch.lengths[i])[:] == bytes(data)
    assert ptrbridge.stats().live_blocks == base.live_blocks + 4
    ptrs = batch.transfer()
    assert ptrbridge.stats().transferred == base.transferred + 4
    with pytest.raises(UseAfterTransferError, match="transferred"):
        batch.free()
    del batch
    gc.collect()  # Python must not free what C owns
    for i in range(4):
        assert lib.pb_free(ptrs[i]) == lib.PB_OK  # each block freed by C on its own
    assert ptrbridge.stats().live_blocks == base.live_blocks


def test_copy_many_is_all_or_nothing_and_frees_untransferred_batches() -> None:
    base = ptrbridge.stats().live_blocks
    with pytest.raises(TypeError, match=r"copy_many\(\): int does not export a buffer"):
        CBuffer.copy_many([b"ok", b"fine", 3])
    assert ptrbridge.stats().live_blocks == base
    batch = CBuffer.copy_many([b"x"] * 10)
    assert lib.pb_free(batch.pointers[0]) == lib.PB_ERR_PY_OWNED  # Python's until transfer()
    del batch
    gc.collect()
    assert ptrbridge.stats().live_blocks == base
    empty = CBuffer.copy_many([])
    assert len(empty) == 0
    empty.free()


# --- live resources -------------------------------------------------------------

def test_live_resources_name_where_each_resource_was_created() -> None:
    h = ptrbridge.Handle({"k": 1})  # RES-HANDLE
    buf = CBuffer(10)  # RES-CBUFFER
    raw = CBuffer.copy(b"abc").transfer()  # RES-TRANSFERRED
    pinner = ptrbridge.Pinner()
    data = bytearray(100)
    pinner.pin(data)  # RES-PIN
    found = {(r.kind, r.description, r.created_at) for r in ptrbridge.stats.live_resources()}
    assert ("handle", "dict", _line_of("RES-HANDLE")) in found
    assert ("cbuffer", "CBuffer(10)", _line_of("RES-CBUFFER")) in found
    assert ("transferred", "CBuffer(3)", _line_of("RES-TRANSFERRED")) in found
    assert ("pin", "bytearray(100)", _line_of("RES-PIN")) in found
    pinner.unpin()
    h.delete()
    buf.free()
    lib.pb_free(raw)
    kinds = {(r.kind, r.created_at) for r in ptrbridge.stats.live_resources()}
    assert not any(site.startswith("test_cmem.py:") and site in
                   {_line_of(m) for m in ("RES-HANDLE", "RES-CBUFFER", "RES-TRANSFERRED", "RES-PIN")}
                   for _, site in kinds)
