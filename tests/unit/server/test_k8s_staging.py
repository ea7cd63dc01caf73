"""Staging a retrain's inputs for a pod: every file the spec reaches, at pod paths, in one tar."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
import yaml

from server.pipeline.k8s_staging import StagingError, label_for, output_member, plan_inputs, write_archive
from server.pipeline.runner import write_train_list
from training import synth

IN, OUT, CFG = "/job/in", "/job/out", "/job/ultralytics"
NAMES = ["scratch", "dent", "stain"]


def _image(root: Path, split: str, name: str, label: str | None) -> Path:
    image = root / split / "images" / f"{name}.jpg"
    image.parent.mkdir(parents=True, exist_ok=True)
    image.write_bytes(f"jpeg {root.name}/{split}/{name}".encode())
    if label is not None:
        lab = root / split / "labels" / f"{name}.txt"
        lab.parent.mkdir(parents=True, exist_ok=True)
        lab.write_text(label)
    return image


def _write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def runner_spec(tmp_path: Path) -> dict:
    """A spec shaped like RetrainRunner's: new samples + replayed seed images, new-data and golden sets."""
    work = tmp_path / "jobs" / "000007"
    data = work / "data"
    new_train = [_image(data, "train", f"n{i}", f"0 0.5 0.5 0.1 0.1\n{i % 3} 0.2 0.2 0.1 0.1\n") for i in range(3)]
    _image(data, "val", "v0", "1 0.5 0.5 0.2 0.2\n")
    _image(data, "val", "v1", None)  # a background frame: no label file
    seed = tmp_path / "seed"
    replay = [_image(seed, "train", f"s{i}", f"2 0.4 0.4 0.1 0.1 # seed {i}\n") for i in range(2)]
    # Written by the same helpers the runner uses, so the staging reads their real format.
    data_yaml = synth.write_data_yaml(data, [write_train_list(data, new_train + replay)], [data / "val" / "images"],
                                      NAMES)
    new_yaml = synth.write_data_yaml(data, [data / "val" / "images"], [data / "val" / "images"], NAMES,
                                     filename="new_data.yaml")
    names = {0: "scratch", 1: "dent", 2: "stain"}
    golden = tmp_path / "golden"
    _image(golden, "val", "g0", "0 0.5 0.5 0.3 0.3\n")
    golden_yaml = _write_yaml(golden / "data.yaml", {"train": "val/images", "val": "val/images", "names": names})
    weights = work / "production.pt"
    weights.write_bytes(b"weights")
    return {"base_weights": str(weights), "production_weights": str(weights), "data_yaml": str(data_yaml),
            "out_dir": str(work / "out"), "imgsz": 160, "finetune": {"epochs": 2},
            "eval_sets": {"golden": str(golden_yaml), "new_data": str(new_yaml), "device:cam/01": str(new_yaml)},
            "config_dir": str(tmp_path / "ultralytics")}


def _extract(archive: Path, dest: Path) -> None:
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")


def _local(pod_path: str, root: Path) -> Path:
    assert pod_path.startswith(IN + "/"), pod_path
    return root / pod_path[len(IN) + 1:]


def test_staged_spec_points_only_into_the_pod_folders(runner_spec, tmp_path):
    pod_spec, plan = plan_inputs(runner_spec, inputs_dir=IN, out_dir=OUT, config_dir=CFG)
    assert pod_spec["out_dir"] == OUT and pod_spec["config_dir"] == CFG and pod_spec["inputs_dir"] == IN
    for key in ("base_weights", "production_weights", "data_yaml"):
        assert pod_spec[key].startswith(IN + "/")
    assert set(pod_spec["eval_sets"]) == {"golden", "new_data", "device:cam/01"}
    # Any evaluation-set name is fine: its folder gets a safe, unique name.
    assert pod_spec["eval_sets"]["device:cam/01"].startswith(f"{IN}/sets/03-device-cam-01/")
    assert len(set(pod_spec["eval_sets"].values()) | {pod_spec["data_yaml"]}) == 4
    assert pod_spec["finetune"] == {"epochs": 2} and pod_spec["imgsz"] == 160  # the rest is untouched
    # The same weights file, reached twice, is staged once.
    assert pod_spec["base_weights"] == pod_spec["production_weights"]
    assert sum(1 for m in plan.files if m.startswith("weights/")) == 1


