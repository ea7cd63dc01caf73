"""One retrain job's compute, run as a subprocess by the server's local executor:

    python -m training.job_runner SPEC.json

fine-tune → evaluate candidate and production on every eval set → export ONNX → check the
export against PyTorch and evaluate the exported artifact itself → TensorRT engines where a
builder exists.
Progress goes to stdout as JSON lines ({"event": ...}) so any executor can stream it;
the final result is also written to ``<out_dir>/result.json``.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path


def emit(event: str, **fields) -> None:
    print(json.dumps({"event": event, **fields}, default=str), flush=True)


def _metrics_dict(m) -> dict:
    return {
        "map50": float(m.map50),
        "map50_95": float(m.map50_95),
        "precision": float(m.precision),
        "recall": float(m.recall),
        "per_class": m.per_class,
        "instances": int(getattr(m, "instances", 0)),
    }


def environment(ultralytics_version: str) -> dict:
    """Library versions and the hardware the job ran on, recorded with the model."""
    import os

    import onnx
    import onnxruntime
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "python": platform.python_version(), "ultralytics": ultralytics_version, "torch": torch.__version__,
        "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "opset": 17,
        "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "gpu": gpu, "cuda": torch.version.cuda if gpu else None,
        "platform": platform.platform(),
    }


def _evaluation_key(weights: str, data_yaml: str, imgsz: int) -> str:
    """Weights bytes + the data yaml + every file it points at (names, sizes): same key, same metrics."""
    import hashlib

    import yaml

    from training.data_contract import IMAGE_SUFFIXES

    h = hashlib.sha256()
    with open(weights, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    text = Path(data_yaml).read_text()
    h.update(text.encode())
    h.update(str(imgsz).encode())
    spec = yaml.safe_load(text)
    root = Path(spec.get("path", Path(data_yaml).parent))
    entries = spec.get("val") or []
    for entry in entries if isinstance(entries, list) else [entries]:
        folder = Path(entry) if Path(entry).is_absolute() else root / entry
        paths = ([Path(x) for x in folder.read_text().split()] if folder.is_file()
                 else sorted(folder.rglob("*")) if folder.is_dir() else [])
        for path in paths:
            if path.suffix.lower() in IMAGE_SUFFIXES | {".txt"} and path.is_file():
                h.update(f"{path}:{path.stat().st_size}:{path.stat().st_mtime_ns}".encode())
            label = Path(str(path.with_suffix(".txt")).replace("/images/", "/labels/"))
            if path.suffix.lower() in IMAGE_SUFFIXES and label.is_file():
                h.update(f"{label}:{label.stat().st_size}:{label.stat().st_mtime_ns}".encode())
    return h.hexdigest()


def cached_evaluation(cache_dir: str | None, weights: str, data_yaml: str, imgsz: int, compute) -> dict:
    """Production's metrics on an unchanged set are the same every job (the golden set is fixed):
    evaluate once per (weights, set) and reuse."""
    if not cache_dir:
        return compute()
    path = Path(cache_dir) / f"{_evaluation_key(weights, data_yaml, imgsz)}.json"
    if path.exists():
        return json.loads(path.read_text())
    metrics = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(metrics))
    tmp.replace(path)
    return metrics


def _train_images(data_yaml: str) -> list[Path]:
    """The images a data.yaml's train split lists (folders or list files), for INT8 calibration."""
    import yaml

    from training.data_contract import IMAGE_SUFFIXES

    spec = yaml.safe_load(Path(data_yaml).read_text())
    root = Path(spec.get("path", Path(data_yaml).parent))
    images: list[Path] = []
    for entry in spec["train"] if isinstance(spec["train"], list) else [spec["train"]]:
        source = Path(entry) if Path(entry).is_absolute() else root / entry
        if source.is_file():
            images += [Path(line) for line in source.read_text().split()]
        elif source.is_dir():
            images += sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    return images


def _quantize(spec: dict, onnx_path: Path, out_dir: Path, fp32_golden, config_dir: Path,
              stages: dict[str, float]) -> dict:
    """INT8 model for CPU devices, shipped only if the golden-set gate on the INT8 artifact passes."""
    if spec.get("quantize") is False or "golden" not in spec["eval_sets"]:
        return {"skipped": "quantization off or no golden set"}
    from training.quantize import QuantizationRejected, QuantizeConfig, quantize_and_gate

    emit("stage", stage="quantize", status="started")
    t0 = time.monotonic()
    try:
        qm, gate = quantize_and_gate(onnx_path, out_dir / "model.int8.onnx", _train_images(spec["data_yaml"]),
                                     Path(spec["eval_sets"]["golden"]), QuantizeConfig(**spec.get("quantize") or {}),
                                     config_dir=config_dir, fp32_metrics=fp32_golden)
        out = {"path": str(qm.path), "gate": _gate_dict(gate), "calibration_images": qm.calibration_images}
    except QuantizationRejected as exc:
        out = {"path": None, "rejected": str(exc), "gate": _gate_dict(exc.gate)}
    stages["quantize"] = time.monotonic() - t0
    emit("quantized", **{k: v for k, v in out.items() if k != "gate"})
    return out


def _gate_dict(gate) -> dict:
    return {"fp32": _metrics_dict(gate.fp32), "int8": _metrics_dict(gate.int8),
            "map50_95_loss": gate.map50_95_loss, "tolerance": gate.tolerance, "passed": gate.passed}


