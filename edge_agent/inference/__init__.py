"""Device-side object detection: letterbox, runtime backends, decode + NMS.

>>> from edge_agent.inference import create_detector
>>> with create_detector("model.onnx", {"type": "onnxruntime"}) as det:   # doctest: +SKIP
...     result = det.infer(frame_bgr)
"""

from edge_agent.inference.backends import (
    Detector,
    DetectorError,
    DetectorSettings,
    OnnxRuntimeDetector,
    OnnxRuntimeSettings,
    TensorRtDetector,
    TensorRtSettings,
    available_backends,
    create_detector,
    get_backend,
    parse_settings,
    register_backend,
)
from edge_agent.inference.postprocess import decode, nms, postprocess
from edge_agent.inference.preprocess import Letterbox, letterbox, preprocess
from edge_agent.inference.types import Detection, InferenceResult, detections_to_arrays

__all__ = [
    "Detection",
    "Detector",
    "DetectorError",
    "DetectorSettings",
    "InferenceResult",
    "Letterbox",
    "OnnxRuntimeDetector",
    "OnnxRuntimeSettings",
    "TensorRtDetector",
    "TensorRtSettings",
    "available_backends",
    "create_detector",
    "decode",
    "detections_to_arrays",
    "get_backend",
    "letterbox",
    "nms",
    "parse_settings",
    "postprocess",
    "preprocess",
    "register_backend",
]
