"""Drift and performance-decay decisions for one subject (a device, or a group): pure, no I/O.

A window's histograms are scored against the model version's reference per metric
(``server.drift.scoring``); each metric has a threshold (``DriftPolicy.threshold_for``) and its own
hysteresis, so one noisy window never raises anything and a raised metric needs several quiet
windows to clear. The subject drifts while any metric is raised.

Performance decay is a second signal with its own hysteresis: the line's QA corrects too many
frames (over an absolute ceiling, or well over the model's own rate in its first quiet windows on
that subject), or the model's mean confidence or detection rate collapses against what it did on
its own training data.

``SubjectState`` is plain data (``to_dict``/``from_dict``) so the monitor can persist it with
every window and a restarted server resumes mid-episode instead of re-raising.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

from edge_agent.drift_stats import CLASS_FREQUENCY, CONFIDENCE, merge_histograms
from server.drift.scoring import MetricScore, mean_of, score
from server.settings import DriftPolicy

Event = Literal["raised", "cleared"]
#: ``{metric: (edges, counts)}``
Histograms = Mapping[str, tuple[Sequence[float], Sequence[int]]]
#: A reference's mean confidence or detection rate below this says too little to compare against.
MIN_REFERENCE_DETECTION_RATE = 0.05


@dataclass
class Hysteresis:
    """Raised after ``raise_after`` consecutive windows over, cleared after ``clear_after`` under;
    a window in between (neither over nor under) breaks both runs."""

    active: bool = False
    over_run: int = 0
    under_run: int = 0

    def update(self, over: bool, under: bool, raise_after: int, clear_after: int) -> Event | None:
        self.over_run = self.over_run + 1 if over else 0
        self.under_run = self.under_run + 1 if under else 0
        if not self.active and self.over_run >= raise_after:
            self.active, self.under_run = True, 0
            return "raised"
        if self.active and self.under_run >= clear_after:
            self.active, self.over_run = False, 0
            return "cleared"
        return None


@dataclass
class SubjectState:
    model_version: int | None = None
    windows: int = 0  # windows seen on this model version
    metrics: dict[str, Hysteresis] = field(default_factory=dict)
    decay: Hysteresis = field(default_factory=Hysteresis)
    # The model's own QA correction rate on this subject over its first quiet windows.
    baseline_windows: int = 0
    baseline_qa: int = 0
    baseline_corrected: float = 0.0

    def baseline_rate(self, policy: DriftPolicy) -> float | None:
        if self.baseline_windows < policy.baseline_windows or self.baseline_qa < policy.min_qa_frames:
            return None
        return self.baseline_corrected / self.baseline_qa

    @property
    def drifting(self) -> bool:
        return any(h.active for h in self.metrics.values())

    def to_dict(self) -> dict:
        return {"model_version": self.model_version, "windows": self.windows,
                "metrics": {k: asdict(v) for k, v in self.metrics.items()}, "decay": asdict(self.decay),
                "baseline": [self.baseline_windows, self.baseline_qa, self.baseline_corrected]}

    @classmethod
    def from_dict(cls, data: Mapping) -> SubjectState:
        windows, qa, corrected = data.get("baseline") or (0, 0, 0.0)
        return cls(model_version=data.get("model_version"), windows=int(data.get("windows", 0)),
                   metrics={k: Hysteresis(**v) for k, v in (data.get("metrics") or {}).items()},
                   decay=Hysteresis(**(data.get("decay") or {})), baseline_windows=int(windows),
                   baseline_qa=int(qa), baseline_corrected=float(corrected))


@dataclass(frozen=True)
class Window:
    """What is judged: one device report, or a group's summed reports."""

    frames: int
    histograms: Histograms
    correction_rate: float | None = None
    qa_frames: int = 0


