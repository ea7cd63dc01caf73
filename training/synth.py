"""Deterministic synthetic factory data: parts on a conveyor with scratches, dents and stains.

Every frame is a pure function of ``(scenario, seed, index, imgsz)``: its random numbers come
from a :class:`numpy.random.Generator` seeded with those values (never from global state), so
the same arguments always give the same pixels and the same labels, on any machine with the
same numpy/OpenCV build.

Scenes are drawn in a 160-pixel reference frame and scaled to ``imgsz``, so a 320-pixel frame
shows the same scene as a 160-pixel one at twice the resolution.

Scenarios model the domain shifts a line meets after the seed model was trained:

* ``base`` -- brushed-steel plates on a grey belt under even light; dark scratches, shaded
  dents, rust-brown stains. The seed model and the golden set come from here.
* ``low_light`` -- the same parts under dim, cold, noisy light.
* ``new_variant`` -- a dark anodised part, whose scratches show bright bare metal.
* ``new_defect_look`` -- steel plates, but polished (bright) scratches and blue-green coolant stains.
* ``line_b`` -- the default demo shift: line B runs the anodised variant on a green belt under
  dim light, with coolant stains. A base-trained model loses most of its accuracy here.

Labels are YOLO rows ``(class_id, cx, cy, w, h)`` normalised to ``[0, 1]``.
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

#: Bump whenever rendering changes: it is part of every content hash (golden set, seed model).
GENERATOR_VERSION = "synth-3"

CLASS_NAMES: list[str] = ["scratch", "dent", "stain"]

#: The shift the demo uses when none is named.
DEFAULT_SHIFT = "line_b"

#: Reference frame size the scene geometry is defined in.
_REF = 160.0

Label = tuple[int, float, float, float, float]
BGR = tuple[int, int, int]


@dataclass(frozen=True)
class Scenario:
    """One recipe for a line's look: lighting, part, belt and how defects appear."""

    name: str
    description: str
    #: Global light gain range (1.0 = the seed line's exposure).
    light_gain: tuple[float, float] = (0.9, 1.1)
    #: Per-channel (B, G, R) multipliers: the colour of the light.
    light_tint: tuple[float, float, float] = (1.0, 1.0, 1.0)
    #: Standard deviation of the sensor noise, in grey levels.
    noise_sigma: float = 3.0
    #: "steel" (brushed, light, four bolt holes) or "anodised" (dark, centre bore, bright chamfer).
    part: str = "steel"
    #: Conveyor belt colour (BGR).
    belt_color: BGR = (62, 62, 62)
    #: "dark" scratches (grooves in steel) or "bright" ones (polished / bare metal).
    scratch_look: str = "dark"
    #: Palette stains are drawn from (BGR).
    stain_colors: tuple[BGR, ...] = ((30, 75, 140), (25, 60, 115), (40, 95, 160))


_RUST = ((30, 75, 140), (25, 60, 115), (40, 95, 160))
_COOLANT = ((150, 140, 30), (170, 120, 40), (120, 160, 40))

SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            name="base",
            description="Seed line: brushed-steel plates on a grey belt, even light; dark scratches, "
            "shaded dents, rust-brown stains.",
        ),
        Scenario(
            name="low_light",
            description="Same parts after the hall lighting changed: dim, cold, noisy light.",
            light_gain=(0.3, 0.45),
            light_tint=(1.15, 1.0, 0.8),
            noise_sigma=8.0,
        ),
        Scenario(
            name="new_variant",
            description="New product variant: dark anodised part with a centre bore; scratches "
            "expose bright bare metal.",
            part="anodised",
            scratch_look="bright",
        ),
        Scenario(
            name="new_defect_look",
            description="Steel plates, but a new supplier's process: polished (bright) scratches and "
            "blue-green coolant stains the seed data never shows.",
            scratch_look="bright",
            stain_colors=_COOLANT,
        ),
        Scenario(
            name="line_b",
            description="Line B (default demo shift): the anodised variant on a green belt under dim, "
            "cold light, with coolant stains.",
            light_gain=(0.5, 0.65),
            light_tint=(1.1, 1.0, 0.85),
            noise_sigma=6.0,
            part="anodised",
            belt_color=(60, 95, 55),
            scratch_look="bright",
            stain_colors=_COOLANT,
        ),
    )
}


