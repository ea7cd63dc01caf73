"""The simulated device as a pure state machine: no sockets, no clocks, no threads.

Given a command, :meth:`SimDevice.on_command` says which OTA transitions follow and after what
delay (:class:`Step`); the driver schedules each step and calls :meth:`SimDevice.apply` when it is
due, which returns the :class:`~protocol.UpdateEvent` to publish (or None when the update was
superseded meanwhile: an abort during the download drops the rest of it). Periodic messages
(heartbeat, shadow window, drift window, sample) are built by the ``*_message`` methods.

The transitions mirror the real agent's (``edge_agent.ota.states``, its ``(state, event)`` table):

- deploy, shadow first: ``DOWNLOADING`` (deploy) → ``VERIFYING`` (downloaded) → ``STAGED`` (verified)
  → ``SHADOWING`` (start_shadow); with ``await_promotion`` it stays there, reporting shadow
  windows, until a promote (→ ``PROMOTING`` shadow_passed → ``CHECKING`` switched → ``ACTIVE``
  healthy) or an abort (→ ``REJECTED``); without it, it promotes itself after ``shadow_frames``.
- deploy, direct: ``STAGED`` → ``PROMOTING`` (promote) → ``CHECKING`` → ``ACTIVE``.
- signed rollback: ``ROLLING_BACK`` (rollback) → ``ROLLED_BACK`` (switched); a rollback that fails
  its signature check (when the device has a trust store) is reported as ``rollback_refused``.

Behaviours, drawn per device from :class:`FleetProfile`: ``normal``; ``slow`` (every step takes
``slow_factor`` times longer); ``refusing`` (its bundle fails verification: ``VERIFYING`` →
``REJECTED`` verify_failed); ``offline`` (never connects; the driver skips it).
"""

from __future__ import annotations

import hashlib
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from protocol import (
    AbortCommand,
    DeployCommand,
    DriftReport,
    Heartbeat,
    PromoteCommand,
    RollbackCommand,
    SampleEvent,
    ShadowReport,
    StatusMessage,
    UpdateEvent,
)
from protocol.messages import Hardware, Histogram, SampleReason

NORMAL, SLOW, REFUSING, OFFLINE = "normal", "slow", "refusing", "offline"
RESTING = frozenset({"IDLE", "ACTIVE", "REJECTED", "ROLLED_BACK", "FAILED"})
ABORTABLE = frozenset({"DOWNLOADING", "VERIFYING", "STAGED", "SHADOWING"})
AGENT_VERSION = "sim-0.1.0"


@dataclass(frozen=True)
class Timings:
    """How long each OTA step takes on a normal device (seconds), before jitter."""

    download_bytes_per_s: float = 20e6  # a plant network: a 10 MB bundle in 0.5 s
    min_download_s: float = 0.2
    verify_s: float = 0.3
    stage_s: float = 0.1
    switch_s: float = 0.1
    health_s: float = 1.0
    rollback_s: float = 0.3
    fps: float = 15.0  # frames per second the device sees (shadow windows, heartbeats' fps)
    jitter: float = 0.25  # each delay is multiplied by uniform(1 - jitter, 1 + jitter)
    slow_factor: float = 8.0

    def scaled(self, factor: float) -> Timings:
        """Every step ``factor`` times as long (tests use a small factor)."""
        return Timings(download_bytes_per_s=self.download_bytes_per_s / factor,
                       min_download_s=self.min_download_s * factor, verify_s=self.verify_s * factor,
                       stage_s=self.stage_s * factor, switch_s=self.switch_s * factor,
                       health_s=self.health_s * factor, rollback_s=self.rollback_s * factor,
                       fps=self.fps, jitter=self.jitter, slow_factor=self.slow_factor)


