"""Engine selection and the on-device TensorRT build: which bundle file a backend loads on which
hardware (fake manifests), the build cache and progress reporting (a stand-in builder), the
progress tracker, hardware probes, and the ONNX Runtime provider options. The real TensorRT build
runs only on a GPU (marked ``gpu``)."""

from __future__ import annotations

import hashlib
import threading
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from edge_agent import hardware
from edge_agent.inference.backends.onnxruntime import OnnxRuntimeSettings, provider_args, select_providers
from edge_agent.inference.backends.tensorrt import read_engine_file
from edge_agent.inference.engines import (
    BuildProgress,
    BuildRequest,
    EngineError,
    detector_settings,
    engine_cache_path,
    plan_model,
    resolve_model,
    version_tuple,
    versions_match,
    write_engine_file,
)
from firmware_bundles.manifest import BundleManifest, FileEntry, HardwareTarget, InputSpec, RuntimeEntry
from protocol.messages import EngineBuildEvent, Hardware

ONNX_BYTES = b"pretend onnx"
ONNX_SHA = hashlib.sha256(ONNX_BYTES).hexdigest()
ORIN = Hardware(gpu="Orin", gpu_compute_capability="8.7", tensorrt_version="10.3.0.30")
CPU_ONLY = Hardware(cpu="x86_64", cpu_count=2)


def _engine(path: str, cc: str, trt: str, precision: str = "fp16") -> tuple[FileEntry, RuntimeEntry]:
    return (FileEntry(path=path, sha256="e" * 64, size=10, role="model.engine"),
            RuntimeEntry(kind="tensorrt", file=path, precision=precision,
                         target=HardwareTarget(gpu_compute_capability=cc, tensorrt_version=trt)))


def _manifest(*engines: tuple[FileEntry, RuntimeEntry], onnx: bool = True) -> BundleManifest:
    files = [e[0] for e in engines]
    runtimes = [e[1] for e in engines]
    if onnx:
        files.insert(0, FileEntry(path="model.onnx", sha256=ONNX_SHA, size=len(ONNX_BYTES), role="model.onnx"))
        runtimes.insert(0, RuntimeEntry(kind="onnx", file="model.onnx"))
    return BundleManifest(model_name="defects", version=7, created_at=datetime(2025, 1, 1, tzinfo=UTC),
                          files=files, runtimes=runtimes, input=InputSpec(imgsz=160),
                          class_names=["scratch", "dent", "stain"], key_id="0123456789abcdef")


# ------------------------------------------------------------------ plan (pure)


def test_onnx_backends_load_the_onnx_whatever_the_hardware() -> None:
    m = _manifest(_engine("orin.engine", "8.7", "10.3"))
    for hw in (ORIN, CPU_ONLY):
        plan = plan_model(m, hw, "onnxruntime")
        assert (plan.action, plan.kind, plan.file) == ("load", "onnx", "model.onnx")
    assert plan_model(m, CPU_ONLY, "openvino").file == "model.onnx"  # any non-engine backend reads ONNX


def test_onnx_backend_without_onnx_is_an_error() -> None:
    with pytest.raises(EngineError, match="ships no ONNX"):
        plan_model(_manifest(_engine("orin.engine", "8.7", "10.3"), onnx=False), ORIN, "onnxruntime")


def test_tensorrt_picks_the_engine_for_this_gpu_and_tensorrt_version() -> None:
    m = _manifest(_engine("t4.engine", "7.5", "10.3"), _engine("orin.engine", "8.7", "10.3"),
                  _engine("orin-old.engine", "8.7", "8.6.1"))
    plan = plan_model(m, ORIN, "tensorrt")
    assert (plan.action, plan.kind, plan.file, plan.precision) == ("load", "tensorrt", "orin.engine", "fp16")
    assert "matches sm 8.7" in plan.reason


