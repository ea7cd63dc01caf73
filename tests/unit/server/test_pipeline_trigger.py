"""The scheduler around a pipeline that never loses data: jobs a restart finds running are
resumed or failed cleanly, threshold triggers wait while a batch is halted and back off after
failures, and an engineer's resolution of a halt drops the rejects (audited) and continues."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest

from server.db.models import AuditEntry, Base, Sample, TrainingJob, utcnow
from server.db.session import make_engine, make_session_factory
from server.pipeline.data_gate import HaltError
from server.pipeline.stages import MAX_ATTEMPTS, STAGE_NAMES, resume_decision
from server.pipeline.trigger import RetrainScheduler, halted_job


@pytest.fixture
def sessions(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'jobs.db'}")
    Base.metadata.create_all(engine)
    yield make_session_factory(engine)
    engine.dispose()


def _job(sessions, **fields) -> int:
    with sessions() as s:
        job = TrainingJob(trigger=fields.pop("trigger", "threshold"), **fields)
        s.add(job)
        s.commit()
        return job.id


def _state(*done: str, attempt: int = 1, running: str | None = None) -> dict:
    stages = {name: {"status": "done", "output": {}} for name in done}
    if running:
        stages[running] = {"status": "running"}
    return {"pipeline": {"attempt": attempt, "stages": stages}}


def test_the_stage_table_ends_at_its_commit_point():
    assert STAGE_NAMES[-1] == "commit" and STAGE_NAMES[0] == "validate"
    assert resume_decision({}) == (False, "nothing of it was kept to resume from")
    assert resume_decision(_state("validate", "snapshot", running="dataset")) == (
        True, "resuming at dataset (done: validate, snapshot)")
    ok, why = resume_decision(_state("validate", attempt=MAX_ATTEMPTS))
    assert not ok and f"already started {MAX_ATTEMPTS} times" in why


def test_a_restart_resumes_what_it_can_first_and_fails_the_rest_cleanly(sessions):
    resumable = _job(sessions, status="running", result=_state("validate", "snapshot", running="dataset"))
    bare = _job(sessions, status="running", trigger="manual")
    queued = _job(sessions, trigger="manual")
    ran: list[int] = []
    done = threading.Event()

    def run_job(job_id: int) -> None:
        ran.append(job_id)
        with sessions() as s:
            s.get(TrainingJob, job_id).status = "succeeded"
            s.commit()
        if len(ran) == 2:
            done.set()

    scheduler = RetrainScheduler(sessions, run_job)
    scheduler.start()
    assert done.wait(5)
    scheduler.stop()
    assert ran == [resumable, queued]  # the resumed job first, still holding its snapshot
    with sessions() as s:
        job = s.get(TrainingJob, bare)
        assert job.status == "failed" and job.finished_at is not None
        assert "nothing of it was kept to resume from" in job.result["error"]
        assert "its samples stay pending" in job.log
        assert "resuming at dataset" in s.get(TrainingJob, resumable).log


def test_a_job_the_worker_returns_unfinished_is_failed_not_run_forever(sessions):
    job_id = _job(sessions, trigger="manual")
    calls: list[int] = []
    scheduler = RetrainScheduler(sessions, calls.append)  # "runs" it and leaves it queued
    scheduler.start()
    deadline = time.monotonic() + 5
    while True:
        with sessions() as s:
            if s.get(TrainingJob, job_id).status == "failed":
                break
        assert time.monotonic() < deadline
        time.sleep(0.02)
    scheduler.stop()
    assert calls == [job_id]


def test_threshold_triggers_fold_into_any_running_job(sessions):
    # Samples are consumed at the running job's commit, so they still count towards the threshold.
    running = _job(sessions, status="running", trigger="manual")
    scheduler = RetrainScheduler(sessions, lambda job_id: None)
    assert scheduler.request("threshold", "1001 samples", "ingest").id == running
    assert scheduler.request("manual", "engineer asked", "alice").id != running


def test_threshold_triggers_back_off_after_failures_manual_ones_do_not(sessions):
    failed_at = utcnow()
    _job(sessions, status="failed", finished_at=failed_at)
    scheduler = RetrainScheduler(sessions, lambda job_id: None, failure_backoff_seconds=300)
    assert scheduler.request("threshold", "1000 samples", "ingest") is None
    with sessions() as s:
        assert s.query(TrainingJob).filter_by(status="queued").count() == 0
    # A second failure in a row doubles the wait: 10 minutes after it, still held.
    _job(sessions, status="failed", finished_at=failed_at - timedelta(minutes=10))
    with sessions() as s:
        for job in s.query(TrainingJob):
            job.finished_at = utcnow() - timedelta(minutes=8)
        s.commit()
    assert scheduler.request("threshold", "1000 samples", "ingest") is None
    with sessions() as s:
        for job in s.query(TrainingJob):
            job.finished_at = utcnow() - timedelta(minutes=11)
        s.commit()
    assert scheduler.request("threshold", "1000 samples", "ingest").status == "queued"
    # An engineer's request is never held back.
    with sessions() as s:
        s.query(TrainingJob).filter_by(status="queued").delete()
        s.add(TrainingJob(trigger="manual", status="failed", finished_at=utcnow()))
        s.commit()
    assert scheduler.request("manual", "try again now", "alice").status == "queued"


def _halted(sessions, rejected: dict[str, str]) -> int:
    return _job(sessions, status="failed", finished_at=utcnow() - timedelta(days=1), result={
        "error": "data contract: 2 of 4 samples (50%) break the data contract",
        "halted": {"reason": "2 of 4 samples (50%) break the data contract", "rejected": rejected,
                   "resolved": None}})


def _sample(session, sample_id: str) -> None:
    session.add(Sample(id=sample_id, device_id="cam-1", object_key=f"images/{sample_id}.jpg", sha256="0" * 64,
                       size_bytes=1, width=64, height=64, reason="correction", labels=[], status="validated"))


def test_a_halted_batch_starts_no_job_per_sample_until_an_engineer_resolves_it(sessions):
    with sessions() as s:
        for i in range(4):
            _sample(s, f"s{i}")
        s.commit()
    halted = _halted(sessions, {"s0": "class id 9 is not in the class list", "s1": "image does not decode"})
    queued: list[int] = []
    scheduler = RetrainScheduler(sessions, queued.append)
    for n in range(20):  # every new sample past the threshold fires a trigger
        assert scheduler.request("threshold", f"{1000 + n} validated samples", "ingest") is None
    with sessions() as s:
        assert s.query(TrainingJob).count() == 1
        assert halted_job(s).id == halted

    dropped, job = scheduler.resolve_halt(halted, "alice", "labels from the new shift were mapped wrong", "cli")
    assert dropped == 2 and job.status == "queued" and job.trigger == "manual"
    assert f"continue after the halt of job {halted}" in job.reason
    with sessions() as s:
        assert {x.id: x.status for x in s.query(Sample)} == {"s0": "rejected", "s1": "rejected",
                                                              "s2": "validated", "s3": "validated"}
        assert "dropped by alice after job" in s.get(Sample, "s0").reject_reason
        assert "class id 9" in s.get(Sample, "s0").reject_reason
        resolved = s.get(TrainingJob, halted).result["halted"]["resolved"]
        assert resolved["by"] == "alice" and resolved["dropped"] == 2
        (entry,) = s.query(AuditEntry).filter_by(action="retrain.halt.resolve").all()
        assert entry.actor == "alice" and entry.target == f"job:{halted}" and entry.source == "cli"
        assert entry.detail["dropped"] == 2
        assert halted_job(s) is None
    with pytest.raises(HaltError, match="already resolved by alice"):
        scheduler.resolve_halt(halted, "bob", "again")
    with pytest.raises(HaltError, match="did not halt"):
        scheduler.resolve_halt(job.id, "bob", "not halted")
