"""A Mosquitto broker with a generated configuration: password file, pattern ACL, one plain
listener and optionally a TLS listener beside it (:class:`BrokerTls`).

Devices authenticate with their device id as user name; the broker forces the user
name as client id (``use_username_as_clientid``, on every listener) and the ACL patterns from
:func:`protocol.acl_patterns` use ``%u``, so a device can publish only under its own
id and read only its own commands whatever client id it asks for. Server users get
``readwrite`` on the whole topic tree.

Because the user name is the client id, each user can hold one connection at a time:
a second connection with the same user name takes the first one's session over. Give
every server process its own user (``add_user(name, password, server=True)``).

Server user names start with ``_``, which :func:`protocol.validate_device_id` never
accepts, so no device id can ever collide with a server user.

The TLS listener keeps the same password authentication and ``%u`` ACL (the certificate
identity is not used as user name); with ``require_certificate`` a client must in addition
present a certificate signed by the listener's CA.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import glob
import hashlib
import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol.topics import TOPIC_ROOT, TopicError, acl_patterns, validate_device_id
from server.stack import _proc
from server.stack.errors import ServiceError
from server.stack.ports import DEFAULT_HOST, find_free_port, port_is_free, wait_for_port, wait_until

INSTALL_HINT = "install it with `apt-get install -y mosquitto` (Debian/Ubuntu)"
SERVER_USERNAME = "_edgeloop-server"
SERVER_USER_PREFIX = "_"
DEFAULT_MAX_PACKET_SIZE = 1024 * 1024
BROKER_USER = "mosquitto"  # the account Mosquitto switches to when started as root
_RELOAD_LINE = "Reloading config"

CONFIG_NAME = "mosquitto.conf"
PASSWORD_NAME = "passwd"
ACL_NAME = "acl"
LOG_NAME = "mosquitto.log"
STDERR_NAME = "mosquitto.stderr.log"
PID_NAME = "mosquitto.pid"
SERVER_USERS_NAME = "server-users.json"
DATA_NAME = "data"
TLS_NAME = "tls"
DYNSEC_NAME = "dynamic-security.json"
DYNSEC_ADMIN_USERNAME = "_edgeloop-accounts"
DYNSEC_PLUGIN_NAME = "mosquitto_dynamic_security.so"
# Mosquitto 2.0's own password hash: PBKDF2-SHA512, 101 iterations, 12-byte salt ("$7$", as
# mosquitto_passwd writes it), so a batch is hashed here and written in one go.
PW_ITERATIONS = 101
PW_SALT_BYTES = 12


@dataclass(frozen=True)
class BrokerTls:
    """A TLS listener: ``ca_file`` verifies client certificates, ``cert_file``/``key_file`` are
    the broker's own. ``port=None`` picks a free one. TLS 1.2 is the minimum."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    require_certificate: bool = False
    port: int | None = None


@dataclass(frozen=True)
class TlsListener:
    """A TLS listener as rendered into the config (paths as the broker reads them)."""

    port: int
    ca_file: Path
    cert_file: Path
    key_file: Path
    require_certificate: bool = False


def server_topic_filter() -> str:
    """The filter server users may read and write: everything under the project's root."""
    return TOPIC_ROOT.split("/", 1)[0] + "/#"


# Per client, global (per_listener_settings false): see render_config; deploy/k8s/broker.yaml and
# deploy/mosquitto/mosquitto.conf carry the same lines (tests/unit/stack/test_stack_config.py).
QUEUE_SETTINGS = ("max_inflight_messages 1000", "max_queued_messages 250000", "max_queued_bytes 536870912")


def _listener_lines(host: str, port: int) -> list[str]:
    """A listener's opening lines. ``use_username_as_clientid`` is a setting of each listener in
    Mosquitto 2 (even with ``per_listener_settings false``): it must follow every ``listener``
    line, or clients of a listener without it keep the client id they ask for (a device could
    take another device's session over)."""
    return [
        f"listener {int(port)} {host}",
        "protocol mqtt",
        # Identify clients by their user name: %c in ACLs would be spoofable, and a client id
        # of another user's would take that user's session over.
        "use_username_as_clientid true",
    ]


