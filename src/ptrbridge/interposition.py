"""C's own memory at check level 2: the malloc family of unmodified libraries, and their globals.

At check level 2 ptrbridge rewrites the GOT entries of ``malloc``,
``calloc``, ``realloc``, ``reallocarray``, ``free``, ``posix_memalign``,
``aligned_alloc``, ``memalign``, ``valloc``, ``strdup`` and ``strndup`` in every
loaded non-system shared object (no ``LD_PRELOAD``, no rebuild: it works in an
already running interpreter or pytest), and ``dlopen``/``dlclose`` in every
object but libc and the loader, so a library loaded later (``ffi.dlopen``,
``ctypes.CDLL``, an extension import, a library's own ``dlopen``) is patched as
it loads and forgotten as it unloads.  Leaving level 2 restores every entry.

Every block those libraries allocate is then a scan root, with its size and the
function that allocated it, and the writable segments (.data/.bss) of every
non-system library are roots too.  A retained pointer is reported where C holds
it, in words: ``in a 64-byte block allocated by ctx_new() in libfoo.so, at
offset 8``, ``in static variable g_prefix of liblog.so``.

System objects (:data:`SYSTEM_OBJECTS`) are never patched for the malloc family
and their globals are not scanned: CPython (the executable, libpython, the
standard library's extension modules in ``lib-dynload``), libc, libm,
libpthread, libdl, librt, libutil, libresolv, libgcc_s, libffi, the loader and
the vDSO, the C++/Fortran/OpenMP runtimes, numpy's core and bundled libraries (array data is Python memory: the heap map sees it) and
ptrbridge's own module.  ``_cffi_backend`` is interposed apart: the blocks it
allocates for ``ffi.new`` are Python memory, never roots, and when one is freed
the scan looks for C pointers into it (``retained-freed``).

What it does not see: allocations a library made before level 2 was switched
on or inside its own constructors while ``dlopen`` loads it; memory libc
allocates on a library's behalf (``asprintf``, ``getline``, ``fopen``);
allocators other than the malloc family (``mmap``, custom pools, C++'s
``operator new`` is seen as an allocation by ``libstdc++``); statically linked
programs.  Set ``PTRBRIDGE_INTERPOSE=0`` to keep level 2 without it.
"""
from __future__ import annotations

import os
import struct
import threading
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from ._bindings import ffi, lib
from . import levels

__all__ = [
    "ENV_VAR",
    "SYSTEM_OBJECTS",
    "InterposeStats",
    "LoadedObject",
    "enable",
    "disable",
    "enabled",
    "refresh",
    "stats",
    "objects",
    "blocks",
    "find_block",
    "describe_code",
    "describe_data",
    "describe_block_holder",
]

ENV_VAR = "PTRBRIDGE_INTERPOSE"

SYSTEM_OBJECTS = (
    "the main executable (CPython)",
    "libpython*",
    "CPython's extension modules (*/lib-dynload/*)",
    "libc.so*, the loader (ld-linux*), the vDSO (never touched at all)",
    "libm, libpthread, libdl, librt, libutil, libresolv, libgcc_s, libnsl, libanl",
    "libffi",
    "language runtimes: libstdc++, libgfortran, libquadmath, libgomp, libopenblas (their "
    "constructors allocate before they can be patched)",
    "numpy's _multiarray_umath and numpy.libs/* (array data is Python memory, seen by the heap map)",
    "ptrbridge's own module (never touched at all)",
)
"""What the interposer skips for the malloc family and the globals (dlopen/dlclose are still
interposed in all but libc, the loader, the vDSO and ptrbridge)."""

_CLASS_NAMES = {0: "patched", 1: "system", 2: "cffi", 3: "skipped"}


@dataclass(frozen=True)
class InterposeStats:
    """Counters of the interposer (see :func:`stats`)."""

    enabled: bool
    objects_patched: int
    slots_patched: int
    live_blocks: int
    live_bytes: int
    python_blocks: int
    allocations: int
    frees: int
    foreign_frees: int
    rewalks: int
    held_blocks: int = 0
    """Freed ffi.new blocks held back from libc, poisoned (at most 4096 and ``held_bytes`` bounded)."""
    held_bytes: int = 0
    """Their bytes: at most ``heapmap.DEFAULT_HOLD_BYTES``, the oldest given back first."""


