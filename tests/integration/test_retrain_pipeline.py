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
    yield from _context(seaweedfs, tmp_path, tiny_onnx)


@pytest.fixture
def any_db_ctx(seaweedfs, tmp_path, tiny_onnx, database_url):
    """The same context on SQLite and on PostgreSQL: the commit point's one transaction on both."""
    yield from _context(seaweedfs, tmp_path, tiny_onnx, database_url)


def _context(seaweedfs, tmp_path, tiny_onnx, database_url: str = ""):
    context = make_context(seaweedfs, tmp_path, tiny_onnx, database_url=database_url)
    yield context
    context.engine.dispose()


def make_context(seaweedfs, tmp_path, tiny_onnx, **settings):
    """A server context on a fresh bucket with a registered seed (v1); ``settings`` override."""
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
        class_names=["a", "b", "c"], **settings,
    )
    context = build_context(settings, connect_mqtt=False)
    seed_onnx = tiny_onnx("seed.onnx")
    (tmp_path / "seed.pt").write_bytes(b"seed weights")
    work = tmp_path / "register"
    work.mkdir()
    context.publisher.register_external(pt=tmp_path / "seed.pt", onnx=seed_onnx, imgsz=32, metrics=PROD,
                                        hyperparameters={}, actor="test", source="", work_dir=work)
    return context


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
    assert len(job.result["halted"]["rejected"]) == 5 and job.result["halted"]["resolved"] is None


def test_an_engineer_drops_a_halted_batchs_rejects_and_the_next_job_trains_on_the_rest(ctx, tiny_onnx):
    from server.pipeline.trigger import RetrainScheduler

    good = _add_samples(ctx, 10)
    bad = _add_samples(ctx, 5, start=200, labels=[{"cls": 9, "cx": 0.5, "cy": 0.5, "w": 0.2, "h": 0.2}])
    halted, _ = _run(ctx, StandInExecutor(tiny_onnx("candidate.onnx"), GOOD))
    scheduler = RetrainScheduler(ctx.sessions, lambda job_id: None)  # not started: we run the job here
    assert scheduler.request("threshold", "16 validated samples", "ingest") is None  # held: no job per sample
    dropped, queued = scheduler.resolve_halt(halted.id, "alice", "cls 9 is a labelling-tool bug", "api")
    assert dropped == 5
    promoted: list[int] = []
    RetrainRunner(ctx.settings, ctx.sessions, ctx.store, StandInExecutor(tiny_onnx("c2.onnx"), GOOD), ctx.publisher,
                  promoted.append, alerts=ctx.alerts).run(queued.id)
    with ctx.sessions() as session:
        job = session.get(TrainingJob, queued.id)
        assert job.status == "succeeded", job.log
        assert {s.id for s in session.query(Sample).filter_by(snapshot_id=job.snapshot_id)} == set(good)
        assert {session.get(Sample, i).status for i in bad} == {"rejected"}
    assert promoted == [2]


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
        with pytest.raises(registry.RegistryError, match="no earlier production version"):
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


# ---------------------------------------------------------------------- a pipeline that never loses data
#
# Samples are consumed (put in a snapshot) only at the job's commit point, when the candidate was
# registered or rejected by its gate. A job that breaks anywhere before leaves them pending, the
# registry as it was (no version, no candidate row or alias without a bundle), and nothing
# uploaded under a version number; the next job trains on the same samples.


class Crash(BaseException):
    """The server dying mid-stage: not an Exception, so no failure path runs (like SIGKILL)."""


def _books(ctx) -> dict:
    from server.db.models import Alias

    with ctx.sessions() as session:
        samples = session.query(Sample).all()
        return {
            "pending": sorted(s.id for s in samples if s.status == "validated" and s.snapshot_id is None),
            "consumed": sorted(s.id for s in samples if s.snapshot_id is not None),
            "versions": sorted((m.version, m.status, bool(m.bundle_key)) for m in session.query(ModelVersion)),
            "snapshots": session.query(Snapshot).count(),
            "aliases": {a.name: a.version for a in session.query(Alias)},
        }