def get_scenario(name: str) -> Scenario:
    """The scenario called ``name``; ``KeyError`` naming the known ones otherwise."""
    try:
        return SCENARIOS[name]
    except KeyError:
        raise KeyError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}") from None


def _rng(scenario: str, seed: int, index: int) -> np.random.Generator:
    if seed < 0 or index < 0:
        raise ValueError("seed and index must be non-negative")
    # crc32 of the name (not hash(): that is salted per process) keeps streams stable everywhere.
    key = zlib.crc32(f"{GENERATOR_VERSION}/{scenario}".encode())
    return np.random.default_rng([key, seed, index])


# ---------------------------------------------------------------------------------------------
# drawing


def _belt(rng: np.random.Generator, size: int, s: float, color: BGR) -> np.ndarray:
    img = np.empty((size, size, 3), np.float32)
    img[:] = np.asarray(color, np.float32) * rng.uniform(0.9, 1.1)
    # Belt texture: fine diagonal weave plus noise.
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    weave = 6.0 * np.sin((xx + yy) * (2 * math.pi / (6.0 * s)) + rng.uniform(0, 2 * math.pi))
    img += weave[..., None]
    img += rng.normal(0, 5.0, (size, size, 1)).astype(np.float32)
    # Cleats across the belt (the belt moves top to bottom).
    period = rng.uniform(45, 70) * s
    offset = rng.uniform(0, period)
    y = offset
    while y < size:
        y0 = int(y)
        cv2.rectangle(
            img, (0, y0), (size - 1, y0 + max(1, int(3 * s))), tuple(float(c) * 0.6 for c in color), -1
        )
        y += period
    return img


def _part(rng: np.random.Generator, img: np.ndarray, s: float, sc: Scenario) -> tuple[np.ndarray, tuple]:
    """Draw the part; return its mask and the inner rectangle defects may be placed in."""
    size = img.shape[0]
    w = rng.uniform(0.62, 0.82) * size
    h = rng.uniform(0.55, 0.78) * size
    cx = size / 2 + rng.uniform(-0.06, 0.06) * size
    cy = size / 2 + rng.uniform(-0.06, 0.06) * size
    angle = rng.uniform(-6, 6)
    box = cv2.boxPoints(((cx, cy), (w, h), angle)).astype(np.float32)
    mask = np.zeros((size, size), np.uint8)
    cv2.fillPoly(mask, [np.round(box * 16).astype(np.int32)], 255, cv2.LINE_AA, shift=4)
    m = (mask.astype(np.float32) / 255.0)[..., None]

    if sc.part == "steel":
        base = rng.uniform(165, 195)
        color = np.array([base * 1.02, base, base * 0.97], np.float32)
        streak_sigma = 9.0
    elif sc.part == "anodised":
        base = rng.uniform(38, 52)
        color = np.array([base * 1.35, base * 1.05, base * 0.85], np.float32)  # blue-black
        streak_sigma = 3.0
    else:  # pragma: no cover - guarded by the dataclass registry
        raise ValueError(f"unknown part {sc.part!r}")

    # Brushed texture: noise smeared along the part's long axis.
    streaks = rng.normal(0, streak_sigma, (size, size)).astype(np.float32)
    streaks = cv2.blur(streaks, (max(3, int(25 * s)) | 1, 1))
    surface = color[None, None, :] + streaks[..., None]
    # A soft sheen across the part.
    xx = np.linspace(-1, 1, size, dtype=np.float32)[None, :]
    surface += (12.0 if sc.part == "steel" else 8.0) * np.cos(xx * 1.5 + rng.uniform(-1, 1))[..., None]
    img[:] = img * (1 - m) + surface * m

    # Edge: a bright chamfer on anodised parts, a dark shadow line on steel.
    edge = (235, 235, 240) if sc.part == "anodised" else (90, 90, 90)
    cv2.polylines(
        img,
        [np.round(box * 16).astype(np.int32)],
        True,
        edge,
        max(1, int(round(1.2 * s))),
        cv2.LINE_AA,
        shift=4,
    )

    # Features: bolt holes in the corners (steel) or a centre bore (anodised).
    rot = cv2.getRotationMatrix2D((cx, cy), -angle, 1.0)
    keep_out: list[tuple[float, float, float]] = []
    if sc.part == "steel":
        r = 4.0 * s
        for fx, fy in ((-1, -1), (1, -1), (-1, 1), (1, 1)):
            p = rot @ np.array([cx + fx * (w / 2 - 9 * s), cy + fy * (h / 2 - 9 * s), 1.0])
            cv2.circle(
                img, (int(p[0] * 16), int(p[1] * 16)), int(r * 16), (30, 30, 30), -1, cv2.LINE_AA, shift=4
            )
            keep_out.append((float(p[0]), float(p[1]), r + 4 * s))
    else:
        r = rng.uniform(7, 10) * s
        cv2.circle(
            img,
            (int(cx * 16), int(cy * 16)),
            int((r + 2 * s) * 16),
            (200, 200, 205),
            max(1, int(s)),
            cv2.LINE_AA,
            shift=4,
        )
        cv2.circle(img, (int(cx * 16), int(cy * 16)), int(r * 16), (15, 15, 15), -1, cv2.LINE_AA, shift=4)
        keep_out.append((cx, cy, r + 6 * s))

    # Axis-aligned region safely inside the rotated part.
    inner = (cx - 0.42 * w, cy - 0.40 * h, cx + 0.42 * w, cy + 0.40 * h)
    return mask, (inner, keep_out)


