"""ptrbridge as a test harness: the pytest plugin, ``python -m ptrbridge run`` and ptrbridge.testing."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import ptrbridge
from ptrbridge.testing import GrowthError, assert_no_growth, leaks

from cbuild import build_extension, build_shared


@pytest.fixture(scope="module")
def pbext_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_extension("pbext.c", tmp_path_factory.mktemp("pbext"))


def _load_pbext(path: Path):  # type: ignore[no-untyped-def]
    import importlib.util

    spec = importlib.util.spec_from_file_location("_pbext", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- the plugin ----------------------------------------------------------------

LEAKY_TESTS = """
    import ptrbridge, pytest

    def test_clean():
        with ptrbridge.CBuffer(16):
            pass

    def test_c_memory():
        test_c_memory.keep = ptrbridge.CBuffer(16)

    def test_handle():
        test_handle.keep = ptrbridge.Handle(object())

    def test_pin():
        test_pin.p = ptrbridge.Pinner()
        test_pin.data = bytearray(8)
        test_pin.p.pin(test_pin.data)

    def test_transferred():
        ptrbridge.CBuffer.copy(b"payload").transfer()

    @pytest.mark.ptrbridge(allow_leaks=["c_memory"])
    def test_allowed():
        test_allowed.keep = ptrbridge.CBuffer(16)