def _assert_nothing_lost(ctx, job, ids: list[str]) -> None:
    books = _books(ctx)
    assert job.status == "failed"
    assert books["pending"] == sorted(ids) and books["consumed"] == [], "a failed job consumed samples"
    assert books["versions"] == [(1, "production", True)], "a failed job left a version behind"
    assert books["snapshots"] == 0
    assert books["aliases"] == {"production": 1}
    assert job.candidate_version is None
    assert not [k for k in (info.key for info in ctx.store.list("models/")) if "/000002/" in k]


def _next_job_uses_them(ctx, tiny_onnx, ids: list[str]) -> None:
    job, promoted = _run(ctx, StandInExecutor(tiny_onnx("retry.onnx"), GOOD))
    assert job.status == "succeeded", job.log
    assert promoted == [2]
    books = _books(ctx)
    assert books["consumed"] == sorted(ids) and books["pending"] == []
    with ctx.sessions() as session:
        assert session.get(Snapshot, job.snapshot_id).sample_count == len(ids)


def _trainer(code: str):
    import sys

    from server.pipeline.executor import LocalSubprocessExecutor

    return LocalSubprocessExecutor(command=[sys.executable, "-c", code], timeout_seconds=30, kill_grace_seconds=1)


def test_a_trainer_that_exits_non_zero_leaves_the_samples_pending(any_db_ctx, tiny_onnx):
    ctx = any_db_ctx
    ids = _add_samples(ctx, 8)
    code = ("import json, sys; print(json.dumps({'event': 'stage', 'stage': 'train', 'status': 'started'}));"
            "print('Traceback: CUDA out of memory', flush=True); sys.exit(3)")
    job, promoted = _run(ctx, _trainer(code))
    assert "training subprocess exited 3" in job.result["error"] and promoted == []
    assert job.result["failed_stage"] == "train"
    assert "nothing was consumed: 8 validated samples are pending" in job.log
    _assert_nothing_lost(ctx, job, ids)
    _next_job_uses_them(ctx, tiny_onnx, ids)


def test_an_evaluation_error_leaves_the_samples_pending(ctx, tiny_onnx):
    ids = _add_samples(ctx, 8)
    code = ("import json, sys\n"
            "for s in ('train', 'evaluate'): print(json.dumps({'event': 'stage', 'stage': s, 'status': 'started'}))\n"
            "print(json.dumps({'event': 'error', 'error': 'RuntimeError: golden set labels missing'}))\n"
            "sys.exit(1)")
    job, _ = _run(ctx, _trainer(code))
    assert job.result["error"] == "RuntimeError: golden set labels missing"
    assert job.result["pipeline"]["stages"]["train"]["status"] == "failed"
    assert "failed at train (evaluate): RuntimeError: golden set labels missing" in job.log
    _assert_nothing_lost(ctx, job, ids)
    _next_job_uses_them(ctx, tiny_onnx, ids)


def test_a_hung_trainer_is_killed_at_the_timeout_and_the_samples_stay_pending(ctx, tiny_onnx):
    import sys

    from server.pipeline.executor import LocalSubprocessExecutor

    ids = _add_samples(ctx, 5)
    hang = "import json, time; print(json.dumps({'event': 'stage', 'stage': 'train'}), flush=True); time.sleep(600)"
    t0 = time.monotonic()
    job, _ = _run(ctx, LocalSubprocessExecutor(command=[sys.executable, "-c", hang], timeout_seconds=2,
                                               kill_grace_seconds=1))
    assert time.monotonic() - t0 < 15
    assert "exceeded its 2s timeout and was killed" in job.result["error"]
    _assert_nothing_lost(ctx, job, ids)


