"""ONNX Runtime backend for Ultralytics YOLOv8 detect exports (``nms=False``, static batch 1).

Providers are tried in the configured priority order, keeping only those this
onnxruntime build offers (TensorRT EP -> CUDA EP -> CPU EP by default). Class
names and input size come from the metadata Ultralytics embeds in the ONNX
file (``names``, ``imgsz``), unless the settings override them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from edge_agent.inference.backends.base import Detector, DetectorError, DetectorSettings, register_backend

DEFAULT_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")

# ORT_ENABLE_LAYOUT exists from onnxruntime 1.22; older builds fall back to ORT_ENABLE_ALL.
_OPT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "layout": "ORT_ENABLE_LAYOUT",
    "all": "ORT_ENABLE_ALL",
}

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class OnnxRuntimeSettings(DetectorSettings):
    type: Literal["onnxruntime"] = "onnxruntime"
    providers: tuple[str, ...] = Field(DEFAULT_PROVIDERS, min_length=1, description="priority order")
    intra_op_threads: int = Field(1, ge=0, description="0 lets onnxruntime choose")
    inter_op_threads: int = Field(1, ge=0)
    graph_optimization: Literal["disable", "basic", "extended", "layout", "all"] = Field(
        "all",
        description="onnxruntime graph optimization level. 'extended' fuses QDQ pairs into int8 "
        "kernels (an INT8 model below it runs slower than fp32); 'all' adds the CPU layout (NCHWc) "
        "transforms: on the fp32 seed model 'all' ran 1.8x faster than 'basic' (benchmarks/README.md)",
    )
    allow_spinning: bool = Field(
        True, description="intra-op threads busy-wait between ops (ORT default); off frees cores for "
        "other work (shadow, uploads) at some latency when intra_op_threads > 1",
    )
    trt_fp16: bool = Field(True, description="TensorRT EP: build FP16 engines")
    trt_engine_cache_dir: Path | None = Field(None, description="TensorRT EP: cache built engines here")


def _import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError as e:
        raise DetectorError("onnxruntime is not installed") from e
    return onnxruntime


def select_providers(wanted: tuple[str, ...] | list[str], available: list[str]) -> list[str]:
    """``wanted`` in its own order, restricted to ``available``; DetectorError if none is left."""
    chosen = [p for p in dict.fromkeys(wanted) if p in available]
    if not chosen:
        raise DetectorError(f"none of the providers {list(wanted)} is available (available: {available})")
    return chosen


def provider_args(providers: list[str], settings: OnnxRuntimeSettings) -> list[Any]:
    """``providers`` as InferenceSession takes them, with options for the TensorRT EP: fp16, and the
    engine + timing caches in ``trt_engine_cache_dir`` (TensorRT builds take minutes; the cache
    keeps restarts fast)."""
    args: list[Any] = []
    for p in providers:
        if p == "TensorrtExecutionProvider":
            trt_opts: dict[str, Any] = {"trt_fp16_enable": settings.trt_fp16}
            if settings.trt_engine_cache_dir is not None:
                cache = str(settings.trt_engine_cache_dir)
                trt_opts |= {
                    "trt_engine_cache_enable": True,
                    "trt_engine_cache_path": cache,
                    "trt_timing_cache_enable": True,
                    "trt_timing_cache_path": cache,
                }
            args.append((p, trt_opts))
        else:
            args.append(p)
    return args


@register_backend("onnxruntime")
class OnnxRuntimeDetector(Detector):
    settings_cls = OnnxRuntimeSettings
    settings: OnnxRuntimeSettings

    def __init__(self, model_path: str | Path, settings: OnnxRuntimeSettings | dict[str, Any] | None = None):
        super().__init__(model_path, settings)
        self._session: Any = None
        self._input_name = ""
        self._output_name = ""
        self.providers: list[str] = []
        self.metadata: dict[str, str] = {}

    @property
    def loaded(self) -> bool:
        return self._session is not None

    def load(self) -> None:
        if self.loaded:
            return
        ort = _import_ort()
        if not self.model_path.is_file():
            raise DetectorError(f"model file not found: {self.model_path}")
        s = self.settings
        providers = select_providers(s.providers, ort.get_available_providers())
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = s.intra_op_threads
        opts.inter_op_num_threads = s.inter_op_threads
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = getattr(
            ort.GraphOptimizationLevel, _OPT_LEVELS[s.graph_optimization], ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        )
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if s.allow_spinning else "0")
        opts.log_severity_level = 3
        if s.trt_engine_cache_dir is not None and "TensorrtExecutionProvider" in providers:
            s.trt_engine_cache_dir.mkdir(parents=True, exist_ok=True)
        try:
            session = ort.InferenceSession(
                str(self.model_path), sess_options=opts, providers=provider_args(providers, s)
            )
        except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf/... types
            raise DetectorError(f"cannot load {self.model_path}: {type(e).__name__}: {e}") from e

        try:
            inputs, outputs = session.get_inputs(), session.get_outputs()
            if len(inputs) != 1:
                raise DetectorError(f"expected one model input, got {[i.name for i in inputs]}")
            inp = inputs[0]
            if len(inp.shape) != 4 or inp.shape[1] not in (3, "3"):
                raise DetectorError(f"expected input [1, 3, h, w], got {inp.shape}")
            if isinstance(inp.shape[0], int) and inp.shape[0] != 1:
                raise DetectorError(f"expected batch size 1, got input shape {inp.shape}")
            if inp.type not in _ORT_TYPES:
                raise DetectorError(f"unsupported input type {inp.type}")
            self.metadata = dict(session.get_modelmeta().custom_metadata_map)
            if self.metadata.get("task", "detect") != "detect":
                raise DetectorError(f"not a detection model (task={self.metadata['task']!r})")
            if self.metadata.get("end2end", "False").lower() == "true":
                raise DetectorError(
                    "end-to-end (NMS-included) exports are not supported; export with nms=False"
                )
            input_hw = (inp.shape[2], inp.shape[3])
            self._set_model_info(self.metadata.get("names"), self.metadata.get("imgsz"), input_hw)
            self._input_dtype = _ORT_TYPES[inp.type]
            self._input_name, self._output_name = inp.name, outputs[0].name
            self.providers = list(session.get_providers())
            self._session = session
            self.warmup()
        except Exception:
            self._session = None
            raise

    def _forward(self, tensor: np.ndarray) -> np.ndarray:
        out = self._session.run([self._output_name], {self._input_name: tensor})[0]
        return out if out.dtype == np.float32 else out.astype(np.float32)

    def close(self) -> None:
        self._session = None

    def describe(self) -> dict[str, Any]:
        """What is loaded, for status messages and logs."""
        return {
            "backend": self.name,
            "model": str(self.model_path),
            "providers": self.providers,
            "imgsz": list(self.imgsz),
            "class_names": list(self.class_names),
            "ultralytics_version": self.metadata.get("version"),
        }

    def __repr__(self) -> str:
        return f"OnnxRuntimeDetector({str(self.model_path)!r}, providers={self.providers})"
