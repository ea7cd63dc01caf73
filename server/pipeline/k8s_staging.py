"""Stage a retrain's inputs for a pod that shares no disk with the server.

The local executor hands ``training.job_runner`` a spec of local paths: base weights, an
Ultralytics ``data.yaml`` (whose splits are image folders or ``.txt`` lists of image paths,
often pointing into other datasets, e.g. replayed seed data) and one ``data.yaml`` per
evaluation set. A Kubernetes pod sees none of those paths, so :func:`plan_inputs` gathers
every file the spec reaches, gives each a place under the pod's inputs folder, and rewrites
the spec and each ``data.yaml`` to those pod paths; :func:`write_archive` packs it all into
one tar the executor uploads to the object store.

Contract with the pod (what ``training.job_runner`` does with a staged spec):

- ``spec["inputs_uri"]`` = ``s3://BUCKET/KEY`` of the tar: download it and extract it into
  ``spec["inputs_dir"]`` *before* reading any other path in the spec (all of them, and every
  path inside the staged ``data.yaml`` / ``.txt`` files, already point under that folder);
- run as usual, writing into ``spec["out_dir"]``;
- then upload ``result.json``, ``best_pt`` and ``onnx`` from under ``out_dir`` to
  ``spec["outputs_uri"]`` + their path relative to ``out_dir`` (e.g. ``.../out/result.json``,
  ``.../out/train/weights/best.pt``), and only then print the ``result`` event.

Object-store endpoint and credentials come from the pod's environment (``EDGELOOP_S3_*``).

Pure apart from reading the dataset files it is asked to stage.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import yaml

#: Image suffixes Ultralytics reads from a folder split (its IMG_FORMATS, lower case).
IMAGE_SUFFIXES = frozenset({".bmp", ".dng", ".heic", ".jpeg", ".jpg", ".mpo", ".png", ".tif", ".tiff",
                            ".webp", ".pfm"})
SPLITS = ("train", "val", "test")
_WEIGHT_KEYS = ("base_weights", "production_weights")


class StagingError(ValueError):
    """The spec or one of its datasets cannot be staged as given."""


@dataclass
class InputsPlan:
    """What goes into the inputs archive: member name → local file, or → generated text."""

    files: dict[str, Path] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    _members_by_source: dict[Path, str] = field(default_factory=dict)
    _roots: dict[Path, str] = field(default_factory=dict)

    def add_file(self, source: Path, member: str) -> str:
        source = source.resolve()
        if source in self._members_by_source:  # the same file reached twice is staged once
            return self._members_by_source[source]
        if not source.is_file():
            raise StagingError(f"{source} does not exist (or is not a file)")
        if member in self.files or member in self.texts:
            raise StagingError(f"two inputs would be staged as {member}")
        self.files[member] = source
        self._members_by_source[source] = member
        return member

    def root_member(self, root: Path) -> str:
        """Every dataset root gets its own folder, so that images keep their labels beside them."""
        return self._roots.setdefault(root, f"datasets/{len(self._roots):03d}")

    @property
    def size(self) -> int:
        return sum(p.stat().st_size for p in self.files.values()) + sum(len(t.encode()) for t in self.texts.values())


def label_for(image: Path) -> Path:
    """Ultralytics' rule (``img2label_paths``): the last ``/images/`` becomes ``/labels/``, suffix ``.txt``."""
    text = str(image)
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return Path(sb.join(text.rsplit(sa, 1)).rsplit(".", 1)[0] + ".txt")


def _stage_image(plan: InputsPlan, image: Path, inputs_dir: str) -> str:
    """Stage one image and its label (when it has one); returns the image's pod path."""
    image = image.resolve()
    parts = image.parts
    if "images" in parts[:-1]:
        cut = len(parts) - 1 - parts[:-1][::-1].index("images") - 1  # index of the last "images" folder
        root, rel = Path(*parts[:cut]), PurePosixPath(*parts[cut:])
    else:  # no images/ folder: Ultralytics looks for the label beside the image
        root, rel = image.parent, PurePosixPath(image.name)
    base = plan.root_member(root)
    member = plan.add_file(image, f"{base}/{rel}")
    label = label_for(image)
    if label.is_file():  # an image without a label file is a background image: nothing to stage
        plan.add_file(label, f"{base}/{PurePosixPath(*label.relative_to(root).parts)}")
    return f"{inputs_dir}/{member}"