"""


def test_plugin_is_inert_without_the_flag(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_inert="""
        import sys

        def test_ptrbridge_not_loaded():
            assert "ptrbridge._native" not in sys.modules
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_leaky_tests_pass_without_the_flag(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PTRBRIDGE_CHECK", raising=False)
    pytester.makepyfile(test_leaky=LEAKY_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=6)


@pytest.mark.parametrize("enable", [["--ptrbridge=1"], ["--ptrbridge"]], ids=["level1", "bare"])
def test_each_leak_kind_fails_its_test(pytester: pytest.Pytester, enable: list) -> None:
    pytester.makepyfile(test_leaky=LEAKY_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "ignore::ptrbridge.PinLeakWarning", *enable)
    result.assert_outcomes(passed=2, failed=4)
    out = result.stdout.str()
    assert "test_leaky.py::test_c_memory" in out and "leaked 1 tracked C block(s) (16 bytes)" in out
    # each leak names the leaked resource and where it was created
    assert "leaked 1 tracked C block(s) (16 bytes): CBuffer(16) created at test_leaky.py:8" in out
    assert "leaked 1 handle(s): object created at test_leaky.py:11" in out
    assert "leaked 1 pin(s): bytearray(8) created at test_leaky.py:16" in out
    assert "leaked 1 buffer(s) transferred to C: CBuffer(7) created at test_leaky.py:19" in out
    assert "never freed by C" in out
    assert "ptrbridge findings" in out  # the summary section
    summary = out[out.index("ptrbridge findings"):]
    for name in ("test_c_memory", "test_handle", "test_pin", "test_transferred"):
        assert f"test_leaky.py::{name}" in summary
    assert "test_allowed" not in summary and "test_clean" not in summary


def test_environment_variable_enables_the_plugin(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PTRBRIDGE_CHECK", "1")
    pytester.makepyfile(test_leaky=LEAKY_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "ignore::ptrbridge.PinLeakWarning")
    result.assert_outcomes(passed=2, failed=4)


RETAINED_TESTS = """
    import ptrbridge, pytest
    from ptrbridge._bindings import ffi

    @pytest.mark.ptrbridge(allow_leaks=["c_memory"])
    def test_c_keeps_unpinned_pointer():
        data = bytearray(64)
        holder = ptrbridge.CBuffer(8)      # C memory holding a pointer, as a C struct would
        with ptrbridge.Pinner() as p:
            ffi.cast("char **", holder.ptr)[0] = p.pin(data)
        test_c_keeps_unpinned_pointer.keep = (holder, data)

    def test_c_clears_pointer_before_unpin():
        data = bytearray(64)
        with ptrbridge.CBuffer(8) as holder:
            with ptrbridge.Pinner() as p:
                ffi.cast("char **", holder.ptr)[0] = p.pin(data)
                ffi.cast("char **", holder.ptr)[0] = ffi.NULL
"""


def test_retention_is_a_portability_finding_that_fails_only_when_strict(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_retained=RETAINED_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--ptrbridge=2",
                                           "-W", "ignore::ptrbridge.PinLeakWarning")
    out = result.stdout.str()
    result.assert_outcomes(passed=2)
    assert "C kept a pointer to Python memory after it was unpinned (R2): bytearray(64)" in out
    assert "portability (does not fail: not strict)" in out

    strict = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--ptrbridge=2", "--ptrbridge-strict",
                                           "-W", "ignore::ptrbridge.PinLeakWarning")
    strict.assert_outcomes(passed=1, failed=1)
    assert "strict: portability findings fail" in strict.stdout.str()


ZSTD_DICTIONARY_TESTS = '''
    import cffi
    ffi = cffi.FFI()
    ffi.cdef("""
        typedef struct ZSTD_CCtx_s ZSTD_CCtx; typedef struct ZSTD_DCtx_s ZSTD_DCtx;
        typedef struct ZSTD_DDict_s ZSTD_DDict;
        ZSTD_CCtx *ZSTD_createCCtx(void); size_t ZSTD_freeCCtx(ZSTD_CCtx *);
        ZSTD_DCtx *ZSTD_createDCtx(void); size_t ZSTD_freeDCtx(ZSTD_DCtx *);
        size_t ZSTD_compress_usingDict(ZSTD_CCtx *, void *dst, size_t cap, const void *src, size_t n,
                                       const void *dict, size_t dictSize, int level);
        ZSTD_DDict *ZSTD_createDDict(const void *dict, size_t dictSize);
        ZSTD_DDict *ZSTD_createDDict_byReference(const void *dict, size_t dictSize);
        size_t ZSTD_freeDDict(ZSTD_DDict *);
        size_t ZSTD_decompress_usingDDict(ZSTD_DCtx *, void *dst, size_t cap, const void *src, size_t n,
                                          const ZSTD_DDict *);
    """)
    z = ffi.dlopen("libzstd.so.1")
    DICTIONARY = b"".join(b"entry %d of a shared dictionary; " % i for i in range(400))

    def roundtrip(create):
        cctx, dctx = z.ZSTD_createCCtx(), z.ZSTD_createDCtx()
        ddict = create(DICTIONARY, len(DICTIONARY))
        for i in range(5):
            msg = b"entry %d of a shared dictionary; and more" % (i * 31)
            comp = ffi.new("char[]", 1024)
            n = z.ZSTD_compress_usingDict(cctx, comp, 1024, msg, len(msg), DICTIONARY, len(DICTIONARY), 3)
            back = ffi.new("char[]", 1024)
            m = z.ZSTD_decompress_usingDDict(dctx, back, 1024, comp, n, ddict)
            assert ffi.buffer(back, m)[:] == msg
        z.ZSTD_freeDDict(ddict)
        z.ZSTD_freeCCtx(cctx)
        z.ZSTD_freeDCtx(dctx)

    def test_dictionary_by_reference():  # correct on CPython: DICTIONARY lives, bytes never change
        roundtrip(z.ZSTD_createDDict_byReference)

    def test_dictionary_copied():
        roundtrip(z.ZSTD_createDDict)
'''


def test_kept_read_under_quarantine_is_a_portability_finding(pytester: pytest.Pytester) -> None:
    """python-zstandard's by-reference dictionary, unchanged: the run goes on, the read is reported."""
    pytester.makepyfile(test_zdict=ZSTD_DICTIONARY_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--ptrbridge=2")
    out = result.stdout.str()
    result.assert_outcomes(passed=2)
    assert "SUMMARY: ptrbridge: kept-read (READ) in " in out
    assert re.search(r"bytes\(\d+\) lent to ZSTD_createDDict_byReference\(\) at .*test_zdict.py:\d+", out)
    assert "portability (does not fail: not strict)" in out
    # one kept read, in the test that lent by reference (the copying twin has none)
    assert out.count("SUMMARY: ptrbridge: kept-read") == 1
    by_reference = out[out.index("test_zdict.py::test_dictionary_by_reference (checked"):]
    assert "kept-read" in by_reference[:by_reference.index("test_zdict.py::test_dictionary_copied (checked")]


def test_marker_level_and_fixture(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_marker="""
        import ptrbridge, pytest

        @pytest.mark.ptrbridge(level=0)
        def test_level_zero():
            assert ptrbridge.check_level() == 0

        def test_default_level():
            assert ptrbridge.check_level() == 1

        def test_stats_fixture(ptrbridge_stats):
            h = ptrbridge.Handle(1)
            assert ptrbridge_stats.delta()["live_handles"] == 1
            h.delete()
            assert ptrbridge_stats.delta()["live_handles"] == 0
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--ptrbridge=1")
    result.assert_outcomes(passed=3)


def test_unknown_marker_leak_kind_is_an_error() -> None:
    before = ptrbridge.stats()
    with pytest.raises(ValueError, match="unknown leak kind"):
        leaks(before, before, allow=["memory"])


# --- a real C extension under the plugin -----------------------------------------

def test_c_extension_suite_fails_exactly_the_bad_tests(pytester: pytest.Pytester, pbext_path: Path) -> None:
    pytester.makeconftest(f"""
        import importlib.util
        import ptrbridge  # first: the extension links to pb_* by name
        import pytest

        @pytest.fixture(scope="session")
        def pbext():
            spec = importlib.util.spec_from_file_location("_pbext", {str(pbext_path)!r})
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
    """)
    pytester.makepyfile(test_ext="""
        def test_checksum(pbext):
            assert pbext.checksum(b"abc") == 294

        def test_scratch(pbext):
            pbext.scratch(64)   # the address is dropped: leaked

        def test_keep(pbext):
            pbext.keep(bytes(range(100)))   # a temporary: freed right after the call
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--ptrbridge=2", "--ptrbridge-watch=_pbext")
    out = result.stdout.str()
    result.assert_outcomes(passed=2, failed=1)  # C holding a freed pointer is a portability finding
    assert "test_ext.py::test_scratch" in out and "leaked 1 tracked C block(s) (64 bytes)" in out
    assert "test_ext.py::test_keep" in out
    assert "C kept a pointer to Python memory after the object was freed (R2)" in out
    assert "global 'kept_buffer'" in out
    strict = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--ptrbridge=2", "--ptrbridge-watch=_pbext",
                                           "--ptrbridge-strict")
    strict.assert_outcomes(passed=1, failed=2)


# --- python -m ptrbridge run -----------------------------------------------------

def _run(tmp_path: Path, program: str, *options: str) -> subprocess.CompletedProcess:
    script = tmp_path / "program.py"
    script.write_text(textwrap.dedent(program))
    report = tmp_path / "report.json"
    return subprocess.run(
        [sys.executable, "-m", "ptrbridge", "run", *options, "--report", str(report), "--",
         sys.executable, str(script)],
        # errors="replace": a buggy program may print the poison of the freed memory it read
        capture_output=True, text=True, errors="replace", timeout=120,
    )


def test_run_clean_program_exits_zero(tmp_path: Path) -> None:
    proc = _run(tmp_path, """
        import ptrbridge
        with ptrbridge.CBuffer(8):
            print("working")
    """)
    assert proc.returncode == 0, proc.stderr
    assert "working" in proc.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert ptrbridge.validate_report(report) == []
    assert report["exit_status"] == 0 and report["status"] == 0 and len(report["processes"]) == 1
    assert report["findings"] == [] and report["counts"]["total"] == 0
    stats = report["processes"][0]["stats"]
    assert stats["allocations"] == 1 and stats["frees"] == 1
    assert "findings: 0" in proc.stderr and "C memory (pid" in proc.stderr
    assert "checked 0 call(s)" in proc.stderr and "checked 0 calls to C" in proc.stderr


def test_run_reports_leaks_and_findings_as_json(tmp_path: Path) -> None:
    proc = _run(tmp_path, """
        import ptrbridge
        from ptrbridge._bindings import ffi
        keep = ptrbridge.CBuffer(32)
        data = bytearray(16)
        with ptrbridge.Pinner() as p:
            ffi.cast("char **", keep.ptr)[0] = p.pin(data)
    """, "--check", "2")
    assert proc.returncode == 1, proc.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert ptrbridge.validate_report(report) == []
    leak = next(f for f in report["findings"] if f["kind"] == "leak")
    assert "leaked 1 tracked C block(s) (32 bytes)" in leak["message"] and leak["severity"] == "error"
    assert leak["object_size"] == 32 and leak["fails"] and leak["pid"] == report["processes"][0]["pid"]
    assert leak["object"] == "CBuffer(32)" and leak["created_at"] == "program.py:4"
    assert leak["extra"]["resources"] == [{"kind": "cbuffer", "description": "CBuffer(32)",
                                           "created_at": "program.py:4", "count": 1}]
    retained = next(f for f in report["findings"] if f["kind"] == "retained-live")
    assert retained["object"] == "bytearray(16)" and retained["severity"] == "portability"
    assert retained["lent_at"] == "program.py:7" and retained["state"] == "unpinned"
    assert "findings: 2 (1 error(s), 1 portability" in proc.stderr


def test_run_passes_through_a_failing_exit_status(tmp_path: Path) -> None:
    proc = _run(tmp_path, """
        import sys
        sys.exit(7)
    """)
    assert proc.returncode == 7
    assert json.loads((tmp_path / "report.json").read_text())["exit_status"] == 7


def test_run_records_uncaught_pointer_errors(tmp_path: Path) -> None:
    proc = _run(tmp_path, """
        import ptrbridge
        ptrbridge.handle_value(12345)
    """)
    assert proc.returncode == 1
    report = json.loads((tmp_path / "report.json").read_text())
    (raised,) = report["findings"]
    assert raised["kind"] == "error-raised" and raised["severity"] == "error"
    assert raised["extra"]["exception"] == "ptrbridge.errors.InvalidHandleError"
    assert raised["lent_at"] == "program.py:3" and "(uncaught)" in raised["message"]


def test_run_without_command_is_an_error() -> None:
    proc = subprocess.run([sys.executable, "-m", "ptrbridge", "run"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "no command given" in proc.stderr


PORTABILITY_ONLY = """
    import ptrbridge
    from ptrbridge._bindings import ffi
    holder = ptrbridge.CBuffer(8)
    data = bytearray(16)
    with ptrbridge.Pinner() as p:
        ffi.cast("char **", holder.ptr)[0] = p.pin(data)
    holder.free()
"""


def test_run_exit_status_portability_fails_only_when_strict(tmp_path: Path) -> None:
    proc = _run(tmp_path, PORTABILITY_ONLY)
    assert proc.returncode == 0, proc.stderr
    assert "findings: 1 (0 error(s), 1 portability; not strict" in proc.stderr
    assert "portability (does not fail: not strict)" in proc.stderr
    proc = _run(tmp_path, PORTABILITY_ONLY, "--strict")
    assert proc.returncode == 1, proc.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["settings"]["strict"] is True and report["counts"]["failing"] == 1


def test_run_watching_a_library_never_loaded_is_exit_status_2(tmp_path: Path) -> None:
    proc = _run(tmp_path, "import ptrbridge\n", "--watch-library", "no_such_lib")
    assert proc.returncode == 2, proc.stderr
    assert "--watch-library 'no_such_lib': matched no loaded library in any process" in proc.stderr
    proc = _run(tmp_path, "import ctypes\nctypes.CDLL('libz.so.1')\n", "--watch-library", "libz")
    assert proc.returncode == 0, proc.stderr


def test_run_leaves_a_program_without_c_unchanged(tmp_path: Path) -> None:
    proc = _run(tmp_path, """
        import sys
        print(sorted(m for m in ("ptrbridge", "cffi", "_cffi_backend", "ctypes") if m in sys.modules))
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    report = json.loads((tmp_path / "report.json").read_text())
    assert ptrbridge.validate_report(report) == []
    assert report["processes"][0]["activated"] is False
    assert any("ptrbridge was never loaded" in note for note in report["notes"])


def test_run_with_an_interpreter_that_cannot_import_ptrbridge_says_so(tmp_path: Path) -> None:
    # A `python` on PATH other than the one ptrbridge is installed in: its program imports ctypes,
    # ptrbridge cannot start there, and the run must not look like a clean one.
    other = tmp_path / "other"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(other)], check=True, timeout=120)
    python = str(other / "bin" / "python")
    script = tmp_path / "program.py"
    script.write_text("import ctypes\nprint(ctypes.CDLL(None).abs(-3))\n")
    report_path = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "ptrbridge", "run", "--report", str(report_path), "--",
                           python, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "3"  # the program ran as it does plainly
    assert proc.returncode == 2, proc.stderr
    assert "cannot import it (ModuleNotFoundError: No module named 'ptrbridge')" in proc.stderr
    report = json.loads(report_path.read_text())
    assert ptrbridge.validate_report(report) == []
    process = report["processes"][0]
    assert process["activated"] is False and process["executable"] == python
    assert process["unavailable"] == "ModuleNotFoundError: No module named 'ptrbridge'"
    assert [n for n in report["notes"] if "cannot import ptrbridge" in n] == [
        f"process(es) {process['pid']} imported cffi, ctypes or ptrbridge but {python} cannot import "
        f"ptrbridge, so nothing in them was checked: install ptrbridge into that interpreter, or run the "
        f"command with {sys.executable}"]
    assert not any("never loaded" in n for n in report["notes"])


def test_run_settings_reach_the_program(tmp_path: Path) -> None:
    program = """
        import ptrbridge
        print(ptrbridge.check_level(), ptrbridge.quarantine_enabled())
    """
    proc = _run(tmp_path, program)
    assert proc.stdout.split() == ["2", "True"], proc.stderr
    proc = _run(tmp_path, program, "--no-quarantine", "--check", "1")
    assert proc.stdout.split() == ["1", "False"], proc.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["settings"] == {"check_level": 1, "strict": False, "quarantine": False, "instrument": True,
                                  "watch": []}


def test_run_chains_to_the_programs_own_sitecustomize(tmp_path: Path) -> None:
    own = tmp_path / "own"
    own.mkdir()
    (own / "sitecustomize.py").write_text("import os\nos.environ['OWN_SITECUSTOMIZE'] = 'ran'\n")
    script = tmp_path / "program.py"
    script.write_text("import os, sitecustomize\nprint(os.environ.get('OWN_SITECUSTOMIZE'), sitecustomize.__file__)\n")
    env = dict(os.environ, PYTHONPATH=str(own))
    proc = subprocess.run([sys.executable, "-m", "ptrbridge", "run", "--", sys.executable, str(script)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    ran, path = proc.stdout.split()
    assert ran == "ran" and path == str(own / "sitecustomize.py")


def _fake_plugin_distribution(where: Path) -> None:
    """A dist-info as a regular (non-editable) install of a pytest plugin that ships ptrbridge: pytest
    then marks the package ``ptrbridge`` for assertion rewriting, as it does for the installed wheel."""
    info = where / "fakeplug-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fakeplug\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[pytest11]\nfakeplug = fakeplug_mod\n")
    (info / "RECORD").write_text("ptrbridge/__init__.py,,\nfakeplug_mod.py,,\nfakeplug-1.0.dist-info/RECORD,,\n")
    (where / "fakeplug_mod.py").write_text("")


def test_run_pytest_with_filterwarnings_error_and_a_failing_pointer_error(tmp_path: Path) -> None:
    site = tmp_path / "site"
    _fake_plugin_distribution(site)
    project = tmp_path / "project"
    project.mkdir()
    (project / "pytest.ini").write_text("[pytest]\nfilterwarnings = error\n")
    (project / "test_app.py").write_text(textwrap.dedent("""
        import cffi, ptrbridge

        ffi = cffi.FFI()
        ffi.cdef("struct iovec { void *iov_base; size_t iov_len; }; ssize_t writev(int, const struct iovec *, int);")
        libc = ptrbridge.wrap(ffi.dlopen(None), ffi=ffi)

        def test_fine():
            assert 1 + 1 == 2

        def test_nested():
            data = bytearray(b"hi")
            iov = ffi.new("struct iovec *")
            iov.iov_base = ffi.from_buffer(data)
            iov.iov_len = 2
            libc.writev(1, iov, 1)
    """))
    report = tmp_path / "report.json"
    env = dict(os.environ, PYTHONPATH=str(site))
    env.pop("PTRBRIDGE_CHECK", None)
    proc = subprocess.run(
        [sys.executable, "-m", "ptrbridge", "run", "--report", str(report), "--",
         sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        capture_output=True, text=True, timeout=300, env=env, cwd=project,
    )
    output = proc.stdout + proc.stderr
    assert "PytestAssertRewriteWarning" not in output
    assert "1 failed, 1 passed" in proc.stdout, output
    assert proc.returncode == 1
    data = json.loads(report.read_text())
    assert ptrbridge.validate_report(data) == []
    (raised,) = data["findings"]
    assert raised["kind"] == "error-raised" and raised["test"] == "test_app.py::test_nested"
    assert raised["rule"] == "R1" and raised["pid"] == data["processes"][0]["pid"]
    assert "findings: 1 (1 error(s)" in proc.stderr
    assert sorted(t["nodeid"] for t in data["tests"]) == ["test_app.py::test_fine", "test_app.py::test_nested"]


DANGLING_PROGRAM = """
    import cffi
    ffi = cffi.FFI()
    ffi.cdef("struct iovec { void *iov_base; size_t iov_len; }; ssize_t writev(int, const struct iovec *, int);")
    lib = ffi.dlopen("libc.so.6")
    iov = ffi.new("struct iovec *")
    data = bytearray(b"hello\\n")
    iov.iov_base = ffi.from_buffer(data)
    iov.iov_len = 6
    lib.writev(1, iov, 1)
    del data                   # the struct field is all that points to the buffer now
    lib.writev(1, iov, 1)
"""


def test_run_instruments_an_unchanged_program(tmp_path: Path) -> None:
    proc = _run(tmp_path, DANGLING_PROGRAM)
    assert proc.returncode == 1, proc.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert ptrbridge.validate_report(report) == []
    assert report["checked"]["calls"] == 2 and report["settings"]["instrument"] is True
    (found,) = report["findings"]
    assert found["kind"] == "dangling-argument" and found["severity"] == "error"
    assert found["function"] == "writev" and found["lent_at"] == "program.py:12"
    # the report names the object and the call that handed it to C, not a bare heap block
    assert "bytearray(6) (lent to writev() at program.py:10" in found["message"], found["message"]
    assert "checked 2 call(s)" in proc.stderr

    proc = _run(tmp_path, DANGLING_PROGRAM, "--no-instrument")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["checked"]["calls"] == 0 and report["findings"] == []
    assert any("checked 0 calls to C" in note for note in report["notes"])


@pytest.mark.parametrize("first_import", ["import ctypes", "import ctypes.util", "import ptrbridge, ctypes"])
def test_run_instruments_a_program_whose_first_import_is_ctypes(tmp_path: Path, first_import: str) -> None:
    # Starting ptrbridge at the program's first `import ctypes` imports ctypes itself: the program
    # must get that module, not a second copy of it whose CDLL was never instrumented.
    proc = _run(tmp_path, f"""
        {first_import}
        import ctypes, sys
        assert sys.modules["ctypes"] is ctypes and ctypes.__spec__.name == "ctypes"
        assert ctypes.__spec__.origin.endswith("__init__.py"), ctypes.__spec__
        libc = ctypes.CDLL("libc.so.6")
        libc.strlen.argtypes = [ctypes.c_char_p]
        print(libc.strlen(b"hello"))
    """, "--check", "2")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["5"]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["checked"]["calls"] == 1, proc.stderr


def test_run_says_which_processes_wrote_no_report_without_calling_them_dead(tmp_path: Path) -> None:
    # A forked worker that ends with os._exit (as multiprocessing's fork workers do) writes no report;
    # it found nothing, so the summary counts it without a "died" line, and the run passes.
    proc = _run(tmp_path, """
        import ctypes, os
        libc = ctypes.CDLL("libc.so.6")
        pid = os.fork()
        if pid == 0:
            libc.strlen(b"child")
            os._exit(0)
        os.waitpid(pid, 0)
        print(libc.strlen(b"parent"))
    """)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"1 process\(es\) \(\d+\) started ptrbridge and wrote no report \(they died, or ended "
                     r"with os\._exit\)", proc.stderr), proc.stderr
    assert "died before writing its report" not in proc.stderr


@pytest.mark.parametrize("buffer", ["bytes(bytearray(b'kept by C, read later'))",
                                    "ctypes.create_string_buffer(b'kept by C, read later')"],
                         ids=["bytes", "create_string_buffer"])
def test_run_quarantines_the_buffers_of_instrumented_ctypes_calls(tmp_path: Path, buffer: str) -> None:
    # A ctypes-only program, unchanged: C keeps a temporary's pointer and reads it at a later call.
    so = build_shared("keeper.c", tmp_path)
    proc = _run(tmp_path, f"""
        import ctypes
        k = ctypes.CDLL({str(so)!r})
        k.keep_global.argtypes = [ctypes.c_char_p]
        k.keep_global({buffer})   # BUG: the temporary dies when the call returns
        print("read", k.keeper_read(), flush=True)
    """)
    assert proc.returncode == 128 + signal.SIGSEGV, proc.stderr
    assert "read" not in proc.stdout
    assert "caught by quarantine" in proc.stderr
    assert re.search(r"SUMMARY: ptrbridge: use-after-release \(READ\) in keeper_read .* lent to keep_global\(\) "
                     r"at .*program\.py:5", proc.stderr), proc.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    (found,) = [f for f in report["findings"] if f["kind"] == "use-after-release"]
    assert found["severity"] == "error" and found["function"] == "keep_global"


@pytest.mark.parametrize("level", ["1", "2"])
def test_run_counts_calls_with_nothing_to_walk(tmp_path: Path, level: str) -> None:
    # strlen(bytes) at level 1 needs no walk; call_each takes only a function pointer and an
    # int: both are calls the run checked, and the summary must not say it checked none.
    so = build_shared("checked.c", tmp_path)
    proc = _run(tmp_path, f"""
        import cffi
        ffi = cffi.FFI()
        ffi.cdef("size_t strlen(const char *); int call_each(int (*fn)(int), int n);")
        libc, c = ffi.dlopen(None), ffi.dlopen({str(so)!r})
        print(libc.strlen(b"hello"), libc.strlen(b"hi"))
        @ffi.callback("int(int)")
        def double(i):
            return 2 * i
        print(c.call_each(double, 3))
    """, "--check", level)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[:2] == ["5", "2"]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["checked"]["calls"] == 3, proc.stderr
    assert "checked 0 calls to C" not in proc.stderr


ZLIB_STALE_NEXT_IN = """
import ctypes, random
z = ctypes.CDLL("libz.so.1")
P = ctypes.POINTER(ctypes.c_ubyte)
class ZStream(ctypes.Structure):
    _fields_ = [("next_in", P), ("avail_in", ctypes.c_uint), ("total_in", ctypes.c_ulong),
                ("next_out", P), ("avail_out", ctypes.c_uint), ("total_out", ctypes.c_ulong),
                ("msg", ctypes.c_char_p), ("state", ctypes.c_void_p), ("zalloc", ctypes.c_void_p),
                ("zfree", ctypes.c_void_p), ("opaque", ctypes.c_void_p), ("data_type", ctypes.c_int),
                ("adler", ctypes.c_ulong), ("reserved", ctypes.c_ulong)]
z.zlibVersion.restype = ctypes.c_char_p
z.deflateInit_.argtypes = [ctypes.POINTER(ZStream), ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
z.deflate.argtypes = [ctypes.POINTER(ZStream), ctypes.c_int]
strm = ZStream()
assert z.deflateInit_(strm, 6, z.zlibVersion(), ctypes.sizeof(ZStream)) == 0
out = ctypes.create_string_buffer(400000)
data = bytes(random.Random(1).getrandbits(8) for _ in range(200000))
strm.next_in, strm.avail_in = ctypes.cast(data, P), 10
strm.next_out, strm.avail_out = ctypes.cast(out, P), len(out)
z.deflate(strm, 0)                    # the first 10 bytes
strm.avail_in = len(data) - 10        # and the rest at the next call
del data                              # BUG: freed while zlib has input left to read
z.deflate(strm, 4)                    # reads the rest through next_in: freed, held, PROT_NONE
print("survived")
"""


def test_run_keeps_the_errors_of_a_process_that_dies_of_the_bug(tmp_path: Path) -> None:
    # The check reports the dangling next_in at the call; then zlib reads it and the process
    # dies (SIGSEGV on the heap map's held pages) before it can write its report.
    proc = _run(tmp_path, ZLIB_STALE_NEXT_IN, "--no-quarantine")
    assert proc.returncode == 128 + signal.SIGSEGV, proc.stderr
    assert "survived" not in proc.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert ptrbridge.validate_report(report) == []
    (found,) = report["findings"]
    assert found["kind"] == "dangling-argument" and found["severity"] == "error"
    assert found["function"] == "deflate"
    assert ".next_in -> bytes(200000) (lent to deflate() at program.py:20" in found["message"], found["message"]
    assert "in call to deflate() at program.py:23" in found["message"]
    assert re.search(r"process \d+ \(.*program\.py\) started ptrbridge and died before writing its report: "
                     r"the 1 error\(s\) it recorded before are listed above", proc.stderr), proc.stderr
    assert "no Python process of the command started ptrbridge" not in proc.stderr


QUARANTINE_SUITE = """
import cffi, os
kffi = cffi.FFI()
kffi.cdef("void keep_global(const char *p); int keeper_read(void);")
k = kffi.dlopen(os.environ["KEEPER_SO"])   # unchanged: instrumented by the plugin


def test_keeps_then_reads():
    k.keep_global(bytes(bytearray(b"lent for one call")))   # C keeps the pointer (the bytes dies)...
    assert k.keeper_read() > 0            # ...and reads it after the call returned
"""


@pytest.mark.parametrize("capture", ["fd", "no"])
def test_quarantine_report_of_a_dying_test_reaches_the_terminal(tmp_path: Path, capture: str) -> None:
    """The process dies of the signal inside a test, while pytest captures fd 2: the report must
    not be lost with the capture file, nor printed twice when nothing is captured."""
    so = build_shared("keeper.c", tmp_path)
    (tmp_path / "test_q.py").write_text(QUARANTINE_SUITE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PTRBRIDGE_")}
    env["KEEPER_SO"] = str(so)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--ptrbridge=2",
                           f"--capture={capture}", "test_q.py"], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=120)
    assert proc.returncode == -11, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    assert out.count("SUMMARY: ptrbridge: use-after-release (READ) in ") == 1, out
    line = QUARANTINE_SUITE.splitlines().index('    k.keep_global(bytes(bytearray(b"lent for one call")))   # C keeps the pointer (the bytes dies)...') + 1
    assert f"on bytes(17) lent to keep_global() at {tmp_path / 'test_q.py'}:{line}\n" in out, out


def test_plugin_counts_instrumented_calls_per_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_calls="""
        import cffi
        ffi = cffi.FFI()
        ffi.cdef("size_t strlen(const char *);")
        lib = ffi.dlopen("libc.so.6")

        def test_three_calls():
            assert [lib.strlen(b"a"), lib.strlen(b"ab"), lib.strlen(b"abc")] == [1, 2, 3]

        def test_no_call():
            pass
    """)
    report = pytester.path / "r.json"
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--ptrbridge=2", f"--ptrbridge-report={report}")
    result.assert_outcomes(passed=2)
    data = json.loads(report.read_text())
    tests = {t["nodeid"].split("::")[1]: t["checked"]["calls"] for t in data["tests"]}
    assert tests == {"test_three_calls": 3, "test_no_call": 0}
    assert data["checked"]["calls"] == 3
    # at level 2 each bytes argument is lent to its call (and scanned for afterwards)
    assert "checked 3 call(s), 0 callback(s), 3 lend(s) in 2 test(s)" in result.stdout.str()


def test_version_and_demo_help() -> None:
    proc = subprocess.run([sys.executable, "-m", "ptrbridge", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == f"ptrbridge {ptrbridge.__version__}"
    proc = subprocess.run([sys.executable, "-m", "ptrbridge", "demo", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "A guided tour of ptrbridge" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "ptrbridge", "run", "--help"], capture_output=True, text=True)
    assert 'set_on_violation("collect")' in proc.stdout and "--no-instrument" in proc.stdout


# --- assert_no_growth -------------------------------------------------------------

def test_assert_no_growth_catches_a_c_leak(pbext_path: Path) -> None:
    pbext = _load_pbext(pbext_path)
    leaked: list = []
    try:
        with pytest.raises(GrowthError, match=r"tracked C memory grew by 6400 bytes \(100 blocks\) over 100 "
                                              r"calls of .*: 64\.0 bytes per call"):
            assert_no_growth(lambda: leaked.append(pbext.scratch(64)), n=100, max_bytes=1024, warmup=1)
    finally:  # the leak was on purpose: give the memory back so the suite's accounting stays exact
        for address in leaked:
            ptrbridge.free(address)
    assert len(leaked) == 101


def test_assert_no_growth_passes_clean_code(pbext_path: Path) -> None:
    pbext = _load_pbext(pbext_path)
    growth = assert_no_growth(lambda: pbext.checksum(b"abcdef"), n=20_000, max_bytes=1 << 20)
    assert growth.calls == 20_000 and growth.tracked_bytes == 0


@pytest.mark.parametrize("kwargs", [{"n": 0}, {"n": True}, {"max_bytes": -1}])
def test_assert_no_growth_rejects_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        assert_no_growth(lambda: None, **kwargs)


# --- the verdict: errors fail, portability findings only when strict ---------------

MIXED_TESTS = """
    import cffi, ptrbridge, pytest
    from ptrbridge import findings
    from ptrbridge.findings import Finding
    from ptrbridge._bindings import ffi as pbffi

    ffi = cffi.FFI()
    ffi.cdef("struct iovec { void *iov_base; size_t iov_len; }; ssize_t writev(int, const struct iovec *, int);")
    libc = ptrbridge.wrap(ffi.dlopen(None), ffi=ffi)

    def test_clean():
        findings.count("calls", 3)       # what a checked call counts
        findings.count("lends", 2)
        with ptrbridge.CBuffer(16):
            pass

    def test_leak_is_an_error():
        test_leak_is_an_error.keep = ptrbridge.Handle(object())

    def test_nested_pointer_error_fails_and_counts():
        data = bytearray(b"hi")
        iov = ffi.new("struct iovec *")
        iov.iov_base = ffi.from_buffer(data)
        iov.iov_len = 2
        libc.writev(1, iov, 1)   # explicit wrap: NestedPointerError

    def test_retention_is_portability():
        data = bytearray(32)
        holder = ptrbridge.CBuffer(8)
        with ptrbridge.Pinner() as p:
            pbffi.cast("char **", holder.ptr)[0] = p.pin(data)
        holder.free()

    def test_recorded_portability():
        findings.count("calls")
        findings.record(Finding(kind="nested-unpinned", severity="portability", rule="R1",
                                message="ptrbridge: nested pointer to unpinned bytes(8)", object="bytes(8)",
                                object_size=8, function="f", lent_at="x.py:1"))
"""


def _mixed(pytester: pytest.Pytester, *options: str) -> tuple:
    pytester.makepyfile(test_mixed=MIXED_TESTS)
    report = pytester.path / "report.json"
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--ptrbridge=2",
                                           f"--ptrbridge-report={report}", *options)
    return result, json.loads(report.read_text())


def test_mixed_suite_errors_fail_portability_does_not(pytester: pytest.Pytester) -> None:
    result, report = _mixed(pytester)
    result.assert_outcomes(passed=3, failed=2)
    out = result.stdout.str()
    assert "FAILED test_mixed.py::test_leak_is_an_error" in out
    assert "FAILED test_mixed.py::test_nested_pointer_error_fails_and_counts" in out
    assert "ptrbridge findings: 2 error(s), 2 portability finding(s) (not strict" in out
    assert "no pointer problems found" not in out
    assert ptrbridge.validate_report(report) == []
    assert report["counts"] == {"error": 2, "portability": 2, "failing": 2, "total": 4}
    kinds = sorted((f["kind"], f["severity"], f["test"].split("::")[1]) for f in report["findings"])
    assert kinds == [
        ("error-raised", "error", "test_nested_pointer_error_fails_and_counts"),
        ("leak", "error", "test_leak_is_an_error"),
        ("nested-unpinned", "portability", "test_recorded_portability"),
        ("retained-live", "portability", "test_retention_is_portability"),
    ]
    raised = next(f for f in report["findings"] if f["kind"] == "error-raised")
    assert raised["rule"] == "R1" and raised["extra"]["exception"] == "ptrbridge.errors.NestedPointerError"
    assert raised["lent_at"] == "test_mixed.py:24" and "bytearray(2)" in raised["message"]
    retained = next(f for f in report["findings"] if f["kind"] == "retained-live")
    assert retained["object"] == "bytearray(32)" and retained["object_size"] == 32
    assert retained["function"] == "Pinner.pin" and retained["state"] == "unpinned"
    assert retained["holder"].startswith("C heap block") and not retained["fails"]
    tests = {t["nodeid"].split("::")[1]: t for t in report["tests"]}
    assert tests["test_clean"]["checked"]["calls"] == 3 and tests["test_clean"]["checked"]["lends"] == 2
    assert tests["test_clean"]["findings"] == 0 and tests["test_clean"]["outcome"] == "passed"
    assert tests["test_recorded_portability"]["checked"]["calls"] == 1
    assert tests["test_leak_is_an_error"]["outcome"] == "failed" and tests["test_leak_is_an_error"]["failing"] == 1
    assert report["checked"]["calls"] >= 4  # the suite's own count; wrapped calls add to it
    assert report["settings"]["check_level"] == 2 and report["settings"]["strict"] is False
    # the schema check can fail: a malformed report is rejected with the reasons
    broken = json.loads(json.dumps(report))
    broken["findings"][0]["severity"] = "fatal"
    del broken["findings"][1]["holder"]
    broken["checked"]["calls"] = -1
    problems = ptrbridge.validate_report(broken)
    assert any("fatal" in p for p in problems)
    assert any("missing 'holder'" in p for p in problems)
    assert any("$.checked.calls" in p for p in problems)


def test_mixed_suite_in_strict_mode(pytester: pytest.Pytester) -> None:
    result, report = _mixed(pytester, "--ptrbridge-strict")
    result.assert_outcomes(passed=1, failed=4)
    assert "strict: portability findings fail" in result.stdout.str()
    assert report["counts"]["failing"] == 4 and report["settings"]["strict"] is True
    assert all(f["fails"] for f in report["findings"])


def test_strict_from_the_environment(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PTRBRIDGE_STRICT", "1")
    result, report = _mixed(pytester)
    result.assert_outcomes(passed=1, failed=4)


def test_summary_says_when_nothing_was_checked(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_nothing="""
        def test_a():
            assert True
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--ptrbridge=1")
    result.assert_outcomes(passed=1)
    out = result.stdout.str()
    assert "ptrbridge: no pointer problems found; checked 0 call(s), 0 callback(s), 0 lend(s) in 1 test(s)" in out
    assert "checked 0 calls to C" in out


def test_watching_a_library_that_never_loads_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_w="""
        def test_a():
            pass
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--ptrbridge=2",
                                           "--ptrbridge-watch=no_such_lib")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "--ptrbridge-watch 'no_such_lib': matched no loaded library during the whole session" in result.stdout.str()
    ok = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--ptrbridge=2", "--ptrbridge-watch=libc.so")
    assert ok.ret == 0, ok.stdout.str()


@pytest.mark.parametrize("options,expected", [
    (["--ptrbridge=2"], True),
    (["--ptrbridge=2", "--ptrbridge-no-quarantine"], False),
    (["--ptrbridge=1"], False),
])
def test_quarantine_is_on_by_default_at_level_2(pytester: pytest.Pytester, options: list, expected: bool) -> None:
    pytester.makepyfile(test_q=f"""
        import ptrbridge

        def test_quarantine():
            assert ptrbridge.quarantine_enabled() is {expected}
    """)
    pytester.runpytest_subprocess("-p", "no:cacheprovider", *options).assert_outcomes(passed=1)


def test_error_in_fixture_teardown_is_attributed(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_fx="""
        import pytest
        from ptrbridge import findings
        from ptrbridge.findings import Finding

        @pytest.fixture
        def recorder():
            yield
            findings.record(Finding(kind="use-after-release", severity="error", rule="use-after-free",
                                    message="ptrbridge: C wrote to bytes(4) after the call returned"))

        def test_a(recorder):
            pass
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--ptrbridge=1")
    result.assert_outcomes(passed=1, errors=1)
    assert "C wrote to bytes(4) after the call returned" in result.stdout.str()
