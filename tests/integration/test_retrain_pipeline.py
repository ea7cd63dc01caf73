"""The retrain pipeline around the training compute, on real SeaweedFS and SQLite:
snapshot → dataset → (stand-in executor) → gate → signed bundle → registry, and the
failure paths. The real executor (Ultralytics) runs in the slow e2e test."""

from __future__ import annotations

import hashlib
import json
import shutil
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


def _add_samples(ctx, n: int) -> None:
    with ctx.sessions() as session:
        for i in range(n):
            ok, data = cv2.imencode(".jpg", np.full((32, 32, 3), (i * 7) % 255, np.uint8))
            data = data.tobytes()
            key = f"images/cam-1/{uuid.uuid4().hex}.jpg"
            ctx.store.put_bytes(key, data, "image/jpeg")
            session.add(Sample(id=uuid.uuid4().hex, device_id="cam-1", object_key=key,
                               sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data), width=32, height=32,
                               reason="correction", labels=[{"cls": 1, "cx": 0.5, "cy": 0.5, "w": 0.3, "h": 0.3}],
                               status="validated"))
        session.commit()


def _run(ctx, executor) -> tuple[TrainingJob, list[int]]:
    promoted: list[int] = []
    with ctx.sessions() as session:
        job = TrainingJob(trigger="manual", reason="test")
        session.add(job)
        session.commit()
        job_id = job.id
    RetrainRunner(ctx.settings, ctx.sessions, ctx.store, executor, ctx.publisher, promoted.append).run(job_id)
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
    assert set(executor.spec["eval_sets"]) == {"golden", "new_data"}

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
