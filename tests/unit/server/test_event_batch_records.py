"""A batch of device events (server/ingest.py IngestService.process_events with the rollout
controller's record): shadow windows are stored once each, only for the device the command went
to, each deployment keeps its latest window, and update events in the same batch still land."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from rollout_db_kit import rollout_db
from sqlalchemy import func, select

from protocol.messages import ShadowReport, UpdateEvent
from server.db.models import (
    Deployment,
    Device,
    RolloutDevice,
    RolloutShadowReport,
)
from server.ingest import IngestService
from server.rollouts.controller import RolloutController
from server.sample_validation import ImageLimits

T0 = datetime(2026, 3, 1, 6, 0, tzinfo=UTC)


def _world(tmp_path):
    sessions, rollout = rollout_db(tmp_path, production=True)
    with sessions() as session:
        for name in ("cam-a", "cam-b"):
            session.add(Device(id=name, active_version=1))
            session.add(Deployment(device_id=name, version=2, command_id=f"cmd-{name}", mode="shadow_then_switch"))
            session.add(RolloutDevice(rollout_id=rollout.id, device_id=name, wave=0, goal="shadow",
                                      deploy_command_id=f"cmd-{name}", progress_at=T0, updated_at=T0))
        session.commit()
    ingest = IngestService(sessions, None, ["part"], ImageLimits(max_bytes=1 << 20, max_side=4096), 1000,
                           lambda n: None)
    controller = RolloutController.__new__(RolloutController)  # record() needs only the clock
    controller._clock = lambda: datetime(2026, 3, 1, 7, 0, tzinfo=UTC)
    controller.nudge = lambda: None
    ingest.rollouts = controller
    return sessions, ingest


def _shadow(device: str, command: str, window: int, msg_id: str | None = None) -> ShadowReport:
    return ShadowReport(device_id=device, update_id=command, active_version=1, candidate_version=2,
                        window=window, frames_compared=50, frames_dropped=0, agreement=0.9,
                        corrected_frames=4, candidate_only_correct=2, active_only_correct=1,
                        msg_id=msg_id or uuid.uuid4().hex)


def test_shadow_windows_are_stored_once_for_the_commanded_device_only(tmp_path):
    sessions, ingest = _world(tmp_path)
    repeated = _shadow("cam-a", "cmd-cam-a", 0)
    ingest.process_events([
        repeated,
        _shadow("cam-a", "cmd-cam-a", 1),
        repeated,  # a QoS 1 redelivery inside the batch
        _shadow("cam-b", "cmd-cam-a", 5),  # another device's command: refused
        _shadow("cam-b", "cmd-unknown", 5),  # no such deployment: refused
    ])
    ingest.process_events([repeated])  # and again in a later batch

    with sessions() as session:
        stored = session.execute(select(RolloutShadowReport.device_id, RolloutShadowReport.window)
                                 .order_by(RolloutShadowReport.window)).all()
        assert stored == [("cam-a", 0), ("cam-a", 1)]
        deployments = {d.device_id: d for d in session.scalars(select(Deployment))}
        # The deployment keeps the device's latest window; cam-b's row is untouched by cam-b's stray reports.
        assert deployments["cam-a"].shadow["window"] == 0  # the redelivery came last
        assert deployments["cam-b"].shadow == {}
        devs = {d.device_id: d for d in session.scalars(select(RolloutDevice))}
        assert devs["cam-a"].progress_at.replace(tzinfo=UTC) == datetime(2026, 3, 1, 7, 0, tzinfo=UTC)
        assert devs["cam-b"].progress_at.replace(tzinfo=UTC) == T0  # no report of its own: no progress


def test_update_events_and_shadow_windows_in_one_batch_both_land(tmp_path):
    sessions, ingest = _world(tmp_path)
    ingest.process_events([
        UpdateEvent(device_id="cam-b", update_id="cmd-cam-b", version=2, from_state="STAGED",
                    to_state="SHADOWING", event="start_shadow", reason="shadowing 100 frames"),
        _shadow("cam-b", "cmd-cam-b", 0),
        _shadow("cam-a", "cmd-cam-a", 0),
    ])
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(RolloutShadowReport)) == 2
        dev = session.scalar(select(RolloutDevice).where(RolloutDevice.device_id == "cam-b"))
        assert dev.update_state == "SHADOWING" and dev.shadow_started_at is not None
        deployment = session.scalar(select(Deployment).where(Deployment.device_id == "cam-b"))
        assert deployment.state == "SHADOWING" and deployment.shadow["window"] == 0
        assert session.get(Device, "cam-b").update_state == "SHADOWING"
