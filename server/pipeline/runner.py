"""Runs one retrain job through its table of stages (:mod:`server.pipeline.stages`), recording
each stage's state on the job row so that a restarted server resumes it where it stopped.

Nothing another job can see changes before the ``commit`` stage: the snapshot manifest is
written to the object store but its samples stay pending, the bundle carries a version
number the job only reserved. ``commit`` consumes the samples and registers the version in
one transaction; a job that fails anywhere before it leaves the samples for the next job and
the registry as it was.
"""

from __future__ import annotations

import re
import shutil
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog
import yaml
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from firmware_bundles import sha256_file
from protocol.alerts import AlertKind, Severity
from server import audit, metrics, registry
from server.db.models import Device, ModelVersion, TrainingJob, utcnow
from server.ingest import pending_labeled_samples
from server.pipeline.data_gate import CachedStore, DataGate
from server.pipeline.executor import JobFailed
from server.pipeline.gate import GatePolicy, decide
from server.pipeline.snapshot import (
    HistorySelection,
    SnapshotError,
    claim_snapshot,
    freeze_snapshot,
    load_snapshot_manifest,
    materialize,
    materialize_history,
    select_history,
    walk_snapshot_chain,
)
from server.pipeline.stages import (
    DONE,
    FAILED,
    RUNNING,
    SKIPPED,
    STAGE_NAMES,
    STAGES,
    StageInfo,
    done_stages,
    pipeline_state,
)
from server.settings import ServerSettings
from training import synth

log = structlog.get_logger(__name__)


