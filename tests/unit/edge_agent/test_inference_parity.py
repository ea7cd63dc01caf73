"""Parity: OnnxRuntimeDetector on an Ultralytics ONNX export == Ultralytics' own PyTorch predictions.

Trains a yolov8n from scratch for a few epochs on a tiny synthetic shapes
dataset (once per module), exports it as the training pipeline does, and
compares detections box by box on the photos shipped in the ultralytics
package and on synthetic frames of odd sizes.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_agent.inference import Detection, OnnxRuntimeDetector
from edge_agent.matching import iou_matrix

pytestmark = pytest.mark.slow

IMGSZ = 160
CLASSES = ("rectangle", "circle", "triangle")
# From scratch, 3 epochs (24 steps) leave every class score at its bias-init value (~0.004) on every
# frame: nothing to compare. 20 epochs of batch 8 without warm-up or mosaic (~50 s on 2 cores) give
# scores up to ~0.3 on the synthetic frames and a few boxes above 0.01 on the photos.
EPOCHS = 20
N_TRAIN, N_VAL = 60, 12



def synthetic_frame(
    rng: np.random.Generator, h: int, w: int
) -> tuple[np.ndarray, list[tuple[int, float, float, float, float]]]:
    """A noisy background with 1-4 filled shapes; YOLO labels (cls, cx, cy, bw, bh) normalised."""
    img = rng.integers(40, 90, size=(h, w, 3), dtype=np.uint8)
    img = cv2.GaussianBlur(img, (5, 5), 0)
    labels = []
    for _ in range(int(rng.integers(1, 5))):
        cls = int(rng.integers(0, len(CLASSES)))
        size = int(rng.integers(min(h, w) // 6, min(h, w) // 2.5))
        x0, y0 = int(rng.integers(0, w - size)), int(rng.integers(0, h - size))
        color = tuple(int(c) for c in rng.integers(120, 256, size=3))
        if cls == 0:
            bw, bh = size, int(size * rng.uniform(0.5, 1.0))
            cv2.rectangle(img, (x0, y0), (x0 + bw - 1, y0 + bh - 1), color, -1)
        elif cls == 1:
            bw = bh = size
            r = size // 2
            cv2.circle(img, (x0 + r, y0 + r), r, color, -1, lineType=cv2.LINE_AA)
        else:
            bw = bh = size
            pts = np.array(
                [[x0 + size // 2, y0], [x0, y0 + size - 1], [x0 + size - 1, y0 + size - 1]], np.int32
            )
            cv2.fillPoly(img, [pts], color, lineType=cv2.LINE_AA)
        labels.append((cls, (x0 + bw / 2) / w, (y0 + bh / 2) / h, bw / w, bh / h))
    return img, labels


def _write_dataset(root: Path, rng: np.random.Generator) -> Path:
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(n):
            h, w = int(rng.integers(180, 260)), int(rng.integers(200, 300))
            img, labels = synthetic_frame(rng, h, w)
            cv2.imwrite(str(root / "images" / split / f"{i:04d}.png"), img)
            lines = [f"{c} {cx:.6f} {cy:.6f} {bw:.6f} {bh:.6f}" for c, cx, cy, bw, bh in labels]
            (root / "labels" / split / f"{i:04d}.txt").write_text("\n".join(lines) + "\n")
    names = "\n".join(f"  {i}: {n}" for i, n in enumerate(CLASSES))
    data = root / "data.yaml"
    data.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n{names}\n")
    return data


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ultralytics_offline):
    """(best.pt, exported .onnx), trained once for the module."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("ultralytics")
    from ultralytics import YOLO

    root = tmp_path_factory.mktemp("parity")
    data = _write_dataset(root / "data", np.random.default_rng(0))
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    try:
        model = YOLO("yolov8n.yaml")
        model.train(
            data=str(data),
            epochs=EPOCHS,
            imgsz=IMGSZ,
            batch=8,
            device="cpu",
            workers=0,
            seed=0,
            warmup_epochs=0,
            mosaic=0.0,
            close_mosaic=0,
            amp=False,
            plots=False,
            val=False,
            verbose=False,
            project=str(root / "runs"),
            name="train",
            exist_ok=True,
        )
        best = Path(model.trainer.best)
        onnx_path = Path(
            YOLO(str(best)).export(
                format="onnx", imgsz=IMGSZ, opset=17, simplify=True, dynamic=False, nms=False, batch=1
            )
        )
    finally:
        torch.set_num_threads(threads)
    return best, onnx_path


def _frames() -> list[tuple[str, np.ndarray]]:
    import ultralytics

    frames = [
        (p.name, cv2.imread(str(p)))
        for p in sorted((Path(ultralytics.__file__).parent / "assets").glob("*.jpg"))
    ]
    assert frames, "ultralytics ships its sample photos in ultralytics/assets"
    rng = np.random.default_rng(123)
    for i, (h, w) in enumerate([(160, 160), (237, 311), (311, 237), (97, 401), (480, 640), (201, 199)]):
        frames.append((f"synthetic-{i}-{h}x{w}", synthetic_frame(rng, h, w)[0]))
    return frames


def _ultralytics_detections(model, frame: np.ndarray, conf: float) -> list[Detection]:
    # rect=False: Model.predict defaults to rect=True, which for a .pt model letterboxes to the smallest
    # stride-multiple rectangle (e.g. 128x160 for a portrait photo). The static ONNX export always
    # takes the full IMGSZ square, as does Ultralytics' own ONNX backend.
    r = model.predict(frame, imgsz=IMGSZ, conf=conf, iou=0.7, rect=False, device="cpu", verbose=False)[0]
    boxes = r.boxes
    return [
        Detection(int(c), float(s), *map(float, xyxy))
        for xyxy, s, c in zip(boxes.xyxy.tolist(), boxes.conf.tolist(), boxes.cls.tolist(), strict=True)
    ]


@pytest.mark.parametrize("conf", [0.05, 0.01])
def test_onnxruntime_detector_matches_ultralytics_predict(trained, conf):
    from ultralytics import YOLO

    best, onnx_path = trained
    reference = YOLO(str(best))
    total, worst_iou, worst_conf = 0, 1.0, 0.0
    with OnnxRuntimeDetector(onnx_path, {"providers": ["CPUExecutionProvider"], "conf": conf}) as det:
        assert det.class_names == CLASSES
        assert det.imgsz == (IMGSZ, IMGSZ)
        det.health_check()
        for name, frame in _frames():
            ours = list(det.infer(frame).detections)
            theirs = _ultralytics_detections(reference, frame, conf)
            assert len(ours) == len(theirs), f"{name}: {len(ours)} vs {len(theirs)} boxes"
            if not theirs:
                continue
            # Both lists come out by descending confidence; pair them by best IoU among same-class boxes.
            ious = iou_matrix([d.xyxy for d in ours], [d.xyxy for d in theirs])
            same = np.array([[a.cls == b.cls for b in theirs] for a in ours])
            ious = np.where(same, ious, -1.0)
            for i, a in enumerate(ours):
                j = int(ious[i].argmax())
                assert ious[i, j] >= 0.9, f"{name}: box {a} has no same-class partner at IoU >= 0.9"
                worst_iou = min(worst_iou, float(ious[i, j]))
                worst_conf = max(worst_conf, abs(a.conf - theirs[j].conf))
            total += len(ours)
    print(
        f"\nparity conf={conf}: {total} boxes compared, worst IoU {worst_iou:.6f}, worst |dconf| {worst_conf:.2e}"
    )
    assert total > 0, f"no boxes at conf {conf}: nothing was compared"
