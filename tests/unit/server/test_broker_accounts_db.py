"""server.broker_accounts.DatabaseAccounts (broker_accounts=http, EMQX): accounts as rows of the
server's database, on a SQLite file built by the migrations. Add, re-key, remove, all-or-nothing
batches, a 10,000-account batch in one transaction, and the fleet's enrollment writing accounts
inside its own transaction (on SQLite a second writer would wait for the first one's lock)."""

from __future__ import annotations

import hashlib
import time

import pytest
import structlog.testing
from pydantic import SecretStr
from sqlalchemy import event, func, select
from sqlalchemy.exc import IntegrityError

from server import fleet
from server.broker_accounts import (
    Account,
    BrokerAccounts,
    BrokerAccountsError,
    DatabaseAccounts,
    SessionAccounts,
    make_broker_accounts,
)
from server.bulk_enroll import BulkDevice
from server.db.models import BrokerAccount, Device
from server.db.session import make_engine, make_session_factory, upgrade_schema
from server.settings import ServerSettings


@pytest.fixture
def engine(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'edgeloop.db'}")
    upgrade_schema(engine)  # the 0008 migration makes the table
    yield engine
    engine.dispose()


@pytest.fixture
def sessions(engine):
    return make_session_factory(engine)


@pytest.fixture
def accounts(sessions) -> DatabaseAccounts:
    return DatabaseAccounts(sessions)


def _rows(sessions) -> dict[str, BrokerAccount]:
    with sessions() as session:
        return {r.username: r for r in session.scalars(select(BrokerAccount))}


def test_it_implements_the_interface(accounts):
    assert isinstance(accounts, BrokerAccounts)
    assert isinstance(accounts.in_session(None), BrokerAccounts)


def test_add_verify_rekey_remove(accounts, sessions):
    accounts.add_user("cam-1", "first-password")
    assert accounts.verify("cam-1", "first-password")
    assert not accounts.verify("cam-1", "first-passwordx")
    assert not accounts.verify("cam-1", "")
    assert not accounts.verify("cam-2", "first-password")
    assert accounts.users() == ["cam-1"] and accounts.exists("cam-1") and not accounts.exists("cam-2")
    before = _rows(sessions)["cam-1"]
    # Only a salted hash is stored.
    assert "first-password" not in (before.password_hash + before.salt)
    assert before.password_hash == hashlib.sha256(bytes.fromhex(before.salt) + b"first-password").hexdigest()

    time.sleep(0.01)
    accounts.add_user("cam-1", "second-password")  # re-key: the old password stops working
    assert accounts.verify("cam-1", "second-password")
    assert not accounts.verify("cam-1", "first-password")
    after = _rows(sessions)["cam-1"]
    assert after.created_at == before.created_at and after.updated_at > before.updated_at
    assert after.salt != before.salt

    assert accounts.remove_user("cam-1") is True
    assert accounts.remove_user("cam-1") is False
    assert not accounts.verify("cam-1", "second-password")
    assert _rows(sessions) == {}


def test_same_password_different_salts(accounts, sessions):
    accounts.add_users([Account("cam-1", "same"), Account("cam-2", "same")])
    rows = _rows(sessions)
    assert rows["cam-1"].salt != rows["cam-2"].salt
    assert rows["cam-1"].password_hash != rows["cam-2"].password_hash


@pytest.mark.parametrize("bad", [
    [("cam-1", "p"), ("Cam-2", "p")],          # not a device id (upper case)
    [("cam-1", "p"), ("_edgeloop-server", "p")],  # the server's name can never be a device account
    [("cam-1", "p"), ("cam-1", "q")],          # given twice
    [("cam-1", "p"), ("cam-2", "")],           # empty password
    [("cam-1", "p"), ("cam-2", "a\nb")],       # not a single line
])
def test_a_bad_batch_writes_nothing(accounts, sessions, bad):
    accounts.add_user("cam-0", "keep")
    with pytest.raises(ValueError):
        accounts.add_users(bad)
    assert set(_rows(sessions)) == {"cam-0"}
    assert accounts.verify("cam-0", "keep")


def test_remove_many_counts_what_existed(accounts):
    accounts.add_users([Account(f"cam-{i}", f"pw-{i}") for i in range(5)])
    assert accounts.remove_users(["cam-1", "cam-3", "cam-3", "cam-9"]) == 2
    assert accounts.users() == ["cam-0", "cam-2", "cam-4"]
    assert accounts.remove_users([]) == 0


def test_ten_thousand_accounts_in_one_transaction(accounts, engine, sessions):
    accounts.add_users([Account(f"cam-{i:05d}", "old") for i in range(0, 10_000, 2)])  # half exist already
    batch = [Account(f"cam-{i:05d}", f"pw-{i}") for i in range(10_000)]
    commits, statements = [], []
    event.listen(engine, "commit", lambda conn: commits.append(1))
    event.listen(engine, "before_cursor_execute",
                 lambda conn, cursor, statement, *a: statements.append(statement.split()[0].upper()))
    accounts.add_users(batch)
    assert len(commits) == 1
    # Bulk statements (a few hundred rows each), not one per account: no per-row flush.
    writes = [s for s in statements if s in {"INSERT", "UPDATE"}]
    assert 2 <= len(writes) <= 60, len(writes)
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(BrokerAccount)) == 10_000
    assert accounts.verify("cam-00000", "pw-0") and not accounts.verify("cam-00000", "old")  # re-keyed
    assert accounts.verify("cam-09999", "pw-9999")
    commits.clear()
    assert accounts.remove_users([a.username for a in batch]) == 10_000
    assert len(commits) == 1


