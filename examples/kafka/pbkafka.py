"""A Kafka producer over librdkafka, three ways, with ptrbridge.

librdkafka queues each payload for its broker threads and reads it long
after ``rd_kafka_produce()`` returned, so the payload must stay valid until
the delivery report.  :class:`Producer` offers the three ptrbridge ways:

``strategy="copy"``
    The batch's payloads are copied into one :class:`ptrbridge.CBuffer`,
    which is transferred to C; the C delivery callback ``pb_free``\\ s it when
    the batch's last message is reported.
``strategy="handle"``
    Zero-copy: librdkafka gets pointers into the ``bytes`` objects
    themselves; a :class:`ptrbridge.Handle` (from a bounded
    :class:`ptrbridge.HandleTable`) keeps them alive, and the C callback
    releases it with ``pb_handle_release`` when the last message is reported.
``strategy="pin"``
    Zero-copy: a :class:`ptrbridge.Pinner` per batch pins the payloads and is
    unpinned once the batch is fully delivered, at the drain after (at level 2 the unpinned
    memory is scanned for pointers C kept).

Delivery reports are handled in C (``pbkafka.c``): each message's report is
written into its batch's result slots, and a completed batch is queued for
Python, which drains them in bulk on :meth:`Producer.poll`.  Example::

    with Producer(strategy="copy") as producer:          # in-process mock cluster
        batch = producer.produce_batch([b"a" * 100] * 1000, partition=0)
        producer.flush()
        print(batch.offsets[:3], batch.partitions[0])     # [0, 1, 2] 0

Back-pressure: at most ``max_inflight`` batches are in flight (for
``"handle"`` that is the bound of the HandleTable); when librdkafka's queue is
full (``QUEUE_FULL``) the producer polls and retries.  A message that fails
is reported in :attr:`Batch.errors` (a :class:`KafkaError` with librdkafka's
text); :meth:`Batch.result` raises :class:`DeliveryError`.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import ptrbridge

import pbkafka_build

__all__ = ["Producer", "Batch", "KafkaError", "DeliveryError", "ProducerError", "STRATEGIES", "load", "consume"]

STRATEGIES = ("copy", "handle", "pin")
_DRAIN_MAX = 256
_SLOT_Q = 5  # struct pbk_result is 5 int64 words: offset, latency, partition|err, payload, batch
_COPY_JOIN_LIMIT = 4096  # average payload size up to which payloads are joined, then copied once

Payload = Union[bytes, bytearray, memoryview]


def load(cache_dir: Optional[Path] = None) -> Any:
    """The compiled ``_pbkafka`` module (built on first use; see pbkafka_build)."""
    return pbkafka_build.load(cache_dir)


class ProducerError(RuntimeError):
    """librdkafka refused a configuration or the producer could not be created."""


class KafkaError:
    """A librdkafka error code with its name and librdkafka's text."""

    __slots__ = ("code", "name", "text")

    def __init__(self, code: int, name: str, text: str) -> None:
        self.code = code
        self.name = name
        self.text = text

    def __eq__(self, other: object) -> bool:
        return isinstance(other, KafkaError) and other.code == self.code

    def __hash__(self) -> int:
        return hash(self.code)

    def __repr__(self) -> str:
        return f"KafkaError({self.name}: {self.text})"


class DeliveryError(Exception):
    """Some messages of a batch were not delivered."""

    def __init__(self, message: str, errors: List[Optional[KafkaError]]) -> None:
        super().__init__(message)
        self.errors = errors


def _error(lib: Any, ffi: Any, code: int) -> KafkaError:
    return KafkaError(
        code,
        ffi.string(lib.rd_kafka_err2name(code)).decode(),
        ffi.string(lib.rd_kafka_err2str(code)).decode(),
    )


