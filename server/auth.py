"""API tokens and roles. Tokens are random secrets; only their sha256 is stored."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from enum import StrEnum

from sqlalchemy import select
from sqlalchemy.orm import Session

from server.db.models import ApiToken, utcnow


class Role(StrEnum):
    """viewer reads; operator also labels devices, deploys, approves and rolls back; engineer also
    retrains and imports data; admin also enrolls/revokes devices and issues bootstrap tokens.
    A device token acts only as its own device."""

    VIEWER = "viewer"
    OPERATOR = "operator"
    ENGINEER = "engineer"
    ADMIN = "admin"
    DEVICE = "device"


# Human roles are ordered; a device token is outside the ladder and only acts as its device.
_RANK = {Role.VIEWER: 1, Role.OPERATOR: 2, Role.ENGINEER: 3, Role.ADMIN: 4}


@dataclass(frozen=True)
class Principal:
    role: Role
    subject: str

    def at_least(self, role: Role) -> bool:
        # ``role`` may be DEVICE (outside the ladder): no principal is "at least" a device.
        return self.role in _RANK and role in _RANK and _RANK[self.role] >= _RANK[role]

    def is_device(self, device_id: str) -> bool:
        return self.role is Role.DEVICE and self.subject == device_id


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return "elt_" + secrets.token_urlsafe(32)


def new_bootstrap_token() -> str:
    """An enrollment secret; a distinct prefix so a leaked one is recognisable (and never an API token)."""
    return "elb_" + secrets.token_urlsafe(32)


def issue_token(session: Session, role: Role, subject: str) -> str:
    token = new_token()
    session.add(ApiToken(token_hash=hash_token(token), role=role.value, subject=subject))
    return token


def revoke_tokens(session: Session, subject: str, role: Role) -> int:
    rows = session.scalars(
        select(ApiToken).where(ApiToken.subject == subject, ApiToken.role == role.value, ApiToken.revoked_at.is_(None))
    ).all()
    for row in rows:
        row.revoked_at = utcnow()
    return len(rows)


def authenticate(session: Session, token: str, admin_token: str | None) -> Principal | None:
    if admin_token and hmac.compare_digest(token.encode(), admin_token.encode()):
        return Principal(Role.ADMIN, "admin")
    row = session.scalar(select(ApiToken).where(ApiToken.token_hash == hash_token(token)))
    if row is None or row.revoked_at is not None:
        return None
    return Principal(Role(row.role), row.subject)
