"""Carries one update through the state table: resumable download, verification, staging, the
switch, the post-switch health verdict and rollbacks. Every transition is persisted first, then
reported on the ``update`` topic; model loading stays with the runtime, between two frames."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import structlog

from edge_agent.ota.compat import DeviceProfile
from edge_agent.ota.crashpoint import CrashHook, no_crash
from edge_agent.ota.record import UpdateRecord, load_record, save_record
from edge_agent.ota.slots import ModelSlots
from edge_agent.ota.states import ABORTABLE, MAX_ENTRIES_PER_STATE, RESTING, Event, State, next_state
from firmware_bundles import BundleError, TrustStore, sha256_file, unpack_bundle
from firmware_bundles.commands import verify_command
from protocol.messages import DeployCommand, RollbackCommand, UpdateEvent

log = structlog.get_logger(__name__)

_CHUNK = 1 << 16
_SEEN_ROLLBACKS = 64


class UpdateError(RuntimeError):
    pass


class _Superseded(Exception):
    """The update being fetched was aborted or replaced meanwhile."""


class RollbackRefused(RuntimeError):
    """A rollback command the device will not carry out; the message is the reported reason."""


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
        *,
        device: DeviceProfile,
        crash: CrashHook = no_crash,
    ) -> None:
        self._device_id = device_id
        self._dir = Path(data_dir)
        self._record_path = self._dir / "update.json"
        self._downloads = self._dir / "downloads"
        self._downloads.mkdir(parents=True, exist_ok=True)
        self.slots = slots
        self.trust = trust
        self._http = http
        self._publish = publish
        self._max_bytes = max_bundle_bytes
        self._keep = keep_versions
        self._device = device
        self._crash = crash
        self.runs_as = ""
        self._lock = threading.RLock()
        self.record: UpdateRecord = load_record(self._record_path)
        if self.record.state not in RESTING:
            # Resuming after a crash or power cut counts as entering the state again, so an
            # update that keeps killing the agent in one state is given up (resume_count_exceeded).
            entries = dict(self.record.entries)
            entries[self.record.state.value] = entries.get(self.record.state.value, 0) + 1
            self.record = self.record.model_copy(update={"entries": entries})
            save_record(self._record_path, self.record)
            if not self.resume_count_exceeded():  # past the cap the runtime gives up instead of resuming
                self._crash(self.record.state.value)
        self._sweep_downloads()

    def _sweep_downloads(self) -> None:
        """Only the running update's download is worth keeping once it is past verification; at rest
        no candidate exists (a crash may have come between an exit and its clean-up)."""
        keep = self._part_path() if self.record.state in (State.DOWNLOADING, State.VERIFYING) else None
        for part in self._downloads.glob("*.part"):
            if part != keep:
                part.unlink(missing_ok=True)
        if self.record.state in RESTING:
            candidate = self.slots.candidate()
            if candidate is not None:
                self.slots.set_candidate(None)
                self.slots.remove(candidate)

    @property
    def state(self) -> State:
        return self.record.state

    def _event(self, before: State, after: State, event: str, reason: str, **fields) -> UpdateEvent:
        rec = self.record
        values = {"update_id": rec.update_id, "version": rec.version} | fields
        return UpdateEvent(device_id=self._device_id, from_state=before.value, to_state=after.value, event=event,
                           reason=reason[:2000], active_version=self.slots.active(), **values)

    def transition(self, event: Event, reason: str = "", **updates) -> State:
        """Persist the next state (with ``updates`` to the record, in the same atomic write), then report it."""
        with self._lock:
            before = self.record.state
            after = next_state(before, event)
            entries = dict(self.record.entries)
            entries[after.value] = entries.get(after.value, 0) + 1
            self.record = self.record.model_copy(
                update={**updates, "state": after, "reason": reason, "entries": entries})
            save_record(self._record_path, self.record)  # persisted before any side effect of `after`
            self._crash(after.value)
        log.info("ota.transition", version=self.record.version, transition=f"{before}->{after}", reason=reason)
        self._publish(self._event(before, after, event.value, reason))
        return after

    def report_resume(self) -> None:
        """Tell the server where the update stands after a restart (the last report may have been lost)."""
        rec = self.record
        if rec.update_id:
            reason = f"agent restarted in {rec.state.value}" + (f" ({rec.reason})" if rec.reason else "")
            self._publish(self._event(rec.state, rec.state, "resume", reason))

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
                await_promotion=command.await_promotion,
                from_version=self.slots.active(), seen_rollbacks=self.record.seen_rollbacks,
            )
        self.transition(Event.DEPLOY, f"deploy of version {command.version} ({command.mode})")
        return True

    # ------------------------------------------------------------------ rollback commands

    def check_rollback(self, command: RollbackCommand) -> tuple[int, bool]:
        """Where a rollback command goes, and whether at once (the target's slot is intact) or by
        fetching its bundle. RollbackRefused when it is not signed by a trusted key, has expired,
        names no older version, or cannot be carried out. Nothing is touched before this passes."""
        try:
            verify_command(command, self.trust)
        except BundleError as exc:
            raise RollbackRefused(str(exc)) from None
        if command.command_id in self.record.seen_rollbacks:
            raise RollbackRefused(f"rollback command {command.command_id} was already carried out (a replay)")
        active = self.slots.active()
        target = command.to_version
        if target is None:
            target = self.slots.newest_below(active) if active is not None else None
            if target is None:
                raise RollbackRefused(f"no version older than the active {active} is on disk to roll back to")
        elif active is not None and target >= active:
            raise RollbackRefused(f"version {target} is not older than the active {active}; deploy it instead")
        if self.slots.has(target):
            try:
                self.slots.verify(target, self.trust)
                return target, True
            except BundleError as exc:
                log.warning("ota.rollback_slot_damaged", version=target, error=str(exc))
        if command.bundle_url is None:
            raise RollbackRefused(f"version {target} is not on disk (or is damaged) and the command carries "
                                  "no bundle to fetch it from")
        return target, False

    def refuse(self, command: RollbackCommand, reason: str) -> None:
        """Report a refused rollback command (no state changes: a forged command must change nothing)."""
        log.warning("ota.rollback_refused", command=command.command_id, reason=reason)
        state = self.record.state
        self._publish(self._event(state, state, "rollback_refused", f"rollback refused: {reason}",
                                  update_id=command.command_id, version=command.to_version or 0))

    def begin_rollback(self, command: RollbackCommand, target: int, instant: bool) -> State:
        """Start a checked rollback (see ``check_rollback``) from a resting state, or from CHECKING
        when instant; the runtime aborts an update in flight first."""
        why = command.reason or "no reason given"
        with self._lock:
            state = self.record.state
            if state not in RESTING and not (state is State.CHECKING and instant):
                raise RollbackRefused(f"an update is in {state.value}")
            fields = {"update_id": command.command_id, "kind": "rollback", "version": target, "state": state,
                      "mode": "direct", "from_version": self.slots.active(), "rollback_to": target,
                      "allow_downgrade": True,
                      "seen_rollbacks": [*self.record.seen_rollbacks, command.command_id][-_SEEN_ROLLBACKS:]}
            if instant:
                self.record = UpdateRecord(**fields)
                self.transition(Event.ROLLBACK, f"signed rollback to version {target} ({why})")
                return self.record.state
            self.record = UpdateRecord(**fields, bundle_url=command.bundle_url or "",
                                       bundle_sha256=command.bundle_sha256 or "",
                                       bundle_size=command.bundle_size or 0)
            self.transition(Event.ROLLBACK_FETCH, f"signed rollback to version {target} ({why}); "
                                                  "its slot is gone or damaged, fetching the bundle")
            return self.record.state

    def abort(self, reason: str) -> None:
        """Cancel an update that is not serving yet. A fetch running in the background notices and
        stops (it checks the update is still current before every step)."""
        with self._lock:
            self.transition(Event.ABORT, reason)  # persisted first: a background fetch stops at its next step
            self.discard_candidate()

    # ------------------------------------------------------------------ download + verify

    def _part_path(self) -> Path:
        return self._downloads / f"{self.record.update_id}.tar.part"

    def _current(self, update_id: str, state: State) -> bool:
        return self.record.update_id == update_id and self.record.state is state

    def _transition_if(self, update_id: str, state: State, event: Event, reason: str) -> bool:
        """Transition only if the update is still the one (and in the state) the caller worked on."""
        with self._lock:
            if not self._current(update_id, state):
                return False
            self.transition(event, reason)
            return True

    def download(self) -> None:
        """Resumable: an interrupted download continues from the bytes already on disk (HTTP Range)."""
        rec = self.record
        part = self._part_path()
        if rec.bundle_size > self._max_bytes:
            raise UpdateError(f"bundle declares {rec.bundle_size} bytes, over the {self._max_bytes}-byte limit")
        have = part.stat().st_size if part.exists() else 0
        if have > rec.bundle_size:
            part.unlink()
            have = 0
        free = shutil.disk_usage(self._downloads).free
        needed = (rec.bundle_size - have) + rec.bundle_size * 2  # rest of the download + unpacked slot + headroom
        if free < needed:
            raise UpdateError(f"not enough free disk: {free} bytes free, {needed} needed for a "
                              f"{rec.bundle_size}-byte bundle")
        if have < rec.bundle_size:
            headers = {"Range": f"bytes={have}-"} if have else {}
            log.info("ota.download", version=rec.version, resume_from=have, size=rec.bundle_size)
            with self._http.stream("GET", rec.bundle_url, headers=headers, timeout=60) as response:
                if response.status_code == 200 and have:
                    have = 0  # the server ignored Range: start over
                elif response.status_code not in (200, 206):
                    raise UpdateError(f"bundle download failed: HTTP {response.status_code}")
                with part.open("ab" if have else "wb") as out:
                    written = have
                    for chunk in response.iter_bytes(_CHUNK):
                        if not self._current(rec.update_id, State.DOWNLOADING):
                            raise _Superseded
                        written += len(chunk)
                        if written > rec.bundle_size:
                            raise UpdateError(f"bundle is larger than its declared {rec.bundle_size} bytes")
                        out.write(chunk)
                        if written < rec.bundle_size:
                            out.flush()
                            self._crash("DOWNLOADING+partial")
        if part.stat().st_size != rec.bundle_size:
            raise UpdateError(f"bundle download incomplete: {part.stat().st_size} of {rec.bundle_size} bytes")
        digest = sha256_file(part)
        if digest != rec.bundle_sha256:
            part.unlink()
            raise UpdateError(f"bundle sha256 {digest[:12]}… does not match the command's {rec.bundle_sha256[:12]}…")

    def verify_and_stage(self) -> None:
        """Verify signature, hashes, hardware; unpack into the version's slot. The downloaded file is kept
        until VERIFIED is persisted, so a crash in between re-verifies instead of losing the bundle."""
        rec = self.record
        active = self.slots.active()
        if active is not None and rec.version <= active and not rec.allow_downgrade:
            raise BundleError(f"version {rec.version} is not newer than the active {active} (rollback protection)")
        if rec.version == active:
            raise BundleError(f"version {rec.version} is already active")
        self.slots.delete(rec.version)  # a slot left by an earlier attempt is re-made from this bundle
        manifest = unpack_bundle(self._part_path(), self.slots.slot(rec.version), self.trust,
                                 max_bytes=self._max_bytes, expected_sha256=rec.bundle_sha256)
        try:
            if manifest.version != rec.version:
                raise BundleError(f"bundle holds version {manifest.version}, the command said {rec.version}")
            self.runs_as = self._device.check(manifest)
        except BundleError:
            self.slots.delete(rec.version)
            raise

    def fetch(self) -> None:
        """DOWNLOADING/VERIFYING → STAGED (or an exit). Runs off the frame loop; if the update is
        aborted or superseded meanwhile, it stops without touching the new one."""
        rec = self.record
        uid = rec.update_id
        if rec.state is State.DOWNLOADING:
            try:
                self.download()
            except _Superseded:
                return
            except (UpdateError, httpx.HTTPError, OSError) as exc:
                self._transition_if(uid, State.DOWNLOADING, Event.DOWNLOAD_FAILED, str(exc))
                return
            if not self._transition_if(uid, State.DOWNLOADING, Event.DOWNLOADED,
                                       f"{rec.bundle_size} bytes, sha256 ok"):
                return
        if not self._current(uid, State.VERIFYING):
            return
        try:
            self.verify_and_stage()
        except (BundleError, OSError) as exc:
            with self._lock:
                if self._current(uid, State.VERIFYING):
                    self.transition(Event.VERIFY_FAILED, str(exc))
                    self._part_path().unlink(missing_ok=True)
            return
        with self._lock:
            if not self._current(uid, State.VERIFYING):
                if rec.version != self.slots.active():
                    self.slots.delete(rec.version)
                return
            self.slots.set_candidate(rec.version)
            self.transition(Event.VERIFIED, f"signature, file hashes and hardware verified; runs as {self.runs_as}")
            self._part_path().unlink(missing_ok=True)

    # ------------------------------------------------------------------ switch, verdict, rollback

    def switch(self) -> None:
        """PROMOTING → CHECKING: the active link moves to the new version. Idempotent, so a crash
        half-way re-runs it safely. Older slots stay until the health window has passed."""
        self.slots.set_active(self.record.version)
        self.slots.set_candidate(None)
        self._crash("PROMOTING+switched")
        self.transition(Event.SWITCHED, f"version {self.record.version} serves; health check "
                                        "before it is committed")

    def commit(self, reason: str) -> None:
        """CHECKING → ACTIVE, then prune old slots, keeping the newest for instant rollback."""
        self.transition(Event.HEALTHY, reason)
        self.slots.prune(self._keep)

    def fallback_version(self) -> int | None:
        """Where a failed health check goes: the version the update replaced, else the newest older one."""
        rec = self.record
        if rec.from_version is not None and rec.from_version != rec.version and self.slots.has(rec.from_version):
            return rec.from_version
        return self.slots.newest_below(rec.version)

    def unhealthy(self, reason: str) -> State:
        """CHECKING → ROLLING_BACK to the fallback, or FAILED when there is none."""
        target = self.fallback_version()
        if target is None:
            return self.transition(Event.NO_FALLBACK, f"{reason}; no older version on disk to roll back to, "
                                                      f"version {self.record.version} stays active")
        return self.transition(Event.UNHEALTHY, f"{reason}; rolling back to version {target}", rollback_to=target)

    def rolled_back_from(self) -> int | None:
        """The version a rollback moves away from."""
        rec = self.record
        return rec.version if rec.kind == "deploy" else rec.from_version

    def switch_back(self) -> None:
        """ROLLING_BACK → ROLLED_BACK: the active link moves to ``rollback_to``. Idempotent."""
        rec = self.record
        target = rec.rollback_to
        assert target is not None
        self.slots.set_active(target)
        self.slots.set_candidate(None)
        self._crash("ROLLING_BACK+switched")
        if rec.kind == "deploy":
            # An update that failed its health check: its slot must never be fallen back to.
            self.slots.forget(rec.version)
        self.transition(Event.SWITCHED, f"version {target} is active again (after: {rec.reason})")

    def discard_candidate(self) -> None:
        version = self.record.version
        if self.slots.candidate() == version:
            self.slots.set_candidate(None)
        if version != self.slots.active():
            self.slots.remove(version)
        self._part_path().unlink(missing_ok=True)

    def give_up(self) -> State:
        """Leave an in-flight state that keeps being interrupted, restoring a serving model first."""
        state, rec = self.record.state, self.record
        reason = f"gave up after repeated interruptions in {state.value}"
        if state is State.DOWNLOADING:
            self._part_path().unlink(missing_ok=True)
            return self.transition(Event.DOWNLOAD_FAILED, reason)
        if state in ABORTABLE:
            event = {State.VERIFYING: Event.VERIFY_FAILED, State.STAGED: Event.ABORT,
                     State.SHADOWING: Event.SHADOW_FAILED}[state]
            after = self.transition(event, reason)
            self.discard_candidate()
            return after
        if state is State.PROMOTING:
            # The crash may have come after the link moved: put the replaced model back.
            if rec.from_version is not None and self.slots.has(rec.from_version):
                self.slots.set_active(rec.from_version)
            self.slots.forget(rec.version)  # not pinned as `previous` by the restore above
            self._part_path().unlink(missing_ok=True)
            return self.transition(Event.SWITCH_FAILED, reason)
        if state is State.CHECKING:
            return self.unhealthy(f"version {rec.version} kept stopping the agent ({reason})")
        if state is State.ROLLING_BACK:
            back = self.rolled_back_from()
            if back is not None and self.slots.has(back):
                self.slots.set_active(back)
            return self.transition(Event.SWITCH_FAILED, f"{reason}; version {self.slots.active()} stays active")
        raise ValueError(f"nothing to give up in {state.value}")
