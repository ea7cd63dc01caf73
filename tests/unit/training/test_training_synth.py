"""Synthetic data: determinism, valid labels in every scenario, dataset and frame layout."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import yaml

from training import synth


def test_registry_shape() -> None:
    assert len(synth.CLASS_NAMES) >= 3
    assert {"base", "low_light", "new_variant", "new_defect_look", "line_b"} <= set(synth.SCENARIOS)
    assert synth.DEFAULT_SHIFT == "line_b"
    for name, sc in synth.SCENARIOS.items():
        assert sc.name == name
        assert sc.description
        with pytest.raises(dataclasses.FrozenInstanceError):
            sc.name = "x"  # type: ignore[misc]


def test_unknown_scenario() -> None:
    with pytest.raises(KeyError, match="known"):
        synth.render_frame("nope", 0, 0)


@pytest.mark.parametrize("scenario", sorted(synth.SCENARIOS))
def test_same_arguments_same_frame(scenario: str) -> None:
    a_img, a_lbl = synth.render_frame(scenario, 3, 11)
    b_img, b_lbl = synth.render_frame(scenario, 3, 11)
    assert a_img.tobytes() == b_img.tobytes()
    assert a_lbl == b_lbl
    assert synth.encode_jpeg(a_img) == synth.encode_jpeg(b_img)


def test_independent_of_global_random_state() -> None:
    np.random.seed(1)
    a, _ = synth.render_frame("base", 0, 5)
    np.random.seed(2)
    np.random.random(100)
    b, _ = synth.render_frame("base", 0, 5)
    assert np.array_equal(a, b)


def test_different_seeds_indices_scenarios_differ() -> None:
    base, _ = synth.render_frame("base", 0, 0)
    assert not np.array_equal(base, synth.render_frame("base", 1, 0)[0])
    assert not np.array_equal(base, synth.render_frame("base", 0, 1)[0])
    assert not np.array_equal(base, synth.render_frame("line_b", 0, 0)[0])
    labels = [synth.render_frame("base", s, 0)[1] for s in range(8)]
    assert len({tuple(lbl) for lbl in labels}) > 1


@pytest.mark.parametrize("scenario", sorted(synth.SCENARIOS))
@pytest.mark.parametrize("imgsz", [160, 256])
def test_every_scenario_renders_valid_labels(scenario: str, imgsz: int) -> None:
    counts = np.zeros(len(synth.CLASS_NAMES), int)
    for index in range(40):
        img, labels = synth.render_frame(scenario, 0, index, imgsz)
        assert img.shape == (imgsz, imgsz, 3)
        assert img.dtype == np.uint8
        assert len(labels) <= 3
        for cls, cx, cy, w, h in labels:
            assert 0 <= cls < len(synth.CLASS_NAMES)
            assert w > 0 and h > 0
            assert cx - w / 2 + 1e-9 >= 0.0 and cx + w / 2 <= 1.0 + 1e-9
            assert cy - h / 2 + 1e-9 >= 0.0 and cy + h / 2 <= 1.0 + 1e-9
            # Large enough for a 160-px detector to learn: at least ~8 px on the longer side.
            assert max(w, h) * 160 >= 8
            counts[cls] += 1
        boxes = [(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2) for _, cx, cy, w, h in labels]
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                assert synth._iou(boxes[i], boxes[j]) < 0.3
    assert (counts > 0).all(), counts


def test_shift_changes_the_look() -> None:
    """The default shift is darker and differently coloured than base (the seed model's world)."""
    base = np.stack([synth.render_frame("base", 0, i)[0] for i in range(20)]).astype(float)
    shifted = np.stack([synth.render_frame(synth.DEFAULT_SHIFT, 0, i)[0] for i in range(20)]).astype(float)
    assert shifted.mean() < base.mean() * 0.7


def test_labels_roundtrip() -> None:
    _, labels = synth.render_frame("base", 0, 2)
    again = synth.parse_labels(synth.format_labels(labels))
    assert [c for c, *_ in again] == [c for c, *_ in labels]
    assert np.allclose([r[1:] for r in again], [r[1:] for r in labels], atol=1e-6) if labels else again == []


def test_write_yolo_dataset(tmp_path: Path) -> None:
    data_yaml = synth.write_yolo_dataset(tmp_path / "ds", "base", 0, 6, 3, 96, start_index=10)
    root = (tmp_path / "ds").resolve()
    assert data_yaml == root / "data.yaml"
    cfg = yaml.safe_load(data_yaml.read_text())
    assert Path(cfg["path"]) == root
    assert cfg["train"] == [str(root / "images" / "train")]
    assert cfg["val"] == [str(root / "images" / "val")]
    assert [cfg["names"][i] for i in range(len(synth.CLASS_NAMES))] == synth.CLASS_NAMES
    train = sorted((root / "images" / "train").glob("*.jpg"))
    val = sorted((root / "images" / "val").glob("*.jpg"))
    assert len(train) == 6 and len(val) == 3
    assert not {p.name for p in train} & {p.name for p in val}
    for img in train + val:
        split = img.parent.name
        label = root / "labels" / split / (img.stem + ".txt")
        assert label.is_file()
    # Frame 10 of the dataset is render_frame(index=10), labels included.
    first = root / "labels" / "train" / "base_s0_000010.txt"
    assert synth.parse_labels(first.read_text()) == synth.parse_labels(
        synth.format_labels(synth.render_frame("base", 0, 10, 96)[1])
    )
    # Same call, same bytes.
    again = synth.write_yolo_dataset(tmp_path / "ds2", "base", 0, 6, 3, 96, start_index=10)
    for p in sorted((root / "images").rglob("*.jpg")):
        twin = again.parent / p.relative_to(root)
        assert p.read_bytes() == twin.read_bytes()


def test_write_frames(tmp_path: Path) -> None:
    paths = synth.write_frames(tmp_path / "frames", "line_b", 4, 100, 5, 160)
    assert [p.name for p in paths] == [f"frame_{i:06d}.jpg" for i in range(100, 105)]
    for i, p in zip(range(100, 105), paths, strict=True):
        txt = p.with_suffix(".txt")
        assert txt.is_file()
        assert txt.read_text() == synth.format_labels(synth.render_frame("line_b", 4, i, 160)[1])
        import cv2

        img = cv2.imread(str(p))
        assert img.shape == (160, 160, 3)


def test_write_data_yaml_mixes_dirs(tmp_path: Path) -> None:
    a = tmp_path / "a"
    b = tmp_path / "b"
    out = synth.write_data_yaml(tmp_path / "mix", [a, b], [b], synth.CLASS_NAMES)
    cfg = yaml.safe_load(out.read_text())
    assert cfg["train"] == [str(a.resolve()), str(b.resolve())]
    assert cfg["val"] == [str(b.resolve())]
    assert cfg["nc"] == 3
    with pytest.raises(ValueError):
        synth.write_data_yaml(tmp_path / "bad", [], [b])


def test_negative_seed_rejected() -> None:
    with pytest.raises(ValueError):
        synth.render_frame("base", -1, 0)
