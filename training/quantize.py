"""INT8 post-training static quantization of an exported YOLOv8 ONNX model, gated on the golden set.

ONNX Runtime's quantization tools (``onnxruntime.quantization``) write a QDQ model: int8 weights
(per output channel by default) and uint8 activations whose ranges come from calibration
images. ONNX Runtime (graph optimization 'extended' and up) fuses the QDQ pairs into int8
kernels; OpenVINO reads the same file and turns them into its own low-precision ops.

Calibration tensors are letterboxed exactly as the agent does it: Ultralytics' ``LetterBox``
(centred, grey 114, no stride rounding), BGR -> RGB, CHW, ``/ 255`` -- the edge agent's
``preprocess`` is tested bit-identical to that.

The detect head's decode tail (DFL softmax, box arithmetic in pixels, class sigmoids and the
final concat of pixel boxes with [0, 1] scores) stays fp32: quantizing it puts boxes of up to
``imgsz`` pixels and scores below 1 on one uint8 scale, and the golden mAP50-95 of the seed
model falls from 0.59 to 0.00. It is a few hundred operations on ``anchors`` values, a
negligible share of the time.

:func:`quantize_and_gate` only publishes an INT8 model whose golden-set mAP50-95 (Ultralytics'
validator, on the fp32 and the INT8 ONNX) lost at most ``max_map_loss``; otherwise it raises
:class:`QuantizationRejected` with the measured numbers. ``python -m training.quantize --help``.
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from firmware_bundles.fsutil import atomic_write_bytes
from training.ultralytics_env import ensure_offline, network_guard

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
#: ONNX metadata key holding how the model was quantized (and, once gated, the golden numbers).
METADATA_KEY = "edgeloop_quantization"


class QuantizeConfig(BaseModel):
    """How to quantize. Defaults measured on the seed model (golden mAP50-95 fp32 0.587 -> INT8 0.599)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    calibration_images: int = Field(128, ge=1, description="images drawn (seeded) from the calibration set")
    per_channel: bool = Field(True, description="one weight scale per output channel instead of per tensor")
    exclude_decode_tail: bool = Field(True, description="keep the detect head's decode ops fp32")
    calibrate_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    activation_type: Literal["uint8", "int8"] = "uint8"
    seed: int = 0
    max_map_loss: float = Field(
        0.01, description="largest golden mAP50-95 loss (fp32 - INT8, absolute) the gate accepts"
    )


class QuantizationRejected(RuntimeError):
    """The INT8 model lost more golden-set accuracy than the tolerance allows."""

    def __init__(self, gate: GateResult) -> None:
        super().__init__(
            f"INT8 model rejected: golden mAP50-95 {gate.int8.map50_95:.4f} vs fp32 {gate.fp32.map50_95:.4f} "
            f"(loss {gate.map50_95_loss:+.4f} > tolerance {gate.tolerance:.4f})"
        )
        self.gate = gate


@dataclass(frozen=True)
class QuantizedModel:
    path: Path
    source: Path
    imgsz: tuple[int, int]
    calibration_images: int
    excluded_nodes: tuple[str, ...]
    seconds: float
    config: QuantizeConfig


@dataclass(frozen=True)
class GateResult:
    """Golden-set metrics of the fp32 and INT8 ONNX models and the verdict."""

    fp32: Any  # training.yolo.EvalMetrics
    int8: Any
    map50_95_loss: float
    map50_loss: float
    tolerance: float
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fp32"], d["int8"] = self.fp32.to_dict(), self.int8.to_dict()
        return d


# --- calibration data -------------------------------------------------------------------------


def calibration_tensor(image_bgr: np.ndarray, imgsz: tuple[int, int]) -> np.ndarray:
    """``(1, 3, h, w)`` float32 RGB in [0, 1], letterboxed like the agent (and Ultralytics' predictor)."""
    from ultralytics.data.augment import LetterBox

    boxed = LetterBox(imgsz, auto=False, scale_fill=False, scaleup=True, center=True)(image=image_bgr)
    chw = np.ascontiguousarray(boxed[..., ::-1].transpose(2, 0, 1))
    return chw[None].astype(np.float32) / np.float32(255.0)


