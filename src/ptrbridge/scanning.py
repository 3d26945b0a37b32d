"""Finding what C kept: rule R2 at check level 2.

R2. C may not keep a pointer to Python-owned memory after the call returns,
unless that memory is pinned for as long as C keeps it.

Checking arguments cannot see a pointer C stores away.  At level 2 ptrbridge
remembers the Python memory C no longer has the right to hold - lent to a
call that has returned, unpinned, or freed - and scans C memory for words
that point into it, conservatively (every aligned pointer-sized word), like
Go's ``cgocheck=2``.  The roots scanned are:

* every live block of the tracked allocator (``CBuffer``, ``cnew``,
  ``pb_malloc``, and libraries routed through :func:`ptrbridge.c_allocator`);
* regions registered with :func:`add_root` (or ``pb_root_add`` from C);
* the writable data (.data/.bss) of libraries named with :func:`watch_library`;
* at level 2, with the interposer (:mod:`ptrbridge.interposition`): every block
  an unmodified library got from ``malloc`` & co, and the writable data of
  every non-system library.

CPython's own heap is never scanned.  Roots are read fault-proof: one that
became unmapped (its CBuffer freed, ``munmap``, a watched library unloaded)
is skipped and reported once with a :class:`~ptrbridge.StaleRootWarning`.

Every finding is also recorded as a :class:`ptrbridge.findings.Finding`:
``retained-live`` when C still points into memory it was lent that is still
alive, ``retained-freed`` when it points into Python memory freed since
(severity ``"portability"`` for both: C may never use the pointer again; the
harness decides what fails).  Scans run after checked calls (batched:
the batch grows while scanning costs more than a tenth of the time between
scans), at ``Pinner.unpin()``, when ``ptrbridge.new`` memory is freed, and on
:func:`scan`.  A finding is a :class:`Retention`; :func:`set_on_violation`
chooses whether automatic scans raise :class:`RetainedPointerError`, warn, or
collect findings for :func:`violations`.
"""
from __future__ import annotations

import itertools
import operator
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Set, Tuple, Union

from . import findings as _findings
from .callsite import user_stacklevel
from ._bindings import address_of, check, ffi, lib, native
from .errors import PointerError, PointerWarning, RootError, RootTypeError, StaleRootWarning

__all__ = [
    "Retention",
    "RetainedPointerError",
    "RetainedPointerWarning",
    "scan",
    "retire",
    "retire_many",
    "cancel",
    "set_on_violation",
    "set_scan_batch",
    "violations",
    "clear_violations",
    "add_root",
    "remove_root",
    "watch_library",
    "unwatch_library",
    "after_call",
    "scan_freed_python_memory",
    "stale_roots",
    "LENT_HISTORY",
]

FIX_HINT = (
    "pin the object for as long as C keeps the pointer, copy it with ptrbridge.CBuffer, "
    "or pass a ptrbridge.Handle instead"
)
_STATE_TEXT = {
    "returned": "after the call returned",
    "unpinned": "after it was unpinned",
    "freed": "after the object was freed",
}
_ROOT_KINDS = {1: "allocation", 2: "root", 3: "library", 4: "interposed"}
_MAX_FINDINGS = 4096


class RetainedPointerError(PointerError, RuntimeError):
    """Rule R2: C kept a pointer to Python memory it no longer had the right to hold.

    ``retentions`` lists every finding of the scan that raised.
    """

    def __init__(self, message: str, retentions: List["Retention"]) -> None:
        super().__init__(message)
        self.retentions = retentions


class RetainedPointerWarning(PointerWarning):
    """A retention found by an automatic scan when ``set_on_violation("warn")``."""


