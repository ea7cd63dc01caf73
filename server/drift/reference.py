"""Drift references in the registry: one per model version, computed once, stored beside the
version's artifacts (``models/<name>/<version>/drift_reference.json``) with a ``drift_references`` row.

A version's reference is computed from the data it was trained for, by the version's own weights:

* ``base`` -- the replayed base data (``settings.replay_data``), else the golden set: what the
  seed learned and every fine-tune replays;
* ``new`` -- the images of its dataset snapshot chain (the samples the devices sent), when it has one.

The computation (``python -m training.drift_reference``) runs in a subprocess, so torch never
loads into the server, on a single background worker: the first drift report of a version without
a reference queues it, and reports are stored unscored until it is ready.
"""

from __future__ import annotations

import queue
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import structlog
from sqlalchemy.orm import Session, sessionmaker

from edge_agent.drift_stats import STATS_VERSION
from server import registry
from server.db.models import DriftReference as ReferenceRow
from server.db.models import ModelVersion, utcnow
from server.drift.policy import Component
from server.pipeline.snapshot import rebuild_snapshot
from server.settings import ServerSettings
from training.drift_reference import DriftReference

log = structlog.get_logger(__name__)

REFERENCE_FILE = "drift_reference.json"


def components_of(reference: DriftReference) -> dict[str, Component]:
    return {name: Component(frames=c.frames, histograms={k: (h.edges, h.counts) for k, h in c.histograms.items()})
            for name, c in reference.components.items()}


class NoReferenceInputs(ValueError):
    """A reference cannot be computed for this version (no weights, no data): a fact, not a fault."""


class ReferenceService:
    def __init__(self, sessions: sessionmaker[Session], store, settings: ServerSettings, *,
                 python: str = sys.executable, timeout_seconds: int = 1800) -> None:
        self._sessions = sessions
        self._store = store
        self._settings = settings
        self._python = python
        self._timeout = timeout_seconds
        self._cache: dict[int, DriftReference] = {}
        self._queue: queue.Queue[int] = queue.Queue()
        self._queued: set[int] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ reading

    def get(self, version: int) -> DriftReference | None:
        """The version's reference when it is ready (cached after the first read)."""
        if version in self._cache:
            return self._cache[version]
        with self._sessions() as session:
            row = session.get(ReferenceRow, version)
            if row is None or row.status != "ready" or row.stats_version != STATS_VERSION:
                return None
            key = row.object_key
        reference = DriftReference.from_json(self._store.get_bytes(key, max_bytes=64 * 1024 * 1024))
        self._cache[version] = reference
        return reference

    def status(self, version: int) -> str | None:
        with self._sessions() as session:
            row = session.get(ReferenceRow, version)
            return row.status if row is not None else None

    # ------------------------------------------------------------------ writing

    def save(self, version: int, reference: DriftReference) -> str:
        """Store a computed reference for ``version`` (object store first, then the row)."""
        key = registry.artifact_key(self._settings.model_name, version, REFERENCE_FILE)
        self._store.put_bytes(key, reference.to_json(), "application/json")
        with self._sessions() as session:
            row = session.get(ReferenceRow, version) or ReferenceRow(model_version=version)
            row.status, row.object_key, row.frames = "ready", key, reference.frames
            row.stats_version, row.error, row.created_at = reference.stats_version, "", utcnow()
            row.source = {**reference.source, "components": {k: c.frames for k, c in reference.components.items()}}
            session.merge(row)
            session.commit()
        self._cache[version] = reference
        log.info("drift.reference_saved", version=version, frames=reference.frames,
                 components=list(reference.components))
        return key

    def _mark(self, version: int, status: str, error: str = "") -> None:
        with self._sessions() as session:
            row = session.get(ReferenceRow, version) or ReferenceRow(model_version=version)
            row.status, row.error = status, error[-4000:]
            session.merge(row)
            session.commit()

    # ------------------------------------------------------------------ building

    def request(self, version: int, *, force: bool = False) -> bool:
        """Queue the version's reference unless it exists, is being built, or failed (``force``
        rebuilds anyway). True when queued."""
        with self._lock:
            if version in self._queued:
                return False
            with self._sessions() as session:
                row = session.get(ReferenceRow, version)
                # A reference of other statistics (older STATS_VERSION) is rebuilt, never compared.
                done = row is not None and (row.status == "failed" or (
                    row.status == "ready" and row.stats_version == STATS_VERSION))
            if done and not force:
                return False
            self._queued.add(version)
        self._cache.pop(version, None)
        self._mark(version, "building")
        self._queue.put(version)
        self._ensure_worker()
        return True

    def _ensure_worker(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._work, name="drift-reference", daemon=True)
            self._thread.start()

    def _work(self) -> None:
        while True:
            try:
                version = self._queue.get(timeout=30)
            except queue.Empty:
                return
            try:
                self.build(version)
            except NoReferenceInputs as exc:  # marked failed with its reason; no traceback in the log
                log.warning("drift.reference_unavailable", version=version, reason=str(exc))
                self._mark(version, "failed", f"{type(exc).__name__}: {exc}")
            except Exception as exc:
                log.exception("drift.reference_failed", version=version)
                self._mark(version, "failed", f"{type(exc).__name__}: {exc}")
            finally:
                with self._lock:
                    self._queued.discard(version)
                self._queue.task_done()

    def wait_idle(self, timeout: float = 600.0) -> bool:
        """Tests and benchmarks: wait until every queued reference is built or failed."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.05)
        return not self._queue.unfinished_tasks

    def build(self, version: int) -> DriftReference:
        """Compute and store the version's reference now (in a subprocess)."""
        s = self._settings
        with self._sessions() as session:
            mv = session.get(ModelVersion, version)
            if mv is None or not mv.pt_key:
                raise NoReferenceInputs(f"model version {version} has no stored weights")
            pt_key, snapshot_id = mv.pt_key, mv.snapshot_id
            imgsz, classes = mv.imgsz, len(mv.class_names or s.class_names)
        work = s.data_dir / "drift" / f"reference-{version:06d}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            weights = work / "model.pt"
            self._store.download_file(pt_key, weights)
            args = [self._python, "-m", "training.drift_reference", "--model", str(weights), "--imgsz", str(imgsz),
                    "--classes", str(classes), "--version", str(version), "--limit", str(s.drift.reference_images),
                    "--config-dir", str((s.data_dir / "ultralytics").resolve()), "--out", str(work / REFERENCE_FILE)]
            base = s.replay_data or s.eval_sets.get("golden")
            if base is not None:
                args += ["--data", f"base={Path(base).resolve()}"]
            if snapshot_id:
                count = rebuild_snapshot(self._store, snapshot_id, work / "new", with_parents=True)
                if count:
                    args += ["--images", f"new={work / 'new' / 'images'}"]
            if "--data" not in args and "--images" not in args:
                raise NoReferenceInputs("no training data to compute a reference from: set replay_data or eval_sets.golden")
            proc = subprocess.run(args, capture_output=True, text=True, timeout=self._timeout, cwd=work)
            if proc.returncode != 0:
                raise RuntimeError(f"training.drift_reference exited {proc.returncode}: {proc.stderr[-2000:]}")
            reference = DriftReference.from_json((work / REFERENCE_FILE).read_bytes())
            self.save(version, reference)
            return reference
        finally:
            shutil.rmtree(work, ignore_errors=True)
