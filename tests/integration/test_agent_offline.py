"""Offline: the real broker and the real object store go down while the agent keeps collecting;
after they come back, the spool drains by itself and every sample arrives exactly once.

Everything is real: a Mosquitto and a SeaweedFS of this test's own (not the session fixtures,
so they can be stopped and started again on the same ports and data folders), the server app
(``create_app``) on a real socket with a SQLite database and MQTT ingest, and the agent
(``edge_agent.runtime.Agent``) in a thread, running the seed model installed as a signed bundle
through a direct deployment, on a folder of synthetic ``line_b`` frames with QA labels (the seed
model gets most of them wrong: corrections; ``random_rate=1.0`` takes the rest).

Sequence: online until the server holds some samples → broker down, then the object store →
the agent collects 200+ more samples into its spool → object store up (and answering writes),
then the broker → the spool drains with backoff. The object store comes back first because the
server validates every sample against the store as it ingests it; the agent's guarantees do
not depend on that order.

Checked: the server's samples are exactly the ids the agent collected (none missing, none
twice, none extra), every one validated at ingest (its object existed with the right sha256 and
size when its event arrived: no event went out for a failed upload), every object is in the
bucket with the right sha256, they arrived in capture order, and the spool ends empty with
nothing evicted or dropped.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from server.stack.mosquitto import MosquittoBroker
from server.stack.ports import find_free_port, find_free_port_pairs
from server.stack.seaweedfs import GRPC_OFFSET, SeaweedS3

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N_FRAMES = 260
ONLINE_SAMPLES = 20        # collected and delivered before the outage
OUTAGE_SAMPLES = 200       # collected while broker and object store are down
MAX_FPS = 12.0
DEVICE = "cam-offline"
ADMIN = "offline-admin-" + uuid.uuid4().hex


def _wait(what: str, predicate: Callable[[], object], timeout: float, diagnose: Callable[[], str] = str,
          interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; {diagnose()}")
        time.sleep(interval)


@pytest.fixture
def own_stack():
    """A broker and an object store of this test's own, on fixed ports so they can restart there."""
    # Mosquitto started as root runs as `mosquitto`: its folder must be reachable (not pytest's 0700 tmp).
    root = Path(tempfile.mkdtemp(prefix="edgeloop-offline-"))
    os.chmod(root, 0o711)
    broker = MosquittoBroker(root / "mosquitto", port=find_free_port())
    s3 = SeaweedS3(root / "seaweedfs", s3_port=find_free_port_pairs(1, GRPC_OFFSET)[0])
    try:
        broker.start()
        s3.start()
        yield broker, s3
    finally:
        broker.stop()
        s3.stop()
        shutil.rmtree(root, ignore_errors=True)


class ServerThread:
    """The real server app behind uvicorn on a real port, in this process."""

    def __init__(self, settings) -> None:
        import uvicorn

        from server.app import create_app

        self.app = create_app(settings)
        self._server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=settings.port,
                                                     log_config=None, lifespan="on"))
        self._thread = threading.Thread(target=self._server.run, name="server", daemon=True)

    def start(self) -> None:
        self._thread.start()
        _wait("the server to start", lambda: self._server.started, 60)

    @property
    def ctx(self):
        return self.app.state.ctx

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(30)


def _samples(ctx) -> list:
    from sqlalchemy import select

    from server.db.models import Sample

    with ctx.sessions() as session:
        return list(session.scalars(select(Sample).order_by(Sample.received_at)).all())


def _sample_count(ctx) -> int:
    from sqlalchemy import func, select

    from server.db.models import Sample

    with ctx.sessions() as session:
        return session.scalar(select(func.count()).select_from(Sample)) or 0


def _store_writable(store) -> bool:
    try:
        store.put_bytes(f"probe/{uuid.uuid4().hex}", b"x")
        return True
    except Exception:
        return False


