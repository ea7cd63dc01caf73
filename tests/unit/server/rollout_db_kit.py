"""A SQLite database with the schema, a candidate model version and one rollout of it: the start
of the rollout unit tests that work on rows without the controller's simulated fleet."""

from __future__ import annotations

from sqlalchemy import create_engine
from sqlalchemy.orm import Session, sessionmaker

from server.db.models import Base, ModelVersion, Rollout


def rollout_db(tmp_path, *, production: bool = False, **rollout) -> tuple[sessionmaker[Session], Rollout]:
    """Sessions on a fresh database holding version 2 (a candidate; with ``production`` also version
    1 in production) and a shadow_then_switch rollout of version 2 (``rollout`` overrides columns)."""
    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    Base.metadata.create_all(engine)
    sessions = sessionmaker(engine, expire_on_commit=False)
    with sessions() as session:
        if production:
            session.add(ModelVersion(version=1, name="d", status="production"))
        session.add(ModelVersion(version=2, name="d", status="candidate"))
        session.flush()
        row = Rollout(**{"version": 2, "mode": "shadow_then_switch", "on_failure": "pause", "selector": {},
                         "gates": {}, "shadow_frames": 100, "created_by": "t", **rollout})
        session.add(row)
        session.commit()
    return sessions, row
