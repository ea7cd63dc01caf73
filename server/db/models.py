"""Database schema (SQLAlchemy 2). Alembic migrations in server/migrations mirror it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """Timezone-aware datetimes on every backend (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        # Store every instant as UTC wall time: SQLite keeps no offset.
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, datetime: UTCDateTime}


class Device(Base):
    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen: Mapped[datetime | None] = mapped_column(default=None)
    online: Mapped[bool] = mapped_column(Boolean, default=False)
    agent_version: Mapped[str] = mapped_column(String(32), default="")
    active_version: Mapped[int | None] = mapped_column(default=None)
    candidate_version: Mapped[int | None] = mapped_column(default=None)
    update_state: Mapped[str] = mapped_column(String(32), default="")
    hardware: Mapped[dict[str, Any]] = mapped_column(default=dict)
    last_heartbeat: Mapped[dict[str, Any]] = mapped_column(default=dict)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)
    # Who enrolled it: "bootstrap:<token id>" or the admin who provisioned it.
    enrolled_by: Mapped[str] = mapped_column(String(128), default="")
    enrolled_at: Mapped[datetime | None] = mapped_column(default=None)
    labels: Mapped[list[DeviceLabel]] = relationship(
        lazy="selectin", cascade="all, delete-orphan", order_by="(DeviceLabel.kind, DeviceLabel.value)")

    @property
    def groups(self) -> list[str]:
        return [label.value for label in self.labels if label.kind == "group"]

    @property
    def tags(self) -> list[str]:
        return [label.value for label in self.labels if label.kind == "tag"]


class DeviceLabel(Base):
    """A device's group or tag: rows (not a JSON list) so that selectors filter in SQL on every backend."""

    __tablename__ = "device_labels"
    __table_args__ = (Index("ix_device_labels_kind_value", "kind", "value"),)

    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True)
    kind: Mapped[str] = mapped_column(String(8), primary_key=True)  # group | tag
    value: Mapped[str] = mapped_column(String(64), primary_key=True)


