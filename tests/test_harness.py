"""ptrbridge as a test harness: the pytest plugin, ``python -m ptrbridge run`` and ptrbridge.testing."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import ptrbridge
from ptrbridge.testing import GrowthError, assert_no_growth, leaks

from cbuild import build_extension


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
    assert "leaked 1 handle(s)" in out
    assert "leaked 1 pin(s)" in out
    assert "1 buffer(s) transferred to C were never freed by C" in out
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


def test_retention_found_at_teardown_fails_the_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_retained="""
        import ptrbridge
        from ptrbridge._bindings import ffi

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
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--ptrbridge=2")
    out = result.stdout.str()
    result.assert_outcomes(passed=1, failed=1)
    assert "C kept a pointer to Python memory after it was unpinned (R2): bytearray(64)" in out
    assert "test_retained.py" in out


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
    result.assert_outcomes(passed=1, failed=2)
    assert "test_ext.py::test_scratch" in out and "leaked 1 tracked C block(s) (64 bytes)" in out
    assert "test_ext.py::test_keep" in out
    assert "C kept a pointer to Python memory after the object was freed (R2)" in out
    assert "global 'kept_buffer'" in out


# --- python -m ptrbridge run -----------------------------------------------------

def _run(tmp_path: Path, program: str, *options: str) -> subprocess.CompletedProcess:
    script = tmp_path / "program.py"
    script.write_text(textwrap.dedent(program))
    report = tmp_path / "report.json"
    return subprocess.run(
        [sys.executable, "-m", "ptrbridge", "run", *options, "--report", str(report), "--",
         sys.executable, str(script)],
        capture_output=True, text=True, timeout=120,
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
    assert report["exit_status"] == 0 and report["processes"] == 1
    assert report["findings"] == [] and report["leaks"] == []
    assert report["stats"][0]["allocations"] == 1 and report["stats"][0]["frees"] == 1
    assert "findings: 0" in proc.stderr and "C memory (pid" in proc.stderr


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
    assert any("leaked 1 tracked C block(s) (32 bytes)" in leak for leak in report["leaks"])
    assert any("after it was unpinned (R2): bytearray(16)" in f for f in report["findings"])
    assert "findings: 1" in proc.stderr


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
    assert any("uncaught InvalidHandleError" in f for f in report["findings"])


def test_run_without_command_is_an_error() -> None:
    proc = subprocess.run([sys.executable, "-m", "ptrbridge", "run"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "no command given" in proc.stderr


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
