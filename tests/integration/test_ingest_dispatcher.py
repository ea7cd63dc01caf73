"""Ingest through the dispatcher (server/ingest_queues.py) on the real server, Mosquitto and
SeaweedFS: many device clients publish heartbeats and QoS 1 update events quickly; every message is
counted (handled or coalesced, none dropped), each device ends with its latest heartbeat and its
last update, its lag is measured, and nothing is left unacknowledged at the broker."""

from __future__ import annotations

import threading
import time
import uuid

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

pytest.register_assert_rewrite("fleet_kit")
from fleet_kit import running_broker, server_settings, start_server, wait_for  # noqa: E402

from protocol import Channel, device_topic, encode_message  # noqa: E402
from protocol.messages import Heartbeat, StatusMessage, UpdateEvent  # noqa: E402
from server import metrics  # noqa: E402

pytestmark = pytest.mark.integration

DEVICES = 40
HEARTBEATS = 50  # per device: 2,000 in all
UPDATES = 5  # per device, QoS 1, interleaved with the heartbeats


def _buckets(cls: str) -> dict[float, float]:
    out = {}
    for family in metrics.INGEST_QUEUE_LAG.collect():
        for sample in family.samples:
            if sample.name.endswith("_bucket") and sample.labels.get("class") == cls:
                out[float(sample.labels["le"])] = sample.value
    return out


def _share_within(before: dict, after: dict, bound: float) -> tuple[float, float]:
    total = after[float("inf")] - before.get(float("inf"), 0)
    within = after[bound] - before.get(bound, 0)
    return within, total


def _device_client(creds: dict, host: str, port: int) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=creds["mqtt_username"], protocol=mqtt.MQTTv5)
    client.username_pw_set(creds["mqtt_username"], creds["mqtt_password"])
    connected = threading.Event()
    client.on_connect = lambda *_: connected.set()
    client.connect(host, port, keepalive=30)
    client.loop_start()
    assert connected.wait(10), "device did not connect"
    return client


@pytest.fixture
def mqtt_broker():
    """A broker of this test's own: the session broker keeps the server's persistent session (its
    client id is per process), which holds other tests' unacknowledged messages for the next server."""
    with running_broker("edgeloop-dispatcher-") as broker:
        yield broker


def test_thousands_of_heartbeats_from_many_devices_are_all_counted(mqtt_broker, seaweedfs, tmp_path, database_url):
    settings = server_settings(mqtt_broker, seaweedfs, tmp_path, database_url)
    lag_hb, lag_ev = _buckets("heartbeat"), _buckets("event")
    with start_server(settings) as server:
        dispatcher = server.app.state.ctx.ingest_dispatcher
        assert dispatcher is not None
        devices = []
        for i in range(DEVICES):
            response = server.post("/api/v1/devices", json={"device_id": f"hb-{uuid.uuid4().hex[:8]}-{i}"})
            assert response.status_code == 201, response.text
            devices.append(response.json())
        clients = [_device_client(d, mqtt_broker.host, mqtt_broker.port) for d in devices]
        start = dict(dispatcher.counts)
        try:
            infos = []
            for d, c in zip(devices, clients, strict=True):
                status = StatusMessage(device_id=d["device_id"], state="online", agent_version="t")
                infos.append(c.publish(device_topic(d["device_id"], Channel.STATUS), encode_message(status), qos=1))
            every = HEARTBEATS // UPDATES
            for n in range(HEARTBEATS):
                for d, c in zip(devices, clients, strict=True):
                    dev = d["device_id"]
                    hb = Heartbeat(device_id=dev, fps=10, latency_ms_p50=1, latency_ms_p99=2, frames_total=n,
                                   samples_sent=0, spool_depth=0, disk_free_bytes=1)
                    assert c.publish(device_topic(dev, Channel.HEARTBEAT), encode_message(hb), qos=0).rc == 0
                    if n % every == every - 1:
                        k = n // every
                        update = UpdateEvent(device_id=dev, update_id=f"u-{dev}", version=2, from_state=f"S{k}",
                                             to_state=f"S{k + 1}", event="next")
                        infos.append(c.publish(device_topic(dev, Channel.UPDATE), encode_message(update), qos=1))
                time.sleep(0.01)  # ~2,000 heartbeats/s offered while it lasts (bounded by the clients)
            for info in infos:
                info.wait_for_publish(10)
                assert info.is_published()

            def all_in() -> bool:
                c = dispatcher.counts
                heartbeats = (c["processed"] + c["coalesced"] + c["dropped"] + c["failed"]
                              - start["processed"] - start["coalesced"] - start["dropped"] - start["failed"])
                return heartbeats >= DEVICES * (HEARTBEATS + UPDATES + 1) and dispatcher.idle()

            wait_for("every message to be handled", all_in, timeout=60)
        finally:
            for c in clients:
                c.disconnect()
                c.loop_stop()

        got = {k: dispatcher.counts[k] - start[k] for k in dispatcher.counts}
        assert got["dropped"] == 0 and got["failed"] == 0 and got["refused"] == 0, got
        assert got["submitted"] == DEVICES * (HEARTBEATS + UPDATES + 1), got
        assert got["processed"] + got["coalesced"] == got["submitted"], got

        listing = {d["id"]: d for d in server.get("/api/v1/devices", params={"limit": 500}).json()["items"]}
        for d in devices:
            row = listing[d["device_id"]]
            assert row["heartbeat"]["frames_total"] == HEARTBEATS - 1, row
            assert row["update_state"] == f"S{UPDATES}", row  # the last update, so in order
            assert row["online"] is True
            assert row["agent_version"] == "t"

    # Lag is measured for what was handled (its figures are the benchmark's, benchmarks/ingest.py:
    # a wall-clock bound here would pass or fail with the machine's load, not the code).
    for cls, before in (("heartbeat", lag_hb), ("event", lag_ev)):
        _, total = _share_within(before, _buckets(cls), 1.0)
        assert total > 0, cls

    # Every QoS 1 message was acknowledged: a new server on the same broker session gets none again.
    settings2 = server_settings(mqtt_broker, seaweedfs, tmp_path / "again", database_url)
    with start_server(settings2) as server2:
        again = server2.app.state.ctx.ingest_dispatcher
        time.sleep(1.5)
        assert again.counts["submitted"] == 0, again.counts