def test_an_export_that_produced_no_onnx_fails_the_job_and_keeps_the_samples(ctx, tmp_path, tiny_onnx):
    ids = _add_samples(ctx, 6)
    job, _ = _run(ctx, StandInExecutor(tmp_path / "never-written.onnx", GOOD))
    assert "outputs that are not there: onnx" in job.result["error"]
    _assert_nothing_lost(ctx, job, ids)
    _next_job_uses_them(ctx, tiny_onnx, ids)


def test_a_bundle_error_leaves_no_candidate_row_and_the_samples_pending(ctx, tiny_onnx, monkeypatch):
    ids = _add_samples(ctx, 6)

    def broken(**kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(ctx.publisher, "build", broken)
    job, promoted = _run(ctx, StandInExecutor(tiny_onnx("candidate.onnx"), GOOD))
    assert job.result["error"] == "OSError: No space left on device" and promoted == []
    assert job.result["failed_stage"] == "bundle"
    _assert_nothing_lost(ctx, job, ids)
    monkeypatch.undo()
    _next_job_uses_them(ctx, tiny_onnx, ids)  # the number it had reserved is free again: version 2


def test_an_upload_that_breaks_half_way_leaves_nothing_under_the_reserved_version(ctx, tiny_onnx, monkeypatch):
    ids = _add_samples(ctx, 6)
    put_file = ctx.store.put_file

    def flaky(key, path, *args, **kwargs):
        if key.endswith("bundle.tar"):
            raise ConnectionError("object store went away")
        return put_file(key, path, *args, **kwargs)

    monkeypatch.setattr(ctx.store, "put_file", flaky)
    job, _ = _run(ctx, StandInExecutor(tiny_onnx("candidate.onnx"), GOOD))
    assert job.result["failed_stage"] == "register"
    _assert_nothing_lost(ctx, job, ids)  # model.pt and model.onnx went up, and were removed


def test_the_commit_is_one_transaction(any_db_ctx, tiny_onnx, monkeypatch):
    ctx = any_db_ctx
    ids = _add_samples(ctx, 6)

    def broken(*args, **kwargs):
        raise RuntimeError("audit log unavailable")

    monkeypatch.setattr("server.pipeline.runner.audit.record", broken)
    job, promoted = _run(ctx, StandInExecutor(tiny_onnx("candidate.onnx"), GOOD))
    assert job.result["error"] == "RuntimeError: audit log unavailable" and promoted == []
    assert job.result["failed_stage"] == "commit"
    _assert_nothing_lost(ctx, job, ids)  # the snapshot, the samples and the version rolled back together


def test_a_gate_rejection_consumes_the_samples_on_purpose(ctx, tiny_onnx):
    ids = _add_samples(ctx, 6)
    worse = {"golden": {"map50": 0.80, "map50_95": 0.45}, "new_data": {"map50": 0.95, "map50_95": 0.60}}
    job, _ = _run(ctx, StandInExecutor(tiny_onnx("candidate.onnx"), worse))
    assert job.status == "rejected" and job.candidate_version == 2
    books = _books(ctx)
    assert books["consumed"] == sorted(ids) and books["pending"] == []
    assert books["versions"] == [(1, "production", True), (2, "rejected", False)]
    assert books["aliases"] == {"production": 1}
    stages = job.result["pipeline"]["stages"]
    assert stages["bundle"]["status"] == stages["register"]["status"] == "skipped"


def test_production_changing_while_the_job_runs_fails_it_at_the_commit(ctx, tiny_onnx, tmp_path, monkeypatch):
    ids = _add_samples(ctx, 6)
    build = ctx.publisher.build

    def operator_registers_meanwhile(**kwargs):
        # The job reserved number 2 for its bundle: the operator's model gets 3, nothing is overwritten.
        (tmp_path / "other.pt").write_bytes(b"other")
        (tmp_path / "external").mkdir()
        monkeypatch.setattr(ctx.publisher, "build", build)
        assert ctx.publisher.register_external(pt=tmp_path / "other.pt", onnx=tiny_onnx("other.onnx"), imgsz=32,
                                               metrics=PROD, hyperparameters={}, actor="op", source="",
                                               work_dir=tmp_path / "external") == 3
        return build(**kwargs)

    monkeypatch.setattr(ctx.publisher, "build", operator_registers_meanwhile)
    job, promoted = _run(ctx, StandInExecutor(tiny_onnx("candidate.onnx"), GOOD))
    assert job.status == "failed" and promoted == []
    assert "production changed from version 1 to 3" in job.result["error"]
    books = _books(ctx)
    assert books["pending"] == sorted(ids) and books["consumed"] == []
    assert books["versions"] == [(1, "archived", True), (3, "production", True)]
    assert not [info.key for info in ctx.store.list("models/") if "/000002/" in info.key]


# ---------------------------------------------------------------------- resume after a restart


CRASH_POINTS = {
    # stage: (where the crash is injected, stages that must not run again on resume)
    "snapshot": ("server.pipeline.runner.freeze_snapshot", {"validate"}),
    "dataset": ("server.pipeline.runner.materialize", {"validate", "snapshot"}),
    "train": ("executor", {"validate", "snapshot", "dataset"}),
    "gate": ("server.pipeline.runner.decide", {"validate", "snapshot", "dataset", "train"}),
    "bundle": ("publisher.build", {"validate", "snapshot", "dataset", "train", "gate"}),
    "register": ("publisher.upload", {"validate", "snapshot", "dataset", "train", "gate", "bundle"}),
    "commit": ("server.pipeline.runner.audit.record",
               {"validate", "snapshot", "dataset", "train", "gate", "bundle", "register"}),
}


class CountingExecutor(StandInExecutor):
    def __init__(self, *args, crash: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.runs, self.crash, self.abandoned = 0, crash, []

    def run(self, spec, work_dir, on_event):
        self.runs += 1
        on_event({"event": "started", "executor": "stand-in", "pid": 0, "spec": str(work_dir / "spec.json")})
        if self.crash:
            raise Crash("server killed during training")
        return super().run(spec, work_dir, on_event)

    def abandon(self, started):
        self.abandoned.append(started)
        return True


@pytest.mark.parametrize("stage", list(CRASH_POINTS))
def test_a_server_killed_in_any_stage_resumes_the_job_and_consumes_the_samples_once(any_db_ctx, tiny_onnx,
                                                                                     monkeypatch, stage):
    from server.pipeline.trigger import RetrainScheduler

    ctx = any_db_ctx

    ids = _add_samples(ctx, 8)
    target, kept = CRASH_POINTS[stage]
    executor = CountingExecutor(tiny_onnx("candidate.onnx"), GOOD, crash=target == "executor")

    def crash(*args, **kwargs):
        raise Crash(f"server killed in {stage}")

    if target == "publisher.build":
        monkeypatch.setattr(ctx.publisher, "build", crash)
    elif target == "publisher.upload":
        monkeypatch.setattr(ctx.publisher, "upload", crash)
    elif target != "executor":
        monkeypatch.setattr(target, crash)
    with ctx.sessions() as session:
        row = TrainingJob(trigger="threshold", reason="test")
        session.add(row)
        session.commit()
        job_id = row.id
    promoted: list[int] = []
    runner = RetrainRunner(ctx.settings, ctx.sessions, ctx.store, executor, ctx.publisher, promoted.append,
                           alerts=ctx.alerts)
    with pytest.raises(Crash):
        runner.run(job_id)

    # Dead server: the job is still running and has consumed nothing.
    with ctx.sessions() as session:
        job = session.get(TrainingJob, job_id)
        assert job.status == "running"
        first_state = job.result["pipeline"]["stages"]
        snapshot_id = job.snapshot_id
    assert set(first_state) >= kept
    books = _books(ctx)
    assert books["consumed"] == [] and books["pending"] == sorted(ids)
    assert books["versions"] == [(1, "production", True)] and books["aliases"] == {"production": 1}

    # Samples that arrive while it is down did not pass this job's data gate: not in its snapshot.
    late = _add_samples(ctx, 2, start=500)
    # A new server starts: the job is picked up where it stopped.
    monkeypatch.undo()
    executor.crash = False
    runs_before = executor.runs
    scheduler = RetrainScheduler(ctx.sessions, lambda job_id: None)
    assert scheduler.recover() == [job_id]
    runner = RetrainRunner(ctx.settings, ctx.sessions, ctx.store, executor, ctx.publisher, promoted.append,
                           alerts=ctx.alerts)
    runner.run(job_id)

    with ctx.sessions() as session:
        job = session.get(TrainingJob, job_id)
    assert job.status == "succeeded", job.log
    assert promoted == [2]
    assert job.result["pipeline"]["attempt"] == 2
    assert "server restarted while the job was running: resuming at" in job.log
    if stage not in {"snapshot"}:
        assert job.snapshot_id == snapshot_id  # the same frozen samples
    assert executor.runs == runs_before + (0 if "train" in kept else 1)
    if stage == "train":
        assert executor.abandoned and executor.abandoned[0]["spec"].endswith("spec.json")
    books = _books(ctx)
    assert books["consumed"] == sorted(ids) and books["pending"] == sorted(late)
    assert books["versions"] == [(1, "archived", True), (2, "production", True)]
    with ctx.sessions() as session:
        assert session.query(Snapshot).count() == 1


def test_a_job_that_keeps_killing_the_server_is_failed_cleanly_after_its_attempts(ctx, tiny_onnx):
    from server.pipeline.stages import MAX_ATTEMPTS
    from server.pipeline.trigger import RetrainScheduler

    ids = _add_samples(ctx, 4)
    executor = CountingExecutor(tiny_onnx("candidate.onnx"), GOOD, crash=True)
    with ctx.sessions() as session:
        row = TrainingJob(trigger="manual", reason="test")
        session.add(row)
        session.commit()
        job_id = row.id
    runner = RetrainRunner(ctx.settings, ctx.sessions, ctx.store, executor, ctx.publisher, alerts=ctx.alerts)
    for _ in range(MAX_ATTEMPTS):
        with pytest.raises(Crash):
            runner.run(job_id)
        resumed = RetrainScheduler(ctx.sessions, lambda job_id: None).recover()
    assert resumed == []
    with ctx.sessions() as session:
        job = session.get(TrainingJob, job_id)
    assert job.status == "failed" and f"already started {MAX_ATTEMPTS} times" in job.result["error"]
    _assert_nothing_lost(ctx, job, ids)


def test_a_job_killed_before_any_stage_finished_is_failed_and_its_samples_released(ctx, tiny_onnx, monkeypatch):
    from server.pipeline.trigger import RetrainScheduler

    ids = _add_samples(ctx, 4)

    def crash(*args, **kwargs):
        raise Crash("killed during the data gate")

    monkeypatch.setattr("server.pipeline.runner.DataGate.run", crash)
    with ctx.sessions() as session:
        row = TrainingJob(trigger="manual", reason="test")
        session.add(row)
        session.commit()
        job_id = row.id
    with pytest.raises(Crash):
        RetrainRunner(ctx.settings, ctx.sessions, ctx.store, StandInExecutor(tiny_onnx("c.onnx"), GOOD),
                      ctx.publisher).run(job_id)
    assert RetrainScheduler(ctx.sessions, lambda job_id: None).recover() == []
    with ctx.sessions() as session:
        job = session.get(TrainingJob, job_id)
    assert "nothing of it was kept to resume from" in job.result["error"]
    _assert_nothing_lost(ctx, job, ids)


# ---------------------------------------------------------------------- the training set is cumulative


def _listed(data_yaml: str, split: str) -> set[str]:
    (entry,) = yaml.safe_load(Path(data_yaml).read_text())[split]
    path = Path(entry)
    files = path.read_text().split() if path.is_file() else [str(p) for p in path.glob("*.jpg")]
    return {Path(f).stem for f in files}


def test_a_second_retrain_trains_on_the_first_snapshots_samples_too(ctx, tiny_onnx):
    from server.pipeline.snapshot import is_validation

    val_fraction = ctx.settings.training.val_fraction
    first_ids = _add_samples(ctx, 30)
    job1, _ = _run(ctx, StandInExecutor(tiny_onnx("c1.onnx"), GOOD))
    assert job1.status == "succeeded", job1.log
    assert job1.result["history"]["snapshots"] == []  # the seed has no snapshot: nothing earlier

    second_ids = _add_samples(ctx, 30, start=100)
    executor = StandInExecutor(tiny_onnx("c2.onnx"), GOOD)
    job2, _ = _run(ctx, executor)
    assert job2.status == "succeeded", job2.log
    spec = executor.spec
    train = _listed(spec["data_yaml"], "train")
    first_val = {i for i in first_ids if is_validation(i, val_fraction)}
    # The first snapshot's training samples are trained on again; its held-out ones stay held out,
    # as the history eval set, and the gate's new-data split is the new snapshot's alone.
    assert set(first_ids) - first_val <= train
    assert not first_val & train
    assert _listed(spec["eval_sets"]["history"], "val") == first_val
    new_val = _listed(spec["eval_sets"]["new_data"], "val")
    assert new_val and new_val <= set(second_ids)
    assert set(second_ids) - new_val <= train

    (used,) = job2.result["history"]["snapshots"]
    assert used["id"] == job1.snapshot_id and used["depth"] == 1
    assert used["train"] + used["val"] == 30 and used["val"] == len(first_val)
    output = job2.result["pipeline"]["stages"]["dataset"]["output"]
    assert output["history_images"] == 30 - len(first_val) and output["history_val_images"] == len(first_val)
    replayed = 10  # the replay set's size caps the 2x replay
    assert len(train) == output["train_images"] + output["history_images"] + replayed
    assert f"{output['train_images']} new train + {output['history_images']} history from 1 snapshots" in job2.log
    with ctx.sessions() as session:  # the lineage of the version names the earlier snapshots it trained on
        mv = session.get(ModelVersion, job2.candidate_version)
        assert [h["id"] for h in mv.hyperparameters["history"]["snapshots"]] == [job1.snapshot_id]


def test_history_off_trains_on_the_new_snapshot_alone(ctx, tiny_onnx):
    ctx.settings.training.history_max_images = 0
    _add_samples(ctx, 20)
    assert _run(ctx, StandInExecutor(tiny_onnx("c1.onnx"), GOOD))[0].status == "succeeded"
    second_ids = _add_samples(ctx, 20, start=100)
    executor = StandInExecutor(tiny_onnx("c2.onnx"), GOOD)
    job, _ = _run(ctx, executor)
    assert job.status == "succeeded", job.log
    assert _listed(executor.spec["data_yaml"], "train") - {f"b{i}" for i in range(10)} <= set(second_ids)
    assert "history" not in executor.spec["eval_sets"]


def test_a_tampered_parent_snapshot_fails_the_job_clearly_and_keeps_its_samples(ctx, tiny_onnx):
    _add_samples(ctx, 20)
    job1, _ = _run(ctx, StandInExecutor(tiny_onnx("c1.onnx"), GOOD))
    assert job1.status == "succeeded", job1.log
    key = f"snapshots/{job1.snapshot_id}.json"
    manifest = json.loads(ctx.store.get_bytes(key, max_bytes=10_000_000))
    manifest["samples"][0]["labels"] = []
    ctx.store.put_bytes(key, json.dumps(manifest).encode(), "application/json")
    ids = _add_samples(ctx, 20, start=100)
    job2, _ = _run(ctx, StandInExecutor(tiny_onnx("c2.onnx"), GOOD))
    assert job2.status == "failed" and job2.result["failed_stage"] == "dataset"
    assert f"snapshot {job1.snapshot_id[:12]}" in job2.result["error"] and "hashes to" in job2.result["error"]
    assert _books(ctx)["pending"] == sorted(ids)