class Batch:
    """The messages of one ``produce``/``produce_batch`` call and, once done, their reports."""

    __slots__ = ("n", "done", "failed", "_raw", "_errors", "_producer")

    def __init__(self, producer: "Producer", n: int) -> None:
        self.n = n
        self.done = False
        self.failed = 0
        self._raw: Optional[memoryview] = None
        self._errors: Optional[List[Optional[KafkaError]]] = None
        self._producer = producer

    def _column(self, fmt: str, start: int, step: int) -> List[int]:
        if self._raw is None:
            raise RuntimeError("pbkafka: batch not delivered yet; call Producer.flush() or poll()")
        raw: Any = self._raw
        view = raw.cast(fmt)
        return list(view[start::step].tolist())

    @property
    def offsets(self) -> List[int]:
        """Offset of each message (-1 where it failed)."""
        return self._column("q", 0, _SLOT_Q)

    @property
    def latencies_us(self) -> List[int]:
        """Microseconds from ``rd_kafka_produce`` to the delivery report, per message."""
        return self._column("q", 1, _SLOT_Q)

    @property
    def partitions(self) -> List[int]:
        """Partition of each message."""
        return self._column("i", 4, 2 * _SLOT_Q)

    @property
    def error_codes(self) -> List[int]:
        """librdkafka error code of each message (0 = delivered)."""
        return self._column("i", 5, 2 * _SLOT_Q)

    @property
    def errors(self) -> List[Optional[KafkaError]]:
        """``None`` per delivered message, else a :class:`KafkaError`."""
        if self._errors is None:
            cache: Dict[int, KafkaError] = {}
            out: List[Optional[KafkaError]] = []
            for code in self.error_codes:
                if code == 0:
                    out.append(None)
                else:
                    if code not in cache:
                        cache[code] = self._producer._error(code)
                    out.append(cache[code])
            self._errors = out
        return self._errors

    def result(self) -> List[Tuple[int, int]]:
        """``(partition, offset)`` per message; raises :class:`DeliveryError` if any failed."""
        if not self.done:
            raise RuntimeError("pbkafka: batch not delivered yet; call Producer.flush() or poll()")
        if self.failed:
            errors = self.errors
            first = next(e for e in errors if e is not None)
            raise DeliveryError(
                f"pbkafka: {self.failed} of {self.n} messages not delivered: "
                f"{first.text} ({first.name})",
                errors,
            )
        return list(zip(self.partitions, self.offsets))

    def __repr__(self) -> str:
        state = f"done, {self.failed} failed" if self.done else "in flight"
        return f"<pbkafka.Batch {self.n} messages {state}>"


