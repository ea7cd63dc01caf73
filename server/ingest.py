"""Turns device messages into database state: samples (validated or rejected with a reason),
device status and heartbeats, OTA transitions and shadow reports."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Protocol

import structlog
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, lazyload, sessionmaker

from protocol import ProtocolError, decode_message
from protocol.messages import DriftReport, Heartbeat, SampleEvent, ShadowReport, StatusMessage, UpdateEvent
from server import metrics
from server.db.models import Deployment, Device, Sample, utcnow
from server.objectstore import ObjectNotFoundError, ObjectStoreError, ObjectTooLargeError
from server.sample_validation import ImageLimits, SampleRejected, check_image, check_labels, check_object_key

log = structlog.get_logger(__name__)

ACTIVE_STATE = "ACTIVE"
# A sample whose object could not be checked because the store was down when its event came.
UNVERIFIED = "unverified"


# What the dispatcher's event workers handle, in batches (IngestService.process_events).
DEVICE_EVENTS = (StatusMessage, UpdateEvent, ShadowReport)


class ReportRecorder(Protocol):
    """What ingest tells about device reports (server.rollouts.controller.RolloutController)."""

    def record(self, session: Session, messages: Sequence) -> None:
        """Write what these reports mean for rollouts, in ingest's transaction (no commit)."""

    def nudge(self) -> None:
        """Reports were committed: decide soon."""


def pending_labeled_samples(session: Session) -> int:
    """Validated, labeled samples not yet in a dataset snapshot: what the retrain threshold counts."""
    return session.scalar(
        select(func.count()).select_from(Sample).where(Sample.status == "validated", Sample.snapshot_id.is_(None))
    ) or 0


