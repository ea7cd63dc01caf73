"""The controller's shadow totals cache (server/rollouts/evidence.py ShadowTotalsCache): the same
totals as reading every report, with only the devices that reported since read again, and of
those only the reports received since the newest one read."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta

from rollout_db_kit import rollout_db

from server.db.models import RolloutDevice, RolloutShadowReport
from server.rollouts import evidence
from server.rollouts.evidence import ShadowTotalsCache, shadow_totals


def _world(tmp_path, devices: int):
    sessions, rollout = rollout_db(tmp_path)
    with sessions() as session:
        members = [RolloutDevice(rollout_id=rollout.id, device_id=f"cam-{i}", wave=0, goal="shadow",
                                 deploy_command_id=uuid.uuid4().hex) for i in range(devices)]
        session.add_all(members)
        session.commit()
    return sessions, rollout.id, members


def _report(rollout_id: int, dev: RolloutDevice, rng: random.Random, at: datetime) -> RolloutShadowReport:
    corrected = rng.randint(0, 20)
    cand = rng.randint(0, corrected)
    return RolloutShadowReport(
        msg_id=uuid.uuid4().hex, rollout_id=rollout_id, device_id=dev.device_id,
        deploy_command_id=dev.deploy_command_id, received_at=at, window=rng.randint(0, 9), frames=rng.randint(1, 100),
        agreement=rng.random(), confident_agreement=rng.random(), corrected_frames=corrected,
        active_accuracy=rng.random(), candidate_accuracy=rng.random(), candidate_only_correct=cand,
        active_only_correct=corrected - cand, active_latency_ms_p99=rng.uniform(5, 50),
        candidate_latency_ms_p99=rng.uniform(5, 50), errors=rng.randint(0, 1))


def test_cached_totals_equal_a_full_read_and_reread_only_devices_that_reported(tmp_path, monkeypatch):
    sessions, rid, members = _world(tmp_path, 30)
    rng, cache, t = random.Random(5), ShadowTotalsCache(), datetime(2026, 1, 1, tzinfo=UTC)
    read = []
    real = evidence._windows

    def spy(session, commands, after=None):
        out = real(session, commands, after=after)
        read.append((after is not None, set(commands)))
        return out

    monkeypatch.setattr(evidence, "_windows", spy)

    reported: set[str] = set()
    for round_ in range(4):
        reporting = rng.sample(members, 5 if round_ else 20)
        with sessions() as session:
            for dev in reporting:
                for _ in range(rng.randint(1, 3)):
                    t += timedelta(seconds=1)
                    session.add(_report(rid, dev, rng, t))
            session.commit()
        with sessions() as session:
            read.clear()
            cached = shadow_totals(session, members, cache)
            # Only those that reported since: the ones read before, from their newest report on;
            # the ones never read before, in full.
            again = {d.deploy_command_id for d in reporting if d.deploy_command_id in reported}
            first = {d.deploy_command_id for d in reporting} - again
            assert read == [(flag, commands) for flag, commands in ((True, again), (False, first)) if commands]
            reported |= first
            full = shadow_totals(session, members)
        assert cached == full  # the same ShadowTotals, window for window

    # A device whose count did not change is not read again: the cache hands back the same object.
    with sessions() as session:
        first = shadow_totals(session, members, cache)
        again = shadow_totals(session, members, cache)
    assert all(first[d] is again[d] for d in first)


def test_a_new_attempt_s_deploy_command_starts_from_nothing(tmp_path):
    sessions, rid, members = _world(tmp_path, 2)
    cache, rng, t = ShadowTotalsCache(), random.Random(1), datetime(2026, 1, 1, tzinfo=UTC)
    with sessions() as session:
        session.add_all([_report(rid, members[0], rng, t), _report(rid, members[1], rng, t)])
        session.commit()
        assert set(shadow_totals(session, members, cache)) == {"cam-0", "cam-1"}
        members[0].deploy_command_id = uuid.uuid4().hex  # a retried wave issues a new deploy
        assert set(shadow_totals(session, members, cache)) == {"cam-1"}
        assert shadow_totals(session, members, cache) == shadow_totals(session, members)


def test_a_report_received_before_the_newest_one_read_is_still_counted(tmp_path):
    # Another replica's clock, or a transaction that committed late: its received_at is older than
    # what the cache already read, so reading "since the newest" would miss it.
    sessions, rid, members = _world(tmp_path, 1)
    cache, rng, t = ShadowTotalsCache(), random.Random(3), datetime(2026, 1, 1, tzinfo=UTC)
    with sessions() as session:
        session.add_all([_report(rid, members[0], rng, t), _report(rid, members[0], rng, t + timedelta(seconds=10))])
        session.commit()
        assert shadow_totals(session, members, cache)["cam-0"].windows == 2
        session.add(_report(rid, members[0], rng, t + timedelta(seconds=5)))  # late, and older
        session.commit()
        cached = shadow_totals(session, members, cache)
        assert cached["cam-0"].windows == 3
        assert cached == shadow_totals(session, members)


def test_many_devices_are_read_in_chunks_the_database_accepts(tmp_path):
    # SQLite and PostgreSQL cap the parameters of one statement; a 10,000-device wave is read in parts.
    sessions, rid, members = _world(tmp_path, 1200)
    cache, rng, t = ShadowTotalsCache(), random.Random(4), datetime(2026, 1, 1, tzinfo=UTC)
    with sessions() as session:
        session.add_all([_report(rid, dev, rng, t) for dev in members])
        session.commit()
        for dev in members[::2]:
            session.add(_report(rid, dev, rng, t + timedelta(seconds=1)))
        cached = shadow_totals(session, members, cache)
        session.commit()
        assert len(cached) == 1200
        assert shadow_totals(session, members, cache) == shadow_totals(session, members)
