"""The data contract every training batch must meet before any training starts.

Checks per sample: the image decodes, its format, byte size, sides and pixel count are within
limits (sides and pixels read from the header before anything is decoded), the labels parse,
class ids are in the registered class list, boxes lie inside the image with a positive area;
across the batch: exact duplicates (sha256) and near duplicates (perceptual hash), and no
overlap with the golden set (leakage, exact or near). A rejected sample keeps its reason; a
batch with too many rejects halts with the report. Pure: bytes in, report out.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import imagehash
import numpy as np
from PIL import Image

from training.image_header import DEFAULT_MAX_PIXELS, ImageHeaderError, image_header_size

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
_MAGIC = {b"\xff\xd8\xff": "jpeg", b"\x89PNG\r\n\x1a\n": "png"}


class ContractViolation(ValueError):
    """One sample breaks the contract; the message is the reason kept with it."""


@dataclass(frozen=True)
class ContractLimits:
    class_names: tuple[str, ...]
    formats: frozenset[str] = frozenset({"jpeg", "png"})
    max_bytes: int = 8 * 1024 * 1024
    min_side: int = 16
    max_side: int = 4096
    # Width x height, read from the header before decoding: a small file may declare a huge image.
    max_pixels: int = DEFAULT_MAX_PIXELS
    # Perceptual-hash Hamming distance (of 256 bits) at or below which two images are the same scene.
    # 64-bit hashes put distinct synthetic frames as close as 4 bits; at 256 bits distinct frames
    # stayed >= 34 apart while noisy re-encodes of one frame moved <= 18 bits at p99.
    near_duplicate_distance: int = 24
    max_reject_fraction: float = 0.2
    # A class under this share of all boxes is flagged in the balance report.
    min_class_share: float = 0.05


@dataclass
class Candidate:
    sample_id: str
    data: bytes
    labels: list[dict] | None
    device_id: str = ""


@dataclass
class ContractReport:
    checked: int = 0
    accepted: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    class_counts: dict[str, int] = field(default_factory=dict)
    class_warnings: list[str] = field(default_factory=list)
    reject_reasons: dict[str, int] = field(default_factory=dict)
    halted: bool = False
    halt_reason: str = ""

    @property
    def reject_fraction(self) -> float:
        return len(self.rejected) / self.checked if self.checked else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "reject_fraction": round(self.reject_fraction, 4)}


HASH_SIZE = 16  # 16x16 = 256-bit pHash


def phash(image_bgr: np.ndarray) -> np.ndarray:
    """256-bit DCT perceptual hash (ImageHash), packed into 32 bytes."""
    rgb = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)
    return np.packbits(imagehash.phash(Image.fromarray(rgb), hash_size=HASH_SIZE).hash.reshape(-1))


def hamming(hashes: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Bit distance from ``value`` to each row of ``hashes`` (n x 32 bytes)."""
    if not len(hashes):
        return np.empty(0, dtype=np.int64)
    return np.unpackbits(np.bitwise_xor(hashes, value[None, :]), axis=1).sum(axis=1)


