"""Model registry: versions with metrics and lineage, and the production/previous/candidate aliases.

Approval makes a version production (automatically by policy when its gate passed, or by an
operator); rollback makes ``previous`` production again in one call. Every change of an
alias is written to the append-only audit log by the caller that knows who acted.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from server.db.models import Alias, ModelVersion, TrainingJob, utcnow

PRODUCTION, PREVIOUS, CANDIDATE = "production", "previous", "candidate"


def artifact_key(model_name: str, version: int, filename: str) -> str:
    return f"models/{model_name}/{version:06d}/{filename}"


def next_version(session: Session) -> int:
    """The next free version number: past every registered version and every number a running
    retrain job reserved for the bundle it is building (it registers that number at its commit)."""
    registered = session.scalar(select(func.max(ModelVersion.version))) or 0
    reserved = session.scalar(select(func.max(TrainingJob.candidate_version))
                              .where(TrainingJob.status == "running")) or 0
    return max(registered, reserved) + 1


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


class RegistryError(ValueError):
    """A registry action that cannot be done, with why (the API turns it into a 409)."""


def clear_alias(session: Session, name: str) -> None:
    alias = session.get(Alias, name)
    if alias is not None:
        session.delete(alias)


def approve(session: Session, version: int, actor: str) -> ModelVersion:
    """Approve a gated candidate for production (``actor`` is a user or ``policy:auto``)."""
    mv = session.get(ModelVersion, version)
    if mv is None:
        raise RegistryError(f"model version {version} does not exist")
    if mv.status == "rejected":
        raise RegistryError(f"version {version} was rejected by its gate ({mv.reason}); it cannot be approved")
    if mv.status == "production":
        raise RegistryError(f"version {version} is already production")
    if not mv.bundle_key:
        raise RegistryError(f"version {version} has no signed bundle yet")
    mv.approved_by, mv.approved_at = actor, utcnow()
    promote(session, version)
    candidate = session.get(Alias, CANDIDATE)
    if candidate is not None and candidate.version == version:
        clear_alias(session, CANDIDATE)
    return mv


def rollback(session: Session) -> tuple[int, int]:
    """Production goes back to ``previous``; returns (from_version, to_version)."""
    current, previous = production(session), alias_version(session, PREVIOUS)
    if current is None:
        raise RegistryError("there is no production model to roll back")
    if previous is None:
        raise RegistryError(f"version {current.version} has no previous production version to roll back to")
    current.status = "rolled_back"
    previous.status = "production"
    set_alias(session, PRODUCTION, previous.version)
    # The version before `previous` is not tracked by alias: after a rollback there is none.
    clear_alias(session, PREVIOUS)
    return current.version, previous.version


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
