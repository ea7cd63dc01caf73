"""Detector interface and the backend registry.

Shaped like Frigate's ``frigate/detectors``: each backend is a plugin with its
own pydantic settings class whose ``type`` field names it, so a device config
can hold ``{"type": "onnxruntime", "intra_op_threads": 2}`` and be validated
against the right class (:func:`parse_settings`). Backends import their heavy
runtime (onnxruntime, tensorrt) only in ``load()``, so listing or configuring
them costs nothing on a device that lacks one.

The pipeline shared by all backends (letterbox, decode, NMS, timing, health
check) lives in :class:`Detector`; a backend supplies ``load``/``_forward``/``close``.
"""

from __future__ import annotations

import abc
import ast
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from edge_agent.inference.postprocess import DEFAULT_CONF, DEFAULT_IOU, DEFAULT_MAX_DET, postprocess
from edge_agent.inference.preprocess import PAD_VALUE, preprocess
from edge_agent.inference.types import InferenceResult


class DetectorError(RuntimeError):
    """A detector cannot be loaded or does not behave like the model it claims to be."""


class DetectorSettings(BaseModel):
    """Settings every backend understands. Subclasses add their own and fix ``type``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str
    conf: float = Field(
        DEFAULT_CONF, ge=0.0, le=1.0, description="minimum class score kept (strictly greater)"
    )
    iou: float = Field(
        DEFAULT_IOU, ge=0.0, le=1.0, description="NMS IoU above which the weaker box is dropped"
    )
    max_det: int = Field(DEFAULT_MAX_DET, ge=1)
    agnostic_nms: bool = False
    class_names: tuple[str, ...] | None = Field(
        None, description="override of the names embedded in the model (index = class id)"
    )
    imgsz: tuple[int, int] | None = Field(None, description="override of the model input size (h, w)")
    warmup_runs: int = Field(1, ge=0, description="inferences run on a blank frame at load()")

    @field_validator("class_names", mode="before")
    @classmethod
    def _names(cls, v: Any) -> Any:
        return names_to_tuple(v) if isinstance(v, Mapping) else v

    @field_validator("imgsz", mode="before")
    @classmethod
    def _imgsz(cls, v: Any) -> Any:
        return (v, v) if isinstance(v, int) else v


_REGISTRY: dict[str, type[Detector]] = {}


def register_backend(name: str) -> Callable[[type[Detector]], type[Detector]]:
    """Class decorator: make a :class:`Detector` subclass available under ``name``."""

    def deco(cls: type[Detector]) -> type[Detector]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"detector backend {name!r} is already registered by {_REGISTRY[name].__name__}")
        type_field = cls.settings_cls.model_fields.get("type")
        if type_field is None or type_field.default != name:
            raise TypeError(f"{cls.settings_cls.__name__}.type must default to {name!r}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def available_backends() -> tuple[str, ...]:
    """Registered backend names (not whether their runtime is installed: ``load()`` tells that)."""
    return tuple(sorted(_REGISTRY))


def get_backend(name: str) -> type[Detector]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise DetectorError(
            f"unknown detector backend {name!r}; known: {', '.join(available_backends())}"
        ) from None


def parse_settings(data: Mapping[str, Any] | DetectorSettings) -> DetectorSettings:
    """Validate a settings mapping against the class of the backend its ``type`` names."""
    if isinstance(data, DetectorSettings):
        return data
    if "type" not in data:
        raise DetectorError("detector settings need a 'type' naming the backend")
    return get_backend(str(data["type"])).settings_cls.model_validate(dict(data))


def create_detector(model_path: str | Path, settings: Mapping[str, Any] | DetectorSettings) -> Detector:
    """Instantiate (not load) the backend that ``settings`` names."""
    parsed = parse_settings(settings)
    return get_backend(parsed.type)(model_path, parsed)


def names_to_tuple(names: Any) -> tuple[str, ...]:
    """Class names from a list, a ``{id: name}`` mapping, or Ultralytics' ``"{0: 'a', 1: 'b'}"`` string."""
    if isinstance(names, str):
        try:
            names = ast.literal_eval(names)
        except (ValueError, SyntaxError) as e:
            raise DetectorError(f"cannot parse class names {names!r}: {e}") from None
    if isinstance(names, Mapping):
        try:
            by_id = {int(k): str(v) for k, v in names.items()}
        except (TypeError, ValueError) as e:
            raise DetectorError(f"class name keys must be integers: {names!r}") from e
        if sorted(by_id) != list(range(len(by_id))):
            raise DetectorError(f"class ids must be 0..n-1 without gaps, got {sorted(by_id)}")
        return tuple(by_id[i] for i in range(len(by_id)))
    if isinstance(names, list | tuple):
        return tuple(str(n) for n in names)
    raise DetectorError(f"unsupported class names {names!r}")


