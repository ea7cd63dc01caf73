"""Bulk enrollment's pure parts: CSV/JSON parsing and validation (server.bulk_enroll), batching and
account checks (server.broker_accounts), the batched password file (BrokerUsers.add_users, no broker
running), and fleet.provision_many on an in-memory database with a fake of the accounts interface.
The real broker (password file and dynamic security) is in tests/integration/test_bulk_enrollment.py."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import sessionmaker

from server import fleet
from server.auth import Role, authenticate
from server.broker_accounts import Account, BrokerAccounts, PasswordFileAccounts, check_accounts, chunks
from server.bulk_enroll import BulkDevice, BulkInputError, parse_csv, parse_json, to_csv
from server.db.models import ApiToken, AuditEntry, Base, Device
from server.stack.mosquitto import BrokerUsers, hash_password


def test_csv_rows_with_groups_and_tags():
    text = "id,groups,tags\n# a comment\ncam-1,line-3;line-4,a b\n\ncam-2,,\ncam-3,\"x,y\",t1\n"
    assert parse_csv(text) == [
        BulkDevice("cam-1", ("line-3", "line-4"), ("a", "b")),
        BulkDevice("cam-2", (), ()),
        BulkDevice("cam-3", ("x", "y"), ("t1",)),
    ]


def test_csv_without_label_columns_leaves_labels_alone_and_accepts_device_id_header():
    assert parse_csv(b"\xef\xbb\xbfdevice_id\ncam-1\n") == [BulkDevice("cam-1", None, None)]


def test_csv_round_trips():
    devices = [BulkDevice("a1", ("g",), ("t", "u")), BulkDevice("a2", (), ())]
    assert parse_csv(to_csv(devices)) == devices


@pytest.mark.parametrize(("text", "message"), [
    ("id,groups\ncam-1,g\nCam-2,g\n", "line 3: invalid device id 'Cam-2'"),
    ("id,groups\ncam-1,g\n\ncam-1,h\n", "line 4: device 'cam-1' is also at line 2"),
    ("id,groups\ncam-1,bad/label\n", "line 2: invalid label 'bad/label' in groups"),
    ("id,groups\ncam-1,g,extra\n", "line 2: 3 cells, the header has 2"),
    ("name,groups\ncam-1,g\n", "line 1: the header names columns"),
    ("id,device_id\ncam-1,cam-1\n", "line 1: the header needs exactly one id"),
    ("id\n", "no devices given"),
    ("", "empty CSV"),
    ("id\ncam-1\0\n", "NUL"),
])
def test_bad_csv_names_the_row(text, message):
    with pytest.raises(BulkInputError) as err:
        parse_csv(text)
    assert message in str(err.value)


def test_too_many_labels_and_too_many_devices():
    many = ";".join(f"g{i}" for i in range(33))
    with pytest.raises(BulkInputError, match="line 2: 33 groups, at most 32"):
        parse_csv(f"id,groups\ncam-1,{many}\n")
    with pytest.raises(BulkInputError, match="3 devices in one call, at most 2"):
        parse_csv("id\na\nb\nc\n", max_devices=2)
    with pytest.raises(BulkInputError, match="3 devices in one call, at most 2"):
        parse_json({"devices": [{"device_id": x} for x in "abc"]}, max_devices=2)


def test_json_body_and_bare_list():
    body = json.dumps({"devices": [{"device_id": "cam-1", "groups": ["b", "a", "a"]}, {"id": "cam-2", "tags": []}]})
    assert parse_json(body) == [BulkDevice("cam-1", ("a", "b"), None), BulkDevice("cam-2", None, ())]
    assert parse_json([{"device_id": "cam-9"}]) == [BulkDevice("cam-9")]


@pytest.mark.parametrize(("body", "message"), [
    ({"devices": [{"device_id": "ok"}, {"device_id": "x" * 64}]}, "devices[1]: invalid device id"),
    ({"devices": [{"device_id": "ok", "colour": 1}]}, "devices[0]: unknown fields ['colour']"),
    ({"devices": [{"device_id": "ok", "groups": "g"}]}, "devices[0]: groups must be a list"),
    ({"devices": ["ok"]}, "devices[0]: each device is an object"),
    ({"devices": [{"device_id": "a"}, {"device_id": "a"}]}, "devices[1]: device 'a' is also at devices[0]"),
    ({"devices": []}, "no devices given"),
    ({"things": []}, "unknown fields"),
    ("[1,", "not JSON"),
    (b"\xff", "not UTF-8"),
])
def test_bad_json_names_the_row(body, message):
    with pytest.raises(BulkInputError) as err:
        parse_json(body)
    assert message in str(err.value)


def test_chunks_and_account_checks():
    assert [list(c) for c in chunks(list(range(5)), 2)] == [[0, 1], [2, 3], [4]]
    assert chunks([], 3) == []
    with pytest.raises(ValueError):
        chunks([1], 0)
    assert check_accounts([("cam-1", "pw")]) == [Account("cam-1", "pw")]
    for bad in ([("cam-1", "pw"), ("cam-1", "pw2")], [("_server", "pw")], [("cam-1", "a\nb")], [("cam-1", "")]):
        with pytest.raises(ValueError):
            check_accounts(bad)


def test_password_hash_is_mosquittos_pbkdf2_sha512():
    line = hash_password("secret", salt=b"\x01" * 12)
    kind, iterations, salt, digest = line.split("$")[1:]
    assert (kind, iterations) == ("7", "101") and base64.b64decode(salt) == b"\x01" * 12
    assert base64.b64decode(digest) == hashlib.pbkdf2_hmac("sha512", b"secret", b"\x01" * 12, 101)
    assert hash_password("secret") != hash_password("secret")  # a fresh salt each time


def test_batched_password_file_is_one_write_all_or_nothing(tmp_path):
    users = PasswordFileAccounts(tmp_path / "passwd")  # no pid file: nothing to reload
    assert isinstance(users, BrokerUsers) and isinstance(users, BrokerAccounts)
    users.add_users([(f"cam-{i}", f"pw-{i}") for i in range(100)])
    assert users.users() == sorted(f"cam-{i}" for i in range(100))
    before = (tmp_path / "passwd").read_text()
    with pytest.raises(ValueError, match="invalid device id"):
        users.add_users([("cam-200", "pw"), ("BAD", "pw")])
    assert (tmp_path / "passwd").read_text() == before  # nothing written
    users.add_users([("cam-1", "new")])  # re-key: the line is replaced, not added
    lines = (tmp_path / "passwd").read_text().splitlines()
    assert len(lines) == 100 and sum(line.startswith("cam-1:") for line in lines) == 1
    assert users.remove_users(["cam-1", "cam-2", "ghost"]) == 2
    assert len(users.users()) == 98
    with pytest.raises(ValueError):
        users.remove_users(["_edgeloop-server"])


class FakeAccounts:
    def __init__(self, fail: bool = False):
        self.users: dict[str, str] = {}
        self.batches = 0
        self.fail = fail

    def add_user(self, username, password):
        self.add_users([(username, password)])

    def remove_user(self, username):
        return self.remove_users([username]) == 1

    def add_users(self, accounts):
        if self.fail:
            raise RuntimeError("broker down")
        self.batches += 1
        self.users.update(dict(accounts))

    def remove_users(self, usernames):
        return sum(self.users.pop(u, None) is not None for u in usernames)


@pytest.fixture
def sessions():
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    yield sessionmaker(engine, expire_on_commit=False)
    engine.dispose()


def test_provision_many_is_one_batch_and_rekeys_existing(sessions):
    accounts = FakeAccounts()
    with sessions() as s:
        old, _ = fleet.provision(s, accounts, device_id="cam-0", actor="alice", source="t", groups=["keep"])
    devices = [BulkDevice("cam-0"), *(BulkDevice(f"cam-{i}", ("line-1",), ("x",)) for i in range(1, 1200))]
    batches = accounts.batches
    with sessions() as s:
        creds, rekeyed = fleet.provision_many(s, accounts, devices, actor="alice", source="10.0.0.1")
    assert accounts.batches == batches + 1 and rekeyed == 1 and len(creds) == 1200
    assert [c.device_id for c in creds] == [d.device_id for d in devices]
    assert all(accounts.users[c.device_id] == c.mqtt_password for c in creds)
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(Device)) == 1200
        assert s.get(Device, "cam-0").groups == ["keep"]  # None labels: the re-keyed device keeps its own
        assert s.get(Device, "cam-7").groups == ["line-1"] and s.get(Device, "cam-7").tags == ["x"]
        assert authenticate(s, old.api_token, None) is None  # the re-keyed device's old token stops working
        assert authenticate(s, creds[5].api_token, None).subject == "cam-5"
        live = s.scalar(select(func.count()).select_from(ApiToken).where(ApiToken.role == Role.DEVICE.value,
                                                                          ApiToken.revoked_at.is_(None)))
        assert live == 1200
        audits = s.scalars(select(AuditEntry.action).where(AuditEntry.detail["bulk"].as_boolean())).all()
        assert sorted(set(audits)) == ["device.provision", "device.rekey"] and len(audits) == 1200


def test_provision_many_leaves_nothing_when_the_broker_fails(sessions):
    accounts = FakeAccounts(fail=True)
    with sessions() as s, pytest.raises(fleet.FleetError) as err:
        fleet.provision_many(s, accounts, [BulkDevice("cam-1"), BulkDevice("cam-2")], actor="a", source="t")
    assert err.value.status == 503 and "nothing was changed" in err.value.reason
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(Device)) == 0
        assert s.scalar(select(func.count()).select_from(ApiToken)) == 0
    with sessions() as s, pytest.raises(fleet.FleetError) as err:
        fleet.provision_many(s, None, [BulkDevice("cam-1")], actor="a", source="t")
    assert err.value.status == 503
