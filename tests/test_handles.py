"""Handles: tokens for Python objects, their table, and releases from C threads."""
from __future__ import annotations

import ctypes
import gc
import threading
import weakref
from pathlib import Path
from typing import Dict, List

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

import ptrbridge
from ptrbridge import Handle, HandleLimitError, HandleTable, InvalidHandleError, handle_value
from ptrbridge._bindings import lib

INVALID = "ptrbridge: misuse of an invalid Handle"


class Thing:
    """A weak-referenceable payload."""

    def __init__(self, n: int) -> None:
        self.n = n


def test_round_trip() -> None:
    thing = Thing(1)
    h = Handle(thing)
    token = int(h)
    assert token != 0 and h.token == token and h.__index__() == token
    assert h.value() is thing
    assert handle_value(token) is thing
    assert Handle.from_token(token) == h and hash(Handle.from_token(token)) == hash(h)
    assert h.is_valid() and "live" in repr(h)
    h.delete()
    assert not h.is_valid() and "invalid" in repr(h)


def test_deleted_token_is_rejected_and_object_dropped() -> None:
    thing = Thing(2)
    ref = weakref.ref(thing)
    h = Handle(thing)
    token = int(h)
    del thing
    h.delete()
    gc.collect()
    assert ref() is None
    with pytest.raises(InvalidHandleError, match=f"^{INVALID} in handle_value\\(\\): token {token:#x} was deleted"):
        handle_value(token)
    with pytest.raises(InvalidHandleError, match="double delete"):
        h.delete()
    with pytest.raises(InvalidHandleError):
        h.value()
    with pytest.raises(InvalidHandleError):
        Handle.from_token(token)


def test_stale_token_does_not_resolve_to_the_slot_reuser() -> None:
    old = Handle("old")
    token = int(old)
    old.delete()
    new = Handle("new")  # likely reuses the slot, with a new generation
    try:
        assert int(new) != token
        with pytest.raises(InvalidHandleError):
            handle_value(token)
        assert handle_value(int(new)) == "new"
    finally:
        new.delete()


@pytest.mark.parametrize(
    "token, detail",
    [
        (0, "token 0 is never a valid handle"),
        (-1, "out of range"),
        (1 << 64, "out of range"),
        (12345, "never issued"),
        ((1 << 64) - 1, "never issued"),
        ("1", "must be an int, not str"),
        (1.0, "must be an int, not float"),
        (True, "must be an int, not bool"),
        (None, "must be an int, not NoneType"),
    ],
)
def test_bad_tokens(token: object, detail: str) -> None:
    with pytest.raises(InvalidHandleError, match=detail) as info:
        handle_value(token)  # type: ignore[arg-type]
    assert str(info.value).startswith(INVALID)
    assert isinstance(info.value, ValueError) and isinstance(info.value, ptrbridge.PointerError)
    with pytest.raises(InvalidHandleError):
        Handle.from_token(token)  # type: ignore[arg-type]


def test_context_manager_deletes() -> None:
    with Handle("scoped") as h:
        token = int(h)
        assert handle_value(token) == "scoped"
    with pytest.raises(InvalidHandleError):
        handle_value(token)


def test_release_from_c_drops_object_on_python_thread() -> None:
    thing = Thing(3)
    ref = weakref.ref(thing)
    h = Handle(thing)
    token = int(h)
    del thing
    assert lib.pb_handle_release(token) == lib.PB_OK
    assert not lib.pb_handle_is_valid(token)
    assert ref() is not None  # not dropped from the releasing (here: any) thread yet
    assert ptrbridge.collect() == 1
    gc.collect()
    assert ref() is None
    assert lib.pb_handle_release(token) == lib.PB_ERR_INVALID_HANDLE  # twice: refused
    with pytest.raises(InvalidHandleError, match="double delete"):
        h.delete()


def test_next_handle_operation_collects_c_releases() -> None:
    h = Handle(Thing(4))
    lib.pb_handle_release(int(h))
    before = ptrbridge.stats().live_handles
    with pytest.raises(InvalidHandleError):
        h.value()  # the operation itself collects first, then finds the token gone
    assert ptrbridge.collect() == 0
    assert ptrbridge.stats().live_handles == before


def test_stats_count_handles() -> None:
    base = ptrbridge.stats()
    handles = [Handle(i) for i in range(10)]
    now = ptrbridge.stats()
    assert now.live_handles == base.live_handles + 10
    assert now.handle_high_water >= base.live_handles + 10
    for h in handles:
        h.delete()
    assert ptrbridge.stats().live_handles == base.live_handles


