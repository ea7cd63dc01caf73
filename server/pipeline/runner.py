"""Runs one retrain job end to end and records every stage on the job row."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import structlog
import yaml
from sqlalchemy.orm import Session, sessionmaker

from server import metrics, registry
from server.db.models import ModelVersion, Snapshot, TrainingJob, utcnow
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


def write_train_list(root: Path, train: list[Path]) -> Path:
    """Ultralytics reads a split from a text file of image paths: nothing is copied."""
    listing = root / "train.txt"
    listing.write_text("".join(f"{p.resolve()}\n" for p in train))
    return listing


class RetrainRunner:
    def __init__(
        self,
        settings: ServerSettings,
        session_factory: sessionmaker[Session],
        store,
        executor,
        publisher,
        on_promoted: Callable[[int], None] | None = None,
    ) -> None:
        self._settings = settings
        self._sessions = session_factory
        self._store = store
        self._executor = executor
        self._publisher = publisher
        self._on_promoted = on_promoted

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
            self._update(job_id, status="failed", result={"error": str(exc)})
            self._log(job_id, f"failed: {exc}")
        except Exception as exc:
            log.exception("retrain.failed", job=job_id)
            self._update(job_id, status="failed", result={"error": f"{type(exc).__name__}: {exc}"})
            self._log(job_id, f"failed: {type(exc).__name__}: {exc}")
        finally:
            self._update(job_id, finished_at=utcnow(), stage="")
            metrics.JOB_SECONDS.labels(outcome=outcome).observe(time.monotonic() - started)
            log.info("retrain.finished", job=job_id, outcome=outcome)

    def _run(self, job_id: int, work: Path) -> str:
        s, policy = self._settings, self._settings.training
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
            dataset = materialize(self._store, manifest, work / "data", policy.val_fraction)
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
        spec = {
            "base_weights": str(prod_pt), "data_yaml": str(data_yaml), "out_dir": str(work / "out"),
            "imgsz": policy.imgsz, "finetune": policy.finetune_params(), "eval_sets": eval_sets,
            "production_weights": str(prod_pt), "config_dir": str((s.data_dir / "ultralytics").resolve()),
        }

        def on_event(event: dict) -> None:
            kind = event.get("event")
            if kind == "stage":
                self._update(job_id, stage=event["stage"])
            elif kind == "epoch":
                self._update(job_id, progress={"epoch": event["epoch"], "epochs": event["epochs"],
                                               "losses": event.get("losses", {}), "seconds": event.get("seconds")})
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
            decision = decide(candidate, production,
                              GatePolicy(policy.golden_tolerance, policy.min_new_data_gain))
        hyper = {**result["hyperparameters"], "environment": result["environment"],
                 "replay_ratio": policy.replay_ratio, "val_fraction": policy.val_fraction}
        with self._sessions() as session:
            version = registry.next_version(session)
            mv = ModelVersion(
                version=version, name=s.model_name, status="candidate", parent_version=prod_version,
                snapshot_id=snapshot.id, job_id=job_id, metrics=candidate, hyperparameters=hyper,
                gate={**decision.as_dict(), "production_metrics": production}, class_names=s.class_names,
                imgsz=policy.imgsz, reason="; ".join(decision.reasons),
            )
            session.add(mv)
            session.commit()
        if not decision.passed:
            with self._sessions() as session:
                session.get(ModelVersion, version).status = "rejected"
                job = session.get(TrainingJob, job_id)
                job.status, job.candidate_version = "rejected", version
                job.result = {"gate": decision.as_dict(), "metrics": result["metrics"]}
                session.commit()
            self._log(job_id, "gate failed: " + "; ".join(decision.reasons))
            return "rejected"

        with self._stage(job_id, "bundle"):
            bundle_path, bundle_sha, bundle_size = self._publisher.build(
                onnx=Path(result["onnx"]), version=version, out=work / "bundle.tar", imgsz=policy.imgsz,
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
                registry.promote(session, version)  # approval policy: automatic when the gate passes
                job = session.get(TrainingJob, job_id)
                job.status, job.candidate_version = "succeeded", version
                job.result = {"gate": decision.as_dict(), "metrics": result["metrics"]}
                session.commit()
        self._log(job_id, f"registered version {version} as production")
        if self._on_promoted is not None:
            self._on_promoted(version)
        return "succeeded"
