"""broker_accounts=http (EMQX): the whole server (SQLite and PostgreSQL, SeaweedFS, its own bus on
the test Mosquitto) keeps device accounts in its database, and its hook routes answer the broker's
HTTP authenticator and authorizer. Provisioning (one device and bulk), bootstrap enrollment,
re-keying and revocation go through the real API; no EMQX runs here (deploy/emqx/README.md)."""

from __future__ import annotations

import uuid

import pytest
from pydantic import SecretStr

pytest.register_assert_rewrite("fleet_kit")
from fleet_kit import ADMIN, bearer, bootstrap_token, enroll, server_settings, start_server  # noqa: E402

from protocol import Channel, device_topic  # noqa: E402

pytestmark = pytest.mark.integration

HOOK_TOKEN = "hook-" + uuid.uuid4().hex + uuid.uuid4().hex
HOOK = bearer(HOOK_TOKEN)
AUTHN, AUTHZ = "/api/v1/broker/authenticate", "/api/v1/broker/authorize"


@pytest.fixture
def settings(mqtt_broker, seaweedfs, tmp_path, database_url):
    return server_settings(mqtt_broker, seaweedfs, tmp_path, database_url, broker_accounts="http",
                           broker_hook_token=SecretStr(HOOK_TOKEN), mqtt_password_file=None,
                           mqtt_broker_pid_file=None, mqtt_broker_log_file=None)


@pytest.fixture
def server(settings):
    with start_server(settings) as client:
        yield client


def _did() -> str:
    return f"cam-{uuid.uuid4().hex[:8]}"


def authn(client, username: str, password: str, clientid: str | None = None) -> str:
    r = client.post(AUTHN, json={"username": username, "password": password,
                                 "clientid": username if clientid is None else clientid}, headers=HOOK)
    assert r.status_code == 200, r.text
    assert r.json()["is_superuser"] is False or username.startswith("_")
    return r.json()["result"]


def authz(client, username: str, topic: str, action: str) -> str:
    r = client.post(AUTHZ, json={"username": username, "clientid": username, "topic": topic, "action": action},
                    headers=HOOK)
    assert r.status_code == 200, r.text
    return r.json()["result"]


def test_provisioned_devices_authenticate_and_are_authorized_through_the_hooks(server, settings, mqtt_broker):
    me, other = _did(), _did()
    r = server.post("/api/v1/devices", json={"device_id": me})
    assert r.status_code == 201, r.text
    creds = r.json()
    assert creds["mqtt_username"] == me
    assert server.post("/api/v1/devices", json={"device_id": other}).status_code == 201

    assert authn(server, me, creds["mqtt_password"]) == "allow"
    assert authn(server, me, creds["mqtt_password"] + "x") == "deny"
    assert authn(server, me, creds["mqtt_password"], clientid=other) == "deny"  # client id must be the name
    assert me not in mqtt_broker.users()  # nothing was written to a broker: the database has it

    # The server's own account (its bus connects with it): a superuser, which EMQX asks nothing more.
    r = server.post(AUTHN, json={"username": settings.mqtt_username, "clientid": "replica-1",
                                 "password": settings.mqtt_password.get_secret_value()}, headers=HOOK)
    assert r.json() == {"result": "allow", "is_superuser": True}

    # The ACL of protocol/: own device channels out, own commands in, nothing of another device's.
    assert authz(server, me, device_topic(me, Channel.HEARTBEAT), "publish") == "allow"
    assert authz(server, me, device_topic(me, Channel.COMMANDS), "subscribe") == "allow"
    assert authz(server, me, device_topic(me, Channel.COMMANDS), "publish") == "deny"
    assert authz(server, me, device_topic(other, Channel.STATUS), "publish") == "deny"
    assert authz(server, me, device_topic(other, Channel.COMMANDS), "subscribe") == "deny"
    assert authz(server, me, device_topic(me, Channel.COMMANDS).rsplit("/", 1)[0] + "/#", "subscribe") == "deny"

    # Re-keyed: the old password stops working.
    rekeyed = server.post("/api/v1/devices", json={"device_id": me}).json()
    assert authn(server, me, rekeyed["mqtt_password"]) == "allow"
    assert authn(server, me, creds["mqtt_password"]) == "deny"

    # Revoked: its account is gone, so it can neither connect nor (still connected) publish.
    assert server.delete(f"/api/v1/devices/{me}").status_code == 204
    assert authn(server, me, rekeyed["mqtt_password"]) == "deny"
    assert authz(server, me, device_topic(me, Channel.HEARTBEAT), "publish") == "deny"
    assert authn(server, other, server.post("/api/v1/devices", json={"device_id": other}).json()["mqtt_password"]) \
        == "allow"  # the others are untouched

    metrics = server.get("/metrics").text
    assert 'edgeloop_broker_hook_total{hook="authenticate",result="allow"}' in metrics
    assert 'edgeloop_broker_hook_total{hook="authorize",result="deny"}' in metrics


def test_bulk_and_bootstrap_enrollment_create_accounts_the_hooks_accept(server):
    ids = [_did() for _ in range(25)]
    r = server.post("/api/v1/devices/bulk", json={"devices": [{"device_id": d} for d in ids]})
    assert r.status_code == 201, r.text
    items = r.json()["items"]
    assert [c["device_id"] for c in items] == ids
    for c in items:
        assert authn(server, c["mqtt_username"], c["mqtt_password"]) == "allow"
    # A CSV re-key of some of them: new passwords work, old ones do not, the rest are unchanged.
    csv = "id\n" + "\n".join(ids[:5]) + "\n"
    r = server.post("/api/v1/devices/bulk", content=csv, headers={"Content-Type": "text/csv"})
    assert r.status_code == 201 and r.json()["rekeyed"] == 5, r.text
    for old, new in zip(items[:5], r.json()["items"], strict=True):
        assert authn(server, new["mqtt_username"], new["mqtt_password"]) == "allow"
        assert authn(server, old["mqtt_username"], old["mqtt_password"]) == "deny"
    assert authn(server, items[5]["mqtt_username"], items[5]["mqtt_password"]) == "allow"
    # A bad row refuses the whole call: no account for any of its devices.
    fresh = _did()
    r = server.post("/api/v1/devices/bulk", json={"devices": [{"device_id": fresh}, {"device_id": "Bad"}]})
    assert r.status_code == 422
    assert authn(server, fresh, "anything") == "deny"

    token = bootstrap_token(server, max_uses=1)
    device = _did()
    r = enroll(server, token["token"], device)
    assert r.status_code == 201, r.text
    assert authn(server, device, r.json()["mqtt_password"]) == "allow"


def test_the_hooks_take_only_the_hook_token(server):
    body = {"username": "cam-x", "password": "p", "clientid": "cam-x"}
    assert server.post(AUTHN, json=body).status_code == 401  # the admin's API token is not the hook token
    assert server.post(AUTHN, json=body, headers={"Authorization": ""}).status_code == 401
    assert server.post(AUTHN, json=body, headers=bearer(ADMIN)).status_code == 401
    assert server.post(AUTHN, json=body, headers=HOOK).json()["result"] == "deny"
    assert server.post(AUTHN, json={**body, "extra": 1}, headers=HOOK).status_code == 422
