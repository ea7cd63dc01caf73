"""The fleet: bootstrap tokens, enrollment, admin provisioning, revocation, device labels
(groups and tags) and inventory queries.

Database and broker-account logic only; server/api/fleet_routes.py maps :class:`FleetError`
to HTTP answers. A device's broker identity is its device id as user name with a random
password in Mosquitto's password file; the ACL is ``%u`` patterns, so enrolling or revoking
never touches the ACL, only the password file and a broker reload.

Ordering is chosen so that a failure leaves no half-enrolled device: the database work is
flushed (a duplicate device id fails there) before the broker user is written, and the
broker user is removed again if the commit fails. Revocation removes the broker user first,
so that a failure leaves the device unable to connect rather than recorded as revoked but
still able to.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import Select, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from server import audit, metrics
from server.auth import Role, hash_token, issue_token, new_bootstrap_token, revoke_tokens
from server.db.models import BootstrapToken, Device, DeviceLabel, utcnow

log = structlog.get_logger(__name__)

GROUP, TAG = "group", "tag"


class FleetError(Exception):
    """A refused fleet action; ``status`` is the HTTP status the API answers with."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Credentials:
    """A device's identity, returned exactly once."""

    device_id: str
    api_token: str
    mqtt_username: str
    mqtt_password: str


# ---------------------------------------------------------------------- labels


def set_labels(device: Device, *, groups: Iterable[str] | None = None, tags: Iterable[str] | None = None) -> None:
    """Replace the device's groups and/or tags (``None`` leaves that kind as it is)."""
    wanted: dict[str, set[str]] = {}
    if groups is not None:
        wanted[GROUP] = set(groups)
    if tags is not None:
        wanted[TAG] = set(tags)
    # Diff rather than replace the collection: deleting and re-adding a row with the same key
    # in one flush is what relationship collections handle worst.
    for label in list(device.labels):
        if label.kind in wanted and label.value not in wanted[label.kind]:
            device.labels.remove(label)
    have = {(label.kind, label.value) for label in device.labels}
    for kind, values in wanted.items():
        for value in sorted(values):
            if (kind, value) not in have:
                device.labels.append(DeviceLabel(kind=kind, value=value))


# ---------------------------------------------------------------------- bootstrap tokens


def token_state(row: BootstrapToken, now: datetime | None = None) -> str:
    now = now or utcnow()
    if row.revoked_at is not None:
        return "revoked"
    if row.expires_at <= now:
        return "expired"
    if row.uses >= row.max_uses:
        return "exhausted"
    return "active"


def bootstrap_token_dict(row: BootstrapToken, now: datetime | None = None) -> dict[str, Any]:
    return {"id": row.id, "created_by": row.created_by, "created_at": row.created_at, "expires_at": row.expires_at,
            "max_uses": row.max_uses, "uses": row.uses, "groups": list(row.groups), "tags": list(row.tags),
            "note": row.note, "last_used_at": row.last_used_at, "revoked_at": row.revoked_at,
            "state": token_state(row, now)}


def create_bootstrap_token(
    session: Session, *, created_by: str, expires_in: timedelta, max_uses: int,
    groups: Sequence[str] = (), tags: Sequence[str] = (), note: str = "", now: datetime | None = None,
) -> tuple[BootstrapToken, str]:
    """A new token row (flushed, so it has its id) and the secret, which is not stored."""
    if max_uses < 1:
        raise ValueError("max_uses must be at least 1")
    now = now or utcnow()
    secret = new_bootstrap_token()
    row = BootstrapToken(token_hash=hash_token(secret), created_by=created_by, created_at=now,
                         expires_at=now + expires_in, max_uses=max_uses, uses=0,
                         groups=sorted(set(groups)), tags=sorted(set(tags)), note=note)
    session.add(row)
    session.flush()
    return row, secret


def _refusal(row: BootstrapToken, state: str) -> FleetError:
    detail = {
        "revoked": f"was revoked at {row.revoked_at:%Y-%m-%d %H:%M:%S} UTC" if row.revoked_at else "was revoked",
        "expired": f"expired at {row.expires_at:%Y-%m-%d %H:%M:%S} UTC",
        "exhausted": f"has been used {row.uses} of {row.max_uses} times",
    }[state]
    return FleetError(403, f"bootstrap token {row.id} {detail}; ask an admin for a new one")