def find_images(sources: Sequence[Path]) -> list[Path]:
    """Image files in ``sources`` (files, or folders searched recursively), sorted."""
    found: set[Path] = set()
    for src in sources:
        src = Path(src)
        if src.is_dir():
            found.update(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif src.is_file():
            if src.suffix.lower() in IMAGE_SUFFIXES:
                found.add(src)
        else:
            raise FileNotFoundError(f"calibration source not found: {src}")
    return sorted(found)


def pick_calibration_images(sources: Sequence[Path], n: int, seed: int = 0) -> list[Path]:
    """A seeded random sample of ``n`` images (all when fewer), so reruns calibrate identically."""
    images = find_images(sources)
    if not images:
        raise ValueError(f"no calibration images under {[str(s) for s in sources]}")
    if len(images) <= n:
        return images
    return sorted(random.Random(seed).sample(images, n))


class _Reader:
    """``onnxruntime.quantization.CalibrationDataReader``: one letterboxed image per call."""

    def __init__(self, images: Sequence[Path], input_name: str, imgsz: tuple[int, int]) -> None:
        self._it: Iterator[Path] = iter(images)
        self._input_name, self._imgsz = input_name, imgsz

    def get_next(self) -> dict[str, np.ndarray] | None:
        for path in self._it:
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is not None:
                return {self._input_name: calibration_tensor(image, self._imgsz)}
        return None

    def __iter__(self):  # onnxruntime >= 1.17 may iterate the reader
        while (item := self.get_next()) is not None:
            yield item


# --- graph ------------------------------------------------------------------------------------


def decode_tail_nodes(model: Any) -> list[str]:
    """Names of the nodes between the head's last (biased) convolutions and the graph outputs.

    Walks back from the outputs and stops at every ``Conv`` with a bias: those are the last
    layers of the box and class branches, which quantize well. The DFL's fixed 1x1 ``Conv`` has
    no bias in Ultralytics' heads, so it stays on the fp32 side with the rest of the decode.
    """
    producer = {out: node for node in model.graph.node for out in node.output}
    tail: dict[str, None] = {}
    stack = [o.name for o in model.graph.output]
    while stack:
        node = producer.get(stack.pop())
        if node is None or node.name in tail:
            continue
        if node.op_type == "Conv" and len(node.input) >= 3 and node.input[2]:
            continue
        tail[node.name] = None
        stack.extend(node.input)
    if any(not name for name in tail):
        raise ValueError("the decode tail has unnamed nodes; cannot exclude them from quantization")
    return sorted(tail)


def _metadata(model: Any) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def _set_metadata(model: Any, meta: dict[str, str]) -> None:
    del model.metadata_props[:]
    for k, v in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v


def _imgsz_of(model: Any) -> tuple[int, int]:
    meta = _metadata(model)
    if "imgsz" in meta:
        v = ast.literal_eval(meta["imgsz"])
        return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    if len(dims) == 4 and dims[2].dim_value > 0 and dims[3].dim_value > 0:
        return (dims[2].dim_value, dims[3].dim_value)
    raise ValueError("the model embeds no imgsz and has no static input size; pass imgsz")


# --- quantize ---------------------------------------------------------------------------------


def quantize_onnx(
    fp32_onnx: Path,
    out_path: Path,
    calibration_images: Sequence[Path],
    config: QuantizeConfig | None = None,
    *,
    imgsz: int | tuple[int, int] | None = None,
) -> QuantizedModel:
    """Write an INT8 QDQ copy of ``fp32_onnx`` to ``out_path`` (atomically), calibrated on the images.

    ``calibration_images`` are used as given (see :func:`pick_calibration_images` to sample). The
    Ultralytics metadata (names, imgsz, ...) is carried over, plus :data:`METADATA_KEY`.
    No accuracy check here: :func:`quantize_and_gate` adds it.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    cfg = config or QuantizeConfig()
    ensure_offline()  # the calibration letterbox is Ultralytics' own
    fp32_onnx, out_path = Path(fp32_onnx), Path(out_path)
    images = list(calibration_images)
    if not images:
        raise ValueError("no calibration images")
    started = time.monotonic()
    source = onnx.load(str(fp32_onnx))
    meta = _metadata(source)
    hw = _imgsz_of(source) if imgsz is None else ((imgsz, imgsz) if isinstance(imgsz, int) else tuple(imgsz))
    input_name = source.graph.input[0].name

    with tempfile.TemporaryDirectory(prefix="edgeloop-quant-") as tmp:
        # Shape inference + ORT's basic graph clean-up first, as onnxruntime.quantization advises.
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_onnx), str(prepared), skip_symbolic_shape=True)
        excluded = decode_tail_nodes(onnx.load(str(prepared))) if cfg.exclude_decode_tail else []
        quantized = Path(tmp) / "int8.onnx"
        quantize_static(
            str(prepared),
            str(quantized),
            _Reader(images, input_name, hw),
            quant_format=QuantFormat.QDQ,
            per_channel=cfg.per_channel,
            activation_type=QuantType.QUInt8 if cfg.activation_type == "uint8" else QuantType.QInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=excluded,
            calibrate_method={
                "minmax": CalibrationMethod.MinMax,
                "entropy": CalibrationMethod.Entropy,
                "percentile": CalibrationMethod.Percentile,
            }[cfg.calibrate_method],
        )
        model = onnx.load(str(quantized))
    info = {
        **cfg.model_dump(exclude={"max_map_loss"}),
        "format": "QDQ",
        "tool": "onnxruntime.quantization",
        "calibration_images": len(images),  # used, which may be fewer than the config asked for
        "excluded_nodes": len(excluded),
    }
    _set_metadata(model, {**meta, METADATA_KEY: json.dumps(info, sort_keys=True)})
    atomic_write_bytes(out_path, model.SerializeToString())
    return QuantizedModel(
        path=out_path,
        source=fp32_onnx,
        imgsz=(int(hw[0]), int(hw[1])),
        calibration_images=len(images),
        excluded_nodes=tuple(excluded),
        seconds=time.monotonic() - started,
        config=cfg,
    )


def evaluate_quantized(
    fp32_onnx: Path,
    int8_onnx: Path,
    data_yaml: Path,
    imgsz: int,
    tolerance: float,
    *,
    config_dir: Path | None = None,
    fp32_metrics: Any = None,
) -> GateResult:
    """Golden-set mAP of both ONNX models by Ultralytics' validator; passed when the loss <= tolerance.

    ``fp32_metrics``: the fp32 ONNX model's golden EvalMetrics when the caller already has them."""
    from training import yolo

    fp32 = fp32_metrics or yolo.evaluate(Path(fp32_onnx), data_yaml, imgsz, config_dir=config_dir)
    int8 = yolo.evaluate(Path(int8_onnx), data_yaml, imgsz, config_dir=config_dir)
    loss = fp32.map50_95 - int8.map50_95
    return GateResult(
        fp32=fp32,
        int8=int8,
        map50_95_loss=loss,
        map50_loss=fp32.map50 - int8.map50,
        tolerance=tolerance,
        passed=loss <= tolerance,
    )


def quantize_and_gate(
    fp32_onnx: Path,
    out_path: Path,
    calibration_sources: Sequence[Path],
    golden_data_yaml: Path,
    config: QuantizeConfig | None = None,
    *,
    config_dir: Path | None = None,
    fp32_metrics: Any = None,
) -> tuple[QuantizedModel, GateResult]:
    """Quantize, evaluate on the golden set, and publish ``out_path`` only if the loss is tolerated.

    Raises :class:`QuantizationRejected` (``.gate`` holds the numbers) and leaves ``out_path``
    untouched when the INT8 model lost more than ``config.max_map_loss`` golden mAP50-95.
    """
    import onnx

    cfg = config or QuantizeConfig()
    ensure_offline(config_dir)
    out_path = Path(out_path)
    images = pick_calibration_images(calibration_sources, cfg.calibration_images, cfg.seed)
    with tempfile.TemporaryDirectory(prefix="edgeloop-quant-gate-") as tmp:
        # The validator names its run after the file, so keep the final name inside the temp dir.
        candidate = Path(tmp) / out_path.name
        qm = quantize_onnx(fp32_onnx, candidate, images, cfg)
        with network_guard():
            gate = evaluate_quantized(
                fp32_onnx, candidate, golden_data_yaml, qm.imgsz[0], cfg.max_map_loss, config_dir=config_dir,
                fp32_metrics=fp32_metrics,
            )
        if not gate.passed:
            raise QuantizationRejected(gate)
        model = onnx.load(str(candidate))
        meta = _metadata(model)
        info = json.loads(meta[METADATA_KEY])
        info["golden"] = {
            "fp32_map50_95": gate.fp32.map50_95,
            "int8_map50_95": gate.int8.map50_95,
            "map50_95_loss": gate.map50_95_loss,
            "tolerance": gate.tolerance,
        }
        meta[METADATA_KEY] = json.dumps(info, sort_keys=True)
        _set_metadata(model, meta)
        atomic_write_bytes(out_path, model.SerializeToString())
    return replace(qm, path=out_path), gate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.quantize", description="INT8 static quantization of a YOLOv8 ONNX export"
    )
    parser.add_argument("model", type=Path, help="fp32 ONNX export (Ultralytics, nms=False)")
    parser.add_argument("--out", type=Path, required=True, help="where the INT8 QDQ model goes")
    parser.add_argument("--calib", type=Path, nargs="+", required=True, help="calibration images or folders")
    parser.add_argument("--golden", type=Path, help="golden-set data.yaml; without it no accuracy gate runs")
    parser.add_argument("--images", type=int, default=QuantizeConfig().calibration_images)
    parser.add_argument("--tolerance", type=float, default=QuantizeConfig().max_map_loss,
                        help="largest golden mAP50-95 loss accepted")
    parser.add_argument("--per-tensor", action="store_true", help="one weight scale per tensor")
    parser.add_argument("--quantize-decode-tail", action="store_true",
                        help="also quantize the head's decode ops (destroys accuracy; for experiments)")
    args = parser.parse_args(argv)
    cfg = QuantizeConfig(calibration_images=args.images, max_map_loss=args.tolerance,
                         per_channel=not args.per_tensor, exclude_decode_tail=not args.quantize_decode_tail)
    if args.golden is None:
        images = pick_calibration_images(args.calib, cfg.calibration_images, cfg.seed)
        qm = quantize_onnx(args.model, args.out, images, cfg)
        print(json.dumps({"path": str(qm.path), "gated": False, "seconds": round(qm.seconds, 1)}))
        return 0
    try:
        qm, gate = quantize_and_gate(args.model, args.out, args.calib, args.golden, cfg)
    except QuantizationRejected as e:
        print(json.dumps({"rejected": str(e), "gate": e.gate.to_dict()}, indent=2))
        return 1
    print(json.dumps({"path": str(qm.path), "gate": gate.to_dict()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
