"""A halted batch as the API, CLI and dashboard show it (issue 10): its rejects with device and
reason, in batch order and paged, and the dashboard's pipeline view carrying the unresolved halt
until someone drops the rejects; the resolve request's reason is required and bounded."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from server.api.live_views import pipeline_view
from server.api.schemas import JobRejects, ResolveHaltRequest
from server.db.models import Base, Sample, TrainingJob
from server.db.session import make_engine, make_session_factory
from server.pipeline.data_gate import batch_rejects, resolve_halt
from server.settings import ServerSettings

REJECTS = {"s-bad-1": "label 0: class id 9 is outside the class list (3 classes: a, b, c)",
           "s-bad-2": "image does not decode (JPEG without a frame header)",
           "s-gone": "image is 20000x20000; sides must lie in [16, 4096]"}


@pytest.fixture
def sessions(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'halt.db'}")
    Base.metadata.create_all(engine)
    yield make_session_factory(engine)
    engine.dispose()


def _sample(sample_id: str, device: str) -> Sample:
    return Sample(id=sample_id, device_id=device, object_key=f"images/{device}/{sample_id}.jpg", sha256="0" * 64,
                  size_bytes=10, width=64, height=64, reason="correction", labels=[], status="validated")


@pytest.fixture
def halted(sessions) -> int:
    with sessions() as s:
        s.add_all([_sample("s-ok", "cam-1"), _sample("s-bad-1", "cam-2"), _sample("s-bad-2", "cam-1")])
        job = TrainingJob(trigger="threshold", reason="16 validated samples", status="failed",
                          result={"error": "data contract: 3 of 4 samples (75%) break the data contract",
                                  "halted": {"reason": "3 of 4 samples (75%) break the data contract, over the 20% "
                                                       "limit", "rejected": REJECTS, "resolved": None}})
        s.add(job)
        s.commit()
        return job.id


def test_a_halted_batchs_rejects_carry_device_reason_and_status(sessions, halted):
    with sessions() as s:
        view = batch_rejects(s, s.get(TrainingJob, halted))
    assert view["halted"] is True and view["resolved"] is None and view["total"] == 3
    assert view["halt_reason"].startswith("3 of 4 samples (75%)")
    assert view["items"] == [
        {"sample_id": "s-bad-1", "device_id": "cam-2", "reason": REJECTS["s-bad-1"], "status": "validated"},
        {"sample_id": "s-bad-2", "device_id": "cam-1", "reason": REJECTS["s-bad-2"], "status": "validated"},
        {"sample_id": "s-gone", "device_id": "", "reason": REJECTS["s-gone"], "status": "missing"},
    ]
    JobRejects(**view, limit=100, offset=0)  # the API's response model takes it as it is


def test_rejects_page_in_batch_order(sessions, halted):
    with sessions() as s:
        job = s.get(TrainingJob, halted)
        assert [r["sample_id"] for r in batch_rejects(s, job, limit=1, offset=1)["items"]] == ["s-bad-2"]
        assert batch_rejects(s, job, limit=5, offset=3)["items"] == []
        assert batch_rejects(s, job, limit=5, offset=3)["total"] == 3


def test_a_batch_that_went_on_shows_the_contracts_rejects(sessions):
    with sessions() as s:
        s.add(_sample("s-dup", "cam-3"))
        s.get(Sample, "s-dup").status = "rejected"
        job = TrainingJob(trigger="manual", reason="r", status="succeeded",
                          result={"data": {"contract": {"rejected": {"s-dup": "exact duplicate of sample s-1"}}}})
        s.add(job)
        none = TrainingJob(trigger="manual", reason="r", status="queued")
        s.add(none)
        s.commit()
        view = batch_rejects(s, job)
        assert view["halted"] is False and view["halt_reason"] == ""
        assert view["items"] == [{"sample_id": "s-dup", "device_id": "cam-3",
                                  "reason": "exact duplicate of sample s-1", "status": "rejected"}]
        assert batch_rejects(s, none) == {"job_id": none.id, "halted": False, "halt_reason": "", "resolved": None,
                                          "total": 0, "items": []}


def test_the_pipeline_view_shows_the_unresolved_halt_until_it_is_resolved(sessions, halted):
    settings = ServerSettings()
    with sessions() as s:
        view = pipeline_view(s, settings)
        assert view["halted"]["job_id"] == halted
        assert {(r["sample_id"], r["device_id"], r["reason"]) for r in view["halted"]["items"]} == {
            ("s-bad-1", "cam-2", REJECTS["s-bad-1"]), ("s-bad-2", "cam-1", REJECTS["s-bad-2"]),
            ("s-gone", "", REJECTS["s-gone"])}
        assert view["jobs"][0]["result"]["halted"]["resolved"] is None
        assert resolve_halt(s, halted, "alice", "cls 9 is a labelling-tool bug", "test") == 2
        s.commit()
    with sessions() as s:
        view = pipeline_view(s, settings)
        assert view["halted"] is None
        assert view["jobs"][0]["result"]["halted"]["resolved"]["by"] == "alice"
        resolved = batch_rejects(s, s.get(TrainingJob, halted))
        assert {r["status"] for r in resolved["items"]} == {"rejected", "missing"}
        assert resolved["resolved"]["dropped"] == 2
        JobRejects(**resolved, limit=100, offset=0)


@pytest.mark.parametrize("body", [{}, {"reason": ""}, {"reason": "ok"}, {"reason": "x" * 2001},
                                  {"reason": "fine reason", "force": True}])
def test_the_resolve_reason_is_required_and_bounded(body):
    with pytest.raises(ValidationError):
        ResolveHaltRequest(**body)
    assert ResolveHaltRequest(reason="cls 9 is a labelling-tool bug").reason.startswith("cls 9")
