"""The updater on its own, against an in-process HTTP fake (httpx.MockTransport, honouring Range):
resumable downloads and their limits, a crash between unpack and VERIFIED, abort of a background
fetch, the switch / health verdict / rollback paths, signed rollback commands, giving up."""

from __future__ import annotations

import hashlib
import os
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import httpx
import pytest

from edge_agent.ota.compat import DeviceProfile
from edge_agent.ota.health import HealthBaseline
from edge_agent.ota.record import load_record
from edge_agent.ota.slots import ModelSlots
from edge_agent.ota.states import Event, State
from edge_agent.ota.updater import RollbackRefused, Updater
from firmware_bundles import HardwareTarget, RuntimeEntry, TrustStore, build_bundle, generate_private_key
from firmware_bundles.commands import sign_command
from protocol.messages import DeployCommand, Hardware, RollbackCommand

DEVICE = "cam-u1"
CPU = Hardware(onnxruntime_providers=["CPUExecutionProvider"])


class BundleServer:
    """Serves bundles by URL path, with Range support; records the Range headers it saw."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.ranges: list[str | None] = []
        self.honour_range = True

    def handler(self, request: httpx.Request) -> httpx.Response:
        data = self.files.get(request.url.path)
        if data is None:
            return httpx.Response(404)
        rng = request.headers.get("range")
        self.ranges.append(rng)
        if rng and self.honour_range:
            start = int(rng.removeprefix("bytes=").rstrip("-"))
            return httpx.Response(206, content=data[start:])
        return httpx.Response(200, content=data)


@pytest.fixture
def key():
    return generate_private_key()


@pytest.fixture
def server():
    return BundleServer()


@pytest.fixture
def make(tmp_path, key, server):
    """make(**overrides) -> Updater on tmp_path/agent; every call is a restart on the same disk."""
    events: list = []

    def build(**kw) -> Updater:
        profile = DeviceProfile(kw.pop("hardware", CPU), kw.pop("agent_version", "0.1.0"),
                                detector_type=kw.pop("detector_type", None))
        u = Updater(DEVICE, tmp_path / "agent", ModelSlots(tmp_path / "agent" / "models"),
                    TrustStore([key.public_key()]), httpx.Client(transport=httpx.MockTransport(server.handler)),
                    events.append, max_bundle_bytes=kw.pop("max_bundle_bytes", 4 * 1024 * 1024), device=profile,
                    **kw)
        u.events = events
        return u

    return build


@pytest.fixture
def publish(tmp_path, key, server):
    def publish(version: int, *, padding: int = 0, signer=None, mutate=None, engine_for: str | None = None,
                **build_kwargs) -> DeployCommand:
        work = tmp_path / "build"
        work.mkdir(exist_ok=True)
        if engine_for:  # a TensorRT engine only, built for compute capability `engine_for`
            (work / "model.engine").write_bytes(b"engine" * 50)
            files = {"model.engine": work / "model.engine"}
            build_kwargs["runtimes"] = [RuntimeEntry(kind="tensorrt", file="model.engine", precision="fp16",
                                                     target=HardwareTarget(gpu_compute_capability=engine_for,
                                                                           tensorrt_version="10.3"))]
        else:
            (work / "model.onnx").write_bytes(f"model {version}".encode() * 50)
            files = {"model.onnx": work / "model.onnx"}
        if padding:
            (work / "padding.bin").write_bytes(os.urandom(padding))
            files["padding.bin"] = work / "padding.bin"
        out = work / f"b{version}.tar"
        build_bundle(out, files, private_key=signer or key, model_name="detector", version=version,
                     class_names=["a"], input_spec=32, **build_kwargs)
        data = out.read_bytes()
        if mutate:
            data = mutate(data)
        server.files[f"/b{version}.tar"] = data
        return DeployCommand(device_id=DEVICE, version=version, bundle_url=f"http://store/b{version}.tar",
                             bundle_sha256=hashlib.sha256(data).hexdigest(), bundle_size=len(data), mode="direct")

    return publish


def _install(u: Updater, command: DeployCommand, *, healthy: bool = True) -> State:
    """Deploy → ... → CHECKING → ACTIVE (or the exit it took)."""
    assert u.begin(command)
    u.fetch()
    if u.state is not State.STAGED:
        return u.state
    u.transition(Event.PROMOTE, "direct", baseline=HealthBaseline(version=u.slots.active(), frames=50,
                                                                     detection_rate=1.0, mean_top_confidence=0.9))
    u.switch()
    assert u.state is State.CHECKING
    if healthy:
        u.commit("healthy")
    return u.state


def _states(u: Updater) -> list[str]:
    return [e.to_state for e in u.events]


def _rollback(key, **kw) -> RollbackCommand:
    fields = {"device_id": DEVICE, "reason": "wave failed", "expires_at": datetime.now(UTC) + timedelta(hours=1)}
    return sign_command(RollbackCommand(**(fields | kw)), key) if key else RollbackCommand(**(fields | kw))


# ---------------------------------------------------------------- downloads


def test_interrupted_download_resumes_with_a_range_request(make, publish, server) -> None:
    command = publish(1, padding=300_000)
    crashed = make(crash=lambda point: (_ for _ in ()).throw(SystemExit) if point == "DOWNLOADING+partial"
                   else None)
    crashed.begin(command)
    with pytest.raises(SystemExit):  # the process "dies" with part of the bundle on disk
        crashed.fetch()
    part = next((crashed._downloads).glob("*.part"))
    have = part.stat().st_size
    assert 0 < have < command.bundle_size

    again = make()
    assert again.state is State.DOWNLOADING and again.record.entries["DOWNLOADING"] == 2
    again.fetch()
    assert again.state is State.STAGED
    assert server.ranges == [None, f"bytes={have}-"]
    assert not list(again._downloads.glob("*.part"))


def test_server_ignoring_range_restarts_the_download(make, publish, server) -> None:
    command = publish(1, padding=200_000)
    server.honour_range = False
    u = make()
    u.begin(command)
    part = u._downloads / f"{command.command_id}.tar.part"
    part.write_bytes(server.files["/b1.tar"][:1000])
    u.fetch()
    assert u.state is State.STAGED


@pytest.mark.parametrize(
    ("change", "reason"),
    [({"bundle_size": 10 * 1024 * 1024}, "over the 4194304-byte limit"),
     ({"bundle_size": 1000}, "larger than its declared 1000 bytes"),
     ({"bundle_sha256": "0" * 64}, "does not match the command's 000000000000"),
     ({"bundle_url": "http://store/missing.tar"}, "HTTP 404")],
)
def test_download_failures_end_failed_with_the_reason(make, publish, change, reason) -> None:
    u = make()
    u.begin(publish(1).model_copy(update=change))
    u.fetch()
    assert u.state is State.FAILED and reason in u.record.reason
    assert not u.slots.installed()


def test_not_enough_free_disk_fails_before_downloading(make, publish, server, monkeypatch) -> None:
    import edge_agent.ota.updater as updater_module

    monkeypatch.setattr(updater_module.shutil, "disk_usage", lambda path: SimpleNamespace(free=10))
    u = make()
    u.begin(publish(1))
    u.fetch()
    assert u.state is State.FAILED and u.record.reason.startswith("not enough free disk: 10 bytes free")
    assert server.ranges == []


def test_crash_between_unpack_and_verified_reverifies_from_the_kept_download(make, publish) -> None:
    u = make()
    u.begin(publish(1))
    u.download()
    u.transition(Event.DOWNLOADED, "ok")
    u.verify_and_stage()  # unpacked, then the agent dies before VERIFIED is persisted
    again = make()
    assert again.state is State.VERIFYING
    again.fetch()
    assert again.state is State.STAGED and again.slots.candidate() == 1
    again.slots.verify(1, again.trust)


def test_abort_during_a_background_download_stops_it_without_touching_the_new_state(make, publish) -> None:
    holder = {}

    def abort_half_way(point: str) -> None:
        if point == "DOWNLOADING+partial" and holder["u"].state is State.DOWNLOADING:
            holder["u"].abort("aborted by the server")

    u = holder["u"] = make(crash=abort_half_way)
    u.begin(publish(1, padding=300_000))
    u.fetch()
    assert _states(u) == ["DOWNLOADING", "REJECTED"]
    assert u.record.reason == "aborted by the server"
    assert not list(u._downloads.glob("*.part")) and not u.slots.installed()


def test_engines_for_another_gpu_without_onnx_fallback_are_rejected_at_verifying(make, publish) -> None:
    u = make(hardware=Hardware(gpu_compute_capability="8.7", tensorrt_version="10.3.0",
                               onnxruntime_providers=["CPUExecutionProvider"]))
    assert _install(u, publish(1)) is State.ACTIVE
    u.begin(publish(2, engine_for="8.6"))
    u.fetch()
    assert u.state is State.REJECTED
    assert u.record.reason == (
        "wrong hardware: bundle 2 offers TensorRT engine for compute capability 8.6 / TensorRT 10.3 and no "
        "ONNX fallback; this device has GPU compute capability 8.7, TensorRT 10.3.0, ONNX Runtime")
    assert not u.slots.has(2) and u.slots.active() == 1 and u.slots.candidate() is None
    assert _states(u)[-3:] == ["DOWNLOADING", "VERIFYING", "REJECTED"]


def test_engine_for_this_gpu_is_accepted(make, publish) -> None:
    u = make(hardware=Hardware(gpu_compute_capability="8.6", tensorrt_version="10.3.0"))
    u.begin(publish(1, engine_for="8.6"))
    u.fetch()
    assert u.state is State.STAGED


def test_onnx_bundle_on_a_device_without_onnx_runtime_is_rejected(make, publish) -> None:
    u = make(hardware=Hardware())
    u.begin(publish(1))
    u.fetch()
    assert u.state is State.REJECTED
    assert u.record.reason.startswith("wrong hardware: bundle 1 offers onnx model model.onnx")


def test_bundle_needing_a_newer_agent_is_rejected(make, publish) -> None:
    u = make()
    u.begin(publish(1, min_agent_version="9.0"))
    u.fetch()
    assert u.state is State.REJECTED
    assert u.record.reason == "wrong agent: bundle 1 needs agent 9.0 or newer, this agent is 0.1.0"


# ---------------------------------------------------------------- switch, health verdict, automatic rollback


def test_switch_enters_the_health_window_and_keeps_old_slots_until_committed(make, publish) -> None:
    u = make(keep_versions=1)
    assert _install(u, publish(1)) is State.ACTIVE
    assert _install(u, publish(2), healthy=False) is State.CHECKING
    assert u.slots.active() == 2 and u.slots.has(1)
    assert load_record(u._record_path).baseline.mean_top_confidence == 0.9  # persisted before the switch
    u.commit("version 2 healthy")
    assert u.state is State.ACTIVE and u.slots.has(1)  # previous stays pinned for instant rollback
    assert _states(u)[-3:] == ["PROMOTING", "CHECKING", "ACTIVE"]


def test_unhealthy_switch_rolls_back_to_the_replaced_version_and_forgets_the_bad_one(make, publish) -> None:
    u = make()
    _install(u, publish(1))
    _install(u, publish(2), healthy=False)
    assert u.unhealthy("confidence collapsed: ...") is State.ROLLING_BACK
    assert u.record.rollback_to == 1 and "rolling back to version 1" in u.record.reason
    u.switch_back()
    assert u.state is State.ROLLED_BACK and u.slots.active() == 1
    assert not u.slots.has(2) and u.slots.previous() is None
    assert u.events[-1].reason.startswith("version 1 is active again (after: confidence collapsed")
    assert u.events[-1].active_version == 1


def test_unhealthy_first_install_has_nothing_to_roll_back_to(make, publish) -> None:
    u = make()
    _install(u, publish(1), healthy=False)
    assert u.unhealthy("version 1 failed 9 of its first 9 frames") is State.FAILED
    assert "no older version on disk to roll back to, version 1 stays active" in u.record.reason
    assert u.slots.active() == 1


def test_a_redeploy_of_the_version_that_was_rolled_back_from_is_allowed(make, publish) -> None:
    u = make()
    _install(u, publish(1))
    _install(u, publish(2), healthy=False)
    u.unhealthy("bad")
    u.switch_back()
    assert _install(u, publish(2)) is State.ACTIVE and u.slots.active() == 2


# ---------------------------------------------------------------- signed rollback commands


@pytest.fixture
def three(make, publish) -> Updater:
    u = make()
    for v in (1, 2, 3):
        assert _install(u, publish(v)) is State.ACTIVE
    return u


def test_signed_rollback_to_a_version_on_disk_is_instant(three, key) -> None:
    command = _rollback(key, to_version=2)
    target, instant = three.check_rollback(command)
    assert (target, instant) == (2, True)
    assert three.begin_rollback(command, target, instant) is State.ROLLING_BACK
    three.switch_back()
    assert three.state is State.ROLLED_BACK and three.slots.active() == 2
    assert three.slots.has(3)  # a commanded rollback keeps the newer slot (the server may re-deploy it)
    assert [(e.from_state, e.to_state, e.event) for e in three.events[-2:]] == [
        ("ACTIVE", "ROLLING_BACK", "rollback"), ("ROLLING_BACK", "ROLLED_BACK", "switched")]
    assert "signed rollback to version 2 (wave failed)" in three.events[-2].reason


def test_rollback_without_a_version_goes_to_the_newest_older_slot(three, key) -> None:
    assert three.check_rollback(_rollback(key)) == (2, True)


@pytest.mark.parametrize(
    ("signer", "kw", "reason"),
    [(None, {"to_version": 2}, "rollback command is not signed"),
     ("foreign", {"to_version": 2}, "which is not trusted"),
     ("key", {"to_version": 3}, "version 3 is not older than the active 3; deploy it instead"),
     ("key", {"to_version": 2, "expires_at": datetime(2024, 1, 1, tzinfo=UTC)}, "rollback command expired"),
     ("key", {"to_version": 9}, "version 9 is not older than the active 3"),
     ("key", {"to_version": 1, "reason": "x"}, None)],
)
def test_rollback_commands_are_checked_before_anything_happens(three, key, signer, kw, reason) -> None:
    signing_key = {"key": key, "foreign": generate_private_key(), None: None}[signer]
    command = _rollback(signing_key, **kw)
    if reason is None:
        assert three.check_rollback(command) == (1, True)
        return
    before = (three.state, three.slots.active(), len(three.events))
    with pytest.raises(RollbackRefused, match=reason):
        three.check_rollback(command)
    assert (three.state, three.slots.active(), len(three.events)) == before


def test_edited_signed_rollback_is_refused(three, key) -> None:
    command = _rollback(key, to_version=2).model_copy(update={"to_version": 1})
    with pytest.raises(RollbackRefused, match="signature does not verify"):
        three.check_rollback(command)


def test_refusal_is_reported_without_a_state_change(three, key) -> None:
    command = _rollback(None, to_version=2)
    three.refuse(command, "rollback command is not signed")
    event = three.events[-1]
    assert (event.from_state, event.to_state, event.event) == ("ACTIVE", "ACTIVE", "rollback_refused")
    assert event.update_id == command.command_id and event.version == 2
    assert event.reason == "rollback refused: rollback command is not signed"
    assert three.state is State.ACTIVE


def test_rollback_to_a_pruned_version_without_a_bundle_is_refused(make, publish, key) -> None:
    u = make(keep_versions=1)
    for v in (1, 2, 3):
        _install(u, publish(v))
    assert not u.slots.has(1)
    with pytest.raises(RollbackRefused, match="version 1 is not on disk .* no bundle to fetch it from"):
        u.check_rollback(_rollback(key, to_version=1))


def test_rollback_to_a_pruned_version_fetches_its_older_bundle(make, publish, server, key) -> None:
    u = make(keep_versions=1)
    first = publish(1)
    for v in (1, 2, 3):
        _install(u, first if v == 1 else publish(v))
    command = _rollback(key, to_version=1, bundle_url=first.bundle_url, bundle_sha256=first.bundle_sha256,
                        bundle_size=first.bundle_size)
    target, instant = u.check_rollback(command)
    assert (target, instant) == (1, False)
    assert u.begin_rollback(command, target, instant) is State.DOWNLOADING
    u.fetch()  # version 1 < active 3 gets past rollback protection: the signed command allows it
    assert u.state is State.STAGED
    u.transition(Event.ROLLBACK, "switching back")
    u.switch_back()
    assert u.state is State.ROLLED_BACK and u.slots.active() == 1
    assert _states(u)[-5:] == ["DOWNLOADING", "VERIFYING", "STAGED", "ROLLING_BACK", "ROLLED_BACK"]


def test_damaged_rollback_slot_is_refetched(three, key, publish) -> None:
    (three.slots.slot(2) / "model.onnx").write_bytes(b"bit rot")
    again = publish(2)
    command = _rollback(key, to_version=2, bundle_url=again.bundle_url, bundle_sha256=again.bundle_sha256,
                        bundle_size=again.bundle_size)
    assert three.check_rollback(command) == (2, False)


def test_rollback_during_the_health_window(make, publish, key) -> None:
    u = make()
    _install(u, publish(1))
    _install(u, publish(2), healthy=False)
    command = _rollback(key, to_version=1)
    assert u.begin_rollback(command, *u.check_rollback(command)) is State.ROLLING_BACK
    u.switch_back()
    assert u.slots.active() == 1 and u.state is State.ROLLED_BACK


def test_replayed_rollback_is_refused_even_after_later_updates(three, key, publish) -> None:
    command = _rollback(key, to_version=2)
    three.begin_rollback(command, *three.check_rollback(command))
    three.switch_back()
    assert _install(three, publish(4)) is State.ACTIVE  # the server moves on
    again = Updater(DEVICE, three._dir, three.slots, three.trust, httpx.Client(), three.events.append,
                    max_bundle_bytes=1 << 20, device=DeviceProfile(CPU, "0.1.0"))  # and the agent restarts
    with pytest.raises(RollbackRefused, match=f"rollback command {command.command_id} was already carried out"):
        again.check_rollback(command)


def test_redelivered_rollback_changes_nothing(three, key) -> None:
    command = _rollback(key, to_version=2)
    three.begin_rollback(command, 2, True)
    three.switch_back()
    count = len(three.events)
    assert three.begin(DeployCommand.model_validate(
        {"device_id": DEVICE, "command_id": command.command_id, "version": 4, "bundle_url": "http://x",
         "bundle_sha256": "a" * 64, "bundle_size": 1})) is False
    assert len(three.events) == count


# ---------------------------------------------------------------- resume reports and giving up


def test_restart_reports_where_the_update_stands(three) -> None:
    again = Updater(DEVICE, three._dir, three.slots, three.trust, httpx.Client(), three.events.append,
                    max_bundle_bytes=1 << 20, device=DeviceProfile(CPU, "0.1.0"))
    again.report_resume()
    event = three.events[-1]
    assert (event.from_state, event.to_state, event.event) == ("ACTIVE", "ACTIVE", "resume")
    assert event.reason == "agent restarted in ACTIVE (healthy)"


def test_giving_up_promoting_after_the_link_moved_puts_the_old_model_back(make, publish) -> None:
    u = make()
    _install(u, publish(1))
    assert u.begin(publish(2))
    u.fetch()
    u.transition(Event.PROMOTE, "direct")
    u.slots.set_active(2)  # the crash came right after the link moved
    for _ in range(3):
        u = make()
    assert u.state is State.PROMOTING and u.resume_count_exceeded()
    assert u.give_up() is State.ROLLED_BACK
    assert u.slots.active() == 1 and not u.slots.has(2)
    assert u.record.reason == "gave up after repeated interruptions in PROMOTING"


def test_giving_up_checking_rolls_back(make, publish) -> None:
    u = make()
    _install(u, publish(1))
    _install(u, publish(2), healthy=False)
    assert u.give_up() is State.ROLLING_BACK
    assert "version 2 kept stopping the agent" in u.record.reason


def test_giving_up_rolling_back_keeps_the_model_that_served(three, key) -> None:
    command = _rollback(key, to_version=1)
    three.begin_rollback(command, 1, True)
    three.slots.set_active(1)  # the link had moved when the agent died
    assert three.give_up() is State.FAILED
    assert three.slots.active() == 3
    assert three.record.reason.endswith("version 3 stays active")


def test_leftovers_of_a_crash_are_swept_on_start(make, publish, tmp_path) -> None:
    u = make()
    _install(u, publish(1))
    (u.slots.versions / ".000002.unpack-abc").mkdir()
    (u.slots.root / ".active.tmp").symlink_to("versions/000001")
    (u._downloads / "old.tar.part").write_bytes(b"x")
    again = make()
    assert not (again.slots.versions / ".000002.unpack-abc").exists()
    assert not os.path.lexists(again.slots.root / ".active.tmp")
    assert not list(again._downloads.glob("*.part"))
    assert again.slots.active() == 1


def test_slot_verification_catches_changed_files(three) -> None:
    three.slots.verify(3, three.trust)
    (three.slots.slot(3) / "model.onnx").write_bytes(b"tampered on disk")
    with pytest.raises(Exception, match="differs from its signed manifest"):
        three.slots.verify(3, three.trust)
    (three.slots.slot(2) / "manifest.sig").unlink()
    with pytest.raises(Exception, match="no manifest.sig"):
        three.slots.verify(2, three.trust)