def test_precision_preference_orders_matching_engines() -> None:
    m = _manifest(_engine("orin32.engine", "8.7", "10.3", "fp32"), _engine("orin16.engine", "8.7", "10.3", "fp16"),
                  _engine("orin8.engine", "8.7", "10.3", "int8"))
    assert plan_model(m, ORIN, "tensorrt").file == "orin16.engine"
    assert plan_model(m, ORIN, "tensorrt", precision=("fp32", "fp16")).file == "orin32.engine"
    assert plan_model(m, ORIN, "tensorrt", precision=("int8", "fp16")).file == "orin8.engine"
    # int8 is only used when asked for: the default preference skips it.
    only_int8 = _manifest(_engine("orin8.engine", "8.7", "10.3", "int8"))
    assert plan_model(only_int8, ORIN, "tensorrt").action == "build"


def test_no_matching_engine_plans_a_build_from_the_onnx() -> None:
    m = _manifest(_engine("t4.engine", "7.5", "10.3"), _engine("orin-old.engine", "8.7", "8.6.1"))
    plan = plan_model(m, ORIN, "tensorrt")
    assert (plan.action, plan.kind, plan.file, plan.precision) == ("build", "tensorrt", "model.onnx", "fp16")
    assert plan.onnx_sha256 == ONNX_SHA
    assert (plan.gpu_compute_capability, plan.tensorrt_version) == ("8.7", "10.3.0.30")
    assert "no engine in the bundle for sm 8.7" in plan.reason and "sm 7.5 / TensorRT 10.3" in plan.reason
    assert plan_model(m, ORIN, "tensorrt", precision=("fp32",)).precision == "fp32"
    assert plan_model(_manifest(), ORIN, "tensorrt").action == "build"  # an ONNX-only bundle


@pytest.mark.parametrize(("manifest_kw", "kwargs", "message"), [
    ({"onnx": False}, {}, "no ONNX model to build one from"),
    ({}, {"allow_build": False}, "building engines on the device is turned off"),
    ({}, {"precision": ("int8",)}, "builds only fp16/fp32"),
    ({}, {"precision": ()}, "preference is empty"),
])
def test_when_nothing_can_run_the_error_says_why(manifest_kw, kwargs, message) -> None:
    m = _manifest(_engine("t4.engine", "7.5", "10.3"), **manifest_kw)
    with pytest.raises(EngineError, match=message):
        plan_model(m, ORIN, "tensorrt", **kwargs)


def test_tensorrt_backend_on_a_device_without_gpu_is_refused() -> None:
    with pytest.raises(EngineError, match="needs an NVIDIA GPU and TensorRT"):
        plan_model(_manifest(), CPU_ONLY, "tensorrt")
    with pytest.raises(EngineError, match="TensorRT none"):
        plan_model(_manifest(), Hardware(gpu_compute_capability="8.7"), "tensorrt")


@pytest.mark.parametrize(("engine", "device", "ok"), [
    ("10.3", "10.3.0.30", True), ("10.3.0", "10.3.0.30", True), ("10.3.0.30", "10.3.0.30", True),
    ("10.3.0.26", "10.3.0.30", False), ("10.3", "10.30.1", False), ("10", "10.7.0", True),
    ("8.6.1", "10.3.0", False), ("10.3.1", "10.3", False), ("10.0.0", "10.0.0b6", True),
])
def test_tensorrt_version_matching(engine: str, device: str, ok: bool) -> None:
    assert versions_match(engine, device) is ok


def test_version_tuple() -> None:
    assert version_tuple("10.3.0.26") == (10, 3, 0, 26)
    assert version_tuple("10.0.0b6") == (10, 0, 0)
    assert version_tuple("x") == ()


def test_cache_key_covers_onnx_gpu_tensorrt_and_precision(tmp_path: Path) -> None:
    base = engine_cache_path(tmp_path, ONNX_SHA, "8.7", "10.3.0.30", "fp16")
    assert base.parent == tmp_path and base.name.startswith(ONNX_SHA)
    variants = {engine_cache_path(tmp_path, "f" * 64, "8.7", "10.3.0.30", "fp16"),
                engine_cache_path(tmp_path, ONNX_SHA, "8.9", "10.3.0.30", "fp16"),
                engine_cache_path(tmp_path, ONNX_SHA, "8.7", "10.4.0", "fp16"),
                engine_cache_path(tmp_path, ONNX_SHA, "8.7", "10.3.0.30", "fp32")}
    assert base not in variants and len(variants) == 4
    assert "/" not in engine_cache_path(tmp_path, ONNX_SHA, "8.7", "10/../x", "fp16").name


