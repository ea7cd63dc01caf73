"""Registry and data-governance API on a real app (SQLite + SeaweedFS): roles, approval, one-call
rollback, lineage down to images and devices, snapshot rebuild, alerts, quarantine release."""

from __future__ import annotations

import hashlib
import uuid

import cv2
import pytest
from fastapi.testclient import TestClient

from server.auth import Role, issue_token
from server.db.models import AuditEntry, ModelVersion, Quarantine, Sample
from server.pipeline.snapshot import SnapshotError, build_snapshot, rebuild_snapshot
from server.settings import ServerSettings
from training.synth import render_frame

pytestmark = pytest.mark.integration
ADMIN = "admin-" + uuid.uuid4().hex


@pytest.fixture
def api(seaweedfs, tmp_path, tiny_onnx):
    from server.app import create_app

    settings = ServerSettings(
        data_dir=tmp_path / "server", s3_endpoint=seaweedfs.endpoint, s3_access_key=seaweedfs.access_key,
        s3_secret_key=seaweedfs.secret_key, s3_bucket=f"reg-{uuid.uuid4().hex[:8]}", admin_token=ADMIN,
        class_names=["a", "b", "c"])
    app = create_app(settings, connect_mqtt=False)
    with TestClient(app) as client:
        ctx = app.state.ctx
        (tmp_path / "w.pt").write_bytes(b"weights")
        for _ in range(2):  # v1, then v2 (v1 becomes previous)
            work = tmp_path / uuid.uuid4().hex
            work.mkdir()
            ctx.publisher.register_external(pt=tmp_path / "w.pt", onnx=tiny_onnx("m.onnx"), imgsz=32, metrics={},
                                            hyperparameters={}, actor="seed", source="", work_dir=work)
        with ctx.sessions() as session:
            tokens = {role: issue_token(session, role, f"{role.value}-user")
                      for role in (Role.VIEWER, Role.OPERATOR, Role.ENGINEER)}
            session.commit()
        client.tokens = tokens
        client.ctx = ctx
        yield client


def _as(client, role):
    return {"Authorization": f"Bearer {client.tokens[role]}"}


def test_rollback_is_one_operator_call_audited_and_refused_for_viewers(api):
    assert api.post("/api/v1/models/rollback", headers=_as(api, Role.VIEWER)).status_code == 403
    response = api.post("/api/v1/models/rollback", json={"reason": "line 3 regressions"},
                        headers=_as(api, Role.OPERATOR))
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["from_version"], body["to_version"], body["registry_moved"]) == (2, 1, True)
    assert body["commanded"] == [] and body["rollout_rolled_back"] is None  # no devices enrolled here
    models = {m["version"]: m for m in api.get("/api/v1/models", headers=_as(api, Role.VIEWER)).json()["items"]}
    assert models[1]["aliases"] == ["production"] and models[2]["status"] == "rolled_back"
    again = api.post("/api/v1/models/rollback", headers=_as(api, Role.OPERATOR))
    assert again.status_code == 409 and "no earlier production version" in again.json()["detail"]
    to_rolled_back = api.post("/api/v1/models/rollback", json={"version": 2}, headers=_as(api, Role.OPERATOR))
    assert to_rolled_back.status_code == 409 and "rolled_back" in to_rolled_back.json()["detail"]
    assert api.post("/api/v1/models/rollback", json={"version": 99},
                    headers=_as(api, Role.OPERATOR)).status_code == 404
    with api.ctx.sessions() as session:
        entry = session.query(AuditEntry).filter_by(action="fleet.rollback").one()
        assert entry.actor == "operator-user" and entry.detail["reason"] == "line 3 regressions"
        assert entry.detail["from_version"] == 2
    assert api.get("/api/v1/audit", headers=_as(api, Role.VIEWER)).status_code == 403
    log = api.get("/api/v1/audit", params={"action": "fleet.rollback"}, headers=_as(api, Role.OPERATOR)).json()
    assert log["total"] == 1 and log["items"][0]["target"] == "version:1"
    actions = [e["action"] for e in api.get("/api/v1/audit", headers=_as(api, Role.OPERATOR)).json()["items"]]
    assert actions == ["fleet.rollback", "model.register", "model.register"]
    history = api.get("/api/v1/aliases/history", params={"alias": "production"},
                      headers=_as(api, Role.VIEWER)).json()
    production = [(h["version"], h["from_version"]) for h in history["items"]]
    assert production == [(1, 2), (2, 1), (1, None)]  # newest first: the rollback, v2's approval, v1's
    assert history["total"] == 3 and history["items"][0]["actor"] == "operator-user"