def test_agent_keeps_collecting_through_an_outage_and_every_sample_arrives_exactly_once(
        own_stack, model_cache, ultralytics_offline, tmp_path):
    from edge_agent.runtime import Agent
    from edge_agent.settings import AgentSettings
    from server.settings import ServerSettings
    from training import synth
    from training.seed_model import ensure_seed_model

    broker, s3 = own_stack
    seed = ensure_seed_model(model_cache, "fast", config_dir=model_cache / "ultralytics")
    frames = tmp_path / "frames"
    synth.write_frames(frames, "line_b", 4242, 0, N_FRAMES, seed.imgsz)

    port = find_free_port()
    server_dir = tmp_path / "server"
    settings = ServerSettings(
        data_dir=server_dir, database_url=f"sqlite:///{tmp_path / 'edgeloop.db'}", port=port,
        mqtt_host=broker.host, mqtt_port=broker.port, mqtt_username=broker.server_username,
        mqtt_password=broker.server_password, mqtt_password_file=broker.password_file,
        mqtt_broker_pid_file=broker.pid_file, mqtt_broker_log_file=broker.log_file,
        s3_endpoint=s3.endpoint, s3_access_key=s3.access_key, s3_secret_key=s3.secret_key,
        s3_bucket="offline", admin_token=ADMIN, retrain_threshold=1_000_000,
    )
    server = ServerThread(settings)
    server.start()
    api = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {ADMIN}"},
                       timeout=60)
    agent = thread = None
    timings: dict[str, float] = {}
    try:
        # -- the seed model as signed bundle v1, one enrolled device
        with seed.pt.open("rb") as pt, seed.onnx.open("rb") as onnx:
            response = api.post("/api/v1/models", files={"weights": pt, "onnx": onnx},
                                data={"imgsz": str(seed.imgsz), "metrics": "{}"})
        assert response.status_code == 201, response.text
        version = response.json()["version"]
        response = api.post("/api/v1/devices", json={"device_id": DEVICE})
        assert response.status_code == 201, response.text
        creds = response.json()

        agent = Agent(AgentSettings(
            device_id=DEVICE, data_dir=tmp_path / "agent", api_url=f"http://127.0.0.1:{port}",
            api_token=creds["api_token"], mqtt_host=broker.host, mqtt_port=broker.port,
            mqtt_password=creds["mqtt_password"], mqtt_reconnect_max_s=8.0,
            trusted_keys=server_dir / "keys" / "signing-key.pub.pem",
            source=f"folder:{frames}", loop_source=True, max_fps=MAX_FPS, heartbeat_seconds=1.0,
            collect_corrections=True, random_rate=1.0,
            # Budgets and near-duplicate filtering are the collector's business, not this test's.
            random_max_per_hour=100_000, random_max_per_day=100_000, max_samples_per_hour=100_000,
            dedup_window=0,
        ))
        spool = agent.spool

        def diagnose() -> str:
            return (f"spool {spool.stats()}, uploader error {agent.uploader.last_error!r}, "
                    f"server samples {_sample_count(server.ctx)}, frames {agent.frames}")

        thread = threading.Thread(target=agent.run, name="agent", daemon=True)
        thread.start()

        def devices() -> dict:
            return {d["id"]: d for d in api.get("/api/v1/devices").json()["items"]}

        _wait("the agent to come online", lambda: devices()[DEVICE]["online"], 60, diagnose)
        response = api.post("/api/v1/deployments", json={"version": version, "mode": "direct"})
        assert response.status_code == 202, response.text
        _wait("the agent to run the seed model", lambda: agent.active_version == version, 120, diagnose)

        # -- online: samples flow
        t0 = time.monotonic()
        _wait(f"{ONLINE_SAMPLES} samples on the server", lambda: _sample_count(server.ctx) >= ONLINE_SAMPLES,
              120, diagnose)
        timings["online"] = time.monotonic() - t0

        # -- outage: broker first, then the object store
        t0 = time.monotonic()
        collected_at_outage = spool.counters().get("collected", 0)
        broker.stop()
        s3.stop()
        timings["stop"] = time.monotonic() - t0
        t0 = time.monotonic()
        time.sleep(1.0)  # whatever was in flight at the server has landed by now
        server_count_at_outage = _sample_count(server.ctx)
        _wait(f"{OUTAGE_SAMPLES}+ samples collected while offline and a full pass over the frames",
              lambda: (spool.counters().get("collected", 0) - collected_at_outage >= OUTAGE_SAMPLES
                       and agent.frames >= N_FRAMES + 5),
              3 * N_FRAMES / MAX_FPS + 60, diagnose)
        timings["offline"] = time.monotonic() - t0
        stats_offline = spool.stats()
        assert _sample_count(server.ctx) == server_count_at_outage, "a sample arrived while everything was down"
        assert stats_offline.depth >= OUTAGE_SAMPLES
        assert agent.uploader.last_error  # it did try, and failed

        # -- back: object store (until it takes writes), then the broker
        t0 = time.monotonic()
        s3.start()
        _wait("the object store to take writes again", lambda: _store_writable(server.ctx.store), 120)
        broker.start()
        timings["restart"] = time.monotonic() - t0
        t0 = time.monotonic()
        _wait("the spool to drain", lambda: spool.depth() == 0, 600, diagnose)
        collected = spool.counters()["collected"]
        _wait("every collected sample on the server", lambda: _sample_count(server.ctx) >= collected, 60,
              diagnose)
        timings["drain"] = time.monotonic() - t0
        agent.stop()
        thread.join(60)
        assert not thread.is_alive()

        # -- exactly once, in order, nothing lost, nothing sent for a failed upload
        with sqlite3.connect(tmp_path / "agent" / "spool" / "spool.db") as db:  # the agent closed its spool
            counters = dict(db.execute("SELECT name, value FROM counters"))
            collected_ids = {row[0] for row in db.execute("SELECT sample_id FROM seen")}
            left = db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
        samples = _samples(server.ctx)
        ids = [s.id for s in samples]
        assert left == 0
        assert counters["collected"] == len(collected_ids) >= ONLINE_SAMPLES + OUTAGE_SAMPLES
        assert counters["sent"] == counters["collected"]
        assert counters.get("evicted", 0) == counters.get("dropped", 0) == counters.get("write_failed", 0) == 0
        assert len(ids) == len(set(ids)) == counters["collected"]
        assert set(ids) == collected_ids
        assert {s.device_id for s in samples} == {DEVICE}
        rejected = [(s.id, s.reject_reason) for s in samples if s.status != "validated"]
        assert not rejected, rejected[:5]
        captured = [s.captured_at for s in samples]
        assert captured == sorted(captured), "samples did not arrive in capture order"
        store = server.ctx.store
        for s in samples:
            data = store.get_bytes(s.object_key, max_bytes=8 * 1024 * 1024)
            assert hashlib.sha256(data).hexdigest() == s.sha256 and len(data) == s.size_bytes, s.id
        reasons = {}
        for s in samples:
            reasons[s.reason] = reasons.get(s.reason, 0) + 1
        print(f"\noffline test: {len(samples)} samples ({reasons}), {collected_at_outage} before the outage, "
              f"{stats_offline.depth} spooled while offline ({stats_offline.bytes} bytes); "
              + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    finally:
        if agent is not None and thread is not None and thread.is_alive():
            agent.stop()
            thread.join(30)
        api.close()
        server.stop()