@dataclass(frozen=True)
class LoadedObject:
    """A loaded object as the interposer classed it: ``klass`` is ``"patched"``, ``"system"``,
    ``"cffi"`` or ``"skipped"``."""

    path: str
    klass: str
    base: int


_lock = threading.Lock()


def enabled() -> bool:
    """Whether the interposer is on."""
    st = ffi.new("struct pb_interpose_stats *")
    lib.pb__interpose_get_stats(st)
    return bool(st.enabled)


def enable() -> bool:
    """Patch every loaded non-system object (done at check level 2).  Returns False if already on.

    Raises ``MemoryError`` if the tables cannot be allocated, ``OSError`` on a
    platform without support (x86-64 and aarch64 Linux are supported).
    """
    with _lock:
        rc = lib.pb__interpose_enable()
    if rc == lib.PB_ERR_NOMEM:
        raise MemoryError("ptrbridge: interposing the malloc family: out of memory")
    if rc < 0:
        raise OSError("ptrbridge: interposing the malloc family is not supported on this platform")
    return rc == 0


def disable() -> bool:
    """Restore every GOT entry and forget the blocks.  Returns False if it was off."""
    with _lock:
        return lib.pb__interpose_disable() == 0


def refresh() -> bool:
    """Patch objects loaded (and forget those unloaded) since the last look; True if any."""
    return bool(lib.pb__interpose_refresh())


def stats() -> InterposeStats:
    """The interposer's counters."""
    st = ffi.new("struct pb_interpose_stats *")
    lib.pb__interpose_get_stats(st)
    return InterposeStats(
        enabled=bool(st.enabled),
        objects_patched=int(st.objects_patched),
        slots_patched=int(st.slots_patched),
        live_blocks=int(st.live_blocks),
        live_bytes=int(st.live_bytes),
        python_blocks=int(st.python_blocks),
        allocations=int(st.allocations),
        frees=int(st.frees),
        foreign_frees=int(st.foreign_frees),
        rewalks=int(st.rewalks),
        held_blocks=int(st.held_blocks),
        held_bytes=int(st.held_bytes),
    )


def objects() -> List[LoadedObject]:
    """The loaded objects at the last refresh and how each was classed."""
    path = ffi.new("char **")
    klass = ffi.new("int *")
    base = ffi.new("uintptr_t *")
    out = []
    i = 0
    while lib.pb__interpose_object(i, path, klass, base):
        out.append(LoadedObject(ffi.string(path[0]).decode(errors="replace"),
                                _CLASS_NAMES.get(int(klass[0]), "?"), int(base[0])))
        i += 1
    return out


def blocks() -> List[Tuple[int, int, int, bool]]:
    """Live interposed blocks as (address, size, caller return address, is Python memory)."""
    n = lib.pb__interpose_blocks(ffi.NULL, 0)
    cap = n + 1024
    out = ffi.new("struct pb_iblock[]", cap)
    n = min(lib.pb__interpose_blocks(out, cap), cap)
    return [(int(b.ptr), int(b.size), int(b.caller), bool(b.python)) for b in out[0:n]]


def find_block(address: int) -> Optional[Tuple[int, int, int, bool]]:
    """The live interposed block containing ``address``, as in :func:`blocks`, or None."""
    out = ffi.new("struct pb_iblock *")
    if not lib.pb__interpose_find(address, out):
        return None
    return int(out.ptr), int(out.size), int(out.caller), bool(out.python)


# ---- naming code and data: dladdr, then the library's own .symtab ----------

_Symbols = List[Tuple[int, int, str, int]]  # (value, size, name, type) sorted by value
_symtabs: Dict[str, Optional[_Symbols]] = {}
_STT_OBJECT, _STT_FUNC, _STT_TLS = 1, 2, 6