def check_bootstrap_token(session: Session, secret: str, now: datetime | None = None) -> BootstrapToken:
    """The token row for ``secret``; 401 if unknown, 403 if revoked, expired or used up."""
    row = session.scalar(select(BootstrapToken).where(BootstrapToken.token_hash == hash_token(secret)))
    if row is None:
        raise FleetError(401, "unknown bootstrap token")
    state = token_state(row, now)
    if state != "active":
        raise _refusal(row, state)
    return row


def consume_bootstrap_token(session: Session, row: BootstrapToken, now: datetime | None = None) -> None:
    """Count one use, atomically: a conditional UPDATE, so two enrollments racing for the last use
    cannot both win (on PostgreSQL it also locks the row until the enrollment commits)."""
    now = now or utcnow()
    result = session.execute(
        update(BootstrapToken)
        .where(BootstrapToken.id == row.id, BootstrapToken.uses < BootstrapToken.max_uses,
               BootstrapToken.revoked_at.is_(None), BootstrapToken.expires_at > now)
        .values(uses=BootstrapToken.uses + 1, last_used_at=now)
        .execution_options(synchronize_session=False)
    )
    session.refresh(row)
    if result.rowcount != 1:
        raise _refusal(row, token_state(row, now))


def revoke_bootstrap_token(session: Session, token_id: int, now: datetime | None = None) -> BootstrapToken:
    row = session.get(BootstrapToken, token_id)
    if row is None:
        raise FleetError(404, f"bootstrap token {token_id} does not exist")
    if row.revoked_at is None:
        row.revoked_at = now or utcnow()
    return row


# ---------------------------------------------------------------------- broker accounts


def _require_accounts(accounts) -> None:
    if accounts is None:
        raise FleetError(503, "broker account management is not configured on this server "
                              "(set EDGELOOP_MQTT_PASSWORD_FILE and EDGELOOP_MQTT_BROKER_PID_FILE)")


def _in_transaction(accounts, session: Session):
    """Accounts kept in this database (server.broker_accounts.DatabaseAccounts) are written in the
    caller's transaction: they commit or roll back with the device, with nothing to undo."""
    join = getattr(accounts, "in_session", None)
    return join(session) if join is not None else accounts


def _add_broker_user(accounts, device_id: str, password: str) -> None:
    try:
        accounts.add_user(device_id, password)
    except (OSError, RuntimeError, ValueError) as exc:  # ServiceError is a RuntimeError
        log.error("fleet.broker_user_failed", device=device_id, error=str(exc))
        raise FleetError(503, f"could not write the broker credentials for {device_id}: {exc}") from None


def _remove_broker_user(accounts, device_id: str) -> bool:
    try:
        return accounts.remove_user(device_id)
    except (OSError, RuntimeError) as exc:
        log.error("fleet.broker_remove_failed", device=device_id, error=str(exc))
        raise FleetError(503, f"could not remove the broker user of {device_id}: {exc}") from None


def _commit_or_undo(session: Session, accounts, device_id: str) -> None:
    try:
        session.commit()
    except Exception:
        # The database refused: the broker must not keep a user the database does not know.
        if not getattr(accounts, "transactional", False):
            _remove_broker_user(accounts, device_id)
        raise


def _issue_identity(session: Session, accounts, device: Device) -> Credentials:
    revoke_tokens(session, device.id, Role.DEVICE)
    api_token = issue_token(session, Role.DEVICE, device.id)
    try:
        session.flush()
    except IntegrityError:
        session.rollback()
        raise FleetError(409, f"device {device.id!r} was enrolled by a concurrent request") from None
    password = secrets.token_urlsafe(24)
    _add_broker_user(accounts, device.id, password)
    return Credentials(device.id, api_token, device.id, password)


# ---------------------------------------------------------------------- enrollment


