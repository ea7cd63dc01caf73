"""The retrain pipeline around the training compute, on real SeaweedFS and SQLite:
snapshot → dataset → (stand-in executor) → gate → signed bundle → registry, and the
failure paths. The real executor (Ultralytics) runs in the slow e2e test."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import uuid
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from firmware_bundles import TrustStore, load_public_key, verify_bundle
from server import registry
from server.app import build_context
from server.db.models import ModelVersion, Sample, Snapshot, TrainingJob
from server.pipeline.executor import JobFailed
from server.pipeline.runner import RetrainRunner
from server.publish import public_key_path
from server.settings import ServerSettings
from training.synth import render_frame

pytestmark = pytest.mark.integration

GOOD = {"golden": {"map50": 0.97, "map50_95": 0.70}, "new_data": {"map50": 0.95, "map50_95": 0.60}}
PROD = {"golden": {"map50": 0.96, "map50_95": 0.59}, "new_data": {"map50": 0.01, "map50_95": 0.00}}



class StandInExecutor:
    """Implements the executor interface; records the spec and returns chosen metrics."""

    def __init__(self, onnx_path: Path, candidate: dict | None, production: dict = PROD) -> None:
        self.onnx_path, self.candidate, self.production = onnx_path, candidate, production
        self.spec: dict | None = None

    def run(self, spec: dict, work_dir: Path, on_event) -> dict:
        self.spec = spec
        if self.candidate is None:
            raise JobFailed("CUDA out of memory (simulated)")
        on_event({"event": "epoch", "epoch": 1, "epochs": 1, "losses": {"box_loss": 1.0}})
        out = Path(spec["out_dir"])
        out.mkdir(parents=True, exist_ok=True)
        (out / "best.pt").write_bytes(b"weights")
        onnx_path = self.onnx_path
        metrics = {"candidate": {k: dict(v, precision=0.9, recall=0.9, per_class={}) for k, v in self.candidate.items()},
                   "production": {k: dict(v, precision=0.5, recall=0.5, per_class={}) for k, v in self.production.items()}}
        return {"best_pt": str(out / "best.pt"), "onnx": str(onnx_path), "metrics": metrics,
                "stages": {"train": 1.0, "evaluate": 0.5, "export": 0.1},
                "hyperparameters": dict(spec["finetune"]),
                "environment": {"python": "3.11", "ultralytics": "stand-in"}}


@pytest.fixture
def ctx(seaweedfs, tmp_path, tiny_onnx):
    replay = tmp_path / "replay"
    (replay / "images" / "train").mkdir(parents=True)
    for i in range(10):
        cv2.imwrite(str(replay / "images" / "train" / f"b{i}.jpg"), np.full((32, 32, 3), i * 20, np.uint8))
    (replay / "data.yaml").write_text(yaml.safe_dump({"path": str(replay), "train": "images/train",
                                                      "val": "images/train", "names": {0: "a", 1: "b", 2: "c"}}))
    settings = ServerSettings(
        data_dir=tmp_path / "server", s3_endpoint=seaweedfs.endpoint, s3_access_key=seaweedfs.access_key,
        s3_secret_key=seaweedfs.secret_key, s3_bucket=f"pipe-{uuid.uuid4().hex[:8]}",
        eval_sets={"golden": tmp_path / "golden.yaml"}, replay_data=replay / "data.yaml",
        class_names=["a", "b", "c"],
    )
    context = build_context(settings, connect_mqtt=False)
    seed_onnx = tiny_onnx("seed.onnx")
    (tmp_path / "seed.pt").write_bytes(b"seed weights")
    work = tmp_path / "register"
    work.mkdir()
    context.publisher.register_external(pt=tmp_path / "seed.pt", onnx=seed_onnx, imgsz=32, metrics=PROD,
                                        hyperparameters={}, actor="test", source="", work_dir=work)
    yield context
    context.engine.dispose()


def _add_samples(ctx, n: int, device: str = "cam-1", start: int = 0, labels=None, predictions=None,
                 image=None) -> list[str]:
    """``n`` validated samples of distinct synthetic scenes (the data contract refuses near duplicates)."""
    ids = []
    with ctx.sessions() as session:
        for i in range(start, start + n):
            frame = image if image is not None else render_frame("base", seed=5, index=i, imgsz=64)[0]
            data = frame if isinstance(frame, bytes) else cv2.imencode(".jpg", frame)[1].tobytes()
            key = f"images/{device}/{uuid.uuid4().hex}.jpg"
            ctx.store.put_bytes(key, data, "image/jpeg")
            sample_id = uuid.uuid4().hex
            ids.append(sample_id)
            session.add(Sample(id=sample_id, device_id=device, object_key=key,
                               sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data), width=64, height=64,
                               reason="correction",
                               labels=labels if labels is not None else [{"cls": 1, "cx": 0.5, "cy": 0.5,
                                                                         "w": 0.3, "h": 0.3}],
                               predictions=predictions or [], status="validated"))
        session.commit()
    return ids


def _run(ctx, executor, alerts=None) -> tuple[TrainingJob, list[int]]:
    promoted: list[int] = []
    with ctx.sessions() as session:
        job = TrainingJob(trigger="manual", reason="test")
        session.add(job)
        session.commit()
        job_id = job.id
    RetrainRunner(ctx.settings, ctx.sessions, ctx.store, executor, ctx.publisher, promoted.append,
                  alerts=alerts if alerts is not None else ctx.alerts).run(job_id)
    with ctx.sessions() as session:
        return session.get(TrainingJob, job_id), promoted


def test_passing_candidate_is_bundled_signed_registered_and_promoted(ctx, tmp_path, tiny_onnx):
    _add_samples(ctx, 20)
    executor = StandInExecutor(tiny_onnx("candidate.onnx"), GOOD)
    job, promoted = _run(ctx, executor)
    assert job.status == "succeeded", job.log
    assert promoted == [2]
    assert set(job.stages) >= {"snapshot", "dataset", "train", "evaluate", "export", "gate", "bundle", "register"}

    # The executor got a dataset: new samples split into train/val, plus 2x replay of base images.
    (listing,) = yaml.safe_load(Path(executor.spec["data_yaml"]).read_text())["train"]
    train_list = Path(listing).read_text().split()
    (val_dir,) = yaml.safe_load(Path(executor.spec["eval_sets"]["new_data"]).read_text())["val"]
    new_val = list(Path(val_dir).glob("*.jpg"))
    assert len(new_val) >= 1 and len(train_list) == (20 - len(new_val)) + min(10, 2 * (20 - len(new_val)))
    assert set(executor.spec["eval_sets"]) == {"golden", "new_data"}  # one device: no separate slice
    assert executor.spec["engine_targets"] == []  # no device reports a GPU

    with ctx.sessions() as session:
        mv = session.get(ModelVersion, 2)
        assert mv.status == "production" and mv.parent_version == 1 and mv.job_id == job.id
        assert registry.alias_version(session, "previous").version == 1
        snapshot = session.get(Snapshot, mv.snapshot_id)
        assert snapshot.sample_count == 20 and snapshot.devices == ["cam-1"]
        assert all(s.snapshot_id == snapshot.id for s in session.query(Sample))
    manifest = json.loads(ctx.store.get_bytes(snapshot.manifest_key, max_bytes=10_000_000))
    assert hashlib.sha256(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()).hexdigest() == snapshot.id

    bundle = tmp_path / "fetched.tar"
    ctx.store.download_file(mv.bundle_key, bundle)
    key = load_public_key(public_key_path(ctx.settings.data_dir / "keys" / "signing-key.pem"))
    verified = verify_bundle(bundle, TrustStore([key]), expected_sha256=mv.bundle_sha256)
    assert verified.version == 2 and verified.lineage.snapshot_id == snapshot.id
    assert verified.lineage.parent_version == 1


def test_candidate_worse_on_golden_is_kept_as_rejected_with_reason(ctx, tmp_path, tiny_onnx):
    _add_samples(ctx, 10)
    worse = {"golden": {"map50": 0.80, "map50_95": 0.45}, "new_data": {"map50": 0.95, "map50_95": 0.60}}
    job, promoted = _run(ctx, StandInExecutor(tiny_onnx("candidate.onnx"), worse))
    assert job.status == "rejected" and promoted == []
    with ctx.sessions() as session:
        mv = session.get(ModelVersion, 2)
        assert mv.status == "rejected"
        assert "golden mAP50-95 0.450 is below production 0.590" in mv.reason
        assert registry.production(session).version == 1


def test_job_without_new_samples_fails_with_reason(ctx, tmp_path, tiny_onnx):
    job, _ = _run(ctx, StandInExecutor(tiny_onnx("candidate.onnx"), GOOD))
    assert job.status == "failed"
    assert "no new validated, labeled samples" in job.result["error"]


def test_executor_failure_is_recorded_and_production_unchanged(ctx, tmp_path, tiny_onnx):
    _add_samples(ctx, 5)
    job, promoted = _run(ctx, StandInExecutor(tiny_onnx("candidate.onnx"), None))
    assert job.status == "failed" and "out of memory" in job.result["error"] and promoted == []
    with ctx.sessions() as session:
        assert registry.production(session).version == 1
    shutil.rmtree(tmp_path / "server" / "jobs", ignore_errors=True)


# ---------------------------------------------------------------------- data contract, poisoning, alerts


def _alerts(ctx, kind: str) -> list:
    from server.db.models import AlertRecord

    with ctx.sessions() as session:
        return session.query(AlertRecord).filter_by(kind=kind).all()


def test_contract_rejects_are_kept_with_their_reason_and_left_out_of_the_snapshot(ctx, tiny_onnx):
    good = _add_samples(ctx, 20)
    (corrupt,) = _add_samples(ctx, 1, start=100, image=b"\xff\xd8\xff" + b"not a jpeg" * 20)
    (copy,) = _add_samples(ctx, 1, start=3)  # the same scene as good[3]
    job, promoted = _run(ctx, StandInExecutor(tiny_onnx("candidate.onnx"), GOOD))
    assert job.status == "succeeded", job.log
    assert promoted == [2]
    contract = job.result["data"]["contract"]
    assert contract["checked"] == 22 and len(contract["accepted"]) == 20
    with ctx.sessions() as session:
        assert session.get(Sample, corrupt).status == "rejected"
        assert "data contract: image does not decode" in session.get(Sample, corrupt).reject_reason
        # Whichever of the two identical images comes second is the duplicate.
        pair = [session.get(Sample, copy), session.get(Sample, good[3])]
        assert sorted(s.status for s in pair) == ["rejected", "validated"]
        (dup,) = [s for s in pair if s.status == "rejected"]
        assert "data contract: exact duplicate of sample" in dup.reject_reason
        snapshot = session.get(Snapshot, session.get(ModelVersion, 2).snapshot_id)
        assert snapshot.sample_count == 20
        assert {s.id for s in session.query(Sample).filter_by(snapshot_id=snapshot.id)} == (
            set(good) | {copy}) - {dup.id}
    assert "data contract: 20 accepted, 2 rejected of 22" in job.log


def test_too_many_rejects_halt_the_job_change_nothing_and_raise_an_alert(ctx, tiny_onnx):
    _add_samples(ctx, 10)
    _add_samples(ctx, 5, start=200, labels=[{"cls": 9, "cx": 0.5, "cy": 0.5, "w": 0.2, "h": 0.2}])
    job, promoted = _run(ctx, StandInExecutor(tiny_onnx("candidate.onnx"), GOOD))
    assert job.status == "failed" and promoted == []
    assert job.result["error"].startswith("data contract: 5 of 15 samples (33%) break the data contract")
    assert job.result["data"]["contract"]["halted"] is True
    with ctx.sessions() as session:
        assert {s.status for s in session.query(Sample)} == {"validated"}  # a person looks first
        assert session.query(Snapshot).count() == 0
    (alert,) = _alerts(ctx, "data_contract_halt")
    assert alert.severity == "critical" and "halted" in alert.message


def test_a_label_flipping_device_is_quarantined_its_samples_held_and_released_on_review(ctx, tiny_onnx):
    from server.pipeline.data_gate import release_quarantine

    def confident(i):
        return [{"cls": i % 3, "cx": 0.5, "cy": 0.5, "w": 0.3, "h": 0.3, "conf": 0.95}]

    for i in range(25):  # honest: labels confirm the model's confident detections
        _add_samples(ctx, 1, "cam-1", start=i, labels=[{"cls": i % 3, "cx": 0.5, "cy": 0.5, "w": 0.3, "h": 0.3}],
                     predictions=confident(i))
    for i in range(25):  # flipped: every label contradicts a confident detection
        _add_samples(ctx, 1, "cam-evil", start=100 + i,
                     labels=[{"cls": (i + 1) % 3, "cx": 0.5, "cy": 0.5, "w": 0.3, "h": 0.3}], predictions=confident(i))
    job, promoted = _run(ctx, StandInExecutor(tiny_onnx("candidate.onnx"), GOOD))
    assert job.status == "succeeded", job.log
    assert set(job.result["data"]["quarantined"]) == {"cam-evil"}
    assert job.result["data"]["devices"]["cam-1"]["quarantine"] is False
    from server.db.models import Quarantine

    with ctx.sessions() as session:
        snapshot = session.get(Snapshot, session.get(ModelVersion, 2).snapshot_id)
        assert snapshot.devices == ["cam-1"] and snapshot.sample_count == 25
        assert {s.status for s in session.query(Sample).filter_by(device_id="cam-evil")} == {"held"}
        (q,) = session.query(Quarantine).all()
        assert q.device_id == "cam-evil" and q.decided_by == "policy" and q.job_id == job.id
        assert q.thresholds["max_contradiction_rate"] == 0.3
        assert q.evidence["contradiction_rate"] == 1.0
    (alert,) = _alerts(ctx, "device_quarantined")
    assert alert.subject == "cam-evil"

    with ctx.sessions() as session:
        assert release_quarantine(session, "cam-evil", "alice") == 25
        session.commit()
        assert {s.status for s in session.query(Sample).filter_by(device_id="cam-evil")} == {"validated"}
        with pytest.raises(LookupError):
            release_quarantine(session, "cam-evil", "alice")


def test_a_rejected_candidate_alert_reaches_mqtt_and_the_webhook(ctx, tiny_onnx, mqtt_broker):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from protocol.alerts import Alert, alert_subscription
    from server.alerts import AlertService

    posted: list[bytes] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            posted.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    received: list[bytes] = []
    got = threading.Event()
    sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=mqtt_broker.server_username)
    sub.username_pw_set(mqtt_broker.server_username, mqtt_broker.server_password)
    sub.on_connect = lambda c, *a: c.subscribe(alert_subscription(), qos=1)
    sub.on_message = lambda c, u, m: (received.append(m.payload), got.set())
    sub.connect(mqtt_broker.host, mqtt_broker.port)
    sub.loop_start()
    try:
        time.sleep(0.5)
        alerts = AlertService(ctx.sessions, webhook_url=f"http://127.0.0.1:{server.server_port}/hook",
                              publish=lambda topic, payload, qos: sub.publish(topic, payload, qos=qos))
        _add_samples(ctx, 10)
        worse = {"golden": {"map50": 0.80, "map50_95": 0.45}, "new_data": {"map50": 0.95, "map50_95": 0.60}}
        with ctx.sessions() as session:
            job = TrainingJob(trigger="manual", reason="test")
            session.add(job)
            session.commit()
        RetrainRunner(ctx.settings, ctx.sessions, ctx.store, StandInExecutor(tiny_onnx("c.onnx"), worse),
                      ctx.publisher, alerts=alerts).run(job.id)
        alerts.flush()
        assert got.wait(10)
    finally:
        sub.loop_stop()
        sub.disconnect()
        server.shutdown()
    on_mqtt = Alert.model_validate_json(received[0])
    assert on_mqtt.kind == "model_rejected" and on_mqtt.details["version"] == 2
    assert "golden mAP50-95 0.450 is below production 0.590" in on_mqtt.message
    assert Alert.model_validate_json(posted[0]).id == on_mqtt.id
    (row,) = _alerts(ctx, "model_rejected")
    assert row.webhook_status == "http 204"


def test_manual_approval_keeps_a_passing_candidate_waiting_then_approve_and_roll_back(ctx, tiny_onnx):
    ctx.settings.training.approval = "manual"
    _add_samples(ctx, 10)
    job, promoted = _run(ctx, StandInExecutor(tiny_onnx("candidate.onnx"), GOOD))
    assert job.status == "succeeded" and promoted == []
    with ctx.sessions() as session:
        assert registry.production(session).version == 1
        assert registry.alias_version(session, "candidate").version == 2
        with pytest.raises(registry.RegistryError, match="rejected"):
            session.get(ModelVersion, 2).status = "rejected"
            registry.approve(session, 2, "bob")
        session.rollback()
        registry.approve(session, 2, "bob")
        session.commit()
        assert registry.production(session).version == 2
        assert session.get(ModelVersion, 2).approved_by == "bob"
        assert registry.alias_version(session, "candidate") is None
        assert registry.rollback(session) == (2, 1)
        session.commit()
        assert registry.production(session).version == 1
        assert session.get(ModelVersion, 2).status == "rolled_back"
        with pytest.raises(registry.RegistryError, match="no previous"):
            registry.rollback(session)


def test_several_source_devices_get_one_eval_slice_each_over_their_share_of_new_data(ctx, tiny_onnx):
    # 40 each: the chance that one device gets no new-data val image at all is 0.85**40 (0.15 %).
    _add_samples(ctx, 40, "cam-1")
    _add_samples(ctx, 40, "cam-2", start=50)
    executor = StandInExecutor(tiny_onnx("candidate.onnx"), GOOD)
    job, _ = _run(ctx, executor)
    assert job.status == "succeeded", job.log
    sets = executor.spec["eval_sets"]
    assert {"device:cam-1", "device:cam-2"} <= set(sets)
    (new_val,) = yaml.safe_load(Path(sets["new_data"]).read_text())["val"]
    slices = [Path(yaml.safe_load(Path(sets[f"device:{d}"]).read_text())["val"][0]).read_text().split()
              for d in ("cam-1", "cam-2")]
    assert sorted(Path(p).name for s in slices for p in s) == sorted(p.name for p in Path(new_val).glob("*.jpg"))
    assert executor.spec["eval_cache_dir"].endswith("eval-cache")