def test_archive_holds_every_image_with_its_label_at_the_staged_paths(runner_spec, tmp_path):
    pod_spec, plan = plan_inputs(runner_spec, inputs_dir=IN, out_dir=OUT, config_dir=CFG)
    archive = tmp_path / "inputs.tar"
    assert write_archive(plan, archive) == archive.stat().st_size > 0
    pod = tmp_path / "pod-in"
    _extract(archive, pod)

    assert _local(pod_spec["base_weights"], pod).read_bytes() == b"weights"
    expected_counts = {"data_yaml": (5, 2), "golden": (1, 1), "new_data": (2, 2),  # (train, val) images
                       "device:cam/01": (2, 2)}
    yamls = {"data_yaml": pod_spec["data_yaml"], **pod_spec["eval_sets"]}
    for name, pod_yaml in yamls.items():
        data = yaml.safe_load(_local(pod_yaml, pod).read_text())
        assert data["names"] == {0: "scratch", 1: "dent", 2: "stain"}
        assert data["path"].startswith(IN + "/")
        for split, count in zip(("train", "val"), expected_counts[name], strict=True):
            listed = _local(data[split], pod).read_text().splitlines()
            assert len(listed) == count, (name, split)
            for pod_image in listed:
                image = _local(pod_image, pod)
                assert image.read_bytes().startswith(b"jpeg ")
                # Ultralytics finds the label by the same rule in the pod as on the server.
                original_name = image.read_bytes().decode().split(" ", 1)[1]
                label = label_for(image)
                if original_name.endswith("val/v1"):
                    assert not label.exists()  # background images stay label-less
                else:
                    assert label.is_file() and label.read_text().strip()
    # Replayed seed labels came along, byte for byte.
    seed_labels = sorted(p.read_text() for p in pod.rglob("labels/s*.txt"))
    assert seed_labels == ["2 0.4 0.4 0.1 0.1 # seed 0\n", "2 0.4 0.4 0.1 0.1 # seed 1\n"]


def test_a_file_in_two_datasets_is_staged_once(runner_spec):
    _, plan = plan_inputs(runner_spec, inputs_dir=IN, out_dir=OUT, config_dir=CFG)
    sources = list(plan.files.values())
    assert len(sources) == len(set(sources))
    # 5 train + 2 val images, 4 of their labels + 1 val label, 1 golden image + label, 1 weights file.
    assert len(sources) == 5 + 5 + 2 + 1 + 2 + 1


def test_relative_image_line_is_refused(runner_spec, tmp_path):
    listing = Path(yaml.safe_load(Path(runner_spec["data_yaml"]).read_text())["train"][0])
    listing.write_text(listing.read_text() + "train/images/n0.jpg\n")
    with pytest.raises(StagingError, match="relative image path"):
        plan_inputs(runner_spec, inputs_dir=IN, out_dir=OUT, config_dir=CFG)


def test_dot_slash_lines_are_relative_to_the_list(runner_spec):
    listing = Path(yaml.safe_load(Path(runner_spec["data_yaml"]).read_text())["train"][0])
    listing.write_text("./train/images/n0.jpg\n")
    pod_spec, plan = plan_inputs(runner_spec, inputs_dir=IN, out_dir=OUT, config_dir=CFG)
    assert listing.parent / "train" / "images" / "n0.jpg" in plan.files.values()


def test_missing_image_is_refused(runner_spec):
    listing = Path(yaml.safe_load(Path(runner_spec["data_yaml"]).read_text())["train"][0])
    listing.write_text(listing.read_text() + "/nowhere/images/x.jpg\n")
    with pytest.raises(StagingError, match="does not exist"):
        plan_inputs(runner_spec, inputs_dir=IN, out_dir=OUT, config_dir=CFG)


def test_relative_dataset_root_is_refused(runner_spec):
    golden = Path(runner_spec["eval_sets"]["golden"])
    data = yaml.safe_load(golden.read_text())
    golden.write_text(yaml.safe_dump({**data, "path": "golden"}))
    with pytest.raises(StagingError, match="relative `path`"):
        plan_inputs(runner_spec, inputs_dir=IN, out_dir=OUT, config_dir=CFG)


def test_empty_image_folder_is_refused(runner_spec, tmp_path):
    empty = tmp_path / "empty" / "images"
    empty.mkdir(parents=True)
    golden = Path(runner_spec["eval_sets"]["golden"])
    golden.write_text(yaml.safe_dump({"train": str(empty), "val": str(empty), "names": {0: "a"}}))
    with pytest.raises(StagingError, match="holds no images"):
        plan_inputs(runner_spec, inputs_dir=IN, out_dir=OUT, config_dir=CFG)


def test_output_member_stays_inside_out_dir():
    assert output_member("/job/out/train/weights/best.pt", OUT) == "train/weights/best.pt"
    for bad in ("/job/outside/x.pt", "/etc/passwd", "/job/out", "/job/out/../in/x"):
        with pytest.raises(StagingError):
            output_member(bad, OUT)