class BootstrapToken(Base):
    """A shared enrollment secret (only its sha256 is stored): limited uses, an expiry, and the
    groups/tags every device enrolled with it gets."""

    __tablename__ = "bootstrap_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column()
    max_uses: Mapped[int] = mapped_column(Integer)
    uses: Mapped[int] = mapped_column(Integer, default=0)
    groups: Mapped[list[Any]] = mapped_column(default=list)
    tags: Mapped[list[Any]] = mapped_column(default=list)
    note: Mapped[str] = mapped_column(String(256), default="")
    last_used_at: Mapped[datetime | None] = mapped_column(default=None)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    subject: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class BrokerAccount(Base):
    """A device's broker account when the broker asks the server (``broker_accounts=http``:
    server/broker_accounts.py DatabaseAccounts, server/api/broker_hooks.py): user name = device id,
    salted SHA-256 of its server-generated password. No foreign key to devices: revoking a device
    deletes its account and keeps the device row."""

    __tablename__ = "broker_accounts"

    username: Mapped[str] = mapped_column(String(64), primary_key=True)
    password_hash: Mapped[str] = mapped_column(String(64))  # hex SHA-256 of salt + password
    salt: Mapped[str] = mapped_column(String(32))  # hex, 16 random bytes
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class Sample(Base):
    __tablename__ = "samples"
    __table_args__ = (Index("ix_samples_status_snapshot", "status", "snapshot_id"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # the device's idempotency key
    device_id: Mapped[str] = mapped_column(String(64), index=True)
    object_key: Mapped[str] = mapped_column(String(512))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(Integer)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(String(32))
    model_version: Mapped[int | None] = mapped_column(default=None)
    labels: Mapped[list[Any] | None] = mapped_column(JSON, default=None)
    predictions: Mapped[list[Any]] = mapped_column(default=list)
    captured_at: Mapped[datetime] = mapped_column(default=utcnow)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    # validated | unlabeled | rejected
    status: Mapped[str] = mapped_column(String(16))
    reject_reason: Mapped[str] = mapped_column(Text, default="")
    snapshot_id: Mapped[str | None] = mapped_column(String(64), default=None)


class Snapshot(Base):
    __tablename__ = "snapshots"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 of the manifest
    parent_id: Mapped[str | None] = mapped_column(String(64), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    sample_count: Mapped[int] = mapped_column(Integer)
    manifest_key: Mapped[str] = mapped_column(String(512))
    devices: Mapped[list[Any]] = mapped_column(default=list)


class TrainingJob(Base):
    __tablename__ = "training_jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    trigger: Mapped[str] = mapped_column(String(16))  # threshold | manual | drift
    reason: Mapped[str] = mapped_column(Text, default="")
    requested_by: Mapped[str] = mapped_column(String(128), default="")
    # queued | running | succeeded | rejected | failed
    status: Mapped[str] = mapped_column(String(16), default="queued")
    stage: Mapped[str] = mapped_column(String(32), default="")
    stages: Mapped[dict[str, Any]] = mapped_column(default=dict)
    progress: Mapped[dict[str, Any]] = mapped_column(default=dict)
    log: Mapped[str] = mapped_column(Text, default="")
    result: Mapped[dict[str, Any]] = mapped_column(default=dict)
    coalesced: Mapped[int] = mapped_column(Integer, default=0)
    snapshot_id: Mapped[str | None] = mapped_column(String(64), default=None)
    candidate_version: Mapped[int | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)


class ModelVersion(Base):
    __tablename__ = "model_versions"

    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    # production | approved (its rollout runs) | candidate | rejected | archived | rolled_back
    status: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    parent_version: Mapped[int | None] = mapped_column(default=None)
    snapshot_id: Mapped[str | None] = mapped_column(String(64), default=None)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("training_jobs.id"), default=None)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(default=dict)
    gate: Mapped[dict[str, Any]] = mapped_column(default=dict)
    class_names: Mapped[list[Any]] = mapped_column(default=list)
    imgsz: Mapped[int] = mapped_column(Integer, default=160)
    pt_key: Mapped[str] = mapped_column(String(512), default="")
    onnx_key: Mapped[str] = mapped_column(String(512), default="")
    bundle_key: Mapped[str] = mapped_column(String(512), default="")
    bundle_sha256: Mapped[str] = mapped_column(String(64), default="")
    bundle_size: Mapped[int] = mapped_column(Integer, default=0)
    # The bundle's OCI image by digest (host/ns/name@sha256:...) when settings.oci_registry is set and the
    # push succeeded; None: no registry configured, or the push failed (publish.oci_push_failed in the log).
    oci_image: Mapped[str | None] = mapped_column(String(512), default=None)
    reason: Mapped[str] = mapped_column(Text, default="")
    # Who approved the version for production ("policy:auto" when the gate's pass sufficed).
    approved_by: Mapped[str] = mapped_column(String(128), default="")
    approved_at: Mapped[datetime | None] = mapped_column(default=None)
    # The shipped artifact: format, opset, parity with PyTorch, TensorRT engines built or skipped.
    artifacts: Mapped[dict[str, Any]] = mapped_column(default=dict)


class Alias(Base):
    __tablename__ = "aliases"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)  # production | candidate | previous
    version: Mapped[int] = mapped_column(ForeignKey("model_versions.version"))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class AliasChange(Base):
    """One move of a registry alias (append-only): the registry's history, so a rollback knows
    which version production was before, and before that."""

    __tablename__ = "alias_history"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    name: Mapped[str] = mapped_column(String(32), index=True)
    version: Mapped[int | None] = mapped_column(default=None)  # None: the alias was cleared
    from_version: Mapped[int | None] = mapped_column(default=None)
    actor: Mapped[str] = mapped_column(String(128), default="")
    reason: Mapped[str] = mapped_column(Text, default="")


class Deployment(Base):
    __tablename__ = "deployments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[int] = mapped_column(Integer)
    command_id: Mapped[str] = mapped_column(String(64), unique=True)
    mode: Mapped[str] = mapped_column(String(32))
    # sent | <agent OTA state> ...
    state: Mapped[str] = mapped_column(String(32), default="sent")
    reason: Mapped[str] = mapped_column(Text, default="")
    shadow: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class AuditEntry(Base):
    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(256), default="")
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)
    source: Mapped[str] = mapped_column(String(64), default="")


class Quarantine(Base):
    """A decision that a device's labels are held back from training, with its evidence."""

    __tablename__ = "quarantines"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(64), index=True)
    status: Mapped[str] = mapped_column(String(16))  # quarantined | released
    decided_at: Mapped[datetime] = mapped_column(default=utcnow)
    decided_by: Mapped[str] = mapped_column(String(128), default="policy")
    job_id: Mapped[int | None] = mapped_column(default=None)
    reasons: Mapped[list[Any]] = mapped_column(default=list)
    evidence: Mapped[dict[str, Any]] = mapped_column(default=dict)
    thresholds: Mapped[dict[str, Any]] = mapped_column(default=dict)
    released_by: Mapped[str] = mapped_column(String(128), default="")
    released_at: Mapped[datetime | None] = mapped_column(default=None)


