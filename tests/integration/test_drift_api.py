"""The drift API on the real server (Mosquitto, SeaweedFS, SQLite): windows published by a device
over MQTT reach the monitor through ingest, and the JSON the dashboard draws -- series with
thresholds, subjects, events with their alert and job, references -- says what happened.

Statistics here are synthetic (drawn around a look, through the agent's accumulator), so this runs
in the regular suite; tests/integration/test_drift_monitor.py does the same with real frames and
the seed model (slow).
"""

from __future__ import annotations

import uuid

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from fastapi.testclient import TestClient
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.drift_stats import StatsAccumulator
from protocol import Channel, device_topic, encode_message
from protocol.messages import DriftReport, Histogram
from server.app import create_app
from server.db.models import ModelVersion
from server.settings import DriftPolicy, ServerSettings
from training.drift_reference import DriftReference, ReferenceComponent, ReferenceHistogram

pytestmark = pytest.mark.integration

ADMIN = "drift-api-" + uuid.uuid4().hex


def _stream(rng, n, brightness):
    acc = StatsAccumulator(3)
    for _ in range(n):
        acc.add_image_stats((rng.normal(brightness, 0.04), rng.normal(0.24, 0.02), rng.normal(3.3, 0.1),
                             rng.normal(0.05, 0.01), rng.normal(0.33, 0.002), rng.normal(0.337, 0.002)))
        k = rng.poisson(2.0)
        acc.add_detections(rng.integers(0, 3, k).tolist(), np.clip(rng.normal(0.7, 0.1, k), 0.26, 1).tolist())
    return acc


@pytest.fixture
def server(mqtt_broker, seaweedfs, tmp_path):
    settings = ServerSettings(
        data_dir=tmp_path / "server", database_url=f"sqlite:///{tmp_path / 'edgeloop.db'}",
        mqtt_host=mqtt_broker.host, mqtt_port=mqtt_broker.port,
        mqtt_username=mqtt_broker.server_username, mqtt_password=mqtt_broker.server_password,
        mqtt_password_file=mqtt_broker.password_file, mqtt_broker_pid_file=mqtt_broker.pid_file,
        mqtt_broker_log_file=mqtt_broker.log_file,
        s3_endpoint=seaweedfs.endpoint, s3_access_key=seaweedfs.access_key, s3_secret_key=seaweedfs.secret_key,
        s3_bucket=f"drift-api-{uuid.uuid4().hex[:8]}", admin_token=ADMIN,
        drift=DriftPolicy(groups={"fleet": ["*"], "hall-2": ["cam-*"]}),
    )
    with TestClient(create_app(settings)) as client:
        client.headers["Authorization"] = f"Bearer {ADMIN}"
        yield client


def test_windows_over_mqtt_become_series_events_and_alerts(server, mqtt_broker):
    ctx = server.app.state.ctx
    rng = np.random.default_rng(3)
    reference = _stream(rng, 3000, 0.46)
    with ctx.sessions() as session:
        session.add(ModelVersion(version=1, name="m", status="production"))
        session.commit()
    ctx.drift.references.save(1, DriftReference(num_classes=3, conf=0.25, components={"base": ReferenceComponent(
        frames=reference.frames, histograms={k: ReferenceHistogram(edges=list(e), counts=c)
                                             for k, (e, c) in reference.histograms().items()})}))
    creds = server.post("/api/v1/devices", json={"device_id": "cam-7"}).json()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="cam-7", protocol=mqtt.MQTTv5)
    client.username_pw_set(creds["mqtt_username"], creds["mqtt_password"])
    client.connect(mqtt_broker.host, mqtt_broker.port)
    client.loop_start()
    looks = [0.46] * 3 + [0.15] * 3
    try:
        for i, brightness in enumerate(looks):
            acc = _stream(rng, 400, brightness)
            report = DriftReport(device_id="cam-7", model_version=1, window=i, frames=acc.frames,
                                 histograms={k: Histogram(edges=list(e), counts=c)
                                             for k, (e, c) in acc.histograms().items()})
            info = client.publish(device_topic("cam-7", Channel.DRIFT), encode_message(report), qos=1)
            info.wait_for_publish(10)
        _wait(server, "/api/v1/drift/devices/cam-7/windows", len(looks))
    finally:
        client.loop_stop()
        client.disconnect()

    series = server.get("/api/v1/drift/devices/cam-7/windows", params={"metric": ["brightness", "contrast"]}).json()
    assert [w["window"] for w in series["items"]] == list(range(len(looks)))  # oldest first
    assert set(series["thresholds"]) == {"brightness", "contrast"}
    assert series["thresholds"]["brightness"]["raise_above"] == 0.25
    assert [w["drifting"] for w in series["items"]] == [False] * 5 + [True]
    assert series["items"][-1]["values"]["brightness"] > 1 > series["items"][0]["values"]["brightness"]
    assert set(series["items"][-1]["scores"]["brightness"]) == {"psi", "ks", "wasserstein", "count"}
    assert series["decay_thresholds"]["max_correction_rate"] == ctx.settings.drift.max_correction_rate
    page = server.get("/api/v1/drift/devices/cam-7/windows", params={"limit": 2}).json()
    assert page["total"] == len(looks) and [w["window"] for w in page["items"]] == [4, 5]

    events = server.get("/api/v1/drift/events", params={"subject": "cam-7"}).json()["items"]
    by_action = {e["action"]: e for e in events}
    assert by_action["alert"]["alert"]["kind"] == "drift" and by_action["alert"]["alert"]["severity"] == "warning"
    assert by_action["sampling"]["status"] == "done" and by_action["sampling"]["detail"]["random_rate"] == 0.05
    # No labeled samples pending: the retrain waits for something to learn from, and says so.
    assert by_action["retrain"]["status"] == "waiting" and by_action["retrain"]["job"] is None

    subjects = server.get("/api/v1/drift/subjects").json()
    names = {(s["scope"], s["subject"]) for s in subjects["items"]}
    assert {("device", "cam-7"), ("group", "fleet"), ("group", "hall-2")} <= names
    overview = server.get("/api/v1/drift/overview").json()
    assert overview["drifting"] == ["device:cam-7"] and overview["policy"]["raise_after"] == 3
    assert server.get("/api/v1/drift/groups/hall-2/windows").json()["total"] == len(looks) - 1
    assert server.get("/api/v1/drift/groups/nowhere/windows").status_code == 404

    refs = server.get("/api/v1/drift/references").json()
    assert refs["items"][0]["model_version"] == 1 and refs["items"][0]["status"] == "ready"
    one = server.get("/api/v1/drift/references/1").json()
    assert one["components"]["base"]["frames"] == 3000
    assert server.get("/api/v1/drift/references/5").status_code == 404
    assert server.post("/api/v1/drift/references/5").status_code == 404


def _wait(server, path, count, timeout=15.0):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = server.get(path)
        if response.status_code == 200 and response.json()["total"] >= count:
            return
        time.sleep(0.1)
    raise AssertionError(f"{path}: fewer than {count} windows after {timeout}s")
