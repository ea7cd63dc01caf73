"""The server's MQTT connection: subscribes to every device channel, publishes commands."""

from __future__ import annotations

import threading
from collections.abc import Callable

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from protocol import Channel, device_topic, encode_message, server_subscriptions, topic_spec

log = structlog.get_logger(__name__)

MessageHandler = Callable[[str, bytes], None]
RECEIVE_MAXIMUM = 65535  # the most unacknowledged QoS 1 messages MQTT allows (16-bit packet ids)
# Commands the server keeps in flight to the broker (paho's default is 20), within what the broker's
# CONNACK allows: with 20, a fan-out to 10,000 devices moved 20 commands per round trip, and none
# while the network thread waited on a full ingest queue.
MAX_COMMANDS_IN_FLIGHT = 1000
# server.ingest_queues.IngestDispatcher.submit: (topic, payload, qos, ack) -> taken
MessageSink = Callable[[str, bytes, int, Callable[[], object]], object]


class MqttBus:
    def __init__(
        self,
        host: str,
        port: int,
        username: str,
        password: str,
        client_id: str,
        handler: MessageHandler,
        tls_ca: str | None = None,
        sink: MessageSink | None = None,
        shared_group: str | None = None,
        primary: bool = True,
    ) -> None:
        """With ``shared_group`` this server is one replica of several sharing the device traffic
        (:func:`protocol.server_subscriptions`). ``handler`` runs each message on paho's network
        thread and paho acknowledges it when it returns. With ``sink`` (the ingest dispatcher) the network thread only hands the message over
        and the sink acknowledges a QoS 1 message once it is handled (paho's ``manual_ack``)."""
        self._handler = handler
        self._sink = sink
        self._subscriptions = server_subscriptions(shared_group, primary=primary)
        self._shared = shared_group is not None
        self._connected = threading.Event()
        self._generation = 0  # connections so far: an ack for a message of an earlier one is not sent
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5, reconnect_on_failure=True,
            manual_ack=sink is not None,
        )
        self._client.username_pw_set(username, password)
        self._client.max_inflight_messages_set(MAX_COMMANDS_IN_FLIGHT)
        if tls_ca:
            self._client.tls_set(ca_certs=tls_ca)
        self._client.reconnect_delay_set(min_delay=1, max_delay=30)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._host, self._port = host, port

    def start(self, timeout: float = 10.0) -> None:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600  # keep QoS 1 device events queued across a server restart
        if self._sink is not None:
            # Messages are acknowledged once handled, so let the broker keep that many unacknowledged
            # ones with us (Mosquitto's default is 20, and what it cannot send it queues up to its
            # max_queued_messages, 1000 by default, then drops): the dispatcher's bounded queues and
            # its blocking of the network thread are the back-pressure instead.
            props.ReceiveMaximum = RECEIVE_MAXIMUM
        self._client.connect(self._host, self._port, keepalive=30, clean_start=False, properties=props)
        self._client.loop_start()
        if not self._connected.wait(timeout):
            self._client.loop_stop()
            raise ConnectionError(f"MQTT broker {self._host}:{self._port} did not accept the server in {timeout}s")

    def stop(self) -> None:
        props = None
        if self._shared:
            # A replica that leaves cleanly ends its session: Mosquitto would otherwise go on queueing
            # its share of the traffic for it until it returns. (Killed, it keeps the session, and
            # what was queued for it is delivered when it restarts under the same client id.)
            props = Properties(PacketTypes.DISCONNECT)
            props.SessionExpiryInterval = 0
        self._client.disconnect(properties=props)
        self._client.loop_stop()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def publish_command(self, device_id: str, command) -> None:
        spec = topic_spec(Channel.COMMANDS)
        info = self._client.publish(
            device_topic(device_id, Channel.COMMANDS), encode_message(command), qos=spec.qos, retain=spec.retain
        )
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise ConnectionError(f"could not queue command for {device_id}: {mqtt.error_string(info.rc)}")

    def publish(self, topic: str, payload: bytes, qos: int) -> None:
        """Server-level topics (alerts); device commands go through publish_command."""
        info = self._client.publish(topic, payload, qos=qos, retain=False)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise ConnectionError(f"could not queue message on {topic}: {mqtt.error_string(info.rc)}")

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("mqtt.connect_refused", reason=str(reason_code))
            return
        self._generation += 1
        # MQTT v5: the broker says how many unacknowledged QoS 1 messages it takes (65,535 unsaid).
        # paho sets its window before connecting only; narrowing it here is safe (it only compares).
        allowed = getattr(properties, "ReceiveMaximum", RECEIVE_MAXIMUM) if properties is not None else RECEIVE_MAXIMUM
        if int(allowed) < client.max_inflight_messages:
            client._max_inflight_messages = max(1, int(allowed))
            log.info("mqtt.inflight_window", allowed=int(allowed))
        client.subscribe(self._subscriptions)
        self._connected.set()
        log.info("mqtt.connected", host=self._host, port=self._port)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connected.clear()
        log.warning("mqtt.disconnected", reason=str(reason_code))

    def _on_message(self, client, userdata, message) -> None:
        if self._sink is not None:
            ack = self._ack_for(message.mid, message.qos)
            try:
                self._sink(message.topic, message.payload, message.qos, ack)
            except Exception:  # never leave a QoS 1 message unacknowledged by accident
                log.exception("mqtt.sink_failed", topic=message.topic)
                ack()
            return
        try:
            self._handler(message.topic, message.payload)
        except Exception:  # one bad message must never kill the network loop
            log.exception("mqtt.handler_failed", topic=message.topic)

    def _ack_for(self, mid: int, qos: int) -> Callable[[], object]:
        if qos == 0:
            return _no_ack
        generation = self._generation

        def ack() -> None:
            # After a reconnect the broker delivers unacknowledged messages again (with the same ids):
            # an ack from the old connection would acknowledge the wrong delivery.
            if generation == self._generation:
                self._client.ack(mid, qos)

        return ack


def _no_ack() -> None:
    return None