class IngestService:
    def __init__(
        self,
        session_factory: sessionmaker[Session],
        store,
        class_names: list[str],
        limits: ImageLimits,
        threshold: int,
        on_threshold: Callable[[int], None],
    ) -> None:
        self._sessions = session_factory
        self._store = store
        self._class_names = list(class_names)
        self._limits = limits
        self._threshold = threshold
        self._on_threshold = on_threshold
        # The rollout controller: records status, update and shadow messages in ingest's transaction.
        self.rollouts: ReportRecorder | None = None
        # server.drift.monitor.DriftMonitor.handle_many: a batch of windows, scored in one transaction.
        self.on_drift: Callable[[Sequence[DriftReport]], object] | None = None
        self._stop = threading.Event()
        self._rechecker: threading.Thread | None = None

    def handle(self, topic: str, payload: bytes):
        """Decode and handle one device message on the calling thread; returns the message (None if
        refused). The MQTT bus goes through server.ingest_queues.IngestDispatcher, which calls this
        on its workers (and :meth:`decode` + :meth:`write_heartbeats` for batched heartbeats)."""
        message = self.decode(topic, payload)
        if message is not None:
            self.process(message)
        return message

    def decode(self, topic: str, payload: bytes):
        received = datetime.now(UTC)
        try:
            message = decode_message(topic, payload)
        except ProtocolError as exc:
            metrics.MESSAGES_REJECTED.labels(reason="protocol").inc()
            log.warning("ingest.bad_message", topic=topic, error=str(exc))
            return None
        metrics.MESSAGES_RECEIVED.labels(type=message.type).inc()
        # A timestamp without offset is taken as UTC; a device clock ahead of ours counts as no lag.
        sent = message.ts if message.ts.tzinfo else message.ts.replace(tzinfo=UTC)
        metrics.INGEST_LAG.labels(type=message.type).observe(max(0.0, (received - sent).total_seconds()))
        return message

    def process(self, message) -> None:
        if isinstance(message, SampleEvent):
            self.ingest_sample(message)
        elif isinstance(message, Heartbeat):
            self._on_heartbeat(message)
        elif isinstance(message, DriftReport):
            if self.on_drift is not None:
                self.on_drift([message])
        elif isinstance(message, DEVICE_EVENTS):
            self.process_events([message])

    def handle_events(self, items: Sequence[tuple[str, bytes]]) -> list:
        """Decode and handle a batch of status, update and shadow messages in one transaction (the
        dispatcher's event workers); returns each item's message (None if refused by the protocol)."""
        messages = [self.decode(topic, payload) for topic, payload in items]
        self.process_events([m for m in messages if m is not None])
        return messages

    def handle_drift(self, items: Sequence[tuple[str, bytes]]) -> list:
        """Decode a batch of drift windows and hand them to the drift monitor together (the
        dispatcher's drift worker); returns each item's message (None if refused by the protocol)."""
        # decode() refuses any other type on the drift channel: what is not None is a DriftReport.
        messages = [self.decode(topic, payload) for topic, payload in items]
        reports = [m for m in messages if m is not None]
        if reports and self.on_drift is not None:
            self.on_drift(reports)
        return messages

    def process_events(self, messages: Sequence) -> None:
        """Status, update and shadow messages, in order: the device's rows, then the rollout
        controller's record of them, all in one transaction. If that transaction fails, each message
        is handled again in a transaction of its own, so one bad message costs only itself."""
        events = [m for m in messages if isinstance(m, DEVICE_EVENTS)]
        if not events:
            return
        try:
            self._apply_events(events)
        except Exception:
            if len(events) == 1:
                raise
            log.warning("ingest.event_batch_failed", events=len(events), exc_info=True)
            for message in events:
                try:
                    self._apply_events([message])
                except IntegrityError as exc:  # e.g. a shadow report another replica stored meanwhile
                    log.warning("ingest.event_conflict", device=message.device_id, type=message.type,
                                error=str(exc.orig))
                except Exception:
                    log.exception("ingest.handler_failed", device=message.device_id, type=message.type)
        if self.rollouts is not None:
            self.rollouts.nudge()

    def _apply_events(self, events: Sequence) -> None:
        # One SELECT per table for the whole batch, then in-memory updates flushed once at commit
        # (no autoflush before each lookup): a batch costs a few statements, not a few per event.
        # Shadow windows, most of the traffic during a wave, skip the ORM objects altogether.
        shadows = [m for m in events if isinstance(m, ShadowReport)]
        others = [m for m in events if not isinstance(m, ShadowReport)]
        with self._sessions() as session, session.no_autoflush:
            if others:
                self._apply_device_events(session, others)
            if shadows:
                self._store_shadows(session, shadows)
            if self.rollouts is not None:
                self.rollouts.record(session, events)
            session.commit()
        for message in others:
            if isinstance(message, UpdateEvent):
                log.info("ingest.update", device=message.device_id, version=message.version,
                         transition=f"{message.from_state}->{message.to_state}", reason=message.reason)

    def _apply_device_events(self, session: Session, events: Sequence) -> None:
        ids = {m.device_id for m in events}
        # Status and update messages touch the device's own columns, never its groups and tags.
        devices = {d.id: d for d in session.scalars(
            select(Device).where(Device.id.in_(ids)).options(lazyload(Device.labels)))}
        commands = {m.update_id for m in events if isinstance(m, UpdateEvent)}
        deployments = {d.command_id: d for d in session.scalars(
            select(Deployment).where(Deployment.command_id.in_(commands)))} if commands else {}
        for message in events:
            device = devices.get(message.device_id)
            if device is None:
                log.warning("ingest.unknown_device", device=message.device_id)
            elif isinstance(message, StatusMessage):
                self._on_status(device, message)
            else:
                self._on_update(device, deployments.get(message.update_id), message)

    @staticmethod
    def _store_shadows(session: Session, shadows: Sequence[ShadowReport]) -> None:
        """Each deployment keeps its device's latest shadow window: one bulk UPDATE per batch."""
        latest = {m.update_id: m for m in shadows}  # in order: the last window of each command wins
        now = utcnow()
        rows = []
        for deployment_id, device_id, command_id in session.execute(
                select(Deployment.id, Deployment.device_id, Deployment.command_id)
                .where(Deployment.command_id.in_(list(latest)))):
            message = latest.pop(command_id)
            if device_id == message.device_id:
                rows.append({"id": deployment_id, "updated_at": now, "shadow": message.model_dump(
                    mode="json", exclude={"v", "type", "device_id", "msg_id"})})
            else:
                latest[command_id] = message
        for message in latest.values():
            log.warning("ingest.shadow_without_deployment", device=message.device_id)
        if rows:
            session.execute(update(Deployment), rows)  # ORM bulk UPDATE by primary key

    # ------------------------------------------------------------------ samples

    def ingest_sample(self, event: SampleEvent) -> Sample:
        with self._sessions() as session:
            existing = session.get(Sample, event.sample_id)
            if existing is not None:
                return existing  # QoS 1 redelivery or an agent retry: idempotent
            sample = self._sample_row(session, event)
            session.add(sample)
            session.commit()
            pending = pending_labeled_samples(session)
        self._counted([sample], pending)
        return sample

    def validate_sample(self, event: SampleEvent) -> Sample | None:
        """The checks of :meth:`ingest_sample` without writing: the row to store (with its outcome),
        or None when the sample is stored already. The dispatcher's sample pool runs these in
        parallel and :meth:`store_samples` writes their rows in one transaction."""
        with self._sessions() as session:
            if session.get(Sample, event.sample_id) is not None:
                return None
            return self._sample_row(session, event)

    def store_samples(self, rows: Sequence[Sample]) -> list[Sample]:
        """Write validated rows in one transaction; rows already stored (a redelivery) are skipped.
        Returns the rows written."""
        ids = [row.id for row in rows]
        with self._sessions() as session:
            seen = set(session.scalars(select(Sample.id).where(Sample.id.in_(ids)))) if ids else set()
            written = []
            for row in rows:
                if row.id in seen:
                    continue
                seen.add(row.id)
                session.add(row)
                written.append(row)
            session.commit()
            pending = pending_labeled_samples(session)
        self._counted(written, pending)
        return written

    def _sample_row(self, session: Session, event: SampleEvent) -> Sample:
        status, reason = "validated" if event.labels is not None else "unlabeled", ""
        try:
            self._validate(session, event)
        except SampleRejected as exc:
            status, reason = "rejected", str(exc)
        except ObjectStoreError as exc:
            # The broker has acknowledged the event and the device forgot it: never drop it.
            # Keep it unverified and check it again once the store answers (recheck_unverified).
            status, reason = UNVERIFIED, f"object store unreachable at ingest, re-checked later: {exc}"
        return Sample(
            id=event.sample_id,
            device_id=event.device_id,
            object_key=event.object_key,
            sha256=event.sha256,
            size_bytes=event.size_bytes,
            width=event.width,
            height=event.height,
            reason=event.reason.value,
            model_version=event.model_version,
            labels=[b.model_dump() for b in event.labels] if event.labels is not None else None,
            predictions=[b.model_dump() for b in event.predictions],
            captured_at=event.captured_at,
            status=status,
            reject_reason=reason,
        )

    def _counted(self, written: Sequence[Sample], pending: int) -> None:
        for sample in written:
            metrics.SAMPLES.labels(status=sample.status).inc()
            if sample.status == "rejected":
                log.info("ingest.sample_rejected", device=sample.device_id, sample=sample.id,
                         reason=sample.reject_reason)
        metrics.PENDING_SAMPLES.set(pending)
        if any(s.status == "validated" for s in written) and pending >= self._threshold:
            self._on_threshold(pending)

    def recheck_unverified(self, limit: int = 500) -> dict[str, int]:
        """Validate samples that arrived while the object store was unreachable; returns outcomes."""
        outcomes: dict[str, int] = {}
        with self._sessions() as session:
            rows = session.scalars(select(Sample).where(Sample.status == UNVERIFIED).order_by(Sample.received_at)
                                   .limit(limit)).all()
            for row in rows:
                event = SampleEvent(
                    device_id=row.device_id, sample_id=row.id, object_key=row.object_key, sha256=row.sha256,
                    size_bytes=row.size_bytes, width=row.width, height=row.height, reason=row.reason,
                    model_version=row.model_version, captured_at=row.captured_at,
                    predictions=row.predictions or [], labels=row.labels)
                try:
                    self._validate(session, event)
                    row.status, row.reject_reason = ("validated" if row.labels is not None else "unlabeled"), ""
                except SampleRejected as exc:
                    row.status, row.reject_reason = "rejected", str(exc)
                except ObjectStoreError:
                    break  # still down: try again on the next round, in arrival order
                outcomes[row.status] = outcomes.get(row.status, 0) + 1
                metrics.SAMPLES.labels(status=row.status).inc()
            session.commit()
            pending = pending_labeled_samples(session)
        if outcomes:
            log.info("ingest.rechecked", **outcomes)
            metrics.PENDING_SAMPLES.set(pending)
            if outcomes.get("validated") and pending >= self._threshold:
                self._on_threshold(pending)
        return outcomes

    def start_rechecker(self, interval: float = 10.0) -> None:
        def loop() -> None:
            while not self._stop.wait(interval):
                try:
                    self.recheck_unverified()
                except Exception:  # a database hiccup must not end the loop
                    log.exception("ingest.recheck_failed")

        self._stop.clear()
        self._rechecker = threading.Thread(target=loop, name="ingest-recheck", daemon=True)
        self._rechecker.start()

    def stop(self) -> None:
        self._stop.set()
        if self._rechecker is not None:
            self._rechecker.join(5)

    def _validate(self, session: Session, event: SampleEvent) -> None:
        device = session.get(Device, event.device_id)
        if device is None or device.revoked:
            raise SampleRejected(f"unknown or revoked device {event.device_id!r}")
        check_object_key(event)
        check_labels(event.labels, self._class_names)
        # One GET, no HEAD first: get_bytes refuses an object over the limit from its Content-Length
        # (or once the stream passes it) without reading further.
        try:
            data = self._store.get_bytes(event.object_key, max_bytes=self._limits.max_bytes)
        except ObjectNotFoundError as exc:
            if exc.code == "NoSuchBucket":
                raise  # the store is misconfigured, not the sample missing: unverified, re-checked
            raise SampleRejected(f"object {event.object_key!r} does not exist in the object store") from None
        except ObjectTooLargeError:
            raise SampleRejected(f"object is over the {self._limits.max_bytes}-byte limit") from None
        check_image(data, event, self._limits)

    # ------------------------------------------------------------------ device state

    def _device(self, session: Session, device_id: str) -> Device | None:
        device = session.get(Device, device_id)
        if device is None:
            log.warning("ingest.unknown_device", device=device_id)
        return device

    @staticmethod
    def _on_status(device: Device, message: StatusMessage) -> None:
        device.online = message.state == "online"
        device.last_seen = utcnow()
        if message.state == "online":
            device.agent_version = message.agent_version
            device.active_version = message.active_version
            device.candidate_version = message.candidate_version
            if message.hardware is not None:
                device.hardware = message.hardware.model_dump()

    def _on_heartbeat(self, message: Heartbeat) -> None:
        with self._sessions() as session:
            device = self._device(session, message.device_id)
            if device is None:
                return
            device.last_seen = utcnow()
            device.online = True
            device.active_version = message.active_version
            device.candidate_version = message.candidate_version
            device.last_heartbeat = message.model_dump(mode="json", exclude={"v", "type", "device_id", "msg_id"})
            session.commit()

    def write_heartbeats(self, batch: Sequence[tuple[Heartbeat, bool]]) -> int:
        """Write many devices' heartbeats in one transaction (at most one per device: the caller
        coalesces). With ``apply_state`` False only ``last_heartbeat`` and ``last_seen`` are written:
        a status or update message received after the heartbeat already set online and versions.
        Returns how many heartbeats matched an enrolled device."""
        now = utcnow()
        ids = list({message.device_id for message, _ in batch})
        with self._sessions() as session:
            known: set[str] = set()
            for start in range(0, len(ids), 500):
                known.update(session.scalars(select(Device.id).where(Device.id.in_(ids[start:start + 500]))))
            full, partial = [], []
            for message, apply_state in batch:
                if message.device_id not in known:
                    continue
                row = {"id": message.device_id, "last_seen": now, "last_heartbeat": message.model_dump(
                    mode="json", exclude={"v", "type", "device_id", "msg_id"})}
                if apply_state:
                    full.append({**row, "online": True, "active_version": message.active_version,
                                 "candidate_version": message.candidate_version})
                else:
                    partial.append(row)
            for rows in (full, partial):
                if rows:
                    session.execute(update(Device), rows)  # ORM bulk UPDATE by primary key
            session.commit()
        unknown = len(ids) - len(known)
        if unknown:
            log.warning("ingest.unknown_device", devices=unknown, example=next(i for i in ids if i not in known))
        return len(full) + len(partial)

    @staticmethod
    def _on_update(device: Device, deployment: Deployment | None, message: UpdateEvent) -> None:
        device.update_state = message.to_state
        device.last_seen = utcnow()
        if message.active_version is not None:
            device.active_version = message.active_version
        if deployment is not None and deployment.device_id == message.device_id:
            deployment.state = message.to_state
            deployment.reason = message.reason
            deployment.updated_at = utcnow()
