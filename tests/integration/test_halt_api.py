"""A batch the data contract halted, through the real app (SQLite + SeaweedFS): its rejects are
listed with device and reason, an operator drops them and continues with one audited call, and
the refusals are 404 / 409 / 422 / 403 with a reason (issue 10: the loop must close every time)."""

from __future__ import annotations

import uuid

import pytest
from fastapi.testclient import TestClient

from server.auth import Role, issue_token
from server.db.models import AuditEntry, Sample, TrainingJob
from server.settings import ServerSettings

pytestmark = pytest.mark.integration
ADMIN = "admin-" + uuid.uuid4().hex
REJECTS = {"bad-1": "label 0: class id 9 is outside the class list (3 classes: a, b, c)",
           "bad-2": "image does not decode (JPEG without a frame header)"}


@pytest.fixture
def api(seaweedfs, tmp_path):
    from server.app import create_app

    settings = ServerSettings(
        data_dir=tmp_path / "server", s3_endpoint=seaweedfs.endpoint, s3_access_key=seaweedfs.access_key,
        s3_secret_key=seaweedfs.secret_key, s3_bucket=f"halt-{uuid.uuid4().hex[:8]}", admin_token=ADMIN,
        class_names=["a", "b", "c"])
    app = create_app(settings, connect_mqtt=False)
    with TestClient(app) as client:
        ctx = app.state.ctx
        ctx.scheduler.stop()  # the continuation job stays queued: this test looks at it, nothing runs it
        with ctx.sessions() as session:
            client.tokens = {role: issue_token(session, role, f"{role.value}-user")
                             for role in (Role.VIEWER, Role.OPERATOR)}
            for sid, device in (("ok-1", "cam-1"), ("bad-1", "cam-2"), ("bad-2", "cam-1")):
                session.add(Sample(id=sid, device_id=device, object_key=f"images/{device}/{sid}.jpg",
                                   sha256="0" * 64, size_bytes=10, width=64, height=64, reason="correction",
                                   labels=[], status="validated"))
            # What the runner leaves on a job whose batch broke the contract (server/pipeline/runner.py _validate).
            halted = TrainingJob(trigger="threshold", reason="3 validated samples", status="failed", result={
                "error": "data contract: 2 of 3 samples (67%) break the data contract",
                "data": {"contract": {"checked": 3, "rejected": REJECTS, "halted": True}},
                "halted": {"reason": "2 of 3 samples (67%) break the data contract, over the 20% limit",
                           "rejected": REJECTS, "resolved": None}})
            fine = TrainingJob(trigger="manual", reason="earlier", status="succeeded", result={})
            session.add_all([fine, halted])
            session.commit()
            client.job_ids = {"halted": halted.id, "fine": fine.id}
        client.ctx = ctx
        yield client


def _as(client, role):
    return {"Authorization": f"Bearer {client.tokens[role]}"}


def test_the_halted_batchs_rejects_are_listed_with_device_and_reason(api):
    job_id = api.job_ids["halted"]
    response = api.get(f"/api/v1/jobs/{job_id}/rejects", headers=_as(api, Role.VIEWER))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["halted"] is True and body["resolved"] is None and body["total"] == 2
    assert body["halt_reason"].startswith("2 of 3 samples (67%)")
    assert body["items"] == [
        {"sample_id": "bad-1", "device_id": "cam-2", "reason": REJECTS["bad-1"], "status": "validated"},
        {"sample_id": "bad-2", "device_id": "cam-1", "reason": REJECTS["bad-2"], "status": "validated"}]
    page = api.get(f"/api/v1/jobs/{job_id}/rejects", params={"limit": 1, "offset": 1},
                   headers=_as(api, Role.VIEWER)).json()
    assert [r["sample_id"] for r in page["items"]] == ["bad-2"] and (page["limit"], page["offset"]) == (1, 1)
    # The job itself shows the halt too.
    job = api.get(f"/api/v1/jobs/{job_id}", headers=_as(api, Role.VIEWER)).json()
    assert job["result"]["halted"]["rejected"] == REJECTS
    missing = api.get("/api/v1/jobs/999999/rejects", headers=_as(api, Role.VIEWER))
    assert missing.status_code == 404 and "job 999999 does not exist" in missing.json()["detail"]


