"""Which model file a detector loads from a bundle, and the on-device TensorRT build when the
bundle carries no engine for this device.

TensorRT engines only run on the GPU compute capability and TensorRT version they were built for.
A bundle may carry several (one per device class, ``RuntimeEntry.target``). For the ``tensorrt``
backend :func:`plan_model` (pure) picks the engine whose target matches the device, preferring
precisions in the configured order; when none matches it plans a build from the bundle's ONNX.
:func:`resolve_model` (I/O) carries the plan out: it builds with the ``tensorrt`` builder API
(:func:`build_engine`), reports progress through a callback the agent turns into
``EngineBuildEvent`` messages, and caches the engine under ``<data_dir>/engines`` keyed by the
ONNX sha256, compute capability, TensorRT version and precision, so a restart or a second slot
holding the same ONNX does not build again. Every other backend (onnxruntime, ...) loads the
bundle's ONNX.

A build takes minutes on an embedded GPU: run :func:`resolve_model` off the frame loop.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import structlog

from firmware_bundles.fsutil import atomic_output
from firmware_bundles.manifest import BundleManifest, RuntimeEntry
from protocol.messages import EngineBuildEvent, Hardware

log = structlog.get_logger(__name__)

#: Precisions the device may build itself; int8 needs calibration data only the server has.
BUILDABLE = ("fp16", "fp32")
DEFAULT_PRECISION = ("fp16", "fp32")
#: ONNX models an ONNX-reading backend prefers: the gated INT8 model when the bundle has one.
DEFAULT_ONNX_PRECISION = ("int8", "fp32")
#: Backends that load a serialized TensorRT engine; every other one reads the ONNX.
ENGINE_BACKENDS = frozenset({"tensorrt"})


class EngineError(RuntimeError):
    """No model in the bundle can run on this device with this backend, or a build failed."""


class BuildCancelled(EngineError):
    """The build was stopped (agent shutdown) before it finished."""


# ---------------------------------------------------------------------------------------------- plan (pure)


@dataclass(frozen=True)
class EnginePlan:
    """What to load: ``action="load"`` a bundle file, or ``"build"`` an engine from ``file`` (an ONNX)."""

    action: Literal["load", "build"]
    kind: Literal["onnx", "tensorrt"]
    file: str
    precision: str
    reason: str
    onnx_sha256: str | None = None
    gpu_compute_capability: str | None = None
    tensorrt_version: str | None = None


def version_tuple(version: str) -> tuple[int, ...]:
    """Leading integer components: ``"10.3.0.26"`` -> (10, 3, 0, 26), ``"10.0.0b6"`` -> (10, 0, 0)."""
    parts: list[int] = []
    for part in version.strip().split("."):
        digits = ""
        for ch in part:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
        if len(digits) != len(part):
            break
    return tuple(parts)


def versions_match(engine_version: str, device_version: str) -> bool:
    """Whether an engine built with TensorRT ``engine_version`` runs on ``device_version``.

    The bundle states as many components as its builder vouches for: ``10.3`` accepts any 10.3.x,
    ``10.3.0.26`` only that exact build. Components compare as integers (10.3 is not 10.30).
    """
    want, have = version_tuple(engine_version), version_tuple(device_version)
    return bool(want) and have[: len(want)] == want


def _rank(precision: str, preference: Sequence[str]) -> int:
    return list(preference).index(precision)


def _onnx_entry(manifest: BundleManifest, preference: Sequence[str]) -> tuple[str, str] | None:
    """``(path, precision)`` of the bundle's ONNX model, preferring a runtime entry's precision."""
    entries = [r for r in manifest.runtimes if r.kind == "onnx"]
    if entries:
        entries.sort(key=lambda r: _rank(r.precision, preference) if r.precision in preference else len(preference))
        return entries[0].file, entries[0].precision
    files = [f.path for f in manifest.files if f.role == "model.onnx"]
    return (files[0], "fp32") if files else None


def plan_model(
    manifest: BundleManifest,
    hardware: Hardware,
    detector_type: str,
    precision: Sequence[str] = DEFAULT_PRECISION,
    allow_build: bool = True,
    onnx_precision: Sequence[str] = DEFAULT_ONNX_PRECISION,
) -> EnginePlan:
    """Pick the file ``detector_type`` should load from a bundle on this hardware (no I/O).

    Backends that read ONNX (ONNX Runtime, OpenVINO) take the bundle's ONNX model in
    ``onnx_precision`` order (an INT8 model that passed its golden-set gate runs ~1.5x faster on
    CPUs); a TensorRT engine is built from the fp32 ONNX, whatever the ONNX preference."""
    preference = tuple(dict.fromkeys(precision))
    if not preference:
        raise EngineError("no precision allowed (engine precision preference is empty)")
    if detector_type not in ENGINE_BACKENDS:
        onnx = _onnx_entry(manifest, tuple(dict.fromkeys(onnx_precision)) or ("fp32",))
        if onnx is None:
            raise EngineError(f"bundle {manifest.model_name} v{manifest.version} ships no ONNX model "
                              f"for the {detector_type} backend")
        return EnginePlan("load", "onnx", onnx[0], onnx[1], f"{detector_type} loads the bundle's ONNX")

    cc, trt_version = hardware.gpu_compute_capability, hardware.tensorrt_version
    if not cc or not trt_version:
        raise EngineError("the tensorrt backend needs an NVIDIA GPU and TensorRT; this device reports "
                          f"compute capability {cc or 'none'}, TensorRT {trt_version or 'none'}")
    matching: list[RuntimeEntry] = [
        r for r in manifest.runtimes
        if r.kind == "tensorrt" and r.target is not None and r.precision in preference
        and r.target.gpu_compute_capability == cc and versions_match(r.target.tensorrt_version, trt_version)
    ]
    if matching:
        best = min(matching, key=lambda r: _rank(r.precision, preference))
        return EnginePlan("load", "tensorrt", best.file, best.precision,
                          f"bundle engine {best.file} matches sm {cc}, TensorRT {trt_version}",
                          gpu_compute_capability=cc, tensorrt_version=trt_version)
    offered = sorted({f"sm {r.target.gpu_compute_capability} / TensorRT {r.target.tensorrt_version} "
                      f"({r.precision})" for r in manifest.runtimes if r.kind == "tensorrt" and r.target})
    why = f"no engine in the bundle for sm {cc}, TensorRT {trt_version}" + (
        f" (it has: {', '.join(offered)})" if offered else " (it has none)")
    if not allow_build:
        raise EngineError(f"{why}, and building engines on the device is turned off")
    onnx = _onnx_entry(manifest, ("fp32", *preference))
    if onnx is None:
        raise EngineError(f"{why}, and no ONNX model to build one from")
    build_precision = next((p for p in preference if p in BUILDABLE), None)
    if build_precision is None:
        raise EngineError(f"{why}; the device builds only {'/'.join(BUILDABLE)}, "
                          f"the preference allows {'/'.join(preference)}")
    return EnginePlan("build", "tensorrt", onnx[0], build_precision, why,
                      onnx_sha256=manifest.file(onnx[0]).sha256, gpu_compute_capability=cc,
                      tensorrt_version=trt_version)


def engine_cache_path(cache_dir: Path, onnx_sha256: str, cc: str, trt_version: str, precision: str) -> Path:
    """Where the engine built for this exact ONNX, GPU arch, TensorRT version and precision lives."""
    safe_trt = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in trt_version)
    return Path(cache_dir) / f"{onnx_sha256}-sm{cc.replace('.', '')}-trt{safe_trt}-{precision}.engine"


# ---------------------------------------------------------------------------------------------- progress


@dataclass(frozen=True)
class BuildProgressEvent:
    """One step of an engine build, for :meth:`to_message`."""

    build_id: str
    outcome: Literal["started", "progress", "succeeded", "failed", "cached"]
    onnx_sha256: str
    gpu_compute_capability: str
    tensorrt_version: str
    precision: str
    model_version: int | None = None
    phase: str = ""
    percent: float = 0.0
    duration_s: float = 0.0
    engine_bytes: int | None = None
    reason: str = ""

    def to_message(self, device_id: str) -> EngineBuildEvent:
        return EngineBuildEvent(
            device_id=device_id, build_id=self.build_id, model_version=self.model_version,
            onnx_sha256=self.onnx_sha256, gpu_compute_capability=self.gpu_compute_capability,
            tensorrt_version=self.tensorrt_version[:32], precision=self.precision, outcome=self.outcome,
            phase=self.phase[:200], percent=round(min(100.0, max(0.0, self.percent)), 1),
            duration_s=round(max(0.0, self.duration_s), 3), engine_bytes=self.engine_bytes,
            reason=self.reason[:2000])


ProgressCallback = Callable[[BuildProgressEvent], None]


class BuildProgress:
    """Turns TensorRT's nested builder phases into one throttled percentage.

    TensorRT calls ``phase_start(name, parent, num_steps)``, ``step_complete(name, step)`` (step is
    the zero-based index of the finished step; returning False cancels the build) and
    ``phase_finish(name)``. The percentage is the outermost active phase's completed share,
    refined by its active child phases; it never goes backwards and stays below 100 until the
    build returns. ``emit(phase, percent)`` is called when it rose by ``min_step`` points or the
    phase changed after ``min_interval_s`` seconds.
    """

    def __init__(self, emit: Callable[[str, float], None], cancel: threading.Event | None = None,
                 min_step: float = 5.0, min_interval_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._emit = emit
        self._cancel = cancel or threading.Event()
        self._min_step = min_step
        self._min_interval = min_interval_s
        self._clock = clock
        self._phases: dict[str, list[Any]] = {}  # name -> [num_steps, done, parent]
        self._order: list[str] = []
        self._lock = threading.Lock()
        self.percent = 0.0
        self._last_percent = -1.0
        self._last_phase = ""
        self._last_time = float("-inf")

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
        with self._lock:
            self._phases[phase_name] = [max(int(num_steps), 1), 0, parent_phase]
            self._order.append(phase_name)
        self._update()

    def step_complete(self, phase_name: str, step: int) -> bool:
        with self._lock:
            if phase_name in self._phases:
                info = self._phases[phase_name]
                info[1] = min(info[0], max(info[1], int(step) + 1))
        self._update()
        return not self._cancel.is_set()

    def phase_finish(self, phase_name: str) -> None:
        with self._lock:
            self._phases.pop(phase_name, None)
            if phase_name in self._order:
                self._order.remove(phase_name)
        self._update()

    def _fraction(self, name: str, depth: int = 0) -> float:
        num, done, _ = self._phases[name]
        child = next((n for n in reversed(self._order) if self._phases[n][2] == name), None)
        inner = self._fraction(child, depth + 1) if child is not None and depth < 16 else 0.0
        return min(1.0, (done + inner) / num)

    def _update(self) -> None:
        with self._lock:
            roots = [n for n in self._order if self._phases[n][2] not in self._phases]
            if not roots:
                return
            fraction = self._fraction(roots[0])
            self.percent = max(self.percent, min(99.0, fraction * 100.0))
            phase = self._order[-1]
            now = self._clock()
            rose = self.percent - self._last_percent >= self._min_step
            moved = phase != self._last_phase and now - self._last_time >= self._min_interval
            if not (rose or moved):
                return
            self._last_percent, self._last_phase, self._last_time = self.percent, phase, now
            percent = self.percent
        self._emit(phase, percent)


# ---------------------------------------------------------------------------------------------- build (TensorRT)


def write_engine_file(path: Path, metadata: Mapping[str, Any], engine: bytes) -> None:
    """Engine file in Ultralytics' layout (4-byte little-endian length, JSON metadata, engine
    bytes), written atomically so a crash mid-write never leaves a truncated engine in the cache."""
    meta = json.dumps(dict(metadata), sort_keys=True).encode()
    with atomic_output(path) as handle:
        handle.write(len(meta).to_bytes(4, "little", signed=True))
        handle.write(meta)
        handle.write(engine)


def _progress_monitor(trt: Any, tracker: BuildProgress) -> Any:
    """An ``IProgressMonitor`` forwarding to ``tracker`` (the base class exists only once tensorrt imports)."""

    class _Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps):
            tracker.phase_start(phase_name, parent_phase, num_steps)

        def step_complete(self, phase_name, step):
            return tracker.step_complete(phase_name, step)

        def phase_finish(self, phase_name):
            tracker.phase_finish(phase_name)

    return _Monitor()


@dataclass(frozen=True)
class BuildRequest:
    onnx_path: Path
    engine_path: Path
    precision: str
    metadata: Mapping[str, Any] = field(default_factory=dict)
    workspace_bytes: int = 1 << 30
    device: int = 0


Builder = Callable[[BuildRequest, BuildProgress], str]


def _select_device(device: int) -> None:
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6
        except ImportError:
            if device != 0:
                raise EngineError("building on a GPU other than 0 needs cuda-python") from None
            return  # the builder uses the current (first) device
    err = cudart.cudaSetDevice(device)
    err = err[0] if isinstance(err, tuple) else err
    if int(err) != 0:
        raise EngineError(f"cannot select CUDA device {device}: {err}")


def build_engine(request: BuildRequest, tracker: BuildProgress) -> str:
    """Build a TensorRT engine from an ONNX file with the ``tensorrt`` (>= 10) builder API and
    write it to ``request.engine_path``; returns the precision actually built (fp16 falls back to
    fp32 on a GPU without fast fp16)."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise EngineError("tensorrt is not installed") from exc
    _select_device(request.device)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: networks are always explicit-batch
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(request.onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT cannot parse {request.onnx_path.name}: {errors or 'unknown error'}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, request.workspace_bytes)
    precision = request.precision
    if precision == "fp16":
        if getattr(builder, "platform_has_fast_fp16", True):
            config.set_flag(trt.BuilderFlag.FP16)
        else:
            log.warning("engine.fp16_unsupported", hint="this GPU has no fast fp16; building fp32")
            precision = "fp32"
    monitor = _progress_monitor(trt, tracker)
    config.progress_monitor = monitor
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        if tracker.cancelled:
            raise BuildCancelled("engine build cancelled")
        raise EngineError("TensorRT failed to build the engine (see the agent log for TensorRT's messages)")
    meta = {**request.metadata, "precision": precision, "tensorrt_version": trt.__version__}
    write_engine_file(request.engine_path, meta, bytes(serialized))
    return precision


