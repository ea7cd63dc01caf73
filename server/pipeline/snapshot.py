"""Dataset snapshots: immutable, content-addressed manifests of the samples a model trains on,
chained to their parent, stored in the object store; and their materialisation on disk."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from server.db.models import Sample, Snapshot


class SnapshotError(ValueError):
    """A stored snapshot is missing or does not match its content address."""


@dataclass(frozen=True)
class MaterializedDataset:
    train_images: list[Path]
    val_images: list[Path]
    val_dir: Path


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


def _utc_iso(value: datetime) -> str:
    # One spelling per instant: an object still holding its in-memory (naive or non-UTC) value and
    # the same row read back from the database must hash to the same snapshot id.
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat()


def freeze_snapshot(session: Session, store, parent_id: str | None,
                    only: Collection[str] | None = None) -> tuple[str, dict] | None:
    """Write the manifest of every validated sample not yet in a snapshot (of those in ``only``,
    when given: the ones the data gate checked) to the object store.

    Nothing in the database changes: the samples stay pending until :func:`claim_snapshot`
    (the retrain job's commit point). Content-addressed, so freezing the same samples again
    writes the same object. None when there is nothing new.
    """
    samples = session.scalars(
        select(Sample).where(Sample.status == "validated", Sample.snapshot_id.is_(None)).order_by(Sample.id)
    ).all()
    if only is not None:
        keep = set(only)
        samples = [s for s in samples if s.id in keep]
    if not samples:
        return None
    entries = [
        {
            "id": s.id,
            "object_key": s.object_key,
            "sha256": s.sha256,
            "labels": s.labels,
            "device_id": s.device_id,
            "reason": s.reason,
            "captured_at": _utc_iso(s.captured_at),
            "width": s.width,
            "height": s.height,
        }
        for s in samples
    ]
    body = {"schema": 1, "parent": parent_id, "samples": entries}
    data = _canonical(body)
    snapshot_id = hashlib.sha256(data).hexdigest()
    store.put_bytes(f"snapshots/{snapshot_id}.json", data, "application/json")
    return snapshot_id, body


def claim_snapshot(session: Session, snapshot_id: str, body: dict) -> Snapshot:
    """Record the snapshot and mark its samples as used by it; the caller commits.

    Only samples still unclaimed are marked: what another snapshot already holds stays there.
    """
    entries = body["samples"]
    snapshot = session.get(Snapshot, snapshot_id)
    if snapshot is None:
        snapshot = Snapshot(
            id=snapshot_id,
            parent_id=body["parent"],
            sample_count=len(entries),
            manifest_key=f"snapshots/{snapshot_id}.json",
            devices=sorted({e["device_id"] for e in entries}),
        )
        session.add(snapshot)
    ids = [e["id"] for e in entries]
    for i in range(0, len(ids), 500):  # bounded IN lists
        session.execute(update(Sample).where(Sample.id.in_(ids[i:i + 500]), Sample.snapshot_id.is_(None))
                        .values(snapshot_id=snapshot_id).execution_options(synchronize_session="fetch"))
    return snapshot


def build_snapshot(session: Session, store, parent_id: str | None) -> tuple[Snapshot, dict] | None:
    """Freeze every validated sample not yet in a snapshot and claim them at once (caller commits)."""
    frozen = freeze_snapshot(session, store, parent_id)
    if frozen is None:
        return None
    snapshot_id, body = frozen
    return claim_snapshot(session, snapshot_id, body), body


def is_validation(sample_id: str, val_fraction: float) -> bool:
    # Stable split by id: the same sample always lands on the same side, on every rebuild.
    # Divide by 2**32 so the bucket lies in [0, 1): with 0xFFFFFFFF one id in 2**32 reached 1.0
    # and stayed out of the validation split even at val_fraction=1.0.
    bucket = int(hashlib.sha256(sample_id.encode()).hexdigest()[:8], 16) / 0x1_0000_0000
    return bucket < val_fraction


def yolo_label_lines(labels: list[dict]) -> str:
    return "".join(f"{b['cls']} {b['cx']:.6f} {b['cy']:.6f} {b['w']:.6f} {b['h']:.6f}\n" for b in labels)


def split_entries(entries: list[dict], val_fraction: float) -> tuple[list[dict], list[dict]]:
    """A snapshot's (train, val) entries, as :func:`materialize` splits them: by id, and a snapshot
    whose ids give no validation sample lends its last training entry to the val split."""
    train = [e for e in entries if not is_validation(e["id"], val_fraction)]
    val = [e for e in entries if is_validation(e["id"], val_fraction)]
    if not val and train:
        val.append(train.pop())
    return train, val


def _write_entry(store, entry: dict, folder: Path) -> Path:
    """One sample as ``folder/images/<id><suffix>`` + ``folder/labels/<id>.txt``, its sha256 checked."""
    suffix = Path(entry["object_key"]).suffix or ".jpg"
    image_path = folder / "images" / f"{entry['id']}{suffix}"
    label_path = folder / "labels" / f"{entry['id']}.txt"
    image_path.parent.mkdir(parents=True, exist_ok=True)
    label_path.parent.mkdir(parents=True, exist_ok=True)
    data = store.get_bytes(entry["object_key"], max_bytes=64 * 1024 * 1024)
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ValueError(f"object {entry['object_key']} changed since the snapshot (sha256 mismatch)")
    image_path.write_bytes(data)
    label_path.write_text(yolo_label_lines(entry["labels"] or []))
    return image_path


def materialize(store, manifest: dict, root: Path, val_fraction: float) -> MaterializedDataset:
    """Download the snapshot's images into a YOLO layout, verifying each sha256."""
    train, val = [], []
    for entry in manifest["samples"]:
        split = "val" if is_validation(entry["id"], val_fraction) else "train"
        (val if split == "val" else train).append(_write_entry(store, entry, root / split))
    if not val and train:  # a tiny snapshot still needs a new-data split to gate on
        val.append(train.pop())
        moved = root / "val" / "images" / val[0].name
        moved.parent.mkdir(parents=True, exist_ok=True)
        (root / "val" / "labels").mkdir(parents=True, exist_ok=True)
        val[0].rename(moved)
        label = root / "train" / "labels" / f"{moved.stem}.txt"
        label.rename(root / "val" / "labels" / label.name)
        val[0] = moved
    return MaterializedDataset(train_images=train, val_images=val, val_dir=root / "val" / "images")


def load_snapshot_manifest(store, snapshot_id: str) -> dict:
    """The stored manifest, checked against its content address (the id is its sha256)."""
    try:
        data = store.get_bytes(f"snapshots/{snapshot_id}.json", max_bytes=512 * 1024 * 1024)
    except Exception as exc:
        raise SnapshotError(f"snapshot {snapshot_id} is not in the object store: {exc}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != snapshot_id:
        raise SnapshotError(f"snapshot manifest hashes to {digest[:12]}…, not its id {snapshot_id[:12]}…")
    return json.loads(data)


def rebuild_snapshot(store, snapshot_id: str, dest: Path, *, with_parents: bool = False) -> int:
    """Write the snapshot's images and YOLO labels to ``dest`` byte for byte; returns the image count.

    Every image is checked against the sha256 recorded in the manifest, so what comes out is
    exactly what trained the model. ``with_parents`` follows the chain to the first snapshot.
    """
    count, current = 0, snapshot_id
    while current:
        manifest = load_snapshot_manifest(store, current)
        for entry in manifest["samples"]:
            data = store.get_bytes(entry["object_key"], max_bytes=64 * 1024 * 1024)
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise SnapshotError(f"object {entry['object_key']} changed since snapshot {current[:12]}…")
            suffix = Path(entry["object_key"]).suffix or ".jpg"
            image = dest / "images" / f"{entry['id']}{suffix}"
            image.parent.mkdir(parents=True, exist_ok=True)
            image.write_bytes(data)
            label = dest / "labels" / f"{entry['id']}.txt"
            label.parent.mkdir(parents=True, exist_ok=True)
            label.write_text(yolo_label_lines(entry["labels"] or []))
            count += 1
        current = manifest["parent"] if with_parents else None
    return count


# ---------------------------------------------------------------------- history: the cumulative training set
#
# A retrain trains on its own snapshot's samples plus a bounded, deterministic selection of the
# samples of the snapshots before it (the ``parent`` chain), so that corrections from earlier
# lines are not forgotten. Walking the chain (I/O through a loader) is kept apart from the
# selection, which is a pure function of the manifests.


@dataclass(frozen=True)
class HistoryPick:
    """What one earlier snapshot contributes."""

    snapshot_id: str
    depth: int  # 1 = the job's parent, 2 = its parent, ...
    available: int  # its samples not already taken from a newer snapshot (nor in the new one)
    train: tuple[dict, ...]  # manifest entries, in the split they had when first used
    val: tuple[dict, ...]


@dataclass(frozen=True)
class HistorySelection:
    picks: tuple[HistoryPick, ...]
    max_images: int
    max_snapshots: int
    #: The chain went on past ``max_snapshots``: older snapshots were not looked at.
    truncated: bool = False

    @property
    def train(self) -> list[dict]:
        return [e for p in self.picks for e in p.train]

    @property
    def val(self) -> list[dict]:
        return [e for p in self.picks for e in p.val]

    def summary(self) -> dict:
        """JSON for the job's record: which snapshots, how many samples of each, under which rule."""
        return {"max_images": self.max_images, "max_snapshots": self.max_snapshots, "truncated": self.truncated,
                "train_images": len(self.train), "val_images": len(self.val),
                "snapshots": [{"id": p.snapshot_id, "depth": p.depth, "available": p.available,
                               "train": len(p.train), "val": len(p.val)} for p in self.picks]}


def walk_snapshot_chain(load: Callable[[str], dict], parent_id: str | None,
                        max_snapshots: int) -> tuple[list[tuple[str, dict]], bool]:
    """The manifests from ``parent_id`` back along ``parent``, newest first, at most ``max_snapshots``;
    and whether the chain went on past them.

    ``load`` is :func:`load_snapshot_manifest` bound to a store: each manifest is checked against
    its content address. A missing or tampered one raises :class:`SnapshotError` naming it and its
    place in the chain; the chain is never silently cut short (what the model learned from would
    no longer be what its lineage says).
    """
    chain: list[tuple[str, dict]] = []
    seen: set[str] = set()
    current = parent_id
    while current and len(chain) < max_snapshots:
        if current in seen:
            raise SnapshotError(f"snapshot chain loops back to {current[:12]}…")
        seen.add(current)
        try:
            manifest = load(current)
        except SnapshotError as exc:
            where = "the parent" if not chain else f"{len(chain) + 1} snapshots back"
            raise SnapshotError(f"history: snapshot {current[:12]}… ({where}) cannot be used: {exc}") from None
        chain.append((current, manifest))
        current = manifest.get("parent")
    return chain, bool(current)


def history_rank(sample_id: str) -> int:
    """A sample's place in the history draw: a stable hash of its id (not of the split's hash)."""
    return int(hashlib.sha256(b"history:" + sample_id.encode()).hexdigest()[:16], 16)


def _equal_shares(sizes: list[int], cap: int) -> list[int]:
    """Split ``cap`` into equal shares over the snapshots, a share a snapshot cannot fill going to
    the others (water-filling); when ``cap`` is smaller than the number of snapshots the newest get one."""
    quota = [0] * len(sizes)
    remaining = min(cap, sum(sizes))
    open_ = [i for i, n in enumerate(sizes) if n > 0]
    while remaining > 0 and open_:
        share = remaining // len(open_)
        if share == 0:
            for i in open_[:remaining]:
                quota[i] += 1
            break
        for i in open_:
            take = min(share, sizes[i] - quota[i])
            quota[i] += take
            remaining -= take
        open_ = [i for i in open_ if quota[i] < sizes[i]]
    return quota


def select_history(chain: Iterable[tuple[str, dict]], *, max_images: int, val_fraction: float,
                   exclude: Collection[str] = (), max_snapshots: int | None = None,
                   truncated: bool = False) -> HistorySelection:
    """The earlier snapshots' samples a retrain includes. Pure: the same chain gives the same set.

    Rule: at most ``max_images`` samples in all, shared equally between the snapshots of the
    chain (a snapshot with fewer samples than its share gives all it has and the rest goes to the
    others), so each earlier snapshot keeps a share however large the newer ones are. Within a
    snapshot the samples with the lowest :func:`history_rank` are taken, so a rerun or a resumed
    job gets the same set, and a larger cap only adds samples. A sample id already in ``exclude``
    (the new snapshot) or in a newer snapshot is not taken twice. Each chosen sample keeps the
    train/val side it had when first used (:func:`split_entries` over its whole snapshot).
    ``max_images`` 0 selects nothing.
    """
    chain = list(chain)
    if max_snapshots is not None:
        chain = chain[:max_snapshots]
    taken = set(exclude)
    pools: list[list[dict]] = []
    for _, manifest in chain:
        pool = []
        for entry in manifest["samples"]:
            if entry["id"] not in taken:
                taken.add(entry["id"])
                pool.append(entry)
        pools.append(pool)
    quotas = _equal_shares([len(p) for p in pools], max(0, max_images))
    picks = []
    for depth, ((snapshot_id, manifest), pool, quota) in enumerate(zip(chain, pools, quotas, strict=True), 1):
        chosen = {e["id"] for e in sorted(pool, key=lambda e: (history_rank(e["id"]), e["id"]))[:quota]}
        train, val = split_entries(manifest["samples"], val_fraction)
        picks.append(HistoryPick(snapshot_id, depth, len(pool), tuple(e for e in train if e["id"] in chosen),
                                 tuple(e for e in val if e["id"] in chosen)))
    return HistorySelection(tuple(picks), max_images, max_snapshots if max_snapshots is not None else len(chain),
                            truncated)


def materialize_history(store, selection: HistorySelection, root: Path) -> tuple[list[Path], list[Path]]:
    """Download the history samples into ``root/train`` and ``root/val`` (YOLO layout), verifying
    each sha256; returns (train images, val images)."""
    train = [_write_entry(store, e, root / "train") for e in selection.train]
    val = [_write_entry(store, e, root / "val") for e in selection.val]
    return train, val
