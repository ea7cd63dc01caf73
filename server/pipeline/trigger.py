"""Retrain triggers coalesce into at most one queued job; one job runs at a time."""

from __future__ import annotations

import threading
from collections.abc import Callable

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from server.db.models import TrainingJob, utcnow

log = structlog.get_logger(__name__)


class RetrainScheduler:
    def __init__(self, session_factory: sessionmaker[Session], run_job: Callable[[int], None]) -> None:
        self._sessions = session_factory
        self._run_job = run_job
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        with self._sessions() as session:
            # A job that was running when the server died cannot be resumed half-way: record it.
            for job in session.scalars(select(TrainingJob).where(TrainingJob.status == "running")):
                job.status, job.finished_at = "failed", utcnow()
                job.log += "\nserver restarted while the job was running"
            session.commit()
        self._thread = threading.Thread(target=self._loop, name="retrain-worker", daemon=True)
        self._thread.start()
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def request(self, trigger: str, reason: str, requested_by: str) -> TrainingJob:
        """Queue a retrain, or fold this request into the job already queued."""
        with self._lock, self._sessions() as session:
            queued = session.scalar(select(TrainingJob).where(TrainingJob.status == "queued"))
            if queued is not None and trigger == "threshold":
                return queued  # every sample past the threshold re-fires it: nothing new to record
            if queued is not None:
                queued.coalesced += 1
                queued.log += f"\ncoalesced {trigger} trigger from {requested_by}: {reason}"
                session.commit()
                return queued
            if trigger == "threshold" and session.scalar(
                select(TrainingJob).where(TrainingJob.status == "running", TrainingJob.trigger == "threshold")
            ):
                # The running job already snapshots everything validated so far.
                running = session.scalar(select(TrainingJob).where(TrainingJob.status == "running"))
                return running
            job = TrainingJob(trigger=trigger, reason=reason, requested_by=requested_by)
            session.add(job)
            session.commit()
            log.info("retrain.queued", job=job.id, trigger=trigger, reason=reason)
        self._wake.set()
        return job

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=5)
            self._wake.clear()
            while not self._stop.is_set():
                with self._sessions() as session:
                    job = session.scalar(
                        select(TrainingJob).where(TrainingJob.status == "queued").order_by(TrainingJob.id)
                    )
                    if job is None:
                        break
                    job_id = job.id
                try:
                    self._run_job(job_id)
                except Exception:
                    log.exception("retrain.crashed", job=job_id)