def test_bounded_table_names_where_handles_were_made() -> None:
    table = HandleTable(max_handles=3)
    kept = [table.new(i) for i in range(3)]  # this line is the creation site
    line = test_bounded_table_names_where_handles_were_made.__code__.co_firstlineno + 2
    try:
        assert len(table) == 3
        with pytest.raises(HandleLimitError) as info:
            table.new(99)
        message = str(info.value)
        assert "handle limit reached: 3 live handles (max_handles=3)" in message
        assert f"test_handles.py:{line} (x3)" in message
        assert isinstance(info.value, RuntimeError)
        # C releasing one makes room again
        lib.pb_handle_release(int(kept[0]))
        extra = table.new(100)
        assert handle_value(int(extra)) == 100
        kept[0] = extra
    finally:
        for h in kept:
            h.delete()
    assert len(table) == 0
    assert "max_handles=3" in repr(table)


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "3"])
def test_bad_max_handles(bad: object) -> None:
    with pytest.raises(ValueError, match="max_handles must be a positive int or None"):
        HandleTable(max_handles=bad)  # type: ignore[arg-type]


def test_table_handles_resolve_everywhere() -> None:
    table = HandleTable()
    h = table.new("x")
    assert handle_value(int(h)) == "x" and Handle.from_token(int(h)).value() == "x"
    h.delete()
    assert len(table) == 0


# --- model-based test -----------------------------------------------------------

class HandleModel(RuleBasedStateMachine):
    """The handle table against a dict: token -> object, plus what was retired."""

    live = Bundle("live")

    def __init__(self) -> None:
        super().__init__()
        self.model: Dict[int, object] = {}
        self.dead: List[int] = []
        self.table = HandleTable(max_handles=5)
        self.in_table: set = set()
        self.base = ptrbridge.stats().live_handles

    @rule(target=live, value=st.integers())
    def new(self, value: int) -> int:
        obj = Thing(value)
        token = int(Handle(obj))
        assert token not in self.model
        self.model[token] = obj
        return token

    @rule(target=live, value=st.integers())
    def new_in_table(self, value: int) -> int:
        obj = Thing(value)
        if len(self.in_table) >= 5:
            with pytest.raises(HandleLimitError):
                self.table.new(obj)
            return next(iter(self.in_table))  # Bundle entries may repeat; rules tolerate it
        token = int(self.table.new(obj))
        self.model[token] = obj
        self.in_table.add(token)
        return token

    @rule(token=live)
    def value(self, token: int) -> None:
        if token in self.model:
            assert handle_value(token) is self.model[token]
        else:
            with pytest.raises(InvalidHandleError):
                handle_value(token)

    @rule(token=consumes(live))
    def delete(self, token: int) -> None:
        if token in self.model:
            Handle.from_token(token).delete()
            self._retire(token)
        else:
            with pytest.raises(InvalidHandleError):
                Handle.from_token(token).delete()

    @rule(token=consumes(live))
    def release_from_c(self, token: int) -> None:
        expected = lib.PB_OK if token in self.model else lib.PB_ERR_INVALID_HANDLE
        assert lib.pb_handle_release(token) == expected
        if token in self.model:
            self._retire(token)

    @rule()
    def collect(self) -> None:
        ptrbridge.collect()

    @rule(data=st.data())
    def stale(self, data: st.DataObject) -> None:
        if self.dead:
            token = data.draw(st.sampled_from(self.dead))
            with pytest.raises(InvalidHandleError):
                handle_value(token)
            assert lib.pb_handle_release(token) == lib.PB_ERR_INVALID_HANDLE

    @rule(token=st.integers(min_value=-(1 << 70), max_value=1 << 70))
    def random_token(self, token: int) -> None:
        if token in self.model:
            return
        with pytest.raises(InvalidHandleError):
            handle_value(token)

    def _retire(self, token: int) -> None:
        del self.model[token]
        self.in_table.discard(token)
        self.dead.append(token)

    @invariant()
    def counts_match(self) -> None:
        assert ptrbridge.stats().live_handles == self.base + len(self.model)
        assert len(self.table) == len(self.in_table)

    def teardown(self) -> None:
        for token in list(self.model):
            Handle.from_token(token).delete()
        ptrbridge.collect()


HandleModel.TestCase.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None, derandomize=True, database=None,
    suppress_health_check=list(HealthCheck),
)
test_handle_model = HandleModel.TestCase


# --- threads --------------------------------------------------------------------

