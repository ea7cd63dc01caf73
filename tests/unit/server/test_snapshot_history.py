"""The cumulative training set: walking the snapshot chain and the history selection rule."""

from __future__ import annotations

import hashlib
import json
from functools import partial

import pytest

from server.pipeline.snapshot import (
    SnapshotError,
    is_validation,
    load_snapshot_manifest,
    materialize_history,
    select_history,
    split_entries,
    walk_snapshot_chain,
)

VAL = 0.15


class Store:
    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    def put_bytes(self, key: str, data: bytes, content_type: str = "") -> None:
        self.objects[key] = bytes(data)

    def get_bytes(self, key: str, max_bytes: int) -> bytes:
        return self.objects[key]


def _entry(tag: str, n: int, store: Store | None = None) -> dict:
    data = f"jpeg-{tag}-{n}".encode()
    key = f"images/{tag}/{n}.jpg"
    if store is not None:
        store.put_bytes(key, data)
    return {"id": hashlib.md5(f"{tag}-{n}".encode()).hexdigest(), "object_key": key,
            "sha256": hashlib.sha256(data).hexdigest(), "labels": [{"cls": n % 3, "cx": 0.5, "cy": 0.5,
                                                                    "w": 0.2, "h": 0.2}],
            "device_id": f"cam-{tag}", "reason": "correction", "captured_at": "2024-05-01T00:00:00+00:00",
            "width": 64, "height": 64}


def _put_manifest(store: Store, parent: str | None, entries: list[dict]) -> str:
    data = json.dumps({"schema": 1, "parent": parent, "samples": entries}, sort_keys=True,
                      separators=(",", ":")).encode()
    snapshot_id = hashlib.sha256(data).hexdigest()
    store.put_bytes(f"snapshots/{snapshot_id}.json", data)
    return snapshot_id


def _chain(sizes: list[int], store: Store | None = None) -> tuple[Store, list[str]]:
    """Snapshots oldest first with these sizes; returns the store and their ids, newest first."""
    store = store or Store()
    ids: list[str] = []
    parent = None
    for i, size in enumerate(sizes):
        parent = _put_manifest(store, parent, [_entry(f"s{i}", n, store) for n in range(size)])
        ids.append(parent)
    return store, ids[::-1]


def _walk(store: Store, head: str, depth: int = 20):
    return walk_snapshot_chain(partial(load_snapshot_manifest, store), head, depth)


def _ids(entries) -> set[str]:
    return {e["id"] for e in entries}


def test_the_cap_is_respected_and_filled_when_there_is_enough() -> None:
    store, ids = _chain([300, 300, 300])
    chain, _ = _walk(store, ids[0])
    selection = select_history(chain, max_images=200, val_fraction=VAL)
    assert len(selection.train) + len(selection.val) == 200
    assert len(_ids(selection.train) | _ids(selection.val)) == 200
    small = select_history(chain, max_images=10_000, val_fraction=VAL)  # more than there is: all of it
    assert len(small.train) + len(small.val) == 900


def test_every_earlier_snapshot_keeps_a_share_however_large_the_newer_ones_are() -> None:
    store, ids = _chain([5, 40, 2000, 3000])  # oldest first: the old ones are tiny
    chain, _ = _walk(store, ids[0])
    selection = select_history(chain, max_images=400, val_fraction=VAL)
    counts = {p.snapshot_id: len(p.train) + len(p.val) for p in selection.picks}
    assert sum(counts.values()) == 400
    assert counts[ids[3]] == 5 and counts[ids[2]] == 40  # what a small snapshot has, it gives in full
    assert counts[ids[0]] + counts[ids[1]] == 355 and abs(counts[ids[0]] - counts[ids[1]]) <= 1
    assert [p.depth for p in selection.picks] == [1, 2, 3, 4]


def test_a_cap_smaller_than_the_chain_gives_the_newest_snapshots_one_each() -> None:
    store, ids = _chain([10, 10, 10, 10])
    chain, _ = _walk(store, ids[0])
    selection = select_history(chain, max_images=2, val_fraction=VAL)
    assert [len(p.train) + len(p.val) for p in selection.picks] == [1, 1, 0, 0]


def test_the_selection_is_deterministic_and_a_larger_cap_only_adds() -> None:
    store, ids = _chain([120, 80, 200])
    chain, _ = _walk(store, ids[0])
    first = select_history(chain, max_images=90, val_fraction=VAL)
    again = select_history(list(_walk(store, ids[0])[0]), max_images=90, val_fraction=VAL)
    assert first == again
    larger = select_history(chain, max_images=150, val_fraction=VAL)
    for small, big in zip(first.picks, larger.picks, strict=True):
        assert _ids(small.train) <= _ids(big.train) and _ids(small.val) <= _ids(big.val)


