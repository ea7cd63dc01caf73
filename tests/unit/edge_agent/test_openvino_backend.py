"""OpenVINO backend: registry and settings, lazy import, loading tiny hand-built ONNX files, and
detections equal to the ONNX Runtime backend's on the seed model (slow: needs the trained model)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pydantic
import pytest

from edge_agent.inference.backends import (
    DetectorError,
    OnnxRuntimeDetector,
    OpenVinoDetector,
    OpenVinoSettings,
    available_backends,
    create_detector,
    parse_settings,
)
from edge_agent.matching import agreement_counts, iou_matrix

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

NAMES = "{0: 'bolt', 1: 'nut'}"


def _head_model(path: Path, input_hw=(64, 96), metadata: dict[str, str] | None = None) -> Path:
    """Output = a fixed head with one 'nut' box at (10, 20, 40, 50), score 0.9, plus a term that
    depends on the input (0.5 * mean(input) added to that score), so the input really flows."""
    h, w = input_hw
    head = np.zeros((1, 6, 8), np.float32)
    head[0, :4] = 1.0
    head[0, :4, 0] = [25.0, 35.0, 30.0, 30.0]
    head[0, 5, 0] = 0.4
    mask = np.zeros((1, 6, 8), np.float32)
    mask[0, 5, 0] = 0.5
    nodes = [
        helper.make_node("Constant", [], ["head"], value=numpy_helper.from_array(head)),
        helper.make_node("Constant", [], ["mask"], value=numpy_helper.from_array(mask)),
        helper.make_node("ReduceMean", ["images"], ["mean"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Mul", ["mask", "mean"], ["scaled"]),
        helper.make_node("Add", ["head", "scaled"], ["output0"]),
    ]
    graph = helper.make_graph(
        nodes,
        "head",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, h, w])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 6, 8])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    meta = {"names": NAMES, "imgsz": f"[{h}, {w}]", "task": "detect", "end2end": "False"}
    meta.update(metadata or {})
    for k, v in meta.items():
        if v is not None:
            entry = model.metadata_props.add()
            entry.key, entry.value = k, v
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


# --- without the runtime ----------------------------------------------------------------------


def test_openvino_is_registered_with_its_own_settings():
    assert "openvino" in available_backends()
    s = parse_settings({"type": "openvino", "num_threads": 2, "inference_precision": "bf16"})
    assert isinstance(s, OpenVinoSettings)
    assert (s.num_threads, s.inference_precision, s.device) == (2, "bf16", "CPU")
    assert OpenVinoSettings().inference_precision == "f32"  # the gated numbers, unless asked otherwise
    with pytest.raises(pydantic.ValidationError):
        parse_settings({"type": "openvino", "intra_op_threads": 1})  # an onnxruntime setting
    with pytest.raises(pydantic.ValidationError):
        OpenVinoSettings(inference_precision="int4")
    assert isinstance(create_detector("x.onnx", {"type": "openvino"}), OpenVinoDetector)


def test_importing_the_backends_does_not_import_openvino():
    code = "import sys, edge_agent.inference; assert 'openvino' not in sys.modules, 'imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_load_without_openvino_installed_is_a_detector_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # makes `import openvino` raise ImportError
    det = OpenVinoDetector(_head_model(tmp_path / "m.onnx"))
    with pytest.raises(DetectorError, match="openvino is not installed"):
        det.load()
    assert not det.loaded


# --- with the runtime -------------------------------------------------------------------------

ov = pytest.importorskip("openvino")


def test_loads_metadata_and_detects_through_the_shared_pipeline(tmp_path):
    path = _head_model(tmp_path / "m.onnx")
    with OpenVinoDetector(path, {"num_threads": 1}) as det:
        assert det.loaded
        assert det.class_names == ("bolt", "nut") and det.imgsz == (64, 96)
        assert det.describe()["inference_precision"] == "f32"
        frame = np.full((64, 96, 3), 255, np.uint8)  # mean input 1.0 -> score 0.4 + 0.5
        (d,) = det.infer(frame).detections
        assert d.cls == 1 and d.conf == pytest.approx(0.9, abs=1e-5)
        assert d.xyxy == pytest.approx((10.0, 20.0, 40.0, 50.0), abs=1e-4)
        # A black frame: score 0.4 - still above 0.25; a higher threshold drops it.
        assert det.infer(np.zeros((64, 96, 3), np.uint8)).detections[0].conf == pytest.approx(0.4, abs=1e-5)
        det.health_check()
    assert not det.loaded
    with OpenVinoDetector(path, {"conf": 0.5}) as det:
        assert det.infer(np.zeros((64, 96, 3), np.uint8)).detections == ()


def test_settings_override_metadata_and_bad_models_are_refused(tmp_path):
    bare = _head_model(tmp_path / "bare.onnx", metadata={"names": None, "imgsz": None})
    with pytest.raises(DetectorError, match="class names"):
        OpenVinoDetector(bare).load()
    with OpenVinoDetector(bare, {"class_names": ["a", "b"]}) as det:
        assert det.class_names == ("a", "b") and det.imgsz == (64, 96)  # size from the input shape
    seg = _head_model(tmp_path / "seg.onnx", metadata={"task": "segment"})
    with pytest.raises(DetectorError, match="not a detection model"):
        OpenVinoDetector(seg).load()
    with pytest.raises(DetectorError, match="not found"):
        OpenVinoDetector(tmp_path / "missing.onnx").load()
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(DetectorError, match="cannot load"):
        OpenVinoDetector(junk).load()
    with pytest.raises(DetectorError, match="imgsz"):
        OpenVinoDetector(bare, {"class_names": ["a", "b"], "imgsz": 32}).load()


def test_same_raw_output_as_onnxruntime_on_a_tiny_model(tmp_path):
    path = _head_model(tmp_path / "m.onnx")
    frame = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    with OpenVinoDetector(path) as a, OnnxRuntimeDetector(path, {"providers": ["CPUExecutionProvider"]}) as b:
        ra, rb = a.infer(frame).detections, b.infer(frame).detections
    assert len(ra) == len(rb) == 1
    assert ra[0].conf == pytest.approx(rb[0].conf, abs=1e-6)


# --- on the trained seed model ----------------------------------------------------------------


def _frames(n: int = 40) -> list[np.ndarray]:
    from training import synth

    return [synth.render_frame("base", 11, i, 224)[0] for i in range(n)]


@pytest.mark.slow
def test_detections_match_onnxruntime_on_the_seed_model(model_cache, ultralytics_offline):
    from training.seed_model import ensure_seed_model

    seed = ensure_seed_model(model_cache, "fast", config_dir=model_cache / "ultralytics")
    boxes = 0
    with OpenVinoDetector(seed.onnx) as vino, OnnxRuntimeDetector(
        seed.onnx, {"providers": ["CPUExecutionProvider"]}
    ) as ort:
        for frame in _frames():
            a, b = vino.infer(frame).detections, ort.infer(frame).detections
            assert [d.cls for d in a] == [d.cls for d in b]
            if not a:
                continue
            ious = np.diag(iou_matrix([d.xyxy for d in a], [d.xyxy for d in b]))
            assert ious.min() >= 0.9, ious
            boxes += len(a)
    assert boxes >= 40  # the comparison covered real detections


@pytest.mark.slow
def test_int8_model_on_openvino_agrees_with_onnxruntime_int8(model_cache, ultralytics_offline, tmp_path):
    from training.quantize import QuantizeConfig, pick_calibration_images, quantize_onnx
    from training.seed_model import ensure_base_dataset, ensure_seed_model

    seed = ensure_seed_model(model_cache, "fast", config_dir=model_cache / "ultralytics")
    train = ensure_base_dataset(model_cache, "fast").parent / "images" / "train"
    int8 = quantize_onnx(seed.onnx, tmp_path / "int8.onnx", pick_calibration_images([train], 32),
                         QuantizeConfig(calibration_images=32)).path
    agreed = total = 0
    with OpenVinoDetector(int8) as vino, OnnxRuntimeDetector(
        int8, {"providers": ["CPUExecutionProvider"]}
    ) as ort:
        for frame in _frames():
            a, t = agreement_counts(list(ort.infer(frame).detections), list(vino.infer(frame).detections), iou=0.5)
            agreed, total = agreed + a, total + t
    # Two runtimes dequantize in their own order: near-threshold boxes may differ, most must not.
    assert total >= 40 and agreed / total >= 0.9, (agreed, total)
