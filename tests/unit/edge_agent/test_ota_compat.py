"""Bundle vs device: TensorRT engines only on their GPU/TensorRT, ONNX wherever ONNX Runtime is,
and the agent version floor."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from edge_agent.ota.compat import DeviceProfile, IncompatibleBundle, check_compatible, runnable_runtimes
from firmware_bundles import BundleError, BundleManifest
from protocol.messages import Hardware

ORIN = Hardware(gpu="Orin", gpu_compute_capability="8.7", tensorrt_version="10.3.0.26",
                onnxruntime_providers=["CPUExecutionProvider"])
CPU_ONLY = Hardware(onnxruntime_providers=["CPUExecutionProvider"])
NOTHING = Hardware()


def _manifest(*, onnx: bool = True, engines: tuple[tuple[str, str], ...] = (), min_agent: str = "0.1.0"):
    files, runtimes = [], []
    if onnx:
        files.append({"path": "model.onnx", "sha256": "ab" * 32, "size": 4, "role": "model.onnx"})
        runtimes.append({"kind": "onnx", "file": "model.onnx"})
    for cc, trt in engines:
        name = f"model-sm{cc.replace('.', '')}.engine"
        files.append({"path": name, "sha256": "cd" * 32, "size": 4, "role": "model.engine"})
        runtimes.append({"kind": "tensorrt", "file": name, "precision": "fp16",
                         "target": {"gpu_compute_capability": cc, "tensorrt_version": trt}})
    return BundleManifest.model_validate({
        "model_name": "detector", "version": 5, "created_at": datetime(2024, 5, 1, tzinfo=UTC),
        "files": files, "runtimes": runtimes, "input": {"imgsz": 160}, "class_names": ["a"],
        "key_id": "0123456789abcdef", "min_agent_version": min_agent,
    })


def test_onnx_bundle_runs_on_a_cpu_device() -> None:
    assert check_compatible(_manifest(), CPU_ONLY, "0.1.0").kind == "onnx"


def test_matching_engine_is_preferred_over_onnx() -> None:
    chosen = check_compatible(_manifest(engines=(("8.6", "10.3"), ("8.7", "10.3"))), ORIN, "0.1.0")
    assert chosen.kind == "tensorrt" and chosen.target.gpu_compute_capability == "8.7"


def test_engine_for_another_gpu_falls_back_to_onnx() -> None:
    runtimes = runnable_runtimes(_manifest(engines=(("8.6", "10.3"),)), ORIN)
    assert [r.kind for r in runtimes] == ["onnx"]


def test_engines_only_for_other_compute_capabilities_are_refused() -> None:
    with pytest.raises(IncompatibleBundle) as info:
        check_compatible(_manifest(onnx=False, engines=(("8.6", "10.3"), ("7.5", "10.3"))), ORIN, "0.1.0")
    reason = str(info.value)
    assert reason.startswith("wrong hardware: bundle 5 offers TensorRT engine for compute capability 8.6")
    assert "7.5" in reason and "and no ONNX fallback" in reason
    assert "this device has GPU compute capability 8.7, TensorRT 10.3.0.26" in reason
    assert isinstance(info.value, BundleError)


def test_engine_for_another_tensorrt_version_is_refused() -> None:
    with pytest.raises(IncompatibleBundle, match="wrong hardware"):
        check_compatible(_manifest(onnx=False, engines=(("8.7", "8.6"),)), ORIN, "0.1.0")


def test_engine_on_a_device_without_gpu_is_refused() -> None:
    with pytest.raises(IncompatibleBundle, match="this device has no GPU, ONNX Runtime"):
        check_compatible(_manifest(onnx=False, engines=(("8.7", "10.3"),)), CPU_ONLY, "0.1.0")


def test_onnx_without_onnxruntime_is_refused() -> None:
    with pytest.raises(IncompatibleBundle, match="offers onnx model model.onnx; this device has no GPU, no ONNX"):
        check_compatible(_manifest(), NOTHING, "0.1.0")


@pytest.mark.parametrize(("needs", "agent", "ok"), [("0.2", "0.1.0", False), ("0.1.0", "0.1", True),
                                                      ("1.0.0", "1.0.1", True), ("0.10", "0.9.9", False)])
def test_min_agent_version(needs: str, agent: str, ok: bool) -> None:
    manifest = _manifest(min_agent=needs)
    if ok:
        check_compatible(manifest, CPU_ONLY, agent)
    else:
        with pytest.raises(IncompatibleBundle, match=f"needs agent {needs} or newer, this agent is {agent}"):
            check_compatible(manifest, CPU_ONLY, agent)


# ---------------------------------------------------------------- with the agent's detector backend known


def test_tensorrt_agent_refuses_engines_for_another_gpu_without_onnx() -> None:
    profile = DeviceProfile(ORIN, "0.1.0", detector_type="tensorrt")
    with pytest.raises(IncompatibleBundle) as info:
        profile.check(_manifest(onnx=False, engines=(("8.6", "10.3"),)))
    assert str(info.value) == (
        "wrong hardware: no engine in the bundle for sm 8.7, TensorRT 10.3.0.26 (it has: sm 8.6 / TensorRT 10.3 "
        "(fp16)), and no ONNX model to build one from; this device has GPU compute capability 8.7, "
        "TensorRT 10.3.0.26, ONNX Runtime")


def test_tensorrt_agent_takes_the_matching_engine_or_builds_from_onnx() -> None:
    profile = DeviceProfile(ORIN, "0.1.0", detector_type="tensorrt")
    assert profile.check(_manifest(engines=(("8.7", "10.3"),))) == "load tensorrt model-sm87.engine (fp16)"
    assert profile.check(_manifest(engines=(("8.6", "10.3"),))) == "build tensorrt model.onnx (fp16)"
    no_build = DeviceProfile(ORIN, "0.1.0", detector_type="tensorrt", engine_build=False)
    with pytest.raises(IncompatibleBundle, match="building engines on the device is turned off"):
        no_build.check(_manifest(engines=(("8.6", "10.3"),)))


def test_tensorrt_agent_on_a_device_without_gpu_refuses_everything() -> None:
    with pytest.raises(IncompatibleBundle, match="the tensorrt backend needs an NVIDIA GPU and TensorRT"):
        DeviceProfile(CPU_ONLY, "0.1.0", detector_type="tensorrt").check(_manifest())


def test_onnxruntime_agent_refuses_an_engine_only_bundle_even_for_its_own_gpu() -> None:
    # The engine would fit the GPU, but the configured backend cannot load it.
    with pytest.raises(IncompatibleBundle, match="ships no ONNX model for the onnxruntime backend"):
        DeviceProfile(ORIN, "0.1.0", detector_type="onnxruntime").check(
            _manifest(onnx=False, engines=(("8.7", "10.3"),)))


def test_profile_checks_the_agent_version_first() -> None:
    with pytest.raises(IncompatibleBundle, match="^wrong agent"):
        DeviceProfile(ORIN, "0.1.0", detector_type="tensorrt").check(
            _manifest(onnx=False, engines=(("8.6", "10.3"),), min_agent="2.0"))


def test_onnx_becomes_runnable_through_an_on_device_engine_build() -> None:
    gpu_without_ort = Hardware(gpu_compute_capability="8.7", tensorrt_version="10.3.0")
    assert [r.kind for r in runnable_runtimes(_manifest(), gpu_without_ort)] == ["onnx"]