class Producer:
    """A librdkafka producer whose payloads cross to C by ``strategy``.

    ``config`` entries are librdkafka properties (strings or numbers).  By
    default the producer runs against librdkafka's in-process mock cluster
    (``test.mock.num.brokers=1``) with the topic created with ``partitions``
    partitions; pass ``mock=False`` and ``bootstrap.servers`` for a real
    cluster.  ``max_inflight`` bounds the batches in flight.  ``checked=True``
    makes the produce calls ``ptrbridge.wrap``-checked calls (slower; for tests).
    """

    def __init__(
        self,
        strategy: str = "copy",
        topic: str = "ptrbridge",
        config: Optional[Mapping[str, Any]] = None,
        *,
        mock: bool = True,
        partitions: int = 4,
        max_inflight: int = 4096,
        checked: bool = False,
        cache_dir: Optional[Path] = None,
    ) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"pbkafka: strategy must be one of {STRATEGIES}, not {strategy!r}")
        if max_inflight < 1:
            raise ValueError(f"pbkafka: max_inflight must be >= 1, not {max_inflight}")
        module = load(cache_dir)
        self._ffi: Any = module.ffi
        self._lib: Any = module.lib
        # checked=True: produce through ptrbridge.wrap(lib), so every call is checked
        # (rules R1-R3; at level 2 the C memory is scanned for what C kept)
        self._call: Any = ptrbridge.wrap(module.lib) if checked else module.lib
        self.strategy = strategy
        self.topic = topic
        self.max_inflight = max_inflight
        self._kind = {"copy": self._lib.PBK_COPY, "handle": self._lib.PBK_HANDLE,
                      "pin": self._lib.PBK_PIN}[strategy]
        self._handles = ptrbridge.HandleTable(max_handles=max_inflight) if strategy == "handle" else None
        self._pinners: Dict[int, ptrbridge.Pinner] = {}  # batch id -> its Pinner ("pin")
        # Pinners of batches fully reported, unpinned at the next drain (after one more
        # rd_kafka_poll) or at close: see _drain
        self._reported_pins: List[ptrbridge.Pinner] = []
        self._batches: Dict[int, Batch] = {}  # batch id -> Batch, in flight
        self._drain_buf = self._ffi.new("struct pbk_batch *[]", _DRAIN_MAX)
        self._next = self._ffi.new("uint32_t *")
        # produce_batch's lengths and (pin, handle) pointer arrays, allocated once and reused by
        # every batch (grown by powers of two).  A fresh array per batch often lands where
        # librdkafka freed messages whose neighbours still hold stale queue links to them;
        # level 2 then reads those links as C keeping the array lent to pbk_produce (R2).
        self._cap = 0
        self._lens_a: Any = self._ffi.NULL
        self._ptrs_a: Any = self._ffi.NULL
        self._addrs_a: Any = self._ffi.NULL
        self._errors: Dict[int, KafkaError] = {}
        self._slot_size = self._ffi.sizeof("struct pbk_result")
        assert self._slot_size == 8 * _SLOT_Q
        self._closed = False
        self._rk: Any = self._ffi.NULL
        self.mock_cluster: Any = self._ffi.NULL
        self._rkt: Any = self._ffi.NULL
        self._p = self._lib.pbk_producer_new()
        if self._p == self._ffi.NULL:
            raise MemoryError("pbkafka: pbk_producer_new")
        try:
            self._create(config or {}, mock, partitions)
        except BaseException:
            self._destroy()
            raise

    # -- setup ---------------------------------------------------------------

    def _create(self, config: Mapping[str, Any], mock: bool, partitions: int) -> None:
        ffi, lib = self._ffi, self._lib
        settings: Dict[str, str] = {"linger.ms": "5"}
        if mock:
            settings["test.mock.num.brokers"] = "1"
        settings.update({key: str(value) for key, value in config.items()})
        conf = lib.rd_kafka_conf_new()
        errstr = ffi.new("char[512]")
        try:
            for key, value in settings.items():
                if lib.rd_kafka_conf_set(conf, key.encode(), value.encode(), errstr, 512) != lib.RD_KAFKA_CONF_OK:
                    raise ProducerError(f"pbkafka: config {key}={value!r}: {ffi.string(errstr).decode()}")
            lib.pbk_conf_install(conf, self._p)
        except BaseException:
            lib.rd_kafka_conf_destroy(conf)
            raise
        rk = lib.rd_kafka_new(lib.RD_KAFKA_PRODUCER, conf, errstr, 512)  # takes conf on success
        if rk == ffi.NULL:
            lib.rd_kafka_conf_destroy(conf)
            raise ProducerError(f"pbkafka: rd_kafka_new: {ffi.string(errstr).decode()}")
        self._rk = rk
        self.mock_cluster = lib.rd_kafka_handle_mock_cluster(rk) if mock else ffi.NULL
        if mock:
            err = lib.rd_kafka_mock_topic_create(self.mock_cluster, self.topic.encode(), partitions, 1)
            if err:
                raise ProducerError(f"pbkafka: mock topic {self.topic}: {self._error(err).text}")
        self._rkt = lib.rd_kafka_topic_new(rk, self.topic.encode(), ffi.NULL)
        if self._rkt == ffi.NULL:
            raise ProducerError(f"pbkafka: topic {self.topic}: {self._error(lib.rd_kafka_last_error()).text}")

    @property
    def bootstrap_servers(self) -> str:
        """The mock cluster's address (for a consumer), or "" without one."""
        if self.mock_cluster == self._ffi.NULL:
            return ""
        return str(self._ffi.string(self._lib.rd_kafka_mock_cluster_bootstraps(self.mock_cluster)).decode())

    def set_broker_down(self, broker_id: int = 1, down: bool = True) -> None:
        """Take a mock broker down (or up again), to test the error path."""
        if self.mock_cluster == self._ffi.NULL:
            raise ProducerError("pbkafka: no mock cluster")
        setter = self._lib.rd_kafka_mock_broker_set_down if down else self._lib.rd_kafka_mock_broker_set_up
        err = setter(self.mock_cluster, broker_id)
        if err:
            raise ProducerError(f"pbkafka: mock broker {broker_id}: {self._error(err).text}")

    def _error(self, code: int) -> KafkaError:
        err = self._errors.get(code)
        if err is None:
            err = self._errors[code] = _error(self._lib, self._ffi, code)
        return err

    # -- producing -----------------------------------------------------------

    def produce(self, payload: Payload, partition: int = 0) -> Batch:
        """Produce one message; its :class:`Batch` (of 1) reports the delivery.

        The same strategies as :meth:`produce_batch`, one message at a time
        (each costs a CBuffer, a Handle or a Pinner of its own).
        """
        if self._closed:
            raise ProducerError("pbkafka: producer is closed")
        ffi, lib = self._ffi, self._lib
        while lib.pbk_inflight(self._p) >= self.max_inflight:
            self.poll(0.001)
        pinner: Optional[ptrbridge.Pinner] = None
        if self._kind == lib.PBK_COPY:
            pointer = ptrbridge.CBuffer.copy(payload).transfer()
            b = lib.pbk_batch_new(self._p, self._kind, 1, pointer, 0)
            if b == ffi.NULL:
                ptrbridge.free(pointer)
        elif self._kind == lib.PBK_HANDLE:
            _check_immutable(payload)
            handle = self._new_handle(payload)
            pointer = ffi.from_buffer(payload)
            b = lib.pbk_batch_new(self._p, self._kind, 1, ffi.NULL, int(handle))
            if b == ffi.NULL:
                handle.delete()
        else:
            pinner = ptrbridge.Pinner()
            pointer = pinner.pin(payload)  # UnpinnableError (a TypeError) leaves nothing pinned
            b = lib.pbk_batch_new(self._p, self._kind, 1, ffi.NULL, 0)
            if b == ffi.NULL:
                pinner.unpin()
        if b == ffi.NULL:
            raise MemoryError("pbkafka: pbk_batch_new")
        batch = Batch(self, 1)
        self._batches[b.id] = batch
        if pinner is not None:
            self._pinners[b.id] = pinner
        size = len(memoryview(payload).cast("B"))
        call, nxt = self._call, self._next
        nxt[0] = 0
        try:
            while True:
                err = call.pbk_produce_one(self._rkt, partition, b, 0, pointer, size, nxt)
                if err != lib.RD_KAFKA_RESP_ERR__QUEUE_FULL:
                    break
                self.poll(0.001)
        except BaseException:
            # raised before C ran, or (checked calls) after it returned: *next says which
            lib.pbk_batch_abandon(b, nxt[0], lib.RD_KAFKA_RESP_ERR__FAIL)
            raise
        if err:
            lib.pbk_batch_abandon(b, 0, err)
            self._drain()
        return batch

    def produce_batch(self, payloads: Sequence[Payload], partition: int = 0) -> Batch:
        """Produce every payload (zero-copy or one copy, by strategy); return their :class:`Batch`.

        Blocks (polling) while ``max_inflight`` batches are in flight or
        librdkafka's queue is full.  Messages librdkafka refuses for another
        reason (unknown partition, too large) fail in the batch's results.
        """
        if self._closed:
            raise ProducerError("pbkafka: producer is closed")
        n = len(payloads)
        if n == 0:
            raise ValueError("pbkafka: produce_batch needs at least one payload")
        ffi, lib = self._ffi, self._lib
        while lib.pbk_inflight(self._p) >= self.max_inflight:
            self.poll(0.001)
        sizes = list(map(len, payloads))
        lens = self._arrays(n)
        lens[0:n] = sizes
        pointers: Any = ffi.NULL
        keepalive: Any = None  # what backs `pointers` until the produce calls return
        pinner: Optional[ptrbridge.Pinner] = None
        if self._kind == lib.PBK_COPY:
            if sum(sizes) <= _COPY_JOIN_LIMIT * n:
                buf = ptrbridge.CBuffer.copy(b"".join(payloads))
            else:
                buf = _copy_into_one(payloads)
            block = buf.transfer()  # C owns the copy now; the callback pb_free()s it
            b = lib.pbk_batch_new(self._p, self._kind, n, block, 0)
            if b == ffi.NULL:
                ptrbridge.free(block)
        elif self._kind == lib.PBK_HANDLE:
            if not all(type(x) is bytes for x in payloads):
                for x in payloads:
                    _check_immutable(x)
            keep = tuple(payloads)  # the Handle keeps the payloads alive until C releases it
            handle = self._new_handle(keep)
            if self._call is lib and _BYTES_OFFSET is not None:
                # the addresses go into the reused pointer array (see _arrays), not a fresh
                # n-word array per batch: at level 2 each freed one was held back (poisoned)
                self._addrs_a[0:n] = [id(x) + _BYTES_OFFSET for x in keep]
                pointers = self._ptrs_a
            else:
                pointers, keepalive = _bytes_pointers(ffi, keep, fast=self._call is lib)
            b = lib.pbk_batch_new(self._p, self._kind, n, ffi.NULL, int(handle))
            if b == ffi.NULL:
                handle.delete()
        else:
            pinner = ptrbridge.Pinner()
            pin_many = getattr(pinner, "pin_many", None)  # the batch form, where ptrbridge has it
            if pin_many is not None:
                pointers = pin_many(payloads)  # a char *[n]; all pinned or none
            else:
                try:
                    pin = pinner.pin
                    pointers = ffi.new("char *[]", [pin(x) for x in payloads])
                except BaseException:
                    pinner.unpin()  # e.g. UnpinnableError for one payload: give back the others
                    raise
            b = lib.pbk_batch_new(self._p, self._kind, n, ffi.NULL, 0)
            if b == ffi.NULL:
                pinner.unpin()
        if b == ffi.NULL:
            raise MemoryError("pbkafka: pbk_batch_new")
        batch = Batch(self, n)
        self._batches[b.id] = batch
        if pinner is not None:
            self._pinners[b.id] = pinner
            ffi.memmove(self._ptrs_a, pointers, n * ffi.sizeof("char *"))
            pointers = self._ptrs_a
        self._enqueue(b, partition, pointers, lens)
        del keepalive
        return batch

    def _arrays(self, n: int) -> Any:
        """The reused arrays for ``n`` messages (grown as needed); returns the ``size_t[]`` lengths."""
        if n > self._cap:
            cap = max(64, 1 << (n - 1).bit_length())
            self._lens_a = self._ffi.new("size_t[]", cap)
            self._ptrs_a = self._ffi.new("char *[]", cap)
            self._addrs_a = self._ffi.cast("uintptr_t *", self._ptrs_a)  # the same words ("handle")
            self._cap = cap
        return self._lens_a

    def _new_handle(self, obj: Any) -> ptrbridge.Handle:
        assert self._handles is not None
        while True:
            try:
                return self._handles.new(obj)
            except ptrbridge.HandleLimitError:
                # back-pressure: every handle is a batch C has not reported yet
                self.poll(0.001)

    def _enqueue(self, b: Any, partition: int, pointers: Any, lens: Any) -> None:
        lib, call, nxt = self._lib, self._call, self._next
        nxt[0] = 0
        try:
            while True:
                err = call.pbk_produce(self._rkt, partition, b, nxt[0], pointers, lens, nxt)
                if err == 0:
                    return
                if err != lib.RD_KAFKA_RESP_ERR__QUEUE_FULL:
                    break
                lib.rd_kafka_poll(self._rk, 1)  # serve delivery reports, then retry from *next
                self._drain()
        except BaseException:
            # raised before C ran, or (checked calls) after it returned: the messages
            # from *next on were not enqueued and will get no report
            lib.pbk_batch_abandon(b, nxt[0], lib.RD_KAFKA_RESP_ERR__FAIL)
            raise
        lib.pbk_batch_abandon(b, nxt[0], err)  # the rest fail with librdkafka's error
        self._drain()

    # -- delivery ------------------------------------------------------------

    def poll(self, timeout: float = 0.0) -> int:
        """Serve delivery reports (waiting up to ``timeout`` s); return batches completed."""
        self._lib.rd_kafka_poll(self._rk, int(timeout * 1000))
        return self._drain()

    def _drain(self) -> int:
        """Take the completed batches from C; unpin the Pinners of those taken before.

        A batch's Pinner is not unpinned as soon as its last delivery report
        is served: librdkafka may still reference a payload from its
        ProduceRequest buffer (payloads that did not fit the buffer are pushed
        by reference) until the broker thread destroys that buffer, just after
        it queued the reports.  So a Pinner is unpinned at the drain after
        (one more ``rd_kafka_poll`` later), and at :meth:`close` after
        ``rd_kafka_destroy()`` joined librdkafka's threads.  At level 2 an
        unpin that found C still pointing at a payload would say so (R2).
        """
        ffi, lib, buf = self._ffi, self._lib, self._drain_buf
        total = 0
        problems: List[str] = []
        raised = self._unpin_reported()  # e.g. RetainedPointerError at level 2: raised after the loop
        while True:
            k = int(lib.pbk_drain(self._p, buf, _DRAIN_MAX))
            for i in range(k):
                b = buf[i]
                batch_id = int(b.id)
                batch = self._batches.pop(batch_id)
                batch._raw = memoryview(bytes(ffi.buffer(lib.pbk_batch_results(b), self._slot_size * b.n)))
                batch.failed = b.failed
                batch.done = True
                if b.release_status != 0:
                    problems.append(
                        f"batch {batch_id}: {'pb_free' if b.kind == lib.PBK_COPY else 'pb_handle_release'}"
                        f" returned {ffi.string(lib.pbk_strerror(b.release_status)).decode()}"
                    )
                lib.pbk_batch_free(b)
                buf[i] = ffi.NULL  # no stale pointer to a freed batch left for the next pbk_drain's check
                pinner = self._pinners.pop(batch_id, None)
                if pinner is not None:
                    self._reported_pins.append(pinner)  # unpinned at the next drain
            total += k
            if k < _DRAIN_MAX:
                break
        if raised:
            raise raised[0]
        if problems:
            raise ProducerError("pbkafka: ptrbridge refused a release in the delivery callback: " + "; ".join(problems))
        return total

    def _unpin_reported(self) -> List[BaseException]:
        """Unpin the Pinners of the batches drained before; returns what the unpins raised."""
        ready, self._reported_pins = self._reported_pins, []
        raised: List[BaseException] = []
        for pinner in ready:
            try:
                pinner.unpin()
            except Exception as exc:
                raised.append(exc)
        return raised

    @property
    def inflight(self) -> int:
        """Batches produced and not yet reported."""
        return int(self._lib.pbk_inflight(self._p))

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until every batch is reported; ``TimeoutError`` after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while self._lib.pbk_inflight(self._p) > 0:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"pbkafka: {self.inflight} batches still in flight after {timeout} s")
            self.poll(min(left, 0.05))

    def close(self, timeout: float = 30.0) -> None:
        """Flush, then destroy the librdkafka handle.

        Messages still undelivered at ``timeout`` are purged: librdkafka
        reports them as failed, so their memory is given back too.
        """
        if self._closed:
            return
        try:
            self.flush(timeout)
        except TimeoutError:
            lib = self._lib
            lib.rd_kafka_purge(self._rk, lib.RD_KAFKA_PURGE_F_QUEUE | lib.RD_KAFKA_PURGE_F_INFLIGHT)
            self.flush(timeout)
        finally:
            self._destroy()

    def _destroy(self) -> None:
        ffi, lib = self._ffi, self._lib
        self._closed = True
        if self._rkt != ffi.NULL:
            lib.rd_kafka_topic_destroy(self._rkt)
            self._rkt = ffi.NULL
        if self._rk != ffi.NULL:
            lib.rd_kafka_destroy(self._rk)  # reports anything left (purged) to the callback
            self._rk = ffi.NULL
        if self._p != ffi.NULL:
            self._drain()
            lib.pbk_producer_free(self._p)
            self._p = ffi.NULL
        raised = self._unpin_reported()  # librdkafka's threads are gone
        if raised:
            raise raised[0]
        self._lens_a = self._ptrs_a = self._addrs_a = ffi.NULL
        self._cap = 0

    def __enter__(self) -> "Producer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self.inflight} batches in flight"
        return f"<pbkafka.Producer strategy={self.strategy!r} topic={self.topic!r} {state}>"