def test_thread_stress_with_a_c_releaser(threads_lib: Path) -> None:
    """4 Python threads x 100 000 new/value/delete while a C thread releases other handles."""
    c = ctypes.CDLL(str(threads_lib))
    c.releaser_submit.argtypes = [ctypes.c_size_t]
    c.releaser_join.argtypes = [ctypes.POINTER(ctypes.c_long)]
    c.releaser_join.restype = ctypes.c_long
    base = ptrbridge.stats().live_handles
    per_thread, given_to_c = 100_000, 20_000
    errors: List[BaseException] = []
    c_refs: List["weakref.ref[Thing]"] = []

    def python_worker(seed: int) -> None:
        try:
            for i in range(per_thread):
                obj = (seed, i)
                h = Handle(obj)
                assert h.value() is obj
                h.delete()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    assert c.releaser_start() == 0
    workers = [threading.Thread(target=python_worker, args=(n,)) for n in range(4)]
    for w in workers:
        w.start()
    for _ in range(given_to_c):
        thing = Thing(0)
        c_refs.append(weakref.ref(thing))
        assert c.releaser_submit(int(Handle(thing))) == 0
        del thing
    for w in workers:
        w.join()
    failed = ctypes.c_long()
    released = c.releaser_join(ctypes.byref(failed))
    assert not errors, errors[0]
    assert released == given_to_c and failed.value == 0
    ptrbridge.collect()
    gc.collect()
    assert all(ref() is None for ref in c_refs), "objects of C-released handles must be dropped"
    assert ptrbridge.stats().live_handles == base


# --- tokens never repeat; releases are dropped before slots are reused (issue 8) ---

@pytest.fixture
def tiny_generations() -> "object":
    """Slots retire after 3 generations instead of 2^32 (the real logic, a small limit)."""
    old = lib.pb__handle_test_gen_limit(3)
    yield
    lib.pb__handle_test_gen_limit(old)


def test_a_slot_whose_generations_are_used_up_is_retired_not_wrapped(tiny_generations: object) -> None:
    retired_before = lib.pb__handle_test_gen_limit(0)
    seen: List[int] = []
    # One live handle at a time: the worst case for slot reuse.  Free slots are reused first in,
    # first out, so how many handles it takes to use one slot 3 times depends on how many free
    # slots earlier tests left in the table: go on until a slot is retired (a bound, not a wait).
    for i in range(200_000):
        h = Handle(Thing(i))
        seen.append(int(h))
        if i % 2:
            h.delete()
        else:
            assert lib.pb_handle_release(int(h)) == lib.PB_OK  # released by C
            ptrbridge.collect()
        if i >= 40 and lib.pb__handle_test_gen_limit(0) > retired_before:
            break
    assert len(set(seen)) == len(seen), "a token was issued twice"
    for token in seen:  # every stale token stays invalid, none resolves to a newer object
        with pytest.raises(InvalidHandleError):
            handle_value(token)
    assert lib.pb__handle_test_gen_limit(0) > retired_before


def test_free_slots_are_reused_first_in_first_out() -> None:
    first = [Handle(Thing(i)) for i in range(4)]
    slots = [lib.pb__handle_slot(int(h)) for h in first]
    for h in first:
        h.delete()
    again = Handle(Thing(9))
    assert lib.pb__handle_slot(int(again)) != slots[-1]  # LIFO would hand out the last one at once
    again.delete()


class Reborn:
    """Creates a Handle of its own when it is dropped, as a __del__ may."""

    born: List[Handle] = []
    dropped = 0

    def __init__(self, n: int) -> None:
        self.n = n

    def __del__(self) -> None:
        Reborn.dropped += 1
        Reborn.born.append(Handle(("reborn", self.n)))


def test_handles_created_while_dropping_released_objects_do_not_overwrite_them() -> None:
    Reborn.born, Reborn.dropped = [], 0
    handles = [Handle(Reborn(i)) for i in range(10)]
    for h in handles:
        assert lib.pb_handle_release(int(h)) == lib.PB_OK
    del h
    assert ptrbridge.collect() == 10
    assert Reborn.dropped == 10, "an object behind a released handle was never dropped (it leaked)"
    assert sorted(h.value()[1] for h in Reborn.born) == list(range(10))
    for h in Reborn.born:
        h.delete()
    Reborn.born = []


def test_weakref_callbacks_creating_handles_during_collect() -> None:
    made: List[Handle] = []
    things = [Thing(i) for i in range(5)]
    refs = [weakref.ref(t, lambda _r, i=i: made.append(Handle(i))) for i, t in enumerate(things)]
    handles = [Handle(t) for t in things]
    del things
    for h in handles:
        lib.pb_handle_release(int(h))
    ptrbridge.collect()
    assert all(r() is None for r in refs)
    assert sorted(h.value() for h in made) == list(range(5))
    for h in made:
        h.delete()
