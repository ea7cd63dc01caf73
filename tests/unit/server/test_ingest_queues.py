"""The ingest dispatcher (server/ingest_queues.py) in front of a fake IngestService, and the batched
heartbeat write of the real IngestService on SQLite."""

from __future__ import annotations

import random
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

from protocol import decode_message, device_topic, encode_message
from protocol.messages import Heartbeat, SampleEvent, StatusMessage, UpdateEvent, channel_of
from server import metrics
from server.db.models import Base, Device
from server.ingest import IngestService
from server.ingest_queues import DispatcherConfig, IngestDispatcher
from server.sample_validation import ImageLimits


def _hb(device: str, n: int, **kw) -> Heartbeat:
    return Heartbeat(device_id=device, fps=10, latency_ms_p50=1, latency_ms_p99=2, frames_total=n, samples_sent=0,
                     spool_depth=0, disk_free_bytes=1, **kw)


def _update(device: str, n: int) -> UpdateEvent:
    return UpdateEvent(device_id=device, update_id="u1", version=2, from_state=f"S{n}", to_state=f"S{n + 1}",
                       event="next")


def _sample(device: str) -> SampleEvent:
    return SampleEvent(device_id=device, sample_id=uuid.uuid4().hex, object_key=f"images/{device}/x.jpg",
                       sha256="a" * 64, size_bytes=10, width=8, height=8, reason="correction")


def _wire(message) -> tuple[str, bytes]:
    return device_topic(message.device_id, channel_of(message)), encode_message(message)


class FakeIngest:
    """The IngestService surface the dispatcher uses; records what it was given, on which thread."""

    def __init__(self) -> None:
        self.handled: list = []
        self.batches: list[list[tuple[Heartbeat, bool]]] = []
        self.lock = threading.Lock()
        self.sample_gate = threading.Event()
        self.sample_gate.set()
        self.event_delay = 0.0
        self.sample_jitter = 0.0

    def decode(self, topic, payload):
        try:
            return decode_message(topic, payload)
        except Exception:
            return None

    def handle(self, topic, payload):
        message = self.decode(topic, payload)
        if isinstance(message, SampleEvent):
            assert self.sample_gate.wait(30)
            time.sleep(self.sample_jitter * random.random())  # validation times differ sample by sample
        elif self.event_delay:
            time.sleep(self.event_delay)
        with self.lock:
            self.handled.append((message, time.monotonic(), threading.current_thread().name))
        return message

    def write_heartbeats(self, batch):
        with self.lock:
            self.batches.append(list(batch))
        return len(batch)


class Acks:
    def __init__(self) -> None:
        self.done: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, name: str):
        def ack() -> None:
            with self.lock:
                self.done.append(name)
        return ack


@pytest.fixture
def fake():
    return FakeIngest()


def _dispatcher(fake, **kw) -> IngestDispatcher:
    d = IngestDispatcher(fake, DispatcherConfig(**kw))
    d.start()
    return d


def test_heartbeats_coalesce_to_the_latest_per_device_in_one_batch(fake):
    d = _dispatcher(fake, flush_interval=60)  # nothing flushes until stop
    before = metrics.INGEST_COALESCED._value.get()
    for n in range(5):
        assert d.submit(*_wire(_hb("cam-a", n)))
    for n in range(3):
        assert d.submit(*_wire(_hb("cam-b", n)))
    assert d.depth("heartbeat") == 2
    assert d.stop(5) == {"heartbeat": 0, "event": 0, "sample": 0, "drift": 0}
    assert len(fake.batches) == 1
    latest = {m.device_id: m.frames_total for m, _ in fake.batches[0]}
    assert latest == {"cam-a": 4, "cam-b": 2}
    assert d.counts["coalesced"] == 6 and d.counts["processed"] == 2 and d.counts["submitted"] == 8
    assert d.counts["dropped"] == 0
    assert metrics.INGEST_COALESCED._value.get() - before == 6


def test_heartbeats_flush_once_per_interval(fake):
    d = _dispatcher(fake, flush_interval=0.1)
    try:
        for i in range(50):
            d.submit(*_wire(_hb(f"cam-{i}", 0)))
        assert d.drain(5)
        assert sum(len(b) for b in fake.batches) == 50
        assert len(fake.batches) <= 2  # 50 quick submits: one interval, at most split across two
    finally:
        d.stop(5)


