"""Device messages off paho's network thread: bounded queues per message class, workers behind them.

The MQTT network thread only calls :meth:`IngestDispatcher.submit`, which files the raw message
(topic, payload, QoS, an ``ack`` callback) and returns; decoding and every database write happen
on the dispatcher's own threads:

- **heartbeat**: coalesced per device (the latest wins; a superseded one is counted as
  ``coalesced``, not lost) and written in one transaction per ``flush_interval``.
- **event** (status, update, shadow): ``event_workers`` FIFO queues, a device always on the same
  one, so one device's update events and shadow reports are handled in the order they came. A
  worker takes what its queue holds (up to ``event_batch``) and handles it in one transaction,
  the rollout controller's record of each report included; the batch is acknowledged after the
  commit.
- **sample**: a pool of ``sample_workers`` threads validates (object read, header check, decode),
  each with its own queue and a device always on the same one (a device's samples are stored in the
  order they came, as the agent's spool sent them), and one writer stores the validated rows in one
  transaction per ``sample_flush_interval``; a sample is acknowledged after its row is committed.
- **drift**: one FIFO worker (the drift monitor scores per device, in order), which takes what its
  queue holds (up to ``event_batch``) and scores it in one transaction, like an event worker.

A slow sample therefore never delays a heartbeat or an update acknowledgement.

Back-pressure is explicit and counted (``server.metrics``):

- The bus runs paho with ``manual_ack``: a QoS 1 message is acknowledged to the broker only after
  its handler ran (or, for a coalesced heartbeat, after the newer one was written). A server that
  dies with messages in its queues has acknowledged none of them; the broker redelivers them.
- The bus lets the broker keep up to 65,535 unacknowledged messages with the server (MQTT v5
  Receive Maximum; Mosquitto's default is 20 and it drops what overflows its per-client queue).
- A QoS 1 message whose queue is full blocks the network thread until there is room: the broker
  (and TCP) hold what comes after it, heartbeats included, so a sustained sample overload delays
  heartbeats; a burst up to the queue bounds does not. Each wait is counted (``edgeloop_ingest_blocked_total``,
  ``..._blocked_seconds_total``).
- A QoS 0 message whose queue is full is dropped and counted
  (``edgeloop_ingest_dropped_total{reason="queue_full"}``), as is a heartbeat from a new device
  when ``max_pending_heartbeats`` devices are already waiting for the next flush.
- While stopping, QoS 1 messages are refused unacknowledged (``edgeloop_ingest_refused_total``,
  the broker redelivers them to the next session) and QoS 0 ones are dropped and counted.
- :meth:`stop` drains: every queued message is handled and acknowledged before it returns.

``edgeloop_ingest_lag_seconds{class}`` measures a message's own ``ts`` to the end of its handling
(for heartbeats: the commit of their batch).
"""

from __future__ import annotations

import queue
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog

from protocol.messages import SampleEvent
from protocol.topics import Channel, TopicError, parse_device_topic
from server import metrics

log = structlog.get_logger(__name__)

HEARTBEAT, EVENT, SAMPLE, DRIFT = "heartbeat", "event", "sample", "drift"
CLASSES = (HEARTBEAT, EVENT, SAMPLE, DRIFT)
CLASS_OF_CHANNEL: dict[Channel, str] = {
    Channel.HEARTBEAT: HEARTBEAT,
    Channel.STATUS: EVENT,
    Channel.UPDATE: EVENT,
    Channel.SHADOW: EVENT,
    Channel.SAMPLES: SAMPLE,
    Channel.DRIFT: DRIFT,
}
# Messages that set a device's online flag or its versions: a heartbeat received before the latest
# of them must not write those fields over what they set (see IngestDispatcher._flush_heartbeats).
_STATE_CHANNELS = (Channel.STATUS, Channel.UPDATE)

Ack = Callable[[], object]