def enroll(
    session: Session, accounts, *, secret: str, device_id: str, hardware: dict[str, Any] | None,
    agent_version: str, source: str, now: datetime | None = None,
) -> tuple[Credentials, Device, BootstrapToken]:
    """Exchange a bootstrap token for a new device identity (committed on return).

    A device id that is enrolled and not revoked is refused (409): taking over another
    device's identity needs an admin to revoke it first."""
    _require_accounts(accounts)
    accounts = _in_transaction(accounts, session)
    now = now or utcnow()
    row = check_bootstrap_token(session, secret, now)
    consume_bootstrap_token(session, row, now)  # first: serialises enrollments with this token
    device = session.scalar(select(Device).where(Device.id == device_id).with_for_update())
    if device is not None and not device.revoked:
        raise FleetError(409, f"device {device_id!r} is already enrolled"
                              f"{f' (by {device.enrolled_by})' if device.enrolled_by else ''}; "
                              "an admin must revoke it before it can enroll again")
    previously_revoked_at = device.revoked_at if device is not None else None
    if device is None:
        device = Device(id=device_id, created_at=now)
        session.add(device)
    actor = f"bootstrap:{row.id}"
    device.revoked, device.revoked_at, device.online = False, None, False
    device.enrolled_by, device.enrolled_at = actor, now
    device.agent_version = agent_version
    if hardware is not None:
        device.hardware = hardware
    set_labels(device, groups=row.groups, tags=row.tags)
    creds = _issue_identity(session, accounts, device)
    audit.record(session, actor, "device.enroll", device_id, source, bootstrap_token=row.id,
                 groups=list(row.groups), tags=list(row.tags), agent_version=agent_version,
                 hardware=hardware or {},
                 re_enrolled_after_revocation=previously_revoked_at.isoformat() if previously_revoked_at else None)
    _commit_or_undo(session, accounts, device_id)
    metrics.ENROLLMENTS.labels(outcome="enrolled").inc()
    log.info("fleet.enrolled", device=device_id, bootstrap_token=row.id, source=source)
    return creds, device, row


def provision(
    session: Session, accounts, *, device_id: str, actor: str, source: str,
    groups: Sequence[str] | None = None, tags: Sequence[str] | None = None, now: datetime | None = None,
) -> tuple[Credentials, Device]:
    """An admin creates a device, or re-keys an existing one (its old token and password stop working)."""
    _require_accounts(accounts)
    accounts = _in_transaction(accounts, session)
    now = now or utcnow()
    device = session.scalar(select(Device).where(Device.id == device_id).with_for_update())
    rekey = device is not None
    if device is None:
        device = Device(id=device_id, created_at=now)
        session.add(device)
    device.revoked, device.revoked_at = False, None
    device.enrolled_by, device.enrolled_at = actor, now
    set_labels(device, groups=groups, tags=tags)
    creds = _issue_identity(session, accounts, device)
    audit.record(session, actor, "device.rekey" if rekey else "device.provision", device_id, source,
                 groups=device.groups, tags=device.tags)
    _commit_or_undo(session, accounts, device_id)
    return creds, device


