"""Sends deploy and rollback commands for a registry version to devices over MQTT (QoS 1, one per
device). Rollback commands are signed with the server's bundle signing key: a device lets an older
bundle past its rollback protection only for a command that verifies with a key it trusts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select
from sqlalchemy.orm import Session

from firmware_bundles.commands import sign_command
from protocol.messages import DeployCommand, RollbackCommand
from server import audit, metrics
from server.db.models import Deployment, Device, ModelVersion

log = structlog.get_logger(__name__)


class DeployError(ValueError):
    pass


class CommandsNotSent(DeployError):
    """The deployments are recorded but the broker refused (some of) their commands."""


def deploy_version(
    session: Session,
    store,
    bus,
    version: int,
    device_ids: list[str] | None,
    *,
    mode: str,
    shadow_frames: int,
    presign_seconds: int,
    actor: str,
    reason: str = "",
) -> list[Deployment]:
    """Publish a DeployCommand to each device (all non-revoked devices when ``device_ids`` is None)."""
    mv = _deployable(session, version)
    devices = _devices(session, device_ids)
    url, _ = bundle_url(store, mv, presign_seconds)
    commands = [deploy_command(device.id, mv, url, mode=mode, shadow_frames=shadow_frames) for device in devices]
    sent = [Deployment(device_id=c.device_id, version=version, command_id=c.command_id, mode=mode,
                       reason=reason[:4000]) for c in commands]
    audit.record(session, actor, "deploy", f"version:{version}", devices=[d.id for d in devices], mode=mode,
                 reason=reason)
    _record_and_send(session, bus, sent, commands, metric_mode=mode)
    log.info("deploy.sent", version=version, devices=len(sent), mode=mode)
    return sent


def _record_and_send(session: Session, bus, rows: list[Deployment], commands: list, *, metric_mode: str) -> None:
    """Commit the deployments, then publish their commands: a device that answers at once finds its
    deployment (publishing inside the transaction raced its answer and held the write lock for the
    whole fan-out). Commands the broker refuses mark their deployments failed, then DeployError."""
    session.add_all(rows)
    session.commit()
    for i, (row, command) in enumerate(zip(rows, commands, strict=True)):
        try:
            bus.publish_command(row.device_id, command)
        except ConnectionError as exc:
            for unsent in rows[i:]:
                unsent.state, unsent.reason = "failed", f"command not sent: {exc}"[:4000]
            session.commit()
            log.error("deploy.not_sent", sent=i, devices=len(rows), error=str(exc))
            raise CommandsNotSent(f"the broker took {i} of {len(rows)} commands: {exc}") from exc
        metrics.DEPLOY_COMMANDS.labels(mode=metric_mode).inc()


def bundle_url(store, mv: ModelVersion, presign_seconds: int) -> tuple[str, datetime]:
    """A presigned GET of the version's bundle and when it expires."""
    expires = timedelta(seconds=presign_seconds)
    return store.presigned_get(mv.bundle_key, expires), datetime.now(UTC) + expires


def deploy_command(device_id: str, mv: ModelVersion, url: str, *, mode: str, shadow_frames: int,
                   rollout_id: str | None = None, await_promotion: bool = False) -> DeployCommand:
    return DeployCommand(device_id=device_id, version=mv.version, bundle_url=url, bundle_sha256=mv.bundle_sha256,
                         bundle_size=mv.bundle_size, mode=mode, shadow_frames=shadow_frames,
                         rollout_id=rollout_id, await_promotion=await_promotion)


def rollback_command(device_id: str, to_version: int, signing_key: Ed25519PrivateKey, *, reason: str,
                     expires_at: datetime, mv: ModelVersion | None = None, url: str | None = None) -> RollbackCommand:
    """A signed rollback to ``to_version``; with ``mv`` and ``url`` it carries that version's bundle, so
    a device that has pruned the slot fetches it."""
    bundle = ({"bundle_url": url, "bundle_sha256": mv.bundle_sha256, "bundle_size": mv.bundle_size}
              if mv is not None and url else {})
    return sign_command(RollbackCommand(device_id=device_id, to_version=to_version, reason=reason[:2000],
                                        expires_at=expires_at, **bundle), signing_key)


def deployable(session: Session, version: int) -> ModelVersion:
    """The version, if it has a signed bundle to ship; DeployError saying why not otherwise."""
    return _deployable(session, version)


def _deployable(session: Session, version: int) -> ModelVersion:
    mv = session.get(ModelVersion, version)
    if mv is None:
        raise DeployError(f"model version {version} does not exist")
    if mv.status == "rejected" or not mv.bundle_key:
        raise DeployError(f"model version {version} has no deployable bundle (status {mv.status})")
    return mv


def _devices(session: Session, device_ids: list[str] | None) -> list[Device]:
    query = select(Device).where(Device.revoked.is_(False))
    if device_ids is not None:
        query = query.where(Device.id.in_(device_ids))
    devices = list(session.scalars(query.order_by(Device.id)).all())
    missing = set(device_ids or []) - {d.id for d in devices}
    if missing:
        raise DeployError(f"unknown or revoked devices: {', '.join(sorted(missing))}")
    return devices


def rollback_version(
    session: Session,
    store,
    bus,
    signing_key: Ed25519PrivateKey,
    version: int,
    device_ids: list[str] | None,
    *,
    reason: str,
    presign_seconds: int,
    actor: str,
) -> list[Deployment]:
    """Publish a signed RollbackCommand to ``version`` to each device (all non-revoked when None).

    The command carries the version's bundle (presigned URL, sha256, size), so a device that has
    pruned that slot fetches it; it expires with the URL, which bounds replays.
    """
    mv = _deployable(session, version)
    devices = _devices(session, device_ids)
    url, expires_at = bundle_url(store, mv, presign_seconds)
    commands = [rollback_command(device.id, version, signing_key, reason=reason, expires_at=expires_at, mv=mv,
                                 url=url) for device in devices]
    sent = [Deployment(device_id=c.device_id, version=version, command_id=c.command_id, mode="rollback",
                       reason=reason) for c in commands]
    audit.record(session, actor, "rollback", f"version:{version}", devices=[d.id for d in devices], reason=reason)
    _record_and_send(session, bus, sent, commands, metric_mode="rollback")
    log.info("deploy.rollback_sent", version=version, devices=len(sent), reason=reason)
    return sent
