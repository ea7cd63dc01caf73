"""YOLO exports in the layouts CVAT, Label Studio and Roboflow write, remapped by class name."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from training.yolo_import import ImportError_, plan_import

REGISTERED = ["scratch", "dent", "stain"]


def _img(path: Path, labels: str | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((32, 32, 3), 100, np.uint8))
    if labels is not None:
        label = Path(str(path.with_suffix(".txt")).replace("/images/", "/labels/"))
        label.parent.mkdir(parents=True, exist_ok=True)
        label.write_text(labels)


def test_roboflow_data_yaml_with_another_class_order_is_remapped_by_name(tmp_path: Path) -> None:
    # Roboflow: train/images, valid/images, "../train/images" paths, names in its own order.
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(
        {"train": "../train/images", "val": "../valid/images", "nc": 3, "names": ["stain", "scratch", "dent"]}))
    _img(tmp_path / "train" / "images" / "a.jpg", "0 0.5 0.5 0.2 0.2\n2 0.3 0.3 0.1 0.1\n")
    _img(tmp_path / "valid" / "images" / "b.jpg", "1 0.5 0.5 0.2 0.2\n")
    plan = plan_import(tmp_path, REGISTERED)
    assert plan.layout == "data.yaml" and plan.names == ["stain", "scratch", "dent"]
    by_name = {i.image.name: i for i in plan.items}
    assert [b["cls"] for b in by_name["a.jpg"].labels] == [2, 1]  # stain -> 2, dent -> 1
    assert [b["cls"] for b in by_name["b.jpg"].labels] == [0]


def test_cvat_yolo_1_1_and_refusals_keep_their_reason(tmp_path: Path) -> None:
    (tmp_path / "obj.names").write_text("scratch\ndent\nrust\n")
    _img(tmp_path / "obj_train_data" / "ok.jpg", "0 0.5 0.5 0.2 0.2\n")
    _img(tmp_path / "obj_train_data" / "rust.jpg", "2 0.5 0.5 0.2 0.2\n")
    _img(tmp_path / "obj_train_data" / "bad.jpg", "0 0.5 0.5\n")
    _img(tmp_path / "obj_train_data" / "nolabel.jpg", None)
    plan = plan_import(tmp_path, REGISTERED)
    assert plan.layout == "cvat-yolo"
    reasons = {i.image.name: i.reason for i in plan.items}
    assert reasons["ok.jpg"] == ""
    assert "class 'rust' is not registered" in reasons["rust.jpg"]
    assert "expected 'class cx cy w h'" in reasons["bad.jpg"]
    assert reasons["nolabel.jpg"].startswith("no label file")
    assert [i.image.name for i in plan.usable] == ["ok.jpg"]


def test_label_studio_and_plain_folder(tmp_path: Path) -> None:
    ls = tmp_path / "ls"
    (ls).mkdir()
    (ls / "classes.txt").write_text("dent\n")
    _img(ls / "images" / "x.png", "0 0.5 0.5 0.2 0.2\n")
    plan = plan_import(ls, REGISTERED)
    assert plan.layout == "label-studio" and plan.usable[0].labels[0]["cls"] == 1

    plain = tmp_path / "plain"
    plain.mkdir()
    cv2.imwrite(str(plain / "y.jpg"), np.zeros((16, 16, 3), np.uint8))
    (plain / "y.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    with pytest.raises(ImportError_, match="pass the class names"):
        plan_import(plain, REGISTERED)
    assert plan_import(plain, REGISTERED, ["stain"]).usable[0].labels[0]["cls"] == 2
