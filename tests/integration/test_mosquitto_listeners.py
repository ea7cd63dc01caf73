"""Every listener of a real Mosquitto 2 forces the user name as client id, and no listener
setting sits above the first listener (Mosquitto would give it to its default listener, which
then also opens on port 1883 of every address).

- the broker edgeloop starts (server/stack/mosquitto.py render_config) with its TLS listener
  beside the plain one;
- deploy/mosquitto/mosquitto.conf (the compose broker), run from a copy with only its paths and
  its listener's port/address substituted (a free loopback port instead of 0.0.0.0:1883).

On each listener device ``dev-a`` connects asking for device ``dev-b``'s client id while
``dev-b`` is connected: the broker must keep it under ``dev-a`` (its user name), not take
``dev-b``'s session over.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from server.stack.errors import ServiceError
from server.stack.mosquitto import (
    DEFAULT_MAX_PACKET_SIZE,
    BrokerTls,
    BrokerUsers,
    MosquittoBroker,
    render_acl,
)
from server.stack.ports import find_free_port, wait_for_port
from server.stack.tls import DevPki, write_dev_pki

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
COMPOSE_CONF = REPO / "deploy" / "mosquitto" / "mosquitto.conf"
DEVICES = {"dev-a": "password-a", "dev-b": "password-b"}
_OPENING = re.compile(r"Opening ipv[46] listen socket on port (\d+)\.")


def _wait(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


class _Client:
    """A paho MQTT v5 client that records its connects (with the CONNACK properties) and
    disconnects."""

    def __init__(self, username: str, client_id: str, port: int, ca_file: Path | None) -> None:
        self.connacks: list[tuple[str, object]] = []
        self.disconnects: list[str] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.client.username_pw_set(username, DEVICES[username])
        if ca_file is not None:
            self.client.tls_set(ca_certs=str(ca_file))
        self.client.on_connect = lambda _c, _u, _f, rc, props: self.connacks.append((str(rc), props))
        self.client.on_disconnect = lambda _c, _u, _f, rc, _p: self.disconnects.append(str(rc))
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _assert_client_id_is_the_user_name(port: int, log_file: Path, ca_file: Path | None = None) -> None:
    """dev-b connects, then dev-a with client id "dev-b": dev-b must stay connected and the
    broker log must name dev-a's connection ``dev-a``."""
    clients: list[_Client] = []
    start = log_file.stat().st_size  # the log may hold earlier tests' connections
    try:
        b = _Client("dev-b", "dev-b", port, ca_file)
        clients.append(b)
        assert _wait(lambda: bool(b.connacks)), "dev-b did not connect"
        assert b.connacks[0][0] == "Success", b.connacks
        a = _Client("dev-a", "dev-b", port, ca_file)
        clients.append(a)
        assert _wait(lambda: bool(a.connacks)), "dev-a did not connect"
        assert a.connacks[0][0] == "Success", a.connacks
        time.sleep(0.5)  # a session takeover would disconnect dev-b by now
        log = log_file.read_bytes()[start:].decode()
        assert not b.disconnects, f"dev-a took dev-b's session over on port {port}:\n{log}"
        assert "as dev-a (" in log and "u'dev-a'" in log, log
        assert not re.search(r"as dev-b \([^)]*u'dev-a'\)", log), log
        assert "Client dev-b already connected, closing old connection" not in log, log
        # max_packet_size stands among the global settings: every listener announces it.
        for client in (a, b):
            assert client.connacks[0][1].MaximumPacketSize == DEFAULT_MAX_PACKET_SIZE
    finally:
        for client in clients:
            client.close()


def _opened_ports(log: str) -> set[int]:
    return {int(port) for port in _OPENING.findall(log)}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return write_dev_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_broker(pki: DevPki) -> Iterator[MosquittoBroker]:
    from fleet_kit import running_broker

    with running_broker(tls=BrokerTls(pki.ca_file, pki.server_cert, pki.server_key)) as broker:
        for username, password in DEVICES.items():
            broker.add_user(username, password)
        yield broker


def test_the_generated_config_opens_only_its_two_listeners(tls_broker: MosquittoBroker):
    assert _opened_ports(tls_broker.log_file.read_text()) == {tls_broker.port, tls_broker.tls_port}


@pytest.mark.parametrize("listener", ["plain", "tls"])
def test_every_listener_of_the_generated_config_forces_the_user_name_as_client_id(
        tls_broker: MosquittoBroker, pki: DevPki, listener: str):
    if listener == "tls":
        _assert_client_id_is_the_user_name(tls_broker.tls_port, tls_broker.log_file, pki.ca_file)
    else:
        _assert_client_id_is_the_user_name(tls_broker.port, tls_broker.log_file)


def test_the_compose_broker_config_starts_with_its_one_listener_forcing_the_user_name(tmp_path: Path):
    """deploy/mosquitto/mosquitto.conf from a copy: /broker -> tmp_path and its listener moved
    from 0.0.0.0:1883 to a free loopback port, nothing else changed (but ``user root`` first
    when run as root, or Mosquitto switches to the mosquitto user, which cannot reach
    tmp_path)."""
    conf = COMPOSE_CONF.read_text()
    assert conf.count("\nlistener 1883 0.0.0.0\n") == 1
    port = find_free_port()
    conf = conf.replace("/broker/", f"{tmp_path}/").replace("\nlistener 1883 0.0.0.0\n",
                                                           f"\nlistener {port} 127.0.0.1\n")
    assert "/broker" not in conf
    if os.geteuid() == 0:
        conf = "user root\n" + conf
    (tmp_path / "data").mkdir()
    (tmp_path / "acl").write_text(render_acl())
    users = BrokerUsers(tmp_path / "passwd")
    for username, password in DEVICES.items():
        users.add_user(username, password, reload=False)
    (tmp_path / "mosquitto.conf").write_text(conf)
    log_file = tmp_path / "mosquitto.log"
    with open(tmp_path / "stdout.log", "wb") as out:
        broker = subprocess.Popen(["mosquitto", "-c", str(tmp_path / "mosquitto.conf")], stdout=out,
                                  stderr=subprocess.STDOUT)
    try:
        try:
            wait_for_port(port, timeout=10, alive=lambda: broker.poll() is None)
        except ServiceError:
            pytest.fail(f"the compose broker did not start:\n{(tmp_path / 'stdout.log').read_text()}")
        time.sleep(0.3)
        assert broker.poll() is None, (tmp_path / "stdout.log").read_text()
        # Only its own listener: no default listener on 1883 of every address.
        assert _opened_ports(log_file.read_text()) == {port}, log_file.read_text()
        _assert_client_id_is_the_user_name(port, log_file)
    finally:
        broker.terminate()
        try:
            broker.wait(timeout=10)
        except subprocess.TimeoutExpired:
            broker.kill()
            broker.wait(timeout=5)
