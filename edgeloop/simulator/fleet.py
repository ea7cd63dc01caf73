"""Many simulated devices on one asyncio loop: one paho MQTT v5 client per device, no thread per client.

Each client runs in paho's "external event loop" mode: its socket is registered with the asyncio
loop (``add_reader`` → ``loop_read``, ``add_writer`` while paho has bytes queued → ``loop_write``) and
one timer calls ``loop_misc`` (keepalive pings, QoS retries) for every client once a second. Device
behaviour comes from :class:`~edgeloop.simulator.device.SimDevice`; this module only schedules it:
jittered heartbeats, shadow windows while shadowing, drift windows, sample events with real PNG images
uploaded through the server's presigned-upload grant, and the OTA steps that commands lead to.

Counters (:class:`Counters`) say what was offered per message type, what the broker acknowledged (QoS 1),
and which commands arrived when, so that a benchmark can compare sent against what the server counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import socket
import struct
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgeloop.simulator.credentials import Credential
from edgeloop.simulator.device import OFFLINE, FleetProfile, SimDevice, Step, Timings
from protocol import Channel, ProtocolError, decode_message, device_topic, encode_message, topic_spec
from protocol.api import UploadGrant, UploadRequest, upload_path
from protocol.messages import channel_of

log = logging.getLogger(__name__)


@dataclass
class FleetConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    heartbeat_seconds: float = 5.0
    # One shadow window this often while shadowing; None: as an agent does, one per the deploy's
    # shadow_frames at the device's frame rate.
    shadow_seconds: float | None = None
    drift_seconds: float = 0.0  # one drift window per device this often (0: none)
    samples_per_minute: float = 0.0  # per device; needs api_url and the devices' API tokens
    api_url: str | None = None
    connects_per_second: float = 400.0  # connection ramp (the broker's and the server's ingest)
    keepalive: int = 60
    active_version: int | None = 1
    image_size: int = 64
    profile: FleetProfile = field(default_factory=FleetProfile)
    timings: Timings = field(default_factory=Timings)
    seed: int = 0


@dataclass
class Counters:
    sent: Counter = field(default_factory=Counter)  # message type -> published (handed to the socket)
    acked: Counter = field(default_factory=Counter)  # QoS 1 PUBACKs with a success reason
    refused: Counter = field(default_factory=Counter)  # QoS 1 PUBACKs with a failure reason (e.g. 0x87)
    commands: Counter = field(default_factory=Counter)  # command type -> received
    bad_commands: int = 0
    connected: int = 0
    connect_failures: int = 0
    disconnects: int = 0
    uploads: int = 0
    upload_failures: int = 0
    upload_errors: Counter = field(default_factory=Counter)  # "ExcType: message" -> count, for diagnosis
    uploads_started: int = 0
    upload_retries: int = 0  # transport errors retried (as an agent's spool retries an upload)
    # (wall-clock time, device id, command type, version) of each command received
    command_log: list[tuple[float, str, str, int | None]] = field(default_factory=list)
    # (wall-clock time, device id, to_state, version) of each update event published
    update_log: list[tuple[float, str, str, int]] = field(default_factory=list)

    def snapshot(self) -> dict:
        return {"sent": dict(self.sent), "acked": dict(self.acked), "refused": dict(self.refused),
                "commands": dict(self.commands), "bad_commands": self.bad_commands, "connected": self.connected,
                "connect_failures": self.connect_failures, "disconnects": self.disconnects,
                "uploads": self.uploads, "upload_failures": self.upload_failures,
                "uploads_started": self.uploads_started, "upload_errors": dict(self.upload_errors),
                "upload_retries": self.upload_retries,
                "command_times": _spans((t, f"{kind}:v{v}") for t, _d, kind, v in self.command_log),
                "update_times": _spans((t, f"{state}:v{v}") for t, _d, state, v in self.update_log)}


def _spans(items) -> dict[str, list[float]]:
    """kind -> [first, last wall-clock time, count]."""
    out: dict[str, list[float]] = {}
    for t, kind in items:
        span = out.setdefault(kind, [t, t, 0])
        span[0], span[1], span[2] = min(span[0], t), max(span[1], t), span[2] + 1
    return out


def png_bytes(width: int, height: int, rng: random.Random) -> bytes:
    """A real (decodable) RGB PNG: a noisy gradient, different on every call."""
    base = rng.randrange(256)
    rows = bytearray()
    for y in range(height):
        rows.append(0)  # filter: none
        rows += bytes(((base + x + y + rng.randrange(16)) & 0xFF) for x in range(width * 3))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(rows), 6)) + \
        chunk(b"IEND", b"")


class _Client:
    """One device: its model, its paho client and its timers."""

    def __init__(self, fleet: Fleet, cred: Credential, model: SimDevice) -> None:
        self.fleet, self.cred, self.model = fleet, cred, model
        self.device_id = cred.device_id
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cred.mqtt_username, protocol=mqtt.MQTTv5)
        c.username_pw_set(cred.mqtt_username, cred.mqtt_password)
        c.will_set(device_topic(self.device_id, Channel.STATUS),
                   encode_message(model.status_message("offline")), qos=1, retain=True)
        c.max_queued_messages_set(0)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        c.on_socket_open = self._on_socket_open
        c.on_socket_close = self._on_socket_close
        c.on_socket_register_write = self._on_register_write
        c.on_socket_unregister_write = self._on_unregister_write
        self.mqtt = c
        self.online = False
        self.stopping = False
        self._pending: dict[int, str] = {}  # QoS 1 mid -> message type
        self._timers: dict[str, asyncio.TimerHandle] = {}

    # ------------------------------------------------------------ socket plumbing (external loop)

    def _on_socket_open(self, client, _userdata, sock) -> None:
        self.fleet.loop.add_reader(sock, client.loop_read)

    def _on_socket_close(self, client, _userdata, sock) -> None:
        with contextlib.suppress(Exception):
            self.fleet.loop.remove_reader(sock)
            self.fleet.loop.remove_writer(sock)

    def _on_register_write(self, client, _userdata, sock) -> None:
        self.fleet.loop.add_writer(sock, client.loop_write)

    def _on_unregister_write(self, client, _userdata, sock) -> None:
        with contextlib.suppress(Exception):
            self.fleet.loop.remove_writer(sock)

    def connect(self) -> None:
        try:
            self.mqtt.connect(self.fleet.config.host, self.fleet.config.port, keepalive=self.fleet.config.keepalive)
            sock = self.mqtt.socket()
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        except OSError as exc:
            self.fleet.counters.connect_failures += 1
            log.debug("connect %s failed: %s", self.device_id, exc)
            self._later("reconnect", 2 + random.random() * 3, self.connect)

    # ------------------------------------------------------------ MQTT callbacks

    def _on_connect(self, client, _userdata, _flags, reason_code, _props) -> None:
        if reason_code.is_failure:
            self.fleet.counters.connect_failures += 1
            log.warning("%s: broker refused the connection: %s", self.device_id, reason_code)
            return
        self.online = True
        self.fleet.counters.connected += 1
        client.subscribe(device_topic(self.device_id, Channel.COMMANDS), qos=1)
        self.publish(self.model.status_message("online"))
        cfg = self.fleet.config
        rng = self.fleet.rng
        self._later("heartbeat", rng.uniform(0, cfg.heartbeat_seconds), self._heartbeat)
        if cfg.drift_seconds > 0:
            self._later("drift", rng.uniform(0, cfg.drift_seconds), self._drift)
        if cfg.samples_per_minute > 0 and cfg.api_url and self.cred.api_token:
            self._later("sample", rng.expovariate(cfg.samples_per_minute / 60), self._sample)
        if self.model.shadowing:
            self._later("shadow", self._shadow_interval(), self._shadow)

    def _on_disconnect(self, _client, _userdata, _flags, reason_code, _props) -> None:
        was = self.online
        self.online = False
        for name in ("heartbeat", "drift", "sample", "shadow"):
            self._cancel(name)
        if self.stopping:
            return
        if was:
            self.fleet.counters.disconnects += 1
            self.fleet.counters.connected -= 1
        self._later("reconnect", 1 + random.random() * 4, self._reconnect)

    def _reconnect(self) -> None:
        try:
            self.mqtt.reconnect()
        except OSError:
            self._later("reconnect", 2 + random.random() * 4, self._reconnect)

    def _on_publish(self, _client, _userdata, mid, reason_code, _props) -> None:
        kind = self._pending.pop(mid, None)
        if kind is None:
            return
        if reason_code.is_failure:
            self.fleet.counters.refused[kind] += 1
        else:
            self.fleet.counters.acked[kind] += 1

    def _on_message(self, _client, _userdata, msg) -> None:
        counters = self.fleet.counters
        try:
            command = decode_message(msg.topic, msg.payload)
        except ProtocolError as exc:
            counters.bad_commands += 1
            log.warning("%s: refused a command: %s", self.device_id, exc)
            return
        counters.commands[command.type] += 1
        counters.command_log.append((time.time(), self.device_id, command.type,
                                     getattr(command, "version", getattr(command, "to_version", None))))
        self.run_steps(self.model.on_command(command))

    # ------------------------------------------------------------ behaviour

    def publish(self, message) -> None:
        if not self.online:
            return
        channel = channel_of(message)
        spec = topic_spec(channel)
        info = self.mqtt.publish(device_topic(self.device_id, channel), encode_message(message), qos=spec.qos,
                                 retain=spec.retain)
        if info.rc == mqtt.MQTT_ERR_SUCCESS:
            self.fleet.counters.sent[message.type] += 1
            if spec.qos:
                self._pending[info.mid] = message.type

    def run_steps(self, steps: list[Step]) -> None:
        at = 0.0
        for step in steps:
            at += step.delay
            if at <= 0:
                self._take(step)
            else:
                self.fleet.loop.call_later(at, self._take, step)

    def _take(self, step: Step) -> None:
        event = self.model.apply(step)
        if event is None:
            return
        self.publish(event)
        self.fleet.counters.update_log.append((time.time(), self.device_id, event.to_state, event.version))
        if event.to_state == "SHADOWING":
            self._later("shadow", self._shadow_interval(), self._shadow)
        elif event.to_state in ("ACTIVE", "ROLLED_BACK", "REJECTED", "FAILED"):
            self._cancel("shadow")
            self.publish(self.model.status_message("online"))  # the retained status follows the switch

    def _heartbeat(self) -> None:
        interval = self.fleet.config.heartbeat_seconds
        self.publish(self.model.heartbeat(interval))
        self._later("heartbeat", interval * self.fleet.rng.uniform(0.9, 1.1), self._heartbeat)

    def _shadow_interval(self) -> float:
        return self.fleet.config.shadow_seconds or self.model.shadow_window_seconds

    def _shadow(self) -> None:
        report = self.model.shadow_report()
        if report is None:
            return
        self.publish(report)
        self._later("shadow", self._shadow_interval(), self._shadow)

    def _drift(self) -> None:
        self.publish(self.model.drift_report())
        self._later("drift", self.fleet.config.drift_seconds, self._drift)

    def _sample(self) -> None:
        cfg = self.fleet.config
        task = self.fleet.loop.create_task(self.fleet.upload_sample(self))
        self.fleet.tasks.add(task)
        task.add_done_callback(self.fleet.tasks.discard)
        self._later("sample", self.fleet.rng.expovariate(cfg.samples_per_minute / 60), self._sample)

    # ------------------------------------------------------------ timers

    def _later(self, name: str, delay: float, fn: Callable[[], None]) -> None:
        self._cancel(name)
        self._timers[name] = self.fleet.loop.call_later(delay, fn)

    def _cancel(self, name: str) -> None:
        handle = self._timers.pop(name, None)
        if handle is not None:
            handle.cancel()

    def goodbye(self) -> None:
        """Stop every timer and publish the retained ``offline`` status (a clean disconnect suppresses
        the last will, so the device says it itself, as the agent does on shutdown)."""
        self.stopping = True
        for name in list(self._timers):
            self._cancel(name)
        self.publish(self.model.status_message("offline"))

    @property
    def unacked(self) -> int:
        return len(self._pending)

    def close(self) -> None:
        self.stopping = True
        if self.online:
            self.mqtt.disconnect()
        self.online = False


class Fleet:
    """Runs ``credentials`` as simulated devices on the current asyncio loop (see :meth:`run`),
    or on one background thread (:meth:`start_in_thread`)."""

    def __init__(self, credentials: list[Credential], config: FleetConfig, *,
                 verify_rollback: Callable | None = None) -> None:
        self.config = config
        self.counters = Counters()
        self.rng = random.Random(config.seed)
        self.clients: list[_Client] = []
        self.offline: list[str] = []
        self.tasks: set[asyncio.Task] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._http = None
        self.loop_lag = 0.0  # seconds the run loop last woke late (progress lines show it)
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        for cred in credentials:
            behaviour = config.profile.behaviour(cred.device_id)
            if behaviour == OFFLINE:
                self.offline.append(cred.device_id)
                continue
            model = SimDevice(cred.device_id, behaviour=behaviour, timings=config.timings,
                              active_version=config.active_version,
                              verify_rollback=verify_rollback, rng=random.Random(f"{config.seed}:{cred.device_id}"))
            self.clients.append(_Client(self, cred, model))

    @property
    def devices(self) -> dict[str, SimDevice]:
        return {c.device_id: c.model for c in self.clients}

    async def run(self, duration: float | None = None, progress: Callable[[Fleet], None] | None = None,
                  progress_seconds: float = 5.0) -> Counters:
        """Connect every device (ramped), run for ``duration`` seconds (None: until :meth:`stop`), then
        disconnect them."""
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        misc = self.loop.create_task(self._misc())
        try:
            if self.config.samples_per_minute > 0 and self.config.api_url:
                import httpx

                self._http = httpx.AsyncClient(base_url=self.config.api_url, timeout=30)
            self._ready.set()
            gap = 1.0 / max(self.config.connects_per_second, 1.0)
            for i, client in enumerate(self.clients):
                if self._stop.is_set():
                    break
                client.connect()
                if i % 20 == 19:
                    await asyncio.sleep(gap * 20)
            end = None if duration is None else self.loop.time() + duration
            while not self._stop.is_set():
                left = progress_seconds if end is None else min(progress_seconds, end - self.loop.time())
                if left <= 0:
                    break
                due = self.loop.time() + left
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), left)
                # How late the loop woke: a saturated simulator shows here, not as a slow server.
                self.loop_lag = max(0.0, self.loop.time() - due) if not self._stop.is_set() else 0.0
                if progress is not None:
                    progress(self)
        finally:
            await self._finish_uploads(30.0)
            for client in self.clients:
                client.goodbye()
            deadline = self.loop.time() + 5.0  # the broker acknowledges what is in flight
            while self.loop.time() < deadline and any(c.unacked for c in self.clients if c.online):
                await asyncio.sleep(0.1)
            for client in self.clients:
                client.close()
            await asyncio.sleep(0.3)  # let the DISCONNECTs go out
            misc.cancel()
            for task in list(self.tasks):
                task.cancel()
            if self._http is not None:
                await self._http.aclose()
        return self.counters

    async def _finish_uploads(self, timeout: float) -> None:
        """Let the uploads under way finish before the devices say goodbye: a slow server must show as
        slow uploads or counted failures, not as samples that silently never happened."""
        for client in self.clients:
            client._cancel("sample")  # no new uploads while the last ones finish
        pending = [t for t in self.tasks if not t.done()]
        if not pending:
            return
        _done, late = await asyncio.wait(pending, timeout=timeout)
        for task in late:
            task.cancel()
            self.counters.upload_failures += 1
            self.counters.upload_errors[f"unfinished after {timeout:g} s at shutdown"] += 1

    async def _misc(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            for client in self.clients:
                if client.online or client.mqtt.socket() is not None:
                    client.mqtt.loop_misc()

    def stop(self) -> None:
        if self.loop is not None and self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)

    # ------------------------------------------------------------ one thread for the whole fleet

    def start_in_thread(self) -> Fleet:
        def main() -> None:
            try:
                asyncio.run(self.run())
            except BaseException as exc:  # surfaced by join()
                self._error = exc
                self._ready.set()

        self._thread = threading.Thread(target=main, name="simulated-fleet", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        return self

    def call(self, fn: Callable, *args) -> None:
        """Run ``fn(*args)`` on the fleet's loop (paho clients are not thread-safe)."""
        assert self.loop is not None
        self.loop.call_soon_threadsafe(fn, *args)

    def join(self, timeout: float = 30) -> None:
        self.stop()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._error is not None:
            raise self._error

    # ------------------------------------------------------------ samples

    async def upload_sample(self, client: _Client) -> None:
        """Upload one real image through the server's presigned grant, then announce it (QoS 1)."""
        size = self.config.image_size
        data = png_bytes(size, size, self.rng)
        sha = hashlib.sha256(data).hexdigest()
        headers = {"Authorization": f"Bearer {client.cred.api_token}"}
        self.counters.uploads_started += 1
        try:
            grant = await self._upload(client, headers, sha, data)
        except Exception as exc:  # httpx errors, a refused grant: counted, the device goes on
            self.counters.upload_failures += 1
            self.counters.upload_errors[f"{type(exc).__name__}: {str(exc)[:120]}"] += 1
            log.debug("%s: upload failed: %s", client.device_id, exc)
            return
        self.counters.uploads += 1
        client.publish(client.model.sample_event(object_key=grant.object_key, sha256=sha, size_bytes=len(data),
                                                 width=size, height=size))


    async def _upload(self, client: _Client, headers: dict, sha: str, data: bytes, attempts: int = 3) -> UploadGrant:
        """The grant, then the PUT; a transport error (a keep-alive connection the server closed as
        it was reused, a reset) is retried, as the agent's spool retries: both calls are idempotent."""
        import httpx

        for attempt in range(attempts):
            try:
                response = await self._http.post(upload_path(client.device_id), headers=headers, json=UploadRequest(
                    sha256=sha, size_bytes=len(data), content_type="image/png").model_dump())
                response.raise_for_status()
                grant = UploadGrant.model_validate(response.json())
                put = await self._http.put(grant.url, content=data, headers=grant.headers)
                put.raise_for_status()
                return grant
            except httpx.TransportError:
                if attempt == attempts - 1:
                    raise
                self.counters.upload_retries += 1
                await asyncio.sleep(0.5 * (attempt + 1))
        raise AssertionError("unreachable")


__all__ = ["Counters", "Fleet", "FleetConfig", "png_bytes"]
