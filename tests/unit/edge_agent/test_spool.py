"""The on-disk sample spool: ordering, idempotency, backoff, eviction, crash recovery, persistence."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from edge_agent.spool import Spool


def _sid(n: int) -> str:
    return f"{n:032x}"


@pytest.fixture
def spool(tmp_path: Path):
    s = Spool(tmp_path / "spool", max_bytes=10_000)
    yield s
    s.close()


def _drain_order(spool: Spool) -> list[str]:
    order = []
    while (item := spool.next_due()) is not None:
        order.append(item.sample_id)
        spool.mark_sent(item.sample_id)
    return order


def test_put_stores_file_and_meta(spool: Spool) -> None:
    assert spool.put(_sid(1), b"jpeg-bytes", "image/jpeg", {"reason": "random", "width": 4})
    item = spool.next_due()
    assert item is not None
    assert item.sample_id == _sid(1)
    assert item.path.read_bytes() == b"jpeg-bytes"
    assert item.path.suffix == ".jpg"
    assert item.content_type == "image/jpeg"
    assert item.meta == {"reason": "random", "width": 4}
    assert item.state == "pending" and item.object_key is None and item.attempts == 0
    assert spool.depth() == 1


def test_png_gets_png_suffix(spool: Spool) -> None:
    spool.put(_sid(1), b"png", "image/png", {})
    assert spool.next_due().path.suffix == ".png"


def test_next_due_returns_items_in_capture_order(spool: Spool) -> None:
    ids = [_sid(n) for n in (5, 3, 9, 1, 7)]  # not sorted: order is capture order, not id order
    for sid in ids:
        assert spool.put(sid, b"x" * 10, "image/jpeg", {})
    assert _drain_order(spool) == ids
    assert spool.depth() == 0


def test_capture_order_holds_even_with_identical_timestamps(tmp_path: Path, monkeypatch) -> None:
    import edge_agent.spool as spool_mod

    monkeypatch.setattr(spool_mod.time, "time", lambda: 1_000.0)
    s = Spool(tmp_path / "s", max_bytes=10_000)
    ids = [_sid(n) for n in (9, 2, 7, 4)]
    for sid in ids:
        s.put(sid, b"x", "image/jpeg", {})
    assert _drain_order(s) == ids
    s.close()


def test_duplicate_is_refused_while_pending_and_after_sent(spool: Spool) -> None:
    assert spool.put(_sid(1), b"a", "image/jpeg", {})
    assert not spool.put(_sid(1), b"b", "image/jpeg", {})
    assert spool.depth() == 1
    assert spool.next_due().path.read_bytes() == b"a"  # first copy kept
    spool.mark_sent(_sid(1))
    assert spool.depth() == 0
    assert spool.seen(_sid(1))
    assert not spool.put(_sid(1), b"c", "image/jpeg", {})
    assert spool.depth() == 0
    assert not spool.seen(_sid(2))


def test_mark_uploaded_keeps_item_with_object_key(spool: Spool) -> None:
    spool.put(_sid(1), b"a", "image/jpeg", {})
    spool.mark_uploaded(_sid(1), "images/dev/1.jpg")
    item = spool.next_due()
    assert item.state == "uploaded"
    assert item.object_key == "images/dev/1.jpg"
    assert item.path.exists()


def test_mark_sent_removes_file_and_counts(spool: Spool) -> None:
    spool.put(_sid(1), b"a", "image/jpeg", {})
    path = spool.next_due().path
    spool.mark_sent(_sid(1))
    assert not path.exists()
    assert spool.next_due() is None
    assert spool.counters()["sent"] == 1


def test_mark_failed_backs_off_until_expiry(spool: Spool) -> None:
    spool.put(_sid(1), b"a", "image/jpeg", {})
    spool.put(_sid(2), b"b", "image/jpeg", {})
    before = time.time()
    spool.mark_failed(_sid(1), "connection refused", backoff_seconds=60)
    # The failed oldest item is skipped; the next one drains meanwhile.
    assert spool.next_due(now=before + 1).sample_id == _sid(2)
    spool.mark_failed(_sid(2), "again", backoff_seconds=600)
    assert spool.next_due(now=before + 1) is None
    later = spool.next_due(now=time.time() + 61)
    assert later.sample_id == _sid(1)
    assert later.attempts == 1
    assert spool.next_due(now=time.time() + 601).sample_id == _sid(1)  # still capture order


def test_next_due_with_explicit_zero_now_skips_backed_off_items(spool: Spool) -> None:
    spool.put(_sid(1), b"a", "image/jpeg", {})
    spool.mark_failed(_sid(1), "x", backoff_seconds=0)  # due from "now" on
    # now=0.0 is a real instant (long before the retry time), not "use the clock"
    assert spool.next_due(now=0.0) is None
    assert spool.next_due(now=time.time() + 1).sample_id == _sid(1)


def test_attempts_accumulate_and_upload_resets_them(spool: Spool) -> None:
    spool.put(_sid(1), b"a", "image/jpeg", {})
    for _ in range(3):
        spool.mark_failed(_sid(1), "e" * 2000, backoff_seconds=0)
    assert spool.next_due(now=time.time() + 1).attempts == 3
    spool.mark_uploaded(_sid(1), "k")
    item = spool.next_due()
    assert item.attempts == 0 and item.state == "uploaded"


def test_drop_removes_and_counts(spool: Spool) -> None:
    spool.put(_sid(1), b"a", "image/jpeg", {})
    path = spool.next_due().path
    spool.drop(_sid(1), "413")
    assert not path.exists()
    assert spool.depth() == 0
    assert spool.counters() == {"collected": 1, "collected.unknown": 1, "dropped": 1, "dropped.unknown": 1}
    assert not spool.put(_sid(1), b"a", "image/jpeg", {})


def test_eviction_drops_oldest_first_and_counts(tmp_path: Path) -> None:
    s = Spool(tmp_path / "s", max_bytes=250)
    for n in range(1, 4):
        assert s.put(_sid(n), b"x" * 100, "image/jpeg", {})
    # 300 bytes > 250: the oldest (1) went
    assert s.depth() == 2
    assert s.counters()["evicted"] == 1
    assert not (tmp_path / "s" / "files" / f"{_sid(1)}.jpg").exists()
    s.put(_sid(4), b"x" * 100, "image/jpeg", {})
    assert s.counters()["evicted"] == 2
    assert _drain_order(s) == [_sid(3), _sid(4)]
    # an evicted id stays seen: it is never collected again
    assert s.seen(_sid(1)) and not s.put(_sid(1), b"x", "image/jpeg", {})
    s.close()


def test_eviction_frees_enough_for_a_large_item(tmp_path: Path) -> None:
    s = Spool(tmp_path / "s", max_bytes=300)
    for n in range(1, 4):
        s.put(_sid(n), b"x" * 100, "image/jpeg", {})
    assert s.counters().get("evicted", 0) == 0
    s.put(_sid(9), b"y" * 250, "image/jpeg", {})
    assert s.counters()["evicted"] == 3
    assert _drain_order(s) == [_sid(9)]
    s.close()


def test_recovery_removes_orphan_files_and_rows_without_files(tmp_path: Path) -> None:
    root = tmp_path / "s"
    s = Spool(root, max_bytes=10_000)
    s.put(_sid(1), b"a", "image/jpeg", {})
    s.put(_sid(2), b"b", "image/jpeg", {})
    s.close()
    files = root / "files"
    # crash between file write and index insert, and a half-written temp file
    (files / f"{_sid(3)}.jpg").write_bytes(b"orphan")
    (files / f"{_sid(4)}.jpg.tmp").write_bytes(b"partial")
    # an indexed file that vanished
    (files / f"{_sid(1)}.jpg").unlink()

    s = Spool(root, max_bytes=10_000)
    assert sorted(p.name for p in files.iterdir()) == [f"{_sid(2)}.jpg"]
    assert s.depth() == 1
    assert s.next_due().sample_id == _sid(2)
    # the orphan was never indexed, so it may be collected again
    assert s.put(_sid(3), b"c", "image/jpeg", {})
    s.close()


def test_state_persists_across_reopen(tmp_path: Path) -> None:
    root = tmp_path / "s"
    s = Spool(root, max_bytes=10_000)
    for n in (1, 2, 3):
        s.put(_sid(n), bytes([n]) * 5, "image/jpeg", {"n": n})
    s.mark_uploaded(_sid(1), "images/d/1.jpg")
    s.mark_sent(_sid(2))
    s.close()

    s = Spool(root, max_bytes=10_000)
    assert s.depth() == 2
    assert s.seen(_sid(2))
    assert not s.put(_sid(2), b"again", "image/jpeg", {})
    first = s.next_due()
    assert (first.sample_id, first.state, first.object_key, first.meta) == (_sid(1), "uploaded", "images/d/1.jpg", {"n": 1})
    assert s.counters() == {"collected": 3, "collected.unknown": 3, "sent": 1, "sent.unknown": 1}
    assert _drain_order(s) == [_sid(1), _sid(3)]
    s.close()
    # the index is a plain SQLite file other tools can inspect
    with sqlite3.connect(root / "spool.db") as db:
        assert db.execute("SELECT COUNT(*) FROM seen").fetchone()[0] == 3


# ---------------------------------------------------------------- eviction policy and counters


def _put(s: Spool, n: int, reason: str, size: int = 100) -> None:
    assert s.put(_sid(n), b"x" * size, "image/jpeg", {"reason": reason})


def test_eviction_gives_up_random_before_low_confidence_before_corrections(tmp_path: Path) -> None:
    s = Spool(tmp_path / "s", max_bytes=400)
    _put(s, 1, "correction")        # oldest, but the most valuable
    _put(s, 2, "low_confidence")
    _put(s, 3, "random")
    _put(s, 4, "shadow_disagreement")
    _put(s, 5, "correction")        # 500 bytes: one must go -> the random one
    assert s.counters()["evicted.random"] == 1
    _put(s, 6, "correction")        # next: low_confidence, although correction 1 is older
    assert s.counters()["evicted.low_confidence"] == 1
    _put(s, 7, "correction")
    assert s.counters()["evicted.shadow_disagreement"] == 1
    _put(s, 8, "correction")        # only corrections left: the oldest goes
    assert s.counters()["evicted.correction"] == 1
    assert s.counters()["evicted"] == 4
    assert _drain_order(s) == [_sid(5), _sid(6), _sid(7), _sid(8)]
    s.close()


def test_a_new_low_value_sample_is_evicted_itself_when_the_spool_holds_only_corrections(tmp_path: Path) -> None:
    s = Spool(tmp_path / "s", max_bytes=300)
    for n in (1, 2, 3):
        _put(s, n, "correction")
    _put(s, 4, "random")
    assert s.counters()["evicted.random"] == 1
    assert not (tmp_path / "s" / "files" / f"{_sid(4)}.jpg").exists()
    assert _drain_order(s) == [_sid(1), _sid(2), _sid(3)]
    s.close()


def test_the_item_the_uploader_claimed_is_never_evicted_under_it(tmp_path: Path) -> None:
    s = Spool(tmp_path / "s", max_bytes=250)
    _put(s, 1, "random")
    _put(s, 2, "random")
    claimed = s.next_due(claim=True)
    assert claimed.sample_id == _sid(1)
    _put(s, 3, "random")            # over the cap: 2 goes, not the claimed 1
    assert claimed.path.exists()
    assert s.mark_sent(_sid(1))
    assert s.counters()["evicted"] == 1 and s.counters()["sent"] == 1
    # once released, the oldest is fair game again
    _put(s, 4, "random")
    _put(s, 5, "random")
    assert _drain_order(s) == [_sid(4), _sid(5)]
    s.close()


def test_a_failed_attempt_releases_the_claim(tmp_path: Path) -> None:
    s = Spool(tmp_path / "s", max_bytes=250)
    _put(s, 1, "random")
    _put(s, 2, "random")
    s.mark_failed(s.next_due(claim=True).sample_id, "store down", backoff_seconds=0)
    _put(s, 3, "random")
    assert s.counters()["evicted"] == 1
    assert _drain_order_at(s, time.time() + 1) == [_sid(2), _sid(3)]
    s.close()


def _drain_order_at(spool: Spool, now: float) -> list[str]:
    order = []
    while (item := spool.next_due(now=now)) is not None:
        order.append(item.sample_id)
        spool.mark_sent(item.sample_id)
    return order


def test_counters_add_up_per_reason(tmp_path: Path) -> None:
    s = Spool(tmp_path / "s", max_bytes=300)
    for n, reason in enumerate(["correction", "random", "random", "correction", "low_confidence"], 1):
        _put(s, n, reason)
    s.mark_sent(s.next_due().sample_id)
    s.drop(s.next_due().sample_id, "413")
    stats = s.stats()
    c = stats.counters
    assert c["collected"] == 5
    assert c["collected"] == c["sent"] + c["evicted"] + c["dropped"] + stats.depth
    by_reason = stats.by_reason()
    assert by_reason["collected"] == {"correction": 2, "random": 2, "low_confidence": 1}
    assert sum(by_reason["evicted"].values()) == c["evicted"] == 2
    assert stats.bytes == s.bytes() == 100 * stats.depth
    fields = stats.heartbeat_fields()
    assert fields["spool_evicted"] == 2 and fields["spool_dropped"] == 1 and fields["spool_depth"] == stats.depth
    assert fields["samples"] == by_reason


def test_heartbeat_fields_fit_the_protocol(tmp_path: Path) -> None:
    from protocol.messages import Heartbeat

    s = Spool(tmp_path / "s", max_bytes=150)
    _put(s, 1, "random")
    _put(s, 2, "correction")
    beat = Heartbeat(device_id="cam-1", fps=1, latency_ms_p50=1, latency_ms_p99=1, frames_total=2, samples_sent=0,
                     disk_free_bytes=1, **s.stats().heartbeat_fields())
    assert beat.spool_evicted == 1 and beat.samples["evicted"] == {"random": 1} and beat.spool_bytes == 100
    s.close()


def test_mark_sent_of_an_item_no_longer_here_counts_nothing(spool: Spool) -> None:
    assert not spool.mark_sent(_sid(42))
    assert not spool.drop(_sid(42), "x")
    assert spool.counters() == {}


def test_a_disk_that_refuses_the_write_is_counted_not_raised(spool: Spool, monkeypatch) -> None:
    import edge_agent.spool as spool_mod

    def full(path, data, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(spool_mod, "atomic_write_bytes", full)
    assert not spool.put(_sid(1), b"a", "image/jpeg", {"reason": "correction"})
    assert spool.counters() == {"write_failed": 1}
    assert spool.depth() == 0 and not spool.seen(_sid(1))  # may be collected again once there is room


def test_a_spool_written_before_reasons_were_indexed_is_upgraded(tmp_path: Path) -> None:
    root = tmp_path / "s"
    (root / "files").mkdir(parents=True)
    db = sqlite3.connect(root / "spool.db")
    db.executescript("""
        CREATE TABLE items (sample_id TEXT PRIMARY KEY, created REAL, state TEXT, file TEXT, size INTEGER,
            content_type TEXT, meta TEXT, object_key TEXT, attempts INTEGER DEFAULT 0,
            next_try REAL DEFAULT 0, last_error TEXT DEFAULT '');
        CREATE TABLE seen (sample_id TEXT PRIMARY KEY, at REAL);
        CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER);
    """)
    db.execute("INSERT INTO items (sample_id, created, state, file, size, content_type, meta) "
               "VALUES (?, 1.0, 'pending', ?, 1, 'image/jpeg', '{}')", (_sid(1), f"{_sid(1)}.jpg"))
    db.commit()
    db.close()
    (root / "files" / f"{_sid(1)}.jpg").write_bytes(b"a")
    s = Spool(root, max_bytes=10_000)
    assert s.next_due().sample_id == _sid(1)
    assert s.mark_sent(_sid(1))
    assert s.counters()["sent.unknown"] == 1
    s.close()


def test_seen_ids_are_forgotten_after_their_ttl(tmp_path: Path) -> None:
    root = tmp_path / "s"
    s = Spool(root, max_bytes=10_000)
    s.put(_sid(1), b"a", "image/jpeg", {})
    s.put(_sid(2), b"b", "image/jpeg", {})
    s.mark_sent(_sid(1))
    s.close()
    with sqlite3.connect(root / "spool.db") as db:
        db.execute("UPDATE seen SET at = at - 1000")
    s = Spool(root, max_bytes=10_000, seen_ttl_seconds=500)
    assert not s.seen(_sid(1))     # sent long ago: forgotten
    assert s.seen(_sid(2))         # still in the spool: kept whatever its age
    s.close()


def test_frame_loop_uploader_and_other_threads_can_share_one_spool(tmp_path: Path) -> None:
    import threading

    s = Spool(tmp_path / "s", max_bytes=60 * 50)
    n_per_writer, writers = 60, 3
    errors: list[BaseException] = []
    done = threading.Event()
    sent: list[str] = []

    def writer(w: int) -> None:
        try:
            for i in range(n_per_writer):
                s.put(_sid(w * 1000 + i), b"x" * 50, "image/jpeg",
                      {"reason": ("random", "correction", "low_confidence")[w]})
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def uploader() -> None:
        attempts = 0
        try:
            while not done.is_set() or s.depth():
                item = s.next_due(claim=True)
                if item is None:
                    time.sleep(0.001)
                    continue
                attempts += 1
                if attempts % 7 == 3:
                    s.mark_failed(item.sample_id, "flaky", backoff_seconds=0)
                    continue
                s.mark_uploaded(item.sample_id, "k")
                if s.mark_sent(item.sample_id):
                    sent.append(item.sample_id)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    def reader() -> None:
        try:
            while not done.is_set():
                stats = s.stats()
                assert stats.bytes <= 60 * 50 + 50
                time.sleep(0.001)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
    others = [threading.Thread(target=uploader), threading.Thread(target=reader)]
    for t in threads + others:
        t.start()
    for t in threads:
        t.join()
    done.set()
    for t in others:
        t.join(30)
    assert not errors, errors
    c = s.counters()
    assert c["collected"] == n_per_writer * writers
    assert c["collected"] == c["sent"] + c.get("evicted", 0) + c.get("dropped", 0) + s.depth()
    assert len(sent) == len(set(sent)) == c["sent"]
    assert s.depth() == 0 and not list((tmp_path / "s" / "files").iterdir())
    s.close()
