"""The agent's main loop: frames → active model → result, with shadow, sample collection,
heartbeats and OTA steps interleaved between frames so the line is never kept waiting."""

from __future__ import annotations

import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import httpx
import structlog

from edge_agent import AGENT_VERSION
from edge_agent.collector import SampleCollector, truths_of
from edge_agent.drift import DriftWindow
from edge_agent.frame_buffer import FrameBuffer
from edge_agent.hardware import detect_hardware
from edge_agent.hmi import CorrectionServer
from edge_agent.inference import create_detector
from edge_agent.inference.engines import EngineError, detector_settings, resolve_model
from edge_agent.matching import frame_is_correct
from edge_agent.mqtt_client import AgentMqtt
from edge_agent.ota import crashpoint
from edge_agent.ota.compat import DeviceProfile
from edge_agent.ota.health import BaselineWindow, FrameOutcome, HealthMonitor, Verdict
from edge_agent.ota.slots import ModelSlots
from edge_agent.ota.states import ABORTABLE, GIVE_UP, Event, State
from edge_agent.ota.updater import RollbackRefused, Updater
from edge_agent.settings import AgentSettings
from edge_agent.shadow import ShadowBudget, ShadowItem, ShadowRunner
from edge_agent.sources import FrameReader, SourceEnded, StreamOptions, open_source
from edge_agent.spool import Spool
from edge_agent.stats import LatencyWindow
from edge_agent.uploader import Uploader
from firmware_bundles import TrustStore
from protocol.messages import (
    AbortCommand,
    DeployCommand,
    Heartbeat,
    PromoteCommand,
    RollbackCommand,
    SamplingConfigCommand,
    ShadowReport,
    StatusMessage,
)

log = structlog.get_logger(__name__)

# While a switch is under way a rollback command waits for it to finish.
_SWITCHING = frozenset({State.PROMOTING, State.ROLLING_BACK})
# States whose step loads a model in the background.
_LOADING_STATES = frozenset({State.STAGED, State.SHADOWING, State.PROMOTING, State.ROLLING_BACK})


