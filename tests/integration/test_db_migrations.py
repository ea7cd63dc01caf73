"""The Alembic migrations build exactly the schema the ORM models declare (SQLite and PostgreSQL)."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from server.db.models import Base
from server.db.session import make_engine, upgrade_schema

pytestmark = pytest.mark.integration


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'm.db'}"
    return request.getfixturevalue("postgres")


def test_migrations_match_the_models(url):
    engine = make_engine(url)
    try:
        upgrade_schema(engine)
        with engine.connect() as connection:
            diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
        # Server defaults and type spellings vary by backend; tables, columns and indexes must not.
        structural = [d for d in diff if d[0] in {"add_table", "remove_table", "add_column", "remove_column",
                                                  "add_index", "remove_index"}
                      or (isinstance(d, list) and d and d[0][0] in {"modify_nullable"})]
        assert structural == []
    finally:
        engine.dispose()
