"""The device's MQTT connection: retained online status with an offline last will, a
persistent session with a stable client id, commands in, events out (QoS from protocol)."""

from __future__ import annotations

import contextlib
import queue
import threading

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import BaseModel

from protocol import Channel, ProtocolError, decode_message, device_topic, encode_message, topic_spec
from protocol.messages import StatusMessage, channel_of

log = structlog.get_logger(__name__)

# CONNACK reasons after which retrying with the same credentials cannot help.
_AUTH_FAILURES = {"Bad user name or password", "Not authorized", "Banned", "Client identifier not valid"}


class AgentMqtt:
    def __init__(self, device_id: str, host: str, port: int, password: str, tls_ca: str | None = None) -> None:
        self.device_id = device_id
        self.commands: queue.Queue = queue.Queue(maxsize=100)
        self.auth_failed = threading.Event()
        self._connected = threading.Event()
        self._online_status: StatusMessage | None = None
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv5)
        self._client.username_pw_set(device_id, password)
        if tls_ca:
            self._client.tls_set(ca_certs=tls_ca)
        will = StatusMessage(device_id=device_id, state="offline")
        status_spec = topic_spec(Channel.STATUS)
        self._client.will_set(device_topic(device_id, Channel.STATUS), encode_message(will),
                              qos=status_spec.qos, retain=True)
        self._client.reconnect_delay_set(min_delay=1, max_delay=60)
        self._client.max_queued_messages_set(10_000)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._host, self._port = host, port

    def start(self, status: StatusMessage) -> None:
        self._online_status = status
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 24 * 3600  # commands sent while we are away still arrive
        self._client.connect_async(self._host, self._port, keepalive=30, clean_start=False, properties=props)
        self._client.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def update_status(self, status: StatusMessage) -> None:
        self._online_status = status
        if self.connected:
            self.publish(status)

    def publish(self, message: BaseModel) -> mqtt.MQTTMessageInfo:
        spec = topic_spec(channel_of(message))
        return self._client.publish(device_topic(self.device_id, spec.channel), encode_message(message),
                                    qos=spec.qos, retain=spec.retain)

    def publish_and_wait(self, message: BaseModel, timeout: float = 10.0) -> bool:
        """True once the broker acknowledged the message (PUBACK for QoS 1)."""
        if not self.connected:
            return False
        info = self.publish(message)
        try:
            info.wait_for_publish(timeout)
        except (RuntimeError, ValueError):
            return False
        return info.is_published()

    def stop(self) -> None:
        if self.connected:
            offline = StatusMessage(device_id=self.device_id, state="offline",
                                    active_version=self._online_status.active_version if self._online_status else None)
            info = self.publish(offline)
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(2)
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("mqtt.connect_refused", reason=str(reason_code))
            if str(reason_code) in _AUTH_FAILURES:
                # Wrong credentials will not fix themselves: stop hammering the broker.
                self.auth_failed.set()
                client.disconnect()
            return
        spec = topic_spec(Channel.COMMANDS)
        client.subscribe(device_topic(self.device_id, Channel.COMMANDS), qos=spec.qos)
        self._connected.set()
        if self._online_status is not None:
            self.publish(self._online_status)
        log.info("mqtt.connected", session_present=flags.session_present)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connected.clear()
        log.warning("mqtt.disconnected", reason=str(reason_code))

    def _on_message(self, client, userdata, message) -> None:
        try:
            command = decode_message(message.topic, message.payload)
        except ProtocolError as exc:
            log.warning("mqtt.bad_command", error=str(exc))
            return
        try:
            self.commands.put_nowait(command)
        except queue.Full:
            log.error("mqtt.command_queue_full", command=command.type)
