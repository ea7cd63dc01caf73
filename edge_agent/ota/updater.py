"""Carries one update through the state table: resumable download, verification, staging and
the switch. Every transition is persisted first, then reported on the ``update`` topic."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import structlog

from edge_agent.ota.record import UpdateRecord, load_record, save_record
from edge_agent.ota.slots import ModelSlots
from edge_agent.ota.states import MAX_ENTRIES_PER_STATE, RESTING, Event, State, next_state
from firmware_bundles import BundleError, TrustStore, sha256_file, unpack_bundle
from protocol.messages import DeployCommand, UpdateEvent

log = structlog.get_logger(__name__)


class UpdateError(RuntimeError):
    pass



class Updater:
    def __init__(
        self,
        device_id: str,
        data_dir: Path,
        slots: ModelSlots,
        trust: TrustStore,
        http: httpx.Client,
        publish: Callable[[UpdateEvent], None],
        max_bundle_bytes: int,
        keep_versions: int = 3,
    ) -> None:
        self._device_id = device_id
        self._dir = Path(data_dir)
        self._record_path = self._dir / "update.json"
        self._downloads = self._dir / "downloads"
        self._downloads.mkdir(parents=True, exist_ok=True)
        self.slots = slots
        self._trust = trust
        self._http = http
        self._publish = publish
        self._max_bytes = max_bundle_bytes
        self._keep = keep_versions
        self._lock = threading.RLock()
        self.record: UpdateRecord = load_record(self._record_path)
        if self.record.state not in RESTING:
            # Resuming after a crash or power cut counts as entering the state again, so an
            # update that keeps killing the agent in one state is given up (resume_count_exceeded).
            entries = dict(self.record.entries)
            entries[self.record.state.value] = entries.get(self.record.state.value, 0) + 1
            self.record = self.record.model_copy(update={"entries": entries})
            save_record(self._record_path, self.record)

    @property
    def state(self) -> State:
        return self.record.state

    def transition(self, event: Event, reason: str = "") -> State:
        with self._lock:
            before = self.record.state
            after = next_state(before, event)
            entries = dict(self.record.entries)
            entries[after.value] = entries.get(after.value, 0) + 1
            self.record = self.record.model_copy(update={"state": after, "reason": reason, "entries": entries})
            save_record(self._record_path, self.record)  # persisted before any side effect of `after`
        log.info("ota.transition", version=self.record.version, transition=f"{before}->{after}", reason=reason)
        self._publish(UpdateEvent(
            device_id=self._device_id, update_id=self.record.update_id, version=self.record.version,
            from_state=before.value, to_state=after.value, event=event.value, reason=reason,
            active_version=self.slots.active(),
        ))
        return after

    def resume_count_exceeded(self) -> bool:
        """After crashes, an update that keeps re-entering one state is given up."""
        return self.record.entries.get(self.record.state.value, 0) > MAX_ENTRIES_PER_STATE

    # ------------------------------------------------------------------ start

    def begin(self, command: DeployCommand) -> bool:
        with self._lock:
            if command.command_id == self.record.update_id:
                return False  # QoS 1 redelivery of the update we already run
            if self.record.state not in RESTING:
                log.warning("ota.busy", running=self.record.update_id, refused=command.command_id)
                return False
            self.record = UpdateRecord(
                update_id=command.command_id, version=command.version, state=self.record.state,
                bundle_url=command.bundle_url, bundle_sha256=command.bundle_sha256,
                bundle_size=command.bundle_size, mode=command.mode, shadow_frames=command.shadow_frames,
                from_version=self.slots.active(),
            )
        self.transition(Event.DEPLOY, f"deploy of version {command.version} ({command.mode})")
        return True

    # ------------------------------------------------------------------ download + verify

    def _part_path(self) -> Path:
        return self._downloads / f"{self.record.update_id}.tar.part"

    def download(self) -> None:
        """Resumable: an interrupted download continues from the bytes already on disk (HTTP Range)."""
        rec = self.record
        if rec.bundle_size > self._max_bytes:
            raise UpdateError(f"bundle declares {rec.bundle_size} bytes, over the {self._max_bytes}-byte limit")
        free = shutil.disk_usage(self._downloads).free
        if free < rec.bundle_size * 3:  # download + unpacked slot + headroom
            raise UpdateError(f"not enough free disk: {free} bytes free for a {rec.bundle_size}-byte bundle")
        part = self._part_path()
        have = part.stat().st_size if part.exists() else 0
        if have > rec.bundle_size:
            part.unlink()
            have = 0
        if have < rec.bundle_size:
            headers = {"Range": f"bytes={have}-"} if have else {}
            with self._http.stream("GET", rec.bundle_url, headers=headers, timeout=60) as response:
                if response.status_code == 200 and have:
                    have = 0  # the server ignored Range: start over
                elif response.status_code not in (200, 206):
                    raise UpdateError(f"bundle download failed: HTTP {response.status_code}")
                with part.open("ab" if have else "wb") as out:
                    written = have
                    for chunk in response.iter_bytes(1 << 16):
                        written += len(chunk)
                        if written > rec.bundle_size:
                            raise UpdateError(f"bundle is larger than its declared {rec.bundle_size} bytes")
                        out.write(chunk)
        if part.stat().st_size != rec.bundle_size:
            raise UpdateError(f"bundle download incomplete: {part.stat().st_size} of {rec.bundle_size} bytes")
        digest = sha256_file(part)
        if digest != rec.bundle_sha256:
            part.unlink()
            raise UpdateError(f"bundle sha256 {digest[:12]}… does not match the command's {rec.bundle_sha256[:12]}…")

    def verify_and_stage(self, allow_downgrade: bool = False) -> None:
        rec = self.record
        active = self.slots.active()
        if active is not None and rec.version <= active and not allow_downgrade:
            raise BundleError(f"version {rec.version} is not newer than the active {active} (rollback protection)")
        slot = self.slots.slot(rec.version)
        if slot.exists() and rec.version != active:
            shutil.rmtree(slot)  # a slot left by an earlier, interrupted attempt
        if not slot.exists():
            manifest = unpack_bundle(self._part_path(), slot, self._trust, max_bytes=self._max_bytes,
                                     expected_sha256=rec.bundle_sha256)
            if manifest.version != rec.version:
                shutil.rmtree(slot)
                raise BundleError(f"bundle holds version {manifest.version}, the command said {rec.version}")
        self._part_path().unlink(missing_ok=True)

    def fetch(self) -> None:
        """DOWNLOADING/VERIFYING → STAGED (or an exit). Runs off the frame loop."""
        if self.state is State.DOWNLOADING:
            try:
                self.download()
            except (UpdateError, httpx.HTTPError, OSError) as exc:
                self.transition(Event.DOWNLOAD_FAILED, str(exc))
                return
            self.transition(Event.DOWNLOADED, f"{self.record.bundle_size} bytes, sha256 ok")
        if self.state is State.VERIFYING:
            try:
                self.verify_and_stage()
            except (BundleError, OSError) as exc:
                self._part_path().unlink(missing_ok=True)
                self.transition(Event.VERIFY_FAILED, str(exc))
                return
            self.slots.set_candidate(self.record.version)
            self.transition(Event.VERIFIED, "signature and file hashes verified")

    # ------------------------------------------------------------------ switch

    def switch(self) -> None:
        """PROMOTING → ACTIVE. Idempotent, so a crash half-way re-runs it safely."""
        self.slots.set_active(self.record.version)
        self.slots.set_candidate(None)
        self.transition(Event.SWITCHED, f"version {self.record.version} is active")
        self.slots.prune(self._keep)

    def discard_candidate(self) -> None:
        version = self.record.version
        if self.slots.candidate() == version:
            self.slots.set_candidate(None)
        if version != self.slots.active():
            self.slots.remove(version)
        self._part_path().unlink(missing_ok=True)
