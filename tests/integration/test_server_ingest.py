"""The server against real Mosquitto, SeaweedFS and SQLite: enrollment, presigned uploads,
MQTT ingest with validation, and role checks."""

from __future__ import annotations

import hashlib
import time
import uuid

import cv2
import httpx
import numpy as np
import paho.mqtt.client as mqtt
import pytest
from fastapi.testclient import TestClient
from paho.mqtt.enums import CallbackAPIVersion

from protocol import Channel, device_topic, encode_message
from protocol.api import upload_path
from protocol.messages import Box, SampleEvent
from server.app import create_app
from server.settings import ServerSettings

pytestmark = pytest.mark.integration

ADMIN = "test-admin-token-" + uuid.uuid4().hex


@pytest.fixture
def server(mqtt_broker, seaweedfs, tmp_path, database_url):
    settings = ServerSettings(
        data_dir=tmp_path / "server", database_url=database_url,
        mqtt_host=mqtt_broker.host, mqtt_port=mqtt_broker.port,
        mqtt_username=mqtt_broker.server_username, mqtt_password=mqtt_broker.server_password,
        mqtt_password_file=mqtt_broker.password_file, mqtt_broker_pid_file=mqtt_broker.pid_file,
        mqtt_broker_log_file=mqtt_broker.log_file,
        s3_endpoint=seaweedfs.endpoint, s3_access_key=seaweedfs.access_key, s3_secret_key=seaweedfs.secret_key,
        s3_bucket=f"ingest-{uuid.uuid4().hex[:8]}", admin_token=ADMIN, retrain_threshold=1000,
    )
    with TestClient(create_app(settings)) as client:
        client.headers["Authorization"] = f"Bearer {ADMIN}"
        yield client


def _enroll(client: TestClient, device_id: str) -> dict:
    response = client.post("/api/v1/devices", json={"device_id": device_id})
    assert response.status_code == 201, response.text
    return response.json()