def render_config(
    *,
    host: str,
    port: int,
    password_file: Path,
    acl_file: Path,
    persistence_dir: Path,
    log_file: Path,
    max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
    run_as: str | None = None,
    tls_listener: TlsListener | None = None,
    dynsec_plugin: Path | None = None,
    dynsec_config: Path | None = None,
) -> str:
    """The broker configuration (pure: no files touched). With ``dynsec_plugin`` the
    dynamic-security plugin is loaded beside the password and ACL files: accounts it knows
    authenticate there, and (its default ACL access all denied) their topic checks fall through
    to the same ``%u`` patterns of the ACL file (Mosquitto 2.0's plugin has no ``%u``)."""
    lines = [
        "# Generated by edgeloop (server/stack/mosquitto.py); rewritten on every start.",
        "per_listener_settings false",
        # Nothing may come before the first listener that is a setting of a listener: Mosquitto 2
        # would give it to its default listener, which then also opens on port 1883 everywhere.
        *_listener_lines(host, port),
        # Global settings (per_listener_settings false): they hold for every listener.
        "allow_anonymous false",
        f"password_file {password_file}",
        f"acl_file {acl_file}",
        f"max_packet_size {int(max_packet_size)}",
        # The server acknowledges device events once handled and may fall behind under a burst
        # (every device of a wave reporting at once): Mosquitto's defaults (20 in flight, then
        # 1,000 queued per client, then dropped) dropped QoS 1 events to it at 10,000 devices
        # (benchmarks/fleet.py). A device gets a few commands at most; these bound the server's
        # backlog at ~2 minutes of a 10,000-device fleet's traffic, and memory at 512 MiB.
        *QUEUE_SETTINGS,
        "persistence true",
        f"persistence_location {str(persistence_dir).rstrip('/')}/",
        "persistence_file mosquitto.db",
        "autosave_interval 60",
        f"log_dest file {log_file}",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "log_timestamp true",
        "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        "connection_messages true",
    ]
    if run_as:
        lines.append(f"user {run_as}")
    if dynsec_plugin is not None:
        lines += [f"plugin {dynsec_plugin}", f"plugin_opt_config_file {dynsec_config}"]
    if tls_listener is not None:
        # per_listener_settings false: authentication and ACL above apply here too.
        lines += [
            *_listener_lines(host, tls_listener.port),
            f"cafile {tls_listener.ca_file}",
            f"certfile {tls_listener.cert_file}",
            f"keyfile {tls_listener.key_file}",
            "tls_version tlsv1.2",  # Mosquitto 2: the minimum version
            f"require_certificate {'true' if tls_listener.require_certificate else 'false'}",
            "use_identity_as_username false",
        ]
    return "\n".join(lines) + "\n"


def render_acl(server_users: Iterable[str] = (SERVER_USERNAME,)) -> str:
    """The ACL file: device patterns first (they apply to every user), then the server users."""
    lines = [
        "# Generated by edgeloop (server/stack/mosquitto.py).",
        "# Devices (user name = device id): write own device channels, read own commands.",
        *acl_patterns(),
    ]
    for user in sorted(set(server_users)):
        check_server_username(user)
        lines += ["", f"user {user}", f"topic readwrite {server_topic_filter()}"]
    return "\n".join(lines) + "\n"


def check_server_username(username: str) -> str:
    if (
        not isinstance(username, str)
        or not username.startswith(SERVER_USER_PREFIX)
        or len(username) < 2
        or len(username) > 64
        or any(ch.isspace() or ch in ":#+/" or not ch.isprintable() for ch in username)
    ):
        raise ValueError(
            f"invalid server user name {username!r}: it must start with {SERVER_USER_PREFIX!r} "
            "(so that no device id can take it) and have no spaces, ':', '/', '#' or '+'"
        )
    return username


def _check_password(password: str) -> str:
    if not isinstance(password, str) or not password or any(ch in password for ch in "\r\n\0"):
        raise ValueError("a broker password must be a non-empty single line")
    return password


