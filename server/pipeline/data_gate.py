"""The retrain's validation stage: poisoning defense per device, then the data contract.

Runs before the snapshot is frozen, so a snapshot only ever holds samples that met the
contract. Quarantined devices' samples are held back (status ``held``) for review; samples
that break the contract are kept as ``rejected`` with their reason; a batch with too many
rejects halts the job and changes nothing. The halt is kept on the job
(``result["halted"]``): threshold triggers start no new job until an engineer resolves it
with :func:`resolve_halt`, which drops the batch's rejects (audited).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from protocol.alerts import AlertKind, Severity
from server import audit
from server.db.models import Quarantine, Sample, TrainingJob, utcnow
from server.settings import ServerSettings
from training.data_contract import Candidate, ContractLimits, ContractReport, DataContract, ReferenceIndex
from training.poisoning import LabeledSample, PoisoningPolicy, assess_devices

log = structlog.get_logger(__name__)


class CachedStore:
    """The object store with the bytes this job already fetched: validation and materialisation
    read each image once."""

    def __init__(self, store, cache: dict[str, bytes]) -> None:
        self._store, self._cache = store, cache

    def get_bytes(self, key: str, max_bytes: int) -> bytes:
        data = self._cache.get(key)
        return data if data is not None else self._store.get_bytes(key, max_bytes=max_bytes)

    def __getattr__(self, name):
        return getattr(self._store, name)


@dataclass
class DataGateResult:
    contract: ContractReport
    quarantined: dict[str, dict] = field(default_factory=dict)
    devices: dict[str, dict] = field(default_factory=dict)
    cache: dict[str, bytes] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"contract": self.contract.as_dict(), "quarantined": self.quarantined, "devices": self.devices}


def quarantined_devices(session: Session) -> set[str]:
    latest: dict[str, str] = {}
    for q in session.scalars(select(Quarantine).order_by(Quarantine.id)):
        latest[q.device_id] = q.status
    return {d for d, status in latest.items() if status == "quarantined"}


def hold_samples_of(session: Session, devices: set[str]) -> int:
    rows = session.scalars(select(Sample).where(Sample.status == "validated", Sample.snapshot_id.is_(None),
                                                Sample.device_id.in_(devices))).all()
    for s in rows:
        s.status, s.reject_reason = "held", "source device is quarantined (poisoning defense)"
    return len(rows)


class DataGate:
    def __init__(self, settings: ServerSettings, store, alerts=None) -> None:
        self._settings = settings
        self._store = store
        self._alerts = alerts
        self._golden: ReferenceIndex | None = None

    def golden_index(self) -> ReferenceIndex:
        if self._golden is None:
            golden = self._settings.eval_sets.get("golden")
            self._golden = (ReferenceIndex.from_data_yaml(Path(golden))
                            if golden and Path(golden).exists() else ReferenceIndex())
        return self._golden

    def policy(self) -> PoisoningPolicy:
        t = self._settings.training
        return PoisoningPolicy(max_contradiction_rate=t.poison_max_contradiction_rate,
                               max_class_divergence=t.poison_max_class_divergence,
                               min_samples=t.poison_min_samples)

    def limits(self) -> ContractLimits:
        s, t = self._settings, self._settings.training
        return ContractLimits(tuple(s.class_names), max_bytes=s.max_sample_bytes, max_side=s.max_image_side,
                              max_pixels=s.max_image_pixels,
                              near_duplicate_distance=t.near_duplicate_distance,
                              max_reject_fraction=t.max_reject_fraction, min_class_share=t.min_class_share)

    def run(self, session: Session, job_id: int) -> DataGateResult:
        """Check the pending batch; commits sample/quarantine changes unless the batch halts."""
        hold_samples_of(session, quarantined_devices(session))
        pending = session.scalars(select(Sample).where(Sample.status == "validated", Sample.snapshot_id.is_(None))
                                  .order_by(Sample.id)).all()
        policy = self.policy()
        # Imports were put there by an engineer (audited), not by a device: not judged as a device.
        verdicts = assess_devices(
            [LabeledSample(s.device_id, s.labels or [], s.predictions or []) for s in pending
             if not s.device_id.startswith("import:")],
            len(self._settings.class_names), policy)
        result = DataGateResult(ContractReport(), devices={d: v.as_dict() for d, v in verdicts.items()})
        bad = {d for d, v in verdicts.items() if v.quarantine}
        for device in sorted(bad):
            verdict = verdicts[device]
            session.add(Quarantine(device_id=device, status="quarantined", decided_by="policy", job_id=job_id,
                                   reasons=verdict.reasons, evidence=verdict.as_dict(),
                                   thresholds=policy.__dict__.copy()))
            result.quarantined[device] = verdict.as_dict()
        held = hold_samples_of(session, bad) if bad else 0
        session.commit()  # a quarantine stands even if the contract then halts the batch
        if held:
            log.warning("data_gate.held", samples=held, devices=sorted(bad))
        for device in sorted(bad):
            if self._alerts is not None:
                self._alerts.raise_alert(
                    AlertKind.DEVICE_QUARANTINED, Severity.WARNING,
                    f"device {device} quarantined: " + "; ".join(verdicts[device].reasons),
                    subject=device, details={"job_id": job_id, **verdicts[device].as_dict()})
        keep = [s for s in pending if s.device_id not in bad]

        known = set(session.scalars(select(Sample.sha256).where(Sample.snapshot_id.is_not(None))))
        for s in keep:
            result.cache[s.object_key] = self._store.get_bytes(s.object_key, max_bytes=self._settings.max_sample_bytes)
        contract = DataContract(self.limits(), self.golden_index(), known)
        result.contract = contract.check_batch(
            Candidate(s.id, result.cache[s.object_key], s.labels, s.device_id) for s in keep)
        if result.contract.halted:
            return result  # a halted batch marks nothing: a person looks at the report first
        by_id = {s.id: s for s in keep}
        for sample_id, reason in result.contract.rejected.items():
            by_id[sample_id].status, by_id[sample_id].reject_reason = "rejected", f"data contract: {reason}"
            result.cache.pop(by_id[sample_id].object_key, None)
        session.commit()
        return result


def release_quarantine(session: Session, device_id: str, actor: str) -> int:
    """An engineer reviewed the device: its held samples go back to the pending batch."""
    if device_id not in quarantined_devices(session):
        raise LookupError(f"device {device_id} is not quarantined")
    session.add(Quarantine(device_id=device_id, status="released", decided_by=actor, released_by=actor,
                           released_at=utcnow()))
    rows = session.scalars(select(Sample).where(Sample.device_id == device_id, Sample.status == "held")).all()
    for s in rows:
        s.status, s.reject_reason = "validated", ""
    return len(rows)


class HaltError(LookupError):
    """No unresolved halt on that job."""


def resolve_halt(session: Session, job_id: int, actor: str, reason: str, source: str = "") -> int:
    """An engineer reviewed a halted batch: the samples the contract rejected in it are dropped
    (``rejected``, with the contract's reason), the halt is marked resolved and the decision
    written to the audit log. Returns how many were dropped; the caller commits."""
    job = session.get(TrainingJob, job_id)
    halted = (job.result or {}).get("halted") if job is not None else None
    if not halted:
        raise HaltError(f"job {job_id} did not halt on the data contract")
    if halted.get("resolved"):
        raise HaltError(f"the halt of job {job_id} was already resolved by {halted['resolved'].get('by')}")
    rejects: dict[str, str] = halted.get("rejected") or {}
    dropped = []
    ids = list(rejects)
    for i in range(0, len(ids), 500):
        for s in session.scalars(select(Sample).where(Sample.id.in_(ids[i:i + 500]))):
            if s.status == "validated" and s.snapshot_id is None:
                s.status = "rejected"
                s.reject_reason = f"data contract: {rejects[s.id]} (dropped by {actor} after job {job_id} halted)"
                dropped.append(s.id)
    job.result = {**job.result, "halted": {**halted, "resolved": {
        "by": actor, "at": utcnow().isoformat(), "reason": reason, "dropped": len(dropped)}}}
    job.log += f"\nhalt resolved by {actor}: {len(dropped)} rejected samples dropped ({reason})"
    audit.record(session, actor, "retrain.halt.resolve", f"job:{job_id}", source, reason=reason,
                 dropped=len(dropped), halt_reason=halted.get("reason", ""))
    log.info("data_gate.halt_resolved", job=job_id, actor=actor, dropped=len(dropped))
    return len(dropped)


def batch_rejects(session: Session, job: TrainingJob, limit: int | None = None, offset: int = 0) -> dict:
    """The samples the data contract rejected in ``job``'s batch, in batch order, each with its
    device, the contract's reason and the sample's status now. For a halted batch these are the
    ones :func:`resolve_halt` drops (``validated`` until then); for a batch that went on, the
    contract's rejects (already ``rejected``). The API, the CLI and the dashboard show this."""
    result = job.result or {}
    halted = result.get("halted") or None
    contract = (result.get("data") or {}).get("contract") or {}
    rejected: dict[str, str] = (halted or {}).get("rejected") or contract.get("rejected") or {}
    ids = list(rejected)
    page = ids[offset:] if limit is None else ids[offset:offset + limit]
    rows = {s.id: s for s in session.scalars(select(Sample).where(Sample.id.in_(page)))} if page else {}
    return {
        "job_id": job.id, "halted": bool(halted), "halt_reason": (halted or {}).get("reason", ""),
        "resolved": (halted or {}).get("resolved"), "total": len(ids),
        "items": [{"sample_id": sid, "device_id": rows[sid].device_id if sid in rows else "",
                   "reason": rejected[sid], "status": rows[sid].status if sid in rows else "missing"}
                  for sid in page],
    }