def _scratch(rng: np.random.Generator, img: np.ndarray, s: float, sc: Scenario, center) -> tuple[float, ...]:
    size = img.shape[0]
    length = rng.uniform(34, 58) * s
    # Diagonal-ish only: near-axis scratches would make degenerate, hard-to-match boxes.
    theta = math.radians(rng.uniform(22, 68) + 90 * rng.integers(0, 2))
    dx, dy = math.cos(theta), math.sin(theta)
    n = 5
    ts = np.linspace(-0.5, 0.5, n) * length
    jitter = rng.normal(0, 1.6 * s, n)
    pts = np.stack([center[0] + ts * dx - jitter * dy, center[1] + ts * dy + jitter * dx], 1)
    thickness = max(1, int(round(rng.uniform(1.8, 2.6) * s)))
    mask = np.zeros((size, size), np.uint8)
    cv2.polylines(mask, [np.round(pts * 16).astype(np.int32)], False, 255, thickness, cv2.LINE_AA, shift=4)
    m = (mask.astype(np.float32) / 255.0)[..., None]
    if sc.scratch_look == "bright":
        color = np.array([238, 238, 242], np.float32) * rng.uniform(0.92, 1.0)
        glow = cv2.GaussianBlur(m, (0, 0), 1.5 * s)[..., None] * 0.35
        img[:] = img * (1 - glow) + color * glow
    else:
        color = np.full(3, rng.uniform(35, 60), np.float32)
    img[:] = img * (1 - m) + color * m
    pad = thickness / 2 + 1.5 * s
    return (pts[:, 0].min() - pad, pts[:, 1].min() - pad, pts[:, 0].max() + pad, pts[:, 1].max() + pad)


def _dent(rng: np.random.Generator, img: np.ndarray, s: float, sc: Scenario, center) -> tuple[float, ...]:
    size = img.shape[0]
    rx = rng.uniform(9, 15) * s
    ry = rx * rng.uniform(0.75, 1.0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    u = (xx - center[0]) / rx
    v = (yy - center[1]) / ry
    q = u * u + v * v
    inside = np.clip(1.0 - q, 0.0, 1.0)
    # Light from the top-left: a concave dent is dark on the lit side, bright on the far side.
    lx, ly = -0.7, -0.7
    shade = (u * -lx + v * -ly) * inside * 1.6
    amp = rng.uniform(55, 80)
    delta = amp * shade - 18.0 * inside
    # A thin raised rim catches light all round.
    rim = np.exp(-((np.sqrt(q) - 1.0) ** 2) / 0.02) * 22.0
    img += (delta + rim)[..., None]
    return (
        center[0] - rx - 1.5 * s,
        center[1] - ry - 1.5 * s,
        center[0] + rx + 1.5 * s,
        center[1] + ry + 1.5 * s,
    )


def _stain(rng: np.random.Generator, img: np.ndarray, s: float, sc: Scenario, center) -> tuple[float, ...]:
    size = img.shape[0]
    mask = np.zeros((size, size), np.float32)
    radius = rng.uniform(9, 15) * s
    for _ in range(int(rng.integers(3, 7))):
        ox, oy = rng.normal(0, 0.45 * radius, 2)
        ax = rng.uniform(0.45, 0.8) * radius
        ay = rng.uniform(0.45, 0.8) * radius
        cv2.ellipse(
            mask,
            (int((center[0] + ox) * 16), int((center[1] + oy) * 16)),
            (int(ax * 16), int(ay * 16)),
            float(rng.uniform(0, 180)),
            0,
            360,
            1.0,
            -1,
            cv2.LINE_AA,
            shift=4,
        )
    mask = cv2.GaussianBlur(mask, (0, 0), 1.2 * s)
    ys, xs = np.nonzero(mask > 0.25)
    color = np.asarray(sc.stain_colors[int(rng.integers(0, len(sc.stain_colors)))], np.float32)
    color = color * rng.uniform(0.85, 1.1)
    alpha = (mask * rng.uniform(0.75, 0.92))[..., None]
    mottling = 1.0 + rng.normal(0, 0.08, (size, size, 1)).astype(np.float32)
    img[:] = img * (1 - alpha) + (color * mottling) * alpha
    if len(xs) == 0:  # pragma: no cover - the first ellipse always lands
        return (center[0] - 1, center[1] - 1, center[0] + 1, center[1] + 1)
    return (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))