def hash_password(password: str, *, salt: bytes | None = None, iterations: int = PW_ITERATIONS) -> str:
    """A password-file hash as ``mosquitto_passwd`` (2.0) writes it: ``$7$iterations$salt$hash``."""
    salt = salt if salt is not None else os.urandom(PW_SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", _check_password(password).encode("utf-8"), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def find_dynsec_plugin() -> Path | None:
    """Where Debian's (or a local build's) dynamic-security plugin is, if installed."""
    for pattern in ("/usr/lib/*/" + DYNSEC_PLUGIN_NAME, "/usr/lib/" + DYNSEC_PLUGIN_NAME,
                    "/usr/local/lib/" + DYNSEC_PLUGIN_NAME, "/usr/local/lib/*/" + DYNSEC_PLUGIN_NAME):
        for found in sorted(glob.glob(pattern)):
            return Path(found)
    return None


def _broker_account() -> tuple[str, int, int] | None:
    """(name, uid, gid) that Mosquitto will run as after dropping root, or None if we are not root."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(BROKER_USER)
    except KeyError:
        raise ServiceError(
            f"running as root but there is no {BROKER_USER!r} user for Mosquitto to switch to; "
            f"{INSTALL_HINT} (the package creates it) or run as a non-root user"
        ) from None
    return entry.pw_name, entry.pw_uid, entry.pw_gid


def _unreachable_ancestor(path: Path, name: str, uid: int, gid: int) -> Path | None:
    """The first ancestor of ``path`` that user ``name`` cannot traverse, if any."""
    groups = set(os.getgrouplist(name, gid))
    for folder in reversed(path.resolve().parents):
        st = folder.stat()
        if st.st_uid == uid:
            bit = stat.S_IXUSR
        elif st.st_gid in groups:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return folder
    return None


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    os.chown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            with contextlib.suppress(FileNotFoundError):
                os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)


def _device_entries(accounts: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Checked password-file lines for device accounts (ValueError naming the first bad one)."""
    entries: dict[str, str] = {}
    for username, password in accounts:
        try:
            validate_device_id(username)
        except TopicError as exc:
            raise ValueError(str(exc)) from None
        if username in entries:
            raise ValueError(f"device {username!r} is given twice")
        entries[username] = f"{username}:{hash_password(password)}"
    return entries


class BrokerUsers:
    """Adds and removes broker users in a Mosquitto password file and makes the running
    broker reload it (SIGHUP). The server uses this with the paths from
    ``EDGELOOP_MQTT_PASSWORD_FILE`` / ``EDGELOOP_MQTT_BROKER_PID_FILE``.

    Changes are serialised with an advisory lock beside the password file. When run as
    root, the files are handed back to the ``mosquitto`` user the broker runs as.
    """

    def __init__(self, password_file: Path, pid_file: Path | None = None, *, log_file: Path | None = None):
        self.password_file = Path(password_file)
        self.pid_file = Path(pid_file) if pid_file else None
        self.log_file = Path(log_file) if log_file else None

    @property
    def server_users_file(self) -> Path:
        return self.password_file.parent / SERVER_USERS_NAME

    @property
    def acl_file(self) -> Path:
        return self.password_file.parent / ACL_NAME

    # -- queries ---------------------------------------------------------------------

    def users(self) -> list[str]:
        """User names in the password file."""
        try:
            text = self.password_file.read_text()
        except FileNotFoundError:
            return []
        return sorted(line.split(":", 1)[0] for line in text.splitlines() if ":" in line)

    def server_users(self) -> list[str]:
        try:
            return sorted(json.loads(self.server_users_file.read_text()))
        except FileNotFoundError:
            return []

    # -- changes ---------------------------------------------------------------------

    def add_user(self, username: str, password: str, *, server: bool = False, reload: bool = True) -> None:
        """Create or update a user. Device users must be valid device ids; server users
        start with ``_`` and get read/write on the whole tree."""
        _check_password(password)
        with self._locked():
            server_users = set(self.server_users())
            if server:
                check_server_username(username)
                if username not in server_users:
                    server_users.add(username)
                    self._write_server_users(server_users)
            else:
                try:
                    validate_device_id(username)
                except TopicError as exc:
                    raise ValueError(str(exc)) from None
            self._passwd(username, password)
        if reload:
            self.reload()

    def remove_user(self, username: str, *, reload: bool = True) -> bool:
        """Delete a user; returns whether it existed. Mosquitto disconnects a connected
        client whose user disappeared when it reloads."""
        with self._locked():
            existed = username in self.users()
            if existed:
                self._run_passwd(["-D", str(self.password_file), username])
            server_users = set(self.server_users())
            if username in server_users:
                server_users.discard(username)
                self._write_server_users(server_users)
            self._fix_owner()
        if reload and existed:
            self.reload()
        return existed

    def add_users(self, accounts: Iterable[tuple[str, str]], *, reload: bool = True) -> None:
        """Create or update many device users with one password-file write and one reload.
        All or nothing: every name and password is checked before the file is touched."""
        entries = _device_entries(accounts)
        if not entries:
            return
        with self._locked():
            table = self._entries()
            table.update(entries)
            self._write_entries(table)
        if reload:
            self.reload()

    def remove_users(self, usernames: Iterable[str], *, reload: bool = True) -> int:
        """Delete many device users (one write, one reload); returns how many existed."""
        names = set(usernames)
        for name in names:
            if name.startswith(SERVER_USER_PREFIX):
                raise ValueError(f"remove_users removes device users only, not {name!r}")
        with self._locked():
            table = self._entries()
            removed = [name for name in names if table.pop(name, None) is not None]
            if removed:
                self._write_entries(table)
        if reload and removed:
            self.reload()
        return len(removed)

    def reload(self, timeout: float = 5.0) -> None:
        """SIGHUP the broker so it re-reads the password and ACL files; when the log is
        known, wait until the broker logged the reload (it is single-threaded, so any
        connection made after that sees the new users)."""
        pid = self._pid()
        if pid is None:
            return  # not running: the files are read at start
        before = self._reload_count()
        try:
            os.kill(pid, signal.SIGHUP)
        except ProcessLookupError:
            return
        if before is None:
            time.sleep(0.2)
            return
        wait_until(
            lambda: (self._reload_count() or 0) > before,
            timeout,
            what="waiting for Mosquitto to reload its password and ACL files",
            alive=lambda: _proc.pid_alive(pid),
        )

    # -- internals -------------------------------------------------------------------

    def _pid(self) -> int | None:
        if self.pid_file is None:
            return None
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid if _proc.pid_alive(pid) else None

    def _reload_count(self) -> int | None:
        if self.log_file is None:
            return None
        try:
            with self.log_file.open("rb") as fh:
                return fh.read().count(_RELOAD_LINE.encode())
        except FileNotFoundError:
            return 0

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.password_file.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.password_file.parent / (self.password_file.name + ".lock")
        with open(lock_path, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _entries(self) -> dict[str, str]:
        """The password file as user name -> whole line, in file order."""
        try:
            text = self.password_file.read_text()
        except FileNotFoundError:
            return {}
        return {line.split(":", 1)[0]: line for line in text.splitlines() if ":" in line}

    def _write_entries(self, table: dict[str, str]) -> None:
        _proc.write_private(self.password_file, "".join(line + "\n" for line in table.values()))
        self._fix_owner()

    def _passwd(self, username: str, password: str) -> None:
        args = ["-b", str(self.password_file), username, password]
        if not self.password_file.exists():
            args.insert(0, "-c")
        self._run_passwd(args)
        self._fix_owner()

    def _run_passwd(self, args: list[str]) -> None:
        binary = _proc.find_binary("mosquitto_passwd")
        if binary is None:
            raise ServiceError(f"`mosquitto_passwd` not found: {INSTALL_HINT}")
        # Note: -b takes the password on the command line (visible to local users for
        # the few milliseconds the tool runs); mosquitto_passwd has no stdin batch mode.
        proc = subprocess.run([binary, *args], capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            detail = (proc.stderr or proc.stdout).strip()
            raise ServiceError(f"mosquitto_passwd {args[0]} failed ({proc.returncode}): {detail}")

    def _write_server_users(self, users: set[str]) -> None:
        _proc.write_private(self.server_users_file, json.dumps(sorted(users)) + "\n")
        _proc.write_private(self.acl_file, render_acl(users))
        self._fix_owner()

    def _fix_owner(self) -> None:
        account = _broker_account()
        if account is None:
            return
        _, uid, gid = account
        for path in (self.password_file, self.acl_file, self.server_users_file):
            with contextlib.suppress(FileNotFoundError):
                os.chown(path, uid, gid)
                os.chmod(path, 0o600)


class MosquittoBroker:
    """A Mosquitto process with its configuration, users, persistence and log in ``workdir``.

    ``start()`` generates the files, starts the broker and waits until the port accepts
    connections; ``stop()`` ends it. ``attach(state)`` rebuilds a handle from
    :meth:`state` (saved by ``edgeloop stack up``) to stop a broker another process started.
    """

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        host: str = DEFAULT_HOST,
        *,
        server_username: str = SERVER_USERNAME,
        server_password: str | None = None,
        max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
        tls: BrokerTls | None = None,
        dynamic_security: bool = False,
        dynsec_password: str | None = None,
    ):
        self.workdir = Path(workdir).absolute()
        # With the dynamic-security plugin loaded, accounts can also be managed through it
        # (server.broker_accounts.DynamicSecurityAccounts) as DYNSEC_ADMIN_USERNAME.
        self.dynamic_security = bool(dynamic_security)
        self.dynsec_username = DYNSEC_ADMIN_USERNAME
        self.dynsec_password = _check_password(dynsec_password) if dynsec_password else _proc.random_secret()
        self.host = host
        self._port = port
        self._port_fixed = port is not None
        self.tls = tls
        self._tls_port = tls.port if tls else None
        self.server_username = check_server_username(server_username)
        self.server_password = _check_password(server_password) if server_password else _proc.random_secret()
        self.max_packet_size = int(max_packet_size)
        self._popen: subprocess.Popen | None = None
        self._pid: int | None = None
        self.users_admin = BrokerUsers(self.password_file, self.pid_file, log_file=self.log_file)

    # -- paths and properties --------------------------------------------------------

    @property
    def config_file(self) -> Path:
        return self.workdir / CONFIG_NAME

    @property
    def password_file(self) -> Path:
        return self.workdir / PASSWORD_NAME

    @property
    def acl_file(self) -> Path:
        return self.workdir / ACL_NAME

    @property
    def log_file(self) -> Path:
        return self.workdir / LOG_NAME

    @property
    def stderr_file(self) -> Path:
        return self.workdir / STDERR_NAME

    @property
    def pid_file(self) -> Path:
        return self.workdir / PID_NAME

    @property
    def data_dir(self) -> Path:
        return self.workdir / DATA_NAME

    @property
    def dynsec_file(self) -> Path:
        return self.workdir / DYNSEC_NAME

    @property
    def port(self) -> int:
        if self._port is None:
            raise ServiceError("the broker has no port yet: start() it first")
        return self._port

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def running(self) -> bool:
        if self._popen is not None:
            return self._popen.poll() is None
        return _proc.pid_matches(self._pid, str(self.config_file))

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def tls_dir(self) -> Path:
        return self.workdir / TLS_NAME

    @property
    def tls_port(self) -> int:
        if self.tls is None:
            raise ServiceError("this broker has no TLS listener")
        if self._tls_port is None:
            raise ServiceError("the broker has no TLS port yet: start() it first")
        return self._tls_port

    @property
    def tls_url(self) -> str:
        return f"mqtts://{self.host}:{self.tls_port}"

    # -- configuration ---------------------------------------------------------------

    def config_text(self) -> str:
        account = _broker_account()
        return render_config(
            host=self.host,
            port=self.port,
            password_file=self.password_file,
            acl_file=self.acl_file,
            persistence_dir=self.data_dir,
            log_file=self.log_file,
            max_packet_size=self.max_packet_size,
            run_as=account[0] if account else None,
            tls_listener=self._tls_listener(),
            dynsec_plugin=self._dynsec_plugin() if self.dynamic_security else None,
            dynsec_config=self.dynsec_file if self.dynamic_security else None,
        )

    def _dynsec_plugin(self) -> Path:
        plugin = find_dynsec_plugin()
        if plugin is None:
            raise ServiceError(f"Mosquitto's {DYNSEC_PLUGIN_NAME} not found: {INSTALL_HINT}")
        return plugin

    def _write_dynsec_config(self) -> None:
        """A fresh plugin configuration (kept across restarts: it holds the accounts) with the
        admin client, and every default ACL access denied, so that device topic checks fall
        through to the ACL file's ``%u`` patterns."""
        if self.dynsec_file.exists():
            return
        ctrl = _proc.find_binary("mosquitto_ctrl")
        if ctrl is None:
            raise ServiceError(f"`mosquitto_ctrl` not found: {INSTALL_HINT}")
        proc = subprocess.run([ctrl, "dynsec", "init", str(self.dynsec_file), self.dynsec_username,
                               self.dynsec_password], capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            raise ServiceError(f"mosquitto_ctrl dynsec init failed: {(proc.stderr or proc.stdout).strip()}")
        config = json.loads(self.dynsec_file.read_text())
        config["defaultACLAccess"] = {key: False for key in config.get("defaultACLAccess", {})} or {
            "publishClientSend": False, "publishClientReceive": False, "subscribe": False, "unsubscribe": False}
        _proc.write_private(self.dynsec_file, json.dumps(config, indent=2) + "\n")

    def _tls_listener(self) -> TlsListener | None:
        if self.tls is None:
            return None
        # The broker reads copies inside its own folder: after dropping root it may not
        # reach the originals.
        return TlsListener(self.tls_port, self.tls_dir / "ca.crt", self.tls_dir / "server.crt",
                           self.tls_dir / "server.key", self.tls.require_certificate)

    def write_config(self) -> None:
        """Write config, ACL and the server user (no process is started)."""
        account = _broker_account()
        self.workdir.mkdir(parents=True, exist_ok=True)
        if account is not None:
            name, uid, gid = account
            blocked = _unreachable_ancestor(self.workdir, name, uid, gid)
            if blocked is not None:
                raise ServiceError(
                    f"Mosquitto drops root privileges to the {name!r} user, which cannot reach "
                    f"{self.workdir} ({blocked} is not searchable by it); use a broker folder "
                    "outside it (e.g. under /tmp or /var/lib) or run as a non-root user"
                )
        self.data_dir.mkdir(exist_ok=True)
        if self.tls is not None:
            self.tls_dir.mkdir(exist_ok=True)
            for source, name in ((self.tls.ca_file, "ca.crt"), (self.tls.cert_file, "server.crt"),
                                 (self.tls.key_file, "server.key")):
                shutil.copyfile(source, self.tls_dir / name)
                os.chmod(self.tls_dir / name, 0o600)
        if self.dynamic_security:
            self._write_dynsec_config()
        _proc.write_private(self.config_file, self.config_text())
        server_users = set(self.users_admin.server_users()) | {self.server_username}
        _proc.write_private(self.users_admin.server_users_file, json.dumps(sorted(server_users)) + "\n")
        _proc.write_private(self.acl_file, render_acl(server_users))
        self.users_admin.add_user(self.server_username, self.server_password, server=True, reload=False)
        if account is not None:
            _chown_tree(self.workdir, account[1], account[2])
            os.chmod(self.workdir, 0o700)

    # -- lifecycle -------------------------------------------------------------------

    def start(self, *, detach: bool = False, timeout: float = 15.0) -> None:
        """Start the broker and wait until its port accepts connections.

        ``detach=True`` leaves it running after this Python process exits (its own
        session, no exit hook); otherwise it is stopped at interpreter exit at the latest.
        """
        if self.running:
            raise ServiceError(f"Mosquitto already running (pid {self._pid}) on {self.host}:{self._port}")
        binary = _proc.find_binary("mosquitto")
        if binary is None:
            raise ServiceError(f"`mosquitto` not found: {INSTALL_HINT}")
        if _proc.find_binary("mosquitto_passwd") is None:
            raise ServiceError(f"`mosquitto_passwd` not found: {INSTALL_HINT}")
        tls_port_fixed = self.tls is not None and self.tls.port is not None
        attempts = 1 if self._port_fixed and (self.tls is None or tls_port_fixed) else 3
        for attempt in range(attempts):
            if self._port is None or (not self._port_fixed and not port_is_free(self._port, self.host)):
                self._port = find_free_port(self.host)
            if self.tls is not None and (self._tls_port is None or (
                    not tls_port_fixed and not port_is_free(self._tls_port, self.host))):
                self._tls_port = find_free_port(self.host)
                while self._tls_port == self._port:
                    self._tls_port = find_free_port(self.host)
            try:
                self._start_once(binary, detach=detach, timeout=timeout)
                return
            except ServiceError:
                output = _proc.tail(self.log_file, 50) + _proc.tail(self.stderr_file, 50)
                if attempt + 1 >= attempts or "Address already in use" not in output:
                    raise
                # Lost a race for a port: pick others (only those not fixed by the caller).
                if not self._port_fixed:
                    self._port = None
                if self.tls is not None and not tls_port_fixed:
                    self._tls_port = None

    def _start_once(self, binary: str, *, detach: bool, timeout: float) -> None:
        self.write_config()
        self._popen = _proc.spawn_service(self, [binary, "-c", str(self.config_file)], output=self.stderr_file,
                                          cwd=self.workdir, pid_file=self.pid_file, detach=detach)
        self._pid = self._popen.pid
        try:
            for port in [self.port] + ([self.tls_port] if self.tls is not None else []):
                wait_for_port(
                    port,
                    self.host,
                    timeout,
                    alive=lambda: self._popen is not None and self._popen.poll() is None,
                )
        except ServiceError as exc:
            self._kill_quietly()
            raise ServiceError(
                f"Mosquitto did not start on {self.host}:{self.port}: {exc}\n"
                f"{_proc.tail(self.stderr_file)}\n{_proc.tail(self.log_file)}".rstrip()
            ) from None

    def _kill_quietly(self) -> None:
        with contextlib.suppress(ServiceError):
            self.stop(timeout=5.0)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the broker (SIGTERM, SIGKILL after ``timeout``); a no-op when not running."""
        if self._popen is not None:
            _proc.stop_process("Mosquitto", self._popen.pid, self._popen, timeout=timeout)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._popen.wait(timeout=1)
        elif self._pid is not None and _proc.pid_matches(self._pid, str(self.config_file)):
            _proc.stop_process("Mosquitto", self._pid, timeout=timeout)
        self._popen = None
        self._pid = None
        _proc.unregister_exit_stop(self)
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()

    def reload(self, timeout: float = 5.0) -> None:
        """Make the running broker re-read its password and ACL files (SIGHUP)."""
        self.users_admin.reload(timeout)

    # -- users -----------------------------------------------------------------------

    def add_user(self, username: str, password: str, *, server: bool = False) -> None:
        """Add or update a device user (``username`` = device id) or, with ``server=True``,
        another server user (name starting with ``_``); the running broker reloads."""
        self.users_admin.add_user(username, password, server=server)

    def remove_user(self, username: str) -> bool:
        if username == self.server_username:
            raise ValueError("refusing to remove the broker's own server user")
        return self.users_admin.remove_user(username)

    def users(self) -> list[str]:
        return self.users_admin.users()

    # -- saved state -----------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {
            "workdir": str(self.workdir),
            "host": self.host,
            "port": self._port,
            "tls_port": self._tls_port,
            "pid": self._pid,
            "username": self.server_username,
            "password": self.server_password,
            "password_file": str(self.password_file),
            "pid_file": str(self.pid_file),
            "config_file": str(self.config_file),
            "log_file": str(self.log_file),
            "dynamic_security": self.dynamic_security,
            "dynsec_username": self.dynsec_username if self.dynamic_security else None,
            "dynsec_password": self.dynsec_password if self.dynamic_security else None,
        }

    @classmethod
    def attach(cls, state: dict[str, Any]) -> MosquittoBroker:
        """A handle on a broker described by :meth:`state` (possibly started by another
        process); ``running`` checks the saved pid still runs this broker's config."""
        broker = cls(
            Path(state["workdir"]),
            port=state.get("port"),
            host=state.get("host", DEFAULT_HOST),
            server_username=state.get("username", SERVER_USERNAME),
            server_password=state.get("password"),
            dynamic_security=bool(state.get("dynamic_security")),
            dynsec_password=state.get("dynsec_password"),
        )
        broker._pid = state.get("pid")
        return broker

    def __enter__(self) -> MosquittoBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"MosquittoBroker({str(self.workdir)!r}, port={self._port}, pid={self._pid})"