def _bytes_data_offset() -> Optional[int]:
    """Offset of a bytes object's data from its id() in CPython (None elsewhere)."""
    if sys.implementation.name != "cpython":
        return None
    import cffi

    ffi = cffi.FFI()
    probes = [b"probe-%d" % i for i in range(4)]
    offsets = {int(ffi.cast("uintptr_t", ffi.from_buffer(p))) - id(p) for p in probes}
    return offsets.pop() if len(offsets) == 1 else None


_BYTES_OFFSET = _bytes_data_offset()


def _bytes_pointers(ffi: Any, payloads: Sequence[Payload], fast: bool = True) -> Tuple[Any, Any]:
    """A ``char **`` to the payloads' data, zero-copy, and the array behind it.

    ``ffi.from_buffer`` costs about 0.3-0.6 us a payload; for exact ``bytes``
    in CPython the data is at a fixed offset from the object's address, so
    the array is built from ``id()`` (about 0.04 us a payload).  The caller
    keeps the payloads alive (here: the Handle).  ``fast=False`` uses
    ``from_buffer`` (what checked calls can follow).
    """
    if _BYTES_OFFSET is None or not fast:
        array = ffi.new("char *[]", [ffi.from_buffer(x) for x in payloads])
        return array, array
    offset = _BYTES_OFFSET
    addresses = ffi.new("uintptr_t[]", [id(x) + offset for x in payloads])
    return ffi.cast("char **", addresses), addresses