def _jpeg(seed: int, size: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    ok, data = cv2.imencode(".jpg", rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    assert ok
    return data.tobytes()


def _upload(client: TestClient, creds: dict, data: bytes) -> str:
    sha = hashlib.sha256(data).hexdigest()
    grant = client.post(upload_path(creds["device_id"]), json={"sha256": sha, "size_bytes": len(data)},
                        headers={"Authorization": f"Bearer {creds['api_token']}"})
    assert grant.status_code == 200, grant.text
    body = grant.json()
    put = httpx.put(body["url"], content=data, headers=body["headers"])
    assert put.status_code == 200, put.text
    return body["object_key"]


def _event(creds: dict, data: bytes, object_key: str, labels, size: int = 64) -> SampleEvent:
    return SampleEvent(
        device_id=creds["device_id"], sample_id=uuid.uuid4().hex, object_key=object_key,
        sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data), width=size, height=size,
        reason="correction", labels=labels,
    )


def _wait_samples(client: TestClient, count: int, timeout: float = 15.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        items = client.get("/api/v1/samples", params={"limit": 100}).json()["items"]
        if len(items) >= count:
            return items
        time.sleep(0.2)
    raise AssertionError(f"expected {count} samples, got {len(items)}")


def test_samples_are_ingested_and_bad_ones_rejected_with_reasons(server, mqtt_broker):
    creds = _enroll(server, "cam-ingest")
    good = _jpeg(1)
    good_key = _upload(server, creds, good)
    garbage = b"this is not an image" * 10
    garbage_key = _upload(server, creds, garbage)
    label_img = _jpeg(2)
    label_key = _upload(server, creds, label_img)
    box = [Box(cls=1, cx=0.5, cy=0.5, w=0.2, h=0.2)]
    # Over the size limit (put behind the grant's back): refused from the GET's Content-Length.
    limit = server.app.state.ctx.settings.max_sample_bytes
    oversized = good + b"\0" * limit
    oversized_key = f"images/{creds['device_id']}/ab/{hashlib.sha256(oversized).hexdigest()}.jpg"
    server.app.state.ctx.store.put_bytes(oversized_key, oversized, "image/jpeg")

    events = {
        "oversized": _event(creds, good, oversized_key, box),  # the event claims the small image
        "good": _event(creds, good, good_key, box),
        "missing": _event(creds, good, f"images/{creds['device_id']}/ab/{'0' * 64}.jpg", box),
        "undecodable": _event(creds, garbage, garbage_key, box),
        "bad_class": _event(creds, label_img, label_key, [Box(cls=7, cx=0.5, cy=0.5, w=0.2, h=0.2)]),
    }
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=creds["device_id"], protocol=mqtt.MQTTv5)
    client.username_pw_set(creds["mqtt_username"], creds["mqtt_password"])
    client.connect(mqtt_broker.host, mqtt_broker.port)
    client.loop_start()
    try:
        for event in events.values():
            info = client.publish(device_topic(creds["device_id"], Channel.SAMPLES), encode_message(event), qos=1)
            info.wait_for_publish(5)
            assert info.is_published()
        # A redelivered event (same sample id) is stored once.
        client.publish(device_topic(creds["device_id"], Channel.SAMPLES),
                       encode_message(events["good"]), qos=1).wait_for_publish(5)
        items = {s["id"]: s for s in _wait_samples(server, len(events))}
    finally:
        client.loop_stop()
        client.disconnect()

    assert len(items) == len(events)
    assert items[events["good"].sample_id]["status"] == "validated"
    assert "does not exist" in items[events["missing"].sample_id]["reject_reason"]
    assert f"over the {limit}-byte limit" in items[events["oversized"].sample_id]["reject_reason"]
    assert "does not decode" in items[events["undecodable"].sample_id]["reject_reason"]
    assert "class id 7 is outside the class list" in items[events["bad_class"].sample_id]["reject_reason"]
    overview = server.get("/api/v1/overview").json()
    assert overview["samples"]["pending"] == 1
    assert overview["samples"]["by_status"] == {"validated": 1, "rejected": 4}


def test_device_token_cannot_act_as_another_device_or_operator(server):
    creds = _enroll(server, "cam-own")
    _enroll(server, "cam-other")
    device = {"Authorization": f"Bearer {creds['api_token']}"}
    body = {"sha256": "a" * 64, "size_bytes": 10}
    assert server.post(upload_path("cam-other"), json=body, headers=device).status_code == 403
    assert server.post(upload_path("cam-own"), json=body, headers=device).status_code == 200
    assert server.post("/api/v1/devices", json={"device_id": "cam-x"}, headers=device).status_code == 403
    assert server.post("/api/v1/retrain", json={"reason": "because"}, headers=device).status_code == 403
    assert server.get("/api/v1/devices", headers=device).status_code == 403
    assert server.get("/api/v1/devices", headers={"Authorization": "Bearer nope"}).status_code == 401


def test_oversized_upload_request_is_refused(server):
    creds = _enroll(server, "cam-big")
    response = server.post(upload_path("cam-big"), json={"sha256": "a" * 64, "size_bytes": 64 * 1024 * 1024},
                           headers={"Authorization": f"Bearer {creds['api_token']}"})
    assert response.status_code == 422


def test_revoked_device_token_is_refused(server):
    creds = _enroll(server, "cam-revoked")
    assert server.delete("/api/v1/devices/cam-revoked").status_code == 204
    response = server.post(upload_path("cam-revoked"), json={"sha256": "a" * 64, "size_bytes": 10},
                           headers={"Authorization": f"Bearer {creds['api_token']}"})
    assert response.status_code == 401


def test_manual_retrain_without_production_model_fails_with_reason(server):
    job = server.post("/api/v1/retrain", json={"reason": "engineer asked"}).json()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        job = server.get(f"/api/v1/jobs/{job['id']}").json()
        if job["status"] not in {"queued", "running"}:
            break
        time.sleep(0.2)
    assert job["status"] == "failed"
    assert "no production model" in job["result"]["error"]


def test_metrics_and_dashboard(server):
    assert "edgeloop_samples_pending" in server.get("/metrics").text
    anonymous = TestClient(server.app)
    assert anonymous.get("/", follow_redirects=False).status_code == 303
    assert server.post("/login", data={"token": ADMIN}, follow_redirects=False).status_code == 303