# ------------------------------------------------------------------ resolve with a stand-in builder


@pytest.fixture
def slot(tmp_path: Path) -> Path:
    d = tmp_path / "slot"
    d.mkdir()
    (d / "model.onnx").write_bytes(ONNX_BYTES)
    (d / "orin.engine").write_bytes(b"engine")
    return d


class FakeBuilder:
    """Walks the tracker through TensorRT-like phases and writes an engine, like build_engine."""

    def __init__(self, fail: Exception | None = None, precision: str | None = None) -> None:
        self.calls: list[BuildRequest] = []
        self.fail, self.precision = fail, precision

    def __call__(self, request: BuildRequest, tracker: BuildProgress) -> str:
        self.calls.append(request)
        tracker.phase_start("Building engine", None, 4)
        for step in range(4):
            tracker.phase_start("Tactic selection", "Building engine", 10)
            for sub in range(10):
                if not tracker.step_complete("Tactic selection", sub):
                    raise EngineError("cancelled")
            tracker.phase_finish("Tactic selection")
            tracker.step_complete("Building engine", step)
            if self.fail is not None and step == 2:
                request.engine_path.write_bytes(b"half")  # a crash mid-write must not survive
                raise self.fail
        tracker.phase_finish("Building engine")
        write_engine_file(request.engine_path, request.metadata, b"ENGINE")
        return self.precision or request.precision


def test_onnx_plans_resolve_to_the_slot_file(slot: Path, tmp_path: Path) -> None:
    resolved = resolve_model(slot, _manifest(), CPU_ONLY, "onnxruntime", cache_dir=tmp_path / "engines")
    assert resolved.path == slot / "model.onnx" and resolved.kind == "onnx" and not resolved.built


def test_matching_bundle_engine_is_loaded_without_building(slot: Path, tmp_path: Path) -> None:
    builder = FakeBuilder()
    resolved = resolve_model(slot, _manifest(_engine("orin.engine", "8.7", "10.3")), ORIN, "tensorrt",
                             cache_dir=tmp_path / "engines", builder=builder)
    assert resolved.path == slot / "orin.engine" and not resolved.built and builder.calls == []


def test_detector_settings_name_the_classes_of_a_bundle_engine(slot: Path, tmp_path: Path) -> None:
    m = _manifest(_engine("orin.engine", "8.7", "10.3"))
    base = {"type": "tensorrt", "conf": 0.3}
    engine = resolve_model(slot, m, ORIN, "tensorrt", cache_dir=tmp_path)
    assert detector_settings(base, engine, m) == {**base, "class_names": ["scratch", "dent", "stain"]}
    assert detector_settings({**base, "class_names": ["x"]}, engine, m)["class_names"] == ["x"]  # explicit wins
    onnx = resolve_model(slot, m, CPU_ONLY, "onnxruntime", cache_dir=tmp_path)
    assert detector_settings({"type": "onnxruntime"}, onnx, m) == {"type": "onnxruntime"}  # ONNX embeds its names


def test_missing_file_in_the_slot_is_an_error(slot: Path, tmp_path: Path) -> None:
    (slot / "model.onnx").unlink()
    with pytest.raises(EngineError, match="missing from the unpacked bundle"):
        resolve_model(slot, _manifest(), CPU_ONLY, "onnxruntime", cache_dir=tmp_path)
    with pytest.raises(EngineError, match="missing from the unpacked bundle"):
        resolve_model(slot, _manifest(), ORIN, "tensorrt", cache_dir=tmp_path, builder=FakeBuilder())


