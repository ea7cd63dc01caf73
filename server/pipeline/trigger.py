"""Retrain triggers coalesce into at most one queued job; one job runs at a time.

A job a restart finds ``running`` consumed nothing (samples are consumed at its commit only):
it is resumed at its first stage not done when it kept enough to resume from, else marked
failed, its samples left pending for the next job. Threshold triggers (every sample past the
threshold fires one) do not start a job while a halted batch waits for an engineer, and back
off after failures, so a broken pipeline is not retried once per incoming sample.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from server.db.models import TrainingJob, utcnow
from server.pipeline.executor import end_stale_trainer
from server.pipeline.stages import pipeline_state, resume_decision

log = structlog.get_logger(__name__)

FINISHED = ("succeeded", "rejected", "failed")


def halted_job(session: Session) -> TrainingJob | None:
    """The last finished job, when the data contract halted its batch and nobody resolved it yet."""
    last = session.scalar(select(TrainingJob).where(TrainingJob.status.in_(FINISHED))
                          .order_by(TrainingJob.id.desc()))
    halted = (last.result or {}).get("halted") if last is not None else None
    return last if halted and not halted.get("resolved") else None


def _aware(value: datetime | None) -> datetime | None:
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


class RetrainScheduler:
    def __init__(self, session_factory: sessionmaker[Session], run_job: Callable[[int], None], *,
                 failure_backoff_seconds: float = 300.0, max_backoff_seconds: float = 6 * 3600.0) -> None:
        self._sessions = session_factory
        self._run_job = run_job
        self._backoff = failure_backoff_seconds
        self._max_backoff = max_backoff_seconds
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._resume: list[int] = []

    def start(self) -> None:
        self._resume = self.recover()
        self._thread = threading.Thread(target=self._loop, name="retrain-worker", daemon=True)
        self._thread.start()
        self._wake.set()

    def recover(self) -> list[int]:
        """Jobs a dead server left ``running``: the ids to resume; the others are failed cleanly."""
        resume = []
        with self._sessions() as session:
            for job in session.scalars(select(TrainingJob).where(TrainingJob.status == "running")
                                       .order_by(TrainingJob.id)):
                ok, why = resume_decision(job.result)
                if ok:
                    job.log += f"\nserver restarted while the job was running: {why}"
                    resume.append(job.id)
                    continue
                process = pipeline_state(job.result)["stages"].get("train", {}).get("process")
                if process:  # a trainer the dead server left running must not outlive its job
                    end_stale_trainer(process)
                job.status, job.finished_at, job.candidate_version = "failed", utcnow(), None
                job.result = {**(job.result or {}), "error": f"server restarted while the job was running; {why}",
                              "failed_stage": job.stage or "start"}
                job.log += (f"\nserver restarted while the job was running; {why}: failed, "
                            "nothing was consumed, its samples stay pending for the next job")
            session.commit()
        if resume:
            log.info("retrain.resuming", jobs=resume)
        return resume

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _threshold_blocked(self, session: Session) -> str:
        """Why a threshold trigger starts nothing now ("" when it may)."""
        halted = halted_job(session)
        if halted is not None:
            return f"job {halted.id} halted on the data contract; an engineer must resolve its batch first"
        failures = []
        for job in session.scalars(select(TrainingJob).where(TrainingJob.status.in_(FINISHED))
                                   .order_by(TrainingJob.id.desc()).limit(8)):
            if job.status != "failed":
                break
            failures.append(job)
        if not failures or failures[0].finished_at is None:
            return ""
        wait = min(self._max_backoff, self._backoff * 2 ** (len(failures) - 1))
        since = (datetime.now(UTC) - _aware(failures[0].finished_at)).total_seconds()
        if since < wait:
            return (f"{len(failures)} failed job(s) in a row, the last (job {failures[0].id}) {since:.0f}s ago: "
                    f"waiting {wait:.0f}s before a threshold retry")
        return ""

    def request(self, trigger: str, reason: str, requested_by: str) -> TrainingJob | None:
        """Queue a retrain, or fold this request into the job already queued or running.

        A threshold trigger returns None when it starts nothing (halted batch, failure back-off).
        """
        with self._lock, self._sessions() as session:
            queued = session.scalar(select(TrainingJob).where(TrainingJob.status == "queued"))
            if queued is not None and trigger == "threshold":
                return queued  # every sample past the threshold re-fires it: nothing new to record
            if queued is not None:
                queued.coalesced += 1
                queued.log += f"\ncoalesced {trigger} trigger from {requested_by}: {reason}"
                session.commit()
                return queued
            if trigger == "threshold":
                running = session.scalar(select(TrainingJob).where(TrainingJob.status == "running"))
                if running is not None:
                    # Its samples stay pending until it commits, so they still count towards the
                    # threshold: whatever arrived since is for the job after it.
                    return running
                blocked = self._threshold_blocked(session)
                if blocked:
                    log.debug("retrain.threshold_held", reason=blocked)  # fires once per sample
                    return None
            job = TrainingJob(trigger=trigger, reason=reason, requested_by=requested_by)
            session.add(job)
            session.commit()
            log.info("retrain.queued", job=job.id, trigger=trigger, reason=reason)
        self._wake.set()
        return job

    def resolve_halt(self, job_id: int, actor: str, reason: str, source: str = "") -> tuple[int, TrainingJob]:
        """Drop the rejects of a halted batch (audited) and queue the retrain that continues it.
        Returns (samples dropped, the queued job). The API and CLI call this."""
        from server.pipeline.data_gate import resolve_halt

        with self._lock, self._sessions() as session:
            dropped = resolve_halt(session, job_id, actor, reason, source)
            session.commit()
        job = self.request("manual", f"continue after the halt of job {job_id}: {reason}", actor)
        return dropped, job

    def _next(self) -> int | None:
        if self._resume:
            return self._resume.pop(0)
        with self._sessions() as session:
            job = session.scalar(select(TrainingJob).where(TrainingJob.status == "queued").order_by(TrainingJob.id))
            return job.id if job is not None else None

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=5)
            self._wake.clear()
            while not self._stop.is_set():
                job_id = self._next()
                if job_id is None:
                    break
                try:
                    self._run_job(job_id)
                except Exception:
                    log.exception("retrain.crashed", job=job_id)
                self._settle(job_id)

    def _settle(self, job_id: int) -> None:
        """A job that came back from its run still ``running`` (the runner itself broke) is failed."""
        with self._sessions() as session:
            job = session.get(TrainingJob, job_id)
            if job is not None and job.status in {"queued", "running"}:
                job.status, job.finished_at, job.candidate_version = "failed", utcnow(), None
                error = (job.result or {}).get("error") or "the retrain worker stopped without finishing the job"
                job.result = {**(job.result or {}), "error": error}
                job.log += "\nthe retrain worker stopped without finishing the job; its samples stay pending"
                session.commit()
