"""Model registry: versions with metrics and lineage, and the production/previous/candidate aliases."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from server.db.models import Alias, ModelVersion, utcnow

PRODUCTION, PREVIOUS, CANDIDATE = "production", "previous", "candidate"


def artifact_key(model_name: str, version: int, filename: str) -> str:
    return f"models/{model_name}/{version:06d}/{filename}"


def next_version(session: Session) -> int:
    return (session.scalar(select(func.max(ModelVersion.version))) or 0) + 1


def alias_version(session: Session, name: str) -> ModelVersion | None:
    alias = session.get(Alias, name)
    return session.get(ModelVersion, alias.version) if alias else None


def production(session: Session) -> ModelVersion | None:
    return alias_version(session, PRODUCTION)


def set_alias(session: Session, name: str, version: int) -> None:
    alias = session.get(Alias, name)
    if alias is None:
        session.add(Alias(name=name, version=version))
    else:
        alias.version, alias.updated_at = version, utcnow()


def promote(session: Session, version: int) -> None:
    """Make ``version`` production; the old production becomes ``previous``."""
    current = production(session)
    if current is not None and current.version != version:
        set_alias(session, PREVIOUS, current.version)
        current.status = "archived"
    set_alias(session, PRODUCTION, version)
    session.get(ModelVersion, version).status = "production"


def aliases_of(session: Session) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for alias in session.scalars(select(Alias)):
        out.setdefault(alias.version, []).append(alias.name)
    return out
