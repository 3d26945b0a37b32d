"""The Kafka producer example (examples/kafka) against librdkafka's in-process mock cluster.

Each strategy must deliver every message, in order, to the right partition,
with the payload bytes intact (read back with a consumer), and give back every
CBuffer, Handle, pin and batch record on the success and on the error paths.
Skipped only when librdkafka's development files are not installed.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Iterator, List

import pytest

import ptrbridge

KAFKA_DIR = Path(__file__).resolve().parent.parent / "examples" / "kafka"
sys.path.insert(0, str(KAFKA_DIR))

import pbkafka_build  # noqa: E402

if pbkafka_build.rdkafka_header() is None:
    pytest.skip("librdkafka is not installed (apt-get install librdkafka-dev)", allow_module_level=True)

import pbkafka  # noqa: E402

STRATEGIES = pbkafka.STRATEGIES


@pytest.fixture(scope="session")
def kafka_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The compiled example, built once per session (or where $PBKAFKA_CACHE says)."""
    env = os.environ.get("PBKAFKA_CACHE")
    cache = Path(env) if env else tmp_path_factory.mktemp("pbkafka")
    pbkafka.load(cache)
    return cache


def producer(strategy: str, cache: Path, **kwargs: Any) -> pbkafka.Producer:
    return pbkafka.Producer(strategy=strategy, cache_dir=cache, **kwargs)


def messages(n: int, tag: int = 0) -> List[bytes]:
    """Distinct payloads of varying sizes (each its own bytes object)."""
    return [b"%d:%06d:" % (tag, i) + bytes([65 + i % 26]) * (i % 333) for i in range(n)]


def counters() -> Any:
    ptrbridge.collect()
    s = ptrbridge.stats()
    return (s.live_blocks, s.live_bytes, s.transferred, s.live_handles, s.live_pins)


@pytest.fixture
def baseline() -> Iterator[Any]:
    before = counters()
    yield before
    assert counters() == before


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_delivers_every_message_in_order_to_its_partition(strategy: str, kafka_cache: Path, baseline: Any) -> None:
    sent = messages(2500)
    with producer(strategy, kafka_cache) as p:
        batches = [p.produce_batch(sent[i:i + 600], partition=2) for i in range(0, 2400, 600)]
        singles = [p.produce(m, partition=2) for m in sent[2400:]]
        assert counters() != baseline  # the payloads are held while in flight
        p.flush()
        offsets = [o for b in batches + singles for o in b.offsets]
        partitions = {q for b in batches + singles for q in b.partitions}
        assert offsets == list(range(2500))
        assert partitions == {2}
        assert all(b.done and b.failed == 0 and b.errors == [None] * b.n for b in batches + singles)
        assert batches[1].result() == [(2, o) for o in range(600, 1200)]
        assert all(lat >= 0 for b in batches for lat in b.latencies_us)
        received = pbkafka.consume(p.bootstrap_servers, p.topic, 2, 2500, cache_dir=kafka_cache)
    assert received == list(enumerate(sent))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_partitions_are_kept_apart(strategy: str, kafka_cache: Path, baseline: Any) -> None:
    with producer(strategy, kafka_cache, partitions=3) as p:
        got = {q: p.produce_batch(messages(50, q), partition=q) for q in range(3)}
        p.flush()
        for q, batch in got.items():
            assert batch.result() == [(q, o) for o in range(50)]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_broker_down_times_out_and_frees_everything(strategy: str, kafka_cache: Path, baseline: Any) -> None:
    with producer(strategy, kafka_cache, config={"message.timeout.ms": 200}) as p:
        p.set_broker_down(1)
        batch = p.produce_batch(messages(300))
        single = p.produce(b"lonely")
        p.flush(timeout=20)
        for b in (batch, single):
            assert b.done and b.failed == b.n
            assert set(b.error_codes) == {p._lib.RD_KAFKA_RESP_ERR__MSG_TIMED_OUT}
        err = batch.errors[0]
        assert err is not None and err.name == "_MSG_TIMED_OUT" and err.text == "Local: Message timed out"
        with pytest.raises(pbkafka.DeliveryError, match=r"300 of 300 messages not delivered: Local: Message timed out"):
            batch.result()
        assert batch.offsets == [-1] * 300
        p.set_broker_down(1, down=False)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_unknown_partition_fails_and_frees_everything(strategy: str, kafka_cache: Path, baseline: Any) -> None:
    with producer(strategy, kafka_cache, partitions=2) as p:
        early = p.produce_batch(messages(40), partition=7)  # metadata may not be known yet
        p.produce(b"x", partition=0)
        p.flush()
        late = p.produce_batch(messages(40), partition=7)  # known now: refused by rd_kafka_produce
        late_single = p.produce(b"y", partition=9)
        p.flush()
        for b in (early, late, late_single):
            assert b.failed == b.n
            assert set(b.error_codes) == {p._lib.RD_KAFKA_RESP_ERR__UNKNOWN_PARTITION}
        with pytest.raises(pbkafka.DeliveryError, match="Local: Unknown partition"):
            late.result()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_queue_full_is_retried(strategy: str, kafka_cache: Path, baseline: Any) -> None:
    sent = messages(3000)
    with producer(strategy, kafka_cache, config={"queue.buffering.max.messages": 200}) as p:
        batch = p.produce_batch(sent)
        p.flush()
        assert batch.result() == [(0, o) for o in range(3000)]
        assert pbkafka.consume(p.bootstrap_servers, p.topic, 0, 3000, cache_dir=kafka_cache) == list(enumerate(sent))


