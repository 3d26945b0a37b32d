"""Rule R1 and use after free, through cffi (API and ABI mode) and ctypes."""
from __future__ import annotations

import ctypes
import os
import re
import sys
from pathlib import Path
from typing import Any, List, Tuple

import cffi
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ptrbridge
from ptrbridge._bindings import ffi as PBFFI
from ptrbridge import NestedPointerError, Pinner, UseAfterFreeError

HINT = "(pin it with ptrbridge.Pinner or copy it with ptrbridge.CBuffer)"
THIS = os.path.basename(__file__)


def _line() -> int:
    return sys._getframe(1).f_lineno


@pytest.fixture(params=["api", "abi"])
def cffi_lib(request: pytest.FixtureRequest, api: Any, abi: Tuple[Any, Any]) -> Tuple[Any, Any]:
    """(ffi, checked library) for both cffi modes."""
    if request.param == "api":
        return api.ffi, ptrbridge.wrap(api.lib)
    ffi, raw = abi
    return ffi, ptrbridge.wrap(raw)


# --- cffi ---------------------------------------------------------------------------

def test_struct_field_to_ffi_new_held_in_a_local(cffi_lib: Tuple[Any, Any]) -> None:
    ffi, c = cffi_lib
    name = ffi.new("char[]", b"Grace")
    person = ffi.new("struct person *")
    person.name = name
    line = _line() + 2
    with pytest.raises(NestedPointerError) as info:
        c.person_name_len(person)
    message = str(info.value)
    assert message.startswith("ptrbridge: argument 1 has Python pointer to unpinned Python pointer: ")
    assert ".name -> cdata 'char[]'(6) (local variable 'name')" in message
    assert f"in call to person_name_len() at {THIS}:{line}" in message
    assert message.endswith(HINT)


def test_struct_field_pinned_or_copied_is_accepted(cffi_lib: Tuple[Any, Any]) -> None:
    ffi, c = cffi_lib
    name = ffi.new("char[]", b"Grace")
    person = ffi.new("struct person *")
    with Pinner() as p:
        person.name = p.pin(name)
        assert c.person_name_len(person) == 5
    copy = ptrbridge.cstring("Hopper")
    person.name = copy.ptr
    assert c.person_name_len(person) == 6


def test_ptrbridge_new_target_is_known_without_locals(cffi_lib: Tuple[Any, Any]) -> None:
    ffi, c = cffi_lib
    person = ffi.new("struct person *")
    holder = {"keep": ptrbridge.new("char[]", b"x", ffi=ffi)}
    person.name = holder["keep"]

    def helper_far_away(p: Any) -> None:
        c.person_name_len(p)

    with pytest.raises(NestedPointerError, match=r"\.name -> cdata 'char\[\]'\(2\) \(ptrbridge.new at "):
        helper_far_away(person)


def test_struct_by_value_is_walked(cffi_lib: Tuple[Any, Any]) -> None:
    ffi, c = cffi_lib
    buf = bytearray(b"by value\0")
    person = ffi.new("struct person *")
    person.name = ffi.from_buffer(buf)
    with pytest.raises(NestedPointerError, match=r"argument 1 .*: \.name -> bytearray\(9\)"):
        c.person_by_value_len(person[0])
    with Pinner() as p:
        person.name = p.pin(buf)
        assert c.person_by_value_len(person[0]) == 8


def test_pointer_to_pointer_array(cffi_lib: Tuple[Any, Any]) -> None:
    ffi, c = cffi_lib
    words = [ffi.new("char[]", b"ab"), ffi.new("char[]", b"cde")]
    names = ffi.new("char *[]", words)
    with pytest.raises(NestedPointerError, match=r"argument 1 .*: \[0\] -> cdata 'char\[\]'\(3\)"):
        c.names_total(names, 2)
    with Pinner() as p:
        for w in words:
            p.pin(w)
        assert c.names_total(names, 2) == 5