@dataclass(frozen=True)
class Retention:
    """One pointer C holds to Python memory it should not hold."""

    description: str  # the Python object, e.g. "bytes(4096)"
    function: str  # the call that lent it ("Pinner.pin" / "ptrbridge.new" for others)
    lent_at: str  # Python file:line of that call
    state: str  # "returned", "unpinned" or "freed"
    root_kind: str  # "allocation", "root", "library" or "interposed"
    root: str  # where C holds it, in words
    offset: int  # offset of the pointer inside the root
    address: int  # the pointer value C holds
    object_offset: int  # how far into the object it points
    object_size: Optional[int] = None  # size of the Python memory pointed into

    def __str__(self) -> str:
        into = f" (+{self.object_offset})" if self.object_offset else ""
        if self.function.startswith("("):  # not lent by a checked call: the call is not known
            lent = " (given to C by a call ptrbridge did not check)"
        else:
            lent = f" lent to {self.function}() at {self.lent_at}"
        return (
            f"ptrbridge: C kept a pointer to Python memory {_STATE_TEXT.get(self.state, self.state)} "
            f"(R2): {self.description}{into}{lent} "
            f"is still pointed to by {self.root}{'' if ', at offset' in self.root else f' at offset {self.offset}'} "
            f"(pointer {self.address:#x}) ({FIX_HINT})"
        )

    @property
    def kind(self) -> str:
        """The finding kind: ``"retained-freed"`` (into freed memory) or ``"retained-live"``."""
        return "retained-freed" if self.state == "freed" else "retained-live"

    def to_finding(self) -> "_findings.Finding":
        """This retention as a structured :class:`ptrbridge.findings.Finding`."""
        return _findings.Finding(
            kind=self.kind,
            severity="portability",
            rule="R2",
            message=f"{self}\nSUMMARY: ptrbridge: {self.kind} {self.description} held by C in {self.root}",
            object=self.description,
            object_size=self.object_size,
            function=self.function,
            lent_at=self.lent_at,
            holder=self.root,
            state=self.state,
            extra={"root_kind": self.root_kind, "offset": self.offset, "address": self.address,
                   "object_offset": self.object_offset},
        )


@dataclass
class _Target:
    start: int
    size: int
    description: str
    function: str
    site: str
    state: str
    given_back: bool = False  # freed libc-backed memory the heap map's hold gave back (may be C's now)


_lock = threading.RLock()
_targets: Dict[int, _Target] = {}
# Freed Python blocks queued in bulk: (first id, count, starts, sizes); their
# _Target is made only if a finding names them.
_freed_batches: List[Tuple[int, int, Any, Any]] = []
# Ranges queued by retire_many: (first id, starts, sizes, descriptions, function, sites, state);
# their _Target is made only if a finding names them.
_RetiredBatch = Tuple[int, List[int], List[int], List[str], str, List[str], str]
_retired_batches: List[_RetiredBatch] = []


class _Ids:
    """Scan target ids: one at a time, or a block of consecutive ones.

    A block is taken in one step, so no other thread gets an id inside it (the
    scanner prefers the newest target, by id).  The counter is in C
    (csrc/pylends.c), shared with the level-2 fast path, which takes ids with
    the GIL held as this does.  Not an ``itertools.islice`` of a counter: that
    makes and frees an int per id, which would fill the heap map's freed
    history with ptrbridge's own garbage.
    """

    def take(self, n: int = 1) -> int:
        """The first of ``n`` new consecutive ids."""
        return native.target_ids(n)  # type: ignore[no-any-return]

    def __next__(self) -> int:
        return self.take()


_target_ids = _Ids()
_on_violation = "raise"
_violations: List[Retention] = []
_library_ids = itertools.count(1)
_libraries: Dict[str, int] = {}
_roots: Dict[int, Tuple[int, int]] = {}

# Batching of automatic scans: adaptive unless fixed with set_scan_batch().
_batch = 1
_fixed_batch: Optional[int] = None
_MAX_BATCH = 16384  # at ~1 µs a call, a scan every ~16 ms at most: the report still names the call
_calls_since_scan = 0
_scan_due = False  # set when retired memory was freed: scan at the next opportunity
_last_scan_end = time.perf_counter()


LENT_HISTORY = 65536
"""How many lent regions keep their provenance (the call that lent them, file:line) after the
scan that looked for them, so a pointer found later into the freed object still names the call."""

Description = Union[str, Callable[[], str]]
"""A region's description, or a function that makes it (called only when a report needs it)."""


_PAGE_SHIFT = 12
_INDEXED_PAGES = 256  # a lend is indexed under every page it covers, up to this many (1 MiB)
# start -> (size, description, function, site, seq, slot).  Lend number seq took slot
# seq % LENT_HISTORY in _clocks (the heap map's free clock when it was made) and in
# _slot_start; a new lend taking a slot forgets the old one, so at most LENT_HISTORY
# are kept, the oldest going first.  The same lend again (same start, size and texts:
# a buffer a loop passes to C at every call) keeps its slot and gets a new seq and
# clock.  Indexed by page (_lent_pages: every page a lend covers; _lent_huge: lends
# over _INDEXED_PAGES pages, looked at every time), so finding the lends inside a
# freed block is not a walk of them all.
_Lend = Tuple[int, Description, str, Description, int, int]
_lent: Dict[int, _Lend] = {}
_lent_pages: Dict[int, Set[int]] = {}
_lent_huge: Set[int] = set()
_slot_start: List[Optional[int]] = [None] * LENT_HISTORY
_clocks = ffi.new("uint64_t[]", 3 * LENT_HISTORY)  # written under _lock


def _text(description: Description) -> str:
    return description() if callable(description) else description