def test_rolling_back_twice_goes_back_twice(api, tmp_path, tiny_onnx):
    work = tmp_path / "v3"
    work.mkdir()
    api.ctx.publisher.register_external(pt=tmp_path / "w.pt", onnx=tiny_onnx("m3.onnx"), imgsz=32, metrics={},
                                        hyperparameters={}, actor="seed", source="", work_dir=work)
    first = api.post("/api/v1/models/rollback", headers=_as(api, Role.OPERATOR)).json()
    second = api.post("/api/v1/models/rollback", headers=_as(api, Role.OPERATOR)).json()
    assert (first["from_version"], first["to_version"]) == (3, 2)
    assert (second["from_version"], second["to_version"]) == (2, 1)
    statuses = {m["version"]: m["status"] for m in api.get("/api/v1/models", headers=_as(api, Role.VIEWER)).json()["items"]}
    assert statuses == {1: "production", 2: "rolled_back", 3: "rolled_back"}


def test_approval_of_a_candidate_by_an_operator(api):
    with api.ctx.sessions() as session:
        v2 = session.get(ModelVersion, 2)
        session.add(ModelVersion(version=3, name=v2.name, status="candidate", bundle_key=v2.bundle_key,
                                 bundle_sha256=v2.bundle_sha256, bundle_size=v2.bundle_size))
        session.add(ModelVersion(version=4, name=v2.name, status="rejected", reason="golden fell"))
        session.commit()
    assert api.post("/api/v1/models/3/approve", headers=_as(api, Role.VIEWER)).status_code == 403
    assert api.post("/api/v1/models/99/approve", headers=_as(api, Role.OPERATOR)).status_code == 404
    refused = api.post("/api/v1/models/4/approve", headers=_as(api, Role.OPERATOR))
    assert refused.status_code == 409 and "rejected by its gate (golden fell)" in refused.json()["detail"]
    ok = api.post("/api/v1/models/3/approve", json={"reason": "reviewed"}, headers=_as(api, Role.OPERATOR))
    assert ok.status_code == 200, ok.text
    lineage = api.get("/api/v1/models/3/lineage", headers=_as(api, Role.VIEWER)).json()
    assert lineage["approved_by"] == "operator-user"
    models = {m["version"]: m for m in api.get("/api/v1/models", headers=_as(api, Role.VIEWER)).json()["items"]}
    assert models[3]["aliases"] == ["production"] and models[2]["aliases"] == ["previous"]


def _samples(ctx, device: str, n: int, start: int = 0) -> None:
    with ctx.sessions() as session:
        for i in range(start, start + n):
            data = cv2.imencode(".jpg", render_frame("base", seed=9, index=i, imgsz=64)[0])[1].tobytes()
            key = f"images/{device}/{i}.jpg"
            ctx.store.put_bytes(key, data, "image/jpeg")
            session.add(Sample(id=f"{device}-{i}", device_id=device, object_key=key,
                               sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data), width=64, height=64,
                               reason="correction", labels=[{"cls": 0, "cx": .5, "cy": .5, "w": .2, "h": .2}],
                               status="validated"))
        session.commit()


def test_lineage_traces_a_model_to_its_snapshots_images_and_devices_and_snapshots_rebuild_exactly(api, tmp_path):
    ctx = api.ctx
    _samples(ctx, "cam-1", 3)
    _samples(ctx, "cam-2", 2, start=10)
    with ctx.sessions() as session:
        first, _ = build_snapshot(session, ctx.store, None)
        session.commit()
    _samples(ctx, "cam-1", 2, start=20)
    with ctx.sessions() as session:
        second, _ = build_snapshot(session, ctx.store, first.id)
        session.get(ModelVersion, 2).snapshot_id = second.id
        session.commit()
    lineage = api.get("/api/v1/models/2/lineage", headers=_as(api, Role.VIEWER)).json()
    assert [s["id"] for s in lineage["snapshots"]] == [second.id, first.id]
    assert lineage["snapshots"][1]["devices"] == {"cam-1": 3, "cam-2": 2}
    page = api.get(f"/api/v1/snapshots/{first.id}", params={"limit": 2, "offset": 1},
                   headers=_as(api, Role.VIEWER)).json()
    assert page["total"] == 5 and len(page["items"]) == 2

    # Rebuilt byte for byte, following the chain; each image matches the bytes that trained.
    out = tmp_path / "rebuilt"
    assert rebuild_snapshot(ctx.store, second.id, out, with_parents=True) == 7
    for sample_id in ("cam-1-0", "cam-2-10", "cam-1-21"):
        with ctx.sessions() as session:
            sample = session.get(Sample, sample_id)
        assert hashlib.sha256((out / "images" / f"{sample_id}.jpg").read_bytes()).hexdigest() == sample.sha256
    assert (out / "labels" / "cam-1-0.txt").read_text() == "0 0.500000 0.500000 0.200000 0.200000\n"

    # An object changed after the snapshot: the rebuild refuses rather than train on other bytes.
    ctx.store.put_bytes("images/cam-1/20.jpg", b"\xff\xd8\xffchanged", "image/jpeg")
    with pytest.raises(SnapshotError, match="changed since snapshot"):
        rebuild_snapshot(ctx.store, second.id, tmp_path / "again")