_DRAW: list[Callable] = [_scratch, _dent, _stain]
_HALF_EXTENT = [24.0, 15.0, 18.0]  # rough half size per class in the reference frame (placement)


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def render_frame(scenario: str, seed: int, index: int, imgsz: int = 160) -> tuple[np.ndarray, list[Label]]:
    """Render frame ``index`` of ``scenario`` under ``seed``.

    Returns a BGR ``uint8`` image of ``imgsz`` x ``imgsz`` and its YOLO labels
    ``(class_id, cx, cy, w, h)`` (normalised). The same arguments always return the same result.
    """
    sc = get_scenario(scenario)
    if imgsz < 32:
        raise ValueError("imgsz must be at least 32")
    rng = _rng(scenario, seed, index)
    s = imgsz / _REF
    img = _belt(rng, imgsz, s, sc.belt_color)
    _, (inner, keep_out) = _part(rng, img, s, sc)

    n_defects = int(rng.choice(4, p=[0.1, 0.3, 0.35, 0.25]))
    labels: list[Label] = []
    boxes: list[tuple[float, ...]] = []
    for _ in range(n_defects):
        cls = int(rng.integers(0, len(CLASS_NAMES)))
        half = _HALF_EXTENT[cls] * s * 0.7
        for _attempt in range(20):
            cx = rng.uniform(inner[0] + half, inner[2] - half)
            cy = rng.uniform(inner[1] + half, inner[3] - half)
            probe = (cx - half, cy - half, cx + half, cy + half)
            if any(_iou(probe, b) > 0.0 for b in boxes):
                continue
            if any(math.hypot(cx - kx, cy - ky) < kr + half for kx, ky, kr in keep_out):
                continue
            break
        else:
            continue  # no room left on this part
        box = _DRAW[cls](rng, img, s, sc, (cx, cy))
        x0, y0 = max(0.0, box[0]), max(0.0, box[1])
        x1, y1 = min(float(imgsz), box[2]), min(float(imgsz), box[3])
        if x1 - x0 < 2 or y1 - y0 < 2:  # pragma: no cover - placement keeps defects on the part
            continue
        boxes.append((x0, y0, x1, y1))
        labels.append(
            (cls, (x0 + x1) / 2 / imgsz, (y0 + y1) / 2 / imgsz, (x1 - x0) / imgsz, (y1 - y0) / imgsz)
        )

    # Lighting: exposure, colour of the light, a gradient falloff, then sensor noise.
    gain = rng.uniform(*sc.light_gain)
    img *= gain * np.asarray(sc.light_tint, np.float32)
    xx = np.linspace(-1, 1, imgsz, dtype=np.float32)
    direction = rng.uniform(0, 2 * math.pi)
    falloff = 1.0 - 0.12 * (math.cos(direction) * xx[None, :] + math.sin(direction) * xx[:, None])
    img *= falloff[..., None]
    img += rng.normal(0, sc.noise_sigma, img.shape).astype(np.float32)
    out = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return out, labels


