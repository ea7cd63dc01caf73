"""Reading labeled datasets in YOLO format, as CVAT, Label Studio and Roboflow export them.

Layouts found by looking, in this order:

- a ``data.yaml`` (Ultralytics / Roboflow): ``names`` and split folders of ``images/``, with
  labels in the parallel ``labels/`` folder;
- CVAT "YOLO 1.1": ``obj.names`` and ``obj_*_data/`` folders with images and labels side by side;
- Label Studio: ``classes.txt`` beside ``images/`` and ``labels/``;
- a plain folder of images with a ``.txt`` label file beside each (class names given).

Class ids are remapped by *name* onto the registered class list, so a dataset exported with
another class order still lands on the right classes. A file that cannot be used is kept in
the result with its reason, never silently dropped.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from training.data_contract import IMAGE_SUFFIXES, ContractViolation, parse_yolo_labels


class ImportError_(ValueError):
    """The dataset as a whole cannot be read (no layout recognised, no class names)."""


@dataclass
class ImportItem:
    image: Path
    labels: list[dict] | None
    reason: str = ""  # why this file is refused; empty when usable


@dataclass
class ImportPlan:
    layout: str
    names: list[str]
    items: list[ImportItem] = field(default_factory=list)

    @property
    def usable(self) -> list[ImportItem]:
        return [i for i in self.items if not i.reason]

    @property
    def refused(self) -> list[ImportItem]:
        return [i for i in self.items if i.reason]


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _label_for(image: Path) -> Path:
    parts = list(image.parts)
    # Ultralytics' rule: the last "images" component becomes "labels".
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            candidate = Path(*parts).with_suffix(".txt")
            if candidate.exists():
                return candidate
            break
    return image.with_suffix(".txt")


def _names_from_yaml(value) -> list[str]:
    if isinstance(value, dict):
        return [str(value[k]) for k in sorted(value, key=int)]
    return [str(n) for n in value]


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def discover(root: Path, names: Sequence[str] | None = None) -> tuple[str, list[str], list[Path]]:
    """(layout, dataset class names, images) of a YOLO export rooted at ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise ImportError_(f"{root} is not a folder")
    for spec_name in ("data.yaml", "data.yml", "dataset.yaml"):
        spec_path = root / spec_name
        if spec_path.exists():
            spec = yaml.safe_load(spec_path.read_text()) or {}
            base = Path(spec.get("path") or root)
            base = base if base.is_absolute() else root / base
            images: list[Path] = []
            for split in ("train", "val", "valid", "test"):
                entries = spec.get(split) or []
                for entry in entries if isinstance(entries, list) else [entries]:
                    folder = Path(entry) if Path(entry).is_absolute() else base / entry
                    if not folder.exists():  # Roboflow writes "../train/images" for root/train/images
                        folder = root / str(entry).removeprefix("../")
                    if folder.is_dir():
                        images += _images(folder)
            if "names" not in spec:
                raise ImportError_(f"{spec_path} has no 'names'")
            return "data.yaml", _names_from_yaml(spec["names"]), sorted(set(images))
    if (root / "obj.names").exists():
        folders = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("obj_")]
        return "cvat-yolo", _read_lines(root / "obj.names"), sorted(p for f in folders for p in _images(f))
    if (root / "classes.txt").exists():
        return "label-studio", _read_lines(root / "classes.txt"), _images(root / "images"
                                                                          if (root / "images").is_dir() else root)
    if names:
        return "folder", list(names), _images(root)
    raise ImportError_(f"{root}: no data.yaml, obj.names or classes.txt; pass the class names for a plain folder")


def plan_import(root: Path, registered: Sequence[str], names: Sequence[str] | None = None) -> ImportPlan:
    layout, dataset_names, images = discover(root, names)
    lookup = {n.lower(): i for i, n in enumerate(registered)}
    remap = {i: lookup.get(n.lower()) for i, n in enumerate(dataset_names)}
    plan = ImportPlan(layout, dataset_names)
    for image in images:
        label_path = _label_for(image)
        if not label_path.exists():
            plan.items.append(ImportItem(image, None, f"no label file ({label_path.name})"))
            continue
        try:
            boxes = parse_yolo_labels(label_path.read_text(), f"{label_path.name}: ")
        except ContractViolation as exc:
            plan.items.append(ImportItem(image, None, str(exc)))
            continue
        reason, mapped = "", []
        for box in boxes:
            if not 0 <= box["cls"] < len(dataset_names):
                reason = f"class id {box['cls']} is not in the dataset's {len(dataset_names)} names"
                break
            target = remap[box["cls"]]
            if target is None:
                reason = (f"class {dataset_names[box['cls']]!r} is not registered "
                          f"(registered: {', '.join(registered)})")
                break
            mapped.append({**box, "cls": target})
        plan.items.append(ImportItem(image, None if reason else mapped, reason))
    return plan


def iter_batches(items: Sequence[ImportItem], size: int) -> Iterator[Sequence[ImportItem]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