def replay_images(data_yaml: Path, count: int) -> list[Path]:
    """An evenly spaced, deterministic subset of a base dataset's training images."""
    if count <= 0:
        return []
    spec = yaml.safe_load(Path(data_yaml).read_text())
    root = Path(spec.get("path", Path(data_yaml).parent))
    train = spec["train"] if isinstance(spec["train"], list) else [spec["train"]]
    images: list[Path] = []
    for entry in train:
        folder = Path(entry) if Path(entry).is_absolute() else root / entry
        images.extend(sorted(p for p in folder.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"}))
    if len(images) <= count:
        return images
    step = len(images) / count
    return [images[int(i * step)] for i in range(count)]


def write_train_list(root: Path, train: list[Path], name: str = "train.txt") -> Path:
    """Ultralytics reads a split from a text file of image paths: nothing is copied."""
    listing = root / name
    listing.write_text("".join(f"{p.resolve()}\n" for p in train))
    return listing


def device_slices(root: Path, manifest: dict, val_images: list[Path], class_names: list[str]) -> dict[str, str]:
    """One eval set per source device over its share of the new-data split (the gate's bias check)."""
    device_of = {e["id"]: e["device_id"] for e in manifest["samples"]}
    by_device: dict[str, list[Path]] = defaultdict(list)
    for path in val_images:
        by_device[device_of.get(path.stem, "unknown")].append(path)
    sets = {}
    for device, images in sorted(by_device.items()):
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", device)
        listing = write_train_list(root, images, f"val-{safe}.txt")
        sets[f"device:{device}"] = str(synth.write_data_yaml(root, [listing], [listing], class_names,
                                                             filename=f"device-{safe}.yaml"))
    return sets


def fleet_engine_targets(session: Session) -> list[dict]:
    """(compute capability, TensorRT version) pairs the fleet reports: one engine each."""
    targets = set()
    for hw in session.scalars(select(Device.hardware).where(Device.revoked.is_(False))):
        if hw and hw.get("gpu_compute_capability") and hw.get("tensorrt_version"):
            targets.add((hw["gpu_compute_capability"], hw["tensorrt_version"]))
    return [{"gpu_compute_capability": cc, "tensorrt_version": trt, "precision": "fp16"}
            for cc, trt in sorted(targets)]


class _Job:
    """One run of one job: its folder, the outputs of its stages so far, what it holds in memory."""

    def __init__(self, job_id: int, work: Path, attempt: int) -> None:
        self.id, self.work, self.attempt = job_id, work, attempt
        self.outputs: dict[str, dict] = {}
        self.cache: dict[str, bytes] = {}  # image bytes the data gate already read
        self.manifest: dict | None = None
        self.result: dict | None = None  # the executor's result
        self.stage = "start"  # the stage running now


@dataclass(frozen=True)
class Stage:
    """A row of the job's table: what runs, and whether a persisted output may be reused."""

    info: StageInfo
    run: Callable[[_Job], dict]
    reusable: Callable[[_Job, dict], bool] = lambda job, output: True
    #: The runner times it (``train`` is timed by the executor, per step).
    timed: bool = True

    @property
    def name(self) -> str:
        return self.info.name


class RetrainRunner:
    def __init__(
        self,
        settings: ServerSettings,
        session_factory: sessionmaker[Session],
        store,
        executor,
        publisher,
        on_approved: Callable[[int], None] | None = None,
        alerts=None,
    ) -> None:
        self._settings = settings
        self._sessions = session_factory
        self._store = store
        self._executor = executor
        self._publisher = publisher
        self._on_approved = on_approved
        self._alerts = alerts
        self._data_gate = DataGate(settings, store, alerts)
        by_name = {s.name: s for s in STAGES}
        self.stages: tuple[Stage, ...] = (
            Stage(by_name["validate"], self._validate),
            Stage(by_name["snapshot"], self._snapshot, self._snapshot_reusable),
            Stage(by_name["dataset"], self._dataset, self._dataset_reusable),
            Stage(by_name["train"], self._train, self._train_reusable, timed=False),
            Stage(by_name["gate"], self._gate),
            Stage(by_name["bundle"], self._bundle, self._bundle_reusable),
            Stage(by_name["register"], self._register),
            Stage(by_name["commit"], self._commit),
        )
        assert tuple(s.name for s in self.stages) == STAGE_NAMES

    # ------------------------------------------------------------------ helpers

    def _update(self, job_id: int, **fields) -> None:
        with self._sessions() as session:
            job = session.get(TrainingJob, job_id)
            for key, value in fields.items():
                setattr(job, key, value)
            session.commit()

    def _merge_result(self, job_id: int, **fields) -> None:
        with self._sessions() as session:
            job = session.get(TrainingJob, job_id)
            job.result = {**(job.result or {}), **fields}
            session.commit()

    def _set_stage_state(self, job_id: int, name: str, state: dict | None, *, drop_after: bool = False,
                         seconds: float | None = None) -> None:
        """Persist one stage's state (None removes it); ``drop_after`` forgets every later stage."""
        with self._sessions() as session:
            job = session.get(TrainingJob, job_id)
            self._write_stage_state(job, name, state, drop_after=drop_after, seconds=seconds)
            session.commit()

    @staticmethod
    def _write_stage_state(job: TrainingJob, name: str, state: dict | None, *, drop_after: bool = False,
                           seconds: float | None = None) -> None:
        pipeline = pipeline_state(job.result)
        stages = pipeline["stages"]
        if drop_after:
            later = STAGE_NAMES[STAGE_NAMES.index(name) + 1:]
            stages = {k: v for k, v in stages.items() if k not in later}
        if state is None:
            stages.pop(name, None)
        else:
            stages[name] = state
        job.result = {**(job.result or {}), "pipeline": {**pipeline, "stages": stages}}
        if seconds is not None:
            job.stages = {**(job.stages or {}), name: seconds}

    def _alert(self, kind: AlertKind, severity: Severity, message: str, **details) -> None:
        if self._alerts is not None:
            self._alerts.raise_alert(kind, severity, message, subject=details.pop("subject", ""), details=details)

    def _log(self, job_id: int, line: str) -> None:
        with self._sessions() as session:
            job = session.get(TrainingJob, job_id)
            job.log = (job.log + "\n" + line)[-20000:]
            session.commit()

    # ------------------------------------------------------------------ the job

    def run(self, job_id: int) -> None:
        """Run the job from its first stage not done (all of them for a new job)."""
        started = time.monotonic()
        with self._sessions() as session:
            row = session.get(TrainingJob, job_id)
            if row is None or row.status not in {"queued", "running"}:
                log.warning("retrain.not_runnable", job=job_id, status=getattr(row, "status", None))
                return
            state = pipeline_state(row.result)
            done_before = done_stages(row.result)
            resuming = bool(state["stages"])
            attempt = state["attempt"] + 1
            row.status, row.started_at = "running", row.started_at or utcnow()
            row.result = {**(row.result or {}), "pipeline": {**state, "attempt": attempt}}
            session.commit()
        work = self._settings.data_dir / "jobs" / f"{job_id:06d}"
        if work.exists() and not resuming:
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        job = _Job(job_id, work, attempt)
        if resuming:
            self._log(job_id, f"attempt {attempt}: resuming after the stages already done "
                              f"({', '.join(done_before) or 'none'})")
        outcome = "failed"
        try:
            outcome = self._run_stages(job, state["stages"])
        except JobFailed as exc:
            self._fail(job, str(exc))
        except Exception as exc:
            log.exception("retrain.failed", job=job_id)
            self._fail(job, f"{type(exc).__name__}: {exc}")
        except BaseException:
            # The process is going down (SystemExit, KeyboardInterrupt) mid-job: like a crash, the
            # job stays running with its stages' state, and the next start resumes or fails it.
            log.warning("retrain.interrupted", job=job_id, stage=job.stage)
            raise
        self._update(job_id, finished_at=utcnow(), stage="")
        metrics.JOB_SECONDS.labels(outcome=outcome).observe(time.monotonic() - started)
        log.info("retrain.finished", job=job_id, outcome=outcome)
        if outcome in {"succeeded", "rejected"}:
            self._after_commit(job, outcome)

    def _run_stages(self, job: _Job, persisted: dict[str, dict]) -> str:
        rerun = False  # once one stage runs again, every later one does too
        for stage in self.stages:
            previous = persisted.get(stage.name) or {}
            if not rerun and previous.get("status") == SKIPPED:
                job.outputs[stage.name] = previous.get("output") or {}
                continue
            if (not rerun and previous.get("status") == DONE and stage.info.resumable
                    and stage.reusable(job, previous.get("output") or {})):
                job.outputs[stage.name] = previous.get("output") or {}
                continue
            if not rerun and previous:
                self._abandon(job, stage.name, previous)
            if stage.name in {"bundle", "register"} and not job.outputs["gate"]["passed"]:
                self._set_stage_state(job.id, stage.name, {"status": SKIPPED, "output": {}},
                                      drop_after=not rerun)
                job.outputs[stage.name] = {}
                rerun = True
                continue
            self._set_stage_state(job.id, stage.name, {"status": RUNNING}, drop_after=not rerun)
            rerun = True
            job.stage = stage.name
            self._update(job.id, stage=stage.name)
            t0 = time.monotonic()
            output = stage.run(job)
            seconds = round(time.monotonic() - t0, 3)
            if stage.timed:
                metrics.STAGE_SECONDS.labels(stage=stage.name).set(seconds)
            job.outputs[stage.name] = output
            if stage.name == "commit":  # its state was written in the commit's own transaction
                return output["outcome"]
            self._set_stage_state(job.id, stage.name, {"status": DONE, "output": output},
                                  seconds=seconds if stage.timed else None)
        raise AssertionError("the stage table ends with commit")

    def _abandon(self, job: _Job, name: str, previous: dict) -> None:
        """A stage an earlier attempt left running: make sure nothing of it still runs."""
        process = previous.get("process")
        abandon = getattr(self._executor, "abandon", None)
        if name == "train" and process and abandon is not None:
            try:
                abandon(process)
            except Exception as exc:  # the stale run may be long gone
                log.warning("retrain.abandon_failed", job=job.id, error=f"{type(exc).__name__}: {exc}")
        if previous.get("status") == RUNNING:
            self._log(job.id, f"stage {name} was interrupted (attempt {job.attempt - 1}): running it again")

    def _fail(self, job: _Job, reason: str) -> None:
        """The job failed before its commit: its samples stay pending, no version was registered."""
        with self._sessions() as session:
            row = session.get(TrainingJob, job.id)
            if row.status != "running":  # committed after all: a later step failed, not the job
                log.error("retrain.failed_after_commit", job=job.id, error=reason)
                return
            stage = job.stage
            if row.stage and row.stage != stage:  # a step inside the executor: "train (export)"
                stage = f"{stage} ({row.stage})"
            if job.stage in STAGE_NAMES:
                stages = pipeline_state(row.result)["stages"]
                self._write_stage_state(row, job.stage, {**stages.get(job.stage, {}), "status": FAILED,
                                                         "error": reason})
            pending = pending_labeled_samples(session)
            row.status, row.candidate_version = "failed", None  # a reserved version number goes back
            row.result = {**(row.result or {}), "error": reason, "failed_stage": job.stage}
            row.log = (row.log + f"\nfailed at {stage}: {reason}\n"
                       f"nothing was consumed: {pending} validated samples are pending for the next job")[-20000:]
            session.commit()
        self._remove_unregistered_artifacts(job)

    def _remove_unregistered_artifacts(self, job: _Job) -> None:
        """What ``register`` uploaded (all or part) under the number the job had reserved."""
        version = (job.outputs.get("bundle") or {}).get("version")
        if version is None:
            return
        with self._sessions() as session:
            if session.get(ModelVersion, version) is not None:  # registered after all: not ours to remove
                return
        for name in ("model.pt", "model.onnx", "bundle.tar"):
            key = registry.artifact_key(self._settings.model_name, version, name)
            try:
                if self._store.exists(key):
                    self._store.delete(key)
            except Exception as exc:
                log.warning("retrain.cleanup_failed", job=job.id, key=key, error=f"{type(exc).__name__}: {exc}")

    # ------------------------------------------------------------------ stages

    def _validate(self, job: _Job) -> dict:
        with self._sessions() as session:
            checked = self._data_gate.run(session, job.id)
        report = checked.contract
        job.cache = checked.cache
        self._merge_result(job.id, data=checked.as_dict())
        if checked.quarantined:
            self._log(job.id, f"quarantined devices: {', '.join(sorted(checked.quarantined))}")
        self._log(job.id, f"data contract: {len(report.accepted)} accepted, {len(report.rejected)} rejected "
                          f"of {report.checked}" + (f"; {'; '.join(report.class_warnings)}"
                                                     if report.class_warnings else ""))
        if report.halted:
            self._merge_result(job.id, halted={"reason": report.halt_reason, "rejected": report.rejected,
                                               "resolved": None})
            self._alert(AlertKind.DATA_CONTRACT_HALT, Severity.CRITICAL, f"retrain job {job.id} halted: "
                        f"{report.halt_reason}", subject=f"job {job.id}", job_id=job.id,
                        reject_reasons=report.reject_reasons)
            raise JobFailed(f"data contract: {report.halt_reason}")
        # The snapshot freezes these only: a sample that arrives later has not met the contract.
        return {"accepted": list(report.accepted), "rejected": len(report.rejected),
                "quarantined": sorted(checked.quarantined)}

    def _snapshot(self, job: _Job) -> dict:
        with self._sessions() as session:
            prod = registry.production(session)
            if prod is None:
                raise JobFailed("no production model to fine-tune from: register a seed model first")
            frozen = freeze_snapshot(session, self._store, prod.snapshot_id or None,
                                     only=job.outputs["validate"]["accepted"])
            if frozen is None:
                raise JobFailed("no new validated, labeled samples since the last snapshot")
            snapshot_id, manifest = frozen
            session.get(TrainingJob, job.id).snapshot_id = snapshot_id
            session.commit()
            output = {"id": snapshot_id, "parent_id": manifest["parent"], "sample_count": len(manifest["samples"]),
                      "devices": sorted({e["device_id"] for e in manifest["samples"]}),
                      "production_version": prod.version, "production_pt_key": prod.pt_key}
        job.manifest = manifest
        self._log(job.id, f"snapshot {snapshot_id[:12]}: {output['sample_count']} samples from "
                          f"{len(output['devices'])} devices, parent {output['parent_id']} (pending until commit)")
        return output

    def _snapshot_reusable(self, job: _Job, output: dict) -> bool:
        try:
            job.manifest = load_snapshot_manifest(self._store, output["id"])
        except SnapshotError as exc:
            self._log(job.id, f"snapshot {output['id'][:12]} cannot be reused: {exc}")
            return False
        return True

    def _dataset(self, job: _Job) -> dict:
        s, policy = self._settings, self._settings.training
        snap = job.outputs["snapshot"]
        if job.manifest is None:
            job.manifest = load_snapshot_manifest(self._store, snap["id"])
        root = job.work / "data"
        if root.exists():  # an interrupted attempt's half-written copy
            shutil.rmtree(root)
        store = CachedStore(self._store, job.cache)
        dataset = materialize(store, job.manifest, root, policy.val_fraction)
        history = self._history(job.manifest)
        history_train, history_val = materialize_history(store, history, root / "history")
        replay = []
        if s.replay_data:  # as a multiple of all the line data trained on, new and history alike
            replay = replay_images(s.replay_data,
                                   int((len(dataset.train_images) + len(history_train)) * policy.replay_ratio))
        data_yaml = synth.write_data_yaml(
            root, [write_train_list(root, dataset.train_images + history_train + replay)], [dataset.val_dir],
            s.class_names)
        new_data_yaml = synth.write_data_yaml(root, [dataset.val_dir], [dataset.val_dir], s.class_names,
                                              filename="new_data.yaml")
        prod_pt = job.work / "production.pt"
        self._store.download_file(snap["production_pt_key"], prod_pt)
        eval_sets = {"golden": str(s.eval_sets["golden"]), "new_data": str(new_data_yaml)}
        eval_sets.update({k: str(v) for k, v in s.eval_sets.items() if k != "golden"})
        if history_val:  # earlier snapshots' held-out samples: does the candidate still hold them?
            listing = write_train_list(root, history_val, "history-val.txt")
            eval_sets["history"] = str(synth.write_data_yaml(root, [listing], [listing], s.class_names,
                                                             filename="history.yaml"))
        if len(snap["devices"]) > 1:  # with one source device its slice is the new-data split itself
            eval_sets.update(device_slices(root, job.manifest, dataset.val_images, s.class_names))
        summary = history.summary()
        self._log(job.id, f"dataset: {len(dataset.train_images)} new train + {len(history_train)} history from "
                          f"{sum(1 for p in summary['snapshots'] if p['train'] or p['val'])} snapshots + "
                          f"{len(replay)} replayed; {len(dataset.val_images)} new-data val, "
                          f"{len(history_val)} history val (cap {policy.history_max_images})")
        self._merge_result(job.id, history=summary)
        return {"data_yaml": str(data_yaml), "production_pt": str(prod_pt), "eval_sets": eval_sets,
                "train_images": len(dataset.train_images), "replay_images": len(replay),
                "val_images": len(dataset.val_images), "history_images": len(history_train),
                "history_val_images": len(history_val), "history": summary}

    def _history(self, manifest: dict) -> HistorySelection:
        """The earlier snapshots' samples this job trains on too (the parent chain, capped)."""
        policy = self._settings.training
        if policy.history_max_images <= 0 or not manifest.get("parent"):
            return HistorySelection((), policy.history_max_images, policy.history_max_snapshots)
        try:
            chain, truncated = walk_snapshot_chain(lambda sid: load_snapshot_manifest(self._store, sid),
                                                   manifest["parent"], policy.history_max_snapshots)
        except SnapshotError as exc:
            raise JobFailed(f"{exc}; the samples stay pending (EDGELOOP_TRAIN_HISTORY_MAX_IMAGES=0 trains "
                            "without history)") from None
        return select_history(chain, max_images=policy.history_max_images, val_fraction=policy.val_fraction,
                              exclude={e["id"] for e in manifest["samples"]},
                              max_snapshots=policy.history_max_snapshots, truncated=truncated)

    def _dataset_reusable(self, job: _Job, output: dict) -> bool:
        return Path(output["data_yaml"]).is_file() and Path(output["production_pt"]).is_file()

    def _train(self, job: _Job) -> dict:
        s, policy, data = self._settings, self._settings.training, job.outputs["dataset"]
        out = job.work / "out"
        if out.exists():  # an interrupted attempt's outputs: train from the start again
            shutil.rmtree(out)
        with self._sessions() as session:
            engine_targets = fleet_engine_targets(session)
        spec = {
            "base_weights": data["production_pt"], "data_yaml": data["data_yaml"], "out_dir": str(out),
            "imgsz": policy.imgsz, "finetune": policy.finetune_params(), "eval_sets": data["eval_sets"],
            "onnx_eval_sets": ["golden", "new_data"], "engine_targets": engine_targets,
            "production_weights": data["production_pt"], "config_dir": str((s.data_dir / "ultralytics").resolve()),
            "eval_cache_dir": str((s.data_dir / "eval-cache").resolve()),
        }

        def on_event(event: dict) -> None:
            kind = event.get("event")
            if kind == "started":  # where the run is, so a restart can end it before running it again
                self._set_stage_state(job.id, "train", {"status": RUNNING, "process": event})
            elif kind == "stage":
                self._update(job.id, stage=event["stage"])
            elif kind == "epoch":
                epoch, epochs, seconds = event["epoch"], event["epochs"], event.get("seconds")
                # ETA from the mean epoch time so far: epochs here are of equal size.
                eta = round(seconds / epoch * (epochs - epoch), 1) if seconds and epoch else None
                self._update(job.id, progress={"epoch": epoch, "epochs": epochs, "losses": event.get("losses", {}),
                                               "seconds": seconds, "eta_seconds": eta})
            elif kind in {"evaluated", "error"}:
                self._log(job.id, str(event))

        t0 = time.monotonic()
        result = self._executor.run(spec, job.work, on_event)
        self._update(job.id, stage="train")
        missing = [k for k in ("best_pt", "onnx") if not result.get(k) or not Path(result[k]).is_file()]
        if result.get("int8_onnx") and not Path(result["int8_onnx"]).is_file():
            missing.append("int8_onnx")
        if missing:
            raise JobFailed(f"the executor's result names outputs that are not there: {', '.join(missing)}")
        with self._sessions() as session:
            row = session.get(TrainingJob, job.id)
            row.stages = {**row.stages, **{k: round(v, 3) for k, v in result["stages"].items()}}
            session.commit()
        self._log(job.id, f"executor finished in {time.monotonic() - t0:.1f}s")
        for build in result.get("engines", []):
            self._log(job.id, f"engine {build['target']}: {build['status']} {build.get('reason', '')}".rstrip())
        job.result = result
        return {"result": result}

    def _train_reusable(self, job: _Job, output: dict) -> bool:
        result = output.get("result") or {}
        files = [result.get("best_pt"), result.get("onnx"), result.get("int8_onnx") or None]
        if not result.get("best_pt") or not all(Path(f).is_file() for f in files if f):
            return False
        job.result = result
        return True

    def _gate(self, job: _Job) -> dict:
        policy = self._settings.training
        result = job.outputs["train"]["result"]
        candidate, production = result["metrics"]["candidate"], result["metrics"]["production"]
        decision = decide(candidate, production, GatePolicy(
            policy.golden_tolerance, policy.min_new_data_gain, max_recall_drop=policy.max_recall_drop,
            artifact_tolerance=policy.artifact_tolerance, min_slice_instances=policy.min_slice_instances))
        if not decision.passed:
            self._log(job.id, "gate failed: " + "; ".join(decision.reasons))
        return decision.as_dict()

    def _bundle(self, job: _Job) -> dict:
        s, policy = self._settings, self._settings.training
        snap, result = job.outputs["snapshot"], job.outputs["train"]["result"]
        with self._sessions() as session:
            row = session.get(TrainingJob, job.id)
            version = row.candidate_version
            if version is None or session.get(ModelVersion, version) is not None:
                row.candidate_version = None
                session.flush()
                version = registry.next_version(session)  # counts numbers other running jobs reserved
                row.candidate_version = version
            session.commit()
        candidate = result["metrics"]["candidate"]
        int8 = Path(result["int8_onnx"]) if result.get("int8_onnx") else None
        bundle_path, bundle_sha, bundle_size = self._publisher.build(
            onnx=Path(result["onnx"]), int8_onnx=int8, version=version, out=job.work / "bundle.tar",
            imgsz=policy.imgsz,
            lineage={"snapshot_id": snap["id"], "parent_version": snap["production_version"],
                     "job_id": str(job.id), "model_name": s.model_name},
            metrics={f"{k}.{m}": v[m] for k, v in candidate.items() for m in ("map50", "map50_95")},
        )
        return {"version": version, "path": str(bundle_path), "sha256": bundle_sha, "size": bundle_size}

    def _bundle_reusable(self, job: _Job, output: dict) -> bool:
        path = Path(output.get("path", ""))
        if not path.is_file() or sha256_file(path) != output.get("sha256"):
            return False
        with self._sessions() as session:  # the number it carries must still be this job's
            row = session.get(TrainingJob, job.id)
            return row.candidate_version == output["version"] and session.get(ModelVersion, output["version"]) is None

    def _register(self, job: _Job) -> dict:
        bundle, result = job.outputs["bundle"], job.outputs["train"]["result"]
        keys = self._publisher.upload(bundle["version"], pt=Path(result["best_pt"]), onnx=Path(result["onnx"]),
                                      bundle=Path(bundle["path"]))
        # None when no OCI registry is configured or the push failed (logged, counted; the version stays).
        return {"keys": keys, "oci_image": self._publisher.push_oci(bundle["version"], Path(bundle["path"]))}

    def _commit(self, job: _Job) -> dict:
        """The commit point, one transaction: the snapshot is recorded and its samples consumed, the
        version registered (candidate or production, or kept as rejected), and the job finished."""
        s, policy = self._settings, self._settings.training
        snap, result, gate = job.outputs["snapshot"], job.outputs["train"]["result"], job.outputs["gate"]
        if job.manifest is None:
            job.manifest = load_snapshot_manifest(self._store, snap["id"])
        candidate, production = result["metrics"]["candidate"], result["metrics"]["production"]
        passed = bool(gate["passed"])
        artifacts = {"export": result.get("export", {}), "engines": result.get("engines", []),
                     "int8": result.get("int8", {})}
        hyper = {**result["hyperparameters"], "environment": result["environment"],
                 "replay_ratio": policy.replay_ratio, "val_fraction": policy.val_fraction,
                 "history": job.outputs["dataset"].get("history")}  # earlier snapshots it also trained on
        with self._sessions() as session:
            row = session.get(TrainingJob, job.id)
            if row.status != "running":
                raise JobFailed(f"job is {row.status}, not running: it cannot commit")
            prod = registry.production(session)
            if prod is None or prod.version != snap["production_version"]:
                now = prod.version if prod else None
                raise JobFailed(f"production changed from version {snap['production_version']} to {now} while "
                                "the job ran: its gate compared against a model that is no longer production")
            if passed:
                version = job.outputs["bundle"]["version"]
                if row.candidate_version != version or session.get(ModelVersion, version) is not None:
                    raise JobFailed(f"version {version} was taken while the job ran")
            else:
                version = registry.next_version(session)
            snapshot = claim_snapshot(session, snap["id"], job.manifest)
            mv = ModelVersion(
                version=version, name=s.model_name, status="candidate" if passed else "rejected",
                parent_version=snap["production_version"], snapshot_id=snapshot.id, job_id=job.id,
                metrics=candidate, hyperparameters=hyper, gate={**gate, "production_metrics": production},
                class_names=s.class_names, imgsz=policy.imgsz, reason="; ".join(gate["reasons"]),
                artifacts=artifacts,
            )
            session.add(mv)
            automatic = passed and policy.approval == "auto"
            if passed:
                for key, value in job.outputs["register"]["keys"].items():
                    setattr(mv, key, value)
                mv.bundle_sha256, mv.bundle_size = job.outputs["bundle"]["sha256"], job.outputs["bundle"]["size"]
                mv.oci_image = job.outputs["register"].get("oci_image")
            session.flush()
            if automatic:
                # With auto-deploy the rollout makes it production when it completes.
                registry.approve(session, version, "policy:auto", promote_now=not s.auto_deploy)
                audit.record(session, "policy:auto", "model.approve", f"version:{version}", "pipeline",
                             reason="gate passed; approval policy is automatic")
            elif passed:
                registry.set_alias(session, registry.CANDIDATE, version, actor="pipeline",
                                   reason=f"job {job.id} passed its gate")
            outcome = "succeeded" if passed else "rejected"
            row.status, row.candidate_version = outcome, version
            row.result = {**(row.result or {}), "gate": gate, "metrics": result["metrics"]}
            self._write_stage_state(row, "commit", {"status": DONE, "output": {
                "outcome": outcome, "version": version, "samples": snap["sample_count"],
                "automatic": automatic}})
            session.commit()
        return {"outcome": outcome, "version": version, "automatic": automatic}

    def _after_commit(self, job: _Job, outcome: str) -> None:
        """Logs, alerts and the promotion hook: after the commit, so none of them can undo it."""
        commit, gate = job.outputs["commit"], job.outputs["gate"]
        version = commit["version"]
        try:
            self._log(job.id, f"consumed {job.outputs['snapshot']['sample_count']} samples into snapshot "
                              f"{job.outputs['snapshot']['id'][:12]}")
            if outcome == "rejected":
                self._alert(AlertKind.MODEL_REJECTED, Severity.WARNING,
                            f"candidate version {version} rejected: " + "; ".join(gate["reasons"]),
                            subject=f"model {version}", version=version, job_id=job.id, gate=gate)
                return
            if not commit["automatic"]:
                self._log(job.id, f"registered version {version} as candidate, awaiting an operator's approval")
                return
            self._log(job.id, f"registered version {version} as "
                              + ("approved; it becomes production when its rollout completes"
                                 if self._settings.auto_deploy else "production"))
            if self._on_approved is not None:
                self._on_approved(version)
        except Exception:
            log.exception("retrain.after_commit_failed", job=job.id, version=version)
