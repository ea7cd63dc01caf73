"""Model registry: versions with metrics and lineage, and the production/previous/candidate aliases.

``production`` is what the fleet is meant to run. Approval (by policy when the gate passed, or
by an operator) makes a version production at once when nothing rolls it out (``promote_now``);
with auto-deploy it is ``approved`` and becomes production when its rollout completes. A
rollback may go to any earlier version: every move of an alias is kept in ``alias_history``, so
rolling back twice goes back twice. The caller that knows who acted writes the audit log.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from server.db.models import Alias, AliasChange, ModelVersion, TrainingJob, utcnow

PRODUCTION, PREVIOUS, CANDIDATE = "production", "previous", "candidate"
# A version approved for release whose rollout has not completed yet.
APPROVED = "approved"
# Statuses a rollback may not go back to.
_NOT_A_ROLLBACK_TARGET = frozenset({"rejected", "rolled_back", "candidate"})


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


def set_alias(session: Session, name: str, version: int, *, actor: str = "", reason: str = "") -> None:
    alias = session.get(Alias, name)
    before = alias.version if alias else None
    if alias is None:
        session.add(Alias(name=name, version=version))
    else:
        alias.version, alias.updated_at = version, utcnow()
    if before != version:
        session.add(AliasChange(name=name, version=version, from_version=before, actor=actor, reason=reason[:4000]))


class RegistryError(ValueError):
    """A registry action that cannot be done, with why (the API turns it into a 409)."""


def clear_alias(session: Session, name: str, *, actor: str = "", reason: str = "") -> None:
    alias = session.get(Alias, name)
    if alias is not None:
        session.add(AliasChange(name=name, version=None, from_version=alias.version, actor=actor,
                                reason=reason[:4000]))
        session.delete(alias)


def approve(session: Session, version: int, actor: str, *, promote_now: bool = True) -> ModelVersion:
    """Approve a gated candidate (``actor`` is a user or ``policy:auto``). With ``promote_now`` it
    becomes production at once; otherwise it is ``approved`` until its rollout completes (the first
    version of all is production at once: there is nothing to roll out from)."""
    mv = session.get(ModelVersion, version)
    if mv is None:
        raise RegistryError(f"model version {version} does not exist")
    if mv.status == "rejected":
        raise RegistryError(f"version {version} was rejected by its gate ({mv.reason}); it cannot be approved")
    if mv.status in ("production", APPROVED):
        raise RegistryError(f"version {version} is already {mv.status}")
    if not mv.bundle_key:
        raise RegistryError(f"version {version} has no signed bundle yet")
    mv.approved_by, mv.approved_at = actor, utcnow()
    candidate = session.get(Alias, CANDIDATE)
    if candidate is not None and candidate.version == version:
        clear_alias(session, CANDIDATE, actor=actor, reason="approved")
    if promote_now or production(session) is None:
        promote(session, version, actor=actor, reason="approved")
    else:
        mv.status = APPROVED
    return mv


def production_history(session: Session) -> list[int]:
    """The versions production pointed at, newest first (each once)."""
    seen: list[int] = []
    for version in session.scalars(select(AliasChange.version).where(
            AliasChange.name == PRODUCTION, AliasChange.version.is_not(None))
            .order_by(AliasChange.id.desc())):
        if version not in seen:
            seen.append(version)
    return seen


def _earlier_production(session: Session, than: int) -> ModelVersion | None:
    """The newest version production pointed at, other than ``than``, that may be gone back to."""
    for version in production_history(session):
        mv = session.get(ModelVersion, version)
        if version != than and mv is not None and mv.status not in _NOT_A_ROLLBACK_TARGET and mv.bundle_key:
            return mv
    return None


def rollback_target(session: Session) -> ModelVersion:
    """Where a rollback without a version goes: the newest earlier production version that was
    not itself rolled back (from the history, so a second rollback goes one further back)."""
    current = production(session)
    if current is None:
        raise RegistryError("there is no production model to roll back")
    target = _earlier_production(session, current.version)
    if target is None:
        raise RegistryError(f"version {current.version} has no earlier production version to roll back to")
    return target


def rollback(session: Session, to_version: int | None = None, *, actor: str = "",
             reason: str = "") -> tuple[int, int]:
    """Production goes back to ``to_version`` (None: :func:`rollback_target`); the version it
    leaves, and every approved one still rolling out past it, are marked rolled back. Returns
    (from_version, to_version)."""
    current = production(session)
    if current is None:
        raise RegistryError("there is no production model to roll back")
    target = rollback_target(session) if to_version is None else session.get(ModelVersion, to_version)
    if target is None:
        raise RegistryError(f"model version {to_version} does not exist")
    if target.version == current.version:
        raise RegistryError(f"version {target.version} is already production")
    if target.status in _NOT_A_ROLLBACK_TARGET or not target.bundle_key:
        raise RegistryError(f"version {target.version} is {target.status}"
                            + ("" if target.bundle_key else " and has no bundle") + ": it cannot be rolled back to")
    abandoned = [current, *session.scalars(select(ModelVersion).where(ModelVersion.status == APPROVED))]
    for mv in abandoned:
        mv.status = "rolled_back"
    target.status = "production"
    set_alias(session, PRODUCTION, target.version, actor=actor, reason=reason or "rollback")
    before = _earlier_production(session, target.version)
    if before is None:
        clear_alias(session, PREVIOUS, actor=actor, reason="rollback: no earlier production version")
    else:
        set_alias(session, PREVIOUS, before.version, actor=actor, reason="rollback")
    return current.version, target.version


def promote(session: Session, version: int, *, actor: str = "", reason: str = "") -> bool:
    """Make ``version`` production; the old production becomes ``previous``. False when it already was."""
    current = production(session)
    if current is not None and current.version == version:
        return False
    if current is not None:
        set_alias(session, PREVIOUS, current.version, actor=actor, reason=reason)
        current.status = "archived"
    set_alias(session, PRODUCTION, version, actor=actor, reason=reason)
    session.get(ModelVersion, version).status = "production"
    # Older approved versions whose rollouts this one superseded will not be production now.
    for older in session.scalars(select(ModelVersion).where(ModelVersion.status == APPROVED,
                                                            ModelVersion.version < version)):
        older.status = "archived"
    return True


def aliases_of(session: Session) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for alias in session.scalars(select(Alias)):
        out.setdefault(alias.version, []).append(alias.name)
    return out
