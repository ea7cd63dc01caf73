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
    assert spool.counters() == {"dropped": 1}
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
    assert s.counters() == {"sent": 1}
    assert _drain_order(s) == [_sid(1), _sid(3)]
    s.close()
    # the index is a plain SQLite file other tools can inspect
    with sqlite3.connect(root / "spool.db") as db:
        assert db.execute("SELECT COUNT(*) FROM seen").fetchone()[0] == 3