def test_build_reports_progress_caches_and_is_reused(slot: Path, tmp_path: Path) -> None:
    cache = tmp_path / "engines"
    events = []
    builder = FakeBuilder()
    clock = iter(float(i) for i in range(1000))
    m = _manifest(_engine("t4.engine", "7.5", "10.3"))
    resolved = resolve_model(slot, m, ORIN, "tensorrt", cache_dir=cache, progress=events.append,
                             builder=builder, clock=lambda: next(clock))
    assert resolved.built and not resolved.cached
    assert resolved.path == engine_cache_path(cache, ONNX_SHA, "8.7", "10.3.0.30", "fp16")
    assert resolved.path.is_file()
    assert len(builder.calls) == 1 and builder.calls[0].onnx_path == slot / "model.onnx"

    outcomes = [e.outcome for e in events]
    assert outcomes[0] == "started" and outcomes[-1] == "succeeded"
    progress = [e for e in events if e.outcome == "progress"]
    assert len(progress) >= 3
    percents = [e.percent for e in progress]
    assert percents == sorted(percents) and percents[-1] < 100  # monotonic, 100 only when done
    assert events[-1].percent == 100 and events[-1].duration_s > 0 and events[-1].engine_bytes > 0
    assert len({e.build_id for e in events}) == 1
    assert all(e.model_version == 7 and e.onnx_sha256 == ONNX_SHA for e in events)
    # Each event becomes a valid protocol message for the update channel.
    msg = events[-1].to_message("line-3")
    assert isinstance(msg, EngineBuildEvent) and msg.outcome == "succeeded" and msg.precision == "fp16"

    # The engine carries the names and input size the TensorRT backend reads.
    meta, blob = read_engine_file(resolved.path)
    assert blob == b"ENGINE"
    assert meta["names"] == {"0": "scratch", "1": "dent", "2": "stain"} and meta["imgsz"] == [160, 160]
    assert meta["onnx_sha256"] == ONNX_SHA

    events.clear()
    again = resolve_model(slot, m, ORIN, "tensorrt", cache_dir=cache, progress=events.append, builder=builder)
    assert again.cached and again.path == resolved.path and len(builder.calls) == 1
    assert [e.outcome for e in events] == ["cached"]

    # Another TensorRT version on the same GPU does not reuse it.
    newer = Hardware(gpu_compute_capability="8.7", tensorrt_version="10.4.0")
    assert resolve_model(slot, m, newer, "tensorrt", cache_dir=cache, builder=builder).built
    assert len(builder.calls) == 2


def test_failed_build_reports_leaves_no_engine_and_raises(slot: Path, tmp_path: Path) -> None:
    cache = tmp_path / "engines"
    cache.mkdir()
    events = []
    with pytest.raises(EngineError, match="engine build failed: RuntimeError: out of memory"):
        resolve_model(slot, _manifest(), ORIN, "tensorrt", cache_dir=cache, progress=events.append,
                      builder=FakeBuilder(fail=RuntimeError("out of memory")))
    assert list(cache.iterdir()) == []
    assert events[-1].outcome == "failed" and "out of memory" in events[-1].reason
    assert 0 < events[-1].percent < 100
    # The next attempt builds again (nothing half-built was cached).
    assert resolve_model(slot, _manifest(), ORIN, "tensorrt", cache_dir=cache, builder=FakeBuilder()).built


def test_cancel_stops_the_build(slot: Path, tmp_path: Path) -> None:
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(EngineError, match="cancelled"):
        resolve_model(slot, _manifest(), ORIN, "tensorrt", cache_dir=tmp_path, cancel=cancel,
                      builder=FakeBuilder())


def test_a_broken_progress_callback_does_not_fail_the_build(slot: Path, tmp_path: Path) -> None:
    def boom(event):
        raise ConnectionError("broker down")

    assert resolve_model(slot, _manifest(), ORIN, "tensorrt", cache_dir=tmp_path, progress=boom,
                         builder=FakeBuilder()).built


def test_fp16_fallback_is_reported(slot: Path, tmp_path: Path) -> None:
    events = []
    resolved = resolve_model(slot, _manifest(), ORIN, "tensorrt", cache_dir=tmp_path, progress=events.append,
                             builder=FakeBuilder(precision="fp32"))
    assert resolved.plan.precision == "fp32" and events[-1].precision == "fp32"
    assert resolved.path.name.endswith("-fp16.engine")  # found again under the key it was asked for


