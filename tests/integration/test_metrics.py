"""Prometheus /metrics on the real app: fleet gauges per group, enrollments, MQTT ingest lag,
samples, job durations and the rollout metric families."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client.parser import text_string_to_metric_families

pytest.register_assert_rewrite("fleet_kit")
from fleet_kit import MqttClient, bootstrap_token, enroll, server_settings, start_server, wait_for  # noqa: E402

from protocol import Channel, device_topic, encode_message  # noqa: E402
from protocol.messages import StatusMessage  # noqa: E402
from server import metrics  # noqa: E402

pytestmark = pytest.mark.integration


def scrape(client) -> dict[tuple[str, frozenset], float]:
    response = client.get("/metrics", headers={"Authorization": ""})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    values = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            values[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return values


def value(values, name: str, **labels) -> float:
    return values.get((name, frozenset(labels.items())), 0.0)


def test_metrics_scrape_on_a_real_app(mqtt_broker, seaweedfs, tmp_path):
    settings = server_settings(mqtt_broker, seaweedfs, tmp_path, f"sqlite:///{tmp_path / 'metrics.db'}")
    with start_server(settings) as server:
        before = scrape(server)
        group = f"line-{uuid.uuid4().hex[:6]}"
        token = bootstrap_token(server, groups=[group], max_uses=2)["token"]
        online_id, offline_id = f"m-{uuid.uuid4().hex[:8]}", f"m-{uuid.uuid4().hex[:8]}"
        creds = enroll(server, token, online_id).json()
        assert enroll(server, token, offline_id).status_code == 201
        assert enroll(server, "elb_not-a-token", f"m-{uuid.uuid4().hex[:8]}").status_code == 401

        # One device comes online; its status was stamped 2 s ago, so the lag is at least that.
        client = MqttClient(mqtt_broker, creds["mqtt_username"], creds["mqtt_password"])
        try:
            assert not client.connect().is_failure
            status = StatusMessage(device_id=online_id, state="online",
                                   ts=datetime.now(UTC) - timedelta(seconds=2))
            assert not client.publish(device_topic(online_id, Channel.STATUS), encode_message(status)).is_failure
            wait_for("the status to be ingested",
                     lambda: server.get(f"/api/v1/devices/{online_id}").json()["online"])
        finally:
            client.close()

        metrics.set_wave_state("r-test", "canary", "running")
        metrics.set_wave_state("r-test", "canary", "passed")
        metrics.set_gate("r-test", "canary", "agreement", 0.97, threshold=0.95, passing=True)
        after = scrape(server)

        assert value(after, "edgeloop_devices_online", group=group) == 1
        assert value(after, "edgeloop_devices", state="online") >= 1
        assert value(after, "edgeloop_devices", state="offline") >= 1
        enrolled = value(after, "edgeloop_enrollments_total", outcome="enrolled")
        assert enrolled - value(before, "edgeloop_enrollments_total", outcome="enrolled") == 2
        unknown = value(after, "edgeloop_enrollments_total", outcome="unknown_token")
        assert unknown - value(before, "edgeloop_enrollments_total", outcome="unknown_token") == 1

        lag_count = "edgeloop_mqtt_ingest_lag_seconds_count"
        assert value(after, lag_count, type="status") - value(before, lag_count, type="status") >= 1
        lag_sum = "edgeloop_mqtt_ingest_lag_seconds_sum"
        assert value(after, lag_sum, type="status") - value(before, lag_sum, type="status") >= 2.0
        # The 1-second bucket did not get this message, the 5-second one did (unless the machine stalled).
        assert (value(after, "edgeloop_mqtt_ingest_lag_seconds_bucket", type="status", le="1.0")
                == value(before, "edgeloop_mqtt_ingest_lag_seconds_bucket", type="status", le="1.0"))

        assert value(after, "edgeloop_rollout_wave_state", rollout="r-test", wave="canary", state="passed") == 1
        assert value(after, "edgeloop_rollout_wave_state", rollout="r-test", wave="canary", state="running") == 0
        assert value(after, "edgeloop_rollout_gate_value", rollout="r-test", wave="canary", gate="agreement") == 0.97
        assert value(after, "edgeloop_rollout_gate_threshold", rollout="r-test", wave="canary",
                     gate="agreement") == 0.95
        assert value(after, "edgeloop_rollout_gate_passing", rollout="r-test", wave="canary", gate="agreement") == 1

        text = server.get("/metrics").text
        for family in ("edgeloop_samples_ingested_total", "edgeloop_samples_pending",
                       "edgeloop_training_job_seconds", "edgeloop_mqtt_messages_rejected_total"):
            assert f"# TYPE {family}" in text or f"# HELP {family}" in text, family

        # A revoked device leaves the online gauge; a finished rollout leaves /metrics.
        assert server.delete(f"/api/v1/devices/{online_id}").status_code == 204
        metrics.forget_rollout("r-test")
        final = scrape(server)
        assert value(final, "edgeloop_devices_online", group=group) == 0
        assert not [k for k in final if dict(k[1]).get("rollout") == "r-test"]
