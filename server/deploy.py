"""Sends deploy commands for a registry version to devices over MQTT (QoS 1, one per device)."""

from __future__ import annotations

from datetime import timedelta

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from protocol.messages import DeployCommand
from server import audit, metrics
from server.db.models import Deployment, Device, ModelVersion

log = structlog.get_logger(__name__)


class DeployError(ValueError):
    pass


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
) -> list[Deployment]:
    """Publish a DeployCommand to each device (all non-revoked devices when ``device_ids`` is None)."""
    mv = session.get(ModelVersion, version)
    if mv is None:
        raise DeployError(f"model version {version} does not exist")
    if mv.status == "rejected" or not mv.bundle_key:
        raise DeployError(f"model version {version} has no deployable bundle (status {mv.status})")
    query = select(Device).where(Device.revoked.is_(False))
    if device_ids is not None:
        query = query.where(Device.id.in_(device_ids))
    devices = session.scalars(query.order_by(Device.id)).all()
    missing = set(device_ids or []) - {d.id for d in devices}
    if missing:
        raise DeployError(f"unknown or revoked devices: {', '.join(sorted(missing))}")
    url = store.presigned_get(mv.bundle_key, timedelta(seconds=presign_seconds))
    sent = []
    for device in devices:
        command = DeployCommand(
            device_id=device.id, version=version, bundle_url=url, bundle_sha256=mv.bundle_sha256,
            bundle_size=mv.bundle_size, mode=mode, shadow_frames=shadow_frames,
        )
        deployment = Deployment(device_id=device.id, version=version, command_id=command.command_id, mode=mode)
        session.add(deployment)
        session.flush()
        bus.publish_command(device.id, command)
        metrics.DEPLOY_COMMANDS.labels(mode=mode).inc()
        sent.append(deployment)
    audit.record(session, actor, "deploy", f"version:{version}", devices=[d.id for d in devices], mode=mode)
    session.commit()
    log.info("deploy.sent", version=version, devices=len(sent), mode=mode)
    return sent