class AlertRecord(Base):
    """Something an operator or engineer must see: a rejected candidate, a quarantine, a halt."""

    __tablename__ = "alerts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    kind: Mapped[str] = mapped_column(String(64), index=True)
    severity: Mapped[str] = mapped_column(String(16))
    subject: Mapped[str] = mapped_column(String(256), default="")
    message: Mapped[str] = mapped_column(Text)
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
    webhook_status: Mapped[str] = mapped_column(String(64), default="")


class Rollout(Base):
    """A registry version taken to the selected devices wave by wave (server/rollouts/)."""

    __tablename__ = "rollouts"
    __table_args__ = (Index("ix_rollouts_state", "state"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    version: Mapped[int] = mapped_column(ForeignKey("model_versions.version"))
    # pending | awaiting_approval | running | paused | succeeded | aborted | rolled_back
    state: Mapped[str] = mapped_column(String(24), default="pending")
    mode: Mapped[str] = mapped_column(String(32))
    on_failure: Mapped[str] = mapped_column(String(8))
    require_approval: Mapped[bool] = mapped_column(Boolean, default=False)
    selector: Mapped[dict[str, Any]] = mapped_column(default=dict)
    gates: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # Frames per shadow report the devices are asked for.
    shadow_frames: Mapped[int] = mapped_column(Integer)
    current_wave: Mapped[int] = mapped_column(Integer, default=0)
    reason: Mapped[str] = mapped_column(Text, default="")
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    # A finished rollout still has work while devices move to where it left them; then it settles.
    settled: Mapped[bool] = mapped_column(Boolean, default=False)
    # The server replica acting on the rollout, until the lease runs out unrenewed.
    lease_owner: Mapped[str] = mapped_column(String(128), default="")
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)


class RolloutWave(Base):
    __tablename__ = "rollout_waves"
    __table_args__ = (Index("ix_rollout_waves_rollout_position", "rollout_id", "position", unique=True),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollouts.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(64))
    percent: Mapped[float | None] = mapped_column(default=None)
    count: Mapped[int | None] = mapped_column(default=None)
    # Devices chosen when the wave started (late joiners of the last wave add to it).
    target: Mapped[int] = mapped_column(Integer, default=0)
    # pending | running | passed | failed; phase while running: shadow | switch
    state: Mapped[str] = mapped_column(String(16), default="pending")
    phase: Mapped[str] = mapped_column(String(16), default="")
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    reason: Mapped[str] = mapped_column(Text, default="")
    # The gates as they stood when the wave passed or failed.
    gate_results: Mapped[list[Any]] = mapped_column(default=list)


class RolloutDevice(Base):
    """One device in a rollout: its wave, what the rollout wants of it, what it reported, and the
    command ids issued to it (so a restarted controller re-sends, never re-issues)."""

    __tablename__ = "rollout_devices"
    __table_args__ = (Index("ix_rollout_devices_rollout_device", "rollout_id", "device_id", unique=True),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollouts.id", ondelete="CASCADE"))
    device_id: Mapped[str] = mapped_column(String(64))
    wave: Mapped[int] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    # shadow | switch | stop | revert (server/rollouts/plan.py)
    goal: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), default="pending")
    # Why the device counts as a failed install ("" = it does not).
    failure: Mapped[str] = mapped_column(Text, default="")
    reason: Mapped[str] = mapped_column(Text, default="")
    from_version: Mapped[int | None] = mapped_column(default=None)
    update_state: Mapped[str] = mapped_column(String(32), default="")
    rollback_state: Mapped[str] = mapped_column(String(32), default="")
    deploy_command_id: Mapped[str | None] = mapped_column(String(64), default=None, index=True)
    promote_command_id: Mapped[str | None] = mapped_column(String(64), default=None)
    abort_command_id: Mapped[str | None] = mapped_column(String(64), default=None)
    rollback_command_id: Mapped[str | None] = mapped_column(String(64), default=None, index=True)
    assigned_at: Mapped[datetime] = mapped_column(default=utcnow)
    progress_at: Mapped[datetime] = mapped_column(default=utcnow)
    shadow_started_at: Mapped[datetime | None] = mapped_column(default=None)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class RolloutCommand(Base):
    """Every command a rollout issued, as sent (an outbox): published after its row commits,
    re-published (same bytes) while its effect is not seen."""

    __tablename__ = "rollout_commands"
    __table_args__ = (Index("ix_rollout_commands_rollout_published", "rollout_id", "published_at"),)

    command_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollouts.id", ondelete="CASCADE"))
    device_id: Mapped[str] = mapped_column(String(64))
    wave: Mapped[int] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    kind: Mapped[str] = mapped_column(String(16))  # deploy | promote | abort | rollback
    payload: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # None: to be published (first time, or again).
    published_at: Mapped[datetime | None] = mapped_column(default=None)
    sends: Mapped[int] = mapped_column(Integer, default=0)


