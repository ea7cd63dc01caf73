"""Bulk enrollment (POST /api/v1/devices/bulk, edgeloop devices enroll-bulk) against the real broker,
with both broker-account backends: the password file (one write and one reload per batch) and
Mosquitto's dynamic-security plugin (a broker of this module's own, started with the plugin).
Bulk-enrolled devices connect with their credentials and publish on their own topics; the %u
ACL still refuses another device's topic (MQTT v5 reason 0x87)."""

from __future__ import annotations

import contextlib
import json
import uuid

import pytest

pytest.register_assert_rewrite("fleet_kit")
from fleet_kit import NOT_AUTHORIZED, MqttClient, running_broker, server_settings, start_server  # noqa: E402

from protocol import Channel, device_topic  # noqa: E402
from server.broker_accounts import DynamicSecurityAccounts  # noqa: E402

pytestmark = pytest.mark.integration

BULK = "/api/v1/devices/bulk"


@pytest.fixture(scope="module")
def dynsec_broker():
    with running_broker("edgeloop-dynsec-", dynamic_security=True) as broker:
        yield broker


@pytest.fixture
def password_file_server(mqtt_broker, seaweedfs, tmp_path):
    settings = server_settings(mqtt_broker, seaweedfs, tmp_path, f"sqlite:///{tmp_path / 'bulk.db'}")
    with start_server(settings) as client:
        yield client, mqtt_broker


@pytest.fixture
def dynsec_server(dynsec_broker, seaweedfs, tmp_path):
    settings = server_settings(dynsec_broker, seaweedfs, tmp_path, f"sqlite:///{tmp_path / 'bulk.db'}",
                               broker_accounts="dynamic_security", mqtt_password_file=None,
                               mqtt_broker_pid_file=None, mqtt_broker_log_file=None,
                               mqtt_dynsec_username=dynsec_broker.dynsec_username,
                               mqtt_dynsec_password=dynsec_broker.dynsec_password)
    with start_server(settings) as client:
        yield client, dynsec_broker


def _ids(n: int) -> list[str]:
    run = uuid.uuid4().hex[:6]
    return [f"bulk-{run}-{i:04d}" for i in range(n)]


def _csv(ids: list[str]) -> str:
    return "id,groups,tags\n" + "".join(f"{d},line-{i % 3};plant-a,cam\n" for i, d in enumerate(ids))


def _check_acl(broker, creds: list[dict]) -> None:
    """Each device publishes on its own topic; a publish on the next device's topic is refused."""
    for mine, other in zip(creds, creds[1:] + creds[:1], strict=True):
        client = MqttClient(broker, mine["mqtt_username"], mine["mqtt_password"])
        try:
            assert not client.connect().is_failure
            own = client.publish(device_topic(mine["device_id"], Channel.HEARTBEAT), b"{}")
            assert not own.is_failure, own
            theirs = client.publish(device_topic(other["device_id"], Channel.HEARTBEAT), b"{}")
            assert theirs.value == NOT_AUTHORIZED, theirs
        finally:
            client.close()


def _cannot_connect(broker, creds: dict) -> bool:
    client = MqttClient(broker, creds["mqtt_username"], creds["mqtt_password"])
    try:
        return client.connect().is_failure
    finally:
        client.close()


def _total(client) -> int:
    return client.get("/api/v1/devices", params={"limit": 1}).json()["total"]