def _split_images(entry: str, base: Path, where: str) -> list[Path]:
    path = Path(entry)
    if not path.is_absolute():
        path = base / path
    if path.is_dir():
        images = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise StagingError(f"{where}: {path} holds no images")
        return images
    if path.is_file() and path.suffix == ".txt":
        images = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            line = line.strip()
            if not line:
                continue
            if line.startswith("./"):
                images.append(path.parent / line[2:])
            elif Path(line).is_absolute():
                images.append(Path(line))
            else:  # Ultralytics would resolve this against its working directory: ambiguous
                raise StagingError(f"{where}: {path}:{number}: relative image path {line!r} "
                                   "(use an absolute path or ./ relative to the list)")
        return images
    if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
        return [path]
    raise StagingError(f"{where}: {path} is not an image folder, an image list (.txt) or an image")


def _stage_data_yaml(plan: InputsPlan, data_yaml: Path, name: str, inputs_dir: str) -> str:
    """Stage a dataset; returns the pod path of its rewritten ``data.yaml``. ``name`` may be any
    text (evaluation sets are named e.g. ``device:cam-01``): its folder gets a safe name."""
    data_yaml = Path(data_yaml)
    try:
        data = yaml.safe_load(data_yaml.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise StagingError(f"dataset {name!r}: cannot read {data_yaml}: {exc}") from None
    if not isinstance(data, dict) or "train" not in data or "val" not in data:
        raise StagingError(f"dataset {name!r}: {data_yaml} is not an Ultralytics data.yaml (train/val)")
    if "path" in data and not Path(str(data["path"])).is_absolute():
        # Ultralytics resolves a relative `path` against its own datasets folder: refuse the guess.
        raise StagingError(f"dataset {name!r}: {data_yaml} has a relative `path` ({data['path']!r})")
    base = Path(str(data["path"])) if data.get("path") else data_yaml.parent.resolve()
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "set"
    member_dir = f"sets/{len(plan.datasets):02d}-{slug}"
    plan.datasets.append(name)
    staged = {k: v for k, v in data.items() if k not in {"path", "download", *SPLITS}}
    staged["path"] = f"{inputs_dir}/{member_dir}"
    for split in SPLITS:
        if not data.get(split):
            continue
        entries = data[split] if isinstance(data[split], list) else [data[split]]
        images = [img for entry in entries for img in _split_images(str(entry), base, f"dataset {name!r} {split}")]
        pod_images = [_stage_image(plan, img, inputs_dir) for img in images]
        plan.texts[f"{member_dir}/{split}.txt"] = "".join(f"{p}\n" for p in pod_images)
        staged[split] = f"{inputs_dir}/{member_dir}/{split}.txt"
    plan.texts[f"{member_dir}/data.yaml"] = yaml.safe_dump(staged, sort_keys=False)
    return f"{inputs_dir}/{member_dir}/data.yaml"


def plan_inputs(spec: dict, *, inputs_dir: str, out_dir: str, config_dir: str) -> tuple[dict, InputsPlan]:
    """The pod's spec (every path under ``inputs_dir``/``out_dir``/``config_dir``) and what to stage."""
    plan = InputsPlan()
    pod_spec = dict(spec)
    for key in _WEIGHT_KEYS:
        if spec.get(key):
            source = Path(spec[key])
            pod_spec[key] = f"{inputs_dir}/" + plan.add_file(source, f"weights/{source.name}")
    pod_spec["data_yaml"] = _stage_data_yaml(plan, Path(spec["data_yaml"]), "train", inputs_dir)
    eval_sets = {}
    for name, path in spec.get("eval_sets", {}).items():
        eval_sets[name] = _stage_data_yaml(plan, Path(path), name, inputs_dir)
    pod_spec["eval_sets"] = eval_sets
    pod_spec["out_dir"] = out_dir
    pod_spec["config_dir"] = config_dir
    pod_spec["inputs_dir"] = inputs_dir
    pod_spec.pop("eval_cache_dir", None)  # a server-side folder; the pod has no use for it
    return pod_spec, plan


def write_archive(plan: InputsPlan, path: Path) -> int:
    """Write the plan as an uncompressed tar (images are compressed already); returns its size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for member, text in sorted(plan.texts.items()):
            data = text.encode()
            info = tarfile.TarInfo(member)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
        for member, source in sorted(plan.files.items()):
            tar.add(source, arcname=member, recursive=False)
    return path.stat().st_size


def output_member(pod_path: str, out_dir: str) -> str:
    """Where a pod output lives relative to ``out_dir`` (refuses anything outside it)."""
    path, root = PurePosixPath(pod_path), PurePosixPath(out_dir)
    if not path.is_relative_to(root) or path == root or ".." in path.parts:
        raise StagingError(f"pod output {pod_path!r} is not under {out_dir!r}")
    return str(path.relative_to(root))
