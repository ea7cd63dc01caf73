"""The agent's MQTT client against real Mosquitto brokers: TLS with a pinned CA and client
certificates, the on-disk outbox across broker outages and agent restarts, auth failures,
resubscription after the broker lost its sessions."""

from __future__ import annotations

import os
import queue
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.mqtt_client import AgentMqtt, MqttTls
from protocol import (
    Channel,
    Heartbeat,
    SampleEvent,
    SamplingConfigCommand,
    StatusMessage,
    UpdateEvent,
    decode_message,
    device_topic,
    encode_message,
    parse_device_topic,
    server_subscriptions,
)
from protocol.messages import SampleReason
from server.stack import _proc
from server.stack.mosquitto import BrokerTls, MosquittoBroker
from server.stack.ports import find_free_port
from server.stack.tls import DevPki, write_dev_pki

pytestmark = pytest.mark.integration

WAIT = 20.0  # generous upper bounds for things that normally take milliseconds


# -- helpers -------------------------------------------------------------------------------


class ServerClient:
    """The server side: a paho client as a broker server user, subscribed to every device
    channel (again on each connect), optionally with a persistent session."""

    def __init__(self, broker: MosquittoBroker, *, persistent: bool = False):
        self.broker = broker
        self.persistent = persistent
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=broker.server_username,
                                  protocol=mqtt.MQTTv5)
        self.client.username_pw_set(broker.server_username, broker.server_password)
        self.client.reconnect_delay_set(0.1, 0.5)
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.subscribed = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = lambda _c, _u, msg: self.messages.put(msg)

    def _on_connect(self, client, _u, _flags, reason_code, _props) -> None:
        if not reason_code.is_failure:
            client.subscribe(server_subscriptions())

    def start(self) -> ServerClient:
        props = Properties(PacketTypes.CONNECT)
        if self.persistent:
            props.SessionExpiryInterval = 600  # messages for it are queued while it is away
        self.client.connect(self.broker.host, self.broker.port, keepalive=30, clean_start=not self.persistent,
                            properties=props)
        self.client.loop_start()
        assert self.subscribed.wait(WAIT), "server client did not subscribe"
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def events(self, channel: Channel, count: int, timeout: float = WAIT) -> list:
        """The next ``count`` live (not retained) messages on ``channel``, decoded, in arrival order."""
        got = []
        deadline = time.monotonic() + timeout
        while len(got) < count:
            try:
                msg = self.messages.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"got {len(got)} of {count} {channel} messages") from None
            if msg.retain or parse_device_topic(msg.topic)[1] != channel:
                continue
            got.append(decode_message(msg.topic, msg.payload))
        return got

    def quiet(self, channel: Channel, seconds: float = 0.5) -> list:
        """Live messages on ``channel`` that arrive within ``seconds`` (expected: none)."""
        extra = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = self.messages.get(timeout=left)
            except queue.Empty:
                break
            if not msg.retain and parse_device_topic(msg.topic)[1] == channel:
                extra.append(decode_message(msg.topic, msg.payload))
        return extra

    def command(self, device_id: str, command) -> None:
        info = self.client.publish(device_topic(device_id, Channel.COMMANDS), encode_message(command), qos=1)
        info.wait_for_publish(WAIT)
        assert info.is_published()


def _event(device_id: str, n: int) -> UpdateEvent:
    return UpdateEvent(device_id=device_id, update_id="u-test", version=n, from_state="IDLE",
                       to_state="DOWNLOADING", event="deploy")


def _status(device_id: str) -> StatusMessage:
    return StatusMessage(device_id=device_id, state="online", agent_version="test")


def _heartbeat(device_id: str) -> Heartbeat:
    return Heartbeat(device_id=device_id, fps=1.0, latency_ms_p50=1.0, latency_ms_p99=1.0, frames_total=0,
                     samples_sent=0, spool_depth=0, disk_free_bytes=1)


def _wait(predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> DevPki:
    return write_dev_pki(tmp_path_factory.mktemp("pki"), clients=("client",))


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory) -> DevPki:
    return write_dev_pki(tmp_path_factory.mktemp("other-pki"), clients=("client",), ca_name="some other CA")


@pytest.fixture
def brokers() -> Iterator[Callable[..., MosquittoBroker]]:
    """Brokers of the test's own (the session broker must not be stopped or given TLS)."""
    made: list[MosquittoBroker] = []

    def make(tls: BrokerTls | None = None) -> MosquittoBroker:
        # Not tmp_path: Mosquitto runs as the `mosquitto` user and must reach its folder.
        workdir = Path(tempfile.mkdtemp(prefix="edgeloop-agent-mqtt-"))
        os.chmod(workdir, 0o711)
        # A fixed port, so that a restart comes back where the clients reconnect to.
        broker = MosquittoBroker(workdir, port=find_free_port(), tls=tls)
        made.append(broker)
        broker.start()
        return broker

    yield make
    for broker in made:
        broker.stop()
        shutil.rmtree(broker.workdir, ignore_errors=True)