def _pages(start: int, size: int) -> range:
    return range(start >> _PAGE_SHIFT, ((start + max(size, 1) - 1) >> _PAGE_SHIFT) + 1)


def _forget_lend(start: int) -> None:
    size = _lent.pop(start)[0]
    pages = _pages(start, size)
    if len(pages) > _INDEXED_PAGES:
        _lent_huge.discard(start)
        return
    for page in pages:
        starts = _lent_pages[page]
        starts.discard(start)
        if not starts:
            del _lent_pages[page]


def _remember_lend(start: int, size: int, description: Description, function: str, site: Description) -> None:
    seq = native.lend_seqs(1)  # shared with the fast path's history (csrc/pylends.c): newest wins
    prior = _lent.get(start)
    if prior is not None:
        if prior[0] == size and prior[2] == function and prior[1] == description and prior[3] == site:
            lib.pb__heapmap_clock_store(_clocks, prior[5])  # lent again: the free clock of now
            _lent[start] = (size, description, function, site, seq, prior[5])
            return
        _forget_lend(start)
    slot = seq % LENT_HISTORY
    old = _slot_start[slot]
    if old is not None and old in _lent and _lent[old][5] == slot:
        _forget_lend(old)  # the oldest lend kept: its slot is needed
    _slot_start[slot] = start
    lib.pb__heapmap_clock_store(_clocks, slot)
    _lent[start] = (size, description, function, site, seq, slot)
    pages = _pages(start, size)
    if len(pages) > _INDEXED_PAGES:
        _lent_huge.add(start)
        return
    for page in pages:
        starts = _lent_pages.get(page)
        if starts is None:
            _lent_pages[page] = {start}
        else:
            starts.add(start)


def _lends_overlapping(start: int, size: int) -> List[int]:
    """Starts of the remembered lends that overlap [start, start + size)."""
    if not _lent:
        return []
    end = start + max(size, 1)
    pages = _pages(start, size)
    if len(pages) > len(_lent_pages):  # a block larger than all the indexed pages: look at each lend
        candidates: Any = _lent
    else:
        found: Set[int] = set(_lent_huge)
        for page in pages:
            starts = _lent_pages.get(page)
            if starts:
                found |= starts
        candidates = found
    return [s for s in candidates if s < end and start < s + max(_lent[s][0], 1)]


def _best_lend(start: int, size: int, consume: bool = False) -> Optional[Tuple[int, _Lend]]:
    """(start, record) of the lend :func:`_lent_inside` names, or None."""
    best: Optional[Tuple[int, _Lend]] = None
    overlapping = _lends_overlapping(start, size)
    for lent_start in overlapping:
        lend = _lent[lent_start]
        if not consume:
            clock = _clocks + 3 * lend[5]
            if int(lib.pb__heapmap_frees_since(lent_start, clock)) != 1:
                continue
        if best is None or lend[4] > best[1][4]:
            best = (lent_start, lend)
    if consume:
        for lent_start in overlapping:
            _forget_lend(lent_start)
    else:
        # The lends of level 2's fast path are kept in C (csrc/pylends.c): the newest of both.
        fast = native.fast_lend_best(start, size)
        if fast is not None and (best is None or fast[1] > best[1][4]):
            (lent_start, lent_size, description, function, site), seq = fast
            best = (lent_start, (lent_size, description, function, site, seq, -1))
    return best


def _lent_inside(start: int, size: int, consume: bool = False) -> Optional[_Target]:
    """The most recent lend of memory inside the freed block [start, start + size), as a freed target.

    Only a lend made while the freed object was alive counts: a lend of an earlier object
    at the same address (freed, its memory reused by an object nobody lent, freed again)
    would name the wrong object.  For a block the heap map saw freed, exactly one heap map
    free of that address must have come after the lend (a walk of the free history: for
    reports only).  ``consume`` is for blocks freed outside the heap map (ffi.new memory,
    taken in the order they were freed, each time a scan runs): the lends inside are
    forgotten once matched, so a later free at the same address cannot match them.
    """
    found = _best_lend(start, size, consume)
    if found is None:
        return None
    best = found[1]
    return _Target(start, size, _text(best[1]), best[2], _text(best[3]), "freed")


def remember_lend(start: int, size: int, description: Description, function: str, site: Description) -> None:
    """Keep the provenance of Python memory a call reached without a lend record.

    A nested pointer into a live Python object (an ``iovec.iov_base`` set from
    a ``bytearray``), or the original of a quarantine shadow: if C's pointer
    into it dangles later, the report names the object and the call.
    ``description`` and ``site`` may be functions that make the text: they are
    called only if a report needs it, when the object and its frame may be
    gone (so they must not hold either: that would keep them alive).
    """
    with _lock:
        _remember_lend(start, size, description, function, site)


