"""The fleet simulator against the real server: uvicorn on a port with its own Mosquitto (per-device
credentials, %u ACL) and SeaweedFS, SQLite. Every simulated device is enrolled through the API with its
own credentials and all of them run on one event loop in one thread.

- protocol conformance: the server decodes everything the devices send (no protocol rejects), every
  QoS 1 message is acknowledged, sample events carry real images uploaded through the presigned grant
  and pass the server's validation, and every heartbeat sent is counted by the server's ingest;
- no lag growth: the heartbeats' ingest lag in the second half of the run is not worse than in the first;
- a rollout (canary -> 100 %) through the real rollout controller reaches ``succeeded`` with every
  device switched;
- the broker still refuses a device's publish under another device's id.

``EDGELOOP_SIM_DEVICES`` (default 1,000) sets the fleet size; benchmarks/fleet.py runs 10,000.
"""

from __future__ import annotations

import os
import time
import uuid

import httpx
import pytest

pytest.register_assert_rewrite("fleet_kit", "dashboard_kit")
from dashboard_kit import LiveServer  # noqa: E402
from fleet_kit import ADMIN, NOT_AUTHORIZED, MqttClient, server_settings, wait_for  # noqa: E402

from edgeloop.simulator.credentials import device_ids, enroll  # noqa: E402
from edgeloop.simulator.fleet import Fleet, FleetConfig  # noqa: E402
from protocol import Channel, Heartbeat, device_topic, encode_message  # noqa: E402
from server import metrics  # noqa: E402
from server.settings import RolloutPolicy  # noqa: E402

pytestmark = [pytest.mark.integration]

DEVICES = int(os.environ.get("EDGELOOP_SIM_DEVICES", "1000"))
HEARTBEAT_S = 2.0
RUN_S = 12.0


def _value(metric, **labels) -> float:
    return metric.labels(**labels)._value.get()


def _lag(kind: str) -> tuple[float, float]:
    """(sum, count) of the ingest-lag histogram for one message type."""
    samples = {s.name: s.value for s in metrics.INGEST_LAG.collect()[0].samples if s.labels.get("type") == kind}
    return samples.get("edgeloop_mqtt_ingest_lag_seconds_sum", 0.0), samples.get(
        "edgeloop_mqtt_ingest_lag_seconds_count", 0.0)


def seed_versions(ctx) -> None:
    """Production v1 and an approved-gate candidate v2, each with a (placeholder) bundle to point at:
    the simulated devices never download it."""
    from server import registry
    from server.db import models as db

    with ctx.sessions() as session:
        for version, status in ((1, "production"), (2, "candidate")):
            session.add(db.ModelVersion(version=version, name="defects", status=status,
                                        bundle_key=f"models/defects/{version}/bundle.tar", bundle_sha256="ab" * 32,
                                        bundle_size=8_000_000, class_names=["scratch", "dent", "stain"],
                                        metrics={}, gate={"passed": True}))
        session.flush()
        registry.set_alias(session, "production", 1)
        registry.set_alias(session, "candidate", 2)
        session.commit()


@pytest.fixture
def live(mqtt_broker, seaweedfs, tmp_path):
    settings = server_settings(mqtt_broker, seaweedfs, tmp_path, f"sqlite:///{tmp_path / 'edgeloop.db'}",
                               port=LiveServer.free_port(),
                               rollouts=RolloutPolicy(reconcile_seconds=0.5, resend_seconds=10,
                                                      device_timeout_seconds=300, lease_seconds=10))
    server = LiveServer(settings).start()
    try:
        yield server
    finally:
        server.stop()


