"""Broker accounts: how the server gives a device its MQTT identity, as an interface of its own.

A device's broker account is its device id as user name with a random password. Its topic
rights are not per account: they are the ``%u`` patterns of :func:`protocol.acl_patterns` (each
device writes only its own channels and reads only its own commands), with the broker forcing
the user name as client id. Creating or removing an account therefore never changes an ACL.

Implementations (``settings.broker_accounts`` picks one, :func:`make_broker_accounts` builds it):

- :class:`PasswordFileAccounts`: a Mosquitto password file plus a reload (SIGHUP), for the
  embedded broker (``edgeloop stack``) or any Mosquitto whose files the server can write. A
  batch is one file write and one reload, whatever its size.
- :class:`DynamicSecurityAccounts`: Mosquitto's dynamic-security plugin, administered over MQTT
  by publishing JSON commands to ``$CONTROL/dynamic-security/v1`` as an admin client, for a
  production Mosquitto the server cannot reach on disk. No reload, no file access. The broker
  keeps its ACL file with the ``%u`` patterns and the plugin's default ACL access denied, so
  its accounts' topic checks fall through to those patterns (the plugin in Mosquitto 2.0 has no
  ``%u`` of its own). Note: Mosquitto 2.0's plugin rewrites its whole JSON file after every
  command, so its cost per account grows with the number of accounts it holds.
- :class:`DatabaseAccounts`: rows of the server's own database (table ``broker_accounts``), for
  a broker that asks the server at every connect and publish/subscribe (EMQX's HTTP authenticator
  and authorizer, answered by server/api/broker_hooks.py). Nothing is written to the broker:
  enrollment writes the account in the same transaction as the device, a revocation deletes it,
  and the broker's next check sees either. A batch of any size is one transaction.

Every method is all or nothing for its batch: names and passwords are checked first, and a
batch the broker refuses part of is undone.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import threading
import uuid
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, NamedTuple, Protocol, runtime_checkable

import structlog
from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import SQLAlchemyError

from protocol.topics import TopicError, validate_device_id
from server.db.models import BrokerAccount, utcnow
from server.stack.mosquitto import BrokerUsers, _check_password

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from server.settings import ServerSettings

log = structlog.get_logger(__name__)

DYNSEC_TOPIC = "$CONTROL/dynamic-security/v1"
DYNSEC_RESPONSE_TOPIC = DYNSEC_TOPIC + "/response"


class Account(NamedTuple):
    username: str
    password: str


@runtime_checkable
class BrokerAccounts(Protocol):
    """Create, re-key and remove device accounts on the broker."""

    def add_user(self, username: str, password: str) -> None:
        """Create the account, or set a new password on an existing one (the old one stops working)."""

    def remove_user(self, username: str) -> bool:
        """Delete the account (a connected client is disconnected); whether it existed."""

    def add_users(self, accounts: Sequence[Account]) -> None:
        """``add_user`` for many accounts at once, all or nothing."""

    def remove_users(self, usernames: Sequence[str]) -> int:
        """``remove_user`` for many; how many existed."""


class _OneFromBatch:
    """``add_user``/``remove_user`` as batches of one (each implementation writes batches)."""

    def add_user(self, username: str, password: str) -> None:
        self.add_users([Account(username, password)])

    def remove_user(self, username: str) -> bool:
        return self.remove_users([username]) == 1


class BrokerAccountsError(RuntimeError):
    """The broker refused or did not answer an account change."""


def check_accounts(accounts: Iterable[tuple[str, str]]) -> list[Account]:
    """Device accounts, checked (ValueError naming the first bad or repeated one)."""
    checked: list[Account] = []
    seen: set[str] = set()
    for username, password in accounts:
        try:
            validate_device_id(username)
        except TopicError as exc:
            raise ValueError(str(exc)) from None
        _check_password(password)
        if username in seen:
            raise ValueError(f"device {username!r} is given twice")
        seen.add(username)
        checked.append(Account(username, password))
    return checked


def chunks(items: Sequence, size: int) -> list[Sequence]:
    """``items`` in consecutive slices of at most ``size``."""
    if size < 1:
        raise ValueError("chunk size must be at least 1")
    return [items[i:i + size] for i in range(0, len(items), size)]


# ---------------------------------------------------------------------- password file


class PasswordFileAccounts(BrokerUsers):
    """The password file of a Mosquitto the server shares a file system with (the embedded
    broker): ``add_user``/``remove_user`` as before (``mosquitto_passwd``, then a reload);
    ``add_users``/``remove_users`` hash in-process and write the file once, then reload once."""


# ---------------------------------------------------------------------- dynamic security


class DynamicSecurityAccounts(_OneFromBatch):
    """Accounts in Mosquitto's dynamic-security plugin, changed over MQTT as ``username``.

    The admin needs the plugin's admin role (``mosquitto_ctrl dynsec init`` creates one) and a
    user name of its own: with ``use_username_as_clientid`` a second connection under the
    server's user name would take the server's session over. One connection per call, and one
    call at a time per object (the admin's single session). Commands go in messages of
    ``chunk_size`` so that the broker, which runs them on its only thread, serves its clients
    between two messages.
    """

    def __init__(self, host: str, port: int, username: str, password: str, *, tls_ca: str | None = None,
                 chunk_size: int = 200, timeout: float = 120.0):
        self.host, self.port = host, int(port)
        self.username, self.password = username, password
        self.tls_ca = tls_ca
        self.chunk_size = int(chunk_size)
        self.timeout = float(timeout)
        self._lock = threading.Lock()

    # -- the interface ---------------------------------------------------------------

    def add_users(self, accounts: Sequence[tuple[str, str]]) -> None:
        checked = check_accounts(accounts)
        if not checked:
            return
        with self._lock, self._session() as session:
            created: list[str] = []
            existing: list[Account] = []
            try:
                for part in chunks(checked, self.chunk_size):
                    replies = session.run([_create(a) for a in part])
                    for account, reply in zip(part, replies, strict=True):
                        error = reply.get("error")
                        if error is None:
                            created.append(account.username)
                        elif error == "Client already exists":
                            existing.append(account)
                        else:
                            raise BrokerAccountsError(f"createClient {account.username}: {error}")
                # Re-key: delete (which disconnects a client still using the old password) and create.
                for part in chunks(existing, max(1, self.chunk_size // 2)):
                    commands = [c for a in part for c in ({"command": "deleteClient", "username": a.username},
                                                          _create(a))]
                    replies = session.run(commands)
                    for account, reply in zip(part, replies[1::2], strict=True):
                        if reply.get("error") is not None:
                            raise BrokerAccountsError(f"createClient {account.username}: {reply['error']}")
            except Exception:
                if created:
                    log.warning("broker_accounts.undo", created=len(created))
                    for part in chunks(created, self.chunk_size):
                        session.run([{"command": "deleteClient", "username": name} for name in part])
                raise

    def remove_users(self, usernames: Sequence[str]) -> int:
        names = list(dict.fromkeys(usernames))
        if not names:
            return 0
        removed = 0
        with self._lock, self._session() as session:
            for part in chunks(names, self.chunk_size):
                replies = session.run([{"command": "deleteClient", "username": name} for name in part])
                for name, reply in zip(part, replies, strict=True):
                    error = reply.get("error")
                    if error is None:
                        removed += 1
                    elif error != "Client not found":
                        raise BrokerAccountsError(f"deleteClient {name}: {error}")
        return removed

    def users(self) -> list[str]:
        """Every client the plugin holds (the admin included)."""
        with self._lock, self._session() as session:
            reply = session.run([{"command": "listClients", "verbose": False, "count": -1}])[0]
        if reply.get("error"):
            raise BrokerAccountsError(f"listClients: {reply['error']}")
        return sorted(reply.get("data", {}).get("clients", []))

    def _session(self) -> _DynsecSession:
        return _DynsecSession(self)


def _create(account: Account) -> dict:
    return {"command": "createClient", "username": account.username, "password": account.password}


class _DynsecSession:
    """One admin connection: subscribed to the response topic, one message of commands at a time."""

    def __init__(self, owner: DynamicSecurityAccounts):
        self.owner = owner
        self._cond = threading.Condition()
        self._replies: dict[str, list[dict]] = {}
        self._prefix = uuid.uuid4().hex[:12]
        self._seq = 0
        self._connected: object = None
        self._subscribed = False

    def __enter__(self) -> _DynsecSession:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        o = self.owner
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=o.username, protocol=mqtt.MQTTv5)
        client.username_pw_set(o.username, o.password)
        if o.tls_ca:
            client.tls_set(ca_certs=o.tls_ca)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self.client = client
        try:
            client.connect(o.host, o.port, keepalive=60)
        except OSError as exc:
            raise BrokerAccountsError(f"cannot reach the broker at {o.host}:{o.port}: {exc}") from None
        client.loop_start()
        with self._cond:
            if not self._cond.wait_for(lambda: self._connected is not None, 15.0):
                self._close()
                raise BrokerAccountsError("no CONNACK from the broker")
            if getattr(self._connected, "is_failure", False):
                self._close()
                raise BrokerAccountsError(f"the broker refused the accounts admin {o.username!r}: {self._connected}")
        client.subscribe(DYNSEC_RESPONSE_TOPIC, qos=1)
        with self._cond:
            if not self._cond.wait_for(lambda: self._subscribed, 15.0):
                self._close()
                raise BrokerAccountsError("no SUBACK for the dynamic-security response topic")
        return self

    def __exit__(self, *exc: object) -> None:
        self._close()

    def _close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()

    def _on_connect(self, _c, _u, _flags, reason_code, _props) -> None:
        with self._cond:
            self._connected = reason_code
            self._cond.notify_all()

    def _on_subscribe(self, _c, _u, _mid, reason_codes, _props) -> None:
        with self._cond:
            self._subscribed = not any(rc.is_failure for rc in reason_codes)
            self._cond.notify_all()

    def _on_message(self, _c, _u, message) -> None:
        try:
            responses = json.loads(message.payload).get("responses", [])
        except (ValueError, AttributeError):
            return
        with self._cond:
            for reply in responses:
                tag = str(reply.get("correlationData", ""))
                if tag.startswith(self._prefix + ":"):
                    self._replies.setdefault(tag.rsplit(":", 1)[0], []).append(reply)
            self._cond.notify_all()

    def run(self, commands: list[dict]) -> list[dict]:
        """Send ``commands`` in one message; their replies, in the same order."""
        self._seq += 1
        batch = f"{self._prefix}:{self._seq}"
        tagged = [{**command, "correlationData": f"{batch}:{i}"} for i, command in enumerate(commands)]
        info = self.client.publish(DYNSEC_TOPIC, json.dumps({"commands": tagged}), qos=1)
        if info.rc != 0:
            raise BrokerAccountsError(f"cannot publish to {DYNSEC_TOPIC} (paho rc {info.rc})")
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._replies.get(batch, [])) >= len(commands),
                                       self.owner.timeout):
                raise BrokerAccountsError(f"the dynamic-security plugin did not answer {len(commands)} commands "
                                          f"within {self.owner.timeout:.0f} s (is it loaded, and may "
                                          f"{self.owner.username!r} publish to {DYNSEC_TOPIC}?)")
            replies = self._replies.pop(batch)
        replies.sort(key=lambda r: int(str(r["correlationData"]).rsplit(":", 1)[1]))
        return replies


# ---------------------------------------------------------------------- database (EMQX HTTP hooks)

# Salted SHA-256, not a slow hash (PBKDF2, bcrypt, argon2), and on purpose: a slow hash protects
# passwords people choose, which can be guessed; these are random tokens the server generates
# (secrets.token_urlsafe(24): 192 bits), which no dictionary or brute force reaches whatever the
# hash. A slow hash would instead cost CPU at every connect: the broker asks at each (re)connect,
# and 10,000 devices coming back after a broker restart would ask within seconds.
_SALT_BYTES = 16
_LOOKUP_CHUNK = 500  # usernames per IN (...): under SQLite's bound-parameter limit


def _digest(salt_hex: str, password: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt_hex) + password.encode("utf-8")).hexdigest()


_UNKNOWN_SALT = "00" * _SALT_BYTES


class DatabaseAccounts(_OneFromBatch):
    """Device accounts as rows of ``broker_accounts`` in the server's database.

    ``DatabaseAccounts(sessions)`` runs each call in a transaction of its own. Enrollment, which
    holds a transaction of its own already (the device row, its API token), uses
    :meth:`in_session`: the same interface inside the caller's transaction, so the account
    commits or rolls back with the device (``transactional``: there is nothing to undo after a
    failed commit) and, on SQLite, no second writer waits for the lock the first one holds."""

    transactional = False

    def __init__(self, sessions: sessionmaker[Session]):
        self._sessions = sessions

    def in_session(self, session: Session) -> SessionAccounts:
        return SessionAccounts(session)

    # -- the interface ---------------------------------------------------------------

    def add_users(self, accounts: Sequence[tuple[str, str]]) -> None:
        checked = check_accounts(accounts)
        if not checked:
            return
        try:
            with self._sessions() as session, session.begin():
                SessionAccounts(session).add_users(checked)
        except SQLAlchemyError as exc:  # the commit (a concurrent insert of the same name)
            raise BrokerAccountsError(f"cannot write {len(checked)} broker accounts: {exc}") from exc

    def remove_users(self, usernames: Sequence[str]) -> int:
        try:
            with self._sessions() as session, session.begin():
                return SessionAccounts(session).remove_users(usernames)
        except SQLAlchemyError as exc:
            raise BrokerAccountsError(f"cannot remove broker accounts: {exc}") from exc

    # -- what the hooks ask ------------------------------------------------------------

    def verify(self, username: str, password: str) -> bool:
        """Whether ``username`` has an account and ``password`` is its password."""
        try:
            validate_device_id(username)
        except TopicError:
            return False
        with self._sessions() as session:
            row = session.get(BrokerAccount, username)
            salt, stored = (row.salt, row.password_hash) if row is not None else (_UNKNOWN_SALT, "")
        # Hashed and compared either way, so that an unknown name takes as long as a wrong password.
        return hmac.compare_digest(_digest(salt, password), stored) and row is not None

    def exists(self, username: str) -> bool:
        try:
            validate_device_id(username)
        except TopicError:
            return False
        with self._sessions() as session:
            return session.scalar(select(BrokerAccount.username).where(BrokerAccount.username == username)) \
                is not None

    def users(self) -> list[str]:
        with self._sessions() as session:
            return list(session.scalars(select(BrokerAccount.username).order_by(BrokerAccount.username)))


class SessionAccounts(_OneFromBatch):
    """:class:`DatabaseAccounts` inside a caller's transaction: flushed, never committed here."""

    transactional = True

    def __init__(self, session: Session):
        self.session = session

    def add_users(self, accounts: Sequence[tuple[str, str]]) -> None:
        """Create or re-key every account: one bulk INSERT for the new ones and one bulk UPDATE
        (by primary key) for the existing ones, whatever the number; no ORM object per row."""
        checked = check_accounts(accounts)
        if not checked:
            return
        now = utcnow()
        rows = []
        for account in checked:
            salt = secrets.token_hex(_SALT_BYTES)
            rows.append({"username": account.username, "password_hash": _digest(salt, account.password),
                         "salt": salt, "updated_at": now})
        try:
            existing: set[str] = set()
            for part in chunks([r["username"] for r in rows], _LOOKUP_CHUNK):
                existing.update(self.session.scalars(
                    select(BrokerAccount.username).where(BrokerAccount.username.in_(list(part)))))
            new = [{**r, "created_at": now} for r in rows if r["username"] not in existing]
            rekeyed = [r for r in rows if r["username"] in existing]
            if new:
                self.session.execute(insert(BrokerAccount), new)
            if rekeyed:
                self.session.execute(update(BrokerAccount), rekeyed)
        except SQLAlchemyError as exc:
            raise BrokerAccountsError(f"cannot write {len(rows)} broker accounts: {exc}") from exc

    def remove_users(self, usernames: Sequence[str]) -> int:
        names = list(dict.fromkeys(usernames))
        removed = 0
        try:
            for part in chunks(names, _LOOKUP_CHUNK):
                result = self.session.execute(
                    delete(BrokerAccount).where(BrokerAccount.username.in_(list(part)))
                    .execution_options(synchronize_session=False))
                removed += result.rowcount
        except SQLAlchemyError as exc:
            raise BrokerAccountsError(f"cannot remove {len(names)} broker accounts: {exc}") from exc
        return removed


# ---------------------------------------------------------------------- from settings


def make_broker_accounts(settings: ServerSettings, *,
                         sessions: sessionmaker[Session] | None = None) -> BrokerAccounts | None:
    """The implementation ``settings.broker_accounts`` names; None when it cannot be configured
    (password file without a path), which makes enrollment answer 503. ``sessions``: the server
    database's session factory, where ``http`` keeps the accounts."""
    kind = settings.broker_accounts
    if kind == "http":
        if sessions is None:
            raise ValueError("broker_accounts=http keeps the accounts in the server's database: "
                             "make_broker_accounts needs its session factory")
        if settings.broker_hook_token is None or not settings.broker_hook_token.get_secret_value():
            log.warning("broker_accounts.no_hook_token",
                        hint="set EDGELOOP_BROKER_HOOK_TOKEN: until then the broker hook routes answer 503")
        return DatabaseAccounts(sessions)
    if kind == "dynamic_security":
        password = settings.mqtt_dynsec_password.get_secret_value() if settings.mqtt_dynsec_password else ""
        if not password:
            raise ValueError("broker_accounts=dynamic_security needs EDGELOOP_MQTT_DYNSEC_PASSWORD "
                             "(the plugin admin's password)")
        return DynamicSecurityAccounts(settings.mqtt_host, settings.mqtt_port, settings.mqtt_dynsec_username,
                                       password, tls_ca=str(settings.mqtt_tls_ca) if settings.mqtt_tls_ca else None)
    if settings.mqtt_password_file is None:
        return None
    return PasswordFileAccounts(settings.mqtt_password_file, settings.mqtt_broker_pid_file,
                                log_file=settings.mqtt_broker_log_file)
