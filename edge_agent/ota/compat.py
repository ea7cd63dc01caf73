"""Can this device run a bundle? Pure: the signed manifest against the device's hardware.

A TensorRT engine runs only on the GPU compute capability and TensorRT version it was built
for; an ONNX model runs wherever ONNX Runtime is installed. A bundle none of whose runtimes
fits, or that needs a newer agent, is refused at VERIFYING with a reason naming the mismatch.
"""

from __future__ import annotations

from firmware_bundles import BundleError, BundleManifest, RuntimeEntry, agent_version_tuple
from protocol.messages import Hardware


class IncompatibleBundle(BundleError):
    """The bundle is intact and trusted, but made for other hardware or a newer agent."""


def _version_matches(built_for: str, installed: str | None) -> bool:
    # An engine built for TensorRT "10.3" runs on 10.3.x; the device may report more components.
    if installed is None:
        return False
    want, have = built_for.split("."), installed.split(".")
    return have[: len(want)] == want


def _describe(hardware: Hardware) -> str:
    gpu = (f"GPU compute capability {hardware.gpu_compute_capability}, TensorRT {hardware.tensorrt_version or 'none'}"
           if hardware.gpu_compute_capability else "no GPU")
    ort = "ONNX Runtime" if hardware.onnxruntime_providers else "no ONNX Runtime"
    return f"{gpu}, {ort}"


def runnable_runtimes(manifest: BundleManifest, hardware: Hardware) -> list[RuntimeEntry]:
    """The bundle's runtimes this device can run, engines for its GPU first."""
    engines = [r for r in manifest.runtimes if r.kind == "tensorrt" and r.target is not None
               and r.target.gpu_compute_capability == hardware.gpu_compute_capability
               and _version_matches(r.target.tensorrt_version, hardware.tensorrt_version)]
    onnx = [r for r in manifest.runtimes if r.kind == "onnx" and hardware.onnxruntime_providers]
    return engines + onnx


def check_compatible(manifest: BundleManifest, hardware: Hardware, agent_version: str) -> RuntimeEntry:
    """The runtime the device will use; raises IncompatibleBundle saying why none fits."""
    if agent_version_tuple(agent_version) < agent_version_tuple(manifest.min_agent_version):
        raise IncompatibleBundle(f"wrong agent: bundle {manifest.version} needs agent "
                                 f"{manifest.min_agent_version} or newer, this agent is {agent_version}")
    runnable = runnable_runtimes(manifest, hardware)
    if runnable:
        return runnable[0]
    offered = ", ".join(
        f"TensorRT engine for compute capability {r.target.gpu_compute_capability} / TensorRT "
        f"{r.target.tensorrt_version}" if r.kind == "tensorrt" and r.target else f"{r.kind} model {r.file}"
        for r in manifest.runtimes)
    fallback = "" if any(r.kind == "onnx" for r in manifest.runtimes) else " and no ONNX fallback"
    raise IncompatibleBundle(f"wrong hardware: bundle {manifest.version} offers {offered}{fallback}; "
                             f"this device has {_describe(hardware)}")