def _check_immutable(payload: object) -> None:
    if type(payload) is not bytes:
        raise TypeError(
            f"pbkafka: strategy 'handle' passes payloads zero-copy and needs immutable bytes, "
            f"not {type(payload).__name__} (a Handle keeps it alive but cannot stop a resize; "
            f"use strategy 'pin' or 'copy')"
        )


def consume(bootstrap_servers: str, topic: str, partition: int, count: int,
            timeout: float = 10.0, cache_dir: Optional[Path] = None) -> List[Tuple[int, bytes]]:
    """Read ``count`` messages of ``topic``/``partition`` from the start: ``[(offset, payload)]``.

    A plain librdkafka consumer (the legacy API), to check what was produced.
    Gives up after ``timeout`` s without a new message (not ``timeout`` s in
    all: under a checker each call may be slow) and returns what it read.
    """
    module = load(cache_dir)
    ffi, lib = module.ffi, module.lib
    conf = lib.rd_kafka_conf_new()
    errstr = ffi.new("char[512]")
    for key, value in (("bootstrap.servers", bootstrap_servers), ("group.id", "pbkafka-check"),
                       ("enable.partition.eof", "false")):
        if lib.rd_kafka_conf_set(conf, key.encode(), value.encode(), errstr, 512) != lib.RD_KAFKA_CONF_OK:
            lib.rd_kafka_conf_destroy(conf)
            raise ProducerError(f"pbkafka: consumer config {key}: {ffi.string(errstr).decode()}")
    rk = lib.rd_kafka_new(lib.RD_KAFKA_CONSUMER, conf, errstr, 512)
    if rk == ffi.NULL:
        lib.rd_kafka_conf_destroy(conf)
        raise ProducerError(f"pbkafka: consumer: {ffi.string(errstr).decode()}")
    out: List[Tuple[int, bytes]] = []
    rkt = lib.rd_kafka_topic_new(rk, topic.encode(), ffi.NULL)
    try:
        if lib.rd_kafka_consume_start(rkt, partition, lib.RD_KAFKA_OFFSET_BEGINNING) != 0:
            raise ProducerError(f"pbkafka: consume_start: {_error(lib, ffi, lib.rd_kafka_last_error()).text}")
        deadline = time.monotonic() + timeout
        while len(out) < count and time.monotonic() < deadline:
            m = lib.rd_kafka_consume(rkt, partition, 100)
            if m == ffi.NULL:
                continue
            try:
                if m.err == 0:
                    out.append((int(m.offset), bytes(ffi.buffer(m.payload, m.len))))
                    deadline = time.monotonic() + timeout
            finally:
                lib.rd_kafka_message_destroy(m)
        lib.rd_kafka_consume_stop(rkt, partition)
    finally:
        lib.rd_kafka_topic_destroy(rkt)
        lib.rd_kafka_destroy(rk)
    return out


def _copy_into_one(payloads: Iterable[Payload]) -> ptrbridge.CBuffer:
    """One CBuffer holding the payloads back to back (one copy each)."""
    views = [memoryview(x).cast("B") for x in payloads]
    buf = ptrbridge.CBuffer(sum(v.nbytes for v in views))
    with memoryview(buf) as dst:
        at = 0
        for v in views:
            dst[at:at + v.nbytes] = v
            at += v.nbytes
    return buf