def parse_imgsz(value: Any) -> tuple[int, int]:
    """``(h, w)`` from ``160``, ``[160, 160]`` or Ultralytics' ``"[160, 160]"`` string."""
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError) as e:
            raise DetectorError(f"cannot parse imgsz {value!r}: {e}") from None
    if isinstance(value, int):
        value = (value, value)
    try:
        h, w = (int(v) for v in value)
    except (TypeError, ValueError):
        raise DetectorError(f"imgsz must be an int or [h, w], got {value!r}") from None
    if h <= 0 or w <= 0:
        raise DetectorError(f"imgsz must be positive, got {(h, w)}")
    return (h, w)


class Detector(abc.ABC):
    """A loaded object-detection model: ``infer(frame_bgr) -> InferenceResult``.

    Lifecycle: ``__init__`` only records arguments; ``load()`` opens the runtime,
    reads class names and input size, and warms up; ``close()`` releases it.
    Usable as a context manager (``with create_detector(...) as det:``).
    Not thread-safe: give each thread its own instance.
    """

    name: ClassVar[str] = ""
    settings_cls: ClassVar[type[DetectorSettings]] = DetectorSettings

    def __init__(self, model_path: str | Path, settings: DetectorSettings | Mapping[str, Any] | None = None):
        self.model_path = Path(model_path)
        if settings is None:
            settings = self.settings_cls()
        elif isinstance(settings, Mapping):
            settings = self.settings_cls.model_validate({"type": self.name, **settings})
        elif not isinstance(settings, self.settings_cls):
            raise TypeError(
                f"{type(self).__name__} needs {self.settings_cls.__name__}, got {type(settings).__name__}"
            )
        self.settings = settings
        self._class_names: tuple[str, ...] | None = None
        self._imgsz: tuple[int, int] | None = None
        self._input_dtype: type = np.float32

    # --- to implement -------------------------------------------------------------------------

    @abc.abstractmethod
    def load(self) -> None:
        """Open the model, set ``_class_names``/``_imgsz`` (via :meth:`_set_model_info`), then :meth:`warmup`."""

    @abc.abstractmethod
    def _forward(self, tensor: np.ndarray) -> np.ndarray:
        """Run the model on a ``(1, 3, h, w)`` tensor; return the raw ``[1, 4+nc, anchors]`` output."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the runtime; idempotent."""

    @property
    @abc.abstractmethod
    def loaded(self) -> bool: ...

    # --- shared -----------------------------------------------------------------------------------

    @property
    def class_names(self) -> tuple[str, ...]:
        if self._class_names is None:
            raise DetectorError(f"{type(self).__name__} is not loaded")
        return self._class_names

    @property
    def imgsz(self) -> tuple[int, int]:
        """Model input size ``(h, w)``."""
        if self._imgsz is None:
            raise DetectorError(f"{type(self).__name__} is not loaded")
        return self._imgsz

    def _set_model_info(
        self, embedded_names: Any, embedded_imgsz: Any, input_hw: tuple[int | None, int | None] | None
    ) -> None:
        """Resolve class names and input size: explicit settings win over what the model embeds."""
        s = self.settings
        if s.class_names is not None:
            names = tuple(s.class_names)
        elif embedded_names is not None:
            names = names_to_tuple(embedded_names)
        else:
            raise DetectorError(
                f"{self.model_path} embeds no class names; set class_names in the detector settings"
            )
        if not names:
            raise DetectorError("the model has no classes")
        if s.imgsz is not None:
            imgsz = parse_imgsz(s.imgsz)
        elif embedded_imgsz is not None:
            imgsz = parse_imgsz(embedded_imgsz)
        elif input_hw is not None and all(isinstance(v, int) and v > 0 for v in input_hw):
            imgsz = (int(input_hw[0]), int(input_hw[1]))  # type: ignore[arg-type]
        else:
            raise DetectorError(
                f"{self.model_path} has no fixed input size; set imgsz in the detector settings"
            )
        if input_hw is not None:
            for got, want, axis in zip(imgsz, input_hw, ("height", "width"), strict=True):
                if isinstance(want, int) and want > 0 and got != want:
                    raise DetectorError(f"imgsz {imgsz} does not match the model's fixed input {axis} {want}")
        self._class_names, self._imgsz = names, imgsz

    def infer(self, frame_bgr: np.ndarray) -> InferenceResult:
        """Detect objects in one BGR (or grayscale/BGRA) uint8 frame; boxes in the frame's pixels."""
        if not self.loaded:
            raise DetectorError(f"{type(self).__name__} is not loaded; call load() first")
        t0 = time.perf_counter()
        tensor, lb = preprocess(frame_bgr, self.imgsz, dtype=self._input_dtype)
        raw = self._forward(tensor)
        s = self.settings
        dets = postprocess(
            raw,
            lb,
            conf=s.conf,
            iou=s.iou,
            max_det=s.max_det,
            nc=len(self.class_names),
            agnostic=s.agnostic_nms,
        )
        return InferenceResult(detections=tuple(dets), latency_ms=(time.perf_counter() - t0) * 1000.0)

    def warmup(self, runs: int | None = None) -> None:
        """Run a few inferences on a blank frame so first-frame latency is not paid on the line."""
        frame = self._blank_frame()
        for _ in range(self.settings.warmup_runs if runs is None else runs):
            self._forward(preprocess(frame, self.imgsz, dtype=self._input_dtype)[0])

    def health_check(self) -> InferenceResult:
        """One full inference on a blank frame, checking the raw output is ``[1, 4+nc, anchors]``.

        Raises :class:`DetectorError` with what was expected and found; returns the result otherwise.
        """
        if not self.loaded:
            raise DetectorError(f"{type(self).__name__} is not loaded; call load() first")
        frame = self._blank_frame()
        try:
            raw = np.asarray(self._forward(preprocess(frame, self.imgsz, dtype=self._input_dtype)[0]))
        except DetectorError:
            raise
        except Exception as e:  # the runtime's own errors are many and unrelated; one type for callers
            raise DetectorError(f"test inference failed: {type(e).__name__}: {e}") from e
        nc = len(self.class_names)
        if raw.ndim != 3 or raw.shape[0] != 1 or raw.shape[1] != 4 + nc or raw.shape[2] < 1:
            raise DetectorError(
                f"model output shape {tuple(raw.shape)} does not fit {nc} class names "
                f"(expected [1, {4 + nc}, anchors]); wrong class_names, or not a YOLOv8 detect export with nms=False"
            )
        if not np.isfinite(raw).all():
            raise DetectorError("model output contains NaN or Inf")
        return self.infer(frame)

    def _blank_frame(self) -> np.ndarray:
        h, w = self.imgsz
        return np.full((h, w, 3), PAD_VALUE, dtype=np.uint8)

    def __enter__(self) -> Self:
        if not self.loaded:
            self.load()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.model_path)!r}, loaded={self.loaded})"
