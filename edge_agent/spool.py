"""Durable on-disk spool of collected samples: SQLite index + image files, written atomically.

Life of an item: ``put`` writes the image file atomically (temp file, fsync, rename) and then
indexes it → ``pending`` → the uploader stored the object → ``uploaded`` → the broker
acknowledged its ``samples`` event → gone. The sample id is the idempotency key end to end: a
retry after a crash or an outage re-sends the same id, and the server stores each id once.

Eviction policy: the image files never take more than ``max_bytes``. When a new sample takes
the spool past the cap, samples are evicted by their value for retraining first and by age
second: ``random`` before ``low_confidence`` before ``shadow_disagreement`` before
``correction`` (the labeled frames training needs most), oldest first within a reason. The item
the uploader is working on is never evicted under it. Every eviction is counted per reason
(``counters()``, and the heartbeat's ``samples`` field); an evicted id stays "seen", so the same
frame is not collected again.

Thread safety: the frame loop, the uploader, the shadow runner and an HTTP thread may all use
one spool; they share one SQLite connection behind one lock, so every method is atomic.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from firmware_bundles.fsutil import atomic_write_bytes

log = structlog.get_logger(__name__)

#: Sample reasons in eviction order: the first is given up first. Unknown reasons go first too.
EVICTION_ORDER = ("random", "low_confidence", "shadow_disagreement", "correction")
_EVICTION_RANK = "CASE reason " + " ".join(
    f"WHEN '{reason}' THEN {rank}" for rank, reason in enumerate(EVICTION_ORDER)) + " ELSE -1 END"

#: Counters kept per sample reason as ``<event>.<reason>`` beside their ``<event>`` total.
PER_REASON = ("collected", "sent", "evicted", "dropped")

# "seen" ids older than this are forgotten (the table would otherwise grow forever); the server
# still refuses a repeat by its sample id.
DEFAULT_SEEN_TTL = 30 * 24 * 3600.0
_PRUNE_EVERY = 1000


@dataclass(frozen=True)
class SpoolItem:
    sample_id: str
    path: Path
    content_type: str
    meta: dict
    state: str
    object_key: str | None
    attempts: int


@dataclass(frozen=True)
class SpoolStats:
    """What a heartbeat reports about the spool."""

    depth: int
    bytes: int
    counters: dict[str, int] = field(default_factory=dict)

    def by_reason(self) -> dict[str, dict[str, int]]:
        """``{"collected": {"correction": 12, ...}, "sent": {...}, ...}`` from the flat counters."""
        out: dict[str, dict[str, int]] = {}
        for name, value in self.counters.items():
            event, _, reason = name.partition(".")
            if reason:
                out.setdefault(event, {})[reason] = value
        return out

    def heartbeat_fields(self) -> dict:
        """Keyword arguments for :class:`protocol.messages.Heartbeat`."""
        return {"spool_depth": self.depth, "spool_bytes": self.bytes,
                "spool_evicted": self.counters.get("evicted", 0), "spool_dropped": self.counters.get("dropped", 0),
                "samples": self.by_reason()}


class Spool:
    def __init__(self, root: Path, max_bytes: int, *, seen_ttl_seconds: float = DEFAULT_SEEN_TTL) -> None:
        self._root = Path(root)
        self._files = self._root / "files"
        self._files.mkdir(parents=True, exist_ok=True)
        self._max_bytes = max_bytes
        self._seen_ttl = seen_ttl_seconds
        self._lock = threading.Lock()
        self._busy: str | None = None  # the uploader's current item: never evicted under it
        self._puts = 0
        self._db = sqlite3.connect(self._root / "spool.db", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript("""
            CREATE TABLE IF NOT EXISTS items (
                sample_id TEXT PRIMARY KEY, created REAL, state TEXT, file TEXT, size INTEGER,
                content_type TEXT, meta TEXT, object_key TEXT, attempts INTEGER DEFAULT 0,
                next_try REAL DEFAULT 0, last_error TEXT DEFAULT '', reason TEXT DEFAULT '');
            CREATE TABLE IF NOT EXISTS seen (sample_id TEXT PRIMARY KEY, at REAL);
            CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER);
        """)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(items)")}
        if "reason" not in columns:  # a spool written before reasons were indexed
            self._db.execute("ALTER TABLE items ADD COLUMN reason TEXT DEFAULT ''")
        self._recover()
        self._prune_seen()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _recover(self) -> None:
        # Files without an index row (crash between write and insert, or a half-written temp
        # file) are removed; rows without a file (cannot happen: the file is written first and
        # removed after its row) are dropped.
        known = {row[0] for row in self._db.execute("SELECT file FROM items")}
        for path in self._files.iterdir():
            if path.name not in known:
                path.unlink(missing_ok=True)
        for sample_id, name in list(self._db.execute("SELECT sample_id, file FROM items")):
            if not (self._files / name).exists():
                self._db.execute("DELETE FROM items WHERE sample_id=?", (sample_id,))

    def _prune_seen(self) -> None:
        self._db.execute("DELETE FROM seen WHERE at < ? AND sample_id NOT IN (SELECT sample_id FROM items)",
                         (time.time() - self._seen_ttl,))

    def seen(self, sample_id: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM seen WHERE sample_id=?", (sample_id,)).fetchone() is not None

    def put(self, sample_id: str, data: bytes, content_type: str, meta: dict) -> bool:
        """Store one sample; False when this id was collected before (never sent twice) or the
        disk refused the write (counted as ``write_failed``: the frame loop must keep running)."""
        reason = str(meta.get("reason") or "unknown")
        with self._lock:
            if self._db.execute("SELECT 1 FROM seen WHERE sample_id=?", (sample_id,)).fetchone():
                return False
            name = f"{sample_id}.{'png' if content_type == 'image/png' else 'jpg'}"
            try:
                atomic_write_bytes(self._files / name, data)
            except OSError as exc:
                log.error("spool.write_failed", sample=sample_id, error=str(exc))
                self._bump("write_failed")
                return False
            try:
                with self._transaction():
                    now = time.time()
                    self._db.execute(
                        "INSERT INTO items (sample_id, created, state, file, size, content_type, meta, reason) "
                        "VALUES (?, ?, 'pending', ?, ?, ?, ?, ?)",
                        (sample_id, now, name, len(data), content_type, json.dumps(meta), reason),
                    )
                    self._db.execute("INSERT OR IGNORE INTO seen VALUES (?, ?)", (sample_id, now))
                    self._bump("collected", reason)
                    evicted = self._evict()
            except sqlite3.Error as exc:
                (self._files / name).unlink(missing_ok=True)
                log.error("spool.index_failed", sample=sample_id, error=str(exc))
                self._bump("write_failed")
                return False
            for path in evicted:  # only once the deletions are committed
                path.unlink(missing_ok=True)
            self._puts += 1
            if self._puts % _PRUNE_EVERY == 0:
                self._prune_seen()
            return True

    def _evict(self) -> list[Path]:
        """Delete index rows until the cap holds; returns their files, to remove after the commit."""
        files: list[Path] = []
        total = self._db.execute("SELECT COALESCE(SUM(size), 0) FROM items").fetchone()[0]
        while total > self._max_bytes:
            row = self._db.execute(
                f"SELECT sample_id, file, size, reason FROM items WHERE sample_id IS NOT ? "
                f"ORDER BY {_EVICTION_RANK}, created, rowid LIMIT 1", (self._busy,)).fetchone()
            if row is None:
                break
            self._db.execute("DELETE FROM items WHERE sample_id=?", (row[0],))
            files.append(self._files / row[1])
            self._bump("evicted", row[3])
            log.warning("spool.evicted", sample=row[0], reason=row[3], cap_bytes=self._max_bytes)
            total -= row[2]
        return files

    def _bump(self, name: str, reason: str | None = None, by: int = 1) -> None:
        names = [name] + ([f"{name}.{reason or 'unknown'}"] if name in PER_REASON else [])
        for n in names:
            self._db.execute(
                "INSERT INTO counters VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = value + ?", (n, by, by))

    def next_due(self, now: float | None = None, *, claim: bool = False) -> SpoolItem | None:
        """The oldest item whose backoff has expired: uploads drain in capture order.

        ``claim=True`` (the uploader) protects the item from eviction until it is marked sent,
        failed or dropped."""
        with self._lock:
            row = self._db.execute(
                "SELECT sample_id, file, content_type, meta, state, object_key, attempts FROM items "
                "WHERE next_try <= ? ORDER BY created, rowid LIMIT 1",
                # ``now or ...`` would read an explicit now=0.0 as "use the clock".
                (time.time() if now is None else now,),
            ).fetchone()
            if row is None:
                return None
            if claim:
                self._busy = row[0]
        return SpoolItem(row[0], self._files / row[1], row[2], json.loads(row[3]), row[4], row[5], row[6])

    def _release(self, sample_id: str) -> None:
        if self._busy == sample_id:
            self._busy = None

    def mark_uploaded(self, sample_id: str, object_key: str) -> None:
        with self._lock:
            self._db.execute("UPDATE items SET state='uploaded', object_key=?, attempts=0, next_try=0 "
                             "WHERE sample_id=?", (object_key, sample_id))

    def _remove(self, sample_id: str, counter: str) -> bool:
        row = self._db.execute("SELECT file, reason FROM items WHERE sample_id=?", (sample_id,)).fetchone()
        self._release(sample_id)
        if row is None:
            return False
        with self._transaction():
            self._db.execute("DELETE FROM items WHERE sample_id=?", (sample_id,))
            self._bump(counter, row[1])
        (self._files / row[0]).unlink(missing_ok=True)
        return True

    def mark_sent(self, sample_id: str) -> bool:
        """The broker acknowledged the sample's event: the item is done. False if it was not here."""
        with self._lock:
            return self._remove(sample_id, "sent")

    def mark_failed(self, sample_id: str, error: str, backoff_seconds: float) -> None:
        with self._lock:
            self._release(sample_id)
            self._db.execute(
                "UPDATE items SET attempts = attempts + 1, next_try=?, last_error=? WHERE sample_id=?",
                (time.time() + backoff_seconds, error[:500], sample_id),
            )

    def drop(self, sample_id: str, reason: str) -> bool:
        """Give up on an item the server refuses for good (e.g. 413): counted, not retried forever."""
        with self._lock:
            removed = self._remove(sample_id, "dropped")
        if removed:
            log.error("spool.dropped", sample=sample_id, why=reason)
        return removed

    def depth(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM items").fetchone()[0]

    def bytes(self) -> int:
        """Bytes of image files held (what the cap limits)."""
        with self._lock:
            return self._db.execute("SELECT COALESCE(SUM(size), 0) FROM items").fetchone()[0]

    def counters(self) -> dict[str, int]:
        """Totals since the spool was created: ``collected``, ``sent``, ``evicted``, ``dropped`` (each
        also per sample reason as ``evicted.random`` etc.) and ``write_failed``."""
        with self._lock:
            return dict(self._db.execute("SELECT name, value FROM counters"))

    def stats(self) -> SpoolStats:
        with self._lock:
            depth, size = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM items").fetchone()
            counters = dict(self._db.execute("SELECT name, value FROM counters"))
        return SpoolStats(depth=depth, bytes=size, counters=counters)

    def close(self) -> None:
        with self._lock:
            self._db.close()
