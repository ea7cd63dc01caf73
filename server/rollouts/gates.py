"""A wave's gates, as pure functions of its devices' evidence: pass, fail or wait, with each gate's
value against its threshold (what the dashboard draws and Prometheus exports).

Shadow phase (mode ``shadow_then_switch``, before any device of the wave switches):

- ``min_frames``: frames each device compared in shadow (summed over its reported windows);
  a device is *judged* once it has this many (or once it left shadow on its own: an agent that
  promotes itself reports no more windows).
- ``min_shadow_seconds``: time since each device entered SHADOWING.
- ``min_agreement``: agreement with the active model where it is confident: the share of the
  active model's confident boxes the candidate also found (IoU >= 0.5, same class; the agent's
  ``confident_agreement``), frames-weighted over a device's windows; the value is the worst judged
  device's. Boxes only the candidate finds are not disagreements here (a retrained model is meant
  to find what the old one missed): corrected frames judge those. The symmetric ``agreement`` the
  agent also reports is shown, never gated on; a window without any confident active box, or an
  agent that does not measure it, leaves the gate unmeasured (it does not block).
- ``max_accuracy_drop``: active minus candidate accuracy on frames with a corrected label,
  pooled over the judged devices (corrections are sparse; pooling is what makes them count).
- ``max_latency_p99_ms``: the candidate's p99 latency (frames-weighted mean of a device's window
  p99s), the worst judged device's; no threshold means it is only shown.
- ``max_errors``: candidate inference errors in the wave.
- ``max_install_failure_rate``: share of the wave's devices that could not install or run the
  candidate (refused, failed, rolled back by their own checks, or timed out).

A quality gate that a judged device fails fails the wave at once; the wave passes when every
device still in it is judged, has shadowed long enough and is holding in shadow, and nothing
failed. Failures only ever grow, so the install gate fails as soon as the rate is over.

Switch phase (after promotion, or mode ``direct``): the wave passes once every device has settled
(running the candidate, or failed) with the failure rate within its threshold and at least one
device running the candidate.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from server.rollouts.spec import GateConfig

Outcome = Literal["pass", "fail", "wait"]
_EPS = 1e-9


@dataclass(frozen=True)
class ShadowWindow:
    """One shadow report's figures."""

    frames: int
    agreement: float | None = None  # symmetric: both models' confident boxes (shown, not gated)
    confident_agreement: float | None = None  # where the active model is confident (gated)
    corrected_frames: int = 0
    active_accuracy: float | None = None
    candidate_accuracy: float | None = None
    candidate_latency_ms_p99: float | None = None
    errors: int = 0


@dataclass(frozen=True)
class ShadowTotals:
    """A device's windows summed up."""

    windows: int = 0
    frames: int = 0
    agreement: float | None = None
    confident_agreement: float | None = None
    corrected_frames: int = 0
    active_correct: float = 0.0
    candidate_correct: float = 0.0
    candidate_latency_ms_p99: float | None = None
    errors: int = 0

    @property
    def active_accuracy(self) -> float | None:
        return self.active_correct / self.corrected_frames if self.corrected_frames else None

    @property
    def candidate_accuracy(self) -> float | None:
        return self.candidate_correct / self.corrected_frames if self.corrected_frames else None

    def as_dict(self) -> dict:
        return {"windows": self.windows, "frames": self.frames, "agreement": self.agreement,
                "confident_agreement": self.confident_agreement, "corrected_frames": self.corrected_frames,
                "active_accuracy": self.active_accuracy, "candidate_accuracy": self.candidate_accuracy,
                "candidate_latency_ms_p99": self.candidate_latency_ms_p99, "errors": self.errors}


def totals(windows: Iterable[ShadowWindow]) -> ShadowTotals:
    count = frames = corrected = errors = 0
    agree_w = agree_sum = conf_w = conf_sum = lat_w = lat_sum = active_ok = candidate_ok = 0.0
    for w in windows:
        count += 1
        frames += w.frames
        errors += w.errors
        if w.agreement is not None and w.frames:
            agree_sum += w.agreement * w.frames
            agree_w += w.frames
        if w.confident_agreement is not None and w.frames:
            conf_sum += w.confident_agreement * w.frames
            conf_w += w.frames
        if w.candidate_latency_ms_p99 is not None and w.frames:
            lat_sum += w.candidate_latency_ms_p99 * w.frames
            lat_w += w.frames
        if w.corrected_frames and w.active_accuracy is not None and w.candidate_accuracy is not None:
            corrected += w.corrected_frames
            active_ok += w.active_accuracy * w.corrected_frames
            candidate_ok += w.candidate_accuracy * w.corrected_frames
    return ShadowTotals(windows=count, frames=frames, agreement=agree_sum / agree_w if agree_w else None,
                        confident_agreement=conf_sum / conf_w if conf_w else None,
                        corrected_frames=corrected, active_correct=active_ok, candidate_correct=candidate_ok,
                        candidate_latency_ms_p99=lat_sum / lat_w if lat_w else None, errors=errors)


@dataclass(frozen=True)
class DeviceEvidence:
    device_id: str
    failed: bool = False  # counts against max_install_failure_rate
    shadowing: bool = False  # holding in SHADOWING with the candidate loaded
    # Left shadow on its own (an agent that promotes itself): its windows so far are all there will be,
    # so it is judged on them whatever their frame count.
    final: bool = False
    running_candidate: bool = False  # switched and committed (ACTIVE on the rollout's version)
    settled: bool = False  # nothing more will happen to it in this phase
    shadow: ShadowTotals = field(default_factory=ShadowTotals)
    shadow_seconds: float = 0.0