@dataclass(frozen=True)
class DispatcherConfig:
    flush_interval: float = 0.5
    event_workers: int = 2
    event_batch: int = 200  # events per transaction, at most (a worker never waits to fill one)
    sample_workers: int = 4
    event_queue: int = 10_000
    sample_queue: int = 2_000
    drift_queue: int = 1_000
    max_pending_heartbeats: int = 100_000
    # How long one put waits before the wait is logged again (it keeps waiting: nothing is dropped).
    block_log_seconds: float = 5.0
    # Validated samples are written in one transaction per this interval (or per sample_batch rows).
    sample_flush_interval: float = 0.05
    sample_batch: int = 500


@dataclass(slots=True)
class _Item:
    topic: str
    payload: bytes
    qos: int
    ack: Ack | None
    seq: int
    device_id: str
    cls: str


@dataclass
class _Heartbeats:
    """Pending heartbeats: the latest per device, with the acks of the ones it superseded."""

    latest: dict[str, _Item] = field(default_factory=dict)
    acks: list[Ack] = field(default_factory=list)


_STOP = object()


class IngestDispatcher:
    """Sits between the MQTT bus and :class:`server.ingest.IngestService` (see the module doc)."""

    def __init__(self, ingest, config: DispatcherConfig | None = None,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self._ingest = ingest
        self.config = cfg = config or DispatcherConfig()
        if cfg.event_workers < 1 or cfg.sample_workers < 1 or cfg.flush_interval <= 0 or cfg.event_batch < 1:
            raise ValueError("the dispatcher needs at least one event and one sample worker, a positive "
                             "flush interval and event batches of at least one")
        self._clock = clock
        self._events = [queue.Queue(cfg.event_queue) for _ in range(cfg.event_workers)]
        # One queue per sample worker, a device always on the same one: its samples keep their order.
        self._samples = [queue.Queue(cfg.sample_queue) for _ in range(cfg.sample_workers)]
        self._drift: queue.Queue = queue.Queue(cfg.drift_queue)
        # Validated sample rows on their way to the writer (only with an ingest that can batch them).
        self._batch_samples = hasattr(ingest, "validate_sample") and hasattr(ingest, "store_samples")
        self._batch_events = hasattr(ingest, "handle_events")
        self._batch_drift = hasattr(ingest, "handle_drift")
        self._sample_rows: queue.Queue = queue.Queue(cfg.sample_queue)
        self._hb = _Heartbeats()
        self._hb_lock = threading.Lock()
        self._state_seq: dict[str, int] = {}  # device -> seq of its latest status/update message
        self._seq = 0  # only the network thread submits; the lock guards tests that submit from several
        self._submit_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._sample_threads: list[threading.Thread] = []  # stop() ends these before the writer
        self._accepting = False
        self._stopping = threading.Event()
        self._flushed = threading.Condition()
        self._pending = 0  # messages taken and not yet handled (queued, coalescing or being handled)
        self.counts: dict[str, int] = {k: 0 for k in ("submitted", "processed", "failed", "coalesced", "dropped",
                                                      "refused", "blocked")}
        self._counts_lock = threading.Lock()
        for cls in CLASSES:
            metrics.INGEST_QUEUE_DEPTH.labels(**{"class": cls}).set_function(lambda c=cls: self.depth(c))

    # ------------------------------------------------------------------ network thread

    def submit(self, topic: str, payload: bytes, qos: int = 0, ack: Ack | None = None) -> bool:
        """File one message; returns whether it was taken. Never raises for a bad message."""
        try:
            device_id, channel = parse_device_topic(topic)
            cls = CLASS_OF_CHANNEL[channel]
        except (TopicError, KeyError):
            # Let the synchronous path reject and count it exactly as it always did.
            self._ingest.handle(topic, payload)
            _call(ack)
            return False
        if not self._accepting:
            self._refuse(cls, qos, ack, "stopping")
            return False
        with self._submit_lock:
            self._seq += 1
            seq = self._seq
            if channel in _STATE_CHANNELS:
                self._state_seq[device_id] = seq
        item = _Item(topic, payload, qos, ack, seq, device_id, cls)
        self._count("submitted")
        if cls == HEARTBEAT:
            return self._put_heartbeat(item)
        shard = zlib.crc32(device_id.encode())
        target = (self._events[shard % len(self._events)] if cls == EVENT
                  else self._samples[shard % len(self._samples)] if cls == SAMPLE else self._drift)
        return self._put(target, item)

    def _put_heartbeat(self, item: _Item) -> bool:
        if self._put_heartbeat_now(item):
            return True
        if item.qos:
            # Rare (a flood of QoS 1 heartbeats from new devices): wait for the next flush.
            return self._block_until(lambda: self._put_heartbeat_now(item), item)
        self._drop(item, "heartbeat_buffer_full")
        return False

    def _put_heartbeat_now(self, item: _Item) -> bool:
        with self._hb_lock:
            previous = self._hb.latest.get(item.device_id)
            if previous is None:
                if len(self._hb.latest) >= self.config.max_pending_heartbeats:
                    return False
                self._outstanding(1)
            elif previous.ack is not None:
                self._hb.acks.append(previous.ack)
            self._hb.latest[item.device_id] = item
        if previous is not None:
            self._count("coalesced")
            metrics.INGEST_COALESCED.inc()
        return True

    def _put(self, target: queue.Queue, item: _Item) -> bool:
        self._outstanding(1)
        try:
            target.put_nowait(item)
            return True
        except queue.Full:
            pass
        if not item.qos:
            self._outstanding(-1)
            self._drop(item, "queue_full")
            return False

        def attempt() -> bool:
            try:
                target.put(item, timeout=0.2)
                return True
            except queue.Full:
                if self._stopping.is_set():
                    self._outstanding(-1)
                return False

        return self._block_until(attempt, item)

    def _block_until(self, attempt: Callable[[], bool], item: _Item) -> bool:
        """Hold the network thread (and so the broker's stream) until ``attempt`` succeeds."""
        labels = {"class": item.cls}
        self._count("blocked")
        metrics.INGEST_BLOCKED.labels(**labels).inc()
        started = last_log = time.monotonic()
        try:
            while True:
                if attempt():
                    return True
                if self._stopping.is_set():
                    self._refuse(item.cls, item.qos, item.ack, "stopping")
                    return False
                now = time.monotonic()
                if now - last_log >= self.config.block_log_seconds:
                    last_log = now
                    log.warning("ingest.backpressure", cls=item.cls, waited_s=round(now - started, 1),
                                depth=self.depth(item.cls))
                if item.cls == HEARTBEAT:
                    time.sleep(min(0.05, self.config.flush_interval))
        finally:
            metrics.INGEST_BLOCKED_SECONDS.labels(**labels).inc(time.monotonic() - started)

    def _drop(self, item: _Item, reason: str) -> None:
        self._count("dropped")
        metrics.INGEST_DROPPED.labels(**{"class": item.cls, "reason": reason}).inc()
        log.warning("ingest.dropped", cls=item.cls, reason=reason, device=item.device_id)
        _call(item.ack)

    def _refuse(self, cls: str, qos: int, ack: Ack | None, reason: str) -> None:
        if qos:
            # Not acknowledged: the broker keeps it in the session and delivers it again.
            self._count("refused")
            metrics.INGEST_REFUSED.labels(**{"class": cls, "reason": reason}).inc()
        else:
            self._count("dropped")
            metrics.INGEST_DROPPED.labels(**{"class": cls, "reason": reason}).inc()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._threads:
            return
        self._stopping.clear()
        self._accepting = True
        events = self._work_batches if self._batch_events else self._work
        specs = [(f"ingest-event-{i}", events, q, EVENT) for i, q in enumerate(self._events)]
        specs += [(f"ingest-sample-{i}", self._work, q, SAMPLE) for i, q in enumerate(self._samples)]
        specs += [("ingest-drift", self._work_batches if self._batch_drift else self._work, self._drift, DRIFT)]
        for name, target, q, cls in specs:
            thread = threading.Thread(target=target, args=(q, cls), name=name, daemon=True)
            self._threads.append(thread)
            if cls == SAMPLE:
                self._sample_threads.append(thread)
        if self._batch_samples:
            self._threads.append(threading.Thread(target=self._write_samples, name="ingest-writer",
                                                  daemon=True))
        self._threads.append(threading.Thread(target=self._flush_loop, name="ingest-heartbeats", daemon=True))
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 30.0) -> dict[str, int]:
        """Stop taking messages, handle (and acknowledge) everything queued, then end the workers."""
        self._accepting = False
        self._stopping.set()
        deadline = time.monotonic() + timeout
        for q in self._events:
            _put_stop(q, deadline)
        for q in self._samples:
            _put_stop(q, deadline)
        _put_stop(self._drift, deadline)
        # The sample workers only: the writer gets its stop after them (waiting for it here would
        # wait out the whole timeout).
        for thread in self._sample_threads:  # validated rows are all with the writer once these end
            thread.join(max(0.0, deadline - time.monotonic()))
        if self._batch_samples:
            _put_stop(self._sample_rows, deadline)
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        left = {cls: self.depth(cls) for cls in CLASSES}
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive or any(left.values()):
            log.warning("ingest.stop_incomplete", left=left, threads=alive)
        self._threads, self._sample_threads = [], []
        return left

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait until every message submitted so far is handled (heartbeats flushed); for tests and
        benchmarks. Returns whether that happened within ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.idle():
                return True
            with self._flushed:
                self._flushed.wait(0.02)
        return self.idle()

    def idle(self) -> bool:
        with self._counts_lock:
            return self._pending == 0

    def depth(self, cls: str) -> int:
        if cls == HEARTBEAT:
            return len(self._hb.latest)
        if cls == EVENT:
            return sum(q.qsize() for q in self._events)
        if cls == SAMPLE:
            return sum(q.qsize() for q in self._samples) + self._sample_rows.qsize()
        return self._drift.qsize()

    def stats(self) -> dict[str, object]:
        with self._counts_lock:
            counts = dict(self.counts)
        return {**counts, "depth": {cls: self.depth(cls) for cls in CLASSES}}

    # ------------------------------------------------------------------ workers

    def _work(self, q: queue.Queue, cls: str) -> None:
        while True:
            item = q.get()
            if item is _STOP:
                return
            done = True
            try:
                done = self._handle(item)
            finally:
                if done:
                    self._outstanding(-1)
                    self._notify()

    def _work_batches(self, q: queue.Queue, cls: str) -> None:
        """Whatever the queue holds, up to ``event_batch``, in one transaction (never waits to fill
        one): events through ``handle_events``, drift windows through ``handle_drift``."""
        handle = self._ingest.handle_events if cls == EVENT else self._ingest.handle_drift
        stopping = False
        while not stopping:
            first = q.get()
            if first is _STOP:
                return
            batch = [first]
            while len(batch) < self.config.event_batch:
                try:
                    item = q.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                batch.append(item)
            outcome, messages = "ok", []
            try:
                messages = [m for m in handle([(i.topic, i.payload) for i in batch]) if m is not None]
            except Exception:  # one bad batch must not end the worker
                outcome = "failed"
                log.exception("ingest.handler_failed", cls=cls, messages=len(batch))
            finally:
                _call_all([item.ack for item in batch if item.ack is not None])
                if cls == EVENT:
                    metrics.INGEST_EVENT_BATCH_SIZE.observe(len(batch))
                self._finished(cls, outcome, messages, count=len(batch))
                self._outstanding(-len(batch))
                self._notify()

    def _handle(self, item: _Item) -> bool:
        """Handle one message; False when it went on to the sample writer (which finishes it)."""
        if item.cls == SAMPLE and self._batch_samples:
            try:
                message = self._ingest.decode(item.topic, item.payload)
                row = self._ingest.validate_sample(message) if isinstance(message, SampleEvent) else None
            except Exception:
                log.exception("ingest.sample_validation_failed", topic=item.topic)
                _call(item.ack)
                self._finished(item.cls, "failed", [])
                return True
            if row is not None:
                self._sample_rows.put((item, message, row))  # bounded: waits while the writer is behind
                return False
            if message is not None and not isinstance(message, SampleEvent):
                return self._handle_one(item)  # not a sample after all: let the ordinary path refuse it
            _call(item.ack)  # refused by the protocol, or stored already (a redelivery)
            self._finished(item.cls, "ok", [message] if message is not None else [])
            return True
        return self._handle_one(item)

    def _handle_one(self, item: _Item) -> bool:
        outcome = "ok"
        message = None
        try:
            message = self._ingest.handle(item.topic, item.payload)
        except Exception:  # one bad message must not end the worker
            outcome = "failed"
            log.exception("ingest.handler_failed", topic=item.topic)
        finally:
            _call(item.ack)
        self._finished(item.cls, outcome, [message] if message is not None else [])
        return True

    def _write_samples(self) -> None:
        """Validated sample rows, written in one transaction per interval; acked after the commit."""
        stopping = False
        while not stopping:
            first = self._sample_rows.get()
            if first is _STOP:
                return
            batch = [first]
            deadline = time.monotonic() + self.config.sample_flush_interval
            while len(batch) < self.config.sample_batch:
                try:
                    entry = self._sample_rows.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if entry is _STOP:
                    stopping = True
                    break
                batch.append(entry)
            outcome = "ok"
            try:
                self._ingest.store_samples([row for _, _, row in batch])
            except Exception:
                outcome = "failed"
                log.exception("ingest.sample_write_failed", samples=len(batch))
            finally:
                _call_all([item.ack for item, _, _ in batch if item.ack is not None])
                self._finished(SAMPLE, outcome, [message for _, message, _ in batch], count=len(batch))
                self._outstanding(-len(batch))
                self._notify()

    def _flush_loop(self) -> None:
        while True:
            stopping = self._stopping.wait(self.config.flush_interval)
            self._flush_heartbeats()
            if stopping and not self._hb.latest:
                return

    def _take_heartbeats(self) -> tuple[list[_Item], list[Ack]]:
        with self._hb_lock:
            batch, self._hb = self._hb, _Heartbeats()
        return list(batch.latest.values()), batch.acks

    def _flush_heartbeats(self) -> None:
        items, acks = self._take_heartbeats()
        if not items:
            _call_all(acks)
            return
        try:
            decoded = []
            for item in items:
                message = self._ingest.decode(item.topic, item.payload)
                if message is None:
                    continue
                # A status or update message that came after this heartbeat set online/versions already.
                decoded.append((message, item.seq > self._state_seq.get(item.device_id, 0)))
            outcome = "ok"
            try:
                if decoded:
                    self._ingest.write_heartbeats(decoded)
            except Exception:
                outcome = "failed"
                log.exception("ingest.heartbeat_flush_failed", heartbeats=len(decoded))
                metrics.INGEST_DROPPED.labels(**{"class": HEARTBEAT, "reason": "write_failed"}).inc(len(decoded))
            metrics.INGEST_BATCH_SIZE.observe(len(decoded))
            self._finished(HEARTBEAT, outcome, [m for m, _ in decoded], count=len(items))
        finally:
            _call_all(acks + [i.ack for i in items if i.ack is not None])
            self._outstanding(-len(items))
            self._notify()

    def _finished(self, cls: str, outcome: str, messages: list, count: int = 1) -> None:
        now = self._clock()
        lag = metrics.INGEST_QUEUE_LAG.labels(**{"class": cls})
        for message in messages:
            sent = message.ts if message.ts.tzinfo else message.ts.replace(tzinfo=UTC)
            lag.observe(max(0.0, (now - sent).total_seconds()))
        metrics.INGEST_PROCESSED.labels(**{"class": cls, "outcome": outcome}).inc(count)
        self._count("processed" if outcome == "ok" else "failed", count)

    def _outstanding(self, n: int) -> None:
        with self._counts_lock:
            self._pending += n

    def _count(self, key: str, n: int = 1) -> None:
        with self._counts_lock:
            self.counts[key] += n

    def _notify(self) -> None:
        with self._flushed:
            self._flushed.notify_all()


def _put_stop(q: queue.Queue, deadline: float) -> None:
    try:
        q.put(_STOP, timeout=max(0.01, deadline - time.monotonic()))
    except queue.Full:
        log.warning("ingest.stop_queue_full")


def _call(ack: Ack | None) -> None:
    if ack is None:
        return
    try:
        ack()
    except Exception:
        log.exception("ingest.ack_failed")


def _call_all(acks: list[Ack]) -> None:
    for ack in acks:
        _call(ack)
