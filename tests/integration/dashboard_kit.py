"""Shared by the dashboard's stream test and its browser test: the real server app behind uvicorn on a
real port (in this process, so tests can seed its database), API tokens per role, and a reader of
its server-sent events in a background thread."""

from __future__ import annotations

import contextlib
import json
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx

from server.auth import Role, issue_token
from server.stack.ports import find_free_port

# Debian's Chromium, as the browser test and benchmarks/dashboard.py drive it.
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]


def wait_for(what: str, check: Callable[[], object], timeout: float = 20.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class LiveServer:
    """``create_app(settings)`` served by uvicorn in a thread. A graceful-shutdown timeout bounds
    ``stop()`` even if a client left a stream open (uvicorn in a thread installs no signal handlers,
    so sse-starlette cannot see it exit)."""

    def __init__(self, settings) -> None:
        import uvicorn

        from server.app import create_app

        self.port = settings.port
        self.app = create_app(settings)
        self._server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_config=None,
                                                     lifespan="on", timeout_graceful_shutdown=3))
        self._thread = threading.Thread(target=self._server.run, name="dashboard-server", daemon=True)

    @staticmethod
    def free_port() -> int:
        return find_free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ctx(self):
        return self.app.state.ctx

    def start(self) -> LiveServer:
        self._thread.start()
        wait_for("the server to start", lambda: self._server.started or not self._thread.is_alive(), 60)
        assert self._server.started, "the server did not start (see the log above)"
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(30)

    def token(self, role: Role, subject: str) -> str:
        with self.ctx.sessions() as session:
            token = issue_token(session, role, subject)
            session.commit()
        return token


@dataclass
class Event:
    event: str
    data: str
    id: str | None = None

    def json(self):
        return json.loads(self.data)


class SseReader:
    """Reads ``GET url`` as server-sent events into a queue until the stream ends or ``close()``."""

    def __init__(self, url: str, *, headers: dict | None = None, cookies: dict | None = None) -> None:
        self.events: queue.Queue[Event | None] = queue.Queue()
        self.status: int | None = None
        self.body = ""
        self.ended = threading.Event()
        self._client = httpx.Client(headers=headers or {}, cookies=cookies or {}, timeout=httpx.Timeout(5, read=60))
        self._url = url
        self._connected = threading.Event()
        self._socket: socket.socket | None = None
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        assert self._connected.wait(15), "the stream did not answer"

    def _read(self) -> None:
        try:
            with self._client.stream("GET", self._url) as response:
                self.status = response.status_code
                stream = response.extensions.get("network_stream")
                self._socket = stream.get_extra_info("socket") if stream is not None else None
                if response.status_code != 200:
                    self.body = response.read().decode()
                    self._connected.set()
                    return
                self._connected.set()
                fields: dict[str, str] = {}
                for line in response.iter_lines():
                    if line == "":
                        if "data" in fields or "event" in fields:
                            self.events.put(Event(fields.get("event", "message"), fields.get("data", ""),
                                                  fields.get("id")))
                        fields = {}
                    elif line.startswith(":"):
                        continue
                    else:
                        name, _, value = line.partition(":")
                        value = value[1:] if value.startswith(" ") else value
                        fields[name] = fields[name] + "\n" + value if name == "data" and name in fields else value
        except httpx.HTTPError:
            pass
        finally:
            self._connected.set()
            self.ended.set()
            self.events.put(None)

    def next(self, timeout: float = 20.0) -> Event | None:
        """The next event; None when the stream ended. Raises on timeout."""
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no event within {timeout} s") from None

    def until(self, predicate: Callable[[Event], bool], timeout: float = 20.0) -> tuple[Event, list[Event]]:
        """Read until an event matches; (that event, every event read before it)."""
        seen: list[Event] = []
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no matching event within {timeout} s; saw {[e.event for e in seen]}")
            event = self.next(left)
            if event is None:
                raise AssertionError(f"the stream ended first; saw {[e.event for e in seen]}")
            if predicate(event):
                return event, seen
            seen.append(event)

    def drain(self, seconds: float) -> list[Event]:
        """Every event within ``seconds``."""
        out, deadline = [], time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                event = self.events.get(timeout=left)
            except queue.Empty:
                break
            if event is None:
                break
            out.append(event)
        return out

    def close(self) -> None:
        # Wake the reader blocked in recv(): shutting the socket down ends its read at once.
        if self._socket is not None:
            with contextlib.suppress(OSError):
                self._socket.shutdown(socket.SHUT_RDWR)
        self._client.close()
        self._thread.join(10)


# ---------------------------------------------------------------------- seeded state