@pytest.fixture
def agents() -> Iterator[Callable[..., AgentMqtt]]:
    """AgentMqtt factory with a short reconnect backoff; every agent is stopped afterwards."""
    made: list[AgentMqtt] = []

    def make(device_id: str, port: int, password: str, **kwargs) -> AgentMqtt:
        kwargs.setdefault("reconnect_min_s", 0.1)
        kwargs.setdefault("reconnect_max_s", 0.5)
        agent = AgentMqtt(device_id, "127.0.0.1", port, password, **kwargs)
        made.append(agent)
        return agent

    yield make
    for agent in made:
        agent.stop(drain_timeout=0)


@pytest.fixture
def servers() -> Iterator[Callable[..., ServerClient]]:
    made: list[ServerClient] = []

    def make(broker: MosquittoBroker, **kwargs) -> ServerClient:
        client = ServerClient(broker, **kwargs)
        made.append(client)
        return client.start()

    yield make
    for client in made:
        client.stop()


def _device(broker: MosquittoBroker) -> tuple[str, str]:
    device_id, password = f"dev-{uuid.uuid4().hex[:10]}", _proc.random_secret()
    broker.add_user(device_id, password)
    return device_id, password


def _tls_broker(brokers, pki: DevPki, *, require_certificate: bool = False) -> MosquittoBroker:
    return brokers(BrokerTls(pki.ca_file, pki.server_cert, pki.server_key, require_certificate=require_certificate))


# -- TLS -----------------------------------------------------------------------------------


def test_tls_with_the_pinned_ca_connects_and_exchanges_messages(brokers, agents, servers, pki):
    broker = _tls_broker(brokers, pki)
    server = servers(broker)  # plain listener on loopback: the server's side
    dev, pw = _device(broker)
    agent = agents(dev, broker.tls_port, pw, tls=MqttTls(ca_file=pki.ca_file))
    agent.start(_status(dev))
    assert agent.wait_connected(WAIT), agent.last_connect_error

    agent.publish(_event(dev, 1))
    assert [e.version for e in server.events(Channel.UPDATE, 1)] == [1]
    sample = SampleEvent(device_id=dev, sample_id="ab" * 8, object_key=f"images/{dev}/x.jpg", sha256="0" * 64, size_bytes=10,
                         width=8, height=8, reason=SampleReason.RANDOM)
    assert agent.publish_and_wait(sample)  # the uploader's path: True only after the PUBACK
    assert [e.sample_id for e in server.events(Channel.SAMPLES, 1)] == [sample.sample_id]
    server.command(dev, SamplingConfigCommand(device_id=dev, random_rate=0.5))
    command = agent.commands.get(timeout=WAIT)
    assert (command.type, command.random_rate) == ("sampling_config", 0.5)


def test_agent_pinned_to_another_ca_or_expecting_another_name_does_not_connect(brokers, agents, pki, other_pki):
    broker = _tls_broker(brokers, pki)
    dev, pw = _device(broker)
    wrong_ca = agents(dev, broker.tls_port, pw, tls=MqttTls(ca_file=other_pki.ca_file))
    wrong_ca.start(_status(dev))
    assert _wait(lambda: wrong_ca.connect_failures >= 2)
    assert not wrong_ca.connected
    assert "certificate verify failed" in (wrong_ca.last_connect_error or "")
    wrong_ca.stop()

    wrong_name = agents(dev, broker.tls_port, pw, tls=MqttTls(ca_file=pki.ca_file, server_name="broker.example"))
    wrong_name.start(_status(dev))
    assert _wait(lambda: wrong_name.connect_failures >= 1)
    assert not wrong_name.connected
    assert "Hostname mismatch" in (wrong_name.last_connect_error or "")
    wrong_name.stop()

    # The name the certificate does carry, asked for explicitly while connecting to the IP.
    right_name = agents(dev, broker.tls_port, pw, tls=MqttTls(ca_file=pki.ca_file, server_name="localhost"))
    right_name.start(_status(dev))
    assert right_name.wait_connected(WAIT), right_name.last_connect_error


def test_listener_that_requires_a_client_certificate(brokers, agents, servers, pki, other_pki):
    broker = _tls_broker(brokers, pki, require_certificate=True)
    server = servers(broker)
    dev, pw = _device(broker)

    for tls in (MqttTls(ca_file=pki.ca_file),  # no certificate
                MqttTls(pki.ca_file, *other_pki.clients["client"])):  # certificate from a foreign CA
        refused = agents(dev, broker.tls_port, pw, tls=tls)
        refused.start(_status(dev))
        assert _wait(lambda a=refused: a.connect_failures >= 2), tls
        assert not refused.connected
        refused.stop()

    cert, key = pki.clients["client"]
    good = agents(dev, broker.tls_port, pw, tls=MqttTls(pki.ca_file, cert, key))
    good.start(_status(dev))
    assert good.wait_connected(WAIT), good.last_connect_error
    good.publish(_event(dev, 7))
    assert [e.version for e in server.events(Channel.UPDATE, 1)] == [7]
    good.stop()

    # The certificate does not replace the password: the same device with a wrong one is refused.
    wrong_pw = agents(dev, broker.tls_port, "wrong-password", tls=MqttTls(pki.ca_file, cert, key))
    wrong_pw.start(_status(dev))
    assert wrong_pw.auth_failed.wait(WAIT)


