"""Detector backends: registry, settings, and the ONNX Runtime backend on tiny hand-built ONNX files."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pydantic
import pytest

from edge_agent.inference import (
    Detector,
    DetectorError,
    OnnxRuntimeDetector,
    OnnxRuntimeSettings,
    TensorRtDetector,
    available_backends,
    create_detector,
    get_backend,
    parse_settings,
)
from edge_agent.inference.backends.base import names_to_tuple, parse_imgsz
from edge_agent.inference.backends.onnxruntime import select_providers
from edge_agent.inference.backends.tensorrt import read_engine_file
from edge_agent.inference.preprocess import letterbox_params

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

NAMES = "{0: 'bolt', 1: 'nut'}"


def _const_head_model(
    path: Path,
    head: np.ndarray,
    input_hw: tuple[int, int] = (64, 96),
    metadata: dict[str, str] | None = None,
) -> Path:
    """An ONNX model whose output is always `head` (plus 0 * mean(input), so the input is used)."""
    h, w = input_hw
    nodes = [
        helper.make_node("Constant", [], ["head"], value=numpy_helper.from_array(head.astype(np.float32))),
        helper.make_node("ReduceMean", ["images"], ["mean"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.zeros(1, np.float32))),
        helper.make_node("Mul", ["mean", "zero"], ["nothing"]),
        helper.make_node("Add", ["head", "nothing"], ["output0"]),
    ]
    graph = helper.make_graph(
        nodes,
        "head",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, h, w])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, list(head.shape))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    meta = {"names": NAMES, "imgsz": f"[{h}, {w}]", "task": "detect", "stride": "32", "end2end": "False"}
    meta.update(metadata or {})
    for k, v in meta.items():
        if v is not None:
            entry = model.metadata_props.add()
            entry.key, entry.value = k, v
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _head_with_box(xyxy=(10.0, 20.0, 40.0, 50.0), cls=1, score=0.9, nc=2, anchors=8) -> np.ndarray:
    out = np.zeros((1, 4 + nc, anchors), np.float32)
    out[0, :4] = [[1.0], [1.0], [1.0], [1.0]]
    x1, y1, x2, y2 = xyxy
    out[0, :4, 0] = [(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]
    out[0, 4 + cls, 0] = score
    return out


@pytest.fixture
def model_path(tmp_path):
    return _const_head_model(tmp_path / "m.onnx", _head_with_box())


CPU = {"providers": ["CPUExecutionProvider"]}


# --- import hygiene ------------------------------------------------------------------------------------


def test_importing_inference_pulls_in_no_heavy_runtime():
    """The device has no torch; onnxruntime/tensorrt load only when a backend is loaded."""
    import subprocess
    import sys

    code = (
        "import sys, edge_agent.inference, edge_agent.matching\n"
        "bad = sorted({m.split('.')[0] for m in sys.modules} & "
        "{'torch', 'ultralytics', 'onnxruntime', 'tensorrt', 'onnx', 'server', 'training'})\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --- registry & settings ---------------------------------------------------------------------------------


def test_registry_lists_the_backends_with_their_settings():
    assert {"onnxruntime", "openvino", "tensorrt"} <= set(available_backends())
    assert get_backend("onnxruntime") is OnnxRuntimeDetector
    assert get_backend("tensorrt") is TensorRtDetector
    with pytest.raises(DetectorError, match="unknown detector backend"):
        get_backend("coreml")


def test_parse_settings_picks_the_backend_class_and_validates():
    s = parse_settings({"type": "onnxruntime", "intra_op_threads": 2, "conf": 0.4, "imgsz": 320})
    assert isinstance(s, OnnxRuntimeSettings)
    assert s.intra_op_threads == 2 and s.conf == 0.4 and s.imgsz == (320, 320)
    assert s.providers[0] == "TensorrtExecutionProvider"
    assert s.iou == 0.7 and s.max_det == 300
    with pytest.raises(pydantic.ValidationError):
        parse_settings({"type": "onnxruntime", "no_such_option": 1})
    with pytest.raises(pydantic.ValidationError):
        parse_settings({"type": "onnxruntime", "conf": 2})
    with pytest.raises(pydantic.ValidationError):
        parse_settings({"type": "tensorrt", "intra_op_threads": 2})  # an onnxruntime-only option
    with pytest.raises(DetectorError, match="type"):
        parse_settings({"conf": 0.3})
    names = parse_settings({"type": "tensorrt", "class_names": {1: "b", 0: "a"}}).class_names
    assert names == ("a", "b")


def test_defaults():
    s = OnnxRuntimeSettings()
    assert s.providers == ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    assert s.intra_op_threads == 1 and s.conf == 0.25 and s.iou == 0.7


def test_select_providers_keeps_priority_and_filters():
    avail = ["AzureExecutionProvider", "CPUExecutionProvider", "CUDAExecutionProvider"]
    wanted = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert select_providers(wanted, avail) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    with pytest.raises(DetectorError, match="none of the providers"):
        select_providers(["TensorrtExecutionProvider"], avail)


def test_metadata_parsers():
    assert names_to_tuple(NAMES) == ("bolt", "nut")
    assert names_to_tuple({"0": "a", "1": "b"}) == ("a", "b")  # JSON keys (TensorRT engine header)
    assert names_to_tuple(["x"]) == ("x",)
    with pytest.raises(DetectorError, match="without gaps"):
        names_to_tuple("{0: 'a', 2: 'c'}")
    with pytest.raises(DetectorError):
        names_to_tuple("{0: 'a'")
    assert parse_imgsz("[160, 160]") == (160, 160)
    assert parse_imgsz(320) == (320, 320)
    assert parse_imgsz([96, 128]) == (96, 128)
    with pytest.raises(DetectorError):
        parse_imgsz("[0, 160]")


# --- onnxruntime backend -----------------------------------------------------------------------------------


def test_onnxruntime_reads_metadata_and_infers(model_path):
    det = OnnxRuntimeDetector(model_path, CPU)
    assert not det.loaded
    with pytest.raises(DetectorError, match="not loaded"):
        det.infer(np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(DetectorError, match="not loaded"):
        _ = det.class_names
    det.load()
    assert det.loaded and isinstance(det, Detector)
    assert det.class_names == ("bolt", "nut")
    assert det.imgsz == (64, 96)
    assert det.providers == ["CPUExecutionProvider"]
    assert det.describe()["class_names"] == ["bolt", "nut"]

    frame = np.zeros((200, 150, 3), np.uint8)  # tall frame: padded left/right
    result = det.infer(frame)
    assert result.latency_ms > 0
    assert len(result.detections) == 1
    d = result.detections[0]
    assert d.cls == 1 and d.conf == pytest.approx(0.9)
    lb = letterbox_params((200, 150), (64, 96))
    expected = lb.to_original(np.array([[10.0, 20.0, 40.0, 50.0]]))[0]
    assert d.xyxy == pytest.approx(tuple(expected.tolist()), abs=1e-4)
    assert d.x1 >= 0  # clipped: the box starts inside the left padding
    det.close()
    assert not det.loaded


def test_onnxruntime_settings_drive_postprocess(tmp_path):
    path = _const_head_model(tmp_path / "m.onnx", _head_with_box(score=0.3))
    with create_detector(path, {"type": "onnxruntime", **CPU}) as det:
        assert len(det.infer(np.zeros((64, 96, 3), np.uint8)).detections) == 1
    with create_detector(path, {"type": "onnxruntime", "conf": 0.5, **CPU}) as det:
        assert det.infer(np.zeros((64, 96, 3), np.uint8)).detections == ()


@pytest.mark.parametrize("level", ["disable", "basic", "extended", "layout", "all"])
def test_onnxruntime_graph_optimization_levels_give_the_same_detections(model_path, level):
    frame = np.zeros((64, 96, 3), np.uint8)
    with create_detector(model_path, {"type": "onnxruntime", "graph_optimization": level,
                                      "allow_spinning": False, **CPU}) as det:
        (d,) = det.infer(frame).detections
    assert (d.cls, round(d.conf, 5)) == (1, 0.9)
    with pytest.raises(pydantic.ValidationError):
        OnnxRuntimeSettings(graph_optimization="max")


def test_health_check_passes_and_catches_wrong_class_names(model_path):
    with OnnxRuntimeDetector(model_path, CPU) as det:
        assert det.health_check().latency_ms > 0
    wrong = OnnxRuntimeDetector(model_path, {"class_names": ["a", "b", "c"], **CPU})
    wrong.load()  # the names override is accepted...
    with pytest.raises(DetectorError, match=r"\[1, 7, anchors\]"):
        wrong.health_check()  # ...but the output does not fit them


def test_overrides_and_missing_metadata(tmp_path):
    bare = _const_head_model(
        tmp_path / "bare.onnx", _head_with_box(), metadata={"names": None, "imgsz": None}
    )
    with pytest.raises(DetectorError, match="class_names"):
        OnnxRuntimeDetector(bare, CPU).load()
    with OnnxRuntimeDetector(bare, {"class_names": ["x", "y"], **CPU}) as det:
        assert det.class_names == ("x", "y")
        assert det.imgsz == (64, 96)  # from the static input shape
    with pytest.raises(DetectorError, match="does not match the model's fixed input"):
        OnnxRuntimeDetector(bare, {"class_names": ["x", "y"], "imgsz": 160, **CPU}).load()


@pytest.mark.parametrize(
    ("metadata", "message"),
    [({"end2end": "True"}, "end-to-end"), ({"task": "segment"}, "not a detection model")],
)
def test_unsupported_exports_are_refused(tmp_path, metadata, message):
    path = _const_head_model(tmp_path / "m.onnx", _head_with_box(), metadata=metadata)
    det = OnnxRuntimeDetector(path, CPU)
    with pytest.raises(DetectorError, match=message):
        det.load()
    assert not det.loaded


def test_load_errors_are_detector_errors(tmp_path):
    with pytest.raises(DetectorError, match="not found"):
        OnnxRuntimeDetector(tmp_path / "missing.onnx", CPU).load()
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(DetectorError, match="cannot load"):
        OnnxRuntimeDetector(junk, CPU).load()
    with pytest.raises(DetectorError, match="none of the providers"):
        OnnxRuntimeDetector(junk, {"providers": ["NoSuchExecutionProvider"]}).load()


def test_grayscale_frames_are_accepted(model_path):
    with OnnxRuntimeDetector(model_path, CPU) as det:
        assert len(det.infer(np.zeros((50, 70), np.uint8)).detections) == 1


def test_settings_type_is_checked(model_path):
    from edge_agent.inference import TensorRtSettings

    with pytest.raises(TypeError):
        OnnxRuntimeDetector(model_path, TensorRtSettings())


# --- tensorrt backend --------------------------------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_tensorrt_load_without_tensorrt_is_a_clear_error(tmp_path):
    det = create_detector(tmp_path / "model.engine", {"type": "tensorrt", "class_names": ["a"]})
    assert isinstance(det, TensorRtDetector) and not det.loaded
    with pytest.raises(DetectorError, match="tensorrt is not installed"):
        det.load()
    det.close()  # harmless when nothing was loaded


def test_read_engine_file_with_and_without_ultralytics_header(tmp_path):
    import json

    meta = json.dumps({"names": {"0": "a"}, "imgsz": [160, 160]})
    with_header = tmp_path / "a.engine"
    with_header.write_bytes(len(meta).to_bytes(4, "little") + meta.encode() + b"\x00ENGINE")
    assert read_engine_file(with_header) == ({"names": {"0": "a"}, "imgsz": [160, 160]}, b"\x00ENGINE")
    raw = tmp_path / "b.engine"
    raw.write_bytes(b"\x10\x00\x00\x00ftrt-engine-bytes-not-json")
    assert read_engine_file(raw) == ({}, raw.read_bytes())