# ---------------------------------------------------------------------------------------------- resolve (I/O)


@dataclass(frozen=True)
class ResolvedModel:
    """The file to hand to ``create_detector``, and how it was obtained."""

    path: Path
    plan: EnginePlan
    built: bool = False
    cached: bool = False
    duration_s: float = 0.0

    @property
    def kind(self) -> str:
        return self.plan.kind


def detector_settings(base: Mapping[str, Any], resolved: ResolvedModel, manifest: BundleManifest) -> dict[str, Any]:
    """``base`` detector settings for the resolved file: a TensorRT engine from the bundle may lack
    the metadata header that names its classes, so the signed manifest's class names fill in
    (the health check still compares their count with the engine's output)."""
    settings = dict(base)
    if resolved.kind == "tensorrt" and settings.get("class_names") is None:
        settings["class_names"] = list(manifest.class_names)
    return settings


_BUILD_LOCKS: dict[Path, threading.Lock] = {}
_BUILD_LOCKS_GUARD = threading.Lock()


def _build_lock(path: Path) -> threading.Lock:
    with _BUILD_LOCKS_GUARD:
        return _BUILD_LOCKS.setdefault(path, threading.Lock())


def _engine_metadata(manifest: BundleManifest, plan: EnginePlan) -> dict[str, Any]:
    # The keys TensorRtDetector reads (names, imgsz), so a built engine needs no settings override.
    return {
        "names": dict(enumerate(manifest.class_names)),
        "imgsz": [manifest.input.imgsz, manifest.input.imgsz],
        "task": "detect",
        "model_name": manifest.model_name,
        "model_version": manifest.version,
        "onnx_sha256": plan.onnx_sha256,
        "gpu_compute_capability": plan.gpu_compute_capability,
        "built_by": "edgeloop-agent",
    }


