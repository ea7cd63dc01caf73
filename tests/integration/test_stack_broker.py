"""The embedded Mosquitto broker enforces the device ACL (real broker, paho-mqtt v2, MQTT v5)."""

from __future__ import annotations

import queue
import threading
import time
import uuid

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from protocol import (
    Channel,
    SamplingConfigCommand,
    StatusMessage,
    decode_message,
    device_topic,
    encode_message,
    server_subscriptions,
    topic_spec,
)
from server.stack.mosquitto import MosquittoBroker

pytestmark = pytest.mark.integration

NOT_AUTHORIZED = 0x87
TIMEOUT = 5.0


class Client:
    """A paho v2 / MQTT v5 client with blocking helpers for tests."""

    def __init__(
        self, broker: MosquittoBroker, username: str | None, password: str | None, client_id: str = ""
    ):
        self.broker = broker
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"t-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.reconnect_delay_set(30, 60)  # a refused client must not retry during the test
        if username is not None:
            self.client.username_pw_set(username, password)
        self.connack = threading.Event()
        self.connect_reason: ReasonCode | None = None
        self.disconnected = threading.Event()
        self.disconnect_reason: ReasonCode | None = None
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self._acks: dict[int, ReasonCode] = {}
        self._subacks: dict[int, list[ReasonCode]] = {}
        self._cond = threading.Condition()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = lambda _c, _u, msg: self.messages.put(msg)
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe

    def _on_connect(self, _c, _u, _flags, reason_code, _props) -> None:
        self.connect_reason = reason_code
        self.connack.set()

    def _on_disconnect(self, _c, _u, _flags, reason_code, _props) -> None:
        self.disconnect_reason = reason_code
        self.disconnected.set()

    def _on_publish(self, _c, _u, mid, reason_code, _props) -> None:
        with self._cond:
            self._acks[mid] = reason_code
            self._cond.notify_all()

    def _on_subscribe(self, _c, _u, mid, reason_codes, _props) -> None:
        with self._cond:
            self._subacks[mid] = list(reason_codes)
            self._cond.notify_all()

    def will(self, topic: str, payload: bytes, *, qos: int, retain: bool) -> Client:
        self.client.will_set(topic, payload, qos=qos, retain=retain)
        return self

    def connect(self) -> ReasonCode:
        self.client.connect(self.broker.host, self.broker.port, keepalive=30)
        self.client.loop_start()
        assert self.connack.wait(TIMEOUT), "no CONNACK"
        assert self.connect_reason is not None
        if self.connect_reason.is_failure:
            self.client.loop_stop()
        return self.connect_reason

    def connected(self) -> Client:
        reason = self.connect()
        assert not reason.is_failure, f"connect refused: {reason}"
        return self

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> ReasonCode:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, mqtt.error_string(info.rc)
        with self._cond:
            assert self._cond.wait_for(lambda: info.mid in self._acks, TIMEOUT), "no PUBACK"
            return self._acks.pop(info.mid)

    def subscribe(self, topics: list[tuple[str, int]]) -> list[ReasonCode]:
        result, mid = self.client.subscribe(topics)
        assert result == mqtt.MQTT_ERR_SUCCESS
        with self._cond:
            assert self._cond.wait_for(lambda: mid in self._subacks, TIMEOUT), "no SUBACK"
            return self._subacks.pop(mid)

    def next_message(self, timeout: float = TIMEOUT, *, retained: bool = False) -> mqtt.MQTTMessage:
        """The next message; retained ones (left by earlier tests' devices on wildcard
        subscriptions) are skipped unless ``retained``."""
        deadline = time.monotonic() + timeout
        while True:
            msg = self.messages.get(timeout=max(0.0, deadline - time.monotonic()))
            if retained or not msg.retain:
                return msg

    def drain(self) -> list[mqtt.MQTTMessage]:
        """Live (non-retained) messages received so far."""
        out = []
        while True:
            try:
                msg = self.messages.get_nowait()
            except queue.Empty:
                return out
            if not msg.retain:
                out.append(msg)

    def close(self, reasoncode: ReasonCode | None = None) -> None:
        if self.client.is_connected():
            self.client.disconnect(reasoncode=reasoncode)
        self.client.loop_stop()


@pytest.fixture
def clients():
    made: list[Client] = []

    def make(
        broker: MosquittoBroker, username: str | None, password: str | None, client_id: str = ""
    ) -> Client:
        client = Client(broker, username, password, client_id)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