def _metrics(golden: float, new_data: float, recalls: tuple[float, float, float]) -> dict:
    per_class = {name: {"map50": round(golden - 0.02 * i, 3), "map50_95": round(golden - 0.2, 3),
                        "precision": round(golden - 0.01, 3), "recall": r}
                 for i, (name, r) in enumerate(zip(("scratch", "dent", "stain"), recalls, strict=True))}
    return {"golden": {"map50": golden, "map50_95": round(golden - 0.18, 3), "precision": round(golden - 0.02, 3),
                       "recall": round(golden - 0.04, 3), "per_class": per_class},
            "new_data": {"map50": new_data, "map50_95": round(new_data - 0.2, 3),
                         "precision": round(new_data - 0.03, 3), "recall": round(new_data - 0.05, 3),
                         "per_class": per_class}}


def seed_dashboard(ctx, *, devices: int | list[str] = 6, samples: int = 12) -> dict:
    """A plausible plant for the dashboard: devices on two lines, production v1 and a candidate v2
    that passed its gate, collected frames (synthetic line_b images with predicted and corrected
    boxes) in the object store, validation rejects, a finished and a running retrain job, alerts,
    a quarantined device and, when drift monitoring is in this build, drift windows and a signal.
    ``devices``: how many to create, or the ids of devices that exist already (enrolled by the test).
    Both versions have a (placeholder) bundle, so a rollout of v2 can be started."""
    from datetime import timedelta

    import cv2

    from server import registry
    from server.db import models as db
    from training.synth import render_frame

    now = datetime.now(UTC)
    existing = isinstance(devices, list)
    ids = list(devices) if existing else [f"cam-{i + 1:02d}" for i in range(devices)]
    devices = len(ids)
    bundle = {"bundle_sha256": "ab" * 32, "bundle_size": 4096}
    with ctx.sessions() as session:
        job = db.TrainingJob(trigger="threshold", reason="1000 validated samples", requested_by="ingest",
                             status="succeeded", stage="publish",
                             stages={"validate": 1.2, "snapshot": 0.8, "train": 612.4, "evaluate": 31.5, "export": 2.1,
                                     "engines": 0.4, "bundle": 0.6, "publish": 0.9},
                             created_at=now - timedelta(hours=3), started_at=now - timedelta(hours=3),
                             finished_at=now - timedelta(hours=2, minutes=49), candidate_version=2,
                             log="validate: 1000 samples, 0 rejected\ntrain: epoch 10/10 mAP50 0.91\nevaluate: golden 0.94",
                             result={"gate": {"passed": True, "reasons": ["candidate beats production on new data "
                                                                          "and holds the golden set"]}})
        session.add(job)
        session.add(db.TrainingJob(trigger="manual", reason="new supplier batch", requested_by="erin",
                                   status="running", stage="train", stages={"validate": 1.0, "snapshot": 0.7},
                                   progress={"epoch": 4, "epochs": 10, "eta_s": 240}, created_at=now,
                                   started_at=now - timedelta(minutes=3), log="train: epoch 4/10"))
        session.flush()
        session.add(db.ModelVersion(version=1, name="defects", status="production", bundle_key="models/defects/1/bundle.tar",
                                    **bundle, metrics=_metrics(0.91, 0.42, (0.9, 0.88, 0.6)),
                                    class_names=["scratch", "dent", "stain"], created_at=now - timedelta(days=9),
                                    approved_by="admin", approved_at=now - timedelta(days=9)))
        session.add(db.ModelVersion(version=2, name="defects", status="candidate", parent_version=1, job_id=job.id,
                                    bundle_key="models/defects/2/bundle.tar", **bundle,
                                    metrics=_metrics(0.93, 0.88, (0.92, 0.9, 0.86)),
                                    gate={"passed": True, "reasons": ["candidate beats production on new data"],
                                          "checks": {"golden_map50_95": {"candidate": 0.75, "production": 0.73,
                                                                         "threshold": 0.73, "passed": True}}},
                                    class_names=["scratch", "dent", "stain"], created_at=now - timedelta(hours=2)))
        session.flush()
        registry.set_alias(session, "production", 1)
        registry.set_alias(session, "candidate", 2)
        for i, device_id in enumerate([] if existing else ids):
            device = db.Device(id=device_id, online=i != devices - 1, last_seen=now - timedelta(seconds=5 + 40 * i),
                               agent_version="0.1.0", active_version=1, update_state="ACTIVE",
                               hardware={"gpu": "Orin" if i % 2 else None, "gpu_compute_capability": "8.7" if i % 2 else None,
                                         "tensorrt_version": "10.3.0" if i % 2 else None, "cpu": "aarch64"},
                               last_heartbeat={"fps": 24.0 - i, "latency_ms_p50": 4.0 + i * 0.6,
                                               "latency_ms_p99": 9.0 + i * 1.3, "spool_depth": i * 2,
                                               "disk_free_bytes": 12 * 2**30})
            device.labels = [db.DeviceLabel(kind="group", value="line-a" if i < devices // 2 else "line-b"),
                             db.DeviceLabel(kind="tag", value="nightshift" if i % 3 == 0 else "dayshift")]
            session.add(device)
        session.add(db.Quarantine(device_id=ids[-1], status="quarantined", decided_by="policy",
                                  reasons=["label disagreement with the golden model 0.62 > 0.30"]))
        for k in range(samples):
            image, labels = render_frame("line_b", 7, k, imgsz=224)
            data = cv2.imencode(".png", image)[1].tobytes()
            sample_id = f"{k:04d}{uuid.uuid4().hex[:12]}"
            key = f"images/{ids[k % devices]}/{sample_id}.png"
            ctx.store.put_bytes(key, data, "image/png")
            boxes = [{"cls": c, "cx": x, "cy": y, "w": w, "h": h} for c, x, y, w, h in labels]
            predictions = [{**b, "cx": b["cx"] + 0.03, "w": b["w"] * 0.8, "conf": 0.31 + 0.05 * (k % 5)}
                           for b in boxes][: max(0, len(boxes) - k % 2)]
            rejected = k % 5 == 4
            session.add(db.Sample(
                id=sample_id, device_id=ids[k % devices], object_key=key, sha256=uuid.uuid4().hex * 2,
                size_bytes=len(data), width=224, height=224, reason="low_confidence" if k % 2 else "correction",
                model_version=1, predictions=predictions, labels=None if k % 3 == 2 else boxes,
                received_at=now - timedelta(days=k % 4, minutes=k), status="rejected" if rejected else "validated",
                reject_reason="label box outside the image (cx 1.08)" if rejected else ""))
        session.add(db.AlertRecord(kind="candidate_rejected", severity="warning", subject="model:v0",
                                   message="v0 rejected: golden mAP50-95 fell", at=now - timedelta(days=1)))
        session.add(db.AlertRecord(kind="quarantine", severity="critical", subject=f"device:{ids[-1]}",
                                   message=f"{ids[-1]} quarantined: its labels disagree with the golden model"))
        drift_alert = db.AlertRecord(kind="drift", severity="warning", subject=f"device:{ids[0]}",
                                     message=f"{ids[0]}: input drift on brightness (psi 0.41 > 0.25)",
                                     at=now - timedelta(minutes=40))
        session.add(drift_alert)
        session.flush()
        drift_models = hasattr(db, "DriftWindow")
        if drift_models:
            for w in range(24):
                shifted = w >= 14
                psi = 0.04 + 0.01 * (w % 3) + (0.35 if shifted else 0.0)
                active = w >= 16
                session.add(db.DriftWindow(
                    at=now - timedelta(minutes=5 * (24 - w)), scope="device", subject=ids[0], model_version=1, window=w,
                    frames=300, status="scored", correction_rate=0.02 + (0.12 if shifted else 0.0),
                    scores={"metrics": {"brightness": {"psi": psi, "ks": psi / 2, "wasserstein": psi / 3, "count": 300},
                                        "confidence": {"psi": 0.05 + 0.005 * w, "ks": 0.03, "wasserstein": 0.01,
                                                       "count": 300}}},
                    drifting=active, state={"metrics": {"brightness": {"active": active}}}))
            session.add(db.DriftEvent(at=now - timedelta(minutes=40), scope="device", subject=ids[0], model_version=1,
                                      signal="drift", event="raised", action="alert", status="done",
                                      detail={"metrics": ["brightness"]}, alert_id=drift_alert.id))
            session.add(db.DriftEvent(at=now - timedelta(minutes=40), scope="device", subject=ids[0], model_version=1,
                                      signal="drift", event="raised", action="retrain", status="done",
                                      detail={"reason": "drift on brightness"}, job_id=job.id))
        session.commit()
    return {"devices": ids, "production": 1, "candidate": 2}


# ---------------------------------------------------------------------- a simulated fleet


class SimulatedDevice:
    """A device as the server sees it over MQTT, without a model: birth/last-will status, heartbeats,
    and the agent's OTA answers to the rollout's commands (deploy -> DOWNLOADING ... SHADOWING with
    shadow windows of good agreement; promote -> ACTIVE; abort -> REJECTED; rollback -> ROLLED_BACK).
    Enough for the real rollout controller to take waves through their gates."""

    STEP_S = 0.3

    def __init__(self, broker, device_id: str, mqtt_username: str, mqtt_password: str, *, active_version: int = 1,
                 agreement: float = 0.96, window_frames: int = 100) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        from protocol import Channel, StatusMessage, device_topic, encode_message

        self.device_id, self.active, self.candidate = device_id, active_version, None
        self.agreement, self.window_frames = agreement, window_frames
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._shadowing: str | None = None  # the deploy command id being shadowed
        self._deploy: str | None = None  # the last deploy command id
        self._window = 0
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=mqtt_username, protocol=mqtt.MQTTv5)
        self.client.username_pw_set(mqtt_username, mqtt_password)
        self.client.will_set(device_topic(device_id, Channel.STATUS),
                             encode_message(StatusMessage(device_id=device_id, state="offline")), qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self._broker = broker
        self._thread = threading.Thread(target=self._beat, name=f"sim-{device_id}", daemon=True)

    def start(self) -> SimulatedDevice:
        self.client.connect(self._broker.host, self._broker.port, keepalive=30)
        self.client.loop_start()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.client.disconnect()
        self.client.loop_stop()

    def _publish(self, message, *, retain: bool = False) -> None:
        from protocol import device_topic, encode_message

        self.client.publish(device_topic(self.device_id, message.type), encode_message(message), qos=1, retain=retain)

    def _on_connect(self, client, _userdata, _flags, reason_code, _props) -> None:
        from protocol import Channel, StatusMessage, device_topic
        from protocol.messages import Hardware

        if reason_code.is_failure:
            return
        client.subscribe(device_topic(self.device_id, Channel.COMMANDS), qos=1)
        self._publish(StatusMessage(device_id=self.device_id, state="online", agent_version="0.1.0",
                                    active_version=self.active, hardware=Hardware(cpu="sim", cpu_count=4)),
                      retain=True)

    def _beat(self) -> None:
        from protocol import Heartbeat, ShadowReport

        while not self._stop.wait(0.5):
            with self._lock:
                active, candidate, shadowing = self.active, self.candidate, self._shadowing
                self._window += 1 if shadowing else 0
                window = self._window
            self._publish(Heartbeat(device_id=self.device_id, fps=24.0, latency_ms_p50=4.2, latency_ms_p99=9.5,
                                    frames_total=1000 + window, samples_sent=0, spool_depth=0,
                                    disk_free_bytes=2**34, active_version=active, candidate_version=candidate))
            if shadowing:
                self._publish(ShadowReport(
                    device_id=self.device_id, update_id=shadowing, active_version=active, candidate_version=candidate,
                    window=window, frames_compared=self.window_frames, frames_dropped=0,
                    # Every frame's truth known: the active model right on 90 % (enough to be trusted, so
                    # the agreement guard applies), the candidate also on the other 10 % (it passes).
                    agreement=self.agreement, confident_agreement=self.agreement,
                    corrected_frames=self.window_frames, active_accuracy=0.9, candidate_accuracy=1.0,
                    candidate_only_correct=self.window_frames // 10, active_only_correct=0,
                    active_latency_ms_p50=4.2, active_latency_ms_p99=9.5, candidate_latency_ms_p50=4.4,
                    candidate_latency_ms_p99=9.9, errors=0))

    def _walk(self, update_id: str, version: int, states: list[str], event: str) -> None:
        from protocol import UpdateEvent

        for before, after in zip(states, states[1:], strict=False):
            time.sleep(self.STEP_S)
            self._publish(UpdateEvent(device_id=self.device_id, update_id=update_id, version=version,
                                      from_state=before, to_state=after, event=event, active_version=self.active))

    def _on_message(self, _client, _userdata, msg) -> None:
        threading.Thread(target=self._handle, args=(msg.topic, msg.payload), daemon=True).start()

    def _handle(self, topic: str, payload: bytes) -> None:
        from protocol import AbortCommand, DeployCommand, PromoteCommand, RollbackCommand, decode_message

        command = decode_message(topic, payload)
        if isinstance(command, DeployCommand):
            with self._lock:
                self.candidate = command.version
            self._walk(command.command_id, command.version,
                       ["IDLE", "DOWNLOADING", "VERIFYING", "STAGED", "SHADOWING"], "deploy")
            with self._lock:
                self._shadowing, self._deploy = command.command_id, command.command_id
        elif isinstance(command, PromoteCommand):
            with self._lock:
                deploy, self._shadowing = self._deploy, None
            if deploy is None:
                return
            self._walk(deploy, command.version, ["SHADOWING", "PROMOTING", "CHECKING"], "promote")
            with self._lock:
                self.active, self.candidate = command.version, None
            self._walk(deploy, command.version, ["CHECKING", "ACTIVE"], "healthy")
        elif isinstance(command, AbortCommand):
            with self._lock:
                deploy, self._shadowing, self.candidate = self._deploy, None, None
            if deploy is not None:
                self._walk(deploy, command.version, ["SHADOWING", "REJECTED"], "abort")
        elif isinstance(command, RollbackCommand):
            target = command.to_version or 1
            self._walk(command.command_id, target, ["ACTIVE", "ROLLING_BACK"], "rollback")
            with self._lock:
                self.active = target
            self._walk(command.command_id, target, ["ROLLING_BACK", "ROLLED_BACK"], "rolled_back")
