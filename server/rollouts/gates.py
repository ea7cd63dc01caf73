"""A wave's gates, as pure functions of its devices' evidence: pass, fail or wait, with each gate's
value against its threshold (what the dashboard draws and Prometheus exports).

Shadow phase (mode ``shadow_then_switch``, before any device of the wave switches):

- ``min_frames``: frames each device compared in shadow (summed over its reported windows);
  a device is *judged* once it has this many (or once it left shadow on its own: an agent that
  promotes itself reports no more windows).
- ``min_shadow_seconds``: time since each device entered SHADOWING.
- ``paired_accuracy``: the decision itself (server/rollouts/sequential.py): paired outcomes on
  known-truth frames, pooled over the wave's devices in the order they were reported, decide pass
  (superiority or non-inferiority) or fail (significantly worse) with stated error rates, or ask
  for more frames. Nothing passes a wave without it, unless ``max_shadow_seconds`` runs out with
  ``on_no_evidence='pass'`` (the offline gate's evidence then carries the wave); with the default
  ``'pause'`` the wave pauses with "not enough evidence".
- ``min_agreement``: a guard, applied on a device only where the active model is shown right there
  (the exact lower bound of its accuracy on that device's known-truth frames reaches
  ``trusted_active_accuracy``): the share of the active model's confident boxes the candidate also
  found. Where labels show the active model wrong, or there are none, disagreeing with it is no
  evidence against the candidate, so the guard is not applied (the detail says where and why).
- ``max_latency_p99_ms``: each judged device's candidate p99 against a budget from the active
  model's own p99 on that device (``max_latency_ratio`` times it, at least ``latency_headroom_ms``
  above it) and the absolute ``max_latency_p99_ms`` if set; the value is the worst device's
  candidate p99 over its budget (<= 1 passes).
- ``max_errors``: candidate inference errors in the wave.
- ``max_install_failure_rate``: share of the wave's devices that could not install or run the
  candidate (refused, failed, rolled back by their own checks, or timed out).

Any gate that fails fails the wave; the wave passes when every device still in it is judged, has
shadowed long enough and is holding in shadow, and the accuracy decision passed.

Switch phase (after promotion, or mode ``direct``): the wave passes once every device has settled
(running the candidate, or failed) with the failure rate within its threshold and at least one
device running the candidate.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

from server.rollouts.sequential import Evidence, PairedCounts, decide, lower_accuracy_bound
from server.rollouts.spec import GateConfig

# "undecided": the wave ran out of shadow time without the evidence deciding (it pauses).
Outcome = Literal["pass", "fail", "wait", "undecided"]
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
    candidate_only_correct: int | None = None  # None: an older agent (no paired outcomes)
    active_only_correct: int | None = None
    active_latency_ms_p99: float | None = None
    candidate_latency_ms_p99: float | None = None
    errors: int = 0
    at: float = 0.0  # when it was received (orders the wave's windows for the sequential decision)

    def paired(self) -> PairedCounts | None:
        if self.candidate_only_correct is None or self.active_only_correct is None:
            return None
        return PairedCounts(self.corrected_frames, self.candidate_only_correct, self.active_only_correct)


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
    active_latency_ms_p99: float | None = None
    candidate_latency_ms_p99: float | None = None
    errors: int = 0
    # Paired outcomes per window, with when it arrived (older agents' windows have none).
    paired: tuple[tuple[float, PairedCounts], ...] = ()

    @cached_property
    def paired_total(self) -> PairedCounts:
        total = PairedCounts()
        for _, counts in self.paired:
            total = total + counts
        return total

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
                "candidate_only_correct": self.paired_total.candidate_only,
                "active_only_correct": self.paired_total.active_only,
                "active_latency_ms_p99": self.active_latency_ms_p99,
                "candidate_latency_ms_p99": self.candidate_latency_ms_p99, "errors": self.errors}


_MEANS = ("agreement", "confident_agreement", "active_latency_ms_p99", "candidate_latency_ms_p99")


class TotalsBuilder:
    """A device's windows summed up one at a time, in arrival order (``at``): adding a window costs
    the same whatever came before, so a cache can extend a device's totals with its new reports
    instead of summing all of them again. The sums run in the same order as :func:`totals`, so the
    two give the same floats."""

    __slots__ = ("count", "frames", "corrected", "active_ok", "candidate_ok", "errors", "paired", "last_at",
                 "_sums")

    def __init__(self) -> None:
        self.count = self.frames = self.corrected = self.errors = 0
        self.active_ok = self.candidate_ok = 0.0
        self.paired: list[tuple[float, PairedCounts]] = []
        self.last_at = float("-inf")
        self._sums = {name: [0, 0] for name in _MEANS}  # value x frames, frames (windows that have it)

    def add(self, w: ShadowWindow) -> None:
        if w.at < self.last_at:
            raise ValueError("windows must be added in arrival order")
        self.last_at = w.at
        self.count += 1
        self.frames += w.frames
        self.errors += w.errors
        if w.corrected_frames and w.active_accuracy is not None and w.candidate_accuracy is not None:
            self.corrected += w.corrected_frames
            self.active_ok += w.active_accuracy * w.corrected_frames
            self.candidate_ok += w.candidate_accuracy * w.corrected_frames
        if (p := w.paired()) is not None:
            self.paired.append((w.at, p))
        for name, acc in self._sums.items():
            value = getattr(w, name)
            if value is not None:
                acc[0] += value * w.frames
                acc[1] += w.frames

    def result(self) -> ShadowTotals:
        means = {name: (total / weight if weight else None) for name, (total, weight) in self._sums.items()}
        return ShadowTotals(windows=self.count, frames=self.frames, corrected_frames=self.corrected,
                            active_correct=self.active_ok, candidate_correct=self.candidate_ok,
                            errors=self.errors, paired=tuple(self.paired), **means)


def totals(windows: Iterable[ShadowWindow]) -> ShadowTotals:
    builder = TotalsBuilder()
    for w in sorted(windows, key=lambda w: w.at):
        builder.add(w)
    return builder.result()


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
    evidence: dict | None = None  # the accuracy decision's figures (n, discordant pairs, p, look)

    def as_dict(self) -> dict:
        out = {"name": self.name, "value": self.value, "threshold": self.threshold, "passed": self.passed,
               "detail": self.detail}
        if self.evidence is not None:
            out["evidence"] = self.evidence
        return out


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


def pooled_evidence(devices: Sequence[DeviceEvidence], config: GateConfig) -> Evidence:
    """The sequential decision over the wave's paired outcomes, in the order they were reported."""
    windows = sorted((item for d in devices for item in d.shadow.paired), key=lambda item: item[0])
    return decide((counts for _, counts in windows), config.evidence_rule())