def lent_record(start: int, size: int) -> Optional[Tuple[int, int, str, str, str]]:
    """``(lend start, lend size, description, function, site)`` of the lend
    :func:`lent_provenance` names for a freed block, or None (one walk for both)."""
    with _lock:
        found = _best_lend(start, size)
    if found is None:
        return None
    lent_start, lend = found
    return lent_start, lend[0], _text(lend[1]), lend[2], _text(lend[3])


def lent_provenance(start: int, size: int) -> Optional[Tuple[str, str, str]]:
    """``(description, function, site)`` of the most recent lend inside a freed block, or None.

    For use-after-free reports: names the object and the call that lent it
    instead of the bare heap block, if the lend was of the object freed there
    (not of an earlier one at the same address).  Reads the heap map's free
    history; call it only for a finding.
    """
    record = lent_record(start, size)
    return None if record is None else record[2:]


def retire(start: int, size: int, description: Description, function: str, site: Description,
           state: str) -> None:
    """Queue Python memory C must no longer hold; the next scan looks for it.

    Freed memory makes the next automatic scan run regardless of the batch.
    A callable ``description`` or ``site`` is called now (the scan compares the texts).
    """
    global _scan_due
    description, site = _text(description), _text(site)
    with _lock:
        if state == "freed":
            _scan_due = True
            native.fastcall_scan_due(1)
        elif function and not function.startswith("("):
            _remember_lend(start, size, description, function, site)
        target_id = next(_target_ids)
        _targets[target_id] = _Target(start, size, description, function, site, state)
        check(lib.pb__scan_retire(start, size, target_id), f"queueing {description} for the scan")


def retire_many(starts: List[int], sizes: List[int], descriptions: List[str], function: str,
                sites: List[str], state: str) -> None:
    """The batch form of :func:`retire`: range ``i`` is ``[starts[i], starts[i] + sizes[i])``,
    with the texts ``descriptions[i]`` and ``sites[i]``.

    The same as calling :func:`retire` for each range in turn (provenance kept, targets
    queued in order), under one lock acquisition and with one C call for the whole batch;
    a range's target record is made only if a finding names it.  The texts are strings
    (a batch usually repeats a few: make each once and pass the same string).
    """
    global _scan_due
    n = len(starts)
    if not (n == len(sizes) == len(descriptions) == len(sites)):
        raise ValueError("ptrbridge.scanning.retire_many: starts, sizes, descriptions and sites differ in length")
    if not n:
        return
    c_starts, c_sizes = ffi.new("uintptr_t[]", starts), ffi.new("size_t[]", sizes)
    # scan() looks up the ffi.new targets among the _Target records: those are made now
    eager = any(text.startswith("ffi.new") for text in set(descriptions))
    with _lock:
        if state == "freed":
            _scan_due = True
            native.fastcall_scan_due(1)
        elif function and not function.startswith("("):
            _remember_lends(starts, sizes, descriptions, function, sites)
        first = _target_ids.take(n)  # first .. last, in one step
        last = first + n - 1
        if eager:
            _targets.update(zip(range(first, last + 1), map(
                _Target, starts, sizes, descriptions, itertools.repeat(function), sites, itertools.repeat(state))))
        check(lib.pb__scan_retire_many(c_starts, c_sizes, first, n), f"queueing {n} ranges for the scan")
        if not eager:
            _retired_batches.append((first, list(starts), list(sizes), list(descriptions), function,
                                     list(sites), state))


def _remember_lends(starts: List[int], sizes: List[int], descriptions: List[str], function: str,
                    sites: List[str]) -> None:
    """:func:`_remember_lend` for each range in turn, the same records (under ``_lock``).

    The common case inlined: a buffer lent again with the same texts (a pool of payloads
    pinned batch after batch) only refreshes its record.
    """
    lent = _lent
    n = len(starts)
    priors = list(map(lent.get, starts, itertools.repeat(_NO_LEND, n)))
    texts = list(zip(sizes, descriptions, itertools.repeat(function, n), sites))
    if texts == list(map(_LEND_TEXTS, priors)):  # every one lent again with the same texts
        # What the loop below does for each, without a Python loop: new seqs, same slots.
        slots = list(map(_LEND_SLOT, priors))
        seq = native.lend_seqs(n)
        lent.update(zip(starts, map(operator.add, texts, zip(range(seq, seq + n), slots))))
        lib.pb__scan_clocks_store(_clocks, ffi.new("size_t[]", slots), n)  # the free clock of now
        return
    for start, size, description, site in zip(starts, sizes, descriptions, sites):
        _remember_lend(start, size, description, function, site)  # refreshes the ones lent again