class Agent:
    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.device_id = settings.device_id
        data = settings.data_dir
        data.mkdir(parents=True, exist_ok=True)
        self._stop = threading.Event()
        self.hardware = detect_hardware()
        self.http = httpx.Client(base_url=settings.api_url, timeout=30,
                                 headers={"Authorization": f"Bearer {settings.api_token.get_secret_value()}"})
        # QoS 1 events go through an on-disk outbox, so they survive a broker outage and a restart.
        self.mqtt = AgentMqtt.from_settings(settings)
        self.spool = Spool(data / "spool", settings.spool_max_bytes)
        self.uploader = Uploader(self.spool, self.http, self.device_id, self.mqtt)
        self.collector = SampleCollector.from_settings(self.spool, settings, data / "collector-quota.json")
        # Recent frames a line HMI may still correct, by frame id (only kept when the HMI is on).
        self.recent_frames = FrameBuffer(settings.frame_buffer_frames, settings.frame_buffer_max_bytes)
        self.hmi = (CorrectionServer.from_settings(settings, self.collector, self.recent_frames,
                                                   on_verdict=self._qa_verdict, on_truth=self._late_truth)
                    if settings.hmi_port else None)
        self.reader: FrameReader | None = None
        # Input, confidence and QA statistics per window, published on the drift topic.
        self.drift: DriftWindow | None = None
        self._drift_model: int | None = None
        if settings.trusted_keys is None:
            raise ValueError("trusted_keys is required: bundles are only installed when their signature verifies")
        self.slots = ModelSlots(data / "models")
        self.updater = Updater(self.device_id, data, self.slots, TrustStore.from_path(settings.trusted_keys),
                               httpx.Client(timeout=60), self.mqtt.publish, settings.max_bundle_bytes,
                               settings.keep_versions, crash=crashpoint.from_environ(),
                               device=DeviceProfile(self.hardware, AGENT_VERSION,
                                                    detector_type=settings.detector.get("type"),
                                                    engine_precision=settings.engine_precision,
                                                    engine_build=settings.engine_build))
        # The live model's recent frames (the baseline a new model is judged against) and, after a
        # switch, the new model's health window.
        self.baseline = BaselineWindow()
        self.health: HealthMonitor | None = None
        self.inference_errors = 0
        self._load_error = ""
        # Rollback commands waiting for a switch to finish, and the state they were deferred in.
        self._deferred: list[tuple[RollbackCommand, State]] = []
        self._bg = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ota")
        self._bg_future: Future | None = None
        # Models for a switch or a shadow load here, off the frame loop: ((update id, version), future).
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-load")
        self._loading: tuple[tuple[str, int], Future] | None = None
        self.detector = None
        self.active_version: int | None = None
        self.shadow: ShadowRunner | None = None
        self.shadow_detector = None
        self._shadow_window = 0  # index of the shadow window being reported (a rollout's hold reports many)
        self.latency = LatencyWindow()
        self.frames = 0
        self._frames_at_last_beat = 0
        self._last_beat = time.monotonic()

    # ------------------------------------------------------------------ models

    def _load(self, version: int):
        """A slot's model, ready to serve: files re-checked against the signed manifest, the file
        this device's backend runs chosen (a bundle engine for this GPU, a cached or freshly built
        TensorRT engine, or the ONNX model), loaded, one test inference with the expected output shape."""
        self.slots.verify(version, self.updater.trust)
        s = self.settings
        manifest = self.slots.manifest(version)
        try:
            resolved = resolve_model(
                self.slots.slot(version), manifest, self.hardware, s.detector.get("type", "onnxruntime"),
                cache_dir=s.data_dir / "engines", precision=s.engine_precision, allow_build=s.engine_build,
                onnx_precision=s.onnx_precision,
                workspace_bytes=s.engine_build_workspace_mb << 20, cancel=self._stop,
                progress=lambda event: self.mqtt.publish(event.to_message(self.device_id)))
        except EngineError as exc:
            raise RuntimeError(f"no runnable model file for this device: {exc}") from exc
        detector = create_detector(resolved.path, detector_settings(s.detector, resolved, manifest))
        try:
            detector.load()
            detector.health_check()
        except Exception:
            detector.close()
            raise
        return detector

    def _load_active(self) -> None:
        """Serve the active slot; if it is damaged or broken, the newest other slot that loads."""
        version = self.slots.active()
        if version is None:
            return
        try:
            self.detector, self.active_version = self._load(version), version
            return
        except Exception as exc:
            self._load_error = f"version {version} failed to load: {exc}"
            log.error("agent.active_model_broken", version=version, error=str(exc))
        for fallback in dict.fromkeys([self.slots.previous(), *reversed(self.slots.installed())]):
            if fallback is None or fallback == version:
                continue
            try:
                self.detector = self._load(fallback)
            except Exception as exc:
                log.error("agent.fallback_model_broken", version=fallback, error=str(exc))
                continue
            self.slots.set_active(fallback)
            self.active_version = fallback
            log.warning("agent.serving_fallback", version=fallback, broken=version)
            return
        self.detector, self.active_version = None, None
        log.error("agent.no_loadable_model", broken=version)

    def _loaded(self, version: int):
        """The detector for ``version``, loaded off the frame loop: None while it loads (the current
        model keeps serving), then the detector; raises what the load raised."""
        key = (self.updater.record.update_id, version)
        if self._loading is None or self._loading[0] != key:
            self._drop_loading()
            self._loading = (key, self._loader.submit(self._load, version))
            return None
        future = self._loading[1]
        if not future.done():
            return None
        self._loading = None
        return future.result()

    def _drop_loading(self) -> None:
        if self._loading is not None:
            self._loading[1].add_done_callback(_close_loaded)
            self._loading = None

    def _sync_detector(self) -> None:
        """After the updater moved the active link on its own (giving up a switch), serve what it points to."""
        if self.slots.active() != self.active_version:
            old = self.detector
            self.detector, self.active_version = None, None
            self._load_active()
            if old is not None:
                old.close()
            self.baseline.clear()
            self.mqtt.update_status(self.status())

    def status(self) -> StatusMessage:
        return StatusMessage(device_id=self.device_id, state="online", agent_version=AGENT_VERSION,
                             active_version=self.active_version, candidate_version=self.slots.candidate(),
                             hardware=self.hardware)

    # ------------------------------------------------------------------ OTA between frames

    def _handle_command(self, command) -> None:
        if isinstance(command, DeployCommand):
            self.updater.begin(command)
        elif isinstance(command, AbortCommand) and command.version == self.updater.record.version:
            if self.updater.state in ABORTABLE:
                self._end_shadow()
                self.updater.abort(command.reason or "aborted by the server")
        elif (isinstance(command, PromoteCommand) and self.updater.state is State.SHADOWING
              and command.version == self.updater.record.version):
            self._end_shadow()
            self._promote(Event.SHADOW_PASSED, "promoted by the server")
        elif isinstance(command, RollbackCommand):
            self._rollback(command)
        elif isinstance(command, SamplingConfigCommand):
            self.collector.configure(random_rate=command.random_rate, low_band=command.low_confidence_band,
                                     max_per_hour=command.max_samples_per_hour)
            log.info("agent.sampling_config", config=command.model_dump(exclude_none=True,
                                                                        exclude={"ts", "msg_id", "v"}))

    def _rollback(self, command: RollbackCommand) -> None:
        """A signed rollback: verified before anything in flight is touched; waits out a switch."""
        updater = self.updater
        if command.command_id == updater.record.update_id:
            return  # QoS 1 redelivery
        try:
            target, instant = updater.check_rollback(command)
        except RollbackRefused as exc:
            updater.refuse(command, str(exc))
            return
        state = updater.state
        if state in _SWITCHING or (state is State.CHECKING and not instant):
            self._deferred.append((command, state))
            return
        if state in ABORTABLE:
            self._end_shadow()
            updater.abort(f"superseded by signed rollback command {command.command_id}")
        try:
            updater.begin_rollback(command, target, instant)
        except RollbackRefused as exc:
            updater.refuse(command, str(exc))
            return
        self.health = None

    def _retry_deferred(self) -> None:
        state = self.updater.state
        waiting, self._deferred = self._deferred, []
        for command, deferred_in in waiting:
            if state is deferred_in:
                self._deferred.append((command, deferred_in))
            else:
                self._rollback(command)

    def _promote(self, event: Event, reason: str) -> None:
        """→ PROMOTING, freezing the live model's recent behaviour for the post-switch health check."""
        self.updater.transition(event, reason, baseline=self.baseline.snapshot(self.active_version))

    def _end_shadow(self) -> None:
        if self.shadow is not None:
            self.shadow.close()
            self.shadow = None
        if self.shadow_detector is not None:
            self.shadow_detector.close()
            self.shadow_detector = None

    def _step_update(self) -> None:
        state = self.updater.state
        if state in GIVE_UP and self.updater.resume_count_exceeded() and not self._busy_in_background():
            # Re-entered after crash after crash (e.g. a candidate that kills the runtime): stop trying.
            self._end_shadow()
            self.health = None
            self.updater.give_up()
            self._sync_detector()
            return
        if self._loading is not None and state not in _LOADING_STATES:
            self._drop_loading()  # the update moved on (aborted, rolled back) while a model loaded
        if state in {State.DOWNLOADING, State.VERIFYING}:
            if not self._busy_in_background():
                self._bg_future = self._bg.submit(self.updater.fetch)
        elif state is State.STAGED:
            rec = self.updater.record
            if rec.kind == "rollback":
                self.updater.transition(Event.ROLLBACK, f"switching back to the fetched version {rec.version}")
            elif rec.mode == "direct" or self.detector is None:
                self._promote(Event.PROMOTE, "direct install" if self.detector is not None
                              else "no active model to compare against")
            else:
                try:
                    candidate = self._loaded(rec.version)
                except Exception as exc:
                    self.updater.transition(Event.ABORT, f"candidate failed its health check: {exc}")
                    self.updater.discard_candidate()
                    return
                if candidate is None:
                    return
                self.shadow_detector = candidate
                self._shadow_window = 0
                self.shadow = self._shadow_runner(candidate)
                self.updater.transition(Event.START_SHADOW, f"shadowing {rec.shadow_frames} frames")
        elif state is State.SHADOWING:
            if self.shadow is None:  # resumed after a restart: the window starts again
                try:
                    candidate = self._loaded(self.updater.record.version)
                except Exception as exc:
                    self.updater.transition(Event.SHADOW_FAILED, f"candidate failed to load: {exc}")
                    self.updater.discard_candidate()
                    return
                if candidate is not None:
                    self.shadow_detector = candidate
                    self.shadow = self._shadow_runner(candidate)
                return
            if self.shadow.done.is_set():
                self._finish_shadow()
        elif state is State.PROMOTING:
            self._switch()
        elif state is State.CHECKING:
            self._resume_checking()
        elif state is State.ROLLING_BACK:
            self._switch_back()

    def _shadow_runner(self, candidate) -> ShadowRunner:
        s, version = self.settings, self.updater.record.version
        budget = ShadowBudget(share=s.shadow_share, max_busy_fraction=s.shadow_max_busy_fraction,
                              window_s=s.shadow_budget_window_s)

        def on_compared(item: ShadowItem, candidate_detections) -> None:
            # Frames the two models disagree on are exactly what the next retrain should learn from.
            self.collector.consider_disagreement(item.image, item.frame_id, item.active, candidate_detections,
                                                 item.active_version, version)

        return ShadowRunner(candidate, self.updater.record.shadow_frames, s.shadow_queue, budget=budget,
                            on_compared=on_compared if s.collect_shadow_disagreement else None,
                            # as long as the HMI may still correct a frame (none kept without an HMI)
                            pending_truth=s.frame_buffer_frames if self.hmi is not None else 0)

    def _late_truth(self, frame_id: str, truths) -> None:
        """An HMI correction for a served frame: if the candidate ran on it too, it is a paired outcome."""
        shadow = self.shadow
        if shadow is not None and shadow.judge_late(frame_id, truths):
            log.info("shadow.late_truth", frame_id=frame_id)

    def _busy_in_background(self) -> bool:
        return self._bg_future is not None and not self._bg_future.done()

    def _finish_shadow(self) -> None:
        report = self.shadow.report()
        rec = self.updater.record
        self.mqtt.publish(ShadowReport(device_id=self.device_id, update_id=rec.update_id,
                                       active_version=self.active_version, candidate_version=rec.version,
                                       window=self._shadow_window, **report))
        # Awaiting the server's promotion, accuracy is the rollout's sequential decision over every
        # window (one window is far too little evidence to reject on); the device still stops a
        # candidate that crashes.
        tolerance = 1.0 if rec.await_promotion else self.settings.shadow_accuracy_tolerance
        failure = shadow_gate_failure(report, self.settings.shadow_max_errors, tolerance)
        if failure:
            self._end_shadow()
            self.updater.transition(Event.SHADOW_FAILED, f"{failure} ({_describe(report)})")
            self.updater.discard_candidate()
            return
        if rec.await_promotion:
            # A rollout's gates are the server's decision: keep shadowing with the candidate loaded and
            # report a fresh window each time, until its PromoteCommand or AbortCommand arrives.
            self._shadow_window += 1
            pending = self.shadow.take_pending()
            self.shadow.close()
            self.shadow = self._shadow_runner(self.shadow_detector)
            self.shadow.adopt_pending(pending)  # a correction may still come for an earlier window's frame
            return
        self._end_shadow()
        self._promote(Event.SHADOW_PASSED, _describe(report))

    def _switch(self) -> None:
        """PROMOTING → CHECKING, between two frames, no restart; the health window starts."""
        rec = self.updater.record
        try:
            new = self._loaded(rec.version)
        except Exception as exc:
            self.updater.transition(Event.SWITCH_FAILED, f"new model failed its health check: {exc}")
            self.updater.discard_candidate()
            self._sync_detector()
            return
        if new is None:
            return  # still loading; the old model serves meanwhile
        old = self.detector
        self.detector, self.active_version = new, rec.version
        self.updater.switch()
        if old is not None and old is not new:
            old.close()
        self.health = HealthMonitor(self.settings.health, rec.baseline, rec.version)
        self.baseline.clear()
        self.mqtt.update_status(self.status())

    def _resume_checking(self) -> None:
        """CHECKING after a restart (or with a model that failed to load): restart the window or roll back."""
        if self.health is not None:
            return
        rec = self.updater.record
        if self.active_version != rec.version:
            self._verdict(Verdict(False, self._load_error or f"version {rec.version} is not serving"))
            return
        self.health = HealthMonitor(self.settings.health, rec.baseline, rec.version)

    def _verdict(self, verdict: Verdict) -> None:
        self.health = None
        if verdict.healthy:
            self.updater.commit(verdict.reason)
        else:
            self.updater.unhealthy(verdict.reason)  # the switch back runs on the next step, between frames

    def _switch_back(self) -> None:
        """ROLLING_BACK → ROLLED_BACK: the older slot serves from the next frame on."""
        updater = self.updater
        target = updater.record.rollback_to
        new = None
        if not (self.active_version == target and self.detector is not None):
            try:
                new = self._loaded(target)
            except Exception as exc:
                if self.active_version is not None:
                    self.slots.set_active(self.active_version)
                updater.transition(Event.SWITCH_FAILED, f"rollback target {target} failed its check: {exc}; "
                                                        f"version {self.active_version} stays active")
                return
            if new is None:
                return  # still loading; the current model serves meanwhile
        old = self.detector
        if new is not None:
            self.detector, self.active_version = new, target
        updater.switch_back()
        if new is not None and old is not None:
            old.close()
        self.baseline.clear()
        self.mqtt.update_status(self.status())

    def _observe(self, outcome: FrameOutcome) -> None:
        """Every served frame feeds the health window after a switch, else the live baseline."""
        if self.health is not None and self.updater.state is State.CHECKING:
            verdict = self.health.observe(outcome)
            if verdict is not None:
                self._verdict(verdict)
        else:
            self.baseline.add(outcome)

    # ------------------------------------------------------------------ drift

    def _qa_verdict(self, corrected: bool) -> None:
        """A line HMI judged a served frame (from its thread): it counts in the drift window's QA rate."""
        window = self.drift
        if window is not None:
            window.add_qa(corrected)

    def _drift_frame(self, frame, detections) -> None:
        """Feed the drift window (one window describes one model) and publish it when complete."""
        if not self.settings.drift.enabled:
            return
        if self.drift is None or self._drift_model != self.active_version:
            self.drift = DriftWindow(self.settings.drift, len(self.detector.class_names))
            self._drift_model = self.active_version
        truths = truths_of(frame)
        # QA's verdict on this frame: corrected when its labels disagree with the live model.
        corrected = None if truths is None else not frame_is_correct(detections, truths)
        self.drift.add(frame.image, detections, corrected)
        if self.drift.due():
            self.mqtt.publish(self.drift.report(self.device_id, self.active_version))

    # ------------------------------------------------------------------ loop

    def _heartbeat(self) -> None:
        now = time.monotonic()
        if now - self._last_beat < self.settings.heartbeat_seconds:
            return
        fps = (self.frames - self._frames_at_last_beat) / (now - self._last_beat)
        self._last_beat, self._frames_at_last_beat = now, self.frames
        spool = self.spool.stats().heartbeat_fields()
        # The spool counts what it holds and sent per reason; the collector what it turned away.
        spool["samples"] = {**spool["samples"],
                            **{k: v for k, v in self.collector.counters().items() if k != "collected"}}
        self.mqtt.publish(Heartbeat(
            device_id=self.device_id, fps=round(fps, 2), latency_ms_p50=self.latency.percentile(50) or 0.0,
            latency_ms_p99=self.latency.percentile(99) or 0.0, frames_total=self.frames,
            samples_sent=self.uploader.sent, disk_free_bytes=shutil.disk_usage(self.settings.data_dir).free,
            active_version=self.active_version, candidate_version=self.slots.candidate(), **spool))

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        self._load_active()
        self.mqtt.start(self.status())
        self.updater.report_resume()
        self.uploader.start()
        if self.hmi is not None:
            self.hmi.start()
        s = self.settings
        options = StreamOptions(open_timeout_s=s.source_open_timeout_s, read_timeout_s=s.source_read_timeout_s,
                                initial_backoff_s=s.source_reconnect_min_s, max_backoff_s=s.source_reconnect_max_s)
        # The source runs on its own thread: a stream reconnecting never stalls commands and heartbeats.
        self.reader = FrameReader(open_source(s.source, loop=s.loop_source, options=options, stop=self._stop))
        min_interval = 1.0 / self.settings.max_fps if self.settings.max_fps else 0.0
        log.info("agent.started", device=self.device_id, active=self.active_version, state=self.updater.state)
        try:
            while not self._stop.is_set():
                if self.mqtt.auth_failed.is_set():
                    log.error("agent.auth_failed", hint="broker refused this device's credentials; not retrying")
                    break
                t0 = time.monotonic()
                while not self.mqtt.commands.empty():
                    self._handle_command(self.mqtt.commands.get_nowait())
                if self._deferred:
                    self._retry_deferred()
                self._step_update()
                self._heartbeat()
                if self.detector is None:
                    self._stop.wait(0.2)  # nothing to serve until a model is installed
                    continue
                try:
                    frame = self.reader.get(timeout=0.2)
                except SourceEnded:
                    break
                if frame is None:
                    continue  # no frame yet (a stream reconnecting): keep serving commands
                self.frames += 1
                try:
                    result = self.detector.infer(frame.image)
                except Exception as exc:  # a broken model must not stop the loop; the health check sees it
                    self.inference_errors += 1
                    if self.inference_errors == 1 or self.inference_errors % 100 == 0:
                        log.error("agent.inference_failed", version=self.active_version, error=str(exc),
                                  total=self.inference_errors)
                    result = None
                    self._observe(FrameOutcome.error())
                if result is not None:
                    self.latency.add(result.latency_ms)
                    detections = list(result.detections)
                    self._observe(FrameOutcome.of(d.conf for d in detections))
                    if self.shadow is not None:
                        self.shadow.offer(ShadowItem(frame.image, detections, result.latency_ms, truths_of(frame),
                                                     frame.frame_id, self.active_version))
                    if self.hmi is not None:
                        self.recent_frames.push(frame.frame_id, frame.image, detections, self.active_version,
                                                self.detector.class_names)
                    self.collector.consider(frame, detections, self.active_version)
                    self._drift_frame(frame, detections)
                if self.settings.max_frames and self.frames >= self.settings.max_frames:
                    break
                spare = min_interval - (time.monotonic() - t0)
                if spare > 0:
                    self._stop.wait(spare)
        finally:
            self.close()

    def close(self) -> None:
        if self.hmi is not None:
            self.hmi.stop()
        if self.reader is not None:
            self.reader.close()
        self._end_shadow()
        self.uploader.stop()
        self.mqtt.stop()
        self._bg.shutdown(wait=False, cancel_futures=True)
        self._drop_loading()
        self._loader.shutdown(wait=False, cancel_futures=True)
        self.spool.close()


