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
- An HTTP/DB-backed authenticator (EMQX) would need nothing written at all: it would read the
  accounts the server keeps; it is not built yet.

Every method is all or nothing for its batch: names and passwords are checked first, and a
batch the broker refuses part of is undone.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, NamedTuple, Protocol, runtime_checkable

import structlog

from protocol.topics import TopicError, validate_device_id
from server.stack.mosquitto import BrokerUsers, _check_password

if TYPE_CHECKING:
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


class DynamicSecurityAccounts:
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

    def add_user(self, username: str, password: str) -> None:
        self.add_users([Account(username, password)])

    def remove_user(self, username: str) -> bool:
        return self.remove_users([username]) == 1

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


# ---------------------------------------------------------------------- from settings


def make_broker_accounts(settings: ServerSettings) -> BrokerAccounts | None:
    """The implementation ``settings.broker_accounts`` names; None when it cannot be configured
    (password file without a path), which makes enrollment answer 503."""
    kind = settings.broker_accounts
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