def provision_many(
    session: Session, accounts, devices: Sequence[Any], *, actor: str, source: str, now: datetime | None = None,
) -> tuple[list[Credentials], int]:
    """Bulk :func:`provision`: every device (``server.bulk_enroll.BulkDevice`` rows, ids unique) is
    created or re-keyed in one transaction, and their broker accounts are written in one batch
    (one password-file write and reload, or a few dynamic-security messages). All or nothing: a
    database or broker failure leaves no device of the call half-enrolled. Returns (credentials in
    the order given, how many devices existed and were re-keyed)."""
    from server.broker_accounts import Account, chunks

    _require_accounts(accounts)
    accounts = _in_transaction(accounts, session)
    now = now or utcnow()
    ids = [d.device_id for d in devices]
    existing: dict[str, Device] = {}
    for part in chunks(ids, 500):  # SQLite's bound-parameter limit
        for device in session.scalars(select(Device).where(Device.id.in_(list(part))).with_for_update()):
            existing[device.id] = device
    creds: list[Credentials] = []
    for spec in devices:
        device = existing.get(spec.device_id)
        rekey = device is not None
        if device is None:
            device = Device(id=spec.device_id, created_at=now)
            session.add(device)
        else:
            revoke_tokens(session, device.id, Role.DEVICE)
        device.revoked, device.revoked_at = False, None
        device.enrolled_by, device.enrolled_at = actor, now
        set_labels(device, groups=spec.groups, tags=spec.tags)
        api_token = issue_token(session, Role.DEVICE, device.id)
        creds.append(Credentials(device.id, api_token, device.id, secrets.token_urlsafe(24)))
        audit.record(session, actor, "device.rekey" if rekey else "device.provision", device.id, source,
                     groups=device.groups, tags=device.tags, bulk=True)
    try:
        session.flush()
    except IntegrityError:
        session.rollback()
        raise FleetError(409, "a device of this call was enrolled by a concurrent request; nothing was changed") \
            from None
    batch = [Account(c.mqtt_username, c.mqtt_password) for c in creds]
    try:
        if hasattr(accounts, "add_users"):
            accounts.add_users(batch)
        else:  # an older single-account implementation
            for account in batch:
                accounts.add_user(account.username, account.password)
    except (OSError, RuntimeError, ValueError) as exc:
        session.rollback()
        log.error("fleet.broker_users_failed", devices=len(batch), error=str(exc))
        raise FleetError(503, f"could not write the broker credentials of {len(batch)} devices "
                              f"(nothing was changed): {exc}") from None
    try:
        session.commit()
    except Exception:
        if getattr(accounts, "transactional", False):
            raise
        try:
            if hasattr(accounts, "remove_users"):
                accounts.remove_users(ids)
            else:
                for device_id in ids:
                    accounts.remove_user(device_id)
        except (OSError, RuntimeError) as exc:
            log.error("fleet.broker_remove_failed", devices=len(ids), error=str(exc))
        raise
    log.info("fleet.provisioned_bulk", devices=len(creds), rekeyed=len(existing), actor=actor, source=source)
    return creds, len(existing)


def revoke(session: Session, accounts, *, device_id: str, actor: str, source: str,
           now: datetime | None = None) -> dict[str, Any]:
    """Revoke a device: broker user removed (the broker reloads and drops it), API tokens revoked."""
    device = session.scalar(select(Device).where(Device.id == device_id).with_for_update())
    if device is None:
        raise FleetError(404, f"unknown device {device_id!r}")
    accounts = _in_transaction(accounts, session)
    removed = _remove_broker_user(accounts, device_id) if accounts is not None else False
    tokens = revoke_tokens(session, device_id, Role.DEVICE)
    already = device.revoked
    device.revoked, device.online = True, False
    device.revoked_at = device.revoked_at if already and device.revoked_at else (now or utcnow())
    detail = {"api_tokens_revoked": tokens, "broker_user_removed": removed, "already_revoked": already}
    audit.record(session, actor, "device.revoke", device_id, source, **detail)
    session.commit()
    log.info("fleet.revoked", device=device_id, actor=actor, **detail)
    return detail


def update_labels(session: Session, *, device_id: str, actor: str, source: str,
                  groups: Sequence[str] | None, tags: Sequence[str] | None) -> Device:
    device = session.get(Device, device_id)
    if device is None:
        raise FleetError(404, f"unknown device {device_id!r}")
    if device.revoked:
        raise FleetError(409, f"device {device_id!r} is revoked; enroll it again before editing it")
    before = {"groups": device.groups, "tags": device.tags}
    set_labels(device, groups=groups, tags=tags)
    session.flush()
    after = {"groups": device.groups, "tags": device.tags}
    audit.record(session, actor, "device.update", device_id, source, before=before, after=after)
    session.commit()
    return device


# ---------------------------------------------------------------------- inventory


def _has_label(kind: str, values: Iterable[str]):
    return Device.id.in_(select(DeviceLabel.device_id).where(DeviceLabel.kind == kind,
                                                             DeviceLabel.value.in_(list(values))))