@pytest.mark.parametrize("backend", ["password_file_server", "dynsec_server"])
def test_bulk_enrolled_devices_connect_and_stay_on_their_own_topics(backend, request):
    client, broker = request.getfixturevalue(backend)
    ids = _ids(60)
    response = client.post(BULK, content=_csv(ids), headers={"Content-Type": "text/csv"})
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["total"], body["created"], body["rekeyed"]) == (60, 60, 0)
    creds = body["items"]
    assert [c["device_id"] for c in creds] == ids
    assert all(c["mqtt_username"] == c["device_id"] and c["api_token"].startswith("elt_") for c in creds)
    device = client.get(f"/api/v1/devices/{ids[4]}").json()
    assert device["groups"] == ["line-1", "plant-a"] and device["tags"] == ["cam"]
    _check_acl(broker, [creds[0], creds[1], creds[59]])

    # Re-key two of them by JSON: new passwords work, the old ones stop working.
    again = client.post(BULK, json={"devices": [{"device_id": ids[0]}, {"device_id": ids[1], "tags": ["x"]}]})
    assert again.status_code == 201, again.text
    assert (again.json()["created"], again.json()["rekeyed"]) == (0, 2)
    fresh = again.json()["items"]
    assert _cannot_connect(broker, creds[0])
    _check_acl(broker, fresh)
    assert client.get(f"/api/v1/devices/{ids[1]}").json()["tags"] == ["x"]

    # Revocation goes through the same accounts interface.
    assert client.delete(f"/api/v1/devices/{ids[59]}").status_code == 204
    assert _cannot_connect(broker, creds[59])


@pytest.mark.parametrize("backend", ["password_file_server", "dynsec_server"])
def test_a_bad_row_is_named_and_nothing_is_done(backend, request):
    client, broker = request.getfixturevalue(backend)
    before = _total(client)
    ids = _ids(5)
    text = _csv(ids[:3]) + "Not_A_Valid_Id,line-1,\n" + f"{ids[4]},,\n"
    response = client.post(BULK, content=text, headers={"Content-Type": "text/csv"})
    assert response.status_code == 422
    assert response.json()["detail"].startswith("line 5: invalid device id 'Not_A_Valid_Id'")
    dup = client.post(BULK, json={"devices": [{"device_id": ids[0]}, {"device_id": ids[0]}]})
    assert dup.status_code == 422 and "devices[1]" in dup.json()["detail"]
    assert client.post(BULK, content=b"<xml/>", headers={"Content-Type": "application/xml"}).status_code == 415
    assert client.post(BULK, json={"devices": []}).status_code == 422
    assert _total(client) == before
    users = broker.users() if backend == "password_file_server" else DynamicSecurityAccounts(
        broker.host, broker.port, broker.dynsec_username, broker.dynsec_password).users()
    assert not set(ids) & set(users)


def test_bulk_needs_the_admin_role(password_file_server):
    client, _ = password_file_server
    from server.auth import Role, issue_token

    with client.app.state.ctx.sessions() as session:
        token = issue_token(session, Role.OPERATOR, "op-bulk")
        session.commit()
    response = client.post(BULK, json={"devices": [{"device_id": "bulk-op"}]},
                           headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 403


def test_cli_enroll_bulk_writes_the_credentials_file(password_file_server, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import server.cli as cli

    client, broker = password_file_server
    monkeypatch.setattr(cli, "_client", lambda api_url, token: contextlib.nullcontext(client))
    ids = _ids(25)
    source = tmp_path / "devices.csv"
    source.write_text(_csv(ids))
    out = tmp_path / "credentials.json"
    result = CliRunner().invoke(cli.app, ["devices", "enroll-bulk", str(source), "--out", str(out), "--token", "x"])
    assert result.exit_code == 0, result.output
    assert "25 device(s) provisioned (25 new, 0 re-keyed)" in result.output
    assert out.stat().st_mode & 0o777 == 0o600
    creds = json.loads(out.read_text())["items"]
    assert [c["device_id"] for c in creds] == ids
    _check_acl(broker, creds[:2])

    bad = tmp_path / "bad.csv"
    bad.write_text("id\nok-1\nBAD\n")
    result = CliRunner().invoke(cli.app, ["devices", "enroll-bulk", str(bad), "--out", str(tmp_path / "x.json"),
                                          "--token", "x"])
    assert result.exit_code == 1 and "line 3: invalid device id 'BAD'" in result.output
    assert not (tmp_path / "x.json").exists()
