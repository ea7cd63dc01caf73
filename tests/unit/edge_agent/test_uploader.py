"""The uploader on a real spool with a fake server/object store (httpx MockTransport) and a fake
broker: an event only after its upload, strict capture order, pause-and-retry with backoff,
permanent refusals dropped and counted."""

from __future__ import annotations

import hashlib
import random
import threading
import time
from pathlib import Path

import httpx
import pytest

from edge_agent.spool import Spool
from edge_agent.uploader import Uploader
from protocol.api import upload_path

DEV = "cam-up"


class FakeStore:
    """The server's grant endpoint and the object store behind presigned URLs."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.store_up = True
        self.server_up = True
        self.grant_status = 200
        self.puts = 0

    def handler(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == upload_path(DEV):
            if not self.server_up:
                raise httpx.ConnectError("server down", request=request)
            if self.grant_status != 200:
                return httpx.Response(self.grant_status, text="no")
            body = __import__("json").loads(request.content)
            key = f"images/{DEV}/{body['sha256']}.jpg"
            return httpx.Response(200, json={"object_key": key, "url": f"http://s3.test/{key}",
                                             "expires_at": "2030-01-01T00:00:00Z", "headers": {}})
        if request.url.host == "s3.test" and request.method == "PUT":
            if not self.store_up:
                raise httpx.ConnectError("store down", request=request)
            self.puts += 1
            self.objects[request.url.path.lstrip("/")] = request.content
            return httpx.Response(200)
        return httpx.Response(404)


class FakeBroker:
    def __init__(self, store: FakeStore) -> None:
        self.up = True
        self.connected = True
        self.events = []
        self._store = store

    def publish_and_wait(self, message, timeout: float = 10.0) -> bool:
        if not self.up:
            return False
        self.events.append(message)
        return True


@pytest.fixture
def rig(tmp_path: Path):
    spool = Spool(tmp_path / "spool", max_bytes=10_000_000)
    store = FakeStore()
    broker = FakeBroker(store)
    http = httpx.Client(base_url="http://server.test", transport=httpx.MockTransport(store.handler))
    # A millisecond cap keeps the test fast; the backoff curve itself is tested on its own.
    up = Uploader(spool, http, DEV, broker, max_backoff=0.001, idle_poll=0.0, rng=random.Random(0))
    yield spool, store, broker, up
    spool.close()


def _put(spool: Spool, n: int, reason: str = "correction") -> str:
    data = f"jpeg-{n}".encode() * 10
    sid = f"{n:032x}"
    meta = {"sha256": hashlib.sha256(data).hexdigest(), "size_bytes": len(data), "width": 8, "height": 8,
            "reason": reason, "model_version": 1, "frame_id": f"f{n}", "predictions": [], "labels": []}
    assert spool.put(sid, data, "image/jpeg", meta)
    return sid


def _drain(up: Uploader, spool: Spool, steps: int = 200) -> None:
    for _ in range(steps):
        if not spool.depth():
            return
        up.step()
    raise AssertionError(f"spool not drained: {spool.depth()} left")


def test_each_sample_is_uploaded_then_announced_in_capture_order(rig) -> None:
    spool, store, broker, up = rig
    ids = [_put(spool, n) for n in (3, 1, 2)]
    _drain(up, spool)
    assert [e.sample_id for e in broker.events] == ids
    for event in broker.events:
        assert hashlib.sha256(store.objects[event.object_key]).hexdigest() == event.sha256
    assert spool.depth() == 0 and up.sent == 3
    assert spool.counters()["sent"] == 3


def test_no_event_is_sent_while_the_object_store_is_down(rig) -> None:
    spool, store, broker, up = rig
    first, second = _put(spool, 1), _put(spool, 2)
    store.store_up = False
    for _ in range(5):
        up.step()
    assert broker.events == []
    assert spool.next_due().state == "pending"
    assert up.last_error and "store down" in up.last_error
    store.store_up = True
    _drain(up, spool)
    assert [e.sample_id for e in broker.events] == [first, second]


def test_a_broker_outage_keeps_the_uploaded_object_and_only_re_sends_the_event(rig) -> None:
    spool, store, broker, up = rig
    sid = _put(spool, 1)
    broker.up = False
    up.step()
    item = spool.next_due(now=1e12)
    assert item.state == "uploaded" and item.object_key in store.objects
    assert store.puts == 1
    broker.up = True
    _drain(up, spool)
    assert store.puts == 1  # not uploaded again
    assert [e.sample_id for e in broker.events] == [sid]


def test_the_head_of_the_queue_is_retried_before_anything_newer(rig) -> None:
    spool, store, broker, up = rig
    a, b = _put(spool, 1), _put(spool, 2)
    store.store_up = False
    up.step()
    # The failed head's backoff is the whole drain's pause: when it is due again it is still first.
    due = spool.next_due(now=1e12)
    assert due.sample_id == a and due.attempts == 1
    store.store_up = True
    _drain(up, spool)
    assert [e.sample_id for e in broker.events] == [a, b]


def test_backoff_doubles_with_jitter_up_to_the_cap_and_resets_on_success(rig) -> None:
    spool, store, broker, _ = rig
    up = Uploader(spool, httpx.Client(base_url="http://server.test", transport=httpx.MockTransport(store.handler)),
                  DEV, broker, max_backoff=8.0, rng=random.Random(0))
    up._pause = lambda delay, wake_on_connect: None  # no sleeping here: only the chosen delays matter
    _put(spool, 1)
    store.server_up = False
    delays = []
    for _ in range(6):
        up.step()
        delays.append(spool.next_due(now=1e12).attempts and up.backoff())
        spool.mark_failed(f"{1:032x}", "", -1e6)  # due again at once
    ceilings = [1, 2, 4, 8, 8, 8]
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert ceiling * 0.5 <= delay <= ceiling
    assert len({round(d, 6) for d in delays[3:]}) == 3  # jittered, not in lock step
    store.server_up = True
    up.step()
    assert up._failures == 0 and spool.depth() == 0


@pytest.mark.parametrize("status", [400, 413, 422])
def test_a_sample_the_server_refuses_for_good_is_dropped_and_counted(rig, status) -> None:
    spool, store, broker, up = rig
    _put(spool, 1, reason="random")
    store.grant_status = status
    up.step()
    assert spool.depth() == 0
    assert spool.counters()["dropped.random"] == 1
    assert broker.events == [] and store.puts == 0


def test_metadata_that_cannot_make_an_event_is_dropped_without_uploading(rig) -> None:
    spool, store, broker, up = rig
    assert spool.put(f"{7:032x}", b"x", "image/jpeg", {"reason": "random", "sha256": "nothex"})
    up.step()
    assert spool.depth() == 0 and spool.counters()["dropped"] == 1
    assert store.puts == 0 and broker.events == []


def test_a_spooled_file_that_vanished_is_dropped(rig) -> None:
    spool, store, broker, up = rig
    sid = _put(spool, 1)
    spool.next_due().path.unlink()
    up.step()
    assert spool.depth() == 0 and spool.counters()["dropped"] == 1
    assert not spool.put(sid, b"again", "image/jpeg", {})


def test_server_errors_are_retried_not_dropped(rig) -> None:
    spool, store, broker, up = rig
    _put(spool, 1)
    store.grant_status = 503
    up.step()
    assert spool.depth() == 1 and "503" in up.last_error
    store.grant_status = 200
    _drain(up, spool)
    assert len(broker.events) == 1


def test_a_sample_over_the_protocol_size_limit_is_dropped(rig) -> None:
    from protocol.api import MAX_SAMPLE_BYTES

    spool, store, broker, up = rig
    meta = {"sha256": "a" * 64, "size_bytes": MAX_SAMPLE_BYTES + 1, "width": 8, "height": 8, "reason": "random"}
    assert spool.put(f"{9:032x}", b"x", "image/jpeg", meta)
    up.step()
    assert spool.depth() == 0 and spool.counters()["dropped.random"] == 1
    assert store.puts == 0 and broker.events == []


def test_the_pause_ends_early_when_the_broker_reconnects(rig) -> None:
    spool, store, broker, _ = rig
    up = Uploader(spool, httpx.Client(base_url="http://server.test", transport=httpx.MockTransport(store.handler)),
                  DEV, broker, max_backoff=3600.0, rng=random.Random(0))
    up._failures = 10  # deep into an outage: the next pause would be 5-10 minutes
    waits = []

    def wait(seconds: float) -> bool:
        waits.append(seconds)
        broker.up = broker.connected = True  # paho reconnected during the first slice
        return False

    up._stop.wait = wait
    sid = _put(spool, 1)
    broker.up = broker.connected = False
    up.step()
    assert waits == [0.5]  # one slice, not the whole backoff
    up.step()
    assert [e.sample_id for e in broker.events] == [sid]


def test_an_object_store_outage_waits_out_the_whole_pause(rig) -> None:
    spool, store, broker, _ = rig
    up = Uploader(spool, httpx.Client(base_url="http://server.test", transport=httpx.MockTransport(store.handler)),
                  DEV, broker, max_backoff=0.4, rng=random.Random(0))
    up._failures = 3
    waited = []
    up._stop.wait = lambda seconds: waited.append(seconds) or time.sleep(seconds) or False
    _put(spool, 1)
    store.store_up = False
    up.step()  # the broker is connected: only the clock ends this pause
    assert sum(waited) >= 0.2 and len(waited) >= 1 and broker.events == []


def test_an_unexpected_error_does_not_end_the_uploader_thread(rig, monkeypatch) -> None:
    spool, store, broker, up = rig
    calls = []
    real = spool.next_due

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OSError("disk I/O error")
        return real(*args, **kwargs)

    monkeypatch.setattr(spool, "next_due", flaky)
    monkeypatch.setattr(up._stop, "wait", lambda seconds: False)
    sid = _put(spool, 1)
    thread = threading.Thread(target=up._loop)
    thread.start()
    deadline = time.monotonic() + 30
    while spool.depth() and time.monotonic() < deadline:
        time.sleep(0.01)
    up._stop.set()
    thread.join(5)
    assert [e.sample_id for e in broker.events] == [sid]