def test_heartbeat_older_than_a_status_or_update_does_not_set_the_device_state(fake):
    d = _dispatcher(fake, flush_interval=60)
    d.submit(*_wire(_hb("cam-a", 1)))
    d.submit(*_wire(StatusMessage(device_id="cam-a", state="offline")))  # last will after the heartbeat
    d.submit(*_wire(_update("cam-b", 1)))
    d.submit(*_wire(_hb("cam-b", 1)))  # after the update: applies
    d.stop(5)
    applied = {m.device_id: apply for m, apply in fake.batches[0]}
    assert applied == {"cam-a": False, "cam-b": True}


def test_events_of_one_device_stay_in_order_across_workers(fake):
    fake.event_delay = 0.001
    d = _dispatcher(fake, event_workers=3)
    devices = [f"cam-{i}" for i in range(6)]
    for n in range(20):
        for dev in devices:
            d.submit(*_wire(_update(dev, n)), qos=1)
    assert d.drain(20)
    d.stop(5)
    seen: dict[str, list[int]] = {}
    threads: dict[str, set[str]] = {}
    for message, _, thread in fake.handled:
        seen.setdefault(message.device_id, []).append(int(message.from_state[1:]))
        threads.setdefault(message.device_id, set()).add(thread)
    assert all(order == list(range(20)) for order in seen.values()), seen
    assert all(len(t) == 1 for t in threads.values())  # a device always on the same worker
    assert len(set().union(*threads.values())) > 1  # and the devices spread over several


def test_qos1_is_acknowledged_only_after_it_was_handled(fake):
    fake.sample_gate.clear()
    acks = Acks()
    d = _dispatcher(fake, sample_workers=1)
    try:
        d.submit(*_wire(_sample("cam-a")), qos=1, ack=acks("s1"))
        time.sleep(0.2)
        assert acks.done == []  # still being validated
        fake.sample_gate.set()
        assert d.drain(5)
        assert acks.done == ["s1"]
    finally:
        fake.sample_gate.set()
        d.stop(5)


def test_a_full_queue_blocks_qos1_counted_and_drops_qos0_counted(fake):
    fake.sample_gate.clear()
    acks = Acks()
    d = _dispatcher(fake, sample_workers=1, sample_queue=2)
    blocked_before = metrics.INGEST_BLOCKED.labels(**{"class": "sample"})._value.get()
    dropped_before = metrics.INGEST_DROPPED.labels(**{"class": "sample", "reason": "queue_full"})._value.get()
    try:
        assert d.submit(*_wire(_sample("cam-a")), qos=1, ack=acks("s0"))
        deadline = time.monotonic() + 5
        while d.depth("sample") and time.monotonic() < deadline:  # the worker took it and hangs on it
            time.sleep(0.01)
        for i in (1, 2):  # two queued: full
            assert d.submit(*_wire(_sample("cam-a")), qos=1, ack=acks(f"s{i}"))
        assert d.depth("sample") == 2
        # QoS 0 into the full queue: dropped at once, counted.
        assert not d.submit(*_wire(_sample("cam-a")), qos=0)
        # QoS 1 into the full queue: the "network thread" waits for room.
        result: list[bool] = []
        network = threading.Thread(target=lambda: result.append(
            d.submit(*_wire(_sample("cam-a")), qos=1, ack=acks("s3"))))
        network.start()
        time.sleep(0.5)
        assert network.is_alive() and result == []
        assert metrics.INGEST_BLOCKED.labels(**{"class": "sample"})._value.get() - blocked_before == 1
        fake.sample_gate.set()
        network.join(5)
        assert result == [True]
        assert d.drain(5)
        assert sorted(acks.done) == ["s0", "s1", "s2", "s3"]
        assert d.counts["blocked"] == 1 and d.counts["dropped"] == 1 and d.counts["processed"] == 4
        assert (metrics.INGEST_DROPPED.labels(**{"class": "sample", "reason": "queue_full"})._value.get()
                - dropped_before) == 1
        assert metrics.INGEST_BLOCKED_SECONDS.labels(**{"class": "sample"})._value.get() > 0.4
    finally:
        fake.sample_gate.set()
        d.stop(5)


