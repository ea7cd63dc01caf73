"""The seed model: yolov8n trained from scratch on the ``base`` scenario, cached per machine.

The cache key is a content hash of (generator version, profile parameters, Ultralytics
version), so the demo trains it once per machine and every later call returns the cached
weights, ONNX export and golden-set metrics. Concurrent callers are serialised by a file lock.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from training import synth
from training.golden import GoldenSet, ensure_golden_set, file_lock

ProfileName = Literal["fast", "full"]


@dataclass(frozen=True)
class Profile:
    """Training recipe of the seed model (and the scale the fine-tune runs at)."""

    name: str
    imgsz: int
    n_train: int
    n_val: int
    epochs: int
    batch: int
    seed: int = 0
    data_seed: int = 0
    golden_seed: int = 7
    golden_n: int = 200
    #: Extra Ultralytics arguments (beyond the wrapper's defaults).
    train_args: dict[str, Any] = field(default_factory=dict)

    def key(self) -> str:
        import importlib.metadata

        payload = {
            "generator": synth.GENERATOR_VERSION,
            "profile": asdict(self),
            "ultralytics": importlib.metadata.version("ultralytics"),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


PROFILES: dict[str, Profile] = {
    # Measured on 2 CPU cores (no other load): 144 s of training (~14 s/epoch), golden mAP50 0.969 /
    # mAP50-95 0.591; on the default shift (line_b) mAP50 0.001.
    "fast": Profile(
        name="fast",
        imgsz=160,
        n_train=800,
        n_val=100,
        epochs=10,
        batch=32,
    ),
    # Larger images, more data and epochs than --fast, still sized for 2 CPU cores
    # (about 15 minutes of training there); a GPU node can afford far more.
    "full": Profile(
        name="full",
        imgsz=224,
        n_train=1200,
        n_val=150,
        epochs=20,
        batch=32,
    ),
}


@dataclass(frozen=True)
class SeedModel:
    profile: str
    key: str
    pt: Path
    onnx: Path
    #: Golden-set metrics (:class:`training.yolo.EvalMetrics` as a dict).
    metrics: dict[str, Any]
    hyperparameters: dict[str, Any]
    data_yaml: Path
    golden_version: str
    train_seconds: float
    imgsz: int


def _load(root: Path, data_yaml: Path) -> SeedModel:
    info = json.loads((root / "seed_model.json").read_text())
    return SeedModel(
        profile=info["profile"],
        key=info["key"],
        pt=root / "model.pt",
        onnx=root / "model.onnx",
        metrics=info["metrics"],
        hyperparameters=info["hyperparameters"],
        data_yaml=data_yaml,
        golden_version=info["golden_version"],
        train_seconds=info["train_seconds"],
        imgsz=info["imgsz"],
    )


def profile_of(profile: ProfileName | str | Profile) -> Profile:
    if isinstance(profile, Profile):
        return profile
    try:
        return PROFILES[profile]
    except KeyError:
        raise KeyError(f"unknown profile {profile!r}; known: {', '.join(PROFILES)}") from None


def ensure_base_dataset(cache_dir: Path, profile: ProfileName | str | Profile) -> Path:
    """The seed model's ``base`` training dataset (also the replay source for fine-tunes)."""
    p = profile_of(profile)
    cache_dir = Path(cache_dir).resolve()
    name = f"base-s{p.data_seed}-{p.n_train}+{p.n_val}-{p.imgsz}-{synth.GENERATOR_VERSION}"
    root = cache_dir / "datasets" / name
    with file_lock(cache_dir / "datasets" / f".{name}.lock"):
        done = root / ".complete"
        if not done.is_file():
            shutil.rmtree(root, ignore_errors=True)
            synth.write_yolo_dataset(root, "base", p.data_seed, p.n_train, p.n_val, p.imgsz)
            done.write_text("ok\n")
        data_yaml = synth.write_data_yaml(root, [root / "images" / "train"], [root / "images" / "val"])
    return data_yaml


def ensure_seed_model(
    cache_dir: Path,
    profile: ProfileName | str | Profile = "fast",
    on_epoch=None,
    *,
    config_dir: Path | None = None,
) -> SeedModel:
    """Train (once) and return the seed model of ``profile`` under ``cache_dir/seed-models``."""
    p = profile_of(profile)
    cache_dir = Path(cache_dir).resolve()
    key = p.key()
    root = cache_dir / "seed-models" / f"{p.name}-{key}"
    data_yaml = ensure_base_dataset(cache_dir, p)
    with file_lock(cache_dir / "seed-models" / f".{p.name}-{key}.lock"):
        if (root / "seed_model.json").is_file():
            return _load(root, data_yaml)

        from training import yolo

        golden: GoldenSet = ensure_golden_set(cache_dir, p.golden_seed, p.golden_n, p.imgsz)
        work = cache_dir / "seed-models" / f".{p.name}-{key}.run"
        shutil.rmtree(work, ignore_errors=True)
        result = yolo.train(
            data_yaml,
            work,
            model="yolov8n.yaml",
            epochs=p.epochs,
            imgsz=p.imgsz,
            batch=p.batch,
            seed=p.seed,
            on_epoch=on_epoch,
            config_dir=config_dir,
            **p.train_args,
        )
        metrics = yolo.evaluate(result.best_pt, golden.data_yaml, p.imgsz, config_dir=config_dir)
        tmp = cache_dir / "seed-models" / f".{p.name}-{key}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        shutil.copyfile(result.best_pt, tmp / "model.pt")
        yolo.export_onnx(tmp / "model.pt", p.imgsz, tmp / "model.onnx", config_dir=config_dir)
        info = {
            "profile": p.name,
            "key": key,
            "profile_params": asdict(p),
            "generator_version": synth.GENERATOR_VERSION,
            "metrics": metrics.to_dict(),
            "hyperparameters": result.hyperparameters,
            "golden_version": golden.version,
            "train_seconds": round(result.seconds, 1),
            "imgsz": p.imgsz,
        }
        (tmp / "seed_model.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        shutil.rmtree(root, ignore_errors=True)
        os.replace(tmp, root)
        shutil.rmtree(work, ignore_errors=True)
        return _load(root, data_yaml)