def _accuracy_gate(evidence: Evidence) -> GateResult:
    passed = {"pass": True, "fail": False}.get(evidence.decision)
    value = evidence.upper_bound if evidence.test == "non-inferiority" else evidence.p_value
    return GateResult("paired_accuracy", None if value is None else float(value), evidence.level, passed,
                      f"{evidence.test or 'undecided'}: {evidence.describe()}", evidence.as_dict())


def active_is_trusted(shadow: ShadowTotals, config: GateConfig) -> tuple[bool, str]:
    known = shadow.corrected_frames
    correct = round(shadow.active_correct)
    if not known:
        return False, "no known-truth frames"
    bound = lower_accuracy_bound(correct, known)
    shown = f"active model right on {correct}/{known} known frames (95% lower bound {bound:.2f})"
    return bound >= config.trusted_active_accuracy, shown


def _agreement_gate(judged: Sequence[DeviceEvidence], config: GateConfig) -> GateResult:
    guarded, skipped = [], []
    for d in judged:
        trusted, shown = active_is_trusted(d.shadow, config)
        if trusted and d.shadow.confident_agreement is not None:
            guarded.append((d.shadow.confident_agreement, d.device_id))
        else:
            skipped.append(f"{d.device_id}: {shown}" if not trusted else f"{d.device_id}: no confident active box")
    worst = min(guarded, default=None)
    parts = [f"worst: {worst[1]}"] if worst else []
    if skipped:
        parts.append("not applied on " + "; ".join(skipped[:3]) + (f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""))
    return GateResult("min_agreement", worst[0] if worst else None, config.min_agreement,
                      None if worst is None else worst[0] + _EPS >= config.min_agreement, "; ".join(parts))


def latency_budget(active_p99: float | None, config: GateConfig) -> float | None:
    """The candidate's p99 budget on one device (None: no budget applies)."""
    budgets = [config.max_latency_p99_ms] if config.max_latency_p99_ms is not None else []
    if config.max_latency_ratio is not None and active_p99 is not None:
        budgets.append(max(active_p99 * config.max_latency_ratio, active_p99 + config.latency_headroom_ms))
    return min(budgets, default=None)


def _latency_gate(judged: Sequence[DeviceEvidence], config: GateConfig) -> GateResult:
    worst: tuple[float, str, float, float] | None = None
    for d in judged:
        p99 = d.shadow.candidate_latency_ms_p99
        budget = latency_budget(d.shadow.active_latency_ms_p99, config)
        if p99 is None or budget is None:
            continue
        if worst is None or p99 / budget > worst[0]:
            worst = (p99 / budget, d.device_id, p99, budget)
    if worst is None:
        return GateResult("max_latency_p99_ms", None, None, None, "no latency measured against a budget yet")
    ratio, device, p99, budget = worst
    return GateResult("max_latency_p99_ms", p99, budget, ratio <= 1 + _EPS,
                      f"worst: {device}, candidate p99 {p99:.1f} ms against {budget:.1f} ms")


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
    accuracy = _accuracy_gate(pooled_evidence(live, config))
    agreement = _agreement_gate(judged, config)
    latency = _latency_gate(judged, config)
    error_gate = GateResult("max_errors", float(errors), float(config.max_errors), errors <= config.max_errors)

    gates = (frames, seconds, accuracy, agreement, latency, error_gate, install)
    decisive = [g for g in (install, error_gate, accuracy, agreement, latency) if g.passed is False]
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
    if accuracy.passed:
        return Verdict("pass", gates, f"{len(live)} devices passed in shadow; {accuracy.detail}")
    longest = max(d.shadow_seconds for d in live)
    if longest + _EPS < config.max_shadow_seconds:
        return Verdict("wait", gates, f"collecting evidence: {accuracy.detail}")
    if config.on_no_evidence == "pass":
        return Verdict("pass", gates, f"not enough online evidence after {longest:.0f} s, no gate failed: "
                                      f"the offline gate's evidence carries the wave ({accuracy.detail})")
    return Verdict("undecided", gates, f"not enough evidence after {longest:.0f} s in shadow: {accuracy.detail}")


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