def test_list_argument_for_pointer_array(cffi_lib: Tuple[Any, Any]) -> None:
    ffi, c = cffi_lib
    word = ffi.new("char[]", b"xyz")
    with pytest.raises(NestedPointerError, match=r"argument 1 .*: \[1\] -> cdata"):
        c.names_total([ffi.NULL, word], 2)
    with Pinner() as p:
        p.pin(word)
        assert c.names_total([ffi.NULL, word], 2) == 3


def test_array_of_structs_names_the_element(cffi_lib: Tuple[Any, Any]) -> None:
    ffi, c = cffi_lib
    team = ffi.new("struct person[3]")
    names = [ptrbridge.cstring("ok"), bytearray(b"bad\0")]
    team[0].name = names[0].ptr
    team[1].name = ffi.from_buffer(names[1])
    with pytest.raises(NestedPointerError, match=r"\[1\]\.name -> bytearray\(4\)"):
        c.team_total(team, 3)


def test_nested_struct_union_and_pointer_to_pointer(cffi_lib: Tuple[Any, Any]) -> None:
    ffi, c = cffi_lib
    h = ffi.new("struct holder *")
    label = ffi.new("char[]", b"union")
    h.v.text = label
    with pytest.raises(NestedPointerError, match=r"\.v\.text -> cdata"):
        c.holder_total(h)
    h.v.text = ffi.NULL
    inner = ffi.new("char[]", b"inner")
    names = ffi.new("char *[1]", [inner])
    with Pinner() as p:
        h.names = ffi.cast("const char **", p.pin(names))  # the array is pinned, its element is not
        h.count = 1
        with pytest.raises(NestedPointerError, match=r"\.names->\[0\] -> cdata 'char\[\]'\(6\)") as info:
            c.holder_total(h)
        assert "has pinned Python pointer to unpinned Python pointer" in str(info.value)
        p.pin(inner)
        h.team[1].name = p.pin(ffi.new("char[]", b"mate"))
        assert c.holder_total(h) == 5 + 4


def test_linked_list_through_pinned_nodes(cffi_lib: Tuple[Any, Any]) -> None:
    ffi, c = cffi_lib
    first, second = ffi.new("struct node *"), ffi.new("struct node *")
    first.label = ptrbridge.cstring("a").ptr  # C memory (kept alive below)
    keep = [ptrbridge.cstring("a"), ptrbridge.cstring("bb")]
    first.label, second.label = keep[0].ptr, keep[1].ptr
    first.next = second
    with pytest.raises(NestedPointerError, match=r"\.next -> cdata 'struct node \*'"):
        c.list_total(first)
    with Pinner() as p:
        first.next = ffi.cast("struct node *", p.pin(second))
        assert c.list_total(first) == 3


def test_c_memory_argument_lends_python_targets(cffi_lib: Tuple[Any, Any]) -> None:
    """A struct in C memory pointing at Python memory: no R1 error (that is R2's business)."""
    ffi, c = cffi_lib
    person = ptrbridge.cnew("struct person *", ffi=ffi)
    name = bytearray(b"lent\0")
    person.c.name = ffi.from_buffer(name)
    # At level 1: at level 2 a retention scan due right after this call would rightly
    # report the C struct still pointing at `name` (R2), depending on the scan batch.
    with ptrbridge.checking(1):
        assert c.person_name_len(person.c) == 4
    person.c.name = ffi.NULL


