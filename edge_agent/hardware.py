"""What this device can run: CPU, NVIDIA GPU and its compute capability, TensorRT version, and the
ONNX Runtime execution providers. Reported in the retained status message and used to pick the
TensorRT engine in a bundle (engines only run on the GPU arch and TensorRT version they were
built for).

Every probe is optional and quiet: a device without a GPU, driver, cuda-python or TensorRT simply
reports ``None`` for what it lacks.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import re
import shutil
import subprocess

import structlog

from protocol.messages import Hardware

log = structlog.get_logger(__name__)

_CC_RE = re.compile(r"^\d+\.\d+$")


def _cudart():
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6
        except ImportError:
            return None
    return cudart


def gpu_from_cuda(device: int = 0) -> tuple[str, str] | None:
    """``(name, "major.minor")`` of CUDA device ``device`` through cuda-python, or None."""
    cudart = _cudart()
    if cudart is None:
        return None
    try:
        err, count = cudart.cudaGetDeviceCount()
        if int(err) != 0 or not count or device >= count:
            return None  # no driver, no device: not an error on a CPU-only device
        err, props = cudart.cudaGetDeviceProperties(device)
        if int(err) != 0:
            return None
        name = props.name.decode(errors="replace").rstrip("\x00") if isinstance(props.name, bytes) else str(props.name)
        return name.strip(), f"{props.major}.{props.minor}"
    except Exception as exc:  # a broken CUDA install must not stop the agent from starting on CPU
        log.warning("hardware.cuda_probe_failed", error=f"{type(exc).__name__}: {exc}")
        return None


def parse_nvidia_smi(output: str, device: int = 0) -> tuple[str, str] | None:
    """``(name, cc)`` from ``nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader`` output."""
    rows = [line.rsplit(",", 1) for line in output.strip().splitlines() if "," in line]
    if device >= len(rows):
        return None
    name, cc = (part.strip() for part in rows[device])
    return (name, cc) if _CC_RE.match(cc) else None


def gpu_from_nvidia_smi(device: int = 0) -> tuple[str, str] | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("hardware.nvidia_smi_failed", error=str(exc))
        return None
    return parse_nvidia_smi(out, device)


def gpu_info(device: int = 0) -> tuple[str, str] | None:
    """``(name, compute capability)`` of the GPU, trying cuda-python first, then nvidia-smi."""
    return gpu_from_cuda(device) or gpu_from_nvidia_smi(device)


def tensorrt_version() -> str | None:
    """``tensorrt.__version__`` when the TensorRT Python package imports, else None."""
    if importlib.util.find_spec("tensorrt") is None:
        return None
    try:
        import tensorrt
    except Exception as exc:  # installed but its libraries are missing or mismatched
        log.warning("hardware.tensorrt_import_failed", error=f"{type(exc).__name__}: {exc}")
        return None
    return str(tensorrt.__version__)


def onnxruntime_providers() -> list[str]:
    try:
        import onnxruntime
    except ImportError:
        return []
    return list(onnxruntime.get_available_providers())


def detect_hardware(device: int = 0) -> Hardware:
    gpu = gpu_info(device)
    return Hardware(
        cpu=platform.processor() or platform.machine(),
        cpu_count=os.cpu_count() or 0,
        gpu=gpu[0] if gpu else None,
        gpu_compute_capability=gpu[1] if gpu else None,
        tensorrt_version=tensorrt_version(),
        onnxruntime_providers=onnxruntime_providers(),
    )
