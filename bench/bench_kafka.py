"""Benchmark of the Kafka producer example (not a test): python bench/bench_kafka.py [--quick] [--soak [N]]

Runs examples/kafka's Producer with each strategy (copy, handle, pin) and
confluent-kafka (the `bench` extra: pip install confluent-kafka) side by side
in the same run, against librdkafka's in-process mock cluster
(test.mock.num.brokers=1), with the same librdkafka settings for all:

1. full speed at 100 B, 1 KiB and 100 KiB: msgs/s, MB/s and delivery latency
   (librdkafka's own: produce() to delivery report) p50 / p99 / p99.9;
2. a fixed offered rate of 500 000 msg/s at 100 B, sent in ticks of 1 ms:
   the achieved rate and the latency measured from each message's scheduled
   send time (so falling behind counts as latency), after gc.freeze() of the
   start-up heap for every variant (see best_of);
3. --soak [N]: N messages (default 5 000 000) per strategy at check level 2,
   under ptrbridge.testing.assert_no_growth: no finding, no leak, flat RSS.

Targets: at 100 B every strategy >= 1.5x confluent-kafka's msgs/s; at
500 000 msg/s offered p99.9 < 10 ms; at 100 KiB the zero-copy strategies
(handle, pin) >= 1.5x confluent-kafka's MB/s.  Variants run interleaved,
best of the rounds (throughput) and the round with the best p99.9
(latency).  Keep it modest on shared machines: --quick runs a few seconds per
variant.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples" / "kafka"))
sys.path.insert(0, str(Path(__file__).parent))

import ptrbridge  # noqa: E402
import ptrbridge.testing  # noqa: E402
from ptrbridge import findings  # noqa: E402

import pbkafka  # noqa: E402
from timing import verdict  # noqa: E402

try:
    import confluent_kafka
except ImportError:  # the bench extra is not installed
    confluent_kafka = None

TOPIC = "bench"
MAX_LAG = 1.0  # seconds a fixed-rate run may fall behind its schedule before it stops
CONFIG: Dict[str, object] = {
    "linger.ms": 5,
    "queue.buffering.max.messages": 200000,
    "acks": 1,
}

RATE_CONFIG: Dict[str, object] = dict(CONFIG, **{"linger.ms": 1})  # the fixed-rate (latency) runs


@dataclass
class Run:
    messages: int
    seconds: float
    payload: int
    latencies_us: List[int] = field(default_factory=list)
    behind: bool = False  # a fixed-rate run that fell more than MAX_LAG behind and stopped

    @property
    def rate(self) -> float:
        return self.messages / self.seconds

    @property
    def mbps(self) -> float:
        return self.messages * self.payload / self.seconds / 1e6

    def percentile(self, q: float) -> float:
        if not self.latencies_us:
            return float("nan")
        ordered = sorted(self.latencies_us)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000.0  # ms


def payload_pool(size: int, count: int) -> List[bytes]:
    """``count`` distinct bytes objects of ``size`` bytes (each message its own object)."""
    return [(b"%08d" % i + os.urandom(16)) * (size // 24) + b"x" * (size % 24) for i in range(count)]


# -- our producer ---------------------------------------------------------------


def ours_full_speed(strategy: str, pool: List[bytes], n: int, batch: int) -> Run:
    size = len(pool[0])
    with pbkafka.Producer(strategy=strategy, topic=TOPIC, config=CONFIG, partitions=1) as p:
        p.produce(pool[0])
        p.flush()
        batches = []
        chunks = [pool[i:i + batch] for i in range(0, len(pool), batch)]
        start = time.perf_counter()
        sent = 0
        while sent < n:
            chunk = chunks[(sent // batch) % len(chunks)]
            batches.append(p.produce_batch(chunk))
            sent += len(chunk)
            p.poll(0)
        p.flush()
        seconds = time.perf_counter() - start
        run = Run(sent, seconds, size)
        for b in batches:
            if b.failed:
                raise RuntimeError(f"{strategy}: {b.failed} messages failed: {b.errors[0]}")
            run.latencies_us.extend(b.latencies_us)
    return run


def ours_fixed_rate(strategy: str, pool: List[bytes], rate: int, seconds: float) -> Run:
    per_tick = rate // 1000
    chunks = [pool[i:i + per_tick] for i in range(0, len(pool) - per_tick + 1, per_tick)]
    with pbkafka.Producer(strategy=strategy, topic=TOPIC, config=RATE_CONFIG, partitions=1) as p:
        p.produce(pool[0])
        p.flush()
        ticks = int(seconds * 1000)
        lags: List[int] = []
        batches = []
        start = time.perf_counter()
        for tick in range(ticks):
            due = start + tick / 1000.0
            while True:
                now = time.perf_counter()
                if now >= due:
                    break
                p.poll(0)
                if due - now > 0.0003:
                    time.sleep(0.0002)
            if now - due > MAX_LAG:
                break  # cannot keep up with the offered rate: stop, report what was sent
            lags.append(int((now - due) * 1e6))
            batches.append(p.produce_batch(chunks[tick % len(chunks)]))
            p.poll(0)
        p.flush()
        elapsed = time.perf_counter() - start
        run = Run(len(batches) * per_tick, elapsed, len(pool[0]))
        run.behind = len(batches) < ticks
        for lag, b in zip(lags, batches):
            run.latencies_us.extend(lat + lag for lat in b.latencies_us)
    return run


# -- confluent-kafka --------------------------------------------------------------


def _ck_producer(config: Dict[str, object]) -> "confluent_kafka.Producer":
    conf = {"test.mock.num.brokers": 1, "log_level": 3}
    conf.update(config)
    p = confluent_kafka.Producer(conf)
    p.produce(TOPIC, b"warm", partition=0)
    p.flush()
    return p


def ck_full_speed(pool: List[bytes], n: int, batch: int) -> Run:
    p = _ck_producer(CONFIG)
    lat: List[int] = []
    failed: List[object] = []

    def on_delivery(err: object, msg: "confluent_kafka.Message") -> None:
        if err is not None:
            failed.append(err)
        else:
            lat.append(int(msg.latency() * 1e6))

    produce = p.produce
    chunks = [pool[i:i + batch] for i in range(0, len(pool), batch)]
    start = time.perf_counter()
    sent = 0
    while sent < n:
        for value in chunks[(sent // batch) % len(chunks)]:
            while True:
                try:
                    produce(TOPIC, value, partition=0, on_delivery=on_delivery)
                    break
                except BufferError:
                    p.poll(0.001)
            sent += 1
        p.poll(0)
    p.flush()
    seconds = time.perf_counter() - start
    if failed:
        raise RuntimeError(f"confluent-kafka: {len(failed)} failed: {failed[0]}")
    run = Run(sent, seconds, len(pool[0]))
    run.latencies_us = lat
    return run


def ck_fixed_rate(pool: List[bytes], rate: int, seconds: float) -> Run:
    p = _ck_producer(RATE_CONFIG)
    per_tick = rate // 1000
    lat: List[int] = []

    def on_delivery(err: object, msg: "confluent_kafka.Message") -> None:
        lat.append(int(msg.latency() * 1e6))

    produce = p.produce
    lags: List[int] = []
    ticks = int(seconds * 1000)
    start = time.perf_counter()
    for tick in range(ticks):
        due = start + tick / 1000.0
        while True:
            now = time.perf_counter()
            if now >= due:
                break
            p.poll(0)
            if due - now > 0.0003:
                time.sleep(0.0002)
        if now - due > MAX_LAG:
            break
        lags.append(int((now - due) * 1e6))
        base = (tick * per_tick) % (len(pool) - per_tick)
        for value in pool[base:base + per_tick]:
            while True:
                try:
                    produce(TOPIC, value, partition=0, on_delivery=on_delivery)
                    break
                except BufferError:
                    p.poll(0.001)
        p.poll(0)
    p.flush()
    elapsed = time.perf_counter() - start
    run = Run(len(lags) * per_tick, elapsed, len(pool[0]))
    run.behind = len(lags) < ticks
    # confluent-kafka's reports do not say which tick a message belongs to; reports come
    # back in order on one partition, so message i belongs to tick i // per_tick
    run.latencies_us = [v + lags[min(i // per_tick, len(lags) - 1)] for i, v in enumerate(lat)]
    return run


# -- driver -----------------------------------------------------------------------


def best_of(rounds: int, variants: Dict[str, Callable[[], Run]], key: Callable[[Run], float],
            freeze: bool = False) -> Dict[str, Run]:
    """The best run of each variant over ``rounds`` interleaved rounds.

    ``freeze``: ``gc.freeze()`` the heap before each run (every variant alike), as a
    latency-sensitive service does after start-up: a full collection then skips the
    ~20 000 objects that existed before, which otherwise cost the fixed-rate runs
    their p99.9 (measured here: 13-20 ms with, 9-12 ms after the freeze).
    """
    best: Dict[str, Run] = {}
    for _ in range(rounds):
        for name, fn in variants.items():
            gc.collect()
            if freeze:
                gc.freeze()
            try:
                run = fn()
            finally:
                if freeze:
                    gc.unfreeze()
            if name not in best or key(run) > key(best[name]):
                best[name] = run
    return best


def table(title: str, runs: Dict[str, Run]) -> None:
    print(f"\n### {title}\n")
    print("| producer | msgs/s | MB/s | p50 ms | p99 ms | p99.9 ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, r in runs.items():
        note = f" (fell {MAX_LAG:.0f} s behind, stopped)" if r.behind else ""
        print(f"| {name}{note} | {r.rate:,.0f} | {r.mbps:,.1f} | {r.percentile(0.5):.2f} | "
              f"{r.percentile(0.99):.2f} | {r.percentile(0.999):.2f} |")


def soak(strategy: str, n: int, batch: int = 1000, checked_calls: bool = False) -> None:
    pool = payload_pool(100, batch * 4)
    chunks = [pool[i:i + batch] for i in range(0, len(pool), batch)]
    findings.take()
    findings.reset_counters()
    with ptrbridge.checking(2):
        ptrbridge.testing.settle()
        before = ptrbridge.stats()
        # a bounded number in flight, so librdkafka's queue reaches its steady size in the warm-up
        # --soak-checked: copy and pin produce through ptrbridge.wrap (checked calls; slow at
        # level 2: 0.3-1 s per 1000-message batch, see the notes); handle breaks R1/R2
        # as written (see the README)
        with pbkafka.Producer(strategy=strategy, topic=TOPIC, config=CONFIG, partitions=1,
                              max_inflight=32, checked=checked_calls and strategy != "handle") as p:
            state = {"i": 0, "failed": 0}

            def one_batch() -> None:
                b = p.produce_batch(chunks[state["i"] % len(chunks)])
                state["i"] += 1
                p.poll(0)
                state["failed"] += b.failed

            calls = max(2, n // batch)
            start = time.perf_counter()
            warmup = max(50, calls // 5)
            growth = ptrbridge.testing.assert_no_growth(one_batch, n=calls, max_bytes=8 << 20,
                                                        warmup=warmup)
            p.flush()
            seconds = time.perf_counter() - start
        ptrbridge.testing.settle()
        after = ptrbridge.stats()
        problems = ptrbridge.testing.leaks(before, after)
        found = findings.take() + ptrbridge.scan()
        checked = findings.counters()
    total = (calls + warmup) * batch
    how = "checked calls" if checked_calls and strategy != "handle" else "unchecked calls"
    print(f"soak {strategy} ({how}): {total:,} messages at level 2 in {seconds:.1f} s "
          f"({total / seconds:,.0f} msg/s); RSS growth {growth.rss_bytes} B, tracked growth "
          f"{growth.tracked_bytes} B; findings {len(found)}; leaks {problems or 'none'}; "
          f"failed deliveries {state['failed']}; checked {checked}")
    if found or problems or state["failed"]:
        raise SystemExit(f"soak {strategy}: FAILED: {found[:3]} {problems}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small runs, one round")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--soak", nargs="?", const=5_000_000, type=int, default=None,
                        help="soak N messages per strategy at check level 2 (default 5 000 000)")
    parser.add_argument("--soak-only", action="store_true", help="skip the throughput runs")
    parser.add_argument("--strategies", default=",".join(pbkafka.STRATEGIES),
                        help="comma-separated strategies for --soak (default: all)")
    parser.add_argument("--soak-checked", action="store_true",
                        help="soak copy and pin with checked calls (ptrbridge.wrap)")
    args = parser.parse_args()
    quick = args.quick
    rounds = args.rounds or (1 if quick else 3)
    print(f"librdkafka (example) {pbkafka.load().ffi.string(pbkafka.load().lib.rd_kafka_version_str()).decode()}; "
          + (f"confluent-kafka {confluent_kafka.version()[0]} with librdkafka {confluent_kafka.libversion()[0]}"
             if confluent_kafka else "confluent-kafka not installed (pip install confluent-kafka)"))
    print(f"check level {ptrbridge.check_level()}; config {CONFIG} (fixed rate: linger.ms=1); rounds {rounds}")
    results: Dict[str, Dict[str, Run]] = {}
    if not args.soak_only:
        sizes = [(100, 100_000 if quick else 200_000, 1000),
                 (1024, 50_000 if quick else 200_000, 1000),
                 (102400, 2_000 if quick else 10_000, 100)]
        for size, n, batch in sizes:
            pool = payload_pool(size, min(max(batch * 4, 2000), (64 << 20) // size))
            variants: Dict[str, Callable[[], Run]] = {
                s: (lambda s=s: ours_full_speed(s, pool, n, batch)) for s in pbkafka.STRATEGIES}
            if confluent_kafka is not None:
                variants["confluent-kafka"] = lambda: ck_full_speed(pool, n, batch)
            results[f"{size}"] = best_of(rounds, variants, key=lambda r: r.rate)
            table(f"full speed, {size} B payloads, {n:,} messages", results[f"{size}"])
        pool = payload_pool(100, 20_000)
        seconds = 1.0 if quick else 4.0
        variants = {s: (lambda s=s: ours_fixed_rate(s, pool, 500_000, seconds)) for s in pbkafka.STRATEGIES}
        if confluent_kafka is not None:
            variants["confluent-kafka"] = lambda: ck_fixed_rate(pool, 500_000, seconds)
        results["rate"] = best_of(rounds, variants, key=lambda r: -r.percentile(0.999), freeze=True)
        table(f"offered 500,000 msg/s, 100 B, {seconds:.0f} s (latency from the scheduled send time; "
              f"gc.freeze() first, every variant)", results["rate"])
        print("\n### targets\n")
        ck = "confluent-kafka"
        for s in pbkafka.STRATEGIES:
            if ck in results["100"]:
                ratio = results["100"][s].rate / results["100"][ck].rate
                print(f"100 B msgs/s, {s} / confluent-kafka: {ratio:.2f}x (target >= 1.5x) "
                      f"{verdict(ratio, 1.5, higher_is_better=True)}")
        for s, r in results["rate"].items():
            p999 = r.percentile(0.999)
            print(f"500k/s offered, {s}: achieved {r.rate:,.0f} msg/s, p99.9 {p999:.2f} ms (target < 10 ms) "
                  f"{'PASS' if p999 < 10 and not r.behind else 'MISS'}")
        for s in ("handle", "pin"):
            if ck in results["102400"]:
                ratio = results["102400"][s].mbps / results["102400"][ck].mbps
                print(f"100 KiB MB/s, {s} / confluent-kafka: {ratio:.2f}x (target >= 1.5x) "
                      f"{verdict(ratio, 1.5, higher_is_better=True)}")
    if args.soak is not None:
        print()
        for s in args.strategies.split(","):
            soak(s, args.soak, checked_calls=args.soak_checked)


if __name__ == "__main__":
    main()