_NO_LEND = (None, None, None, None, None, None)
_LEND_TEXTS = operator.itemgetter(slice(0, 4))  # (size, description, function, site) of a _Lend
_LEND_SLOT = operator.itemgetter(5)


def _retired_target(batches: List[_RetiredBatch], target_id: int) -> Optional[_Target]:
    for first, starts, sizes, descriptions, function, sites, state in batches:
        if first <= target_id < first + len(starts):
            i = target_id - first
            return _Target(starts[i], sizes[i], descriptions[i], function, sites[i], state)
    return None


def cancel(start: int, size: int) -> None:
    """Drop queued targets overlapping this range: it is lent or pinned again, legitimately."""
    if _targets or _retired_batches or native.fast_lends_pending():
        lib.pb__scan_cancel(start, size)


def _root_text(kind: int, root_id: int, base: int, size: int, offset: int) -> str:
    from . import interposition

    if kind == 4:
        return interposition.describe_block_holder(base, size, root_id, offset)
    if kind == 3:
        return f"{interposition.describe_data(base + offset)}"
    if kind == 2:
        return f"registered root #{root_id} ({size} bytes at {base:#x})"
    return f"C heap block {base:#x} ({size} bytes, tracked allocator)"


_warned_stale: Set[Tuple[str, int]] = set()


def stale_roots() -> List[Tuple[str, int, int, int, str]]:
    """Roots the last scan skipped: (kind, id, base, size, reason) with reason ``"unreadable"``
    (unmapped or freed since it was added) or ``"unloaded"`` (a watched library after dlclose)."""
    cap = 256
    out = ffi.new("struct pb_stale_root[]", cap)
    n = min(lib.pb__scan_stale(out, cap, ffi.NULL), cap)
    reasons = {1: "unreadable", 2: "unloaded"}
    return [(_ROOT_KINDS.get(int(r.root_kind), "?"), int(r.root_id), int(r.base), int(r.size),
             reasons.get(int(r.reason), "?")) for r in out[0:n]]


def _warn_stale() -> None:
    for kind, root_id, base, size, reason in stale_roots():
        if kind == "root":
            key = ("root", root_id)
            what = f"registered root #{root_id} ({size} bytes at {base:#x})"
            fix = "remove it with ptrbridge.remove_root() before freeing its memory"
        elif root_id:
            key = ("library", root_id)
            name = next((n for n, i in _libraries.items() if i == root_id), f"#{root_id}")
            what = f"watched library {name!r} segment {base:#x} ({size} bytes)"
            fix = "unwatch it with ptrbridge.unwatch_library() before unloading it"
        else:
            continue  # an automatic library root: forgotten at the next refresh
        if key in _warned_stale:
            continue
        _warned_stale.add(key)
        warnings.warn(
            f"ptrbridge.scan: skipped {what}: it is {reason} now ({fix})",
            StaleRootWarning, stacklevel=user_stacklevel(),
        )


