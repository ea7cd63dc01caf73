"""Durable, ordered outbox for the agent's QoS 1 events (SQLite in WAL mode, one row a message).

A message is committed (fsync) before anyone tries to send it and deleted only once the broker
acknowledged it, so events raised while the broker is away, or before a crash or restart, are
delivered later in the order they were raised: at least once (a message whose PUBACK was lost
in a disconnect is sent again).

Cap policy: past ``max_messages`` or ``max_bytes`` the OLDEST messages are dropped to make room
(the newest describe the device as it is now, and the OTA state machine re-reports its current
state anyway). Every drop is counted in the database, so the count survives restarts, and logged.

:class:`OutboxSender` is the one thread that hands stored messages to the MQTT client, in order.
"""

from __future__ import annotations

import contextlib
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class OutboxEntry:
    seq: int
    topic: str
    payload: bytes
    qos: int
    created: float


class Outbox:
    """Thread-safe. ``path=None`` keeps the outbox in memory (ordered, but lost on restart)."""

    def __init__(self, path: Path | None, *, max_messages: int = 10_000, max_bytes: int = 64 * 1024 * 1024) -> None:
        if max_messages < 1 or max_bytes < 1:
            raise ValueError("outbox caps must be positive")
        self.path = Path(path) if path is not None else None
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path) if self.path else ":memory:", check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a committed append survives power loss
        # AUTOINCREMENT: sequence numbers never go back, even after the table was emptied, so
        # "everything after the last one sent" stays a valid cursor.
        self._db.executescript("""
            CREATE TABLE IF NOT EXISTS messages (
                seq INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, payload BLOB NOT NULL,
                qos INTEGER NOT NULL, size INTEGER NOT NULL, created REAL NOT NULL);
            CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
        """)
        self._count, self._bytes = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM messages").fetchone()

    # -- writes --------------------------------------------------------------------------

    def append(self, topic: str, payload: bytes, qos: int = 1) -> int:
        """Store one message durably; returns its sequence number. Drops the oldest past the cap."""
        size = len(topic) + len(payload)
        if size > self.max_bytes:
            raise ValueError(f"message of {size} bytes is larger than the whole outbox ({self.max_bytes} bytes)")
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                seq = self._db.execute(
                    "INSERT INTO messages (topic, payload, qos, size, created) VALUES (?, ?, ?, ?, ?)",
                    (topic, bytes(payload), int(qos), size, time.time()),
                ).lastrowid
                self._count += 1
                self._bytes += size
                dropped = self._drop_oldest_locked()
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                self._count, self._bytes = self._db.execute(
                    "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM messages").fetchone()
                raise
        if dropped:
            log.warning("outbox.dropped_oldest", dropped=len(dropped), first_seq=dropped[0],
                        last_seq=dropped[-1], dropped_total=self.dropped, depth=self._count,
                        max_messages=self.max_messages, max_bytes=self.max_bytes)
        return seq

    def _drop_oldest_locked(self) -> list[int]:
        dropped: list[int] = []
        while self._count > self.max_messages or self._bytes > self.max_bytes:
            seq, size = self._db.execute("SELECT seq, size FROM messages ORDER BY seq LIMIT 1").fetchone()
            self._db.execute("DELETE FROM messages WHERE seq=?", (seq,))
            self._count -= 1
            self._bytes -= size
            dropped.append(seq)
        if dropped:
            self._db.execute(
                "INSERT INTO counters VALUES ('dropped', ?) "
                "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                (len(dropped),),
            )
        return dropped

    def ack(self, seqs: Iterable[int]) -> int:
        """Delete acknowledged messages (one transaction); returns how many were still there."""
        seqs = list(seqs)
        if not seqs:
            return 0
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                removed = 0
                for seq in seqs:
                    row = self._db.execute("DELETE FROM messages WHERE seq=? RETURNING size", (seq,)).fetchone()
                    if row is not None:  # already dropped by the cap: nothing to do
                        removed += 1
                        self._count -= 1
                        self._bytes -= row[0]
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                self._count, self._bytes = self._db.execute(
                    "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM messages").fetchone()
                raise
        return removed

    # -- reads ---------------------------------------------------------------------------

    def pending(self, after: int = 0, limit: int = 100) -> list[OutboxEntry]:
        """Up to ``limit`` messages with a sequence number above ``after``, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, topic, payload, qos, created FROM messages WHERE seq > ? ORDER BY seq LIMIT ?",
                (after, limit),
            ).fetchall()
        return [OutboxEntry(seq, topic, bytes(payload), qos, created) for seq, topic, payload, qos, created in rows]

    def __len__(self) -> int:
        return self._count

    @property
    def size_bytes(self) -> int:
        return self._bytes

    @property
    def dropped(self) -> int:
        """Messages dropped by the cap since the outbox was created (persisted)."""
        with self._lock:
            row = self._db.execute("SELECT value FROM counters WHERE name='dropped'").fetchone()
        return row[0] if row else 0

    def close(self) -> None:
        with self._lock:
            self._db.close()


class OutboxSender:
    """Hands outbox messages to an MQTT client in order, at most ``window`` unacknowledged at a
    time, and deletes each once the broker acknowledged it.

    ``publish(entry)`` gives one message to the client and returns its packet id, or None when
    the client cannot take it now (it is offered again later). The client's callbacks report
    through :meth:`connected`, :meth:`disconnected` and :meth:`acked`; they only queue an event,
    and all sender state belongs to one thread, so no lock is held while calling the client.

    Order across a reconnect: an MQTT client keeps its unacknowledged messages and sends them
    again (in order) right after the new CONNACK. New messages wait until those are
    acknowledged, or they could overtake them. A new sender (after a restart) starts from the
    oldest stored message: whatever the broker did not acknowledge is sent again.
    """

    def __init__(self, outbox: Outbox, publish: Callable[[OutboxEntry], int | None], *, window: int = 20,
                 tick_s: float = 1.0) -> None:
        self.outbox = outbox
        self._publish = publish
        self.window = max(1, window)
        self._tick_s = tick_s
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        # Sender state (the sender thread's alone).
        self._inflight: dict[int, tuple[int, str]] = {}  # packet id -> (seq, topic)
        self._cursor = 0  # the last seq handed to the client
        self._online = False
        self._resync = False

    # -- inputs (any thread) ---------------------------------------------------------------

    def wake(self) -> None:
        self._events.put(("wake",))

    def connected(self) -> None:
        self._events.put(("connected",))

    def disconnected(self) -> None:
        self._events.put(("disconnected",))

    def acked(self, mid: int, refused: str | None = None) -> None:
        """The broker acknowledged packet ``mid``; ``refused`` is its reason when it refused it."""
        self._events.put(("ack", mid, refused))

    # -- thread ----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mqtt-outbox", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread is not None:
            self._events.put(("stop",))
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while True:
            try:
                events = [self._events.get(timeout=self._tick_s)]
            except queue.Empty:
                events = []  # a periodic retry, e.g. after the client refused a message
            with contextlib.suppress(queue.Empty):
                while True:
                    events.append(self._events.get_nowait())
            if not self.handle(events):
                return

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    def handle(self, events: list[tuple]) -> bool:
        """Apply ``events`` then send what the window allows; False once told to stop."""
        acked: list[int] = []
        stopping = False
        for event in events:
            kind = event[0]
            if kind == "ack":
                _, mid, refused = event
                entry = self._inflight.pop(mid, None)
                if entry is None:
                    continue  # a message the client sent for someone else (status, heartbeat)
                acked.append(entry[0])
                if refused:
                    # Sending a refused message again cannot succeed: drop it, loudly.
                    log.error("outbox.message_refused", topic=entry[1], seq=entry[0], reason=refused)
            elif kind == "connected":
                self._online = True
            elif kind == "disconnected":
                self._online = False
                self._resync = bool(self._inflight)
            elif kind == "stop":
                stopping = True
        if acked:
            self.outbox.ack(acked)
        if not self._inflight:
            self._resync = False
        if stopping:
            return False
        if not self._online or self._resync or len(self._inflight) >= self.window:
            return True
        for entry in self.outbox.pending(self._cursor, self.window - len(self._inflight)):
            mid = self._publish(entry)
            if mid is None:
                break  # offered again on the next event or tick
            self._inflight[mid] = (entry.seq, entry.topic)
            self._cursor = entry.seq
        return True