def _stack(hashes: list[np.ndarray]) -> np.ndarray:
    return np.stack(hashes) if hashes else np.empty((0, HASH_SIZE * HASH_SIZE // 8), dtype=np.uint8)


@dataclass
class ReferenceIndex:
    """Hashes of a set of images that training data must not overlap (the golden set)."""

    sha256: set[str] = field(default_factory=set)
    phashes: np.ndarray = field(default_factory=lambda: _stack([]))

    @classmethod
    def from_images(cls, paths: Iterable[Path]) -> ReferenceIndex:
        shas, hashes = set(), []
        for path in paths:
            data = Path(path).read_bytes()
            image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
            if image is None:
                continue
            shas.add(hashlib.sha256(data).hexdigest())
            hashes.append(phash(image))
        return cls(shas, _stack(hashes))

    @classmethod
    def from_data_yaml(cls, data_yaml: Path) -> ReferenceIndex:
        import yaml

        spec = yaml.safe_load(Path(data_yaml).read_text())
        root = Path(spec.get("path", Path(data_yaml).parent))
        paths: list[Path] = []
        for split in ("train", "val", "test"):
            entries = spec.get(split) or []
            for entry in entries if isinstance(entries, list) else [entries]:
                folder = Path(entry) if Path(entry).is_absolute() else root / entry
                if folder.is_dir():
                    paths.extend(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        return cls.from_images(sorted(set(paths)))


def parse_yolo_labels(text: str, where: str = "") -> list[dict]:
    """YOLO ``class cx cy w h`` lines (as CVAT, Label Studio and Roboflow export) into label dicts."""
    boxes = []
    for n, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 5:
            raise ContractViolation(f"{where}line {n}: expected 'class cx cy w h', got {line.strip()[:80]!r}")
        try:
            cls = int(parts[0])
            cx, cy, w, h = (float(p) for p in parts[1:])
        except ValueError:
            raise ContractViolation(f"{where}line {n}: expected an integer class and four numbers, "
                                    f"got {line.strip()[:80]!r}") from None
        boxes.append({"cls": cls, "cx": cx, "cy": cy, "w": w, "h": h})
    return boxes


def check_labels(labels: Sequence[dict], class_names: Sequence[str]) -> None:
    for i, box in enumerate(labels):
        try:
            cls = box["cls"]
            cx, cy, w, h = (float(box[k]) for k in ("cx", "cy", "w", "h"))
        except (KeyError, TypeError, ValueError):
            raise ContractViolation(f"label {i}: malformed box {box!r}") from None
        if not isinstance(cls, int) or isinstance(cls, bool):
            raise ContractViolation(f"label {i}: class id {cls!r} is not an integer")
        if not 0 <= cls < len(class_names):
            raise ContractViolation(f"label {i}: class id {cls} is outside the class list "
                                    f"({len(class_names)} classes: {', '.join(class_names)})")
        if not all(math.isfinite(v) for v in (cx, cy, w, h)):
            raise ContractViolation(f"label {i}: non-finite coordinate")
        if w <= 0 or h <= 0:
            raise ContractViolation(f"label {i}: box has no area (w={w:.4f}, h={h:.4f})")
        eps = 1e-3
        if cx - w / 2 < -eps or cy - h / 2 < -eps or cx + w / 2 > 1 + eps or cy + h / 2 > 1 + eps:
            raise ContractViolation(f"label {i}: box lies outside the image (cx={cx:.3f} cy={cy:.3f} "
                                    f"w={w:.3f} h={h:.3f})")


def decode_image(data: bytes, limits: ContractLimits) -> np.ndarray:
    """Byte size, format, then the sides and pixel count from the header, all before decoding, so
    that a few-KB file declaring 20000x20000 pixels never allocates them; then the decode itself."""
    if len(data) > limits.max_bytes:
        raise ContractViolation(f"image is {len(data)} bytes, over the {limits.max_bytes}-byte limit")
    kind = next((k for magic, k in _MAGIC.items() if data.startswith(magic)), None)
    if kind is None or kind not in limits.formats:
        raise ContractViolation(f"image format {kind or 'unknown'} is not one of {sorted(limits.formats)}")
    try:
        _, w, h = image_header_size(data)
    except ImageHeaderError as exc:
        raise ContractViolation(str(exc)) from None
    if min(h, w) < limits.min_side or max(h, w) > limits.max_side:
        raise ContractViolation(f"image is {w}x{h}; sides must lie in [{limits.min_side}, {limits.max_side}]")
    if w * h > limits.max_pixels:
        raise ContractViolation(f"image is {w}x{h} ({w * h} pixels), over the {limits.max_pixels}-pixel limit")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ContractViolation(f"image does not decode (corrupt or truncated {kind})")
    if image.shape[1::-1] != (w, h):  # the decoder must agree with the header checked above
        raise ContractViolation(f"image decodes to {image.shape[1]}x{image.shape[0]} but its header says {w}x{h}")
    return image


class DataContract:
    def __init__(self, limits: ContractLimits, golden: ReferenceIndex | None = None,
                 known_sha256: Iterable[str] = ()) -> None:
        self.limits = limits
        self.golden = golden or ReferenceIndex()
        # Images already in earlier snapshots: training twice on them is an exact duplicate too.
        self._known = set(known_sha256)

    def check_batch(self, candidates: Iterable[Candidate]) -> ContractReport:
        report = ContractReport()
        seen_sha: dict[str, str] = {}
        kept_hashes: list[np.ndarray] = []
        kept_ids: list[str] = []
        classes: Counter[int] = Counter()
        for cand in candidates:
            report.checked += 1
            try:
                sha = hashlib.sha256(cand.data).hexdigest()
                if cand.labels is None:
                    raise ContractViolation("sample has no labels")
                check_labels(cand.labels, self.limits.class_names)
                image = decode_image(cand.data, self.limits)
                if sha in self.golden.sha256:
                    raise ContractViolation("image is in the golden set (leakage)")
                if sha in self._known:
                    raise ContractViolation("exact duplicate of an image in an earlier snapshot")
                if sha in seen_sha:
                    raise ContractViolation(f"exact duplicate of sample {seen_sha[sha]}")
                value = phash(image)
                near_golden = hamming(self.golden.phashes, value)
                if len(near_golden) and near_golden.min() <= self.limits.near_duplicate_distance:
                    raise ContractViolation(f"near duplicate of a golden-set image (leakage; perceptual hash "
                                            f"distance {int(near_golden.min())})")
                near = hamming(_stack(kept_hashes), value)
                if len(near) and near.min() <= self.limits.near_duplicate_distance:
                    raise ContractViolation(f"near duplicate of sample {kept_ids[int(near.argmin())]} "
                                            f"(perceptual hash distance {int(near.min())})")
            except ContractViolation as exc:
                report.rejected[cand.sample_id] = str(exc)
                kind = str(exc).split(":")[0] if str(exc).startswith("label") else str(exc).split(" (")[0]
                report.reject_reasons[kind[:60]] = report.reject_reasons.get(kind[:60], 0) + 1
                continue
            seen_sha[sha] = cand.sample_id
            kept_hashes.append(value)
            kept_ids.append(cand.sample_id)
            report.accepted.append(cand.sample_id)
            classes.update(int(b["cls"]) for b in cand.labels)
        self._balance(report, classes)
        if report.checked and report.reject_fraction > self.limits.max_reject_fraction:
            report.halted = True
            report.halt_reason = (f"{len(report.rejected)} of {report.checked} samples "
                                  f"({report.reject_fraction:.0%}) break the data contract, over the "
                                  f"{self.limits.max_reject_fraction:.0%} limit")
        return report

    def _balance(self, report: ContractReport, classes: Counter[int]) -> None:
        total = sum(classes.values())
        names = self.limits.class_names
        report.class_counts = {names[i]: classes.get(i, 0) for i in range(len(names))}
        if not total:
            return
        for name, count in report.class_counts.items():
            if count / total < self.limits.min_class_share:
                report.class_warnings.append(
                    f"class {name!r} has {count} of {total} boxes ({count / total:.1%}), under "
                    f"{self.limits.min_class_share:.0%}: the model may not learn it from this batch")

