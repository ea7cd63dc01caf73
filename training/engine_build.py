"""TensorRT engines for the fleet, built on a GPU builder from the model that ships.

An engine only runs on the GPU compute capability and TensorRT version it was built with,
so one engine is built per (compute capability, TensorRT version, precision) the fleet has.
This process can build only for its own GPU and TensorRT; every other target is recorded as
skipped with the reason, and devices build their own engine from the bundle's ONNX on load.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class EngineTarget:
    gpu_compute_capability: str
    tensorrt_version: str
    precision: str = "fp16"  # fp16 | fp32 | int8


@dataclass
class EngineBuild:
    target: EngineTarget
    status: str  # built | skipped | failed
    reason: str = ""
    path: str | None = None
    seconds: float = 0.0
    metrics: dict | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def local_builder() -> tuple[EngineTarget | None, str]:
    """This machine's (compute capability, TensorRT version), or None and why there is no builder."""
    try:
        import tensorrt
    except ImportError:
        return None, "no builder available: the tensorrt package is not installed"
    try:
        import torch

        if not torch.cuda.is_available():
            return None, "no builder available: no CUDA GPU on this machine"
        major, minor = torch.cuda.get_device_capability(0)
    except Exception as exc:  # a broken driver is also "no builder"
        return None, f"no builder available: {exc}"
    return EngineTarget(f"{major}.{minor}", tensorrt.__version__), ""


def build_engines(pt_path: Path, imgsz: int, targets: list[EngineTarget], out_dir: Path,
                  evaluate=None) -> list[EngineBuild]:
    """Build each target this machine can build; ``evaluate(engine_path) -> metrics`` runs on each.

    Precision matters for accuracy (INT8/FP16 can lose mAP), hence the evaluation per engine.
    """
    builder, why_not = local_builder()
    results: list[EngineBuild] = []
    for target in targets:
        if builder is None:
            results.append(EngineBuild(target, "skipped", why_not))
            continue
        if (target.gpu_compute_capability, target.tensorrt_version) != (
                builder.gpu_compute_capability, builder.tensorrt_version):
            results.append(EngineBuild(target, "skipped",
                                       f"builder is sm {builder.gpu_compute_capability} / TensorRT "
                                       f"{builder.tensorrt_version}; this target needs its own builder"))
            continue
        results.append(_build_one(pt_path, imgsz, target, out_dir, evaluate))
    return results


def _build_one(pt_path: Path, imgsz: int, target: EngineTarget, out_dir: Path, evaluate) -> EngineBuild:
    from ultralytics import YOLO

    t0 = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"model-sm{target.gpu_compute_capability.replace('.', '')}-trt{target.tensorrt_version}-" \
           f"{target.precision}.engine"
    work = out_dir / f".work-{name}"
    work.mkdir(exist_ok=True)
    src = work / "model.pt"
    shutil.copyfile(pt_path, src)
    try:
        produced = YOLO(str(src)).export(format="engine", imgsz=imgsz, device=0, dynamic=False, batch=1,
                                         half=target.precision == "fp16", int8=target.precision == "int8")
        final = out_dir / name
        shutil.move(str(produced), final)
    except Exception as exc:
        return EngineBuild(target, "failed", f"{type(exc).__name__}: {exc}", seconds=time.monotonic() - t0)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    build = EngineBuild(target, "built", "", str(final), time.monotonic() - t0)
    if evaluate is not None:
        build.metrics = evaluate(final)
    return build
