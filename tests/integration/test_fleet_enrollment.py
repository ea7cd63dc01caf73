"""Enrollment with bootstrap tokens, inventory and revocation against the real broker
(Mosquitto's password file + reload), SeaweedFS and SQLite/PostgreSQL."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tempfile
import threading
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy

pytest.register_assert_rewrite("fleet_kit")
from fleet_kit import (  # noqa: E402
    NOT_AUTHORIZED,
    MqttClient,
    bearer,
    bootstrap_token,
    enroll,
    server_settings,
    start_server,
    wait_for,
)

from protocol import Channel, device_topic, encode_message  # noqa: E402
from protocol.api import upload_path  # noqa: E402
from protocol.messages import Hardware, Heartbeat, StatusMessage  # noqa: E402

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
JETSON = Hardware(cpu="aarch64", cpu_count=6, gpu="Orin", gpu_compute_capability="8.7", tensorrt_version="10.3.0")


@pytest.fixture
def settings(mqtt_broker, seaweedfs, tmp_path, database_url):
    return server_settings(mqtt_broker, seaweedfs, tmp_path, database_url)


@pytest.fixture
def server(settings):
    with start_server(settings) as client:
        yield client


def _did() -> str:
    return f"cam-{uuid.uuid4().hex[:8]}"


def _mqtt(mqtt_broker, creds: dict) -> MqttClient:
    return MqttClient(mqtt_broker, creds["mqtt_username"], creds["mqtt_password"])


def test_enrolled_device_gets_its_own_identity_broker_and_api(server, mqtt_broker):
    token = bootstrap_token(server, groups=["line-3"], tags=["a", "b"], max_uses=2, note="line 3 cameras")
    assert token["state"] == "active" and token["groups"] == ["line-3"] and token["tags"] == ["a", "b"]
    me, other = _did(), _did()
    response = enroll(server, token["token"], me, hardware=JETSON.model_dump(), agent_version="0.1.0")
    assert response.status_code == 201, response.text
    creds = response.json()
    assert creds["device_id"] == creds["mqtt_username"] == me
    assert creds["api_token"].startswith("elt_") and creds["groups"] == ["line-3"] and creds["tags"] == ["a", "b"]
    assert me in mqtt_broker.users()
    assert enroll(server, token["token"], other).status_code == 201

    # The broker knows the new user at once (the server reloaded it); %u patterns do the rest.
    client = _mqtt(mqtt_broker, creds)
    try:
        assert not client.connect().is_failure
        status = StatusMessage(device_id=me, state="online", agent_version="0.1.1", active_version=3,
                               hardware=JETSON)
        assert not client.publish(device_topic(me, Channel.STATUS), encode_message(status), retain=True).is_failure
        beat = Heartbeat(device_id=me, fps=25, latency_ms_p50=4, latency_ms_p99=9, frames_total=10,
                         samples_sent=0, spool_depth=2, disk_free_bytes=10**9, active_version=3, candidate_version=4)
        assert not client.publish(device_topic(me, Channel.HEARTBEAT), encode_message(beat)).is_failure
        # Publishing as another device is refused by the broker (MQTT v5 PUBACK 0x87).
        forged = StatusMessage(device_id=other, state="offline")
        assert client.publish(device_topic(other, Channel.STATUS), encode_message(forged)).value == NOT_AUTHORIZED
        assert client.publish(device_topic(other, Channel.SAMPLES), b"{}").value == NOT_AUTHORIZED

        # Inventory: labels from the token, hardware/versions/online from status and heartbeat.
        def record():
            d = server.get(f"/api/v1/devices/{me}").json()
            return d if d["online"] and d["candidate_version"] == 4 else None

        d = wait_for("the status and heartbeat to be ingested", record)
        assert d["groups"] == ["line-3"] and d["tags"] == ["a", "b"]
        assert d["hardware"]["gpu_compute_capability"] == "8.7" and d["hardware"]["tensorrt_version"] == "10.3.0"
        assert d["agent_version"] == "0.1.1" and d["active_version"] == 3 and d["last_seen"] is not None
        assert d["heartbeat"]["spool_depth"] == 2
        assert d["enrolled_by"] == f"bootstrap:{token['id']}" and not d["revoked"]
    finally:
        client.close()

    # Its API token works for its own uploads only.
    own = server.post(upload_path(me), json={"sha256": "a" * 64, "size_bytes": 10}, headers=bearer(creds["api_token"]))
    assert own.status_code == 200, own.text

    # Audit: who (the bootstrap token), what, when, from where.
    entries = server.get("/api/v1/audit", params={"action": "device.enroll"}).json()["items"]
    mine = [e for e in entries if e["target"] == me]
    assert len(mine) == 1
    assert mine[0]["actor"] == f"bootstrap:{token['id']}" and mine[0]["source"] == "testclient"
    assert mine[0]["detail"]["groups"] == ["line-3"] and mine[0]["at"]

    # The token is now used up: listed as exhausted, and a third device is refused.
    listed = {t["id"]: t for t in server.get("/api/v1/bootstrap-tokens").json()["items"]}
    assert listed[token["id"]]["state"] == "exhausted" and listed[token["id"]]["uses"] == 2
    assert "token" not in listed[token["id"]]
    refused = enroll(server, token["token"], _did())
    assert refused.status_code == 403 and "used 2 of 2 times" in refused.json()["detail"]


def test_device_token_cannot_act_as_another_device_or_as_an_operator(server):
    token = bootstrap_token(server, max_uses=2)["token"]
    me, other = _did(), _did()
    creds = enroll(server, token, me).json()
    assert enroll(server, token, other).status_code == 201
    device = bearer(creds["api_token"])
    body = {"sha256": "a" * 64, "size_bytes": 10}
    forbidden = [
        ("POST", upload_path(other), body),
        ("PATCH", f"/api/v1/devices/{me}", {"groups": ["escape"]}),
        ("PATCH", f"/api/v1/devices/{other}", {"groups": ["escape"]}),
        ("DELETE", f"/api/v1/devices/{other}", None),
        ("GET", "/api/v1/devices", None),
        ("GET", f"/api/v1/devices/{other}", None),
        ("POST", "/api/v1/devices", {"device_id": other}),
        ("POST", "/api/v1/bootstrap-tokens", {"max_uses": 1}),
        ("POST", "/api/v1/deployments", {"version": "production"}),
        ("POST", "/api/v1/retrain", {"reason": "device says so"}),
        ("POST", "/api/v1/models/rollback", {"reason": "device says so"}),
        ("GET", "/api/v1/audit", None),
    ]
    for method, path, json_body in forbidden:
        response = server.request(method, path, json=json_body, headers=device)
        assert response.status_code == 403, (method, path, response.status_code, response.text)
        assert response.json()["detail"], (method, path)
    assert server.get(f"/api/v1/devices/{other}").json()["groups"] == []  # nothing changed


def test_refused_bootstrap_tokens(server, settings):
    # Unknown token: 401.
    unknown = enroll(server, "elb_" + "x" * 40, _did())
    assert unknown.status_code == 401 and unknown.json()["detail"] == "unknown bootstrap token"

    # Expired: 403 with the expiry time.
    expired = bootstrap_token(server, max_uses=5)
    engine = sqlalchemy.create_engine(settings.resolved_database_url())
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text("UPDATE bootstrap_tokens SET expires_at = :t WHERE id = :id"),
                     {"t": datetime.now(UTC) - timedelta(minutes=1), "id": expired["id"]})
    engine.dispose()
    response = enroll(server, expired["token"], _did())
    assert response.status_code == 403 and "expired at" in response.json()["detail"]

    # Exhausted: one use only.
    single = bootstrap_token(server, max_uses=1)
    assert enroll(server, single["token"], _did()).status_code == 201
    response = enroll(server, single["token"], _did())
    assert response.status_code == 403 and "used 1 of 1 times" in response.json()["detail"]

    # Revoked by an admin.
    revoked = bootstrap_token(server, max_uses=3)
    assert server.delete(f"/api/v1/bootstrap-tokens/{revoked['id']}").status_code == 204
    response = enroll(server, revoked["token"], _did())
    assert response.status_code == 403 and "revoked" in response.json()["detail"]

    # An enrolled, active device id cannot be taken over: 409, and the try costs no use.
    spare = bootstrap_token(server, max_uses=2)
    taken = _did()
    assert enroll(server, spare["token"], taken).status_code == 201
    clash = enroll(server, spare["token"], taken)
    assert clash.status_code == 409 and "already enrolled" in clash.json()["detail"]
    assert server.get("/api/v1/bootstrap-tokens", params={"active": "true"}).json()["total"] >= 1
    listed = {t["id"]: t for t in server.get("/api/v1/bootstrap-tokens").json()["items"]}
    assert listed[spare["id"]]["uses"] == 1

    # Malformed requests: 422 with the field named.
    bad = enroll(server, spare["token"], "Not A Valid Id")
    assert bad.status_code == 422 and "device_id" in json.dumps(bad.json()["detail"])

    refusals = server.get("/api/v1/audit", params={"action": "device.enroll_refused"}).json()
    assert refusals["total"] == 4 and {e["actor"] for e in refusals["items"]} == {"anonymous"}


def test_failed_enrollments_are_rate_limited_per_address(mqtt_broker, seaweedfs, tmp_path):
    settings = server_settings(mqtt_broker, seaweedfs, tmp_path, f"sqlite:///{tmp_path / 'rl.db'}",
                               enroll_failure_limit="3/minute")
    with start_server(settings) as server:
        good = bootstrap_token(server, max_uses=5)["token"]
        assert enroll(server, good, _did()).status_code == 201  # successes do not count
        for _ in range(3):
            assert enroll(server, "elb_wrong-token-guess", _did()).status_code == 401
        blocked = enroll(server, good, _did())  # even a valid token, from this address, for now
        assert blocked.status_code == 429
        assert "too many failed enrollments" in blocked.json()["detail"]
        assert 1 <= int(blocked.headers["Retry-After"]) <= 61


def test_revocation_closes_broker_and_api(server, mqtt_broker):
    token = bootstrap_token(server, max_uses=1)["token"]
    me = _did()
    creds = enroll(server, token, me).json()
    connected = _mqtt(mqtt_broker, creds)
    assert not connected.connect().is_failure
    try:
        assert server.delete(f"/api/v1/devices/{me}").status_code == 204
        assert me not in mqtt_broker.users()
        # The reload drops the live session of a user that no longer exists.
        assert connected.disconnected.wait(10), "the revoked device's connection was not closed"
    finally:
        connected.close()
    again = _mqtt(mqtt_broker, creds)
    try:
        reason = again.connect()
        assert reason.is_failure and reason.value in (0x86, 0x87), reason
    finally:
        again.close()
    refused = server.post(upload_path(me), json={"sha256": "a" * 64, "size_bytes": 10},
                          headers=bearer(creds["api_token"]))
    assert refused.status_code == 401
    d = server.get(f"/api/v1/devices/{me}").json()
    assert d["revoked"] and d["revoked_at"] and not d["online"]
    audit = server.get("/api/v1/audit", params={"action": "device.revoke"}).json()["items"]
    entry = next(e for e in audit if e["target"] == me)
    assert entry["actor"] == "admin" and entry["detail"]["broker_user_removed"] is True
    assert entry["detail"]["api_tokens_revoked"] == 1
    # Editing a revoked device is refused with a reason; unknown devices are 404.
    patch = server.patch(f"/api/v1/devices/{me}", json={"tags": ["x"]})
    assert patch.status_code == 409 and "revoked" in patch.json()["detail"]
    assert server.delete(f"/api/v1/devices/{_did()}").status_code == 404


def test_inventory_labels_filters_and_pagination(server):
    line3 = bootstrap_token(server, groups=["line-3"], tags=["a"], max_uses=10)["token"]
    line4 = bootstrap_token(server, groups=["line-4"], tags=["a", "b"], max_uses=10)["token"]
    orin = Hardware(gpu="Orin", gpu_compute_capability="8.7").model_dump()
    xavier = Hardware(gpu="Xavier", gpu_compute_capability="7.2").model_dump()
    ids = sorted(_did() for _ in range(5))
    for i, device_id in enumerate(ids):
        r = enroll(server, line3 if i < 3 else line4, device_id, hardware=orin if i % 2 == 0 else xavier)
        assert r.status_code == 201, r.text

    def ids_of(**params):
        body = server.get("/api/v1/devices", params=params).json()
        return [d["id"] for d in body["items"]], body["total"]

    assert ids_of(group="line-3") == (ids[:3], 3)
    assert ids_of(group=["line-3", "line-4"])[1] == 5  # any of the groups
    assert ids_of(tag=["a", "b"]) == (ids[3:], 2)  # all of the tags
    assert ids_of(gpu_compute_capability="8.7") == ([ids[0], ids[2], ids[4]], 3)
    assert ids_of(group="line-3", gpu_compute_capability="7.2") == ([ids[1]], 1)
    assert ids_of(online="true") == ([], 0)
    assert ids_of(group="line-3", online="false")[1] == 3
    page = server.get("/api/v1/devices", params={"group": ["line-3", "line-4"], "limit": 2, "offset": 2}).json()
    assert (page["total"], page["limit"], page["offset"]) == (5, 2, 2)
    assert [d["id"] for d in page["items"]] == ids[2:4]

    # An operator relabels a device; the change is audited with before and after.
    operator = _human_token(server, "operator")
    r = server.patch(f"/api/v1/devices/{ids[0]}", json={"groups": ["line-9"], "tags": ["z", "a"]},
                     headers=bearer(operator))
    assert r.status_code == 200, r.text
    assert r.json()["groups"] == ["line-9"] and r.json()["tags"] == ["a", "z"]
    assert ids_of(group="line-9") == ([ids[0]], 1)
    r = server.patch(f"/api/v1/devices/{ids[0]}", json={"tags": []}, headers=bearer(operator))
    assert r.json()["groups"] == ["line-9"] and r.json()["tags"] == []
    bad = server.patch(f"/api/v1/devices/{ids[0]}", json={"groups": ["has space"]}, headers=bearer(operator))
    assert bad.status_code == 422
    entry = server.get("/api/v1/audit", params={"action": "device.update"}).json()["items"][0]
    assert entry["actor"] == "operator-user" and entry["target"] == ids[0]
    assert entry["detail"]["before"]["tags"] == ["a", "z"] and entry["detail"]["after"]["tags"] == []
    viewer = _human_token(server, "viewer")
    assert server.patch(f"/api/v1/devices/{ids[0]}", json={"tags": ["v"]}, headers=bearer(viewer)).status_code == 403
    assert server.get("/api/v1/devices", headers=bearer(viewer)).status_code == 200


def _human_token(server, role: str) -> str:
    from server.auth import Role, issue_token

    ctx = server.app.state.ctx
    with ctx.sessions() as session:
        token = issue_token(session, Role(role), f"{role}-user")
        session.commit()
    return token


def test_concurrent_enrollments_never_overspend_a_token(server, database_url):
    token = bootstrap_token(server, max_uses=3)["token"]
    results: list[int] = []
    lock = threading.Lock()

    def one():
        status = enroll(server, token, _did()).status_code
        with lock:
            results.append(status)

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == [201, 201, 201, 403, 403, 403], results


def test_agent_cli_enroll_writes_a_working_credentials_file(settings, mqtt_broker, tmp_path):
    import socket

    import uvicorn

    from edge_agent.settings import AgentSettings
    from server.app import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for("the server to start", lambda: server.started, 60)
        import httpx

        admin = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=bearer(settings.admin_token
                                                                                 .get_secret_value()))
        token = admin.post("/api/v1/bootstrap-tokens", json={"groups": ["line-3"], "max_uses": 1}).json()
        token_file = tmp_path / "bootstrap.txt"
        token_file.write_text(token["token"] + "\n")
        out = Path(tempfile.mkdtemp()) / "creds" / "credentials.json"
        me = _did()
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGELOOP_")}
        cmd = [sys.executable, "-m", "edgeloop", "agent", "enroll", "--device-id", me,
               "--api-url", f"http://127.0.0.1:{port}", "--bootstrap-token-file", str(token_file), "--out", str(out)]
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"enrolled {me}" in done.stdout and "line-3" in done.stdout
        assert stat.S_IMODE(out.stat().st_mode) == 0o600
        assert [p.name for p in out.parent.iterdir()] == ["credentials.json"]  # no temp file left behind

        recorded = admin.get(f"/api/v1/devices/{me}").json()
        assert recorded["agent_version"] and "cpu" in recorded["hardware"]  # the CLI sent what it detected
        assert recorded["groups"] == ["line-3"]

        # The file is what the agent reads, and it works against the broker and the API.
        agent = AgentSettings(credentials_file=out)
        assert agent.device_id == me
        client = MqttClient(mqtt_broker, me, agent.mqtt_password.get_secret_value())
        try:
            assert not client.connect().is_failure
            assert not client.publish(device_topic(me, Channel.STATUS),
                                      encode_message(StatusMessage(device_id=me, state="online"))).is_failure
        finally:
            client.close()
        grant = httpx.post(f"http://127.0.0.1:{port}{upload_path(me)}", json={"sha256": "b" * 64, "size_bytes": 5},
                           headers=bearer(agent.api_token.get_secret_value()))
        assert grant.status_code == 200, grant.text

        # Enrolling again: refused locally (file exists) and, with --force, by the server (used-up token).
        again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert again.returncode == 2 and "already exists" in again.stderr
        forced = subprocess.run([*cmd, "--force"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert forced.returncode == 1 and "403" in forced.stderr and "used 1 of 1" in forced.stderr
        assert AgentSettings(credentials_file=out).api_token == agent.api_token  # the good file was kept
        admin.close()
    finally:
        server.should_exit = True
        thread.join(30)