@dataclass(frozen=True)
class Verdict:
    component: str  # the reference component the window was judged against
    scores: dict[str, MetricScore]
    # Per scored metric: the statistic's value and whether it was over the raise threshold.
    values: dict[str, float]
    over: list[str]
    drifting_metrics: list[str]
    drift_event: Event | None
    decay: dict[str, float | None]
    decay_reasons: list[str]
    decayed: bool
    decay_event: Event | None
    model_changed: bool

    @property
    def drifting(self) -> bool:
        return bool(self.drifting_metrics)


def detection_rate(histograms: Histograms, frames: int) -> float | None:
    """Detections per frame (exact: the class-frequency histogram counts every detection)."""
    if frames <= 0 or CLASS_FREQUENCY not in histograms:
        return None
    return float(sum(histograms[CLASS_FREQUENCY][1])) / frames


def mean_confidence(histograms: Histograms) -> float | None:
    if CONFIDENCE not in histograms:
        return None
    edges, counts = histograms[CONFIDENCE]
    return mean_of(edges, counts)


def score_window(window: Window, reference: Histograms, policy: DriftPolicy) -> dict[str, MetricScore]:
    """Scores of every metric both sides have enough values of (and identical edges)."""
    out = {}
    for name, (edges, counts) in window.histograms.items():
        ref = reference.get(name)
        if ref is None or [float(e) for e in ref[0]] != [float(e) for e in edges]:
            continue
        if sum(counts) < policy.min_count or sum(ref[1]) < policy.min_count:
            continue
        out[name] = score(edges, counts, ref[1])
    return out


def _decay_figures(window: Window, reference: Histograms, reference_frames: int, baseline: float | None,
                   policy: DriftPolicy) -> tuple[dict[str, float | None], list[bool], list[bool], list[str]]:
    figures: dict[str, float | None] = {"correction_rate": None, "baseline_correction_rate": baseline,
                                        "confidence_ratio": None, "detection_rate_ratio": None}
    over, under, reasons = [], [], []
    if window.correction_rate is not None and window.qa_frames >= policy.min_qa_frames:
        rate = window.correction_rate
        figures["correction_rate"] = rate
        rise = rate - baseline if baseline is not None else None
        over.append(rate >= policy.max_correction_rate or (rise is not None and rise >= policy.correction_increase))
        under.append(rate < policy.clear_correction_rate and (rise is None or rise < policy.clear_correction_increase))
        if over[-1]:
            since = f", {baseline:.0%} at first" if baseline is not None else ""
            reasons.append(f"QA corrected {rate:.0%} of {window.qa_frames} judged frames{since} "
                           f"(limits {policy.max_correction_rate:.0%}, +{policy.correction_increase:.0%})")
    ref_conf = mean_confidence(reference)
    conf = mean_confidence(window.histograms)
    if ref_conf and conf is not None and sum(window.histograms[CONFIDENCE][1]) >= policy.min_count:
        ratio = conf / ref_conf
        figures["confidence_ratio"] = ratio
        over.append(ratio < policy.min_confidence_ratio)
        under.append(ratio >= policy.clear_confidence_ratio)
        if over[-1]:
            reasons.append(f"mean confidence {conf:.2f} is {ratio:.0%} of the reference's {ref_conf:.2f}")
    ref_rate = detection_rate(reference, reference_frames)
    rate = detection_rate(window.histograms, window.frames)
    if (ref_rate is not None and ref_rate >= MIN_REFERENCE_DETECTION_RATE and rate is not None
            and window.frames >= policy.min_frames):
        ratio = rate / ref_rate
        figures["detection_rate_ratio"] = ratio
        over.append(ratio < policy.min_detection_rate_ratio)
        under.append(ratio >= policy.clear_detection_rate_ratio)
        if over[-1]:
            reasons.append(f"{rate:.2f} detections per frame, {ratio:.0%} of the reference's {ref_rate:.2f}")
    return figures, over, under, reasons


@dataclass(frozen=True)
class Component:
    """One population of the reference: its frame count and histograms."""

    frames: int
    histograms: Histograms