def test_a_slow_sample_does_not_delay_heartbeats_or_update_events(fake):
    fake.sample_gate.clear()  # every sample validation hangs until released
    d = _dispatcher(fake, flush_interval=0.05, sample_workers=2)
    try:
        for _ in range(4):
            d.submit(*_wire(_sample("cam-s")), qos=1)
        start = time.monotonic()
        for n in range(20):
            d.submit(*_wire(_hb(f"cam-{n}", n)))
            d.submit(*_wire(_update(f"cam-{n}", 0)), qos=1)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            updates = [h for h in fake.handled if isinstance(h[0], UpdateEvent)]
            if len(updates) == 20 and sum(len(b) for b in fake.batches) == 20:
                break
            time.sleep(0.01)
        assert len(updates) == 20 and sum(len(b) for b in fake.batches) == 20
        assert time.monotonic() - start < 1.0
        assert not any(isinstance(h[0], SampleEvent) for h in fake.handled)  # still stuck
        assert d.depth("sample") == 3  # one device: one worker holds the first, its queue the rest
    finally:
        fake.sample_gate.set()
        d.stop(5)
    assert sum(isinstance(h[0], SampleEvent) for h in fake.handled) == 4


def test_one_device_s_samples_are_handled_in_the_order_they_came(fake):
    fake.sample_jitter = 0.003
    d = _dispatcher(fake, flush_interval=0.05, sample_workers=4)
    sent: dict[str, list[str]] = {"cam-0": [], "cam-1": []}
    for n in range(80):
        sample = _sample(f"cam-{n % 2}")
        sent[sample.device_id].append(sample.sample_id)
        d.submit(*_wire(sample), qos=1)
    d.stop(10)
    for device, ids in sent.items():
        handled = [m.sample_id for m, _, _ in fake.handled if isinstance(m, SampleEvent) and m.device_id == device]
        assert handled == ids, f"{device}'s samples were reordered"


def test_stop_drains_every_queue_then_refuses(fake):
    fake.event_delay = 0.002
    acks = Acks()
    d = _dispatcher(fake, flush_interval=60, event_workers=2, sample_workers=2)
    for n in range(100):
        d.submit(*_wire(_update(f"cam-{n % 7}", n)), qos=1, ack=acks(f"u{n}"))
    for n in range(30):
        d.submit(*_wire(_sample(f"cam-{n % 3}")), qos=1, ack=acks(f"s{n}"))
        d.submit(*_wire(_hb(f"cam-{n}", n)))
    left = d.stop(10)
    assert left == {"heartbeat": 0, "event": 0, "sample": 0, "drift": 0}
    assert len(fake.handled) == 130 and sum(len(b) for b in fake.batches) == 30
    assert len(acks.done) == 130
    refused_before = metrics.INGEST_REFUSED.labels(**{"class": "event", "reason": "stopping"})._value.get()
    # After stop: QoS 1 is refused without an ack (the broker delivers it again), QoS 0 dropped, both counted.
    assert not d.submit(*_wire(_update("cam-1", 999)), qos=1, ack=acks("late"))
    assert not d.submit(*_wire(_hb("cam-1", 999)))
    assert "late" not in acks.done
    assert d.counts["refused"] == 1 and d.counts["dropped"] == 1
    assert metrics.INGEST_REFUSED.labels(**{"class": "event", "reason": "stopping"})._value.get() == refused_before + 1


def test_stop_of_an_idle_dispatcher_does_not_wait_out_its_timeout():
    # The sample writer gets its stop only after the sample workers ended: stop() once counted the
    # writer among those workers and waited its whole timeout for it (every server took 30 s to stop).
    class Batching(FakeIngest):  # the real service's shape: samples validated, then written in batches
        def validate_sample(self, event):
            return event

        def store_samples(self, rows):
            return list(rows)

    d = _dispatcher(Batching(), flush_interval=60, sample_workers=2)
    assert any(t.name.endswith("writer") for t in d._threads)
    threads = list(d._threads)
    result = []
    stopper = threading.Thread(target=lambda: result.append(d.stop(120)))
    stopper.start()
    stopper.join(30)  # a deadlock detector, not a speed bound: stop() needs milliseconds here
    assert not stopper.is_alive()
    assert result == [{"heartbeat": 0, "event": 0, "sample": 0, "drift": 0}]
    assert not [t.name for t in threads if t.is_alive()]


def test_lag_is_measured_from_the_message_timestamp(fake):
    now = datetime(2030, 1, 1, tzinfo=UTC)
    d = IngestDispatcher(fake, DispatcherConfig(flush_interval=60), clock=lambda: now)
    d.start()
    hist = metrics.INGEST_QUEUE_LAG.labels(**{"class": "event"})
    before = hist._sum.get()
    d.submit(*_wire(UpdateEvent(device_id="cam-a", update_id="u", version=1, from_state="A", to_state="B",
                                event="e", ts=now - timedelta(seconds=2))), qos=1)
    d.stop(5)
    assert hist._sum.get() - before == pytest.approx(2.0)