def _sample_images(eval_sets: dict[str, str], count: int) -> list[Path]:
    """A few validation images for the export parity check (new data first, then golden)."""
    import yaml

    for name in ("new_data", "golden"):
        if name not in eval_sets:
            continue
        data = yaml.safe_load(Path(eval_sets[name]).read_text())
        root = Path(data.get("path", Path(eval_sets[name]).parent))
        for entry in data["val"] if isinstance(data["val"], list) else [data["val"]]:
            folder = Path(entry) if Path(entry).is_absolute() else root / entry
            if folder.is_file():  # a list file of image paths
                paths = [Path(line) for line in folder.read_text().split()]
            else:
                paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
            if paths:
                return paths[:count]
    return []


def run(spec: dict) -> dict:
    from training.job_io import fetch_inputs, upload_outputs
    from training.ultralytics_env import offline_ultralytics

    fetch_inputs(spec)  # a Kubernetes pod: the staged inputs come from the object store first

    out_dir = Path(spec["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    config_dir = Path(spec["config_dir"])
    ultralytics = offline_ultralytics(config_dir)
    from training import yolo

    stages: dict[str, float] = {}
    imgsz = int(spec["imgsz"])

    emit("stage", stage="train", status="started")
    t0 = time.monotonic()

    def on_epoch(epoch: int, epochs: int, losses: dict, seconds: float) -> None:
        emit("epoch", epoch=epoch, epochs=epochs, losses=losses, seconds=seconds)

    from training.finetune import FineTuneParams, finetune

    trained = finetune(
        spec["base_weights"],
        spec["data_yaml"],
        out_dir / "train",
        imgsz=imgsz,
        params=FineTuneParams(**spec["finetune"]),
        on_epoch=on_epoch,
        config_dir=config_dir,
    )
    stages["train"] = time.monotonic() - t0

    emit("stage", stage="evaluate", status="started")
    t0 = time.monotonic()
    metrics: dict[str, dict] = {"candidate": {}, "production": {}}
    for name, data_yaml in spec["eval_sets"].items():
        metrics["candidate"][name] = _metrics_dict(
            yolo.evaluate(trained.best_pt, data_yaml, imgsz, config_dir=config_dir)
        )
        if spec.get("production_weights"):
            metrics["production"][name] = cached_evaluation(
                spec.get("eval_cache_dir"), spec["production_weights"], data_yaml, imgsz,
                lambda data_yaml=data_yaml: _metrics_dict(
                    yolo.evaluate(spec["production_weights"], data_yaml, imgsz, config_dir=config_dir)))
        emit(
            "evaluated",
            eval_set=name,
            candidate=metrics["candidate"][name]["map50"],
            production=metrics["production"].get(name, {}).get("map50"),
        )
    stages["evaluate"] = time.monotonic() - t0

    emit("stage", stage="export", status="started")
    t0 = time.monotonic()
    onnx_path = yolo.export_onnx(trained.best_pt, imgsz, out_dir / "model.onnx", config_dir=config_dir)
    stages["export"] = time.monotonic() - t0

    # What ships is the ONNX file, so it is evaluated too; the gate compares it with the .pt.
    emit("stage", stage="artifact_check", status="started")
    t0 = time.monotonic()
    from training.export_checks import check_export_parity

    parity = check_export_parity(trained.best_pt, onnx_path, _sample_images(spec["eval_sets"], 8), imgsz)
    emit("export_parity", **parity.as_dict())
    onnx_golden = None
    for name in spec.get("onnx_eval_sets", ["golden", "new_data"]):
        if name in spec["eval_sets"]:
            evaluated = yolo.evaluate(onnx_path, spec["eval_sets"][name], imgsz, config_dir=config_dir)
            onnx_golden = evaluated if name == "golden" else onnx_golden
            metrics["candidate"][f"{name}@onnx"] = _metrics_dict(evaluated)
            emit("evaluated", eval_set=f"{name}@onnx", candidate=metrics["candidate"][f"{name}@onnx"]["map50"])
    stages["artifact_check"] = time.monotonic() - t0

    int8 = _quantize(spec, onnx_path, out_dir, onnx_golden, config_dir, stages)
    if int8.get("gate"):
        metrics["candidate"]["golden@int8"] = int8["gate"]["int8"]

    emit("stage", stage="engines", status="started")
    t0 = time.monotonic()
    from training.engine_build import EngineTarget, build_engines

    golden = spec["eval_sets"].get("golden")
    engines = build_engines(
        trained.best_pt, imgsz, [EngineTarget(**t) for t in spec.get("engine_targets", [])], out_dir / "engines",
        evaluate=(lambda path: _metrics_dict(yolo.evaluate(path, golden, imgsz, config_dir=config_dir)))
        if golden else None)
    for build in engines:
        emit("engine", **build.as_dict())
    stages["engines"] = time.monotonic() - t0

    result = {
        "best_pt": str(trained.best_pt),
        "onnx": str(onnx_path),
        "metrics": metrics,
        "stages": stages,
        "export": {"format": "onnx", "imgsz": imgsz, "parity": parity.as_dict()},
        "int8_onnx": int8.get("path"),
        "int8": {k: v for k, v in int8.items() if k != "path"},
        "engines": [b.as_dict() for b in engines],
        "hyperparameters": trained.hyperparameters,
        "environment": environment(ultralytics.__version__),
    }
    (out_dir / "result.json").write_text(json.dumps(result, indent=2, default=str))
    upload_outputs(spec, result)  # before the result event: the executor fetches what it names
    emit("result", result=result)
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m training.job_runner SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    try:
        run(spec)
    except Exception as exc:  # the executor reads this line as the failure reason
        emit("error", error=f"{type(exc).__name__}: {exc}")
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
