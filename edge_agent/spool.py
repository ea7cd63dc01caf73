"""Durable on-disk spool of collected samples: SQLite index + image files, written atomically.

An item moves pending → uploaded (object stored, event not yet acknowledged) → gone (event
acknowledged). The sample id is the idempotency key end to end, so a retry after a crash
re-sends nothing new. Past the size cap the OLDEST items are evicted first (the newest
frames describe the line as it is now); evictions are counted and reported.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from firmware_bundles.fsutil import atomic_write_bytes


@dataclass(frozen=True)
class SpoolItem:
    sample_id: str
    path: Path
    content_type: str
    meta: dict
    state: str
    object_key: str | None
    attempts: int


class Spool:
    def __init__(self, root: Path, max_bytes: int) -> None:
        self._root = Path(root)
        self._files = self._root / "files"
        self._files.mkdir(parents=True, exist_ok=True)
        self._max_bytes = max_bytes
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self._root / "spool.db", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript("""
            CREATE TABLE IF NOT EXISTS items (
                sample_id TEXT PRIMARY KEY, created REAL, state TEXT, file TEXT, size INTEGER,
                content_type TEXT, meta TEXT, object_key TEXT, attempts INTEGER DEFAULT 0,
                next_try REAL DEFAULT 0, last_error TEXT DEFAULT '');
            CREATE TABLE IF NOT EXISTS seen (sample_id TEXT PRIMARY KEY, at REAL);
            CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER);
        """)
        self._recover()

    def _recover(self) -> None:
        # Files without an index row (crash between write and insert) are removed;
        # rows without a file (should not happen: the file is written first) are dropped.
        known = {row[0] for row in self._db.execute("SELECT file FROM items")}
        for path in self._files.iterdir():
            if path.name not in known:
                path.unlink(missing_ok=True)
        for sample_id, name in list(self._db.execute("SELECT sample_id, file FROM items")):
            if not (self._files / name).exists():
                self._db.execute("DELETE FROM items WHERE sample_id=?", (sample_id,))

    def seen(self, sample_id: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM seen WHERE sample_id=?", (sample_id,)).fetchone() is not None

    def put(self, sample_id: str, data: bytes, content_type: str, meta: dict) -> bool:
        """Store one sample; False when this id was collected before (never sent twice)."""
        with self._lock:
            if self._db.execute("SELECT 1 FROM seen WHERE sample_id=?", (sample_id,)).fetchone():
                return False
            name = f"{sample_id}.{'png' if content_type == 'image/png' else 'jpg'}"
            atomic_write_bytes(self._files / name, data)
            self._db.execute("BEGIN")
            self._db.execute(
                "INSERT INTO items (sample_id, created, state, file, size, content_type, meta) "
                "VALUES (?, ?, 'pending', ?, ?, ?, ?)",
                (sample_id, time.time(), name, len(data), content_type, json.dumps(meta)),
            )
            self._db.execute("INSERT OR IGNORE INTO seen VALUES (?, ?)", (sample_id, time.time()))
            self._db.execute("COMMIT")
            self._evict()
            return True

    def _evict(self) -> None:
        total = self._db.execute("SELECT COALESCE(SUM(size), 0) FROM items").fetchone()[0]
        while total > self._max_bytes:
            row = self._db.execute("SELECT sample_id, file, size FROM items ORDER BY created, rowid LIMIT 1").fetchone()
            if row is None:
                break
            self._db.execute("DELETE FROM items WHERE sample_id=?", (row[0],))
            (self._files / row[1]).unlink(missing_ok=True)
            self._bump("evicted")
            total -= row[2]

    def _bump(self, name: str, by: int = 1) -> None:
        self._db.execute(
            "INSERT INTO counters VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = value + ?", (name, by, by)
        )

    def next_due(self, now: float | None = None) -> SpoolItem | None:
        """The oldest item whose backoff has expired: uploads drain in capture order."""
        with self._lock:
            row = self._db.execute(
                "SELECT sample_id, file, content_type, meta, state, object_key, attempts FROM items "
                "WHERE next_try <= ? ORDER BY created, rowid LIMIT 1",
                # ``now or ...`` would read an explicit now=0.0 as "use the clock".
                (time.time() if now is None else now,),
            ).fetchone()
        if row is None:
            return None
        return SpoolItem(row[0], self._files / row[1], row[2], json.loads(row[3]), row[4], row[5], row[6])

    def mark_uploaded(self, sample_id: str, object_key: str) -> None:
        with self._lock:
            self._db.execute("UPDATE items SET state='uploaded', object_key=?, attempts=0, next_try=0 "
                             "WHERE sample_id=?", (object_key, sample_id))

    def mark_sent(self, sample_id: str) -> None:
        with self._lock:
            row = self._db.execute("SELECT file FROM items WHERE sample_id=?", (sample_id,)).fetchone()
            self._db.execute("DELETE FROM items WHERE sample_id=?", (sample_id,))
            self._bump("sent")
        if row:
            (self._files / row[0]).unlink(missing_ok=True)

    def mark_failed(self, sample_id: str, error: str, backoff_seconds: float) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE items SET attempts = attempts + 1, next_try=?, last_error=? WHERE sample_id=?",
                (time.time() + backoff_seconds, error[:500], sample_id),
            )

    def drop(self, sample_id: str, reason: str) -> None:
        """Give up on an item the server refuses for good (e.g. 413): counted, not retried forever."""
        with self._lock:
            row = self._db.execute("SELECT file FROM items WHERE sample_id=?", (sample_id,)).fetchone()
            self._db.execute("DELETE FROM items WHERE sample_id=?", (sample_id,))
            self._bump("dropped")
        if row:
            (self._files / row[0]).unlink(missing_ok=True)

    def depth(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM items").fetchone()[0]

    def counters(self) -> dict[str, int]:
        with self._lock:
            return dict(self._db.execute("SELECT name, value FROM counters"))

    def close(self) -> None:
        with self._lock:
            self._db.close()