def test_bounded_handle_table_gives_back_pressure(kafka_cache: Path, baseline: Any) -> None:
    with producer("handle", kafka_cache, max_inflight=3) as p:
        assert p._handles is not None
        seen = []
        batches = []
        for i in range(40):
            batches.append(p.produce_batch(messages(20, i)))
            seen.append(len(p._handles))
        p.flush()
        assert max(seen) <= 3
        assert [o for b in batches for o in b.offsets] == list(range(800))


@pytest.mark.parametrize("strategy", ["copy", "pin"])
def test_max_inflight_bounds_the_other_strategies(strategy: str, kafka_cache: Path, baseline: Any) -> None:
    with producer(strategy, kafka_cache, max_inflight=2) as p:
        seen = []
        for i in range(30):
            p.produce_batch(messages(10, i))
            seen.append(p.inflight)
        p.flush()
        assert max(seen) <= 2


def test_handle_strategy_refuses_mutable_payloads(kafka_cache: Path, baseline: Any) -> None:
    with producer("handle", kafka_cache) as p:
        with pytest.raises(TypeError, match="needs immutable bytes, not bytearray"):
            p.produce(bytearray(b"abc"))
        with pytest.raises(TypeError, match="not memoryview"):
            p.produce_batch([b"ok", memoryview(b"abc")])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_bad_payload_leaves_nothing_behind(strategy: str, kafka_cache: Path, baseline: Any) -> None:
    with producer(strategy, kafka_cache) as p:
        with pytest.raises(TypeError):
            p.produce_batch([b"fine", b"also fine", 42])  # type: ignore[list-item]
        with pytest.raises(TypeError):
            p.produce(object())  # type: ignore[arg-type]
        assert p.inflight == 0
        assert p.produce_batch([b"after"]).n == 1
        p.flush()


def test_pinned_payload_cannot_be_resized_while_librdkafka_holds_it(kafka_cache: Path, baseline: Any) -> None:
    payload = bytearray(b"resizable")
    with producer("pin", kafka_cache, config={"message.timeout.ms": 60000}) as p:
        p.set_broker_down(1)  # keeps the message in flight
        batch = p.produce(payload)
        with pytest.raises(BufferError):
            payload.extend(b"!")
        p.set_broker_down(1, down=False)
        p.flush()
        assert batch.result() == [(0, 0)]
    payload.extend(b"!")  # unpinned after the delivery report
    assert payload == b"resizable!"


def test_close_purges_what_cannot_be_delivered(kafka_cache: Path, baseline: Any) -> None:
    p = producer("handle", kafka_cache, config={"message.timeout.ms": 60000})
    p.set_broker_down(1)
    batch = p.produce_batch(messages(100))
    p.close(timeout=0.5)
    assert batch.done and batch.failed == 100
    assert set(batch.error_codes) == {p._lib.RD_KAFKA_RESP_ERR__PURGE_QUEUE}
    with pytest.raises(pbkafka.ProducerError, match="closed"):
        p.produce(b"late")


