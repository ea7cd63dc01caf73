"""Detector backends; importing this package registers them (their runtimes load lazily)."""

from edge_agent.inference.backends import onnxruntime as _onnxruntime  # noqa: F401  (registers "onnxruntime")
from edge_agent.inference.backends import openvino as _openvino  # noqa: F401  (registers "openvino")
from edge_agent.inference.backends import tensorrt as _tensorrt  # noqa: F401  (registers "tensorrt")
from edge_agent.inference.backends.base import (
    Detector,
    DetectorError,
    DetectorSettings,
    available_backends,
    create_detector,
    get_backend,
    parse_settings,
    register_backend,
)
from edge_agent.inference.backends.onnxruntime import OnnxRuntimeDetector, OnnxRuntimeSettings
from edge_agent.inference.backends.openvino import OpenVinoDetector, OpenVinoSettings
from edge_agent.inference.backends.tensorrt import TensorRtDetector, TensorRtSettings

__all__ = [
    "Detector",
    "DetectorError",
    "DetectorSettings",
    "OnnxRuntimeDetector",
    "OnnxRuntimeSettings",
    "OpenVinoDetector",
    "OpenVinoSettings",
    "TensorRtDetector",
    "TensorRtSettings",
    "available_backends",
    "create_detector",
    "get_backend",
    "parse_settings",
    "register_backend",
]