@dataclass(frozen=True)
class FleetProfile:
    """Shares of the fleet that behave badly; the rest is normal. Drawn per device, stably."""

    offline: float = 0.0
    slow: float = 0.0
    refusing: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("offline", "slow", "refusing"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a share between 0 and 1")
        if self.offline + self.slow + self.refusing > 1.0:
            raise ValueError("offline + slow + refusing must not exceed 1")

    def behaviour(self, device_id: str) -> str:
        """Stable for a device id and seed: the same device misbehaves the same way every run."""
        digest = hashlib.sha256(f"{self.seed}:{device_id}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64
        for kind, share in ((OFFLINE, self.offline), (SLOW, self.slow), (REFUSING, self.refusing)):
            if u < share:
                return kind
            u -= share
        return NORMAL


@dataclass(frozen=True)
class Step:
    """One OTA transition ``delay`` seconds after the previous step of the same command."""

    delay: float
    update_id: str
    version: int
    from_state: str
    to_state: str
    event: str
    reason: str = ""


@dataclass
class SimDevice:
    device_id: str
    behaviour: str = NORMAL
    timings: Timings = field(default_factory=Timings)
    active_version: int | None = 1
    agreement: float = 0.96
    # firmware_bundles.verify_command-like callable; None: rollbacks are taken unverified.
    verify_rollback: Callable[[RollbackCommand], object] | None = None
    rng: random.Random = field(default_factory=random.Random)

    state: str = "IDLE"
    update_id: str | None = None
    version: int | None = None  # the update's target version
    candidate_version: int | None = None
    frames_total: int = 0
    samples_sent: int = 0
    shadow_window: int = 0
    drift_window: int = 0
    _seen: set[str] = field(default_factory=set)
    _await_promotion: bool = True
    _shadow_frames: int = 50

    def __post_init__(self) -> None:
        if self.active_version is not None:
            self.state = "ACTIVE"

    # ------------------------------------------------------------------ helpers

    def _d(self, seconds: float) -> float:
        j = self.timings.jitter
        factor = self.timings.slow_factor if self.behaviour == SLOW else 1.0
        return max(0.0, seconds * factor * self.rng.uniform(1 - j, 1 + j))

    @property
    def shadowing(self) -> bool:
        return self.state == "SHADOWING"

    @property
    def shadow_window_seconds(self) -> float:
        """How long one shadow window of the deploy's ``shadow_frames`` takes at this device's frame
        rate: how often an agent reports one."""
        fps = self.timings.fps * (0.5 if self.behaviour == SLOW else 1.0)
        return self._shadow_frames / max(fps, 0.1)

    # ------------------------------------------------------------------ commands

    def on_command(self, command) -> list[Step]:
        """The steps a command leads to (the first usually at delay 0); [] when it is ignored."""
        if command.command_id in self._seen:
            return []  # QoS 1 redelivery
        self._seen.add(command.command_id)
        if isinstance(command, DeployCommand):
            return self._deploy(command)
        if isinstance(command, PromoteCommand):
            if self.state != "SHADOWING" or command.version != self.version:
                return []
            return self._promotion("shadow_passed", "promoted by the server")
        if isinstance(command, AbortCommand):
            if self.state not in ABORTABLE or command.version != self.version:
                return []
            return [Step(0.0, self.update_id or command.command_id, command.version, self.state, "REJECTED", "abort",
                         command.reason or "aborted by the server")]
        if isinstance(command, RollbackCommand):
            return self._rollback(command)
        return []  # sampling config: nothing to report

    def _deploy(self, command: DeployCommand) -> list[Step]:
        if self.state not in RESTING:
            return []  # busy, as the real agent: the server resends later
        uid, v = command.command_id, command.version
        t = self.timings
        self._await_promotion, self._shadow_frames = command.await_promotion, command.shadow_frames
        download = max(t.min_download_s, command.bundle_size / t.download_bytes_per_s)
        steps = [Step(0.0, uid, v, self.state, "DOWNLOADING", "deploy", f"deploy of version {v} ({command.mode})"),
                 Step(self._d(download), uid, v, "DOWNLOADING", "VERIFYING", "downloaded")]
        if self.behaviour == REFUSING:
            return [*steps, Step(self._d(t.verify_s), uid, v, "VERIFYING", "REJECTED", "verify_failed",
                                 "bundle signature does not verify (simulated refusal)")]
        steps.append(Step(self._d(t.verify_s), uid, v, "VERIFYING", "STAGED", "verified"))
        if command.mode == "direct":
            steps.append(Step(self._d(t.stage_s), uid, v, "STAGED", "PROMOTING", "promote", "direct install"))
            return steps + self._switch(uid, v)
        steps.append(Step(self._d(t.stage_s), uid, v, "STAGED", "SHADOWING", "start_shadow"))
        if not command.await_promotion:
            shadow_s = command.shadow_frames / max(t.fps, 0.1)
            steps.append(Step(self._d(shadow_s), uid, v, "SHADOWING", "PROMOTING", "shadow_passed",
                              "shadow window passed"))
            steps += self._switch(uid, v)
        return steps

    def _switch(self, uid: str, v: int) -> list[Step]:
        t = self.timings
        return [Step(self._d(t.switch_s), uid, v, "PROMOTING", "CHECKING", "switched",
                     f"version {v} serves; health check running"),
                Step(self._d(t.health_s), uid, v, "CHECKING", "ACTIVE", "healthy", "health check passed")]

    def _promotion(self, event: str, reason: str) -> list[Step]:
        uid, v = self.update_id or "", self.version or 0
        return [Step(0.0, uid, v, "SHADOWING", "PROMOTING", event, reason), *self._switch(uid, v)]

    def _rollback(self, command: RollbackCommand) -> list[Step]:
        target = command.to_version or (self.active_version - 1 if self.active_version and self.active_version > 1
                                        else None)
        uid = command.command_id
        refused = None
        if self.verify_rollback is not None:
            try:
                self.verify_rollback(command)
            except Exception as exc:  # a BundleError subclass from firmware_bundles
                refused = str(exc)
        if refused is None and target is None:
            refused = f"no version older than the active {self.active_version} to roll back to"
        if refused is None and self.active_version is not None and target >= self.active_version:
            refused = f"version {target} is not older than the active {self.active_version}; deploy it instead"
        if refused is None and self.state not in RESTING and self.state not in ABORTABLE:
            refused = f"an update is in {self.state}"
        if refused is not None:
            return [Step(0.0, uid, command.to_version or 0, self.state, self.state, "rollback_refused",
                         f"rollback refused: {refused}")]
        steps = []
        if self.state in ABORTABLE:
            steps.append(Step(0.0, self.update_id or uid, self.version or 0, self.state, "REJECTED", "abort",
                              f"superseded by signed rollback command {uid}"))
        from_state = "REJECTED" if steps else self.state
        steps += [Step(0.0, uid, target, from_state, "ROLLING_BACK", "rollback",
                       f"signed rollback to version {target} ({command.reason or 'no reason given'})"),
                  Step(self._d(self.timings.rollback_s), uid, target, "ROLLING_BACK", "ROLLED_BACK", "switched",
                       f"version {target} is active again")]
        return steps

    def apply(self, step: Step) -> UpdateEvent | None:
        """Take ``step`` if the device is still where it expects; the event to publish, or None."""
        if step.event == "rollback_refused":
            return self._event(step)
        if self.state != step.from_state:
            return None  # superseded (aborted, rolled back) meanwhile
        if step.event in ("deploy", "rollback"):
            self.update_id = step.update_id
        elif self.update_id != step.update_id:
            return None
        self.state, self.version = step.to_state, step.version
        if step.to_state == "DOWNLOADING":
            self.candidate_version = step.version
        elif step.to_state == "SHADOWING":
            self.shadow_window = 0
        elif step.to_state == "CHECKING" or step.to_state == "ROLLED_BACK":
            self.active_version, self.candidate_version = step.version, None
        elif step.to_state in ("REJECTED", "FAILED"):
            self.candidate_version = None
        return self._event(step)

    def _event(self, step: Step) -> UpdateEvent:
        return UpdateEvent(device_id=self.device_id, update_id=step.update_id, version=step.version,
                           from_state=step.from_state, to_state=step.to_state, event=step.event,
                           reason=step.reason, active_version=self.active_version)

    # ------------------------------------------------------------------ periodic messages

    def status_message(self, state: str = "online") -> StatusMessage:
        if state == "offline":
            return StatusMessage(device_id=self.device_id, state="offline")
        return StatusMessage(device_id=self.device_id, state="online", agent_version=AGENT_VERSION,
                             active_version=self.active_version, candidate_version=self.candidate_version,
                             hardware=Hardware(cpu="simulated", cpu_count=4))

    def heartbeat(self, interval_s: float) -> Heartbeat:
        fps = self.timings.fps * (0.5 if self.behaviour == SLOW else 1.0)
        self.frames_total += int(fps * interval_s)
        p50 = self.rng.uniform(3.5, 5.0) * (3 if self.behaviour == SLOW else 1)
        return Heartbeat(device_id=self.device_id, fps=round(fps, 2), latency_ms_p50=round(p50, 2),
                         latency_ms_p99=round(p50 * 2.2, 2), frames_total=self.frames_total,
                         samples_sent=self.samples_sent, spool_depth=0, disk_free_bytes=32 * 2**30,
                         active_version=self.active_version, candidate_version=self.candidate_version)

    def shadow_report(self) -> ShadowReport | None:
        """One shadow window while SHADOWING (every frame's truth known: the active model right on
        90 %, the candidate also on the other 10 %: a candidate the rollout's gates pass)."""
        if not self.shadowing or self.candidate_version is None:
            return None
        self.shadow_window += 1
        n = self._shadow_frames  # the window the deploy asked for
        return ShadowReport(
            device_id=self.device_id, update_id=self.update_id or "", active_version=self.active_version,
            candidate_version=self.candidate_version, window=self.shadow_window, frames_compared=n,
            frames_dropped=0, agreement=self.agreement, confident_agreement=self.agreement,
            corrected_frames=n, active_accuracy=0.9, candidate_accuracy=1.0, candidate_only_correct=n // 10,
            active_only_correct=0, active_latency_ms_p50=4.2, active_latency_ms_p99=9.5,
            candidate_latency_ms_p50=4.4, candidate_latency_ms_p99=9.9, errors=0)

    def drift_report(self, frames: int = 300) -> DriftReport:
        """One drift window: brightness and confidence histograms close to a steady line's."""
        self.drift_window += 1
        edges = [i / 10 for i in range(11)]
        weights = [1, 2, 5, 9, 12, 12, 9, 5, 2, 1]
        total = sum(weights)
        counts = [frames * w // total for w in weights]
        return DriftReport(device_id=self.device_id, model_version=self.active_version, window=self.drift_window,
                           frames=frames, histograms={"brightness": Histogram(edges=edges, counts=counts),
                                                      "confidence": Histogram(edges=edges, counts=counts[::-1])},
                           correction_rate=0.02, qa_frames=frames // 10)

    def sample_event(self, *, object_key: str, sha256: str, size_bytes: int, width: int, height: int,
                     content_type: str = "image/png") -> SampleEvent:
        """Announces a frame already uploaded to ``object_key`` (unlabeled, low confidence)."""
        self.samples_sent += 1
        return SampleEvent(device_id=self.device_id, sample_id=uuid.uuid4().hex, object_key=object_key,
                           sha256=sha256, size_bytes=size_bytes, content_type=content_type, width=width,
                           height=height, reason=SampleReason.LOW_CONFIDENCE, model_version=self.active_version,
                           frame_id=f"{self.device_id}-{self.frames_total}", labels=None)