@pytest.fixture
def server_client(mqtt_broker, clients) -> Client:
    return clients(mqtt_broker, mqtt_broker.server_username, mqtt_broker.server_password).connected()


def _status(device_id: str, state: str) -> bytes:
    return encode_message(StatusMessage(device_id=device_id, state=state))


def test_device_publishes_only_under_its_own_id(mqtt_broker, device_credentials, clients, server_client):
    dev_a, pw_a = device_credentials()
    dev_b, _ = device_credentials()
    assert all(not rc.is_failure for rc in server_client.subscribe(server_subscriptions()))
    a = clients(mqtt_broker, dev_a, pw_a).connected()

    spoofed = a.publish(device_topic(dev_b, Channel.SAMPLES), b'{"spoofed": true}', qos=1)
    assert spoofed.value == NOT_AUTHORIZED, spoofed
    own = a.publish(device_topic(dev_a, Channel.SAMPLES), b'{"own": true}', qos=1)
    assert not own.is_failure, own

    msg = server_client.next_message()
    assert msg.topic == device_topic(dev_a, Channel.SAMPLES)
    assert msg.payload == b'{"own": true}'
    assert server_client.drain() == []  # the spoofed one never reached the server

    # A device cannot publish commands, not even to itself.
    cmd = a.publish(device_topic(dev_a, Channel.COMMANDS), b"{}", qos=1)
    assert cmd.value == NOT_AUTHORIZED


def test_device_does_not_receive_other_devices_commands(
    mqtt_broker, device_credentials, clients, server_client
):
    dev_a, _ = device_credentials()
    dev_b, pw_b = device_credentials()
    b = clients(mqtt_broker, dev_b, pw_b).connected()
    # Mosquitto grants the subscriptions but only delivers what the ACL allows.
    b.subscribe([(device_topic(dev_a, Channel.COMMANDS), 1), (device_topic(dev_b, Channel.COMMANDS), 1)])

    for_a = encode_message(SamplingConfigCommand(device_id=dev_a, random_rate=0.5))
    for_b = encode_message(SamplingConfigCommand(device_id=dev_b, random_rate=0.1))
    assert not server_client.publish(device_topic(dev_a, Channel.COMMANDS), for_a).is_failure
    assert not server_client.publish(device_topic(dev_b, Channel.COMMANDS), for_b).is_failure

    msg = b.next_message()  # broker delivers in order: A's command would have come first
    assert msg.topic == device_topic(dev_b, Channel.COMMANDS)
    decoded = decode_message(msg.topic, msg.payload)
    assert decoded.device_id == dev_b
    assert b.drain() == []


def test_device_cannot_read_other_devices_channels(mqtt_broker, device_credentials, clients, server_client):
    dev_a, pw_a = device_credentials()
    dev_b, pw_b = device_credentials()
    b = clients(mqtt_broker, dev_b, pw_b).connected()
    b.subscribe([*server_subscriptions(), (device_topic(dev_b, Channel.COMMANDS), 1)])
    a = clients(mqtt_broker, dev_a, pw_a).connected()

    assert not a.publish(device_topic(dev_a, Channel.SAMPLES), b"secret frame").is_failure
    assert not server_client.publish(device_topic(dev_b, Channel.COMMANDS), b"sentinel").is_failure

    msg = b.next_message()
    assert (msg.topic, msg.payload) == (device_topic(dev_b, Channel.COMMANDS), b"sentinel")
    assert b.drain() == []


def test_wrong_password_unknown_user_and_anonymous_are_refused(mqtt_broker, device_credentials, clients):
    dev, _ = device_credentials()
    for username, password in [(dev, "wrong-password"), ("nobody-here", "x"), (None, None)]:
        reason = clients(mqtt_broker, username, password).connect()
        assert reason.is_failure, (username, reason)
        assert reason.value in (0x86, 0x87), reason  # bad user name or password / not authorized