def test_a_bad_topic_goes_to_the_synchronous_path_and_is_acknowledged(fake):
    acks = Acks()
    d = _dispatcher(fake)
    try:
        assert not d.submit("elsewhere/x", b"{}", qos=1, ack=acks("bad"))
        assert acks.done == ["bad"]
        assert fake.handled[0][0] is None
    finally:
        d.stop(5)


# ---------------------------------------------------------------- the real batched write


@pytest.fixture
def service(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'ingest.db'}", connect_args={"check_same_thread": False})
    Base.metadata.create_all(engine)
    sessions = sessionmaker(engine, expire_on_commit=False)
    with sessions() as session:
        session.add_all([Device(id="cam-a", online=False, active_version=1),
                         Device(id="cam-b", online=False, active_version=1)])
        session.commit()
    yield IngestService(sessions, None, [], ImageLimits(max_bytes=1 << 20, max_side=4096), 1000,
                        on_threshold=lambda n: None), sessions
    engine.dispose()


def test_write_heartbeats_updates_known_devices_in_one_transaction(service):
    ingest, sessions = service
    written = ingest.write_heartbeats([
        (_hb("cam-a", 7, active_version=2, candidate_version=3), True),
        (_hb("cam-b", 8, active_version=5), False),  # a later status/update owns online and versions
        (_hb("cam-unknown", 9), True),
    ])
    assert written == 2
    with sessions() as session:
        a, b = session.get(Device, "cam-a"), session.get(Device, "cam-b")
        assert (a.online, a.active_version, a.candidate_version) == (True, 2, 3)
        assert a.last_heartbeat["frames_total"] == 7 and a.last_seen is not None
        assert (b.online, b.active_version) == (False, 1)
        assert b.last_heartbeat["frames_total"] == 8 and b.last_seen is not None
        assert session.get(Device, "cam-unknown") is None


def test_dispatcher_in_front_of_the_real_service(service):
    ingest, sessions = service
    d = IngestDispatcher(ingest, DispatcherConfig(flush_interval=0.05))
    d.start()
    try:
        d.submit(*_wire(StatusMessage(device_id="cam-a", state="online", active_version=4)), qos=1)
        for n in range(10):
            d.submit(*_wire(_hb("cam-b", n, active_version=6)))
        assert d.drain(5)
    finally:
        d.stop(5)
    with sessions() as session:
        a, b = session.get(Device, "cam-a"), session.get(Device, "cam-b")
        assert (a.online, a.active_version) == (True, 4)
        assert (b.online, b.active_version, b.last_heartbeat["frames_total"]) == (True, 6, 9)


class _Recorder:
    """The rollout controller's side of ingest: records each report in ingest's session; can fail."""

    def __init__(self, poison: str | None = None) -> None:
        self.recorded: list[tuple[str, str]] = []
        self.nudges = 0
        self.poison = poison

    def record(self, session, messages) -> None:
        assert session.in_transaction()
        for message in messages:
            if isinstance(message, UpdateEvent) and message.to_state == self.poison:
                raise RuntimeError("poisoned report")
            self.recorded.append((message.device_id, getattr(message, "to_state", message.type)))

    def nudge(self) -> None:
        self.nudges += 1


def _commits(sessions) -> list[int]:
    from sqlalchemy import event

    commits = []
    event.listen(sessions.kw["bind"], "commit", lambda conn: commits.append(1))
    return commits


def test_events_are_handled_in_batches_of_one_transaction_in_order(service):
    ingest, sessions = service
    ingest.rollouts = recorder = _Recorder()
    d = IngestDispatcher(ingest, DispatcherConfig(event_workers=1, event_batch=50))
    acks = Acks()
    gate = threading.Event()
    # Hold the worker in its first batch so the rest queue up behind it, as under load.
    real = ingest.handle_events
    ingest.handle_events = lambda items: (gate.wait(5), real(items))[1]
    d.start()
    try:
        commits = _commits(sessions)
        for n in range(120):
            d.submit(*_wire(_update("cam-a" if n % 2 else "cam-b", n)), qos=1, ack=acks(f"u{n}"))
        time.sleep(0.2)
        assert not acks.done  # nothing acknowledged before its transaction committed
        gate.set()
        assert d.drain(10)
    finally:
        d.stop(5)
    assert len(acks.done) == 120
    # 120 events in at most 4 transactions (the first alone, then up to 50 a batch), not 120.
    assert 3 <= len(commits) <= 4
    for device in ("cam-a", "cam-b"):
        states = [s for dev, s in recorder.recorded if dev == device]
        assert states == sorted(states, key=lambda s: int(s[1:])) and len(states) == 60
    with sessions() as session:
        assert session.get(Device, "cam-a").update_state == "S120"
        assert session.get(Device, "cam-b").update_state == "S119"
    assert recorder.nudges == len(commits)