def test_alerts_list_and_quarantine_release_need_the_right_roles(api):
    from protocol.alerts import AlertKind, Severity

    ctx = api.ctx
    for i in range(3):
        ctx.alerts.raise_alert(AlertKind.MODEL_REJECTED, Severity.WARNING, f"rejected {i}", subject=f"model {i}")
    ctx.alerts.raise_alert(AlertKind.DEVICE_QUARANTINED, Severity.WARNING, "cam-9 quarantined", subject="cam-9")
    page = api.get("/api/v1/alerts", params={"kind": "model_rejected", "limit": 2},
                   headers=_as(api, Role.VIEWER)).json()
    assert page["total"] == 3 and [a["message"] for a in page["items"]] == ["rejected 2", "rejected 1"]

    _samples(ctx, "cam-9", 2)
    with ctx.sessions() as session:
        session.add(Quarantine(device_id="cam-9", status="quarantined", reasons=["flips labels"]))
        for s in session.query(Sample).filter_by(device_id="cam-9"):
            s.status = "held"
        session.commit()
    listing = api.get("/api/v1/quarantines", headers=_as(api, Role.VIEWER)).json()
    assert listing["quarantined"] == ["cam-9"] and listing["held_samples"] == {"cam-9": 2}
    assert api.post("/api/v1/devices/cam-9/quarantine/release",
                    headers=_as(api, Role.OPERATOR)).status_code == 403
    released = api.post("/api/v1/devices/cam-9/quarantine/release", json={"reason": "relabelled by QA"},
                        headers=_as(api, Role.ENGINEER))
    assert released.json() == {"device_id": "cam-9", "released_samples": 2}
    assert api.post("/api/v1/devices/cam-9/quarantine/release",
                    headers=_as(api, Role.ENGINEER)).status_code == 409
    assert api.get("/api/v1/quarantines", headers=_as(api, Role.VIEWER)).json()["quarantined"] == []


def test_yolo_import_through_the_cli_lands_as_validated_samples_with_rejects_kept(api, tmp_path, monkeypatch):
    import httpx
    import yaml
    from typer.testing import CliRunner

    from training.cli import data_app

    root = tmp_path / "roboflow"
    (root / "train" / "images").mkdir(parents=True)
    (root / "train" / "labels").mkdir(parents=True)
    (root / "data.yaml").write_text(yaml.safe_dump({"train": "../train/images", "names": ["c", "a"]}))
    for i in range(4):
        cv2.imwrite(str(root / "train" / "images" / f"f{i}.jpg"), render_frame("base", seed=4, index=i, imgsz=64)[0])
        (root / "train" / "labels" / f"f{i}.txt").write_text("0 0.5 0.5 0.2 0.2\n1 0.2 0.2 0.1 0.1\n")
    (root / "train" / "labels" / "f3.txt").write_text("0 0.95 0.5 0.3 0.2\n")  # box outside the image
    engineer = api.tokens[Role.ENGINEER]

    def client(**kwargs):
        api.headers["Authorization"] = kwargs["headers"]["Authorization"]
        return api

    monkeypatch.setattr(httpx, "Client", client)
    result = CliRunner().invoke(data_app, ["import", str(root), "--source", "roboflow-line3", "--token", engineer,
                                           "--batch", "3"])
    assert result.exit_code == 0, result.output
    assert "imported: 1 rejected, 3 validated" in result.output
    with api.ctx.sessions() as session:
        rows = session.query(Sample).filter_by(device_id="import:roboflow-line3").all()
        assert len(rows) == 4 and {r.reason for r in rows} == {"import"}
        ok = [r for r in rows if r.status == "validated"]
        assert ok[0].labels[0]["cls"] == 2 and ok[0].labels[1]["cls"] == 0  # "c" -> 2, "a" -> 0
        (bad,) = [r for r in rows if r.status == "rejected"]
        assert "outside the image" in bad.reject_reason
        assert {e.actor for e in session.query(AuditEntry).filter_by(action="data.import")} == {"engineer-user"}
    again = CliRunner().invoke(data_app, ["import", str(root), "--source", "roboflow-line3", "--token", engineer])
    assert "imported: 4 duplicate" in again.output
    operator = CliRunner().invoke(data_app, ["import", str(root), "--source", "x", "--token",
                                             api.tokens[Role.OPERATOR]])
    assert operator.exit_code == 1 and "403" in operator.output


def test_overview_shows_alerts_and_quarantined_devices_for_the_dashboard(api):
    from protocol.alerts import AlertKind, Severity

    api.ctx.alerts.raise_alert(AlertKind.MODEL_REJECTED, Severity.WARNING, "v3 rejected: golden fell", subject="model 3")
    with api.ctx.sessions() as session:
        session.add(Quarantine(device_id="cam-7", status="quarantined"))
        session.commit()
    overview = api.get("/api/v1/overview", headers=_as(api, Role.VIEWER)).json()
    assert overview["alerts"][0]["message"] == "v3 rejected: golden fell"
    assert overview["quarantined"] == ["cam-7"]
    page = api.get("/", headers={"Cookie": f"edgeloop_token={api.tokens[Role.VIEWER]}"})
    assert 'id="tab-alerts"' in page.text and 'id="alerts-table"' in page.text