@pytest.mark.parametrize("strategy", ["copy", "pin"])
def test_checked_produce_at_level_2_finds_nothing(strategy: str, kafka_cache: Path, baseline: Any) -> None:
    with ptrbridge.checking(2):
        with producer(strategy, kafka_cache, checked=True) as p:
            batch = p.produce_batch(messages(200))
            single = p.produce(b"one")
            p.flush()
        assert ptrbridge.scan() == []
    assert batch.result() == [(0, o) for o in range(200)] and single.result() == [(0, 200)]


def test_same_payloads_in_two_pinned_batches_at_level_2(kafka_cache: Path, baseline: Any) -> None:
    """Batch A's unpin must not report what batch B (another Pinner) still pins and librdkafka holds."""
    shared = messages(50)
    with ptrbridge.checking(2):
        with producer("pin", kafka_cache) as fast, \
                producer("pin", kafka_cache, config={"message.timeout.ms": 60000}) as stuck:
            stuck.set_broker_down(1)
            held = stuck.produce_batch(shared)  # pinned, in flight, its slots point at `shared`
            done = fast.produce_batch(shared)
            fast.flush()  # unpins `done`'s Pinner while `held`'s still pins the same bytes
            assert ptrbridge.scan() == []
            stuck.set_broker_down(1, down=False)
            stuck.flush()
        assert ptrbridge.scan() == []
    assert done.result() == held.result() == [(0, o) for o in range(50)]


def test_checked_handle_strategy_breaks_the_written_rules(kafka_cache: Path, baseline: Any) -> None:
    """Zero-copy payloads kept alive by a Handle are safe in CPython but are R1/R2 violations as written."""
    keep = messages(5)
    # A scan after every lending call, so the retention is reported by produce() itself: adaptive
    # batching, which earlier level-2 tests can leave above 1 on a loaded machine, reports it a few
    # calls later (this test then failed with "DID NOT RAISE" in 2 of 6 runs of this file).
    old_batch = ptrbridge.set_scan_batch(1)
    try:
        with ptrbridge.checking(2):
            with producer("handle", kafka_cache, checked=True) as p:
                with pytest.raises(ptrbridge.NestedPointerError,
                                   match=r"unpinned Python pointer: \[0\] -> bytes\(9\)"):
                    p.produce_batch(keep)
                with pytest.raises(ptrbridge.RetainedPointerError,
                                   match=r"bytes\(10\) lent to pbk_produce_one\(\) at pbkafka.py:\d+ is still "
                                         r"pointed to by C heap block 0x[0-9a-f]+ \(\d+ bytes, tracked allocator\)"):
                    p.produce(keep[1])
                p.flush()
    finally:
        ptrbridge.set_scan_batch(old_batch)


BROKEN = """
import sys
sys.path.insert(0, {kafka_dir!r})
import ptrbridge, pbkafka
p = pbkafka.Producer(strategy="pin", config={{"linger.ms": 100}}, cache_dir={cache!r})
ptrbridge.set_check_level(2)
ptrbridge.set_quarantine({quarantine})
ptrbridge.set_scan_batch(1)
lib = ptrbridge.wrap(p._lib)
b = p._lib.pbk_batch_new(p._p, lib.PBK_PIN, 1, p._ffi.NULL, 0)  # the broken way: no pin, no handle
p._batches[b.id] = pbkafka.Batch(p, 1)
nxt = p._ffi.new("uint32_t *")
try:
    lib.pbk_produce_one(p._rkt, 0, b, 0, bytes(range(200)), 200, nxt)  # a temporary, zero-copy
except ptrbridge.RetainedPointerError as exc:
    print("REPORTED:", exc, flush=True)
p.flush(10)
print("DELIVERED", flush=True)
"""