def test_in_session_joins_the_callers_transaction(accounts, sessions):
    with sessions() as session:
        session.add(Device(id="cam-1"))
        session.flush()  # the caller holds SQLite's write lock from here on
        joined = accounts.in_session(session)
        assert isinstance(joined, SessionAccounts) and joined.transactional
        joined.add_user("cam-1", "pw")  # a second writer would wait for the lock above
        assert not accounts.exists("cam-1")  # not committed yet: another connection does not see it
        session.rollback()
    assert not accounts.exists("cam-1")
    with sessions() as session:
        accounts.in_session(session).add_user("cam-1", "pw")
        session.commit()
    assert accounts.verify("cam-1", "pw")


def test_database_errors_are_broker_errors(accounts, engine):
    accounts.add_user("cam-1", "pw")
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE broker_accounts")
    with pytest.raises(BrokerAccountsError):
        accounts.add_user("cam-2", "pw")
    with pytest.raises(BrokerAccountsError):
        accounts.remove_user("cam-1")


def test_made_from_settings_with_the_session_factory(sessions):
    settings = ServerSettings(broker_accounts="http", broker_hook_token=SecretStr("t" * 32))
    made = make_broker_accounts(settings, sessions=sessions)
    assert isinstance(made, DatabaseAccounts)
    with pytest.raises(ValueError, match="session factory"):
        make_broker_accounts(settings)


# ---------------------------------------------------------------------- with the fleet's enrollment


def test_fleet_provisioning_and_revocation_write_accounts_in_their_transaction(accounts, sessions):
    with sessions() as session:
        creds, rekeyed = fleet.provision_many(
            session, accounts, [BulkDevice(f"cam-{i}") for i in range(3)], actor="admin", source="test")
    assert rekeyed == 0
    for c in creds:
        assert accounts.verify(c.mqtt_username, c.mqtt_password)
    with sessions() as session:
        one, _ = fleet.provision(session, accounts, device_id="cam-9", actor="admin", source="test")
    assert accounts.verify("cam-9", one.mqtt_password)
    with sessions() as session:
        again, _ = fleet.provision(session, accounts, device_id="cam-9", actor="admin", source="test")
    assert accounts.verify("cam-9", again.mqtt_password) and not accounts.verify("cam-9", one.mqtt_password)

    with sessions() as session:
        detail = fleet.revoke(session, accounts, device_id="cam-1", actor="admin", source="test")
    assert detail["broker_user_removed"] is True
    assert not accounts.verify("cam-1", creds[1].mqtt_password)
    assert accounts.users() == ["cam-0", "cam-2", "cam-9"]


def _fail_the_commit(session) -> None:
    """The commit's flush fails (a row the database refuses), as a real commit can: the session
    then needs a rollback, and nothing may be written through it before that."""
    def add_a_duplicate(sess):
        sess.add(Device(id="cam-0"))  # the primary key of a device that exists

    event.listen(session, "before_commit", add_a_duplicate)


def test_a_failed_commit_leaves_no_account_and_keeps_its_error(accounts, sessions):
    with sessions() as session:
        session.add(Device(id="cam-0"))
        session.commit()
    with sessions() as session, structlog.testing.capture_logs() as logs:
        _fail_the_commit(session)
        with pytest.raises(IntegrityError):  # the database's own error, not a broker one
            fleet.provision(session, accounts, device_id="cam-1", actor="admin", source="test")
        session.rollback()
    assert accounts.users() == []
    with sessions() as session, structlog.testing.capture_logs() as bulk_logs:
        _fail_the_commit(session)
        with pytest.raises(IntegrityError):
            fleet.provision_many(session, accounts, [BulkDevice("cam-1"), BulkDevice("cam-2")],
                                 actor="admin", source="test")
        session.rollback()
    assert accounts.users() == []
    with sessions() as session:
        assert session.scalars(select(Device.id)).all() == ["cam-0"]
    # The accounts rolled back with the devices: nothing to undo, so no undo was tried.
    assert not [e for e in logs + bulk_logs if e["event"].startswith("fleet.broker")], logs + bulk_logs

    # A revocation whose commit fails leaves the device enrolled, and so its account.
    with sessions() as session:
        creds, _ = fleet.provision(session, accounts, device_id="cam-5", actor="admin", source="test")
    with sessions() as session:
        _fail_the_commit(session)
        with pytest.raises(IntegrityError):
            fleet.revoke(session, accounts, device_id="cam-5", actor="admin", source="test")
        session.rollback()
    assert accounts.verify("cam-5", creds.mqtt_password)
