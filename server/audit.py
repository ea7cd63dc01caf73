"""Append-only audit log of every mutating action."""

from __future__ import annotations

from sqlalchemy.orm import Session

from server.db.models import AuditEntry


def record(session: Session, actor: str, action: str, target: str = "", source: str = "", **detail) -> None:
    session.add(AuditEntry(actor=actor, action=action, target=target, source=source, detail=detail))
