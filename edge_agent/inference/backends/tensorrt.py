"""TensorRT backend: a serialized engine run with the ``tensorrt`` (>= 10) Python API.

Device memory and the stream come from NVIDIA's ``cuda-python`` runtime
bindings (``cuda.bindings.runtime``); no torch, no pycuda. Both are imported in
``load()`` only, so this module imports fine on machines without a GPU, where
``load()`` raises :class:`DetectorError`.

Engines exported by Ultralytics carry their metadata (``names``, ``imgsz``, ...)
as a 4-byte little-endian length + JSON header before the engine bytes; it is
read when present, and the settings can supply or override both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from edge_agent.inference.backends.base import Detector, DetectorError, DetectorSettings, register_backend


class TensorRtSettings(DetectorSettings):
    type: Literal["tensorrt"] = "tensorrt"
    device: int = Field(0, ge=0, description="CUDA device ordinal")


def read_engine_file(path: Path) -> tuple[dict[str, Any], bytes]:
    """``(ultralytics metadata or {}, serialized engine bytes)``."""
    data = path.read_bytes()
    n = int.from_bytes(data[:4], "little") if len(data) >= 4 else 0
    if 0 < n <= len(data) - 4:
        try:
            meta = json.loads(data[4 : 4 + n])
        except ValueError:  # raw engine bytes are not JSON: no header
            pass
        else:
            if isinstance(meta, dict):
                return meta, data[4 + n :]
    return {}, data


def _import_runtime() -> tuple[Any, Any]:
    try:
        import tensorrt as trt
    except ImportError as e:
        raise DetectorError("tensorrt is not installed") from e
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6
        except ImportError as e:
            raise DetectorError("cuda-python is not installed (needed by the tensorrt backend)") from e
    return trt, cudart


def _cuda(result: Any) -> Any:
    """Unwrap a cuda-python ``(err, *values)`` return, raising DetectorError on failure."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise DetectorError(f"CUDA error {err}")
    return values[0] if len(values) == 1 else tuple(values) or None


@register_backend("tensorrt")
class TensorRtDetector(Detector):
    settings_cls = TensorRtSettings
    settings: TensorRtSettings

    def __init__(self, model_path: str | Path, settings: TensorRtSettings | dict[str, Any] | None = None):
        super().__init__(model_path, settings)
        self._trt: Any = None
        self._cudart: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._stream: Any = None
        self._host: dict[str, np.ndarray] = {}
        self._device: dict[str, int] = {}
        self._input_name = ""
        self._output_name = ""
        self.metadata: dict[str, Any] = {}

    @property
    def loaded(self) -> bool:
        return self._context is not None

    def load(self) -> None:
        if self.loaded:
            return
        trt, cudart = _import_runtime()
        if not self.model_path.is_file():
            raise DetectorError(f"engine file not found: {self.model_path}")
        self._trt, self._cudart = trt, cudart
        try:
            self._load(trt, cudart)
            self.warmup()
        except Exception:
            self.close()
            raise

    def _load(self, trt: Any, cudart: Any) -> None:
        self.metadata, blob = read_engine_file(self.model_path)
        _cuda(cudart.cudaSetDevice(self.settings.device))
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engine = runtime.deserialize_cuda_engine(blob)
        if self._engine is None:
            raise DetectorError(
                f"cannot deserialize {self.model_path}; engines are tied to the TensorRT version and GPU arch "
                f"they were built for (this is TensorRT {trt.__version__})"
            )
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if len(inputs) != 1 or not outputs:
            raise DetectorError(
                f"expected one input and at least one output, got inputs={inputs} outputs={outputs}"
            )
        self._input_name, self._output_name = inputs[0], outputs[0]
        in_shape = tuple(self._engine.get_tensor_shape(self._input_name))
        if len(in_shape) != 4 or in_shape[0] != 1 or in_shape[1] != 3 or min(in_shape) < 1:
            raise DetectorError(f"expected a static input [1, 3, h, w], got {in_shape}")
        self._set_model_info(
            self.metadata.get("names"), self.metadata.get("imgsz"), (in_shape[2], in_shape[3])
        )
        self._input_dtype = trt.nptype(self._engine.get_tensor_dtype(self._input_name))

        self._context = self._engine.create_execution_context()
        self._stream = _cuda(cudart.cudaStreamCreate())
        for name in names:
            shape = tuple(self._engine.get_tensor_shape(name))
            host = np.empty(shape, dtype=trt.nptype(self._engine.get_tensor_dtype(name)))
            ptr = _cuda(cudart.cudaMalloc(host.nbytes))
            self._host[name], self._device[name] = host, int(ptr)
            self._context.set_tensor_address(name, int(ptr))

    def _forward(self, tensor: np.ndarray) -> np.ndarray:
        cudart = self._cudart
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        host_in = self._host[self._input_name]
        np.copyto(host_in, tensor, casting="same_kind")
        _cuda(
            cudart.cudaMemcpyAsync(
                self._device[self._input_name], host_in.ctypes.data, host_in.nbytes, h2d, self._stream
            )
        )
        if not self._context.execute_async_v3(self._stream):
            raise DetectorError("TensorRT execution failed")
        host_out = self._host[self._output_name]
        _cuda(
            cudart.cudaMemcpyAsync(
                host_out.ctypes.data, self._device[self._output_name], host_out.nbytes, d2h, self._stream
            )
        )
        _cuda(cudart.cudaStreamSynchronize(self._stream))
        return host_out.astype(np.float32, copy=True)

    def close(self) -> None:
        cudart = self._cudart
        if cudart is not None:
            for ptr in self._device.values():
                cudart.cudaFree(ptr)
            if self._stream is not None:
                cudart.cudaStreamDestroy(self._stream)
        self._device.clear()
        self._host.clear()
        self._context = self._engine = self._stream = None