def scan() -> List[Retention]:
    """Scan now for every queued target and return the findings (does not raise).

    The queue is emptied: each lent, unpinned or freed region is looked for
    once, at the first scan after it was retired.
    """
    global _calls_since_scan, _last_scan_end, _scan_due
    with _lock:
        _scan_due = False
        if not _targets and not _freed_batches and not _retired_batches and not native.fast_lends_pending():
            _calls_since_scan = 0
            native.fastcall_take_l2()
            _sync_fast_due()
            return []
        out = ffi.new("struct pb_finding[]", _MAX_FINDINGS)
        scanned = ffi.new("uint64_t *")
        # The fast path's records of the targets queued so far; one queued while the scan
        # runs (another thread: the scan releases the GIL) stays pending, and is read too.
        native.fast_lends_swap()
        total = lib.pb__scan_run(out, _MAX_FINDINGS, 0, scanned)
        targets = dict(_targets)
        _targets.clear()
        batches, _freed_batches[:] = list(_freed_batches), []
        retired, _retired_batches[:] = list(_retired_batches), []
        # The fast path's targets a finding names, resolved before its records go (a scan on
        # another thread, once this one lets go of the lock, swaps in records of its own).
        for i in range(min(total, _MAX_FINDINGS)):
            target_id = int(out[i].target_id)
            if target_id not in targets:
                fast = _fast_target(target_id)
                if fast is not None:
                    targets[target_id] = fast
        native.fast_lends_release()
        _calls_since_scan = 0
        native.fastcall_take_l2()
        _sync_fast_due()
    found: List[Retention] = []
    # One place in memory is one finding, even when two roots cover it (a registered
    # root inside an interposed block, a watched library's segment) or two targets
    # do (memory lent by a call and freed since: reported as freed, naming the call).
    by_place: Dict[int, Tuple[Any, _Target]] = {}
    cffi_freed: Optional[Dict[int, _Target]] = None  # made at the first finding that needs it
    for i in range(min(total, _MAX_FINDINGS)):
        f = out[i]
        place = int(f.root_base) + int(f.offset)
        target = (targets.get(int(f.target_id)) or _freed_target(batches, int(f.target_id))
                  or _retired_target(retired, int(f.target_id)))
        if target is None:
            continue
        if target.function.startswith("("):
            if cffi_freed is None:
                cffi_freed = {t.start: t for t in targets.values() if t.description.startswith("ffi.new")}
            if target.start in cffi_freed:
                target = cffi_freed[target.start]  # the heap map's record of an ffi.new block: say so
        if target.state == "freed":
            if _live_again(int(f.value), target.start):
                continue  # the address belongs to a live block now (the freed one was reused)
            if target.function.startswith("("):
                with _lock:
                    lent = _lent_inside(target.start, target.size)
                if lent is None and (target.given_back or lib.pb__interpose_c_before(int(f.value))):
                    # No checked call lent it, and libc has had this memory back (C code no
                    # hook sees - a constructor inside dlopen, libc's fopen - may own it now),
                    # or an interposed library had it before this Python block did (the word
                    # may be that library's own pointer left from then: sqlite's, libX11's).
                    continue
                target = lent or target
        prior = by_place.get(place)
        if prior is not None:
            old = prior[1]
            if target.state == "freed" and old.state != "freed":
                named = old if target.function.startswith("(") else target
                target = _Target(target.start, target.size, named.description, named.function, named.site,
                                 "freed")
            elif not (old.state == "freed" and target.state == "freed" and old.function.startswith("(")
                      and (not target.function.startswith("(") or target.description.startswith("ffi.new"))):
                continue  # keep the first, unless the new one names the lend or the ffi.new block
        by_place[place] = (f, target)
    for place, (f, target) in by_place.items():
        found.append(
            Retention(
                description=target.description,
                function=target.function,
                lent_at=target.site,
                state=target.state,
                root_kind=_ROOT_KINDS.get(int(f.root_kind), "?"),
                root=_root_text(int(f.root_kind), int(f.root_id), int(f.root_base), int(f.root_size),
                                int(f.offset)),
                offset=int(f.offset),
                address=int(f.value),
                object_offset=int(f.value) - target.start,
                object_size=target.size,
            )
        )
    for retention in found:
        _findings.record(retention.to_finding())
    _warn_stale()
    _last_scan_end = time.perf_counter()
    return found


def _fast_target(target_id: int) -> Optional[_Target]:
    """The record of a target the level-2 fast path queued (csrc/pylends.c), or None."""
    record = native.fast_lend_target(target_id)
    if record is None:
        return None
    start, size, description, function, site = record
    return _Target(start, size, description, function, site, "returned")


def _live_again(address: int, freed_start: int) -> bool:
    """Whether ``address`` belongs to memory that is not the freed Python block any more: a live
    interposed C block (libc gave the memory to C since), a live Python block carved differently
    (C may legitimately point into either now), or a block an interposed library got from libc
    after Python's last free there and has freed itself since (the word is that library's own
    stale pointer into its own freed memory, not a pointer into Python memory), or the loader's own
    record of a loaded object (a live link_map, i.e. a dlopen() handle, or its name: ld.so gets that
    memory from libc without the interposer seeing it, often where Python freed a block)."""
    if lib.pb__interpose_in_link_map(address):
        return True
    out = ffi.new("struct pb_iblock *")
    for probe in (address, address - 1):  # inside a live block, or one past its end (a consumed next_in)
        if lib.pb__interpose_find(probe, out) and not (out.python and int(out.ptr) == freed_start):
            return True
    block = lib.pb__heapmap_lookup(address)
    if block.status == 1 and int(block.start) != freed_start:
        return True
    return lib.pb__interpose_c_reused(address) == 2