def resolve_model(
    slot_dir: Path,
    manifest: BundleManifest,
    hardware: Hardware,
    detector_type: str,
    *,
    cache_dir: Path,
    precision: Sequence[str] = DEFAULT_PRECISION,
    allow_build: bool = True,
    onnx_precision: Sequence[str] = DEFAULT_ONNX_PRECISION,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    workspace_bytes: int = 1 << 30,
    device: int = 0,
    builder: Builder = build_engine,
    clock: Callable[[], float] = time.monotonic,
) -> ResolvedModel:
    """The model file ``detector_type`` should load from the unpacked bundle in ``slot_dir``,
    building (and caching) a TensorRT engine first when the plan says so."""
    plan = plan_model(manifest, hardware, detector_type, precision, allow_build, onnx_precision)
    if plan.action == "load":
        path = Path(slot_dir) / plan.file
        if not path.is_file():
            raise EngineError(f"{plan.file} is missing from the unpacked bundle in {slot_dir}")
        log.info("engine.selected", file=plan.file, kind=plan.kind, precision=plan.precision, reason=plan.reason)
        return ResolvedModel(path, plan)

    assert plan.onnx_sha256 and plan.gpu_compute_capability and plan.tensorrt_version
    target = engine_cache_path(cache_dir, plan.onnx_sha256, plan.gpu_compute_capability, plan.tensorrt_version,
                               plan.precision)
    build_id = uuid.uuid4().hex
    notify = progress or (lambda event: None)

    def event(outcome: str, **fields: Any) -> BuildProgressEvent:
        return BuildProgressEvent(build_id=build_id, outcome=outcome, onnx_sha256=plan.onnx_sha256,
                                  gpu_compute_capability=plan.gpu_compute_capability,
                                  tensorrt_version=plan.tensorrt_version, precision=plan.precision,
                                  model_version=manifest.version, **fields)

    def safe_notify(ev: BuildProgressEvent) -> None:
        try:
            notify(ev)
        except Exception as exc:  # a failed publish must not fail the build
            log.warning("engine.progress_callback_failed", error=f"{type(exc).__name__}: {exc}")

    with _build_lock(target):
        if target.is_file() and target.stat().st_size > 0:
            log.info("engine.cache_hit", path=str(target), reason=plan.reason)
            safe_notify(event("cached", percent=100.0, engine_bytes=target.stat().st_size,
                              reason=plan.reason))
            return ResolvedModel(target, plan, cached=True)
        onnx_path = Path(slot_dir) / plan.file
        if not onnx_path.is_file():
            raise EngineError(f"{plan.file} is missing from the unpacked bundle in {slot_dir}")
        log.info("engine.build_started", onnx=plan.file, precision=plan.precision, reason=plan.reason)
        start = clock()
        safe_notify(event("started", reason=plan.reason))
        tracker = BuildProgress(
            lambda phase, pct: safe_notify(event("progress", phase=phase, percent=pct,
                                                 duration_s=clock() - start)),
            cancel=cancel, clock=clock)
        request = BuildRequest(onnx_path, target, plan.precision, _engine_metadata(manifest, plan),
                               workspace_bytes, device)
        try:
            built_precision = builder(request, tracker)
        except Exception as exc:
            duration = clock() - start
            target.unlink(missing_ok=True)  # never leave a half-trusted engine in the cache
            reason = f"{type(exc).__name__}: {exc}" if not isinstance(exc, EngineError) else str(exc)
            log.error("engine.build_failed", onnx=plan.file, duration_s=round(duration, 1), error=reason)
            safe_notify(event("failed", phase="", percent=tracker.percent, duration_s=duration, reason=reason))
            if isinstance(exc, EngineError):
                raise
            raise EngineError(f"engine build failed: {reason}") from exc
        duration = clock() - start
        size = target.stat().st_size if target.is_file() else None
        if size is None:
            raise EngineError(f"the engine builder reported success but wrote no {target.name}")
        if built_precision != plan.precision:
            # Cached under the requested precision's key: the next lookup must find it, and it is
            # the best this GPU can do for that request.
            plan = replace(plan, precision=built_precision)
        log.info("engine.build_succeeded", path=str(target), duration_s=round(duration, 1), bytes=size,
                 precision=built_precision)
        safe_notify(event("succeeded", percent=100.0, duration_s=duration, engine_bytes=size,
                          reason=f"built {built_precision} engine in {duration:.1f} s"))
        return ResolvedModel(target, plan, built=True, duration_s=duration)