def test_a_bad_event_in_a_batch_costs_only_itself(service):
    ingest, sessions = service
    ingest.rollouts = recorder = _Recorder(poison="S4")
    messages = [_update("cam-a", n) for n in range(6)] + [_update("cam-b", 0)]
    decoded = ingest.handle_events([_wire(m) for m in messages])
    assert [m.to_state for m in decoded] == [m.to_state for m in messages]
    # The batch failed on S3 -> S4; each message was then handled alone: all but that one landed.
    assert [s for _, s in recorder.recorded[-6:]] == ["S1", "S2", "S3", "S5", "S6", "S1"]
    with sessions() as session:
        assert session.get(Device, "cam-a").update_state == "S6"
        assert session.get(Device, "cam-b").update_state == "S1"


class _Store:
    """ObjectStore's get_bytes over a dict, with its refusals."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects

    def get_bytes(self, key, max_bytes=None):
        from server.objectstore import ObjectNotFoundError, ObjectTooLargeError

        if key not in self.objects:
            raise ObjectNotFoundError(f"{key} does not exist", code="NoSuchKey")
        if max_bytes is not None and len(self.objects[key]) > max_bytes:
            raise ObjectTooLargeError(f"{key} is more than {max_bytes} bytes")
        return self.objects[key]


def test_samples_are_validated_in_parallel_and_written_in_batches(tmp_path):
    import hashlib

    import cv2
    import numpy as np

    from server.db.models import Sample

    engine = create_engine(f"sqlite:///{tmp_path / 'samples.db'}", connect_args={"check_same_thread": False})
    Base.metadata.create_all(engine)
    sessions = sessionmaker(engine, expire_on_commit=False)
    with sessions() as session:
        session.add(Device(id="cam-a"))
        session.commit()
    data = cv2.imencode(".jpg", np.full((64, 64, 3), 127, np.uint8))[1].tobytes()
    sha = hashlib.sha256(data).hexdigest()
    key = f"images/cam-a/{sha}.jpg"
    triggered: list[int] = []
    ingest = IngestService(sessions, _Store({key: data}), ["a", "b"], ImageLimits(max_bytes=1 << 20, max_side=4096),
                           40, on_threshold=triggered.append)
    transactions: list[int] = []
    store_samples = ingest.store_samples
    ingest.store_samples = lambda rows: transactions.append(len(rows)) or store_samples(rows)
    acks = Acks()
    d = IngestDispatcher(ingest, DispatcherConfig(sample_workers=4))
    d.start()
    events = [SampleEvent(device_id="cam-a", sample_id=uuid.uuid4().hex, object_key=key, sha256=sha,
                          size_bytes=len(data), width=64, height=64, reason="correction",
                          labels=[{"cls": 1, "cx": .5, "cy": .5, "w": .2, "h": .2}]) for _ in range(50)]
    bad = SampleEvent(device_id="cam-a", sample_id=uuid.uuid4().hex, object_key="images/cam-a/missing.jpg",
                      sha256=sha, size_bytes=len(data), width=64, height=64, reason="correction", labels=[])
    try:
        for i, event in enumerate([*events, bad]):
            d.submit(*_wire(event), qos=1, ack=acks(f"s{i}"))
        assert d.drain(15)
        d.submit(*_wire(events[0]), qos=1, ack=acks("again"))  # a redelivery: stored once, acked
        assert d.drain(5)
    finally:
        d.stop(5)
    assert len(acks.done) == 52
    assert sum(transactions) == 51 and len(transactions) < 51
    with sessions() as session:
        statuses = [s.status for s in session.query(Sample)]
    assert statuses.count("validated") == 50 and statuses.count("rejected") == 1
    assert triggered and triggered[-1] >= 40
    engine.dispose()