def run_broken(cache: Path, quarantine: bool) -> "subprocess.CompletedProcess[str]":
    code = BROKEN.format(kafka_dir=str(KAFKA_DIR), cache=str(cache), quarantine=quarantine)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_zero_copy_temporary_is_reported_at_level_2(kafka_cache: Path) -> None:
    proc = run_broken(kafka_cache, quarantine=False)
    assert proc.returncode == 0, proc.stderr
    assert ("REPORTED: ptrbridge: C kept a pointer to Python memory after the call returned (R2): "
            "bytes(200) lent to pbk_produce_one() at <string>:") in proc.stdout
    assert "tracked allocator" in proc.stdout and "pin the object" in proc.stdout


def test_zero_copy_temporary_dies_under_quarantine(kafka_cache: Path) -> None:
    """The broker thread reads the revoked shadow.  librdkafka blocks every signal in
    its threads, so the kernel kills the process at once: no report, but no silent
    read of freed memory either."""
    proc = run_broken(kafka_cache, quarantine=True)
    assert proc.returncode == -signal.SIGSEGV, (proc.returncode, proc.stdout, proc.stderr)
    assert "DELIVERED" not in proc.stdout


# The tests the level-2 run leaves out, and why:
#  - the ones that break the rules on purpose (zero_copy_temporary, breaks_the_written_rules)
#    and this file's own subprocess runs;
#  - every handle-strategy test: that strategy hands librdkafka zero-copy payloads kept alive
#    only by a Handle, so C keeps pointers to unpinned Python memory after produce() returned.
#    That is correct for CPython bytes but is rule R2 broken as written (Go's rules say no), and
#    level 2 says so: test_level_2_reports_the_handle_strategy_retention asserts exactly that.
LEVEL_2_CLEAN = ("not level_2_reports and not zero_copy_temporary and not breaks_the_written_rules "
                 "and not handle")


def run_level_2(cache: Path, tmp_path: Path, select: str, *flags: str) -> "subprocess.CompletedProcess[str]":
    """``pytest --ptrbridge=2`` on this file's tests that ``select`` picks, in a subprocess."""
    env = dict(os.environ, PBKAFKA_CACHE=str(cache))
    env.pop("PTRBRIDGE_CHECK", None)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "--ptrbridge=2", *flags, "-q", "-p", "no:cacheprovider",
         str(Path(__file__)), "-k", select],
        capture_output=True, text=True, timeout=900, cwd=str(Path(__file__).parent.parent), env=env,
    )


def test_suite_under_ptrbridge_level_2_reports_nothing(kafka_cache: Path, tmp_path: Path) -> None:
    """``pytest --ptrbridge=2`` (quarantine on) on the copy and pin tests: no leak, no finding."""
    proc = run_level_2(kafka_cache, tmp_path, LEVEL_2_CLEAN)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ptrbridge findings" not in proc.stdout, proc.stdout[-3000:]
    assert "ptrbridge: no pointer problems found" in proc.stdout
    assert " passed" in proc.stdout and "failed" not in proc.stdout


def test_level_2_reports_the_handle_strategy_retention(kafka_cache: Path, tmp_path: Path) -> None:
    """What level 2 says of the handle strategy: C keeps the payloads (R2), nothing else.

    Without the quarantine the retention scan after each produce finds the
    payload in the batch's result slot (tracked C memory) and in librdkafka's
    message: portability findings (CPython does not move the bytes, and the
    Handle keeps them alive).  With it, the broker thread reads a revoked
    shadow and the process dies of SIGSEGV.
    """
    report = tmp_path / "report.json"
    proc = run_level_2(kafka_cache, tmp_path, "broker_down and handle", "--ptrbridge-no-quarantine",
                       f"--ptrbridge-report={report}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    findings = json.loads(report.read_text())["findings"]
    assert findings, proc.stdout[-3000:]
    for f in findings:
        assert (f["kind"], f["severity"], f["rule"], f["object"], f["function"]) == (
            "retained-live", "portability", "R2", "bytes(6)", "pbk_produce_one"), f["message"]
        assert f["test"].endswith("test_broker_down_times_out_and_frees_everything[handle]")
    holders = sorted(f["holder"] for f in findings)
    assert len(holders) == 2, holders
    assert "tracked allocator" in holders[0] and "librdkafka" in holders[1], holders

    killed = run_level_2(kafka_cache, tmp_path, "delivers_every and handle")
    assert killed.returncode == -signal.SIGSEGV, (killed.returncode, killed.stdout[-2000:], killed.stderr[-2000:])