def scan_freed_python_memory() -> List[Retention]:
    """Scan for pointers into Python memory freed since the last call (level 2, heap map on).

    C code that ptrbridge does not wrap (a C extension called directly) can
    keep a pointer to a buffer it was given; once Python frees that buffer the
    heap map holds the block in quarantine and remembers it, and this scan
    finds the pointer.  Blocks whose memory is already live again are left
    out.  Returns [] when the heap map is not installed.
    """
    from . import heapmap

    queued = _retire_freed_cffi()
    if heapmap.installed():
        heapmap.verify()  # re-hooks if another allocator hook cut the map out of the chain
        with _lock:
            # Ids first .. first + _FREED_BATCH - 1 are taken before the C call (which cffi makes
            # without the GIL: a call on another thread taking an id meanwhile must not get one of
            # them).
            first = _target_ids.take(_FREED_BATCH)
            n = lib.pb__heapmap_retire_freed(first, _scratch_starts, _scratch_sizes, _FREED_BATCH)
            if n:  # kept until the scan names the findings: copies of the right size
                starts = ffi.new("uintptr_t[]", n)
                sizes = ffi.new("size_t[]", n)
                ffi.memmove(starts, _scratch_starts, n * ffi.sizeof("uintptr_t"))
                ffi.memmove(sizes, _scratch_sizes, n * ffi.sizeof("size_t"))
                _freed_batches.append((first, n, starts, sizes))
        queued += n
    return scan() if queued else []


_FREED_BATCH = 1 << 16
# Scratch for taking freed blocks, used under _lock: allocated once, so that the scans do not
# keep freeing ffi.new arrays of their own for the next scan to look for.
_scratch_starts = ffi.new("uintptr_t[]", _FREED_BATCH)
_scratch_sizes = ffi.new("size_t[]", _FREED_BATCH)


def _retire_freed_cffi() -> int:
    """Queue the ffi.new blocks (_cffi_backend's, seen by the interposer) freed since last time."""
    with _lock:
        starts, sizes = _scratch_starts, _scratch_sizes
        n = lib.pb__interpose_take_freed(starts, sizes, _FREED_BATCH, ffi.NULL)
        for i in range(n):
            start, size = int(starts[i]), int(sizes[i])
            target = _lent_inside(start, size, consume=True) or _Target(
                start, size, f"ffi.new memory ({size} bytes)", "(not a checked call)",
                "<freed cffi memory>", "freed")
            target_id = next(_target_ids)
            _targets[target_id] = target
            check(lib.pb__scan_retire(start, size, target_id), "queueing freed ffi.new memory for the scan")
    return int(n)


def _freed_target(batches: List[Tuple[int, int, Any, Any]], target_id: int) -> Optional[_Target]:
    for first, count, starts, sizes in batches:
        if first <= target_id < first + count:
            i = target_id - first
            size = int(sizes[i])
            given_back = bool(size & _GIVEN_BACK)
            size &= ~_GIVEN_BACK
            return _Target(int(starts[i]), size, f"Python memory block ({size} bytes)",
                           "(not a checked call)", "<freed Python memory>", "freed", given_back)
    return None


_GIVEN_BACK = int(lib.PB_HEAPMAP_GIVEN_BACK)


def _report(found: List[Retention]) -> None:
    if not found:
        return
    if _on_violation == "collect":
        with _lock:
            _violations.extend(found)
    elif _on_violation == "warn":
        for retention in found:
            warnings.warn(str(retention), RetainedPointerWarning, stacklevel=user_stacklevel())
    else:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise RetainedPointerError(f"{found[0]}{more}", found)


def scan_and_report() -> None:
    """An automatic scan: findings go to the violation policy."""
    _report(scan())


def after_call() -> None:
    """Called after a level-2 checked call retired its lent memory: scan when the batch is due."""
    global _calls_since_scan
    _calls_since_scan += 1
    _after_calls()


def _fast_calls_due() -> None:
    """The level-2 fast path (csrc/pycall.c) made the calls :func:`_sync_fast_due` asked for."""
    _after_calls()


def _sync_fast_due() -> None:
    """Tell the fast path after how many more calls to call :func:`_fast_calls_due`."""
    native.fastcall_scan_due(1 if _scan_due else max(1, _batch - _calls_since_scan))


def _after_calls() -> None:
    global _calls_since_scan, _batch
    _calls_since_scan += native.fastcall_take_l2()  # the fast path's calls since it last said
    if _calls_since_scan < _batch and not _scan_due:
        _sync_fast_due()
        return
    began = time.perf_counter()
    idle = began - _last_scan_end
    found = scan()
    cost = time.perf_counter() - began
    # Keep scanning under about a tenth of the run time: grow the batch when a
    # scan costs more than that, shrink it back when scans are cheap.
    if _fixed_batch is not None:
        _batch = _fixed_batch
    elif cost > idle * 0.1 and _batch < _MAX_BATCH:
        _batch *= 2
    elif cost < idle * 0.01 and _batch > 1:
        _batch //= 2
    _sync_fast_due()
    _report(found)