def test_client_id_is_the_user_name(mqtt_broker, device_credentials, clients, server_client):
    """A device that asks for another device's client id is still identified by its user
    name: it gets its own rights only, and it does not take over the other's session."""
    dev_a, pw_a = device_credentials()
    dev_b, pw_b = device_credentials()
    server_client.subscribe(server_subscriptions())
    b = clients(mqtt_broker, dev_b, pw_b, client_id=dev_b).connected()
    a = clients(mqtt_broker, dev_a, pw_a, client_id=dev_b).connected()

    assert a.publish(device_topic(dev_b, Channel.SAMPLES), b"as b").value == NOT_AUTHORIZED
    assert not a.publish(device_topic(dev_a, Channel.SAMPLES), b"as a").is_failure
    msg = server_client.next_message()
    assert (msg.topic, msg.payload) == (device_topic(dev_a, Channel.SAMPLES), b"as a")

    # B was not kicked out by A's connection with B's client id.
    assert not b.disconnected.is_set()
    assert not b.publish(device_topic(dev_b, Channel.SAMPLES), b"still b").is_failure
    assert server_client.next_message().payload == b"still b"


def test_retained_status_and_last_will(mqtt_broker, device_credentials, clients, server_client):
    dev, pw = device_credentials()
    status_topic = device_topic(dev, Channel.STATUS)
    spec = topic_spec(Channel.STATUS)
    assert spec.retain

    device = clients(mqtt_broker, dev, pw).will(
        status_topic, _status(dev, "offline"), qos=spec.qos, retain=True
    )
    device.connected()
    assert not device.publish(status_topic, _status(dev, "online"), qos=spec.qos, retain=True).is_failure

    # A subscriber that comes later gets the retained birth message.
    late = server_client
    late.subscribe([(status_topic, 1)])
    birth = late.next_message(retained=True)
    assert birth.retain
    assert decode_message(birth.topic, birth.payload).state == "online"

    # The connection dies without DISCONNECT (power loss): the broker publishes the will.
    device.client.loop_stop()
    sock = device.client.socket()
    assert sock is not None
    sock.close()
    will = late.next_message(timeout=10)
    assert will.topic == status_topic
    assert decode_message(will.topic, will.payload).state == "offline"

    # ...and it is retained for whoever subscribes next.
    late.client.unsubscribe(status_topic)
    time.sleep(0.2)
    late.subscribe([(status_topic, 1)])
    again = late.next_message(retained=True)
    assert again.retain
    assert decode_message(again.topic, again.payload).state == "offline"


def test_clean_disconnect_can_still_send_the_will(mqtt_broker, device_credentials, clients, server_client):
    dev, pw = device_credentials()
    status_topic = device_topic(dev, Channel.STATUS)
    server_client.subscribe([(status_topic, 1)])
    device = clients(mqtt_broker, dev, pw).will(status_topic, _status(dev, "offline"), qos=1, retain=True)
    device.connected()
    device.close(ReasonCode(PacketTypes.DISCONNECT, identifier=0x04))  # "Disconnect with Will Message"
    msg = server_client.next_message()
    assert decode_message(msg.topic, msg.payload).state == "offline"


def test_removed_user_is_refused_and_disconnected(mqtt_broker, clients):
    dev = f"dev-{uuid.uuid4().hex[:10]}"
    mqtt_broker.add_user(dev, "first-password")
    connected = clients(mqtt_broker, dev, "first-password").connected()
    assert mqtt_broker.remove_user(dev)
    assert connected.disconnected.wait(TIMEOUT), "the broker kept a removed user connected"
    assert clients(mqtt_broker, dev, "first-password").connect().is_failure


def test_oversized_publish_is_refused(mqtt_broker, device_credentials, clients, server_client):
    dev, pw = device_credentials()
    server_client.subscribe(server_subscriptions())
    device = clients(mqtt_broker, dev, pw).connected()
    info = device.client.publish(
        device_topic(dev, Channel.SAMPLES), b"x" * (mqtt_broker.max_packet_size + 1), qos=1
    )
    # paho either refuses it locally (the broker advertises its maximum packet size) or
    # the broker drops the connection; either way nothing reaches the server.
    if info.rc == mqtt.MQTT_ERR_SUCCESS:
        assert device.disconnected.wait(TIMEOUT)
        assert device.disconnect_reason is not None
        # 0x95 "Packet too large" when the broker reads the header first; with the socket
        # still being written under load, paho can see the close as 0x80 "Unspecified error".
        assert device.disconnect_reason.value in (0x95, 0x80)
    with pytest.raises(queue.Empty):
        server_client.next_message(timeout=0.5)


def test_device_user_names_are_validated(mqtt_broker):
    with pytest.raises(ValueError):
        mqtt_broker.add_user("bad/name", "pw")
    with pytest.raises(ValueError):
        mqtt_broker.add_user("_looks-like-server", "pw")  # not a device id
    with pytest.raises(ValueError):
        mqtt_broker.add_user("dev-x", "")