def _close_loaded(future: Future) -> None:
    """A model loaded for a step that no longer needs it."""
    if not future.cancelled() and future.exception() is None:
        future.result().close()


def shadow_gate_failure(report: dict, max_errors: int, accuracy_tolerance: float) -> str:
    """The device's own gate on a shadow window; '' when it passes."""
    if report["errors"] > max_errors:
        return f"{report['errors']} candidate errors in shadow (at most {max_errors} allowed)"
    active, candidate = report["active_accuracy"], report["candidate_accuracy"]
    if active is not None and candidate is not None and candidate < active - accuracy_tolerance:
        return (f"candidate accuracy {candidate:.2f} is below the active model's {active:.2f} "
                f"on {report['corrected_frames']} corrected frames")
    return ""


def _describe(report: dict) -> str:
    parts = [f"{report['frames_compared']} frames", f"{report['frames_dropped']} dropped"]
    if report.get("frames_skipped_budget"):
        parts.append(f"{report['frames_skipped_budget']} over budget")
    if report["agreement"] is not None:
        parts.append(f"agreement {report['agreement']:.2f}")
    if report["candidate_accuracy"] is not None:
        parts.append(f"accuracy {report['active_accuracy']:.2f} -> {report['candidate_accuracy']:.2f}")
    return ", ".join(parts)
