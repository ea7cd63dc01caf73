"""The device's MQTT connection.

- Per-device credentials (user name = device id = client id, which the broker also forces)
  and optional TLS: the broker is verified against the configured CA only (pinned, not the
  system store), TLS 1.2 or later, host name checked; a client certificate when given.
- A retained ``status``: ``online`` on every connect, ``offline`` as last will and on stop.
- A persistent session (clean start off, session expiry) so commands sent while the device
  is away still arrive; the command subscription is renewed on every connect anyway, in
  case the broker lost its sessions.
- Reconnects with exponential backoff (paho's: min, doubling, capped at max). A refused
  CONNACK for bad credentials / not authorised sets ``auth_failed`` and stops retrying.
- Events: QoS 1, non-retained channels go through the on-disk :class:`Outbox`: stored
  durably first, sent in order by one sender thread while connected (a bounded window in
  flight) and deleted only on PUBACK. QoS 0 (heartbeat) is sent only while connected, late
  heartbeats are worthless; the retained status is re-sent on connect, so neither is queued.
"""

from __future__ import annotations

import contextlib
import queue
import ssl
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import BaseModel

from edge_agent.outbox import Outbox, OutboxEntry, OutboxSender
from protocol import Channel, ProtocolError, decode_message, device_topic, encode_message, topic_spec
from protocol.messages import StatusMessage, channel_of

if TYPE_CHECKING:
    from edge_agent.settings import AgentSettings

log = structlog.get_logger(__name__)

# CONNACK reasons after which retrying with the same credentials cannot help.
_AUTH_FAILURES = {"Bad user name or password", "Not authorized", "Banned", "Client identifier not valid"}
SESSION_EXPIRY_S = 24 * 3600


