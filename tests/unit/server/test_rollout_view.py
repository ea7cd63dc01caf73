"""The rollout view (server/rollouts/api.py rollout_dict): without device lists it gives the same
waves, counts and gates as with them, and it shows the controller's fresh verdict for the running
wave as it stands instead of judging again; a stale one, or one for another phase, is not used."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from rollout_db_kit import rollout_db

from server.db.models import Rollout, RolloutDevice, RolloutWave
from server.rollouts import evidence
from server.rollouts.api import rollout_dict
from server.rollouts.evidence import LiveVerdict, LiveVerdicts
from server.rollouts.gates import Verdict

NOW = datetime(2026, 3, 1, 6, 0, tzinfo=UTC)


def _world(tmp_path):
    sessions, rollout = rollout_db(tmp_path, state="running", current_wave=1)
    with sessions() as session:
        session.add_all([
            RolloutWave(rollout_id=rollout.id, position=0, name="canary", count=2, target=2, state="passed",
                        gate_results=[{"name": "install", "value": 0.0, "threshold": 0.1, "passed": True,
                                       "detail": ""}]),
            RolloutWave(rollout_id=rollout.id, position=1, name="fleet", percent=100, target=6, state="running",
                        phase="shadow", started_at=NOW - timedelta(minutes=1))])
        for i in range(8):
            session.add(RolloutDevice(rollout_id=rollout.id, device_id=f"cam-{i}", wave=0 if i < 2 else 1,
                                      goal="shadow", state="active" if i < 2 else ("failed" if i == 7 else "assigned"),
                                      failure="refused" if i == 7 else "", from_version=1,
                                      deploy_command_id=uuid.uuid4().hex))
        session.commit()
    return sessions, rollout.id


def _without_devices(view: dict) -> dict:
    return {**view, "waves": [{k: v for k, v in w.items() if k != "devices"} for w in view["waves"]]}


def test_the_summary_is_the_full_view_without_device_lists(tmp_path):
    sessions, rid = _world(tmp_path)
    with sessions() as session:
        rollout = session.get(Rollout, rid)
        full = rollout_dict(session, rollout, now=NOW)
        summary = rollout_dict(session, rollout, devices=False, now=NOW)
    assert [len(w["devices"]) for w in full["waves"]] == [2, 6]
    assert all("devices" not in w for w in summary["waves"])
    assert summary == _without_devices(full)
    assert summary["waves"][1]["device_counts"] == {"assigned": 5, "failed": 1}
    assert summary["waves"][1]["verdict"] is not None and summary["waves"][1]["verdict_at"] == NOW


def test_a_fresh_controller_verdict_for_the_wave_as_it_stands_is_shown_without_judging(tmp_path, monkeypatch):
    sessions, rid = _world(tmp_path)
    live = LiveVerdicts(max_age=5)
    decided = Verdict("undecided", (), "waiting for 100 frames per device (the controller's)")
    judged = []
    real = evidence.wave_verdict
    monkeypatch.setattr("server.rollouts.api.wave_verdict",
                        lambda *a, **kw: (judged.append(1), real(*a, **kw))[1])

    def view(at: datetime) -> dict:
        with sessions() as session:
            return rollout_dict(session, session.get(Rollout, rid), devices=False, now=at, live=live)["waves"][1]

    live.put(rid, LiveVerdict(position=1, attempt=1, phase="shadow", verdict=decided, at=NOW))
    wave = view(NOW + timedelta(seconds=3))
    assert wave["verdict"] == {"outcome": "undecided", "reason": decided.reason}
    assert wave["verdict_at"] == NOW and judged == []

    # Too old: judged here, now.
    wave = view(NOW + timedelta(seconds=6))
    assert wave["verdict"]["reason"] != decided.reason and wave["verdict_at"] == NOW + timedelta(seconds=6)
    assert judged == [1]

    # Fresh, but for the wave's other phase (or another attempt): judged here too.
    for other in (LiveVerdict(1, 1, "switch", decided, NOW), LiveVerdict(1, 2, "shadow", decided, NOW)):
        live.put(rid, other)
        assert view(NOW + timedelta(seconds=1))["verdict"]["reason"] != decided.reason
    live.put(rid, None)
    assert view(NOW)["verdict"]["reason"] != decided.reason