# ---------------------------------------------------------------------------------------------
# writing datasets


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def encode_jpeg(img: np.ndarray, quality: int = 95) -> bytes:
    ok, buf = cv2.imencode(".jpg", img, [int(cv2.IMWRITE_JPEG_QUALITY), quality])
    if not ok:  # pragma: no cover
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def format_labels(labels: Iterable[Label]) -> str:
    """YOLO label file text (one ``cls cx cy w h`` row per box, six decimals)."""
    return "".join(f"{c} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n" for c, x, y, w, h in labels)


def parse_labels(text: str) -> list[Label]:
    out: list[Label] = []
    for line in text.splitlines():
        if line.strip():
            c, x, y, w, h = line.split()
            out.append((int(c), float(x), float(y), float(w), float(h)))
    return out


def _write_pair(img_path: Path, label_path: Path, scenario: str, seed: int, index: int, imgsz: int) -> None:
    img, labels = render_frame(scenario, seed, index, imgsz)
    _atomic_write(img_path, encode_jpeg(img))
    _atomic_write(label_path, format_labels(labels).encode())


def write_data_yaml(
    root: Path,
    train_dirs: Sequence[Path | str],
    val_dirs: Sequence[Path | str],
    names: Sequence[str] = tuple(CLASS_NAMES),
    *,
    filename: str = "data.yaml",
) -> Path:
    """Write an Ultralytics ``data.yaml`` in ``root``; ``train``/``val`` may list several image dirs.

    Paths are written absolute, so a mixed dataset can point into other datasets' folders
    (e.g. collected frames plus a replay of the seed data).
    """
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)

    def _q(p: Path | str) -> str:
        return '"' + str(Path(p).resolve()).replace("\\", "\\\\").replace('"', '\\"') + '"'

    def _list(dirs: Sequence[Path | str]) -> str:
        if not dirs:
            raise ValueError("at least one image directory is needed")
        return "[" + ", ".join(_q(d) for d in dirs) + "]"

    text = (
        f"# written by edgeloop training.synth ({GENERATOR_VERSION})\n"
        f"path: {_q(root)}\n"
        f"train: {_list(train_dirs)}\n"
        f"val: {_list(val_dirs)}\n"
        f"nc: {len(names)}\n"
        "names:\n" + "".join(f"  {i}: {n}\n" for i, n in enumerate(names))
    )
    out = root / filename
    _atomic_write(out, text.encode())
    return out


def write_yolo_dataset(
    root: Path,
    scenario: str,
    seed: int,
    n_train: int,
    n_val: int,
    imgsz: int,
    *,
    start_index: int = 0,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write a YOLO dataset (``images/{train,val}``, ``labels/{train,val}``, ``data.yaml``).

    Train frames are indices ``start_index ..< start_index + n_train``; val frames follow them,
    so the two splits never share a frame. ``progress`` is called with 1 per frame written.
    Returns the ``data.yaml`` path.
    """
    get_scenario(scenario)
    root = Path(root).resolve()
    for split, first, count in (
        ("train", start_index, n_train),
        ("val", start_index + n_train, n_val),
    ):
        img_dir, lbl_dir = root / "images" / split, root / "labels" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        lbl_dir.mkdir(parents=True, exist_ok=True)
        for index in range(first, first + count):
            stem = f"{scenario}_s{seed}_{index:06d}"
            _write_pair(img_dir / f"{stem}.jpg", lbl_dir / f"{stem}.txt", scenario, seed, index, imgsz)
            if progress:
                progress(1)
    return write_data_yaml(root, [root / "images" / "train"], [root / "images" / "val"], CLASS_NAMES)


def write_frames(
    out_dir: Path,
    scenario: str,
    seed: int,
    start: int,
    count: int,
    imgsz: int = 160,
    *,
    progress: Callable[[int], None] | None = None,
) -> list[Path]:
    """Write ``frame_{index:06d}.jpg`` plus a sibling ``frame_{index:06d}.txt`` YOLO label file.

    This is what an edge agent's folder source reads; the label file stands in for the QA
    correction of that frame. Ultralytics also accepts such a folder directly as a dataset
    split (labels beside images), provided its path has no ``images`` component.
    """
    get_scenario(scenario)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for index in range(start, start + count):
        img_path = out_dir / f"frame_{index:06d}.jpg"
        _write_pair(img_path, img_path.with_suffix(".txt"), scenario, seed, index, imgsz)
        paths.append(img_path)
        if progress:
            progress(1)
    return paths