@dataclass(frozen=True)
class GateResult:
    name: str
    value: float | None
    threshold: float | None
    # None: not measured yet (no device has enough frames to judge).
    passed: bool | None
    detail: str = ""

    def as_dict(self) -> dict:
        return {"name": self.name, "value": self.value, "threshold": self.threshold, "passed": self.passed,
                "detail": self.detail}


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    gates: tuple[GateResult, ...]
    reason: str = ""

    def failed_gates(self) -> list[GateResult]:
        return [g for g in self.gates if g.passed is False]


def _install_gate(devices: Sequence[DeviceEvidence], config: GateConfig) -> GateResult:
    failed = [d.device_id for d in devices if d.failed]
    rate = len(failed) / len(devices)
    detail = f"{len(failed)} of {len(devices)} failed" + (f": {', '.join(failed[:5])}" if failed else "")
    return GateResult("max_install_failure_rate", rate, config.max_install_failure_rate,
                      rate <= config.max_install_failure_rate + _EPS, detail)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def _describe(gate: GateResult) -> str:
    return f"{gate.name}: {_fmt(gate.value)} against {_fmt(gate.threshold)}" + (
        f" ({gate.detail})" if gate.detail else "")


def shadow_verdict(devices: Sequence[DeviceEvidence], config: GateConfig) -> Verdict:
    """The shadow phase's decision for one wave (see the module docstring)."""
    if not devices:
        return Verdict("pass", (), "no devices in this wave")
    install = _install_gate(devices, config)
    live = [d for d in devices if not d.failed]
    judged = [d for d in live if d.shadow.frames >= config.min_frames or d.final]
    errors = sum(d.shadow.errors for d in devices)

    frames_value = min((d.shadow.frames for d in live if not d.final), default=None)
    frames = GateResult("min_frames", frames_value, config.min_frames,
                        bool(live) and len(judged) == len(live),
                        f"{len(judged)} of {len(live)} devices have enough frames")
    seconds_value = min((d.shadow_seconds for d in live), default=None)
    seconds = GateResult("min_shadow_seconds", seconds_value, config.min_shadow_seconds,
                         seconds_value is not None and seconds_value + _EPS >= config.min_shadow_seconds)

    agreements = [(d.shadow.confident_agreement, d.device_id) for d in judged
                  if d.shadow.confident_agreement is not None]
    worst = min(agreements, default=None)
    agreement = GateResult("min_agreement", worst[0] if worst else None, config.min_agreement,
                           None if worst is None else worst[0] + _EPS >= config.min_agreement,
                           f"worst: {worst[1]}" if worst else "no confident box of the active model yet")

    corrected = sum(d.shadow.corrected_frames for d in judged)
    drop = ((sum(d.shadow.active_correct for d in judged) - sum(d.shadow.candidate_correct for d in judged))
            / corrected) if corrected else None
    accuracy = GateResult("max_accuracy_drop", drop, config.max_accuracy_drop,
                          None if drop is None else drop <= config.max_accuracy_drop + _EPS,
                          f"{corrected} corrected frames")

    latencies = [(d.shadow.candidate_latency_ms_p99, d.device_id) for d in judged
                 if d.shadow.candidate_latency_ms_p99 is not None]
    slowest = max(latencies, default=None)
    budget = config.max_latency_p99_ms
    latency = GateResult("max_latency_p99_ms", slowest[0] if slowest else None, budget,
                         None if slowest is None else (budget is None or slowest[0] <= budget + _EPS),
                         f"slowest: {slowest[1]}" if slowest else "")
    error_gate = GateResult("max_errors", float(errors), float(config.max_errors), errors <= config.max_errors)

    gates = (frames, seconds, agreement, accuracy, latency, error_gate, install)
    decisive = [g for g in (install, error_gate, agreement, accuracy, latency) if g.passed is False]
    if decisive:
        return Verdict("fail", gates, "; ".join(_describe(g) for g in decisive))
    if not live:
        return Verdict("fail", gates, "no device left in the wave to judge the candidate on")
    waiting = [g for g in (frames, seconds) if not g.passed]
    not_holding = [d.device_id for d in live if not d.shadowing]
    if waiting or not_holding:
        parts = [_describe(g) for g in waiting]
        if not_holding:
            parts.append(f"not shadowing yet: {', '.join(not_holding[:5])}")
        return Verdict("wait", gates, "; ".join(parts))
    return Verdict("pass", gates, f"{len(live)} devices passed in shadow")


def switch_verdict(devices: Sequence[DeviceEvidence], config: GateConfig) -> Verdict:
    """The switch phase's decision: installs settle, failures within the threshold."""
    if not devices:
        return Verdict("pass", (), "no devices in this wave")
    install = _install_gate(devices, config)
    if not install.passed:
        return Verdict("fail", (install,), _describe(install))
    unsettled = [d.device_id for d in devices if not d.settled]
    if unsettled:
        return Verdict("wait", (install,), f"switching: {', '.join(unsettled[:5])}"
                                           + (f" and {len(unsettled) - 5} more" if len(unsettled) > 5 else ""))
    running = sum(d.running_candidate for d in devices)
    if running == 0:
        return Verdict("fail", (install,), "no device of the wave runs the candidate")
    return Verdict("pass", (install,), f"{running} of {len(devices)} devices run the candidate")