def device_query(
    *, groups: Sequence[str] = (), tags: Sequence[str] = (), online: bool | None = None,
    gpu_compute_capability: str | None = None, tensorrt_version: str | None = None,
    agent_version: str | None = None, revoked: bool | None = None, id_contains: str | None = None,
) -> Select:
    """Devices matching every given filter: in ANY of ``groups``, carrying ALL of ``tags``, and the
    exact hardware/agent values. Ordered by id. The rollout selector builds on this."""
    query = select(Device)
    if groups:
        query = query.where(_has_label(GROUP, groups))
    for tag in tags:
        query = query.where(_has_label(TAG, [tag]))
    if online is not None:
        query = query.where(Device.online.is_(online), Device.revoked.is_(False)) if online else \
            query.where((Device.online.is_(False)) | Device.revoked.is_(True))
    if gpu_compute_capability is not None:
        query = query.where(Device.hardware["gpu_compute_capability"].as_string() == gpu_compute_capability)
    if tensorrt_version is not None:
        query = query.where(Device.hardware["tensorrt_version"].as_string() == tensorrt_version)
    if agent_version is not None:
        query = query.where(Device.agent_version == agent_version)
    if revoked is not None:
        query = query.where(Device.revoked.is_(revoked))
    if id_contains:
        query = query.where(func.lower(Device.id).contains(id_contains.lower(), autoescape=True))
    return query.order_by(Device.id)


def device_dict(d: Device) -> dict[str, Any]:
    """A device's inventory record (the shape of server.api.schemas.DeviceInfo)."""
    return {
        "id": d.id, "online": bool(d.online) and not d.revoked, "last_seen": d.last_seen,
        "agent_version": d.agent_version, "active_version": d.active_version,
        "candidate_version": d.candidate_version, "update_state": d.update_state, "hardware": d.hardware or {},
        "heartbeat": d.last_heartbeat or {}, "groups": d.groups, "tags": d.tags, "revoked": d.revoked,
        "revoked_at": d.revoked_at, "enrolled_by": d.enrolled_by, "enrolled_at": d.enrolled_at,
        "created_at": d.created_at,
    }


def fleet_counts(session: Session) -> tuple[dict[str, int], dict[str, int]]:
    """(devices by state online/offline/revoked, online devices per group; "" = in no group)."""
    by_state = {"online": 0, "offline": 0, "revoked": 0}
    for revoked, online, count in session.execute(
            select(Device.revoked, Device.online, func.count()).group_by(Device.revoked, Device.online)):
        by_state["revoked" if revoked else "online" if online else "offline"] += count
    live = (Device.online.is_(True), Device.revoked.is_(False))
    per_group = dict(session.execute(
        select(DeviceLabel.value, func.count()).join(Device, Device.id == DeviceLabel.device_id)
        .where(DeviceLabel.kind == GROUP, *live).group_by(DeviceLabel.value)).all())
    ungrouped = session.scalar(select(func.count()).select_from(Device).where(
        *live, ~Device.id.in_(select(DeviceLabel.device_id).where(DeviceLabel.kind == GROUP)))) or 0
    if ungrouped:
        per_group[""] = ungrouped
    return by_state, per_group


def update_fleet_metrics(session: Session) -> None:
    """Set the fleet gauges from the database (called on every /metrics scrape)."""
    metrics.set_fleet(*fleet_counts(session))


# ---------------------------------------------------------------------- enrollment rate limit


class FailureLimiter:
    """Refuses a client address after too many failed enrollments in a moving window.

    Only failures count, so a whole line enrolling from behind one NAT address is never slowed,
    while guessing tokens is. ``storage`` is a `limits` storage URI: ``memory://`` is per server
    process; a shared one (``redis://...``) makes the limit hold across replicas.
    """

    def __init__(self, rate: str = "10/5minutes", storage: str = "memory://"):
        from limits import parse, strategies
        from limits import storage as limit_storage

        self._item = parse(rate)
        self._limiter = strategies.MovingWindowRateLimiter(limit_storage.storage_from_string(storage))
        self._lock = threading.Lock()

    def retry_after(self, key: str) -> int | None:
        """Seconds until ``key`` may try again, or None if it may now."""
        with self._lock:
            if self._limiter.test(self._item, key):
                return None
            reset = self._limiter.get_window_stats(self._item, key).reset_time
        return max(1, int(reset - datetime.now().timestamp()) + 1)

    def failed(self, key: str) -> None:
        with self._lock:
            self._limiter.hit(self._item, key)
