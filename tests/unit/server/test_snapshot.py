"""Dataset snapshots: the stable split, YOLO label lines, content-addressed manifests, materialisation."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from server.db.models import Base, Sample, Snapshot
from server.pipeline.snapshot import build_snapshot, is_validation, materialize, yolo_label_lines

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


class FakeStore:
    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.content_types: dict[str, str] = {}

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        self.objects[key] = bytes(data)
        self.content_types[key] = content_type
        return hashlib.md5(data).hexdigest()

    def get_bytes(self, key: str, max_bytes: int) -> bytes:
        data = self.objects[key]
        if len(data) > max_bytes:
            raise ValueError("too large")
        return data


def _engine():
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    return engine


@pytest.fixture
def session():
    engine = _engine()
    with Session(engine) as s:
        yield s
    engine.dispose()


def _image_bytes(n: int) -> bytes:
    return f"fake-jpeg-{n}".encode() * 3


def _sample(n: int, *, status: str = "validated", device: str = "dev-a", captured_at=None, labels="default",
            store: FakeStore | None = None) -> Sample:
    data = _image_bytes(n)
    key = f"images/{device}/{n:016x}.jpg"
    if store is not None:
        store.put_bytes(key, data, "image/jpeg")
    return Sample(
        id=f"{n:016x}", device_id=device, object_key=key, sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data), width=64, height=48, reason="correction", status=status,
        labels=[{"cls": n % 3, "cx": 0.5, "cy": 0.5, "w": 0.25, "h": 0.125, "conf": None}] if labels == "default" else labels,
        captured_at=captured_at or T0 + timedelta(seconds=n),
    )


# --- split and labels ---------------------------------------------------------------------------------


def test_is_validation_is_deterministic() -> None:
    ids = [f"{n:032x}" for n in range(200)]
    first = [is_validation(i, 0.3) for i in ids]
    assert first == [is_validation(i, 0.3) for i in ids]


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.5])
def test_is_validation_roughly_matches_fraction(fraction: float) -> None:
    ids = [hashlib.md5(str(n).encode()).hexdigest() for n in range(2000)]
    share = sum(is_validation(i, fraction) for i in ids) / len(ids)
    assert abs(share - fraction) < 0.04


def test_is_validation_is_monotone_in_fraction_and_covers_extremes() -> None:
    ids = [f"s{n}" for n in range(2000)]
    assert not any(is_validation(i, 0.0) for i in ids)
    assert all(is_validation(i, 1.0) for i in ids)
    small = {i for i in ids if is_validation(i, 0.1)}
    large = {i for i in ids if is_validation(i, 0.3)}
    assert small < large  # growing the fraction only moves samples from train to val


def test_yolo_label_lines_format() -> None:
    labels = [{"cls": 0, "cx": 0.5, "cy": 0.25, "w": 0.1, "h": 0.2}, {"cls": 12, "cx": 1 / 3, "cy": 0.0, "w": 1.0, "h": 2 / 3}]
    assert yolo_label_lines(labels) == (
        "0 0.500000 0.250000 0.100000 0.200000\n"
        "12 0.333333 0.000000 1.000000 0.666667\n"
    )
    assert yolo_label_lines([]) == ""


# --- build_snapshot -----------------------------------------------------------------------------------


def test_build_snapshot_freezes_validated_unsnapshotted_samples(session: Session) -> None:
    store = FakeStore()
    session.add_all([
        _sample(1, device="dev-b"), _sample(2), _sample(3, status="rejected"), _sample(4, status="unlabeled"),
        _sample(5, device="dev-c"),
    ])
    old = _sample(6)
    old.snapshot_id = "f" * 64
    session.add(old)
    session.commit()

    built = build_snapshot(session, store, parent_id=None)
    assert built is not None
    snapshot, body = built
    session.commit()

    assert [e["id"] for e in body["samples"]] == [f"{n:016x}" for n in (1, 2, 5)]
    assert body["parent"] is None and body["schema"] == 1
    stored = store.objects[snapshot.manifest_key]
    assert snapshot.manifest_key == f"snapshots/{snapshot.id}.json"
    assert store.content_types[snapshot.manifest_key] == "application/json"
    assert snapshot.id == hashlib.sha256(stored).hexdigest()
    assert json.loads(stored) == json.loads(json.dumps(body, default=str))
    assert snapshot.sample_count == 3
    assert snapshot.devices == ["dev-a", "dev-b", "dev-c"]
    assert snapshot.parent_id is None
    entry = body["samples"][0]
    assert entry["sha256"] == hashlib.sha256(_image_bytes(1)).hexdigest()
    assert entry["labels"][0]["cls"] == 1 and (entry["width"], entry["height"]) == (64, 48)

    marked = {s.id: s.snapshot_id for s in session.scalars(select(Sample))}
    assert marked == {f"{1:016x}": snapshot.id, f"{2:016x}": snapshot.id, f"{3:016x}": None,
                      f"{4:016x}": None, f"{5:016x}": snapshot.id, f"{6:016x}": "f" * 64}
    assert session.get(Snapshot, snapshot.id) is not None


def test_nothing_new_returns_none(session: Session) -> None:
    store = FakeStore()
    assert build_snapshot(session, store, parent_id=None) is None
    session.add(_sample(1))
    session.commit()
    assert build_snapshot(session, store, None) is not None
    session.commit()
    assert build_snapshot(session, store, None) is None
    assert len(store.objects) == 1


def test_next_snapshot_chains_its_parent_and_holds_only_new_samples(session: Session) -> None:
    store = FakeStore()
    session.add_all([_sample(1), _sample(2)])
    session.commit()
    first, _ = build_snapshot(session, store, None)
    session.commit()
    session.add(_sample(3))
    session.commit()
    second, body = build_snapshot(session, store, first.id)
    session.commit()
    assert second.id != first.id
    assert second.parent_id == first.id and body["parent"] == first.id
    assert [e["id"] for e in body["samples"]] == [f"{3:016x}"]
    assert len(session.scalars(select(Snapshot)).all()) == 2


def _build_in_fresh_db(samples, parent=None, *, reload: bool = True) -> str:
    engine = _engine()
    with Session(engine) as s:
        s.add_all(samples)
        if reload:
            s.commit()
            s.expunge_all()
        snapshot, _ = build_snapshot(s, FakeStore(), parent)
        return snapshot.id


def test_same_samples_give_the_same_id() -> None:
    a = _build_in_fresh_db([_sample(1), _sample(2)])
    b = _build_in_fresh_db([_sample(2), _sample(1)])  # insertion order does not matter
    assert a == b
    assert _build_in_fresh_db([_sample(1), _sample(2)], parent="p" * 64) != a
    assert _build_in_fresh_db([_sample(1), _sample(3)]) != a
    assert _build_in_fresh_db([_sample(1), _sample(2, labels=None)]) != a


def test_id_does_not_depend_on_whether_rows_were_reloaded() -> None:
    # Naive datetimes come back from the database as UTC: the manifest must spell both alike.
    naive = datetime(2024, 5, 1, 12, 0)
    fresh = _build_in_fresh_db([_sample(1, captured_at=naive)], reload=False)
    reloaded = _build_in_fresh_db([_sample(1, captured_at=naive)], reload=True)
    assert fresh == reloaded


# --- materialize --------------------------------------------------------------------------------------


def _manifest(session: Session, store: FakeStore, ns) -> dict:
    session.add_all([_sample(n, store=store) for n in ns])
    session.commit()
    _, body = build_snapshot(session, store, None)
    session.commit()
    return body


def test_materialize_writes_images_and_labels(session: Session, tmp_path: Path) -> None:
    store = FakeStore()
    body = _manifest(session, store, range(1, 41))
    root = tmp_path / "data"
    ds = materialize(store, body, root, val_fraction=0.25)
    assert len(ds.train_images) + len(ds.val_images) == 40
    assert ds.val_dir == root / "val" / "images"
    for entry in body["samples"]:
        split = "val" if is_validation(entry["id"], 0.25) else "train"
        image = root / split / "images" / f"{entry['id']}.jpg"
        assert image.read_bytes() == store.objects[entry["object_key"]]
        assert (root / split / "labels" / f"{entry['id']}.txt").read_text() == yolo_label_lines(entry["labels"])
        assert image in (ds.val_images if split == "val" else ds.train_images)
    assert 0 < len(ds.val_images) < 40


def test_unlabelled_entry_gets_an_empty_label_file(session: Session, tmp_path: Path) -> None:
    store = FakeStore()
    session.add(_sample(1, store=store, labels=None))
    session.commit()
    _, body = build_snapshot(session, store, None)
    materialize(store, body, tmp_path, val_fraction=1.0)
    assert (tmp_path / "val" / "labels" / f"{1:016x}.txt").read_text() == ""


def test_tiny_snapshot_still_gets_a_validation_image(session: Session, tmp_path: Path) -> None:
    store = FakeStore()
    body = _manifest(session, store, [1, 2])
    ds = materialize(store, body, tmp_path, val_fraction=0.0)
    assert len(ds.val_images) == 1 and len(ds.train_images) == 1
    moved = ds.val_images[0]
    assert moved.parent == tmp_path / "val" / "images" and moved.exists()
    assert (tmp_path / "val" / "labels" / f"{moved.stem}.txt").exists()
    assert not (tmp_path / "train" / "images" / moved.name).exists()
    assert not (tmp_path / "train" / "labels" / f"{moved.stem}.txt").exists()


def test_materialize_refuses_changed_objects(session: Session, tmp_path: Path) -> None:
    store = FakeStore()
    body = _manifest(session, store, [1, 2, 3])
    key = body["samples"][1]["object_key"]
    store.objects[key] = b"tampered"
    with pytest.raises(ValueError, match=f"{key}.*sha256 mismatch"):
        materialize(store, body, tmp_path, val_fraction=0.2)
