"""Bootstrap tokens, enrollment, revocation, labels and inventory queries (server.fleet) on an
in-memory database, with a fake of BrokerUsers' interface; the real broker is in
tests/integration/test_fleet_enrollment.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session, sessionmaker

from server import fleet, metrics
from server.auth import Principal, Role, authenticate, hash_token
from server.db.models import AuditEntry, Base, BootstrapToken, Device

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


class FakeAccounts:
    """BrokerUsers' add_user/remove_user, in memory."""

    def __init__(self, fail_add: bool = False):
        self.users: dict[str, str] = {}
        self.fail_add = fail_add

    def add_user(self, username: str, password: str) -> None:
        if self.fail_add:
            raise RuntimeError("mosquitto_passwd -b failed (1): cannot write the password file")
        self.users[username] = password

    def remove_user(self, username: str) -> bool:
        return self.users.pop(username, None) is not None


@pytest.fixture
def sessions():
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    yield sessionmaker(engine, expire_on_commit=False)
    engine.dispose()


def _token(sessions, **kw) -> tuple[int, str]:
    args = {"created_by": "admin", "expires_in": timedelta(hours=24), "max_uses": 1, "now": NOW} | kw
    with sessions() as s:
        row, secret = fleet.create_bootstrap_token(s, **args)
        s.commit()
        return row.id, secret


def _enroll(sessions, accounts, secret: str, device_id: str, now=NOW, **kw):
    with sessions() as s:
        try:
            return fleet.enroll(s, accounts, secret=secret, device_id=device_id, hardware=kw.get("hardware"),
                                agent_version=kw.get("agent_version", "0.1.0"), source="10.0.0.7", now=now)
        except fleet.FleetError:
            s.rollback()
            raise


def _uses(sessions, token_id: int) -> int:
    with sessions() as s:
        return s.get(BootstrapToken, token_id).uses


def test_only_the_hash_is_stored_and_the_listing_has_no_secret(sessions):
    token_id, secret = _token(sessions, groups=["line-3", "line-3"], tags=["b", "a"], max_uses=3)
    assert secret.startswith("elb_") and len(secret) > 40
    with sessions() as s:
        row = s.get(BootstrapToken, token_id)
        assert row.token_hash == hash_token(secret) and secret not in repr(vars(row))
        listed = fleet.bootstrap_token_dict(row, NOW)
    assert listed["groups"] == ["line-3"] and listed["tags"] == ["a", "b"] and listed["state"] == "active"
    assert secret not in str(listed) and listed["expires_at"] == NOW + timedelta(hours=24)


def test_enrollment_creates_the_device_identity_and_audits_it(sessions):
    accounts = FakeAccounts()
    token_id, secret = _token(sessions, groups=["line-3"], tags=["a"], max_uses=2)
    hw = {"gpu": "Orin", "gpu_compute_capability": "8.7", "tensorrt_version": "10.3.0"}
    creds, device, row = _enroll(sessions, accounts, secret, "cam-1", hardware=hw)
    assert (creds.device_id, creds.mqtt_username) == ("cam-1", "cam-1")
    assert accounts.users == {"cam-1": creds.mqtt_password} and len(creds.mqtt_password) >= 24
    with sessions() as s:
        assert authenticate(s, creds.api_token, None) == Principal(Role.DEVICE, "cam-1")
        d = s.get(Device, "cam-1")
        assert (d.groups, d.tags, d.hardware, d.agent_version) == (["line-3"], ["a"], hw, "0.1.0")
        assert d.enrolled_by == f"bootstrap:{token_id}" and d.enrolled_at == NOW and not d.revoked
        entry = s.scalar(select(AuditEntry).where(AuditEntry.action == "device.enroll"))
        assert (entry.actor, entry.target, entry.source) == (f"bootstrap:{token_id}", "cam-1", "10.0.0.7")
        assert entry.detail["bootstrap_token"] == token_id and entry.detail["groups"] == ["line-3"]
    assert _uses(sessions, token_id) == 1


def test_refusals_say_why(sessions):
    accounts = FakeAccounts()
    with pytest.raises(fleet.FleetError) as unknown:
        _enroll(sessions, accounts, "elb_not-issued-by-us", "cam-1")
    assert (unknown.value.status, unknown.value.reason) == (401, "unknown bootstrap token")

    token_id, secret = _token(sessions, expires_in=timedelta(hours=1))
    with pytest.raises(fleet.FleetError) as expired:
        _enroll(sessions, accounts, secret, "cam-1", now=NOW + timedelta(hours=1, seconds=1))
    assert expired.value.status == 403 and f"bootstrap token {token_id} expired at 2026-11-28 13:00:00" in str(
        expired.value)

    _, single = _token(sessions, max_uses=1)
    _enroll(sessions, accounts, single, "cam-2")
    with pytest.raises(fleet.FleetError) as exhausted:
        _enroll(sessions, accounts, single, "cam-3")
    assert exhausted.value.status == 403 and "has been used 1 of 1 times" in exhausted.value.reason

    revoked_id, revoked = _token(sessions, max_uses=5)
    with sessions() as s:
        fleet.revoke_bootstrap_token(s, revoked_id, now=NOW)
        s.commit()
    with pytest.raises(fleet.FleetError) as was_revoked:
        _enroll(sessions, accounts, revoked, "cam-4")
    assert was_revoked.value.status == 403 and "was revoked at" in was_revoked.value.reason
    assert set(accounts.users) == {"cam-2"}