@dataclass(frozen=True)
class MqttTls:
    """TLS towards the broker. ``ca_file`` pins the broker's CA (None: the system trust store);
    ``cert_file`` + ``key_file`` present a client certificate; ``server_name`` is the name the
    broker certificate must carry when it differs from the host connected to (e.g. an IP)."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("a client certificate needs both cert_file and key_file")

    def context(self) -> ssl.SSLContext:
        ctx = _ServerNameContext(ssl.PROTOCOL_TLS_CLIENT)  # verify_mode CERT_REQUIRED, check_hostname on
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.ca_file is not None:
            ctx.load_verify_locations(cafile=str(self.ca_file))  # only this CA: no load_default_certs()
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        if self.cert_file is not None:
            ctx.load_cert_chain(str(self.cert_file), str(self.key_file))
        ctx.server_name = self.server_name
        return ctx


class _ServerNameContext(ssl.SSLContext):
    """paho passes the host it connects to as ``server_hostname``; this lets a configured
    name win (the broker reached by IP or an internal name its certificate does not carry)."""

    server_name: str | None = None

    def wrap_socket(self, sock, *args, server_hostname=None, **kwargs):
        return super().wrap_socket(sock, *args, server_hostname=self.server_name or server_hostname, **kwargs)


class AgentMqtt:
    def __init__(
        self,
        device_id: str,
        host: str,
        port: int,
        password: str,
        tls_ca: str | None = None,
        *,
        tls: MqttTls | None = None,
        outbox_path: Path | None = None,
        outbox_max_messages: int = 10_000,
        outbox_max_bytes: int = 64 * 1024 * 1024,
        reconnect_min_s: float = 1.0,
        reconnect_max_s: float = 60.0,
        inflight_window: int = 20,
        keepalive_s: int = 30,
    ) -> None:
        if not 0 < reconnect_min_s <= reconnect_max_s:
            raise ValueError("need 0 < reconnect_min_s <= reconnect_max_s")
        self.device_id = device_id
        self.commands: queue.Queue = queue.Queue(maxsize=100)
        self.auth_failed = threading.Event()
        self.connect_failures = 0  # consecutive failed attempts (socket/TLS errors, refused CONNACKs)
        self.last_connect_error: str | None = None
        # The outbox outlives stop(): an event raised by a thread still finishing is stored
        # and sent on the next start.
        self.outbox = Outbox(outbox_path, max_messages=outbox_max_messages, max_bytes=outbox_max_bytes)
        self._connected = threading.Event()
        self._stopping = False
        self._attempt_settled = False  # the current attempt got a CONNACK or was counted as failed
        self._online_status: StatusMessage | None = None
        self._host, self._port, self._keepalive = host, port, keepalive_s
        self._sender = OutboxSender(self.outbox, self._send_entry, window=inflight_window)
        self._refused: dict[int, str] = {}  # packet id -> reason, for publish_and_wait

        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv5)
        self._client.username_pw_set(device_id, password)
        if tls is None and tls_ca:
            tls = MqttTls(ca_file=Path(tls_ca))
        self.tls = tls
        if tls is not None:
            self._client.tls_set_context(tls.context())
        will = StatusMessage(device_id=device_id, state="offline")
        status_spec = topic_spec(Channel.STATUS)
        self._client.will_set(device_topic(device_id, Channel.STATUS), encode_message(will),
                              qos=status_spec.qos, retain=True)
        self._client.reconnect_delay_set(min_delay=reconnect_min_s, max_delay=reconnect_max_s)
        self._reconnect = (reconnect_min_s, reconnect_max_s)
        # Our own events are bounded by the window; this bounds the status/sample/heartbeat rest.
        self._client.max_queued_messages_set(1_000)
        self._client.on_pre_connect = self._on_pre_connect
        self._client.on_connect = self._on_connect
        self._client.on_connect_fail = self._on_connect_fail
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_publish = self._on_publish

    @classmethod
    def from_settings(cls, settings: AgentSettings) -> AgentMqtt:
        tls = None
        if settings.mqtt_tls_ca or settings.mqtt_tls_cert:
            tls = MqttTls(ca_file=settings.mqtt_tls_ca, cert_file=settings.mqtt_tls_cert,
                          key_file=settings.mqtt_tls_key, server_name=settings.mqtt_tls_server_name)
        return cls(
            settings.device_id, settings.mqtt_host, settings.mqtt_port, settings.mqtt_password.get_secret_value(),
            tls=tls,
            outbox_path=settings.data_dir / "outbox.db",
            outbox_max_messages=settings.mqtt_outbox_max_messages,
            outbox_max_bytes=settings.mqtt_outbox_max_bytes,
            reconnect_min_s=settings.mqtt_reconnect_min_s,
            reconnect_max_s=settings.mqtt_reconnect_max_s,
        )

    # -- lifecycle -----------------------------------------------------------------------

    def start(self, status: StatusMessage) -> None:
        self._online_status = status
        self._stopping = False
        self._sender.start()
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY_S  # commands sent while we are away still arrive
        log.info("mqtt.starting", host=self._host, port=self._port, tls=self.tls is not None,
                 pinned_ca=bool(self.tls and self.tls.ca_file), client_cert=bool(self.tls and self.tls.cert_file),
                 outbox=len(self.outbox))
        self._client.connect_async(self._host, self._port, keepalive=self._keepalive, clean_start=False,
                                   properties=props)
        self._client.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def wait_drained(self, timeout: float) -> bool:
        """True once every outboxed event was acknowledged by the broker."""
        deadline = time.monotonic() + timeout
        while len(self.outbox):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def stop(self, drain_timeout: float = 2.0) -> None:
        """Publish ``offline``, give queued events a moment to be acknowledged, disconnect.
        Whatever is still in the outbox is sent after the next start."""
        self._stopping = True
        if self.connected:
            self.wait_drained(drain_timeout)
            offline = StatusMessage(device_id=self.device_id, state="offline",
                                    active_version=self._online_status.active_version if self._online_status else None)
            info = self._publish_direct(offline)
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(2)
        self._client.disconnect()
        self._client.loop_stop()
        self._sender.stop()
        log.info("mqtt.stopped", outbox=len(self.outbox), outbox_dropped=self.outbox.dropped)

    # -- publishing ----------------------------------------------------------------------

    def update_status(self, status: StatusMessage) -> None:
        self._online_status = status
        if self.connected:
            self.publish(status)

    def publish(self, message: BaseModel) -> int | None:
        """Send an event. QoS 1 non-retained channels are outboxed (returns the outbox sequence
        number; delivery follows, in order, whenever the broker is reachable); anything else is
        sent now if connected (returns None)."""
        spec = topic_spec(channel_of(message))
        if spec.qos >= 1 and not spec.retain:
            seq = self.outbox.append(device_topic(self.device_id, spec.channel), encode_message(message), spec.qos)
            self._sender.wake()
            return seq
        self._publish_direct(message)
        return None

    def publish_and_wait(self, message: BaseModel, timeout: float = 10.0) -> bool:
        """True once the broker acknowledged the message (PUBACK for QoS 1). Bypasses the outbox:
        the caller (the sample spool) keeps the message durably and retries itself."""
        if not self.connected:
            return False
        info = self._publish_direct(message)
        try:
            info.wait_for_publish(timeout)
        except (RuntimeError, ValueError):
            return False
        # paho marks a message published on any PUBACK, a refusal (e.g. not authorised) too.
        refused = self._refused.pop(info.mid, None)
        if refused is not None:
            log.error("mqtt.publish_refused", channel=channel_of(message).value, reason=refused)
            return False
        return info.is_published()

    def _publish_direct(self, message: BaseModel) -> mqtt.MQTTMessageInfo:
        spec = topic_spec(channel_of(message))
        return self._client.publish(device_topic(self.device_id, spec.channel), encode_message(message),
                                    qos=spec.qos, retain=spec.retain)

    def _send_entry(self, entry: OutboxEntry) -> int | None:
        """OutboxSender's publish: paho's packet id, or None when paho's queue is full."""
        info = self._client.publish(entry.topic, entry.payload, qos=entry.qos)
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            log.warning("mqtt.client_queue_full", seq=entry.seq)
            return None
        # MQTT_ERR_NO_CONN (the connection was lost a moment ago): paho keeps the message and
        # sends it after the reconnect, so it is in flight all the same.
        return info.mid

    # -- paho callbacks (network thread) ----------------------------------------------------

    def _on_pre_connect(self, client, userdata) -> None:
        self._attempt_settled = False

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self._attempt_settled = True
        if reason_code.is_failure:
            self.connect_failures += 1
            self.last_connect_error = str(reason_code)
            if str(reason_code) in _AUTH_FAILURES:
                # Wrong credentials will not fix themselves: stop hammering the broker.
                log.error("mqtt.auth_failed", reason=str(reason_code), device=self.device_id,
                          hint="the broker refused this device's credentials; not retrying")
                self.auth_failed.set()
                client.disconnect()
            else:
                log.error("mqtt.connect_refused", reason=str(reason_code), attempt=self.connect_failures,
                          next_retry_s=self._next_delay())
            return
        spec = topic_spec(Channel.COMMANDS)
        client.subscribe(device_topic(self.device_id, Channel.COMMANDS), qos=spec.qos)
        self.connect_failures = 0
        self.last_connect_error = None
        self._connected.set()
        if self._online_status is not None:
            self._publish_direct(self._online_status)
        self._sender.connected()
        log.info("mqtt.connected", host=self._host, port=self._port, session_present=flags.session_present,
                 outbox=len(self.outbox))

    def _on_connect_fail(self, client, userdata) -> None:
        # paho calls this inside its `except OSError` block: the exception is still current.
        exc = sys.exc_info()[1]
        self._attempt_settled = True
        self.connect_failures += 1
        self.last_connect_error = repr(exc)
        fields = dict(host=self._host, port=self._port, attempt=self.connect_failures,
                      next_retry_s=self._next_delay(), outbox=len(self.outbox))
        if isinstance(exc, ssl.SSLCertVerificationError):
            log.error("mqtt.tls_verify_failed", error=exc.verify_message or str(exc), **fields)
        elif isinstance(exc, ssl.SSLError):
            log.error("mqtt.tls_failed", error=str(exc), **fields)
        else:
            log.warning("mqtt.connect_failed", error=str(exc), **fields)

    def _next_delay(self) -> float:
        low, high = self._reconnect
        return min(low * 2 ** max(self.connect_failures - 1, 0), high)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        self._sender.disconnected()
        if was_connected:
            (log.info if self._stopping else log.warning)(
                "mqtt.disconnected", reason=str(reason_code), outbox=len(self.outbox))
        elif not self._attempt_settled:
            # Closed before any CONNACK: e.g. a TLS 1.3 broker rejecting our client certificate
            # (its verdict comes after the handshake), or a broker shutting down.
            self._attempt_settled = True
            self.connect_failures += 1
            self.last_connect_error = f"connection closed before CONNACK ({reason_code})"
            log.error("mqtt.connect_failed", error=self.last_connect_error, host=self._host, port=self._port,
                      attempt=self.connect_failures, next_retry_s=self._next_delay(),
                      hint="check the client certificate if the broker requires one")

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        refused = str(reason_code) if reason_code.is_failure else None
        if refused is not None:
            if len(self._refused) > 1000:  # entries nobody waited for: keep it bounded
                self._refused.clear()
            self._refused[mid] = refused
        self._sender.acked(mid, refused)

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
