"""OpenVINO backend for Intel CPUs (and Intel GPUs/NPUs where the plugin exists).

Reads the same Ultralytics ONNX export the ONNX Runtime backend runs (fp32, or the INT8 QDQ
model from ``training.quantize``: OpenVINO turns QDQ pairs into its own low-precision ops), or an
OpenVINO IR ``.xml``. Class names and input size come from the ONNX metadata OpenVINO keeps in
the model's ``rt_info['framework']`` unless the settings override them.

``inference_precision`` matters on CPUs with AMX or AVX512-BF16 (Sapphire Rapids and later):
there OpenVINO's own default is bf16, about 2x faster than f32 but with coarser outputs (box
corners moved by up to a few pixels on the seed model). The default here is ``f32`` so the
device runs the numbers the golden-set gate judged; ``bf16`` (or ``None`` = the plugin's choice)
is an explicit opt-in, measured in ``benchmarks/README.md``.

``openvino`` is an optional dependency (the ``openvino`` extra), imported in ``load()`` only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from edge_agent.inference.backends.base import Detector, DetectorError, DetectorSettings, register_backend

_OV_TYPES = {"f32": np.float32, "f16": np.float16}


class OpenVinoSettings(DetectorSettings):
    type: Literal["openvino"] = "openvino"
    device: str = Field("CPU", min_length=1, description="OpenVINO device name: CPU, GPU, NPU, AUTO, ...")
    num_threads: int = Field(1, ge=0, description="INFERENCE_NUM_THREADS; 0 lets OpenVINO choose")
    num_streams: int = Field(1, ge=1, description="parallel inference streams (1 = lowest latency)")
    performance_hint: Literal["LATENCY", "THROUGHPUT"] = "LATENCY"
    inference_precision: Literal["f32", "bf16", "f16"] | None = Field(
        "f32", description="INFERENCE_PRECISION_HINT; None keeps the plugin's default (bf16 on AMX CPUs)"
    )
    cache_dir: Path | None = Field(None, description="OpenVINO model cache (compiled blobs) for faster load")


def _import_openvino() -> Any:
    try:
        import openvino
    except ImportError as e:
        raise DetectorError("openvino is not installed (pip install 'edgeloop[openvino]')") from e
    return openvino


def _framework_info(model: Any) -> dict[str, str]:
    """The ONNX ``metadata_props`` (Ultralytics: names, imgsz, task, ...) as OpenVINO keeps them."""
    try:
        if not model.has_rt_info(["framework"]):
            return {}
        info = model.get_rt_info()["framework"]
        return {str(k): v.astype(str) for k, v in info.items()}
    except Exception:  # IR files from other exporters carry other rt_info layouts
        return {}


@register_backend("openvino")
class OpenVinoDetector(Detector):
    settings_cls = OpenVinoSettings
    settings: OpenVinoSettings

    def __init__(self, model_path: str | Path, settings: OpenVinoSettings | dict[str, Any] | None = None):
        super().__init__(model_path, settings)
        self._compiled: Any = None
        self._request: Any = None
        self.metadata: dict[str, str] = {}
        self.execution: dict[str, str] = {}

    @property
    def loaded(self) -> bool:
        return self._request is not None

    def load(self) -> None:
        if self.loaded:
            return
        ov = _import_openvino()
        if not self.model_path.is_file():
            raise DetectorError(f"model file not found: {self.model_path}")
        s = self.settings
        core = ov.Core()
        if s.cache_dir is not None:
            s.cache_dir.mkdir(parents=True, exist_ok=True)
            core.set_property({"CACHE_DIR": str(s.cache_dir)})
        try:
            model = core.read_model(str(self.model_path))
        except Exception as e:  # OpenVINO raises plain RuntimeError for unreadable files
            raise DetectorError(f"cannot load {self.model_path}: {type(e).__name__}: {e}") from e
        try:
            self._inspect(model)
            config: dict[str, Any] = {
                "PERFORMANCE_HINT": s.performance_hint,
                "NUM_STREAMS": str(s.num_streams),
            }
            if s.num_threads:
                config["INFERENCE_NUM_THREADS"] = s.num_threads
            if s.inference_precision is not None:
                config["INFERENCE_PRECISION_HINT"] = s.inference_precision
            try:
                self._compiled = core.compile_model(model, s.device, config)
            except Exception as e:
                raise DetectorError(f"OpenVINO cannot compile {self.model_path} for {s.device}: {e}") from e
            self.execution = {
                "device": s.device,
                "inference_precision": _property(self._compiled, "INFERENCE_PRECISION_HINT"),
                "threads": _property(self._compiled, "INFERENCE_NUM_THREADS"),
                "streams": _property(self._compiled, "NUM_STREAMS"),
                "cpu_pinning": _property(self._compiled, "ENABLE_CPU_PINNING"),
                "openvino": ov.get_version(),
            }
            self._request = self._compiled.create_infer_request()
            self.warmup()
        except Exception:
            self.close()
            raise

    def _inspect(self, model: Any) -> None:
        if len(model.inputs) != 1:
            raise DetectorError(f"expected one model input, got {len(model.inputs)}")
        if not model.outputs:
            raise DetectorError("the model has no output")
        inp = model.inputs[0]
        shape = inp.get_partial_shape()
        if shape.rank.is_dynamic or shape.rank.get_length() != 4:
            raise DetectorError(f"expected input [1, 3, h, w], got {shape}")
        dims = [d.get_length() if d.is_static else None for d in shape]
        if dims[1] != 3:
            raise DetectorError(f"expected input [1, 3, h, w], got {shape}")
        if dims[0] not in (1, None):
            raise DetectorError(f"expected batch size 1, got input shape {shape}")
        etype = inp.get_element_type().get_type_name()
        if etype not in _OV_TYPES:
            raise DetectorError(f"unsupported input type {etype}")
        self.metadata = _framework_info(model)
        if self.metadata.get("task", "detect") != "detect":
            raise DetectorError(f"not a detection model (task={self.metadata['task']!r})")
        if self.metadata.get("end2end", "False").lower() == "true":
            raise DetectorError("end-to-end (NMS-included) exports are not supported; export with nms=False")
        self._set_model_info(self.metadata.get("names"), self.metadata.get("imgsz"), (dims[2], dims[3]))
        if dims[0] is None or dims[2] is None or dims[3] is None:
            h, w = self.imgsz
            model.reshape([1, 3, h, w])
        self._input_dtype = _OV_TYPES[etype]

    def _forward(self, tensor: np.ndarray) -> np.ndarray:
        # share_inputs: OpenVINO reads the contiguous numpy tensor in place (no copy into its own).
        out = self._request.infer({0: tensor}, share_inputs=True)[0]
        return np.array(out, dtype=np.float32, copy=True)  # the request reuses its output buffer

    def close(self) -> None:
        self._request = None
        self._compiled = None

    def describe(self) -> dict[str, Any]:
        """What is loaded, for status messages and logs."""
        return {
            "backend": self.name,
            "model": str(self.model_path),
            **self.execution,
            "imgsz": list(self.imgsz),
            "class_names": list(self.class_names),
            "ultralytics_version": self.metadata.get("version"),
        }

    def __repr__(self) -> str:
        return f"OpenVinoDetector({str(self.model_path)!r}, device={self.settings.device!r})"


def _property(compiled: Any, name: str) -> str:
    try:
        value = compiled.get_property(name)
    except Exception:  # not every device reports every property
        return ""
    return value.get_type_name() if hasattr(value, "get_type_name") else str(value)
