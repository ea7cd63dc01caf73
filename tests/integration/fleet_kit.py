"""Shared by the fleet, API-contract and metrics tests: the real server app (real Mosquitto with
enrollment writing its password file, SeaweedFS, SQLite or PostgreSQL) and a blocking MQTT v5
client that reports CONNACK/PUBACK reason codes."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from fastapi.testclient import TestClient
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from server.app import create_app
from server.settings import ServerSettings

ADMIN = "fleet-admin-token-" + uuid.uuid4().hex
NOT_AUTHORIZED = 0x87
TIMEOUT = 10.0


@contextlib.contextmanager
def running_broker(prefix: str = "edgeloop-mosquitto-", **options) -> Iterator:
    """A started MosquittoBroker in a folder of its own (``options`` as MosquittoBroker takes them),
    stopped and removed afterwards; a broker that cannot start FAILS the test with the reason.
    Not under tmp_path_factory: pytest makes /tmp/pytest-of-<user> 0700, and Mosquitto started as
    root runs as the ``mosquitto`` user, which must reach its folder."""
    from server.stack.errors import ServiceError
    from server.stack.mosquitto import MosquittoBroker

    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    broker = MosquittoBroker(workdir, **options)
    try:
        broker.start()
    except ServiceError as exc:
        shutil.rmtree(workdir, ignore_errors=True)
        pytest.fail(f"cannot start the Mosquitto broker ({options or 'defaults'}): {exc}", pytrace=False)
    try:
        yield broker
    finally:
        broker.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def fresh_postgres_database(base_url: str) -> str:
    """A new, empty database on the PostgreSQL cluster at ``base_url``; returns its SQLAlchemy URL."""
    import sqlalchemy

    name = f"t_{uuid.uuid4().hex[:10]}"
    engine = sqlalchemy.create_engine(base_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    engine.dispose()
    return base_url.rsplit("/", 1)[0] + "/" + name


def wait_for(what: str, check: Callable[[], object], timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def server_settings(mqtt_broker, seaweedfs, tmp_path, database_url: str, **overrides) -> ServerSettings:
    values = dict(
        data_dir=tmp_path / "server", database_url=database_url,
        mqtt_host=mqtt_broker.host, mqtt_port=mqtt_broker.port,
        mqtt_username=mqtt_broker.server_username, mqtt_password=mqtt_broker.server_password,
        mqtt_password_file=mqtt_broker.password_file, mqtt_broker_pid_file=mqtt_broker.pid_file,
        mqtt_broker_log_file=mqtt_broker.log_file,
        s3_endpoint=seaweedfs.endpoint, s3_access_key=seaweedfs.access_key, s3_secret_key=seaweedfs.secret_key,
        s3_bucket=f"fleet-{uuid.uuid4().hex[:8]}", admin_token=ADMIN,
    )
    values.update(overrides)
    return ServerSettings(**values)


def start_server(settings: ServerSettings):
    """A TestClient (lifespan entered) authenticated as admin; use as a context manager."""
    client = TestClient(create_app(settings))
    client.headers["Authorization"] = f"Bearer {ADMIN}"
    return client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def bootstrap_token(client: TestClient, **body) -> dict:
    response = client.post("/api/v1/bootstrap-tokens", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def enroll(client: TestClient, token: str, device_id: str, **extra):
    body = {"bootstrap_token": token, "device_id": device_id, **extra}
    # No admin header: enrollment takes no other authentication.
    return client.post("/api/v1/enroll", json=body, headers={"Authorization": ""})


class MqttClient:
    """paho v2 / MQTT v5 with blocking connect/publish that return the broker's reason codes."""

    def __init__(self, broker, username: str, password: str):
        self.broker = broker
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=username, protocol=mqtt.MQTTv5)
        self.client.reconnect_delay_set(30, 60)  # a refused or dropped client must not retry during a test
        self.client.username_pw_set(username, password)
        self.connack = threading.Event()
        self.connect_reason: ReasonCode | None = None
        self.disconnected = threading.Event()
        self._acks: dict[int, ReasonCode] = {}
        self._cond = threading.Condition()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *_: self.disconnected.set()
        self.client.on_publish = self._on_publish

    def _on_connect(self, _c, _u, _flags, reason_code, _props) -> None:
        self.connect_reason = reason_code
        self.connack.set()

    def _on_publish(self, _c, _u, mid, reason_code, _props) -> None:
        with self._cond:
            self._acks[mid] = reason_code
            self._cond.notify_all()

    def connect(self) -> ReasonCode:
        self.client.connect(self.broker.host, self.broker.port, keepalive=30)
        self.client.loop_start()
        assert self.connack.wait(TIMEOUT), "no CONNACK"
        if self.connect_reason.is_failure:
            self.client.loop_stop()
        return self.connect_reason

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> ReasonCode:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, mqtt.error_string(info.rc)
        with self._cond:
            assert self._cond.wait_for(lambda: info.mid in self._acks, TIMEOUT), "no PUBACK"
            return self._acks.pop(info.mid)

    def close(self) -> None:
        if self.client.is_connected():
            self.client.disconnect()
        self.client.loop_stop()