def test_simulated_fleet_against_the_real_server(live, mqtt_broker):
    seed_versions(live.ctx)
    started = time.monotonic()
    creds = enroll(live.url, ADMIN, device_ids(DEVICES, f"sim{uuid.uuid4().hex[:4]}"))
    enroll_s = time.monotonic() - started
    print(f"enrolled {DEVICES} in {enroll_s:.1f} s")
    assert len(creds) == DEVICES and len({c.mqtt_password for c in creds}) == DEVICES

    hb0, rejected0 = _value(metrics.MESSAGES_RECEIVED, type="heartbeat"), _value(metrics.MESSAGES_REJECTED,
                                                                                   reason="protocol")
    samples0 = _value(metrics.MESSAGES_RECEIVED, type="sample")
    coalesced0 = metrics.INGEST_COALESCED._value.get()
    config = FleetConfig(host=mqtt_broker.host, port=mqtt_broker.port, heartbeat_seconds=HEARTBEAT_S,
                         shadow_seconds=2.0, drift_seconds=6.0, api_url=live.url,
                         samples_per_minute=60 * 20 / (DEVICES * RUN_S),  # ~20 samples in the run
                         connects_per_second=1000)
    fleet = Fleet(creds, config).start_in_thread()
    try:
        wait_for("every simulated device connected", lambda: fleet.counters.connected == DEVICES, 60)
        wait_for("every device online in the server's inventory", lambda: _online(live) == DEVICES, 60)

        # Half the run, then the other half: the ingest lag must not grow.
        time.sleep(RUN_S / 2)
        lag_first = _lag("heartbeat")
        time.sleep(RUN_S / 2)
        lag_end = _lag("heartbeat")

        # A rollout, canary then the whole fleet, through the real controller.
        with httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30) as api:
            response = api.post("/api/v1/rollouts", json={
                "version": 2, "waves": [{"name": "canary", "count": max(1, DEVICES // 50)},
                                        {"name": "fleet", "percent": 100}],
                "gates": {"min_frames": 100, "min_shadow_seconds": 1, "max_latency_ratio": 5.0},
                "reason": "simulated fleet"})
            assert response.status_code == 201, response.text
            rollout_id = response.json()["id"]
            try:
                rollout = wait_for("the rollout to finish", lambda: _finished(api, rollout_id), 120)
            except AssertionError:
                body = api.get(f"/api/v1/rollouts/{rollout_id}").json()
                states = {}
                for model in fleet.devices.values():
                    states[model.state] = states.get(model.state, 0) + 1
                raise AssertionError(f"rollout still {body['state']} ({body.get('reason')}); waves "
                                     f"{[(w.get('name'), w.get('state'), w.get('reason')) for w in body['waves']]}; "
                                     f"simulated states {states}; commands {dict(fleet.counters.commands)}; sent {dict(fleet.counters.sent)}; "
                                     f"last wave {str(body['waves'][-1])[:3000]}") from None
        assert rollout["state"] == "succeeded", rollout.get("reason")
        assert all(d.active_version == 2 for d in fleet.devices.values())
        wait_for("every device on v2 in the inventory", lambda: _versions(live) == {2: DEVICES}, 30)

        # The ACL still holds: a device's own credentials cannot publish as another device.
        intruder = MqttClient(mqtt_broker, creds[0].mqtt_username + "-probe", "x")
        intruder.client.username_pw_set(creds[0].mqtt_username, creds[0].mqtt_password)
        intruder.client._client_id = creds[0].mqtt_username.encode()
    finally:
        fleet.join()
    try:
        assert intruder.connect().value == 0
        forged = Heartbeat(device_id=creds[1].device_id, fps=1, latency_ms_p50=1, latency_ms_p99=1, frames_total=0,
                           samples_sent=0, spool_depth=0, disk_free_bytes=0)
        assert intruder.publish(device_topic(creds[1].device_id, Channel.HEARTBEAT), encode_message(forged)
                                ).value == NOT_AUTHORIZED
    finally:
        intruder.close()

    counters = fleet.counters
    sent_hb = counters.sent["heartbeat"]
    assert sent_hb >= DEVICES * RUN_S / HEARTBEAT_S * 0.8
    # Every heartbeat sent is counted by the server (QoS 0, loopback: none may be lost): handled, or
    # superseded by the same device's next one before the flush (coalesced: the latest wins).
    def counted() -> float:
        return (_value(metrics.MESSAGES_RECEIVED, type="heartbeat") - hb0
                + metrics.INGEST_COALESCED._value.get() - coalesced0)

    try:
        wait_for("every heartbeat counted", lambda: counted() >= sent_hb, 30)
    except AssertionError:
        raise AssertionError(f"{sent_hb} heartbeats sent, {counted():.0f} counted; dispatcher "
                             f"{getattr(live.ctx.ingest_dispatcher, 'counts', None)}") from None
    assert counted() == sent_hb
    assert _value(metrics.MESSAGES_REJECTED, reason="protocol") == rejected0
    assert not counters.refused and counters.bad_commands == 0
    for kind, n in counters.sent.items():
        if kind != "heartbeat":
            assert counters.acked[kind] == n, (kind, counters.acked[kind], n)
    # Samples: real images behind real presigned uploads, validated by the server's ingest.
    assert counters.uploads >= 1 and counters.upload_failures == 0, (
        counters.uploads_started, counters.uploads, dict(counters.upload_errors))
    wait_for("every sample ingested",
             lambda: _value(metrics.MESSAGES_RECEIVED, type="sample") - samples0 == counters.sent["sample"], 15)
    assert _sample_statuses(live) == {"unlabeled": counters.sent["sample"]}
    # No lag growth: the mean lag of the second half within 0.5 s (or twice) of the first half's.
    first = lag_first[0] / max(lag_first[1], 1)
    second = (lag_end[0] - lag_first[0]) / max(lag_end[1] - lag_first[1], 1)
    assert second <= max(0.5, 2 * first), (first, second)
    print(f"\n{DEVICES} devices: enrolled in {enroll_s:.1f} s; sent {dict(counters.sent)}; "
          f"heartbeat lag mean {first * 1000:.0f} ms -> {second * 1000:.0f} ms")


def _online(live) -> int:
    from sqlalchemy import func, select

    from server.db.models import Device

    with live.ctx.sessions() as session:
        return session.scalar(select(func.count()).select_from(Device).where(Device.online.is_(True)))


def _versions(live) -> dict:
    from sqlalchemy import func, select

    from server.db.models import Device

    with live.ctx.sessions() as session:
        return dict(session.execute(select(Device.active_version, func.count()).group_by(Device.active_version)).all())


def _sample_statuses(live) -> dict:
    from sqlalchemy import func, select

    from server.db.models import Sample

    with live.ctx.sessions() as session:
        return dict(session.execute(select(Sample.status, func.count()).group_by(Sample.status)).all())


def _finished(api: httpx.Client, rollout_id: int):
    body = api.get(f"/api/v1/rollouts/{rollout_id}", params={"devices": "false"}).json()
    return body if body["state"] in {"succeeded", "paused", "aborted", "rolled_back", "failed"} else None
