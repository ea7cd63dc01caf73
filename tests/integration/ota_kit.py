"""Shared by the OTA integration tests (a helper module, not a test file): tiny detector models
with a constant, chosen output, and signed bundles of them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from firmware_bundles import build_bundle

CLASS_NAMES = ["bolt", "nut", "washer"]
IMGSZ = 32


def detector_onnx(path: Path, score: float, *, anchors: int = 8) -> Path:
    """A YOLOv8-shaped detector ([1, 4+nc, anchors]) that always sees one box of class 0 at ``score``
    (0 = it never detects anything): enough to load, pass the agent's test inference, and be told
    apart by the health check."""
    head = np.zeros((1, 4 + len(CLASS_NAMES), anchors), np.float32)
    head[0, :4, :] = 1.0
    head[0, :4, 0] = [16.0, 16.0, 12.0, 12.0]
    head[0, 4, 0] = score
    nodes = [
        helper.make_node("Constant", [], ["head"], value=numpy_helper.from_array(head)),
        helper.make_node("ReduceMean", ["images"], ["mean"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.zeros(1, np.float32))),
        helper.make_node("Mul", ["mean", "zero"], ["nothing"]),
        helper.make_node("Add", ["head", "nothing"], ["output0"]),
    ]
    graph = helper.make_graph(
        nodes, "const-head",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, IMGSZ, IMGSZ])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, list(head.shape))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    names = "{" + ", ".join(f"{i}: '{n}'" for i, n in enumerate(CLASS_NAMES)) + "}"
    for key, value in {"names": names, "imgsz": f"[{IMGSZ}, {IMGSZ}]", "task": "detect"}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
    return path


def detector_bundle(out: Path, work: Path, version: int, key, *, score: float = 0.9, padding: int = 0,
                    **build_kwargs) -> Path:
    """A signed bundle of ``detector_onnx``; ``padding`` bytes of extra payload make it span
    several download chunks (to interrupt a download half-way)."""
    work.mkdir(parents=True, exist_ok=True)
    files = {"model.onnx": detector_onnx(work / f"model-{version}-{score}.onnx", score)}
    if padding:
        extra = work / f"padding-{padding}.bin"
        extra.write_bytes(np.random.default_rng(version).bytes(padding))
        files["padding.bin"] = extra
    build_bundle(out, files, private_key=key, model_name="detector", version=version,
                 class_names=CLASS_NAMES, input_spec=IMGSZ, **build_kwargs)
    return out
