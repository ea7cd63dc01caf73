"""INT8 quantization: decode-tail exclusion, calibration letterbox parity with the agent, a
quantized tiny network, and (slow) the golden-set gate on the seed model accepting a good INT8
model and refusing a broken one."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from training.quantize import (  # noqa: E402
    METADATA_KEY,
    QuantizationRejected,
    QuantizeConfig,
    decode_tail_nodes,
    find_images,
    pick_calibration_images,
    quantize_and_gate,
    quantize_onnx,
)


def _tiny_detector(path: Path, hw: int = 32, nc: int = 2) -> Path:
    """A small conv net shaped like a YOLOv8 head: two biased branch convs; the box branch goes
    through an unbiased 1x1 'DFL' conv and pixel arithmetic, scores through a sigmoid; concat."""
    rng = np.random.default_rng(0)

    def init(name: str, arr: np.ndarray):
        return numpy_helper.from_array(arr.astype(np.float32), name)

    inits = [
        init("w1", rng.normal(0, 0.3, (8, 3, 3, 3))), init("b1", rng.normal(0, 0.1, 8)),
        init("wb", rng.normal(0, 0.3, (4, 8, 1, 1))), init("bb", rng.normal(0, 0.1, 4)),
        init("wc", rng.normal(0, 0.3, (nc, 8, 1, 1))), init("bc", rng.normal(0, 0.1, nc)),
        init("wd", np.eye(4).reshape(4, 4, 1, 1)),
        init("stride", np.array(float(hw)).reshape(())),
        init("shape_b", np.array([1, 4, -1], np.float32)),
    ]
    inits[-1] = numpy_helper.from_array(np.array([1, 4, -1], np.int64), "shape_b")
    inits.append(numpy_helper.from_array(np.array([1, nc, -1], np.int64), "shape_c"))
    nodes = [
        helper.make_node("Conv", ["images", "w1", "b1"], ["c1"], name="stem/Conv", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Sigmoid", ["c1"], ["s1"], name="stem/Sigmoid"),
        helper.make_node("Mul", ["c1", "s1"], ["a1"], name="stem/Mul"),
        helper.make_node("Conv", ["a1", "wb", "bb"], ["box"], name="head/box/Conv"),
        helper.make_node("Conv", ["a1", "wc", "bc"], ["cls"], name="head/cls/Conv"),
        helper.make_node("Conv", ["box", "wd"], ["dfl"], name="head/dfl/Conv"),
        helper.make_node("Reshape", ["dfl", "shape_b"], ["box_r"], name="head/Reshape"),
        helper.make_node("Mul", ["box_r", "stride"], ["box_px"], name="head/Mul"),
        helper.make_node("Reshape", ["cls", "shape_c"], ["cls_r"], name="head/Reshape_1"),
        helper.make_node("Sigmoid", ["cls_r"], ["scores"], name="head/Sigmoid"),
        helper.make_node("Concat", ["box_px", "scores"], ["output0"], name="head/Concat", axis=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, hw, hw])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 4 + nc, (hw // 2) ** 2])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for k, v in {"names": "{0: 'a', 1: 'b'}", "imgsz": f"[{hw}, {hw}]", "task": "detect"}.items():
        e = model.metadata_props.add()
        e.key, e.value = k, v
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = int(rng.integers(20, 70)), int(rng.integers(20, 70))
        img = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (5, 5), 0)
        p = folder / f"im{i:03d}.png"
        cv2.imwrite(str(p), img)
        out.append(p)
    return out


def test_decode_tail_stops_at_the_biased_branch_convs(tmp_path):
    model = onnx.load(str(_tiny_detector(tmp_path / "m.onnx")))
    tail = decode_tail_nodes(model)
    assert tail == sorted(["head/dfl/Conv", "head/Reshape", "head/Mul", "head/Reshape_1", "head/Sigmoid",
                           "head/Concat"])


def test_calibration_images_are_sampled_reproducibly(tmp_path):
    paths = _images(tmp_path / "a", 6) + _images(tmp_path / "b" / "deep", 4, seed=1)
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    assert find_images([tmp_path]) == sorted(paths)
    first = pick_calibration_images([tmp_path / "a", tmp_path / "b"], 5, seed=3)
    assert first == pick_calibration_images([tmp_path / "a", tmp_path / "b"], 5, seed=3)
    assert len(first) == 5 and set(first) <= set(paths)
    assert pick_calibration_images([tmp_path], 50) == sorted(paths)
    with pytest.raises(FileNotFoundError):
        pick_calibration_images([tmp_path / "missing"], 5)
    with pytest.raises(ValueError, match="no calibration images"):
        pick_calibration_images([tmp_path / "a" / "notes.txt"], 5)


def test_calibration_tensor_is_the_agents_preprocess(ultralytics_offline):
    from edge_agent.inference.preprocess import preprocess
    from training.quantize import calibration_tensor

    rng = np.random.default_rng(5)
    for h, w, size in [(123, 77, (160, 160)), (256, 256, (160, 160)), (90, 200, (96, 128))]:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        np.testing.assert_array_equal(calibration_tensor(img, size), preprocess(img, size)[0])


def test_quantized_tiny_model_keeps_the_tail_fp32_and_close_outputs(tmp_path, ultralytics_offline):
    import onnxruntime as ort

    src = _tiny_detector(tmp_path / "m.onnx")
    images = _images(tmp_path / "calib", 12)
    qm = quantize_onnx(src, tmp_path / "q.onnx", images)
    assert qm.calibration_images == 12 and qm.imgsz == (32, 32)
    model = onnx.load(str(qm.path))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["names"] == "{0: 'a', 1: 'b'}" and meta["task"] == "detect"
    info = json.loads(meta[METADATA_KEY])
    assert info["format"] == "QDQ" and info["per_channel"] is True and info["calibration_images"] == 12
    # Quantized convs take int8 weights (through a DequantizeLinear); the DFL conv keeps fp32 ones,
    # and no decode-tail output is ever re-quantized.
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list[str]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n.op_type)
    int8_convs = {n.name for n in model.graph.node if n.op_type == "Conv"
                  and producer.get(n.input[1]) is not None and producer[n.input[1]].op_type == "DequantizeLinear"}
    assert int8_convs == {"stem/Conv", "head/box/Conv", "head/cls/Conv"}
    tail = [n for n in model.graph.node if n.name in set(qm.excluded_nodes)]
    assert {n.name for n in tail} == set(qm.excluded_nodes)
    for node in tail:
        for out in node.output:
            assert "QuantizeLinear" not in consumers.get(out, []), node.name
    from training.quantize import calibration_tensor

    x = calibration_tensor(cv2.imread(str(_images(tmp_path / "test", 1, seed=9)[0])), (32, 32))
    ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
    got = ort.InferenceSession(str(qm.path), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
    assert np.abs(ref[:, 4:] - got[:, 4:]).max() < 0.05  # scores
    assert not np.array_equal(ref, got)  # it really is another (quantized) computation


@pytest.mark.slow
def test_golden_gate_accepts_the_seed_int8_model_and_refuses_a_lossy_one(model_cache, ultralytics_offline, tmp_path):
    from training.golden import ensure_golden_set
    from training.seed_model import ensure_base_dataset, ensure_seed_model

    seed = ensure_seed_model(model_cache, "fast", config_dir=model_cache / "ultralytics")
    golden = ensure_golden_set(model_cache, 7, 200, seed.imgsz)
    train = ensure_base_dataset(model_cache, "fast").parent / "images" / "train"
    cfg = QuantizeConfig(calibration_images=64)

    out = tmp_path / "int8.onnx"
    qm, gate = quantize_and_gate(seed.onnx, out, [train], golden.data_yaml, cfg)
    assert gate.passed and out.is_file() and qm.path == out
    assert gate.fp32.map50_95 > 0.5  # the seed model is a real detector
    assert gate.map50_95_loss == pytest.approx(gate.fp32.map50_95 - gate.int8.map50_95)
    assert gate.map50_95_loss <= cfg.max_map_loss
    recorded = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}[METADATA_KEY])
    assert recorded["golden"]["int8_map50_95"] == pytest.approx(gate.int8.map50_95)

    # A tolerance no model can meet: refused, with the numbers, and nothing published.
    refused = tmp_path / "refused.onnx"
    with pytest.raises(QuantizationRejected) as exc:
        quantize_and_gate(seed.onnx, refused, [train], golden.data_yaml, cfg.model_copy(update={"max_map_loss": -1}))
    assert not refused.exists()
    assert exc.value.gate.int8.map50_95 == pytest.approx(gate.int8.map50_95, abs=0.02)

    # Quantizing the decode tail too (pixel boxes and scores on one uint8 scale) ruins the model.
    with pytest.raises(QuantizationRejected) as exc:
        quantize_and_gate(seed.onnx, refused, [train], golden.data_yaml,
                          cfg.model_copy(update={"exclude_decode_tail": False}))
    assert exc.value.gate.map50_95_loss > 0.3
    assert not refused.exists()