def test_view_of_c_heap_memory_in_a_local_does_not_make_it_python_memory(tmp_path: Path) -> None:
    """At level 2, C memory from an interposed library's malloc is C's even when the caller holds
    a Python view of it (``ffi.buffer``, ``memoryview``): a struct pointing at it is not R1's."""
    import subprocess
    import textwrap

    sys.path.insert(0, str(Path(__file__).parent))
    from cbuild import build_shared

    holder = build_shared("holder.c", tmp_path)
    code = textwrap.dedent(f"""
        import cffi, ptrbridge
        from ptrbridge.checking import CallCheck
        ptrbridge.set_check_level(2)
        ffi = cffi.FFI()
        ffi.cdef("void *holder_alloc(size_t); void holder_free(void *);")
        h = ffi.dlopen({str(holder)!r})
        p = h.holder_alloc(64)                 # libc malloc, called from libholder.so
        view = memoryview(ffi.buffer(p, 64))   # a Python view of C memory, in a local
        address = int(ffi.cast("uintptr_t", p))
        check = CallCheck("f", __import__("sys")._getframe(), ())
        print(check.classify(address + 8), check.classify(address))
        view.release()
        h.holder_free(p)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["None", "None"], proc.stdout


def test_pointer_into_a_tracked_block_reaches_one_struct(cffi_lib: Tuple[Any, Any]) -> None:
    """A ``T *`` into tracked C memory holding more than a T: only the T is walked.  The words after
    it are not Ts; reading them as such found a 'dangling' pointer in a stale word (kafka's batch)."""
    ffi, c = cffi_lib
    size = ffi.sizeof("struct person")
    block = ptrbridge.CBuffer(3 * size)
    name = ptrbridge.cstring(b"one")
    first = ffi.cast("struct person *", block.ptr)
    first.name = ffi.cast("char *", name.ptr)
    try:
        with ptrbridge.checking(2):
            gone = ffi.new("char[]", b"freed before the call")
            first[1].name = gone   # a stale word after the T (freed next)
            del gone
            assert c.person_name_len(first) == 3
            assert c.team_total(ffi.cast("struct person *", block.ptr), 1) == 3
    finally:
        name.free()
        block.free()


def test_bytes_argument_is_lent_not_walked(cffi_lib: Tuple[Any, Any]) -> None:
    ffi, c = cffi_lib
    assert c.text_len(b"hello") == 5
    assert c.text_len(ffi.from_buffer(bytearray(b"hey\0"))) == 3
    assert c.text_len(ffi.NULL) == 0


def test_use_after_free_of_ptrbridge_new(cffi_lib: Tuple[Any, Any]) -> None:
    ffi, c = cffi_lib
    owner = ptrbridge.new("char[]", b"gone", ffi=ffi); made = _line()  # noqa: E702
    dangling = ffi.cast("char *", owner)
    del owner; freed = _line()  # noqa: E702
    with pytest.raises(UseAfterFreeError) as info:
        c.text_len(dangling)
    message = str(info.value)
    assert message.startswith("ptrbridge: argument 1 is a pointer into freed Python memory: cdata 'char[]'(5)")
    assert f"created at {THIS}:{made}, freed at {THIS}:{freed}" in message
    person = ffi.new("struct person *")
    person.name = dangling
    with pytest.raises(UseAfterFreeError, match=r"argument 1 has pointer to freed Python memory: \.name -> "):
        c.person_name_len(person)


def test_level_zero_skips_checks(cffi_lib: Tuple[Any, Any]) -> None:
    ffi, c = cffi_lib
    name = ffi.new("char[]", b"off")
    person = ffi.new("struct person *")
    person.name = name
    with ptrbridge.checking(0):
        assert c.person_name_len(person) == 3


# --- ctypes -----------------------------------------------------------------------

class Person(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("age", ctypes.c_int)]


class Node(ctypes.Structure):
    pass


Node._fields_ = [("next", ctypes.POINTER(Node)), ("label", ctypes.c_char_p)]


@pytest.fixture
def ct(checked_so: Path) -> Any:
    lib = ctypes.CDLL(str(checked_so))
    lib.person_name_len.argtypes = [ctypes.POINTER(Person)]
    lib.list_total.argtypes = [ctypes.POINTER(Node)]
    lib.text_len.argtypes = [ctypes.c_void_p]
    return ptrbridge.wrap(lib)


def test_ctypes_c_char_p_field_set_to_bytes(ct: Any) -> None:
    person = Person(b"Ada", 36)
    with pytest.raises(NestedPointerError, match=r"argument 1 .*: \.name -> bytes\(3\) \(kept alive by argument 1\)"):
        ct.person_name_len(ctypes.byref(person))
    with pytest.raises(NestedPointerError):
        ct.person_name_len(ctypes.pointer(person))
    with Pinner() as p:
        p.pin(person._objects["0"])
        assert ct.person_name_len(ctypes.byref(person)) == 3


def test_ctypes_pointer_field_to_another_instance(ct: Any) -> None:
    second = Node(None, None)
    first = Node(ctypes.pointer(second), None)
    with pytest.raises(NestedPointerError, match=r"\.next -> Node\(16\)"):
        ct.list_total(ctypes.byref(first))
    with Pinner() as p:
        p.pin(second)
        assert ct.list_total(ctypes.byref(first)) == 0


def test_ctypes_raw_address_after_free(ct: Any) -> None:
    owner = ptrbridge.new("char[]", b"raw")
    address = int(ptrbridge._bindings.ffi.cast("uintptr_t", owner))
    assert ct.text_len(address) == 3
    del owner
    with pytest.raises(UseAfterFreeError, match="is a pointer into freed Python memory"):
        ct.text_len(address)


# --- a reference model of R1 ---------------------------------------------------------

TARGETS = ("null", "pinned", "unpinned", "cmem")
_counter = [0]


@st.composite
def struct_types(draw: Any, depth: int = 0) -> List[Tuple[str, Any]]:
    """Fields: ('ptr', target) | ('int', None) | ('array', [targets]) | ('struct', fields) | ('union', target)."""
    n = draw(st.integers(1, 4))
    fields: List[Tuple[str, Any]] = []
    for _ in range(n):
        kinds = ["ptr", "int", "array", "union"] + (["struct"] if depth < 2 else [])
        kind = draw(st.sampled_from(kinds))
        if kind == "ptr" or kind == "union":
            fields.append((kind, draw(st.sampled_from(TARGETS))))
        elif kind == "array":
            fields.append((kind, draw(st.lists(st.sampled_from(TARGETS), min_size=1, max_size=3))))
        elif kind == "struct":
            fields.append((kind, draw(struct_types(depth + 1))))
        else:
            fields.append((kind, None))
    return fields


def _declare(fields: List[Tuple[str, Any]], decls: List[str]) -> str:
    _counter[0] += 1
    name = f"s{_counter[0]}"
    members = []
    for i, (kind, spec) in enumerate(fields):
        if kind == "ptr":
            members.append(f"char *f{i};")
        elif kind == "int":
            members.append(f"long f{i};")
        elif kind == "array":
            members.append(f"void *f{i}[{len(spec)}];")
        elif kind == "union":
            members.append(f"union {{ long n; char *p; }} f{i};")
        else:
            members.append(f"struct {_declare(spec, decls)} f{i};")
    decls.append(f"struct {name} {{ {' '.join(members)} }};")
    return name


def _fill(ffi: Any, obj: Any, fields: List[Tuple[str, Any]], path: str, make: Any, expected: List[str]) -> None:
    for i, (kind, spec) in enumerate(fields):
        here = f"{path}.f{i}"
        if kind == "ptr":
            setattr(obj, f"f{i}", make(spec, here, expected))
        elif kind == "union":
            getattr(obj, f"f{i}").p = make(spec, f"{here}.p", expected)
        elif kind == "array":
            arr = getattr(obj, f"f{i}")
            for j, target in enumerate(spec):
                arr[j] = make(target, f"{here}[{j}]", expected)
        elif kind == "struct":
            _fill(ffi, getattr(obj, f"f{i}"), spec, here, make, expected)


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(fields=struct_types())
def test_checker_against_reference_model(fields: List[Tuple[str, Any]]) -> None:
    ffi = cffi.FFI()
    decls: List[str] = []
    top = _declare(fields, decls)
    ffi.cdef("\n".join(decls))
    obj = ffi.new(f"struct {top} *")
    keep: List[Any] = []  # unpinned Python buffers, held in a local list
    cmem: List[Any] = []
    expected: List[str] = []  # paths the model says violate R1, in walk order
    pinner = Pinner()

    def make(target: str, path: str, found: List[str]) -> Any:
        if target == "null":
            return ffi.NULL
        if target == "pinned":
            return ffi.cast("char *", pinner.pin(bytearray(b"p\0")))
        if target == "cmem":
            cmem.append(ptrbridge.cstring("c"))
            return ffi.cast("char *", cmem[-1].ptr)
        keep.append(bytearray(b"u\0"))
        found.append(path)
        return ffi.cast("char *", ffi.from_buffer(keep[-1]))

    try:
        _fill(ffi, obj, fields, "", make, expected)
        if expected:
            with pytest.raises(NestedPointerError) as info:
                _call_with_struct(ffi, obj, top)
            reported = re.search(r"unpinned Python pointer: (\S+) -> ", str(info.value))
            assert reported is not None
            # the first violation in memory order is reported
            assert reported.group(1) == _first_in_memory_order(ffi, obj, top, expected)
        else:
            _call_with_struct(ffi, obj, top)
    finally:
        pinner.unpin()


def _call_with_struct(ffi: Any, obj: Any, top: str) -> None:
    """Pass obj to a C function taking `struct top *` (memcmp-like no-op via cffi ABI)."""
    sig = cffi.FFI()
    sig.include(ffi)
    sig.cdef(f"int memcmp(const struct {top} *a, const void *b, size_t n);")
    c = ptrbridge.wrap(sig.dlopen(None))
    c.memcmp(obj, obj, 0)


def _first_in_memory_order(ffi: Any, obj: Any, top: str, paths: List[str]) -> str:
    base = int(ffi.cast("uintptr_t", obj))
    return min(paths, key=lambda path: _field_offset(ffi, obj, path, base))


def _field_offset(ffi: Any, obj: Any, path: str, base: int) -> int:
    parts = re.findall(r"\.(\w+)|\[(\d+)\]", path)
    cur = obj[0]
    owner = None
    for name, index in parts:
        owner = cur
        cur = getattr(cur, name) if name else cur[int(index)]
    last_name, last_index = parts[-1]
    if last_name:
        address = int(ffi.cast("uintptr_t", ffi.addressof(owner, last_name)))
    else:
        address = int(ffi.cast("uintptr_t", ffi.addressof(owner, int(last_index))))
    return address - base


# --- the walk and the owner search in C (csrc/pyslots.c, csrc/pyframes.c) ------------------

def _check(args: Tuple[Any, ...] = ()) -> Any:
    from ptrbridge.checking import CallCheck

    return CallCheck("f", sys._getframe(1), args)


def test_scan_slots_settles_null_pinned_and_c_memory_in_c() -> None:
    with ptrbridge.checking(1):  # level 2's heap map knows every Python block
        from ptrbridge._bindings import native
        from ptrbridge.checking import layout_of

        ffi = cffi.FFI()
        ffi.cdef("struct four { char *a; char *b; char *c; char *d; };")
        s = ffi.new("struct four *")
        layout = layout_of(ffi.typeof("struct four"))
        assert native.scan_slots(s, layout.plan, 1, False) is None  # all NULL
        pinned, local = bytearray(8), bytearray(8)
        cbuf = ptrbridge.CBuffer(8)
        try:
            _scan_case(ffi, s, layout, pinned, local, cbuf)
        finally:
            cbuf.free()


def _scan_case(ffi: Any, s: Any, layout: Any, pinned: bytearray, local: bytearray, cbuf: Any) -> None:
    from ptrbridge._bindings import native

    with Pinner() as p:
        s.a = ffi.cast("char *", int(PBFFI.cast("uintptr_t", p.pin(pinned))))
        s.b = ffi.cast("char *", cbuf.address)
        s.c = ffi.from_buffer(local)
        hits = native.scan_slots(s, layout.plan, 1, False)
        address_c = int(ffi.cast("uintptr_t", s.c))
        assert hits == [2, address_c, 2]  # slot 2: in no region, not C memory -> the owners
        assert native.scan_slots(int(ffi.cast("uintptr_t", s)), layout.plan, 1, False) == hits
        assert _check().classify(address_c) is not None  # the caller's local bytearray


def test_scan_slots_judges_every_slot_of_a_long_array() -> None:
    # The slots are judged a batch of 64 at a time (one lock of the region index per batch):
    # the ones past the first batch, and a pin's end pointer, must come out as one at a time.
    with ptrbridge.checking(1):
        from ptrbridge._bindings import native
        from ptrbridge.checking import layout_of

        ffi = cffi.FFI()
        ffi.cdef("struct iovec { void *iov_base; size_t iov_len; };")
        n = 150
        iov = ffi.new(f"struct iovec[{n}]")
        plan = layout_of(ffi.typeof("struct iovec")).plan
        bufs = [bytearray(16) for _ in range(n)]
        loose = bytearray(16)
        with Pinner() as p:
            for i, buf in enumerate(bufs):
                iov[i].iov_base = ffi.cast("void *", int(PBFFI.cast("uintptr_t", p.pin(buf))))
            iov[100].iov_base = ffi.cast("char *", iov[100].iov_base) + 16  # one past a pin: the pin's
            assert native.scan_slots(iov, plan, n, False) is None
            for k in (0, 63, 64, 127, 128, 149):
                saved = iov[k].iov_base
                iov[k].iov_base = ffi.from_buffer(loose)
                address = int(ffi.cast("uintptr_t", iov[k].iov_base))
                assert native.scan_slots(iov, plan, n, False) == [k, address, 2], k
                assert native.scan_slots(iov, plan, k, False) is None  # the elements before it
                iov[k].iov_base = saved
            iov[10].iov_base = iov[70].iov_base = ffi.from_buffer(loose)
            hits = native.scan_slots(iov, plan, n, False)
            assert hits is not None and hits[0::3] == [10, 70]


def test_owner_search_order_and_origins() -> None:
    with ptrbridge.checking(1):  # level 2's heap map knows every Python block
        first = bytearray(16)
        items = [bytearray(4), bytearray(5)]
        table = {"k": bytearray(6)}
        check = _check((first,))
        owner = check.classify(int(PBFFI.cast("uintptr_t", PBFFI.from_buffer(first))) + 3)
        assert owner is not None and owner.origin == "argument 1" and owner.description == "bytearray(16)"
        address = int(PBFFI.cast("uintptr_t", PBFFI.from_buffer(items[1])))
        owner = check.classify(address)
        assert owner is not None and owner.origin == "local variable 'items[1]'" and owner.size == 5
        address = int(PBFFI.cast("uintptr_t", PBFFI.from_buffer(table["k"])))
        owner = check.classify(address)
        assert owner is not None and owner.origin == "local variable 'table['k']'"


def test_ctypes_objects_are_read_only_from_ctypes_instances() -> None:
    with ptrbridge.checking(1):  # level 2's heap map knows every Python block
        class Impostor:
            """Not a ctypes object, but with the attribute ctypes keeps its records in."""

            def __init__(self, kept: Any) -> None:
                self._objects = {"0": kept}

        hidden = bytearray(32)
        impostor = Impostor(hidden)
        address = int(PBFFI.cast("uintptr_t", PBFFI.from_buffer(hidden)))
        del hidden  # reachable only through the impostor's _objects now
        assert _check((impostor,)).classify(address) is None
        assert impostor._objects  # (kept alive until here)

        class Rec(ctypes.Structure):
            _fields_ = [("p", ctypes.c_char_p)]

        data = b"kept by ctypes"
        rec = Rec(data)
        del data
        field = ctypes.c_void_p.from_buffer(rec, Rec.p.offset).value or 0  # the pointer C would read
        owner = _check((rec,)).classify(field)
        assert owner is not None and owner.origin == "kept alive by argument 1"


def test_obj_is_read_only_from_byref() -> None:
    with ptrbridge.checking(1):  # level 2's heap map knows every Python block
        class Wrapper:
            def __init__(self, inner: Any) -> None:
                self._obj = inner

        inner = ctypes.create_string_buffer(8)
        address = ctypes.addressof(inner)
        wrapper = Wrapper(inner)
        del inner
        assert _check((wrapper,)).classify(address) is None
        owner = _check((ctypes.byref(wrapper._obj),)).classify(address)
        assert owner is not None and owner.origin == "argument 1"


def test_array_interface_is_looked_up_on_the_type_and_failed_exports_own_nothing() -> None:
    from ptrbridge.checking import object_extent

    class AnswersEverything:
        def __getattr__(self, name: str) -> Any:
            return {"data": (0, False)}

    class ArrayWithoutBuffer:
        __array_interface__ = {"data": (0, False)}

    assert object_extent(AnswersEverything()) is None
    assert object_extent(ArrayWithoutBuffer()) is None
    view = memoryview(bytearray(4))
    view.release()
    assert object_extent(view) is None  # exporting a released view fails: owns nothing
    assert object_extent(memoryview(bytearray(4))[::2]) is None  # not contiguous
    odd, gone = AnswersEverything(), ArrayWithoutBuffer()
    from ptrbridge._bindings import native

    assert len(native.owner_index((odd, gone, view), None, 0, 64)) == 0


def test_level2_nested_lend_texts_do_not_keep_the_object_alive(cffi_lib: Tuple[Any, Any]) -> None:
    import gc
    import weakref

    inst = __import__("importlib").import_module("ptrbridge.instrument")
    from ptrbridge import scanning

    ffi, c = cffi_lib
    raw = ptrbridge.unwrap(c)
    proxy = inst._proxy(raw)
    name = ffi.new("char[]", b"Ada")
    alive = weakref.ref(name)
    person = ffi.new("struct person *")
    person.name = name
    with ptrbridge.checking(2):
        assert proxy.person_name_len(person) == 3
    start = int(ffi.cast("uintptr_t", name))
    lend = scanning._lent.get(start)  # (size, description, function, site, ...)
    assert lend is not None
    person.name = ffi.NULL
    del name
    gc.collect()
    assert alive() is None  # neither the lend record nor its texts hold the object
    text = lend[1]() if callable(lend[1]) else lend[1]  # (a quarantine shadow records text)
    assert text == "cdata 'char[]'(4)"


def _classify_from_a_helper(address: int) -> Any:
    helper_local = bytearray(3)  # noqa: F841 - an owner in the nearest frame, not the one asked for
    return _check().classify(address)


def test_owners_in_frames_above_the_caller_are_found_and_the_index_is_dropped_at_finish() -> None:
    with ptrbridge.checking(1):  # level 2's heap map knows every Python block
        outer = bytearray(40)
        address = int(PBFFI.cast("uintptr_t", PBFFI.from_buffer(outer))) + 39
        owner = _classify_from_a_helper(address)  # read lazily: the helper's frame, then this one
        assert owner is not None and owner.origin == "local variable 'outer'" and owner.size == 40
        check = _check()
        assert check.classify(address) is not None and check._known is not None
        check.finish()
        assert check._known is None  # the index (and the frame it would read next) is gone
        assert _check().classify(address + 1) is None  # one past the end of a local is not its
