"""The agent side of enrollment: the request it sends, the server's refusals as errors, and the
credentials file (atomic, 0600, what AgentSettings reads). The real server is exercised in
tests/integration/test_fleet_enrollment.py."""

from __future__ import annotations

import json
import os
import stat

import httpx
import pytest

from edge_agent.enroll import EnrollError, enroll, read_credentials, write_credentials
from edge_agent.settings import AgentSettings
from protocol.api import ENROLL_PATH, DeviceCredentials
from protocol.messages import Hardware

CREDS = {"device_id": "cam-1", "api_token": "elt_x", "mqtt_username": "cam-1", "mqtt_password": "pw",
         "groups": ["line-3"], "tags": []}


def _client(handler) -> httpx.Client:
    return httpx.Client(base_url="http://server", transport=httpx.MockTransport(handler))


def test_enroll_sends_token_identity_and_hardware():
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["path"] = request.url.path
        seen["body"] = json.loads(request.content)
        seen["auth"] = request.headers.get("authorization")
        return httpx.Response(201, json=CREDS)

    hw = Hardware(cpu="aarch64", gpu_compute_capability="8.7")
    with _client(handler) as client:
        creds = enroll(client, bootstrap_token="elb_secret-token", device_id="cam-1", hardware=hw,
                       agent_version="0.1.0")
    assert seen["path"] == ENROLL_PATH and seen["auth"] is None
    assert seen["body"]["bootstrap_token"] == "elb_secret-token" and seen["body"]["device_id"] == "cam-1"
    assert seen["body"]["hardware"]["gpu_compute_capability"] == "8.7" and seen["body"]["agent_version"] == "0.1.0"
    assert creds.api_token == "elt_x" and creds.groups == ["line-3"]


@pytest.mark.parametrize(("status", "body", "headers", "expected"), [
    (403, {"detail": "bootstrap token 3 has been used 1 of 1 times"}, {}, "(403): bootstrap token 3 has been used"),
    (401, {"detail": "unknown bootstrap token"}, {}, "(401): unknown bootstrap token"),
    (429, {"detail": "too many failed enrollments"}, {"Retry-After": "42"}, "(retry after 42 s)"),
    (502, "bad gateway", {}, "(502): bad gateway"),
])
def test_refusals_become_errors_with_the_servers_reason(status, body, headers, expected):
    def handler(request):
        if isinstance(body, dict):
            return httpx.Response(status, json=body, headers=headers)
        return httpx.Response(status, text=body, headers=headers)

    with _client(handler) as client, pytest.raises(EnrollError) as err:
        enroll(client, bootstrap_token="elb_secret-token", device_id="cam-1")
    assert expected in str(err.value) and err.value.status == status


def test_unreachable_server_is_an_enroll_error():
    def handler(request):
        raise httpx.ConnectError("connection refused")

    with _client(handler) as client, pytest.raises(EnrollError, match="cannot reach the server"):
        enroll(client, bootstrap_token="elb_secret-token", device_id="cam-1")


def test_invalid_device_id_is_refused_before_sending():
    with _client(lambda r: httpx.Response(500)) as client, pytest.raises(ValueError, match="invalid device id"):
        enroll(client, bootstrap_token="elb_secret-token", device_id="Cam 1")


def test_credentials_file_is_private_atomic_and_read_by_the_agent(tmp_path):
    path = tmp_path / "etc" / "edgeloop" / "credentials.json"
    old_umask = os.umask(0)  # even with a permissive umask the file is 0600
    try:
        write_credentials(path, DeviceCredentials(**{k: CREDS[k] for k in DeviceCredentials.model_fields}))
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {"device_id": "cam-1", "api_token": "elt_x", "mqtt_username": "cam-1",
                                            "mqtt_password": "pw"}
    settings = AgentSettings(credentials_file=path)
    assert settings.device_id == "cam-1" and settings.mqtt_password.get_secret_value() == "pw"

    # Replacing it is a rename: a reader sees the old file or the new one, and no temp file stays.
    inode = path.stat().st_ino
    write_credentials(path, read_credentials(path).model_copy(update={"mqtt_password": "pw2"}))
    assert path.stat().st_ino != inode
    assert read_credentials(path).mqtt_password == "pw2"
    assert [p.name for p in path.parent.iterdir()] == ["credentials.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "credentials.json"
    write_credentials(path, DeviceCredentials(device_id="cam-1", api_token="a", mqtt_username="cam-1",
                                              mqtt_password="old"))

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_credentials(path, DeviceCredentials(device_id="cam-1", api_token="b", mqtt_username="cam-1",
                                                  mqtt_password="new"))
    assert read_credentials(path).mqtt_password == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["credentials.json"]