def _read_symtab(path: str) -> Optional[_Symbols]:
    """Every defined symbol of an ELF64 little-endian file (.symtab, else .dynsym), or None."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = []
    for i in range(shnum):
        off = shoff + i * shentsize
        if off + 64 > len(data):
            return None
        sh_type, = struct.unpack_from("<I", data, off + 4)
        sh_offset, sh_size, sh_link = struct.unpack_from("<QQI", data, off + 0x18)
        sections.append((sh_type, sh_offset, sh_size, sh_link))
    for wanted in (2, 11):  # SHT_SYMTAB, then SHT_DYNSYM
        found = [s for s in sections if s[0] == wanted]
        if not found:
            continue
        _, sym_off, sym_size, link = found[0]
        if link >= len(sections):
            continue
        str_off = sections[link][1]
        out: _Symbols = []
        for k in range(sym_off, sym_off + sym_size - 23, 24):
            st_name, st_info, _other, st_shndx, st_value, st_size = struct.unpack_from("<IBBHQQ", data, k)
            stype = st_info & 0xF
            if st_shndx == 0 or stype not in (_STT_OBJECT, _STT_FUNC) or st_value == 0:
                continue
            end = data.find(b"\0", str_off + st_name)
            name = data[str_off + st_name:end].decode(errors="replace")
            if name:
                out.append((st_value, st_size, name, stype))
        out.sort()
        return out
    return None


def _symbols(path: str) -> Optional[_Symbols]:
    if path not in _symtabs:
        _symtabs[path] = _read_symtab(path)
    return _symtabs[path]


def _object_of(address: int) -> Optional[Tuple[str, int, Optional[str], int]]:
    """(path, load base, dynamic symbol name or None, symbol address) of a loaded address."""
    obj = ffi.new("char **")
    sym = ffi.new("char **")
    sym_addr = ffi.new("uintptr_t *")
    if not lib.pb__scan_describe_address(address, obj, sym, sym_addr):
        return None
    path = ffi.string(obj[0]).decode(errors="replace") if obj[0] else ""
    name = ffi.string(sym[0]).decode(errors="replace") if sym[0] else None
    return path, int(lib.pb__scan_object_base(address)), name, int(sym_addr[0])


def _symbol_at(path: str, offset: int, want: int) -> Optional[Tuple[str, int]]:
    """(name, offset inside it) of the symbol of type ``want`` covering ``offset`` in ``path``."""
    syms = _symbols(path)
    if not syms:
        return None
    lo, hi = 0, len(syms)
    while lo < hi:
        mid = (lo + hi) // 2
        if syms[mid][0] <= offset:
            lo = mid + 1
        else:
            hi = mid
    for i in range(lo - 1, max(lo - 64, -1), -1):
        value, size, name, stype = syms[i]
        if stype == want and value <= offset < value + max(size, 1):
            return name, offset - value
    return None


def _library_name(path: str) -> str:
    return os.path.basename(path) if path else "the main program"


def describe_code(address: int) -> str:
    """``ctx_new() in libfoo.so`` for a code address (static functions included)."""
    found = _object_of(address)
    if found is None:
        return f"code at {address:#x} (in no loaded library: unloaded since?)"
    path, base, dyn_name, _ = found
    hit = _symbol_at(path, address - base, _STT_FUNC) if path else None
    name = hit[0] if hit else dyn_name
    where = _library_name(path)
    if name:
        return f"{name}() in {where}"
    return f"a static function at {where}+{address - base:#x} (the library is stripped)"


def describe_data(address: int) -> str:
    """``static variable g_prefix of liblog.so`` (``+8`` inside it) for a data address."""
    found = _object_of(address)
    if found is None:
        return f"data at {address:#x} of an unloaded library"
    path, base, dyn_name, dyn_addr = found
    hit = _symbol_at(path, address - base, _STT_OBJECT) if path else None
    where = _library_name(path)
    if hit:
        name, delta = hit
        into = f"+{delta}" if delta else ""
        if dyn_name == name:
            return f"global '{name}'{into} of {where}"
        return f"static variable {name}{into} of {where}"
    return f"the data segment of {where} (at +{address - base:#x})"


def describe_block_holder(block: int, size: int, caller: int, offset: int) -> str:
    """``a 64-byte block allocated by ctx_new() in libfoo.so, at offset 8``."""
    return f"a {size}-byte block allocated by {describe_code(caller - 1)}, at offset {offset}"


def _on_level_change(old: int, new: int) -> None:
    if os.environ.get(ENV_VAR, "1").strip() == "0":
        return
    if new == 2 and old != 2:
        enable()
    elif old == 2 and new != 2:
        disable()


levels.add_level_listener(_on_level_change)
