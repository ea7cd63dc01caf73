"""The exported ONNX model against the PyTorch weights, and the TensorRT engine step without a GPU."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from training import engine_build
from training.engine_build import EngineTarget, build_engines


@pytest.mark.slow
def test_exported_onnx_matches_pytorch_and_a_corrupted_export_does_not(model_cache: Path, ultralytics_offline,
                                                                        tmp_path: Path) -> None:
    from training.export_checks import check_export_parity
    from training.seed_model import ensure_seed_model
    from training.synth import write_frames

    seed = ensure_seed_model(model_cache, "fast", config_dir=model_cache / "ultralytics")

    images = write_frames(tmp_path / "frames", "base", seed=3, start=0, count=3)
    parity = check_export_parity(seed.pt, seed.onnx, images, 160)
    assert parity.passed, parity
    assert parity.opset == 17
    assert parity.images == 3
    assert parity.max_score_diff < 1e-3

    # Scale one initializer of the graph: the export now computes something else and must fail.
    import onnx
    from onnx import numpy_helper

    broken = tmp_path / "broken.onnx"
    model = onnx.load(str(seed.onnx))
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.5, init.name))
    onnx.save(model, str(broken))
    assert not check_export_parity(seed.pt, broken, images, 160).passed


def test_without_a_builder_every_target_is_skipped_with_the_reason(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(engine_build, "local_builder",
                        lambda: (None, "no builder available: the tensorrt package is not installed"))
    targets = [EngineTarget("8.7", "10.3.0"), EngineTarget("8.9", "10.8.0", "int8")]
    builds = build_engines(tmp_path / "missing.pt", 160, targets, tmp_path / "engines")
    assert [b.status for b in builds] == ["skipped", "skipped"]
    assert all(b.reason.startswith("no builder available") for b in builds)
    assert builds[1].as_dict()["target"] == {"gpu_compute_capability": "8.9", "tensorrt_version": "10.8.0",
                                             "precision": "int8"}
    assert not (tmp_path / "engines").exists()


def test_a_builder_only_builds_its_own_target(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(engine_build, "local_builder", lambda: (EngineTarget("9.0", "10.8.0"), ""))
    built = []
    monkeypatch.setattr(engine_build, "_build_one",
                        lambda pt, imgsz, target, out, evaluate: built.append(target)
                        or engine_build.EngineBuild(target, "built", path=str(out / "x.engine")))
    builds = build_engines(tmp_path / "m.pt", 160, [EngineTarget("8.7", "10.3.0"), EngineTarget("9.0", "10.8.0")],
                           tmp_path)
    assert [b.status for b in builds] == ["skipped", "built"]
    assert "needs its own builder" in builds[0].reason
    assert built == [EngineTarget("9.0", "10.8.0")]


def test_local_builder_reports_why_not_here() -> None:
    target, reason = engine_build.local_builder()
    if shutil.which("nvidia-smi") is None:
        assert target is None and reason.startswith("no builder available")