class RolloutShadowReport(Base):
    """One shadow window a rollout device reported (the message id makes a redelivery a no-op)."""

    __tablename__ = "rollout_shadow_reports"

    msg_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollouts.id", ondelete="CASCADE"))
    device_id: Mapped[str] = mapped_column(String(64))
    deploy_command_id: Mapped[str] = mapped_column(String(64), index=True)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    window: Mapped[int] = mapped_column(Integer, default=0)
    frames: Mapped[int] = mapped_column(Integer, default=0)
    frames_dropped: Mapped[int] = mapped_column(Integer, default=0)
    frames_skipped_budget: Mapped[int] = mapped_column(Integer, default=0)
    agreement: Mapped[float | None] = mapped_column(default=None)
    confident_agreement: Mapped[float | None] = mapped_column(default=None)
    corrected_frames: Mapped[int] = mapped_column(Integer, default=0)
    active_accuracy: Mapped[float | None] = mapped_column(default=None)
    candidate_accuracy: Mapped[float | None] = mapped_column(default=None)
    candidate_only_correct: Mapped[int | None] = mapped_column(Integer, default=None)
    active_only_correct: Mapped[int | None] = mapped_column(Integer, default=None)
    active_latency_ms_p99: Mapped[float | None] = mapped_column(default=None)
    candidate_latency_ms_p99: Mapped[float | None] = mapped_column(default=None)
    errors: Mapped[int] = mapped_column(Integer, default=0)


class DriftReference(Base):
    """A model version's drift reference: its training data's statistics (JSON in the object store)."""

    __tablename__ = "drift_references"

    model_version: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # building | ready | failed
    status: Mapped[str] = mapped_column(String(16), default="building")
    object_key: Mapped[str] = mapped_column(String(512), default="")
    frames: Mapped[int] = mapped_column(Integer, default=0)
    stats_version: Mapped[int] = mapped_column(Integer, default=0)
    source: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[str] = mapped_column(Text, default="")


class DriftWindow(Base):
    """One scored window of a device, or of a group (the sum of its members' windows)."""

    __tablename__ = "drift_windows"
    __table_args__ = (Index("ix_drift_windows_subject_at", "scope", "subject", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    scope: Mapped[str] = mapped_column(String(8))  # device | group
    subject: Mapped[str] = mapped_column(String(64))  # device id or group name
    msg_id: Mapped[str | None] = mapped_column(String(64), unique=True, default=None)  # the device report's
    model_version: Mapped[int | None] = mapped_column(default=None)
    window: Mapped[int] = mapped_column(Integer, default=0)
    frames: Mapped[int] = mapped_column(Integer, default=0)
    # scored | no_reference
    status: Mapped[str] = mapped_column(String(16), default="scored")
    correction_rate: Mapped[float | None] = mapped_column(Float, default=None)
    # {metric: {psi, ks, wasserstein, count}} and the decay figures of the window.
    scores: Mapped[dict[str, Any]] = mapped_column(default=dict)
    decay: Mapped[dict[str, Any]] = mapped_column(default=dict)
    drifting: Mapped[bool] = mapped_column(Boolean, default=False)
    decayed: Mapped[bool] = mapped_column(Boolean, default=False)
    # Hysteresis state after this window, so a restarted server resumes where it stopped.
    state: Mapped[dict[str, Any]] = mapped_column(default=dict)


class DriftEvent(Base):
    """A drift/decay signal raised or cleared, and each action it triggered (alert, sampling,
    retrain, rollback) with its outcome."""

    __tablename__ = "drift_events"
    __table_args__ = (Index("ix_drift_events_subject_at", "scope", "subject", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    scope: Mapped[str] = mapped_column(String(8))
    subject: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[int | None] = mapped_column(default=None)
    signal: Mapped[str] = mapped_column(String(16))  # drift | decay
    event: Mapped[str] = mapped_column(String(16))  # raised | cleared
    action: Mapped[str] = mapped_column(String(16))  # alert | sampling | retrain | rollback
    status: Mapped[str] = mapped_column(String(16))  # done | skipped | failed
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)
    alert_id: Mapped[int | None] = mapped_column(default=None)
    job_id: Mapped[int | None] = mapped_column(default=None)