def test_an_active_device_id_cannot_be_taken_and_the_try_costs_no_use(sessions):
    accounts = FakeAccounts()
    token_id, secret = _token(sessions, max_uses=3)
    creds, _, _ = _enroll(sessions, accounts, secret, "cam-1")
    with pytest.raises(fleet.FleetError) as clash:
        _enroll(sessions, accounts, secret, "cam-1")
    assert clash.value.status == 409 and "already enrolled (by bootstrap:" in clash.value.reason
    assert _uses(sessions, token_id) == 1
    assert accounts.users["cam-1"] == creds.mqtt_password  # the real device's password is untouched


def test_a_revoked_device_may_enroll_again_and_its_old_identity_stays_dead(sessions):
    accounts = FakeAccounts()
    _, secret = _token(sessions, max_uses=2, groups=["line-3"])
    old, _, _ = _enroll(sessions, accounts, secret, "cam-1")
    with sessions() as s:
        detail = fleet.revoke(s, accounts, device_id="cam-1", actor="alice", source="10.0.0.1", now=NOW)
    assert detail == {"api_tokens_revoked": 1, "broker_user_removed": True, "already_revoked": False}
    assert accounts.users == {}
    new, device, _ = _enroll(sessions, accounts, secret, "cam-1")
    assert not device.revoked and device.revoked_at is None
    with sessions() as s:
        assert authenticate(s, old.api_token, None) is None
        assert authenticate(s, new.api_token, None) == Principal(Role.DEVICE, "cam-1")
        entries = s.scalars(select(AuditEntry).where(AuditEntry.target == "cam-1").order_by(AuditEntry.id)).all()
    assert [e.action for e in entries] == ["device.enroll", "device.revoke", "device.enroll"]
    assert entries[-1].detail["re_enrolled_after_revocation"].startswith("2026-11-28T12:00:00")


def test_a_broker_failure_leaves_nothing_behind(sessions):
    token_id, secret = _token(sessions)
    with pytest.raises(fleet.FleetError) as failed:
        _enroll(sessions, FakeAccounts(fail_add=True), secret, "cam-1")
    assert failed.value.status == 503 and "cannot write the password file" in failed.value.reason
    with sessions() as s:
        assert s.get(Device, "cam-1") is None
    assert _uses(sessions, token_id) == 0
    with pytest.raises(fleet.FleetError) as unconfigured:
        _enroll(sessions, None, secret, "cam-1")
    assert unconfigured.value.status == 503 and "EDGELOOP_MQTT_PASSWORD_FILE" in unconfigured.value.reason


def test_a_failed_commit_removes_the_broker_user_again(sessions, monkeypatch):
    accounts = FakeAccounts()
    _, secret = _token(sessions)

    def refuse(self):
        raise RuntimeError("database went away")

    monkeypatch.setattr(Session, "commit", refuse)
    with pytest.raises(RuntimeError, match="database went away"):
        _enroll(sessions, accounts, secret, "cam-1")
    assert accounts.users == {}


def test_revoking_an_unknown_device_is_404(sessions):
    with sessions() as s, pytest.raises(fleet.FleetError) as missing:
        fleet.revoke(s, FakeAccounts(), device_id="ghost", actor="alice", source="")
    assert missing.value.status == 404


def test_labels_and_inventory_filters(sessions):
    accounts = FakeAccounts()
    _, line3 = _token(sessions, groups=["line-3"], tags=["a"], max_uses=10)
    _, line4 = _token(sessions, groups=["line-4"], tags=["a", "b"], max_uses=10)
    for i, device_id in enumerate(["d0", "d1", "d2", "d3"]):
        hw = {"gpu_compute_capability": "8.7" if i % 2 == 0 else "7.2", "tensorrt_version": "10.3.0"}
        _enroll(sessions, accounts, line3 if i < 2 else line4, device_id, hardware=hw)
    with sessions() as s:
        s.get(Device, "d1").online = True
        s.get(Device, "d2").online = True
        s.commit()

    def ids(**filters):
        with sessions() as s:
            return [d.id for d in s.scalars(fleet.device_query(**filters))]

    assert ids(groups=["line-3"]) == ["d0", "d1"]
    assert ids(groups=["line-3", "line-4"]) == ["d0", "d1", "d2", "d3"]
    assert ids(tags=["a", "b"]) == ["d2", "d3"]
    assert ids(gpu_compute_capability="8.7") == ["d0", "d2"]
    assert ids(online=True) == ["d1", "d2"] and ids(online=False) == ["d0", "d3"]
    assert ids(tensorrt_version="10.3.0", groups=["line-4"], online=True) == ["d2"]

    with sessions() as s:
        device = fleet.update_labels(s, device_id="d0", actor="op", source="", groups=["line-9"], tags=None)
        assert (device.groups, device.tags) == (["line-9"], ["a"])
        entry = s.scalar(select(AuditEntry).where(AuditEntry.action == "device.update"))
        assert entry.detail == {"before": {"groups": ["line-3"], "tags": ["a"]},
                                "after": {"groups": ["line-9"], "tags": ["a"]}}
    with sessions() as s:
        by_state, per_group = fleet.fleet_counts(s)
    assert by_state == {"online": 2, "offline": 2, "revoked": 0}
    assert per_group == {"line-3": 1, "line-4": 1}
    with sessions() as s:
        fleet.revoke(s, accounts, device_id="d2", actor="alice", source="")
        fleet.update_labels(s, device_id="d1", actor="op", source="", groups=[], tags=None)
    with sessions() as s:
        by_state, per_group = fleet.fleet_counts(s)
        device = fleet.device_dict(s.get(Device, "d2"))
    assert by_state == {"online": 1, "offline": 2, "revoked": 1}
    assert per_group == {"": 1}  # d1 is online and in no group now
    assert device["revoked"] and not device["online"]