# -- outbox ----------------------------------------------------------------------------------


def test_events_raised_while_the_broker_is_down_arrive_in_order_after_it_returns(
    brokers, agents, servers, tmp_path
):
    broker = brokers()
    server = servers(broker, persistent=True)
    dev, pw = _device(broker)
    agent = agents(dev, broker.port, pw, outbox_path=tmp_path / "outbox.db", inflight_window=8)
    agent.start(_status(dev))
    assert agent.wait_connected(WAIT)
    for n in range(3):
        agent.publish(_event(dev, n))
    assert agent.wait_drained(WAIT)
    assert [e.version for e in server.events(Channel.UPDATE, 3)] == [0, 1, 2]

    broker.stop()
    assert _wait(lambda: not agent.connected)
    for n in range(3, 103):
        agent.publish(_event(dev, n))
        agent.publish(_heartbeat(dev))  # QoS 0: dropped while away, never queued
    assert len(agent.outbox) == 100

    broker.start()  # same port and persistence: the server's session and subscription are back
    assert agent.wait_connected(WAIT)
    assert [e.version for e in server.events(Channel.UPDATE, 100)] == list(range(3, 103))
    assert agent.wait_drained(WAIT)
    assert server.quiet(Channel.UPDATE) == []  # each exactly once
    assert agent.outbox.dropped == 0


def test_events_in_flight_when_the_broker_dies_are_all_delivered_in_order(brokers, agents, servers, tmp_path):
    broker = brokers()
    server = servers(broker, persistent=True)
    dev, pw = _device(broker)
    agent = agents(dev, broker.port, pw, outbox_path=tmp_path / "outbox.db")
    agent.start(_status(dev))
    assert agent.wait_connected(WAIT)
    total = 400
    for n in range(total - 20):
        agent.publish(_event(dev, n))
    broker.stop()  # while most of those are still queued or in flight
    for n in range(total - 20, total):
        agent.publish(_event(dev, n))
    broker.start()

    seen: list[int] = []
    deadline = time.monotonic() + 2 * WAIT
    while len(set(seen)) < total and time.monotonic() < deadline:
        seen += [e.version for e in server.events(Channel.UPDATE, 1, timeout=deadline - time.monotonic())]
    first = list(dict.fromkeys(seen))  # at least once: a PUBACK lost in the crash means a repeat
    assert first == list(range(total))
    assert agent.wait_drained(WAIT)


def test_outbox_survives_an_agent_restart(mqtt_broker, device_credentials, agents, servers, tmp_path):
    dev, pw = device_credentials()
    outbox = tmp_path / "outbox.db"
    offline = agents(dev, find_free_port(), pw, outbox_path=outbox)  # no broker there
    offline.start(_status(dev))
    for n in range(5):
        offline.publish(_event(dev, n))
    assert _wait(lambda: offline.connect_failures >= 1)
    offline.stop()

    server = servers(mqtt_broker)
    restarted = agents(dev, mqtt_broker.port, pw, outbox_path=outbox)
    assert len(restarted.outbox) == 5
    restarted.start(_status(dev))
    assert [e.version for e in server.events(Channel.UPDATE, 5)] == [0, 1, 2, 3, 4]
    assert restarted.wait_drained(WAIT)
    assert server.quiet(Channel.UPDATE) == []


def test_auth_failure_sets_auth_failed_and_stops_retrying(mqtt_broker, device_credentials, agents):
    dev, _ = device_credentials()
    agent = agents(dev, mqtt_broker.port, "wrong-password", reconnect_min_s=0.05, reconnect_max_s=0.05)
    log_before = len(mqtt_broker.log_file.read_bytes())
    agent.start(_status(dev))
    assert agent.auth_failed.wait(WAIT)
    time.sleep(1.0)  # twenty backoff periods: a retrying client would have tried again by now
    assert agent.connect_failures == 1
    assert not agent.connected
    # The broker saw exactly one attempt (it logs refused clients as <unknown>).
    new_lines = mqtt_broker.log_file.read_bytes()[log_before:].decode().splitlines()
    assert sum("New connection from" in line for line in new_lines) == 1, new_lines
    assert sum("not authorised" in line for line in new_lines) == 1, new_lines


def test_commands_arrive_after_the_broker_lost_every_session(brokers, agents, servers):
    broker = brokers()
    dev, pw = _device(broker)
    agent = agents(dev, broker.port, pw)
    agent.start(_status(dev))
    assert agent.wait_connected(WAIT)

    broker.stop()
    assert _wait(lambda: not agent.connected)
    shutil.rmtree(broker.data_dir)  # a broker that comes back without its persisted sessions
    broker.start()
    assert agent.wait_connected(WAIT)

    server = servers(broker)
    server.command(dev, SamplingConfigCommand(device_id=dev, max_samples_per_hour=10))
    assert agent.commands.get(timeout=WAIT).max_samples_per_hour == 10
