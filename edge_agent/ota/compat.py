"""Can this device run a bundle? Pure: the signed manifest against the device's hardware.

A TensorRT engine runs only on the GPU compute capability and TensorRT version it was built
for; an ONNX model runs wherever ONNX Runtime is installed (or a TensorRT engine can be built
from it on the device). With the agent's detector backend known, the decision is the one the
backend's model plan makes (``edge_agent.inference.engines.plan_model``), so a bundle is never
staged that the configured backend cannot load. A bundle that does not fit, or that needs a
newer agent, is refused at VERIFYING with a reason naming the mismatch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from edge_agent.inference.engines import DEFAULT_PRECISION, EngineError, plan_model, versions_match
from firmware_bundles import BundleError, BundleManifest, RuntimeEntry, agent_version_tuple
from protocol.messages import Hardware


class IncompatibleBundle(BundleError):
    """The bundle is intact and trusted, but made for other hardware or a newer agent."""


def _version_matches(built_for: str, installed: str | None) -> bool:
    return installed is not None and versions_match(built_for, installed)


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
    # ONNX runs on ONNX Runtime, or becomes an engine built on the device.
    onnx_ok = bool(hardware.onnxruntime_providers) or bool(hardware.gpu_compute_capability and
                                                           hardware.tensorrt_version)
    onnx = [r for r in manifest.runtimes if r.kind == "onnx" and onnx_ok]
    return engines + onnx


@dataclass(frozen=True)
class DeviceProfile:
    """What a bundle must fit: the hardware, this agent's version and, when known, the detector
    backend with its engine preferences (the agent's settings)."""

    hardware: Hardware
    agent_version: str
    detector_type: str | None = None
    engine_precision: Sequence[str] = DEFAULT_PRECISION
    engine_build: bool = True

    def check(self, manifest: BundleManifest) -> str:
        """How the bundle will run, in words; raises IncompatibleBundle saying why it cannot."""
        check_agent_version(manifest, self.agent_version)
        if self.detector_type is None:
            runtime = check_compatible(manifest, self.hardware, self.agent_version)
            return f"{runtime.kind} {runtime.file}"
        try:
            plan = plan_model(manifest, self.hardware, self.detector_type, tuple(self.engine_precision),
                              self.engine_build)
        except EngineError as exc:
            raise IncompatibleBundle(f"wrong hardware: {exc}; this device has {_describe(self.hardware)}") from None
        return f"{plan.action} {plan.kind} {plan.file} ({plan.precision})"


def check_agent_version(manifest: BundleManifest, agent_version: str) -> None:
    if agent_version_tuple(agent_version) < agent_version_tuple(manifest.min_agent_version):
        raise IncompatibleBundle(f"wrong agent: bundle {manifest.version} needs agent "
                                 f"{manifest.min_agent_version} or newer, this agent is {agent_version}")


def check_compatible(manifest: BundleManifest, hardware: Hardware, agent_version: str) -> RuntimeEntry:
    """The runtime the device will use, whatever backend runs it; raises IncompatibleBundle saying
    why none fits."""
    check_agent_version(manifest, agent_version)
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