def test_samples_keep_the_split_they_had_when_first_used() -> None:
    store, ids = _chain([400, 400])
    chain, _ = _walk(store, ids[0])
    selection = select_history(chain, max_images=300, val_fraction=VAL)
    assert selection.val and selection.train
    assert all(is_validation(e["id"], VAL) for e in selection.val)
    assert not any(is_validation(e["id"], VAL) for e in selection.train)


def test_a_tiny_snapshot_keeps_the_val_sample_materialize_gave_it() -> None:
    entries = [_entry("tiny", n) for n in range(40)]
    entries = [e for e in entries if not is_validation(e["id"], VAL)][:3]  # no id lands in val
    train, val = split_entries(entries, VAL)
    assert val == [entries[-1]] and train == entries[:-1]
    store = Store()
    head = _put_manifest(store, None, entries)
    selection = select_history(_walk(store, head)[0], max_images=10, val_fraction=VAL)
    assert _ids(selection.val) == {entries[-1]["id"]}


def test_a_sample_is_taken_once_newest_snapshot_first_and_never_if_it_is_new() -> None:
    shared = _entry("shared", 1)
    new = _entry("new", 1)
    store = Store()
    old = _put_manifest(store, None, [shared, new, _entry("a", 1)])
    parent = _put_manifest(store, old, [shared, _entry("b", 1)])
    selection = select_history(_walk(store, parent)[0], max_images=100, val_fraction=VAL, exclude={new["id"]})
    everything = [e["id"] for p in selection.picks for e in (*p.train, *p.val)]
    assert len(everything) == len(set(everything)) == 3
    assert new["id"] not in everything
    by_snapshot = {p.snapshot_id: _ids(p.train) | _ids(p.val) for p in selection.picks}
    assert shared["id"] in by_snapshot[parent] and shared["id"] not in by_snapshot[old]


def test_cap_zero_selects_nothing() -> None:
    store, ids = _chain([30, 30])
    selection = select_history(_walk(store, ids[0])[0], max_images=0, val_fraction=VAL)
    assert selection.train == [] and selection.val == []
    assert selection.summary()["train_images"] == 0


def test_the_walk_stops_at_its_depth_and_says_the_chain_went_on() -> None:
    store, ids = _chain([5] * 6)
    chain, truncated = _walk(store, ids[0], depth=3)
    assert [sid for sid, _ in chain] == ids[:3] and truncated
    chain, truncated = _walk(store, ids[0], depth=6)
    assert len(chain) == 6 and not truncated
    selection = select_history(chain, max_images=100, val_fraction=VAL, max_snapshots=2)
    assert [p.snapshot_id for p in selection.picks] == ids[:2]


def test_a_missing_parent_manifest_is_a_clear_error() -> None:
    store, ids = _chain([5, 5, 5])
    del store.objects[f"snapshots/{ids[1]}.json"]
    with pytest.raises(SnapshotError, match=rf"{ids[1][:12]}.*2 snapshots back.*not in the object store"):
        _walk(store, ids[0])


def test_a_tampered_manifest_is_a_clear_error() -> None:
    store, ids = _chain([5, 5])
    key = f"snapshots/{ids[0]}.json"
    body = json.loads(store.objects[key])
    body["samples"][0]["labels"] = []  # a label silently changed
    store.objects[key] = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(SnapshotError, match=rf"{ids[0][:12]}.*\(the parent\).*hashes to"):
        _walk(store, ids[0])


def test_history_is_materialized_in_its_split_with_hashes_checked(tmp_path) -> None:
    store, ids = _chain([60, 60])
    selection = select_history(_walk(store, ids[0])[0], max_images=50, val_fraction=VAL)
    train, val = materialize_history(store, selection, tmp_path / "history")
    assert len(train) == len(selection.train) and len(val) == len(selection.val)
    assert all(p.parent == tmp_path / "history" / "train" / "images" for p in train)
    assert all((p.parent.parent / "labels" / f"{p.stem}.txt").read_text().strip() for p in train + val)
    first = selection.train[0]
    store.objects[first["object_key"]] = b"changed"
    with pytest.raises(ValueError, match="sha256 mismatch"):
        materialize_history(store, selection, tmp_path / "again")