def closest_component(window: Window, components: Mapping[str, Component],
                      policy: DriftPolicy) -> tuple[str, dict[str, MetricScore]]:
    """The component the window resembles most (lowest mean PSI over the metrics both can score)."""
    best: tuple[float, str, dict[str, MetricScore]] | None = None
    for name, component in components.items():
        scores = score_window(window, component.histograms, policy)
        distance = sum(s.psi for s in scores.values()) / len(scores) if scores else float("inf")
        if best is None or distance < best[0]:
            best = (distance, name, scores)
    if best is None:
        raise ValueError("a reference needs at least one component")
    return best[1], best[2]


def evaluate(state: SubjectState, window: Window, model_version: int | None,
             components: Mapping[str, Component], policy: DriftPolicy) -> Verdict:
    """Score ``window`` against the closest reference component, advance ``state`` (in place) and
    say what rose or cleared."""
    model_changed = state.windows > 0 and model_version != state.model_version
    was_drifting, was_decayed = state.drifting, state.decay.active
    if model_changed or state.windows == 0:
        # A new model has a new reference: its episode starts from scratch.
        state.model_version, state.windows = model_version, 0
        state.metrics, state.decay = {}, Hysteresis()
    state.windows += 1

    component, scores = closest_component(window, components, policy)
    values, over = {}, []
    for name, metric_score in scores.items():
        threshold = policy.threshold_for(name)
        value = metric_score.value(threshold.statistic)
        values[name] = value
        is_over = value >= threshold.raise_above
        if is_over:
            over.append(name)
        state.metrics.setdefault(name, Hysteresis()).update(
            is_over, value < threshold.clear_below, policy.raise_after, policy.clear_after)
    drifting = sorted(name for name, h in state.metrics.items() if h.active)
    drift_event: Event | None = None
    if drifting and not (was_drifting and not model_changed):
        drift_event = "raised"
    elif was_drifting and not drifting:
        drift_event = "cleared"

    ref = components[component]
    figures, d_over, d_under, reasons = _decay_figures(window, ref.histograms, ref.frames,
                                                       state.baseline_rate(policy), policy)
    decay_event = None
    if d_over or d_under:
        decay_event = state.decay.update(any(d_over), bool(d_under) and all(d_under),
                                         policy.raise_after, policy.clear_after)
    if model_changed and was_decayed and not state.decay.active:
        decay_event = "cleared"
    if (state.baseline_windows < policy.baseline_windows and window.qa_frames and window.correction_rate is not None
            and not drifting and not state.decay.active):
        # The model's track record on this subject, from its first windows that raised nothing.
        state.baseline_windows += 1
        state.baseline_qa += window.qa_frames
        state.baseline_corrected += window.correction_rate * window.qa_frames
    return Verdict(component=component, scores=scores, values=values, over=sorted(over),
                   drifting_metrics=drifting, drift_event=drift_event, decay=figures, decay_reasons=reasons,
                   decayed=state.decay.active, decay_event=decay_event, model_changed=model_changed)


class GroupRound:
    """Sums members' windows into group windows: a round holds one report per member and closes
    when a member reports again (every member has had its turn) -- so a group window covers about
    one device window of wall time, whatever the group's size."""

    def __init__(self) -> None:
        self._parts: dict[str, Window] = {}

    def add(self, device_id: str, window: Window) -> Window | None:
        """Add a member's window; returns the closed round's sum when this report starts a new one."""
        closed = None
        if device_id in self._parts:
            closed = self.close()
        self._parts[device_id] = window
        return closed

    def close(self) -> Window | None:
        if not self._parts:
            return None
        parts, self._parts = list(self._parts.values()), {}
        return merge_windows(parts)

    @property
    def members(self) -> list[str]:
        return sorted(self._parts)


def merge_windows(parts: Sequence[Window]) -> Window:
    qa = sum(p.qa_frames for p in parts)
    corrected = sum((p.correction_rate or 0.0) * p.qa_frames for p in parts)
    return Window(frames=sum(p.frames for p in parts),
                  histograms=merge_histograms(p.histograms for p in parts),
                  correction_rate=corrected / qa if qa else None, qa_frames=qa)
