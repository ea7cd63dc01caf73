"""Checks on an exported ONNX model against the PyTorch weights it came from.

The parity check runs the same letterboxed tensors through both and compares the raw
``[1, 4 + classes, anchors]`` outputs, so a broken export is caught before any mAP is computed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np


@dataclass(frozen=True)
class ExportParity:
    opset: int
    images: int
    max_abs_diff: float
    # Largest difference among class scores only: boxes are in pixels, scores in [0, 1].
    max_score_diff: float
    tolerance: float
    passed: bool

    def as_dict(self) -> dict:
        return asdict(self)


def onnx_opset(onnx_path: Path) -> int:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def _tensor(image: np.ndarray, imgsz: int) -> np.ndarray:
    # Ultralytics' own letterbox (centre pad, grey 114), so both runtimes see identical input.
    from ultralytics.data.augment import LetterBox

    boxed = LetterBox((imgsz, imgsz), auto=False, stride=32)(image=image)
    rgb = boxed[:, :, ::-1].transpose(2, 0, 1)
    return np.ascontiguousarray(rgb, dtype=np.float32)[None] / 255.0


def check_export_parity(pt_path: Path, onnx_path: Path, images: list[Path], imgsz: int,
                        tolerance: float = 1e-2) -> ExportParity:
    """Compare PyTorch and ONNX Runtime outputs on ``images`` (class-score tolerance ``tolerance``)."""
    import onnxruntime as ort
    import torch

    from training.ultralytics_env import ensure_offline, network_guard

    ensure_offline()
    from ultralytics import YOLO

    with network_guard():
        model = YOLO(str(pt_path)).model.float().eval()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    max_abs = max_score = 0.0
    used = 0
    for path in images:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            continue
        x = _tensor(image, imgsz)
        with torch.no_grad():
            ref = model(torch.from_numpy(x))
        ref = (ref[0] if isinstance(ref, list | tuple) else ref).numpy()
        got = session.run(None, {input_name: x})[0]
        if ref.shape != got.shape:
            raise ValueError(f"ONNX output shape {got.shape} differs from PyTorch's {ref.shape}")
        diff = np.abs(ref - got)
        max_abs = max(max_abs, float(diff.max()))
        max_score = max(max_score, float(diff[:, 4:].max()))
        used += 1
    if not used:
        raise ValueError("no readable image to check the export against")
    return ExportParity(opset=onnx_opset(onnx_path), images=used, max_abs_diff=max_abs,
                        max_score_diff=max_score, tolerance=tolerance, passed=max_score <= tolerance)
