"""A model version's drift reference: the statistics of the data it was trained for.

The histograms come from ``edge_agent.drift_stats.StatsAccumulator`` -- the same code the device
runs per window -- over the version's images, with detections from the version's own weights
(Ultralytics predict, which matches the agent's ONNX Runtime pipeline box for box; see
tests/unit/edge_agent/test_inference_parity.py) at the device's confidence threshold. The server
stores the result beside the model's artifacts (``server.drift.reference``).

Run as ``python -m training.drift_reference --model model.pt --images list.txt --out ref.json``:
the server computes references in a subprocess so torch never loads into its process.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field

from edge_agent.drift_stats import STATS_VERSION, StatsAccumulator

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}
#: The agent's default detector thresholds (edge_agent.inference.postprocess DEFAULT_CONF/IOU).
DEVICE_CONF, DEVICE_IOU = 0.25, 0.7

#: (class ids, confidences) of one frame's detections.
FrameDetections = tuple[Sequence[int], Sequence[float]]


class ReferenceHistogram(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    edges: list[float]
    counts: list[int]


class ReferenceComponent(BaseModel):
    """The statistics of one population of the version's training data."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    frames: int
    histograms: dict[str, ReferenceHistogram]


class DriftReference(BaseModel):
    """What a version's input and output looked like on its own data, per population.

    A retrained version learned from more than one population (the replayed base data and the new
    samples from the line that drifted): each is a component, and the server judges a window
    against the component it resembles most -- "unlike every part of the training data" is drift,
    "like one part of it" is not, which a single pooled histogram could not tell apart.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    schema_: int = Field(1, alias="schema")
    stats_version: int = STATS_VERSION
    model_version: int | None = None
    num_classes: int
    conf: float
    components: dict[str, ReferenceComponent]
    source: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    @property
    def frames(self) -> int:
        return sum(c.frames for c in self.components.values())

    def to_json(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> DriftReference:
        return cls.model_validate_json(data)


def component_from_frames(frames: Iterable[tuple[np.ndarray, FrameDetections]],
                          num_classes: int) -> ReferenceComponent:
    """Accumulate ``(image, (classes, confidences))`` pairs exactly as a device window does."""
    acc = StatsAccumulator(num_classes)
    for image, (classes, confidences) in frames:
        acc.add_image(image)
        acc.add_detections(classes, confidences)
    if acc.frames == 0:
        raise ValueError("a drift reference component needs at least one image")
    return ReferenceComponent(frames=acc.frames, histograms={
        k: ReferenceHistogram(edges=list(e), counts=c) for k, (e, c) in acc.histograms().items()})


def images_of_data_yaml(data_yaml: Path, splits: Sequence[str] = ("val",)) -> list[Path]:
    """Image files of the named splits of an Ultralytics data.yaml (folders or list files)."""
    spec = yaml.safe_load(Path(data_yaml).read_text())
    root = Path(spec.get("path") or Path(data_yaml).parent)
    out: list[Path] = []
    for split in splits:
        entries = spec.get(split) or []
        for entry in entries if isinstance(entries, list) else [entries]:
            path = Path(entry) if Path(entry).is_absolute() else root / entry
            if path.is_dir():
                out.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
            elif path.is_file():
                out.extend(Path(line.strip()) for line in path.read_text().splitlines() if line.strip())
    return out


def spread(items: Sequence, limit: int) -> list:
    """An evenly spaced, deterministic subset of at most ``limit`` items."""
    if limit <= 0 or len(items) <= limit:
        return list(items)
    step = len(items) / limit
    return [items[int(i * step)] for i in range(limit)]


def ultralytics_detector(weights: Path, imgsz: int, *, conf: float = DEVICE_CONF, iou: float = DEVICE_IOU,
                         config_dir: Path | None = None) -> Callable[[list[np.ndarray]], list[FrameDetections]]:
    """A batch predictor over BGR frames with the device's thresholds."""
    from training.ultralytics_env import ensure_offline, network_guard

    ensure_offline(config_dir)
    from ultralytics import YOLO

    with network_guard():
        model = YOLO(str(weights))

    def predict(images: list[np.ndarray]) -> list[FrameDetections]:
        with network_guard():
            results = model.predict(images, imgsz=imgsz, conf=conf, iou=iou, device="cpu", verbose=False)
        return [(r.boxes.cls.int().tolist(), r.boxes.conf.tolist()) for r in results]

    return predict


def compute_reference(components: Mapping[str, Sequence[Path]],
                      predict: Callable[[list[np.ndarray]], list[FrameDetections]], num_classes: int, *,
                      conf: float = DEVICE_CONF, batch: int = 16, source: dict | None = None,
                      model_version: int | None = None) -> DriftReference:
    """The reference of a model (``predict``) over image files per component; unreadable files are
    skipped, and a component with no readable image is left out."""

    def frames(images: Sequence[Path]):
        for start in range(0, len(images), batch):
            loaded = [img for img in (cv2.imread(str(p), cv2.IMREAD_COLOR) for p in images[start:start + batch])
                      if img is not None]
            if loaded:
                yield from zip(loaded, predict(loaded), strict=True)

    built = {}
    for name, images in components.items():
        try:
            built[name] = component_from_frames(frames(images), num_classes)
        except ValueError:
            continue
    if not built:
        raise ValueError("no readable image in any component")
    return DriftReference(model_version=model_version, num_classes=num_classes, conf=conf, components=built,
                          source={"images": {k: len(v) for k, v in components.items()}, **(source or {})})


def _named(value: str) -> tuple[str, Path]:
    name, sep, path = value.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {value!r}")
    return name, Path(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.drift_reference", description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="weights (.pt) of the version")
    parser.add_argument("--images", type=_named, action="append", default=[], metavar="NAME=PATH",
                        help="a component: a text file of image paths, or a folder of images (repeatable)")
    parser.add_argument("--data", type=_named, action="append", default=[], metavar="NAME=YAML",
                        help="a component: the --split splits of an Ultralytics data.yaml (repeatable)")
    parser.add_argument("--split", action="append", default=[], help="splits of --data (default: train, val)")
    parser.add_argument("--limit", type=int, default=1000, help="images per component, evenly spaced")
    parser.add_argument("--imgsz", type=int, required=True)
    parser.add_argument("--classes", type=int, required=True, help="number of classes")
    parser.add_argument("--conf", type=float, default=DEVICE_CONF)
    parser.add_argument("--iou", type=float, default=DEVICE_IOU)
    parser.add_argument("--version", type=int, default=None)
    parser.add_argument("--config-dir", type=Path, default=None, help="Ultralytics config dir")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    components: dict[str, list[Path]] = {}
    for name, entry in args.images:
        listed = (sorted(p for p in entry.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if entry.is_dir()
                  else [Path(line.strip()) for line in entry.read_text().splitlines() if line.strip()])
        components.setdefault(name, []).extend(listed)
    for name, data in args.data:
        components.setdefault(name, []).extend(images_of_data_yaml(data, args.split or ["train", "val"]))
    components = {name: spread(images, args.limit) for name, images in components.items() if images}
    if not components:
        print("no images given", file=sys.stderr)
        return 2
    predict = ultralytics_detector(args.model, args.imgsz, conf=args.conf, iou=args.iou, config_dir=args.config_dir)
    reference = compute_reference(components, predict, args.classes, conf=args.conf, model_version=args.version,
                                  source={"model": args.model.name})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(reference.to_json())
    print(json.dumps({"event": "reference", "frames": reference.frames, "out": str(args.out)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
