"""Thin, typed wrappers over Ultralytics: train, evaluate, export ONNX.

Everything runs offline (:mod:`training.ultralytics_env`) inside a network guard, on CPU unless
``device`` says otherwise, with plots off and a deterministic seed.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from training.ultralytics_env import cpu_count, ensure_offline, network_guard

#: ``on_epoch(epoch, epochs, losses, seconds)``: epoch is 1-based; ``losses`` holds the mean train
#: losses of the epoch (``box_loss``, ``cls_loss``, ``dfl_loss``) and, when the epoch was
#: validated, ``val_map50`` / ``val_map50_95``; ``seconds`` is the time since training started.
EpochCallback = Callable[[int, int, dict[str, float], float], None]

#: Arguments recorded as a run's hyperparameters (lineage in the registry).
_RECORDED = (
    "model",
    "epochs",
    "imgsz",
    "batch",
    "seed",
    "optimizer",
    "lr0",
    "lrf",
    "momentum",
    "weight_decay",
    "warmup_epochs",
    "warmup_bias_lr",
    "close_mosaic",
    "mosaic",
    "mixup",
    "hsv_h",
    "hsv_s",
    "hsv_v",
    "degrees",
    "translate",
    "scale",
    "fliplr",
    "freeze",
    "cos_lr",
    "deterministic",
    "workers",
    "device",
)


@dataclass(frozen=True)
class TrainResult:
    best_pt: Path
    last_pt: Path
    hyperparameters: dict[str, Any]
    seconds: float
    save_dir: Path


@dataclass(frozen=True)
class EvalMetrics:
    map50: float
    map50_95: float
    precision: float
    recall: float
    #: Per class present in the evaluation set: ``{name: {map50, map50_95, precision, recall}}``.
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)
    instances: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalMetrics:
        return cls(**d)


def _f(x: Any) -> float:
    v = float(x)
    return 0.0 if math.isnan(v) else v


def _workers_callback(workers: int) -> Callable[[Any], None]:
    def cb(trainer: Any) -> None:
        # Ultralytics forces workers=0 on CPU; two loader processes are faster on 2 cores.
        trainer.args.workers = workers

    return cb


def train(
    data_yaml: Path,
    out_dir: Path,
    *,
    model: str | Path = "yolov8n.yaml",
    epochs: int,
    imgsz: int,
    batch: int = 32,
    seed: int = 0,
    lr0: float | None = None,
    optimizer: str | None = None,
    freeze: int | None = None,
    on_epoch: EpochCallback | None = None,
    device: str = "cpu",
    workers: int | None = None,
    val: bool = True,
    config_dir: Path | None = None,
    **overrides: Any,
) -> TrainResult:
    """Train ``model`` (a ``*.yaml`` architecture, i.e. from scratch, or a local ``.pt``) on ``data_yaml``.

    Writes Ultralytics' run into ``out_dir`` (``weights/best.pt``, ``weights/last.pt``,
    ``args.yaml``, ``results.csv``). ``lr0`` without ``optimizer`` selects SGD (Ultralytics'
    ``optimizer=auto`` would ignore lr0). ``overrides`` go to Ultralytics as they are. For
    fine-tuning a trained model see :mod:`training.finetune` (SGD lr0 0.01, warmup_bias_lr 0).
    """
    model_ref = str(model)
    if not model_ref.endswith((".yaml", ".yml")) and not Path(model_ref).is_file():
        # A bare name such as "yolov8n.pt" would trigger a download (and 28 s of retries offline).
        raise FileNotFoundError(f"weights {model_ref} not found (offline: no downloads)")
    ensure_offline(config_dir)
    from ultralytics import YOLO

    out_dir = Path(out_dir).resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    n_workers = cpu_count() if workers is None else workers
    args: dict[str, Any] = {
        "data": str(Path(data_yaml).resolve()),
        "epochs": epochs,
        "imgsz": imgsz,
        "batch": batch,
        "seed": seed,
        "deterministic": True,
        "device": device,
        "workers": n_workers,
        "project": str(out_dir.parent),
        "name": out_dir.name,
        "exist_ok": True,
        "plots": False,
        "close_mosaic": 0,
        "val": val,
        "verbose": False,
        "amp": device != "cpu",
        "patience": max(100, epochs),
    }
    if lr0 is not None:
        args["lr0"] = lr0
        args["optimizer"] = optimizer or "SGD"
    elif optimizer is not None:
        args["optimizer"] = optimizer
    if freeze is not None:
        args["freeze"] = freeze
    args.update(overrides)

    yolo = YOLO(model_ref)
    yolo.add_callback("on_pretrain_routine_start", _workers_callback(n_workers))
    started = time.monotonic()
    if on_epoch is not None:
        reported = [0]

        def _epoch_end(trainer: Any) -> None:
            losses: dict[str, float] = {}
            with contextlib.suppress(Exception):
                items = trainer.label_loss_items(trainer.tloss, prefix="train")
                losses = {k.split("/", 1)[-1]: _f(v) for k, v in items.items()}
            metrics = getattr(trainer, "metrics", None) or {}
            if "metrics/mAP50(B)" in metrics:
                losses["val_map50"] = _f(metrics["metrics/mAP50(B)"])
                losses["val_map50_95"] = _f(metrics.get("metrics/mAP50-95(B)", 0.0))
            epoch = trainer.epoch + 1
            if epoch <= reported[0] or epoch > trainer.epochs:
                return  # the final validation of best.pt fires this event a second time
            reported[0] = epoch
            on_epoch(epoch, trainer.epochs, losses, time.monotonic() - started)

        yolo.add_callback("on_fit_epoch_end", _epoch_end)

    with network_guard():
        yolo.train(**args)
    seconds = time.monotonic() - started
    trainer = yolo.trainer
    save_dir = Path(trainer.save_dir)
    best, last = Path(trainer.best), Path(trainer.last)
    if not best.is_file():  # e.g. val=False with no fitness: the last epoch is the result
        best = last
    import ultralytics

    hp = {k: _jsonable(getattr(trainer.args, k, None)) for k in _RECORDED}
    hp["model"] = model_ref if model_ref.endswith((".yaml", ".yml")) else Path(model_ref).name
    hp["ultralytics"] = ultralytics.__version__
    hp["lr0_effective"] = _f(trainer.optimizer.param_groups[0].get("initial_lr", args.get("lr0", 0.0)))
    hp["optimizer_effective"] = type(trainer.optimizer).__name__
    return TrainResult(best_pt=best, last_pt=last, hyperparameters=hp, seconds=seconds, save_dir=save_dir)


def _jsonable(v: Any) -> Any:
    if v is None or isinstance(v, bool | int | float | str):
        return v
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    return str(v)


def evaluate(
    weights: Path,
    data_yaml: Path,
    imgsz: int,
    split: str = "val",
    *,
    batch: int = 32,
    device: str = "cpu",
    conf: float = 0.001,
    iou: float = 0.7,
    config_dir: Path | None = None,
) -> EvalMetrics:
    """mAP of ``weights`` on a split of ``data_yaml``, by Ultralytics' own validator (plots off)."""
    ensure_offline(config_dir)
    from ultralytics import YOLO

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="edgeloop-val-") as tmp, network_guard():
        model = YOLO(str(weights))
        m = model.val(
            data=str(Path(data_yaml).resolve()),
            imgsz=imgsz,
            split=split,
            batch=batch,
            device=device,
            conf=conf,
            iou=iou,
            plots=False,
            save_json=False,
            verbose=False,
            workers=0,
            project=tmp,
            name="val",
            exist_ok=True,
        )
    box = m.box
    names = m.names
    per_class: dict[str, dict[str, float]] = {}
    for i, c in enumerate(box.ap_class_index):
        p, r, ap50, ap = box.class_result(i)
        per_class[names[int(c)]] = {
            "map50": _f(ap50),
            "map50_95": _f(ap),
            "precision": _f(p),
            "recall": _f(r),
        }
    nt = getattr(m, "nt_per_class", None)
    instances = int(nt.sum()) if nt is not None else 0
    return EvalMetrics(
        map50=_f(box.map50),
        map50_95=_f(box.map),
        precision=_f(box.mp),
        recall=_f(box.mr),
        per_class=per_class,
        instances=instances,
        seconds=time.monotonic() - started,
    )


def export_onnx(weights: Path, imgsz: int, out_path: Path, *, config_dir: Path | None = None) -> Path:
    """Export to ONNX: opset 17, simplified, static ``[1, 3, imgsz, imgsz]`` input, no NMS.

    Output is ``[1, 4 + classes, anchors]``; Ultralytics embeds names, imgsz and stride as metadata.
    """
    ensure_offline(config_dir)
    from ultralytics import YOLO

    out_path = Path(out_path).resolve()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgeloop-export-") as tmp, network_guard():
        # Export writes beside the weights: work on a copy so the source folder stays untouched.
        src = Path(tmp) / "model.pt"
        shutil.copyfile(weights, src)
        produced = YOLO(str(src)).export(
            format="onnx",
            imgsz=imgsz,
            opset=17,
            simplify=True,
            dynamic=False,
            nms=False,
            batch=1,
            device="cpu",
            half=False,
        )
        tmp_out = out_path.with_name(f".{out_path.name}.tmp")
        shutil.move(str(produced), tmp_out)
        tmp_out.replace(out_path)
    return out_path
