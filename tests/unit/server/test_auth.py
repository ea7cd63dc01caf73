"""Roles, token hashing and authentication against the database."""

from __future__ import annotations

import hashlib

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from server.auth import Principal, Role, authenticate, hash_token, issue_token, new_token, revoke_tokens
from server.db.models import ApiToken, Base

LADDER = [Role.VIEWER, Role.OPERATOR, Role.ENGINEER, Role.ADMIN]


@pytest.fixture
def session():
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        yield s
    engine.dispose()


@pytest.mark.parametrize("holder", LADDER)
@pytest.mark.parametrize("needed", LADDER)
def test_at_least_follows_the_ladder(holder: Role, needed: Role) -> None:
    expected = LADDER.index(holder) >= LADDER.index(needed)
    assert Principal(holder, "alice").at_least(needed) is expected


@pytest.mark.parametrize("needed", LADDER)
def test_device_principal_is_not_at_least_any_human_role(needed: Role) -> None:
    assert not Principal(Role.DEVICE, "dev-1").at_least(needed)


@pytest.mark.parametrize("holder", [*LADDER, Role.DEVICE])
def test_nobody_is_at_least_a_device(holder: Role) -> None:
    assert Principal(holder, "x").at_least(Role.DEVICE) is False


def test_is_device() -> None:
    dev = Principal(Role.DEVICE, "dev-1")
    assert dev.is_device("dev-1")
    assert not dev.is_device("dev-2")
    # a human whose subject happens to equal a device id is not that device
    assert not Principal(Role.ADMIN, "dev-1").is_device("dev-1")


def test_hash_token_is_sha256_hex() -> None:
    assert hash_token("elt_abc") == hashlib.sha256(b"elt_abc").hexdigest()
    assert hash_token("a") != hash_token("b")
    assert len(hash_token("")) == 64


def test_new_tokens_are_prefixed_long_and_unique() -> None:
    tokens = {new_token() for _ in range(50)}
    assert len(tokens) == 50
    assert all(t.startswith("elt_") and len(t) >= 40 for t in tokens)


def test_issue_stores_only_the_hash_and_authenticates(session: Session) -> None:
    token = issue_token(session, Role.OPERATOR, "bob")
    session.commit()
    rows = session.scalars(select(ApiToken)).all()
    assert len(rows) == 1
    assert rows[0].token_hash == hash_token(token) and token not in rows[0].token_hash
    principal = authenticate(session, token, admin_token=None)
    assert principal == Principal(Role.OPERATOR, "bob")
    assert principal.role is Role.OPERATOR


def test_device_token_authenticates_as_device(session: Session) -> None:
    token = issue_token(session, Role.DEVICE, "dev-7")
    session.commit()
    principal = authenticate(session, token, admin_token="adm1n-secret")
    assert principal.is_device("dev-7")
    assert not principal.at_least(Role.VIEWER)


def test_unknown_token_is_refused(session: Session) -> None:
    issue_token(session, Role.ADMIN, "root")
    session.commit()
    assert authenticate(session, "elt_guess", admin_token=None) is None
    assert authenticate(session, "", admin_token=None) is None


def test_revoked_token_is_refused(session: Session) -> None:
    old = issue_token(session, Role.DEVICE, "dev-1")
    other = issue_token(session, Role.DEVICE, "dev-2")
    human = issue_token(session, Role.VIEWER, "dev-1")
    session.commit()
    assert revoke_tokens(session, "dev-1", Role.DEVICE) == 1
    session.commit()
    assert authenticate(session, old, None) is None
    assert authenticate(session, other, None) == Principal(Role.DEVICE, "dev-2")
    assert authenticate(session, human, None) == Principal(Role.VIEWER, "dev-1")
    # revoking again finds nothing left to revoke
    assert revoke_tokens(session, "dev-1", Role.DEVICE) == 0
    new = issue_token(session, Role.DEVICE, "dev-1")
    session.commit()
    assert authenticate(session, new, None) == Principal(Role.DEVICE, "dev-1")


def test_admin_token_is_compared_exactly(session: Session) -> None:
    secret = "s3cret-admin-token"
    assert authenticate(session, secret, secret) == Principal(Role.ADMIN, "admin")
    assert authenticate(session, secret + "x", secret) is None
    assert authenticate(session, secret[:-1], secret) is None
    assert authenticate(session, secret.upper(), secret) is None


@pytest.mark.parametrize("admin_token", [None, ""])
def test_no_admin_token_configured_means_no_admin_login(session: Session, admin_token) -> None:
    assert authenticate(session, "", admin_token) is None
    assert authenticate(session, "anything", admin_token) is None


def test_db_token_still_works_when_admin_token_is_set(session: Session) -> None:
    token = issue_token(session, Role.ENGINEER, "carol")
    session.commit()
    assert authenticate(session, token, "other-admin") == Principal(Role.ENGINEER, "carol")
