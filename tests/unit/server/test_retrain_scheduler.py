"""Triggers coalesce into one queued job; one job runs at a time; a job left running by a
dead server is recorded as failed on start."""

from __future__ import annotations

import threading
import time

from server.db.models import Base, TrainingJob
from server.db.session import make_engine, make_session_factory
from server.pipeline.trigger import RetrainScheduler


def _sessions(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'jobs.db'}")
    Base.metadata.create_all(engine)
    return make_session_factory(engine)


def _wait(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_triggers_coalesce_and_jobs_run_one_at_a_time(tmp_path):
    sessions = _sessions(tmp_path)
    release = threading.Event()
    running: list[int] = []
    concurrent = []

    def run_job(job_id: int) -> None:
        with sessions() as s:
            s.get(TrainingJob, job_id).status = "running"
            s.commit()
        # Seen as running only once the row says so: a trigger before that joins the queued job.
        running.append(job_id)
        concurrent.append(len(running) - len(finished))
        release.wait(5)
        with sessions() as s:
            s.get(TrainingJob, job_id).status = "succeeded"
            s.commit()
        finished.append(job_id)

    finished: list[int] = []
    scheduler = RetrainScheduler(sessions, run_job)
    scheduler.start()
    first = scheduler.request("threshold", "1000 samples", "ingest")
    _wait(lambda: running == [first.id])
    # While the first runs: a threshold trigger folds into it, a manual one queues, more coalesce.
    assert scheduler.request("threshold", "1001 samples", "ingest").id == first.id
    second = scheduler.request("manual", "engineer asked", "alice")
    third = scheduler.request("drift", "cam-2 drifted", "drift")
    assert third.id == second.id
    with sessions() as s:
        assert s.get(TrainingJob, second.id).coalesced == 1
    release.set()
    _wait(lambda: finished == [first.id, second.id])
    assert max(concurrent) == 1
    scheduler.stop()


def test_job_left_running_by_a_dead_server_is_marked_failed(tmp_path):
    sessions = _sessions(tmp_path)
    with sessions() as s:
        s.add(TrainingJob(trigger="manual", status="running"))
        s.commit()
    scheduler = RetrainScheduler(sessions, lambda job_id: None)
    scheduler.start()
    with sessions() as s:
        job = s.query(TrainingJob).one()
        assert job.status == "failed" and "server restarted" in job.log
    scheduler.stop()


def test_repeated_threshold_triggers_do_not_pile_up_on_a_queued_job(tmp_path):
    sessions = _sessions(tmp_path)
    scheduler = RetrainScheduler(sessions, lambda job_id: None)  # not started: jobs stay queued
    first = scheduler.request("manual", "engineer asked", "alice")
    for n in range(50):
        assert scheduler.request("threshold", f"{1000 + n} samples", "ingest").id == first.id
    with sessions() as s:
        job = s.get(TrainingJob, first.id)
        assert job.coalesced == 0 and "threshold" not in job.log
        assert s.query(TrainingJob).count() == 1
