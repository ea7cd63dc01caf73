"""The seed model and the demo's promise: the default shift breaks it, a fine-tune wins it back.

These train real models (minutes on 2 CPU cores). The trained seed model is cached in the
demo's cache (``$EDGELOOP_CACHE_DIR``, else ``~/.cache/edgeloop``), so only the first run pays.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

GOLDEN_FLOOR = 0.8


@pytest.fixture(scope="module")
def cache(model_cache: Path) -> Path:
    return model_cache


@pytest.fixture(scope="module")
def seed(cache: Path, ultralytics_offline):
    from training.seed_model import ensure_seed_model

    return ensure_seed_model(cache, "fast", config_dir=cache / "ultralytics")


def test_seed_model_is_cached(cache: Path, seed) -> None:
    from training.seed_model import PROFILES, ensure_seed_model

    t = time.monotonic()
    again = ensure_seed_model(cache, "fast")
    assert time.monotonic() - t < 10
    assert again.pt == seed.pt and again.key == seed.key
    assert seed.imgsz == PROFILES["fast"].imgsz
    assert seed.hyperparameters["model"] == "yolov8n.yaml"
    assert seed.golden_version.startswith("golden-s7-n200-")


def test_seed_model_learns_base_and_fails_on_default_shift(cache: Path, seed) -> None:
    from training import yolo
    from training.golden import ensure_eval_set
    from training.synth import DEFAULT_SHIFT

    golden = seed.metrics["map50"]
    assert golden > GOLDEN_FLOOR, seed.metrics
    shifted = yolo.evaluate(
        seed.pt, ensure_eval_set(cache, DEFAULT_SHIFT, 7, 200, seed.imgsz).data_yaml, seed.imgsz
    )
    assert shifted.map50 <= 0.5 * golden, (shifted, golden)


def test_seed_onnx_runs(seed) -> None:
    import numpy as np
    import onnxruntime as ort

    from training.synth import CLASS_NAMES

    sess = ort.InferenceSession(str(seed.onnx), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    assert inp.shape == [1, 3, seed.imgsz, seed.imgsz]
    (out,) = sess.run(None, {inp.name: np.zeros((1, 3, seed.imgsz, seed.imgsz), np.float32)})
    assert out.shape[:2] == (1, 4 + len(CLASS_NAMES))
    meta = sess.get_modelmeta().custom_metadata_map
    assert "names" in meta


def test_finetune_wins_the_shift_back(cache: Path, seed, tmp_path: Path) -> None:
    from training import yolo
    from training.finetune import FINETUNE_DEFAULTS, build_finetune_dataset, finetune
    from training.golden import ensure_eval_set, ensure_golden_set
    from training.synth import DEFAULT_SHIFT, write_frames

    frames = tmp_path / "collected"
    write_frames(frames, DEFAULT_SHIFT, 1, 0, 240, seed.imgsz)
    base = seed.data_yaml.parent
    data = build_finetune_dataset(
        tmp_path / "ft", [frames], [base / "images" / "train"], [base / "images" / "val"]
    )
    result = finetune(seed.pt, data, tmp_path / "run", imgsz=seed.imgsz, params=FINETUNE_DEFAULTS)

    golden = ensure_golden_set(cache, 7, 200, seed.imgsz)
    shift = ensure_eval_set(cache, DEFAULT_SHIFT, 7, 200, seed.imgsz)
    before_shift = yolo.evaluate(seed.pt, shift.data_yaml, seed.imgsz).map50
    after_shift = yolo.evaluate(result.best_pt, shift.data_yaml, seed.imgsz).map50
    after_golden = yolo.evaluate(result.best_pt, golden.data_yaml, seed.imgsz).map50
    before_golden = seed.metrics["map50"]
    # Most of the gap closed, golden accuracy kept.
    assert after_shift - before_shift >= 0.5 * (before_golden - before_shift), (before_shift, after_shift)
    assert after_golden >= before_golden - 0.03, (before_golden, after_golden)
