"""The findings record: structure, strictness, counters."""
from __future__ import annotations

import json
import threading

import pytest

from ptrbridge import findings
from ptrbridge.findings import Finding


@pytest.fixture(autouse=True)
def clean() -> object:
    findings.take()
    old = findings.set_strict(None)
    yield
    findings.take()
    findings.set_strict(old)


def _f(severity: str = "error", kind: str = "leak") -> Finding:
    return Finding(kind=kind, severity=severity, rule="leak", message="ptrbridge: leaked 1 handle(s)",
                   object="Handle", created_at="app.py:3")


def test_record_take_peek() -> None:
    a, b = _f(), _f("portability", "nested-unpinned")
    findings.record(a)
    findings.record(b)
    assert findings.peek() == [a, b]
    assert findings.take() == [a, b]
    assert findings.take() == []


def test_json_has_every_field() -> None:
    data = json.loads(json.dumps(_f().to_json()))
    assert data["kind"] == "leak" and data["severity"] == "error" and data["created_at"] == "app.py:3"
    assert set(data) >= {"kind", "severity", "rule", "message", "object", "object_size", "created_at",
                         "function", "lent_at", "holder", "state", "test", "extra"}


def test_bad_severity() -> None:
    with pytest.raises(ValueError, match="severity must be one of"):
        _f("fatal")


def test_strict_from_environment_and_override(monkeypatch: pytest.MonkeyPatch) -> None:
    error, port = _f(), _f("portability")
    monkeypatch.delenv(findings.STRICT_ENV, raising=False)
    assert not findings.strict() and findings.fails(error) and not findings.fails(port)
    monkeypatch.setenv(findings.STRICT_ENV, "1")
    assert findings.strict() and findings.fails(port)
    findings.set_strict(False)
    assert not findings.strict()
    with pytest.raises(TypeError, match="expected True, False or None"):
        findings.set_strict("yes")  # type: ignore[arg-type]


def test_record_from_threads() -> None:
    def work() -> None:
        for _ in range(500):
            findings.record(_f())

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(findings.take()) == 2000


def test_counters() -> None:
    findings.reset_counters()
    findings.count("calls")
    findings.count("calls", 2)
    findings.count("lends")
    assert findings.counters()["calls"] == 3 and findings.counters()["lends"] == 1
    assert findings.reset_counters()["calls"] == 3
    assert findings.counters()["calls"] == 0


def test_every_kind_the_finding_docs_name_is_one_the_report_schema_accepts() -> None:
    import re

    from ptrbridge.report import FINDING_SCHEMA

    documented = set(re.findall(r'``"([a-z-]+)"``', Finding.__doc__ or ""))
    assert {"use-after-free", "collected-handle", "collected-callback"} <= documented
    assert documented == set(FINDING_SCHEMA["properties"]["kind"]["enum"])