# ------------------------------------------------------------------ progress tracker


def test_progress_tracker_nests_phases_throttles_and_never_goes_back() -> None:
    emitted: list[tuple[str, float]] = []
    now = [0.0]
    t = BuildProgress(lambda phase, pct: emitted.append((phase, pct)), min_step=10, min_interval_s=5,
                      clock=lambda: now[0])
    t.phase_start("Build", None, 2)
    t.phase_start("Tactics", "Build", 4)
    for i in range(4):
        assert t.step_complete("Tactics", i)
    assert t.percent == pytest.approx(50.0)  # one of two outer steps' worth, from the inner phase
    t.phase_finish("Tactics")
    t.step_complete("Build", 0)
    t.phase_start("Tactics", "Build", 4)  # the next outer step starts its inner phase afresh
    assert t.percent == pytest.approx(50.0)
    t.step_complete("Tactics", 1)
    assert t.percent == pytest.approx(75.0)
    t.step_complete("Build", 1)
    assert t.percent == 99.0  # capped until the build returns
    pcts = [p for _, p in emitted]
    assert pcts == sorted(pcts)
    assert all(b - a >= 10 for a, b in zip(pcts, pcts[1:], strict=False))  # throttled by min_step
    assert len(emitted) < 9  # fewer events than steps


def test_progress_tracker_reports_a_phase_change_after_the_interval() -> None:
    emitted: list[tuple[str, float]] = []
    now = [0.0]
    t = BuildProgress(lambda phase, pct: emitted.append((phase, pct)), min_step=50, min_interval_s=5,
                      clock=lambda: now[0])
    t.phase_start("Build", None, 100)
    t.phase_start("Parse", "Build", 1)
    assert [p for p, _ in emitted] == ["Build"]  # the first event always goes out
    now[0] = 10.0
    t.phase_start("Optimise", "Build", 1)
    assert [p for p, _ in emitted] == ["Build", "Optimise"]


def test_progress_tracker_cancel() -> None:
    cancel = threading.Event()
    t = BuildProgress(lambda *a: None, cancel=cancel)
    t.phase_start("Build", None, 3)
    assert t.step_complete("Build", 0)
    cancel.set()
    assert not t.step_complete("Build", 1) and t.cancelled


# ------------------------------------------------------------------ hardware probes


def test_hardware_probe_on_a_machine_without_gpu_reports_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware, "gpu_from_nvidia_smi", lambda device=0: None)
    hw = hardware.detect_hardware()
    if hardware.gpu_from_cuda() is None:
        assert hw.gpu is None and hw.gpu_compute_capability is None
    assert hw.cpu_count >= 1 and "CPUExecutionProvider" in hw.onnxruntime_providers


def test_nvidia_smi_output_is_parsed() -> None:
    out = "NVIDIA H100 80GB HBM3, 9.0\nOrin (nvgpu), 8.7\n"
    assert hardware.parse_nvidia_smi(out) == ("NVIDIA H100 80GB HBM3", "9.0")
    assert hardware.parse_nvidia_smi(out, device=1) == ("Orin (nvgpu)", "8.7")
    assert hardware.parse_nvidia_smi(out, device=2) is None
    assert hardware.parse_nvidia_smi("Tesla K80, [N/A]\n") is None
    assert hardware.parse_nvidia_smi("") is None


def test_gpu_probe_falls_back_to_nvidia_smi(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware, "gpu_from_cuda", lambda device=0: None)
    monkeypatch.setattr(hardware, "gpu_from_nvidia_smi", lambda device=0: ("Orin", "8.7"))
    monkeypatch.setattr(hardware, "tensorrt_version", lambda: "10.3.0.30")
    hw = hardware.detect_hardware()
    assert (hw.gpu, hw.gpu_compute_capability, hw.tensorrt_version) == ("Orin", "8.7", "10.3.0.30")
    # ... and feeds engine selection directly.
    assert plan_model(_manifest(_engine("orin.engine", "8.7", "10.3")), hw, "tensorrt").file == "orin.engine"