def test_an_operator_drops_the_rejects_and_the_loop_continues_audited(api):
    job_id = api.job_ids["halted"]
    url = f"/api/v1/jobs/{job_id}/resolve-halt"
    assert api.post(url, json={"reason": "cls 9 is a tool bug"}, headers=_as(api, Role.VIEWER)).status_code == 403
    for body in ({}, {"reason": "no"}, {"reason": "x" * 2001}, {"reason": "fine reason", "extra": 1}):
        assert api.post(url, json=body, headers=_as(api, Role.OPERATOR)).status_code == 422, body
    response = api.post(url, json={"reason": "cls 9 is a labelling-tool bug"}, headers=_as(api, Role.OPERATOR))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["job_id"] == job_id and body["dropped"] == 2 and body["status"] == "resolved"
    assert body["next_job_status"] == "queued" and body["next_job_id"] > job_id
    with api.ctx.sessions() as session:
        assert {s.id: s.status for s in session.query(Sample)} == {"ok-1": "validated", "bad-1": "rejected",
                                                                     "bad-2": "rejected"}
        assert "dropped by operator-user after job" in session.get(Sample, "bad-1").reject_reason
        entry = session.query(AuditEntry).filter_by(action="retrain.halt.resolve").one()
        assert entry.actor == "operator-user" and entry.target == f"job:{job_id}"
        assert entry.detail["reason"] == "cls 9 is a labelling-tool bug" and entry.detail["dropped"] == 2
        nxt = session.get(TrainingJob, body["next_job_id"])
        assert nxt.status == "queued" and f"continue after the halt of job {job_id}" in nxt.reason
    after = api.get(f"/api/v1/jobs/{job_id}/rejects", headers=_as(api, Role.VIEWER)).json()
    assert after["resolved"]["by"] == "operator-user" and after["resolved"]["dropped"] == 2
    assert {r["status"] for r in after["items"]} == {"rejected"}
    again = api.post(url, json={"reason": "once more"}, headers=_as(api, Role.OPERATOR))
    assert again.status_code == 409 and "already resolved by operator-user" in again.json()["detail"]


def test_refusals_name_the_reason(api):
    fine = api.post(f"/api/v1/jobs/{api.job_ids['fine']}/resolve-halt", json={"reason": "try it"},
                    headers=_as(api, Role.OPERATOR))
    assert fine.status_code == 409 and "did not halt on the data contract" in fine.json()["detail"]
    missing = api.post("/api/v1/jobs/999999/resolve-halt", json={"reason": "try it"}, headers=_as(api, Role.OPERATOR))
    assert missing.status_code == 404 and "job 999999 does not exist" in missing.json()["detail"]
    assert api.post(f"/api/v1/jobs/{2**31}/resolve-halt", json={"reason": "try it"},
                    headers=_as(api, Role.OPERATOR)).status_code == 422
    rejects = api.get(f"/api/v1/jobs/{api.job_ids['fine']}/rejects", headers=_as(api, Role.VIEWER)).json()
    assert rejects["halted"] is False and rejects["items"] == []


def test_the_dashboards_pipeline_view_has_the_halted_batch_until_it_is_resolved(api):
    from server.api.live_views import pipeline_view

    job_id = api.job_ids["halted"]
    with api.ctx.sessions() as session:
        view = pipeline_view(session, api.ctx.settings)
    assert view["halted"]["job_id"] == job_id
    assert [(r["sample_id"], r["device_id"], r["reason"]) for r in view["halted"]["items"]] == [
        ("bad-1", "cam-2", REJECTS["bad-1"]), ("bad-2", "cam-1", REJECTS["bad-2"])]
    api.post(f"/api/v1/jobs/{job_id}/resolve-halt", json={"reason": "reviewed"}, headers=_as(api, Role.OPERATOR))
    with api.ctx.sessions() as session:
        assert pipeline_view(session, api.ctx.settings)["halted"] is None
    script = api.get("/static/dashboard.js").text
    assert '"job.resolve-halt"' in script and "Drop rejects and continue" in script