def set_scan_batch(calls: Optional[int]) -> Optional[int]:
    """Scan after every ``calls`` checked calls that lent memory (``None``: adaptive, the default).

    Adaptive batching keeps scanning under about a tenth of the run time, so a
    retention may be reported a few calls after the call that caused it (the
    report still names that call).  ``1`` scans after every call: exact blame,
    at a higher cost.  Returns the previous setting.
    """
    global _fixed_batch, _batch
    if calls is not None and (isinstance(calls, bool) or not isinstance(calls, int) or calls < 1):
        raise ValueError(f"ptrbridge.set_scan_batch: calls must be a positive int or None, not {calls!r}")
    old, _fixed_batch = _fixed_batch, calls
    _batch = calls if calls is not None else 1
    _sync_fast_due()
    return old


def set_on_violation(mode: str) -> str:
    """What automatic scans do with findings: ``"raise"`` (default), ``"warn"`` or ``"collect"``.

    Returns the previous mode.  ``"collect"`` gathers them for :func:`violations`.
    """
    global _on_violation
    if mode not in ("raise", "warn", "collect"):
        raise ValueError(
            f"ptrbridge.set_on_violation: mode must be 'raise', 'warn' or 'collect', not {mode!r}"
        )
    old, _on_violation = _on_violation, mode
    return old


def violations() -> List[Retention]:
    """Findings gathered while the mode was ``"collect"``."""
    with _lock:
        return list(_violations)


def clear_violations() -> List[Retention]:
    """Return and forget the gathered findings."""
    with _lock:
        found = list(_violations)
        _violations.clear()
        return found


def add_root(address: Any, size: int) -> int:
    """Register ``[address, address + size)`` of C memory as a scan root; returns its id.

    ``address`` is an int or a cffi pointer/array.  The whole region must be
    readable now (:class:`~ptrbridge.RootError` otherwise, a ``ValueError``);
    if it stops being readable later (freed, unmapped) scans skip it and warn
    once with :class:`~ptrbridge.StaleRootWarning`.  Remove it with
    :func:`remove_root` before freeing it.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"ptrbridge.add_root: size must be a non-negative int, not {size!r}")
    if isinstance(address, bool) or not isinstance(address, (int, ffi.CData)):
        raise RootTypeError(
            f"ptrbridge.add_root: address must be an int or a cffi pointer, not {type(address).__name__}"
        )
    if isinstance(address, ffi.CData) and ffi.typeof(address).kind not in ("pointer", "array"):
        raise RootTypeError(
            f"ptrbridge.add_root: address must be a cffi pointer or array, not {ffi.typeof(address).cname}"
        )
    addr = address_of(address)
    if addr <= 0 or addr + size > 1 << 64:
        raise RootError(f"ptrbridge.add_root: [{addr:#x}, +{size}) is not a valid address range")
    if not lib.pb__scan_readable(addr, size):
        raise RootError(
            f"ptrbridge.add_root: [{addr:#x}, +{size}) is not readable memory (unmapped or partly "
            f"unmapped): register only memory C owns and keeps mapped"
        )
    out = ffi.new("uint64_t *")
    check(lib.pb_root_add(ffi.cast("void *", addr), size, out), f"add_root({addr:#x}, {size})")
    root_id = int(out[0])
    _roots[root_id] = (addr, size)
    return root_id


def remove_root(root_id: int) -> None:
    """Unregister a root added with :func:`add_root`."""
    check(lib.pb_root_remove(root_id), f"remove_root({root_id})")
    _roots.pop(root_id, None)


def watch_library(name: str) -> int:
    """Scan the writable data (.data/.bss) of the loaded library whose path contains ``name``.

    Returns the number of segments watched; raises ``ValueError`` if no
    loaded library matches.  Watching the same name twice is harmless.
    """
    if not isinstance(name, str) or not name:
        raise ValueError("ptrbridge.watch_library: name must be a non-empty str")
    with _lock:
        if name in _libraries:
            lib.pb__scan_unwatch_library(_libraries.pop(name))
        lib_id = next(_library_ids)
        segments = lib.pb__scan_watch_library(name.encode(), lib_id)
        if segments < 0:
            check(segments, f"watch_library({name!r})")
        if segments == 0:
            raise ValueError(
                f"ptrbridge.watch_library: no loaded library's path contains {name!r} "
                f"(load it first, e.g. with ffi.dlopen or ctypes.CDLL)"
            )
        _libraries[name] = lib_id
        return int(segments)


def unwatch_library(name: str) -> None:
    """Stop scanning a library watched with :func:`watch_library`."""
    with _lock:
        lib_id = _libraries.pop(name, None)
    if lib_id is None:
        raise ValueError(f"ptrbridge.unwatch_library: {name!r} is not watched")
    lib.pb__scan_unwatch_library(lib_id)