# ------------------------------------------------------------------ ONNX Runtime providers


def test_onnxruntime_provider_priority_filtered_by_the_install() -> None:
    wanted = OnnxRuntimeSettings().providers
    assert wanted == ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    assert select_providers(wanted, ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert select_providers(wanted, ["CPUExecutionProvider", "CUDAExecutionProvider"]) == [
        "CUDAExecutionProvider", "CPUExecutionProvider"]
    gpu_build = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert select_providers(wanted, list(reversed(gpu_build))) == gpu_build  # our order, not the install's


def test_tensorrt_ep_options(tmp_path: Path) -> None:
    providers = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    args = provider_args(providers, OnnxRuntimeSettings(trt_engine_cache_dir=tmp_path / "ort-trt"))
    name, opts = args[0]
    assert name == "TensorrtExecutionProvider"
    assert opts["trt_fp16_enable"] is True
    assert opts["trt_engine_cache_enable"] is True and opts["trt_engine_cache_path"] == str(tmp_path / "ort-trt")
    assert opts["trt_timing_cache_enable"] is True
    assert args[1:] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    plain = provider_args(providers, OnnxRuntimeSettings(trt_fp16=False))
    assert plain[0] == ("TensorrtExecutionProvider", {"trt_fp16_enable": False})
    assert provider_args(["CPUExecutionProvider"], OnnxRuntimeSettings()) == ["CPUExecutionProvider"]


# ------------------------------------------------------------------ GPU: a real TensorRT build


def _yolo_like_onnx(path: Path, nc: int = 3, size: int = 32) -> None:
    """A conv head shaped like a YOLOv8 detect export: [1, 3, s, s] -> [1, 4 + nc, anchors]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(0, 0.1, (4 + nc, 3, 8, 8)).astype(np.float32), "w")
    shape = numpy_helper.from_array(np.array([1, 4 + nc, -1], np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["images", "w"], ["feat"], strides=[8, 8]),
         helper.make_node("Reshape", ["feat", "shape"], ["output0"])],
        "yolo_like",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 4 + nc, (size // 8) ** 2])],
        initializer=[weight, shape])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


@pytest.mark.gpu
def test_real_tensorrt_build_loads_in_the_tensorrt_backend(tmp_path: Path) -> None:
    pytest.importorskip("tensorrt", reason="TensorRT Python package not installed")
    from edge_agent.inference import create_detector

    hw = hardware.detect_hardware()
    assert hw.gpu_compute_capability, "nvidia-smi is present but no GPU was detected"
    slot = tmp_path / "slot"
    slot.mkdir()
    _yolo_like_onnx(slot / "model.onnx")
    sha = hashlib.sha256((slot / "model.onnx").read_bytes()).hexdigest()
    manifest = BundleManifest(
        model_name="tiny", version=1, created_at=datetime(2025, 1, 1, tzinfo=UTC),
        files=[FileEntry(path="model.onnx", sha256=sha, size=(slot / "model.onnx").stat().st_size,
                         role="model.onnx")],
        runtimes=[RuntimeEntry(kind="onnx", file="model.onnx")], input=InputSpec(imgsz=32),
        class_names=["a", "b", "c"], key_id="0123456789abcdef")
    events = []
    resolved = resolve_model(slot, manifest, hw, "tensorrt", cache_dir=tmp_path / "engines",
                             progress=events.append, workspace_bytes=1 << 28)
    assert resolved.built and resolved.path.stat().st_size > 0
    assert events[0].outcome == "started" and events[-1].outcome == "succeeded"
    with create_detector(resolved.path, {"type": "tensorrt"}) as det:
        assert det.class_names == ("a", "b", "c") and det.imgsz == (32, 32)
        det.health_check()
        det.infer(np.zeros((48, 64, 3), np.uint8))
    assert resolve_model(slot, manifest, hw, "tensorrt", cache_dir=tmp_path / "engines").cached
