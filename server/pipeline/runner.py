"""Runs one retrain job end to end and records every stage on the job row."""

from __future__ import annotations

import re
import shutil
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import structlog
import yaml
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from protocol.alerts import AlertKind, Severity
from server import audit, metrics, registry
from server.db.models import Device, ModelVersion, Snapshot, TrainingJob, utcnow
from server.pipeline.data_gate import CachedStore, DataGate
from server.pipeline.executor import JobFailed
from server.pipeline.gate import GatePolicy, decide
from server.pipeline.snapshot import build_snapshot, materialize
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


class RetrainRunner:
    def __init__(
        self,
        settings: ServerSettings,
        session_factory: sessionmaker[Session],
        store,
        executor,
        publisher,
        on_promoted: Callable[[int], None] | None = None,
        alerts=None,
    ) -> None:
        self._settings = settings
        self._sessions = session_factory
        self._store = store
        self._executor = executor
        self._publisher = publisher
        self._on_promoted = on_promoted
        self._alerts = alerts
        self._data_gate = DataGate(settings, store, alerts)

    # ------------------------------------------------------------------ helpers

    def _update(self, job_id: int, **fields) -> None:
        with self._sessions() as session:
            job = session.get(TrainingJob, job_id)
            for key, value in fields.items():
                setattr(job, key, value)
            session.commit()

    @contextmanager
    def _stage(self, job_id: int, name: str):
        self._update(job_id, stage=name)
        t0 = time.monotonic()
        yield
        seconds = round(time.monotonic() - t0, 3)
        with self._sessions() as session:
            job = session.get(TrainingJob, job_id)
            job.stages = {**job.stages, name: seconds}
            session.commit()
        metrics.STAGE_SECONDS.labels(stage=name).set(seconds)

    def _merge_result(self, job_id: int, **fields) -> None:
        with self._sessions() as session:
            job = session.get(TrainingJob, job_id)
            job.result = {**(job.result or {}), **fields}
            session.commit()

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
        started = time.monotonic()
        self._update(job_id, status="running", started_at=utcnow())
        work = self._settings.data_dir / "jobs" / f"{job_id:06d}"
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
        outcome = "failed"
        try:
            outcome = self._run(job_id, work)
        except JobFailed as exc:
            self._update(job_id, status="failed")
            self._merge_result(job_id, error=str(exc))
            self._log(job_id, f"failed: {exc}")
        except Exception as exc:
            log.exception("retrain.failed", job=job_id)
            self._update(job_id, status="failed")
            self._merge_result(job_id, error=f"{type(exc).__name__}: {exc}")
            self._log(job_id, f"failed: {type(exc).__name__}: {exc}")
        finally:
            self._update(job_id, finished_at=utcnow(), stage="")
            metrics.JOB_SECONDS.labels(outcome=outcome).observe(time.monotonic() - started)
            log.info("retrain.finished", job=job_id, outcome=outcome)

    def _validate(self, job_id: int):
        with self._stage(job_id, "validate"), self._sessions() as session:
            checked = self._data_gate.run(session, job_id)
        report = checked.contract
        self._merge_result(job_id, data=checked.as_dict())
        if checked.quarantined:
            self._log(job_id, f"quarantined devices: {', '.join(sorted(checked.quarantined))}")
        self._log(job_id, f"data contract: {len(report.accepted)} accepted, {len(report.rejected)} rejected "
                          f"of {report.checked}" + (f"; {'; '.join(report.class_warnings)}"
                                                     if report.class_warnings else ""))
        if report.halted:
            self._alert(AlertKind.DATA_CONTRACT_HALT, Severity.CRITICAL, f"retrain job {job_id} halted: "
                        f"{report.halt_reason}", subject=f"job {job_id}", job_id=job_id,
                        reject_reasons=report.reject_reasons)
            raise JobFailed(f"data contract: {report.halt_reason}")
        return checked

    def _run(self, job_id: int, work: Path) -> str:
        s, policy = self._settings, self._settings.training
        checked = self._validate(job_id)
        with self._stage(job_id, "snapshot"), self._sessions() as session:
            prod = registry.production(session)
            if prod is None:
                raise JobFailed("no production model to fine-tune from: register a seed model first")
            parent = session.get(Snapshot, prod.snapshot_id) if prod.snapshot_id else None
            built = build_snapshot(session, self._store, parent.id if parent else None)
            if built is None:
                raise JobFailed("no new validated, labeled samples since the last snapshot")
            snapshot, manifest = built
            job = session.get(TrainingJob, job_id)
            job.snapshot_id = snapshot.id
            session.commit()
            prod_version, prod_pt_key = prod.version, prod.pt_key
            self._log(job_id, f"snapshot {snapshot.id[:12]}: {snapshot.sample_count} samples "
                              f"from {len(snapshot.devices)} devices, parent {snapshot.parent_id}")

        with self._stage(job_id, "dataset"):
            dataset = materialize(CachedStore(self._store, checked.cache), manifest, work / "data",
                                  policy.val_fraction)
            replay = []
            if s.replay_data:
                replay = replay_images(s.replay_data, int(len(dataset.train_images) * policy.replay_ratio))
            root = work / "data"
            data_yaml = synth.write_data_yaml(root, [write_train_list(root, dataset.train_images + replay)],
                                              [dataset.val_dir], s.class_names)
            new_data_yaml = synth.write_data_yaml(root, [dataset.val_dir], [dataset.val_dir], s.class_names,
                                                  filename="new_data.yaml")
            prod_pt = work / "production.pt"
            self._store.download_file(prod_pt_key, prod_pt)
            self._log(job_id, f"dataset: {len(dataset.train_images)} new train + {len(replay)} replayed, "
                              f"{len(dataset.val_images)} new-data val")

        eval_sets = {"golden": str(s.eval_sets["golden"]), "new_data": str(new_data_yaml)}
        eval_sets.update({k: str(v) for k, v in s.eval_sets.items() if k != "golden"})
        if len(snapshot.devices) > 1:  # with one source device its slice is the new-data split itself
            eval_sets.update(device_slices(work / "data", manifest, dataset.val_images, s.class_names))
        with self._sessions() as session:
            engine_targets = fleet_engine_targets(session)
        spec = {
            "base_weights": str(prod_pt), "data_yaml": str(data_yaml), "out_dir": str(work / "out"),
            "imgsz": policy.imgsz, "finetune": policy.finetune_params(), "eval_sets": eval_sets,
            "onnx_eval_sets": ["golden", "new_data"], "engine_targets": engine_targets,
            "production_weights": str(prod_pt), "config_dir": str((s.data_dir / "ultralytics").resolve()),
            "eval_cache_dir": str((s.data_dir / "eval-cache").resolve()),
        }

        def on_event(event: dict) -> None:
            kind = event.get("event")
            if kind == "stage":
                self._update(job_id, stage=event["stage"])
            elif kind == "epoch":
                epoch, epochs, seconds = event["epoch"], event["epochs"], event.get("seconds")
                # ETA from the mean epoch time so far: epochs here are of equal size.
                eta = round(seconds / epoch * (epochs - epoch), 1) if seconds and epoch else None
                self._update(job_id, progress={"epoch": epoch, "epochs": epochs, "losses": event.get("losses", {}),
                                               "seconds": seconds, "eta_seconds": eta})
            elif kind in {"evaluated", "error"}:
                self._log(job_id, str(event))

        t0 = time.monotonic()
        result = self._executor.run(spec, work, on_event)
        with self._sessions() as session:
            job = session.get(TrainingJob, job_id)
            job.stages = {**job.stages, **{k: round(v, 3) for k, v in result["stages"].items()}}
            session.commit()
        self._log(job_id, f"executor finished in {time.monotonic() - t0:.1f}s")

        candidate, production = result["metrics"]["candidate"], result["metrics"]["production"]
        with self._stage(job_id, "gate"):
            decision = decide(candidate, production, GatePolicy(
                policy.golden_tolerance, policy.min_new_data_gain, max_recall_drop=policy.max_recall_drop,
                artifact_tolerance=policy.artifact_tolerance, min_slice_instances=policy.min_slice_instances))
        artifacts = {"export": result.get("export", {}), "engines": result.get("engines", []),
                     "int8": result.get("int8", {})}
        for build in artifacts["engines"]:
            self._log(job_id, f"engine {build['target']}: {build['status']} {build.get('reason', '')}".rstrip())
        hyper = {**result["hyperparameters"], "environment": result["environment"],
                 "replay_ratio": policy.replay_ratio, "val_fraction": policy.val_fraction}
        with self._sessions() as session:
            version = registry.next_version(session)
            mv = ModelVersion(
                version=version, name=s.model_name, status="candidate", parent_version=prod_version,
                snapshot_id=snapshot.id, job_id=job_id, metrics=candidate, hyperparameters=hyper,
                gate={**decision.as_dict(), "production_metrics": production}, class_names=s.class_names,
                imgsz=policy.imgsz, reason="; ".join(decision.reasons), artifacts=artifacts,
            )
            session.add(mv)
            session.commit()
        if not decision.passed:
            with self._sessions() as session:
                session.get(ModelVersion, version).status = "rejected"
                job = session.get(TrainingJob, job_id)
                job.status, job.candidate_version = "rejected", version
                job.result = {**(job.result or {}), "gate": decision.as_dict(), "metrics": result["metrics"]}
                session.commit()
            self._log(job_id, "gate failed: " + "; ".join(decision.reasons))
            self._alert(AlertKind.MODEL_REJECTED, Severity.WARNING,
                        f"candidate version {version} rejected: " + "; ".join(decision.reasons),
                        subject=f"model {version}", version=version, job_id=job_id, gate=decision.as_dict())
            return "rejected"

        with self._stage(job_id, "bundle"):
            int8 = Path(result["int8_onnx"]) if result.get("int8_onnx") else None
            bundle_path, bundle_sha, bundle_size = self._publisher.build(
                onnx=Path(result["onnx"]), int8_onnx=int8, version=version, out=work / "bundle.tar",
                imgsz=policy.imgsz,
                lineage={"snapshot_id": snapshot.id, "parent_version": prod_version, "job_id": str(job_id),
                         "model_name": s.model_name},
                metrics={f"{k}.{m}": v[m] for k, v in candidate.items() for m in ("map50", "map50_95")},
            )
        with self._stage(job_id, "register"):
            keys = self._publisher.upload(version, pt=Path(result["best_pt"]), onnx=Path(result["onnx"]),
                                          bundle=bundle_path)
            with self._sessions() as session:
                mv = session.get(ModelVersion, version)
                for key, value in keys.items():
                    setattr(mv, key, value)
                mv.bundle_sha256, mv.bundle_size = bundle_sha, bundle_size
                automatic = policy.approval == "auto"
                if automatic:
                    registry.approve(session, version, "policy:auto")
                    audit.record(session, "policy:auto", "model.approve", f"version:{version}", "pipeline",
                                 reason="gate passed; approval policy is automatic")
                else:
                    registry.set_alias(session, registry.CANDIDATE, version)
                job = session.get(TrainingJob, job_id)
                job.status, job.candidate_version = "succeeded", version
                job.result = {**(job.result or {}), "gate": decision.as_dict(), "metrics": result["metrics"]}
                session.commit()
        if not automatic:
            self._log(job_id, f"registered version {version} as candidate, awaiting an operator's approval")
            return "succeeded"
        self._log(job_id, f"registered version {version} as production")
        if self._on_promoted is not None:
            self._on_promoted(version)
        return "succeeded"