def test_set_labels_keeps_unchanged_rows_and_drops_the_rest():
    device = Device(id="x")
    fleet.set_labels(device, groups=["g1", "g2"], tags=["t"])
    kept = next(label for label in device.labels if label.value == "g1")
    fleet.set_labels(device, groups=["g1", "g3"])
    assert (device.groups, device.tags) == (["g1", "g3"], ["t"])
    assert any(label is kept for label in device.labels)
    fleet.set_labels(device, tags=[])
    assert (device.groups, device.tags) == (["g1", "g3"], [])


def test_token_state_precedence():
    row = BootstrapToken(expires_at=NOW, max_uses=1, uses=1, revoked_at=None)
    assert fleet.token_state(row, NOW - timedelta(seconds=1)) == "exhausted"
    assert fleet.token_state(row, NOW) == "expired"
    row.revoked_at = NOW
    assert fleet.token_state(row, NOW - timedelta(days=1)) == "revoked"


def test_failure_limiter_counts_failures_per_address():
    limiter = fleet.FailureLimiter("2/minute")
    assert limiter.retry_after("10.0.0.1") is None
    limiter.failed("10.0.0.1")
    assert limiter.retry_after("10.0.0.1") is None
    limiter.failed("10.0.0.1")
    wait = limiter.retry_after("10.0.0.1")
    assert wait is not None and 1 <= wait <= 61
    assert limiter.retry_after("10.0.0.2") is None


def _sample(metric, **labels) -> float | None:
    for family in metric.collect():
        for sample in family.samples:
            if sample.labels == labels and not sample.name.endswith("_created"):
                return sample.value
    return None


def test_rollout_metrics_one_hot_wave_state_and_forgetting():
    metrics.set_wave_state("r9", 0, "pending")
    metrics.set_wave_state("r9", 0, "running")
    assert _sample(metrics.ROLLOUT_WAVE_STATE, rollout="r9", wave="0", state="running") == 1
    assert _sample(metrics.ROLLOUT_WAVE_STATE, rollout="r9", wave="0", state="pending") == 0
    metrics.set_gate("r9", 0, "latency_ms_p99", 12.5, threshold=20, passing=True)
    metrics.set_gate("r9", 0, "errors", 0)
    assert _sample(metrics.ROLLOUT_GATE_VALUE, rollout="r9", wave="0", gate="latency_ms_p99") == 12.5
    assert _sample(metrics.ROLLOUT_GATE_THRESHOLD, rollout="r9", wave="0", gate="latency_ms_p99") == 20
    metrics.forget_rollout("r9")
    assert _sample(metrics.ROLLOUT_WAVE_STATE, rollout="r9", wave="0", state="running") is None
    assert _sample(metrics.ROLLOUT_GATE_VALUE, rollout="r9", wave="0", gate="errors") is None


def test_fleet_gauges_drop_groups_that_disappeared():
    metrics.set_fleet({"online": 3, "offline": 1, "revoked": 0}, {"line-3": 2, "": 1})
    assert _sample(metrics.DEVICES_ONLINE, group="line-3") == 2
    metrics.set_fleet({"online": 1, "offline": 3, "revoked": 0}, {"": 1})
    assert _sample(metrics.DEVICES_ONLINE, group="line-3") is None
    assert _sample(metrics.DEVICES, state="offline") == 3


@pytest.mark.parametrize(("text", "seconds"), [("24h", 86400), ("30m", 1800), ("7d", 604800), ("90", 90),
                                               ("2w", 1209600), (" 45s ", 45)])
def test_cli_durations(text, seconds):
    from server.cli import parse_duration

    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "1.5h", "-1h", "10y"])
def test_cli_durations_refused(text):
    import typer

    from server.cli import parse_duration

    with pytest.raises(typer.BadParameter):
        parse_duration(text)
