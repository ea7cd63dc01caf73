"""Server drift decisions: scores (scipy), per-metric hysteresis, reference components, performance
decay, group rounds -- and the monitor's actions on a real SQLite database with a real AlertService
(the scheduler, MQTT commands and rollbacks are recorded by fakes)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from sqlalchemy import select

from edge_agent.drift_stats import BRIGHTNESS, CONFIDENCE, StatsAccumulator
from protocol.alerts import AlertKind
from protocol.messages import DriftReport, Histogram, SamplingConfigCommand
from server.alerts import AlertService
from server.db.models import AlertRecord, Device, DriftEvent, DriftWindow
from server.db.session import make_engine, make_session_factory, upgrade_schema
from server.drift.monitor import DriftMonitor, RetrainOutcome
from server.drift.policy import (
    Component,
    GroupRound,
    Hysteresis,
    SubjectState,
    Window,
    evaluate,
    merge_windows,
)
from server.drift.reference import components_of
from server.drift.scoring import mean_of, psi, score
from server.settings import DriftPolicy, DriftThreshold
from training.drift_reference import DriftReference, ReferenceComponent, ReferenceHistogram

BASE = {"brightness": 0.46, "conf": 0.7, "rate": 2.0}


def frames(rng, n: int, *, brightness=0.46, conf=0.7, rate=2.0) -> StatsAccumulator:
    """A stream like the synthetic base line's: image statistics and detections drawn around a look."""
    acc = StatsAccumulator(3)
    for _ in range(n):
        acc.add_image_stats((rng.normal(brightness, 0.04), rng.normal(0.24, 0.02), rng.normal(3.3, 0.1),
                             rng.normal(0.05, 0.01), rng.normal(0.33, 0.002), rng.normal(0.337, 0.002)))
        k = rng.poisson(rate)
        acc.add_detections(rng.integers(0, 3, k).tolist(), np.clip(rng.normal(conf, 0.1, k), 0.26, 1).tolist())
    return acc


def window(rng, n=500, *, correction_rate=None, qa_frames=0, **look) -> Window:
    acc = frames(rng, n, **look)
    return Window(frames=acc.frames, histograms=acc.histograms(), correction_rate=correction_rate,
                  qa_frames=qa_frames)


def component(rng, n=3000, **look) -> Component:
    acc = frames(rng, n, **look)
    return Component(frames=acc.frames, histograms=acc.histograms())


@pytest.fixture(scope="module")
def base_ref() -> dict[str, Component]:
    return {"base": component(np.random.default_rng(99))}


# ------------------------------------------------------------------ scoring


def test_scores_are_zero_for_identical_histograms_and_grow_with_a_shift():
    edges = [0.0, 0.25, 0.5, 0.75, 1.0]
    same = score(edges, [10, 20, 30, 40], [10, 20, 30, 40])
    assert same.psi == pytest.approx(0) and same.ks == pytest.approx(0) and same.wasserstein == pytest.approx(0)
    moved = score(edges, [0, 100, 0, 0], [100, 0, 0, 0])
    assert moved.ks == pytest.approx(1.0)
    assert moved.wasserstein == pytest.approx(0.25)  # one bin of a unit range
    assert moved.psi > 5 and score(edges, [0, 0, 0, 100], [100, 0, 0, 0]).wasserstein == pytest.approx(0.75)


def test_psi_is_the_symmetrised_divergence_of_the_smoothed_distributions():
    w, r = np.array([5, 30, 60, 5]), np.array([200, 300, 300, 200])
    p = (w + 0.5) / (w + 0.5).sum()  # Jeffreys on the window ...
    mix = 4 * 0.5 / (w.sum() + 4 * 0.5)
    q = (1 - mix) * r / r.sum() + mix / 4  # ... and the same uniform share in the reference
    assert psi(w, r) == pytest.approx(float(((p - q) * np.log(p / q)).sum()))
    assert psi(w, r) == pytest.approx(stats.entropy(p, q) + stats.entropy(q, p))


def test_psi_does_not_depend_on_sample_size_where_both_sides_are_empty():
    # The same distribution, 100 values against 10,000 with most bins empty on both sides: ~0.
    shape = np.array([0, 0, 0, 10, 60, 30, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    assert psi(shape, shape * 100) == pytest.approx(0.0, abs=1e-12)
    assert psi(shape, shape * 100) < 0.01 < psi(np.roll(shape, 1), shape * 100)
    assert mean_of([0, 1, 2], [1, 3]) == pytest.approx(1.25) and mean_of([0, 1], [0]) is None


def test_scores_refuse_histograms_that_do_not_line_up():
    with pytest.raises(ValueError):
        score([0, 1, 2], [1, 2], [1, 2, 3])
    with pytest.raises(ValueError):
        score([0, 1, 2], [0, 0], [1, 2])


# ------------------------------------------------------------------ hysteresis


def test_hysteresis_needs_consecutive_windows_to_raise_and_to_clear():
    h = Hysteresis()
    assert [h.update(o, not o, 3, 2) for o in (True, True, False, True, True)] == [None] * 5
    assert h.update(True, False, 3, 2) == "raised" and h.active
    assert h.update(False, False, 3, 2) is None  # between the thresholds: still raised
    assert [h.update(False, True, 3, 2) for _ in range(2)] == [None, "cleared"] and not h.active


def test_thresholds_per_metric_and_prefix():
    policy = DriftPolicy(thresholds={"confidence/*": DriftThreshold(statistic="ks", raise_above=0.3, clear_below=0.1),
                                     "brightness": DriftThreshold(raise_above=0.5)})
    assert policy.threshold_for("confidence/2").statistic == "ks"
    assert policy.threshold_for("brightness").raise_above == 0.5
    assert policy.threshold_for("contrast") == DriftThreshold()


# ------------------------------------------------------------------ evaluate


def test_noise_never_raises_and_a_shift_raises_after_n_windows_then_clears(base_ref):
    rng = np.random.default_rng(1)
    policy, state = DriftPolicy(), SubjectState()
    events = [evaluate(state, window(rng), 1, base_ref, policy).drift_event for _ in range(40)]
    assert events == [None] * 40
    shifted = [evaluate(state, window(rng, brightness=0.15), 1, base_ref, policy) for _ in range(3)]
    assert [v.drift_event for v in shifted] == [None, None, "raised"]
    assert BRIGHTNESS in shifted[-1].drifting_metrics and shifted[-1].values[BRIGHTNESS] > 1
    back = [evaluate(state, window(rng), 1, base_ref, policy).drift_event for _ in range(3)]
    assert back == [None, None, "cleared"] and not state.drifting


def test_isolated_outlier_windows_do_not_raise(base_ref):
    rng = np.random.default_rng(2)
    policy, state = DriftPolicy(), SubjectState()
    looks = [{"brightness": 0.15}, {}] * 10
    assert all(evaluate(state, window(rng, **look), 1, base_ref, policy).drift_event is None for look in looks)


def test_a_window_like_one_component_of_the_training_data_is_not_drift(base_ref):
    rng = np.random.default_rng(3)
    components = {**base_ref, "new": component(rng, brightness=0.15)}
    policy, state = DriftPolicy(raise_after=1), SubjectState()
    verdict = evaluate(state, window(rng, brightness=0.15), 2, components, policy)
    assert verdict.component == "new" and not verdict.drifting
    verdict = evaluate(state, window(rng, brightness=0.8), 2, components, policy)
    assert verdict.drift_event == "raised"


def test_model_change_starts_a_new_episode(base_ref):
    rng = np.random.default_rng(4)
    policy, state = DriftPolicy(raise_after=1), SubjectState()
    assert evaluate(state, window(rng, brightness=0.15), 1, base_ref, policy).drift_event == "raised"
    verdict = evaluate(state, window(rng), 2, base_ref, policy)
    assert verdict.model_changed and verdict.drift_event == "cleared" and state.windows == 1


def test_state_survives_a_round_trip_through_json(base_ref):
    rng = np.random.default_rng(5)
    policy, state = DriftPolicy(), SubjectState()
    for _ in range(2):
        evaluate(state, window(rng, brightness=0.15), 1, base_ref, policy)
    restored = SubjectState.from_dict(state.to_dict())
    assert evaluate(restored, window(rng, brightness=0.15), 1, base_ref, policy).drift_event == "raised"


@pytest.mark.parametrize("look, expected", [
    ({"correction_rate": 0.5, "qa_frames": 50}, "QA corrected 50%"),
    ({"conf": 0.35}, "mean confidence"),
    ({"rate": 0.4}, "detections per frame"),
])
def test_performance_decay_from_corrections_or_a_collapse(base_ref, look, expected):
    rng = np.random.default_rng(6)
    policy, state = DriftPolicy(), SubjectState()
    verdicts = [evaluate(state, window(rng, **look), 1, base_ref, policy) for _ in range(3)]
    assert [v.decay_event for v in verdicts] == [None, None, "raised"]
    assert any(expected in reason for reason in verdicts[-1].decay_reasons)


def test_correction_rate_is_judged_against_the_models_own_track_record(base_ref):
    rng = np.random.default_rng(9)
    policy = DriftPolicy()
    # The fast seed model is corrected on about a third of base frames: that is its normal.
    steady = SubjectState()
    for _ in range(20):
        verdict = evaluate(steady, window(rng, correction_rate=0.35, qa_frames=100), 1, base_ref, policy)
        assert verdict.decay_event is None
    assert steady.baseline_rate(policy) == pytest.approx(0.35)
    # A model right on 10% that slips to 35% has decayed, below the absolute ceiling.
    slipping = SubjectState()
    for _ in range(3):
        evaluate(slipping, window(rng, correction_rate=0.1, qa_frames=100), 1, base_ref, policy)
    verdicts = [evaluate(slipping, window(rng, correction_rate=0.35, qa_frames=100), 1, base_ref, policy)
                for _ in range(3)]
    assert verdicts[-1].decay_event == "raised" and verdicts[-1].decay["baseline_correction_rate"] == 0.1
    assert "10% at first" in verdicts[-1].decay_reasons[0]


def test_corrections_from_too_few_judged_frames_are_not_evidence(base_ref):
    rng = np.random.default_rng(7)
    policy, state = DriftPolicy(), SubjectState()
    for _ in range(5):
        verdict = evaluate(state, window(rng, correction_rate=1.0, qa_frames=5), 1, base_ref, policy)
        assert verdict.decay_event is None and verdict.decay["correction_rate"] is None


def test_group_round_closes_when_a_member_reports_again():
    rng = np.random.default_rng(8)
    a = window(rng, 100, correction_rate=0.5, qa_frames=10)
    b = window(rng, 300, correction_rate=0.0, qa_frames=30)
    rnd = GroupRound()
    assert rnd.add("a", a) is None and rnd.add("b", b) is None and rnd.members == ["a", "b"]
    closed = rnd.add("a", a)
    assert closed.frames == 400 and closed.qa_frames == 40 and closed.correction_rate == pytest.approx(0.125)
    assert sum(closed.histograms[CONFIDENCE][1]) == sum(a.histograms[CONFIDENCE][1]) + sum(b.histograms[CONFIDENCE][1])
    assert rnd.members == ["a"] and merge_windows([a]).frames == 100


# ------------------------------------------------------------------ the monitor


class FakeReferences:
    def __init__(self, ready: dict[int, DriftReference]) -> None:
        self.ready, self.requested = ready, []

    def get(self, version):
        return self.ready.get(version)

    def request(self, version, force=False):
        self.requested.append(version)
        return True


def reference_of(comp: Component) -> DriftReference:
    return DriftReference(num_classes=3, conf=0.25, components={"base": ReferenceComponent(
        frames=comp.frames, histograms={k: ReferenceHistogram(edges=list(e), counts=list(c))
                                        for k, (e, c) in comp.histograms.items()})})


class Harness:
    def __init__(self, tmp_path, base_ref, *, retrain_status="done", **policy) -> None:
        engine = make_engine(f"sqlite:///{tmp_path / 'drift.db'}")
        upgrade_schema(engine)
        self.sessions = make_session_factory(engine)
        with self.sessions() as session:
            session.add_all([Device(id="cam-1"), Device(id="cam-2")])
            session.commit()
        self.reference = reference_of(base_ref["base"])
        self.refs = FakeReferences({1: self.reference, 2: self.reference})
        self.commands, self.retrains, self.rollbacks = [], [], []
        self.retrain_status = retrain_status
        self.policy = DriftPolicy(**policy)
        self.rng = np.random.default_rng(11)
        self.count = 0
        self.monitor = self.new_monitor()

    def new_monitor(self) -> DriftMonitor:
        def retrain(reason):
            self.retrains.append(reason)
            return RetrainOutcome(self.retrain_status, 7 if self.retrain_status == "done" else None)

        return DriftMonitor(self.sessions, self.policy, self.refs, alerts=AlertService(self.sessions),
                            request_retrain=retrain, send_command=lambda d, c: self.commands.append((d, c)),
                            rollback=lambda d, v, r: self.rollbacks.append((d, v, r)))

    def report(self, device="cam-1", version=1, correction_rate=None, qa_frames=0, **look) -> DriftReport:
        acc = frames(self.rng, 500, **look)
        self.count += 1
        return DriftReport(device_id=device, model_version=version, window=self.count, frames=acc.frames,
                           histograms={k: Histogram(edges=list(e), counts=c) for k, (e, c) in acc.histograms().items()},
                           correction_rate=correction_rate, qa_frames=qa_frames)

    def events(self, scope="device") -> list[tuple[str, str, str, str]]:
        with self.sessions() as session:
            return [(e.signal, e.event, e.action, e.status) for e in session.scalars(
                select(DriftEvent).where(DriftEvent.scope == scope).order_by(DriftEvent.id))]

    def alerts(self) -> list[AlertRecord]:
        with self.sessions() as session:
            return list(session.scalars(select(AlertRecord).order_by(AlertRecord.id)))


def test_monitor_alerts_boosts_sampling_and_retrains_on_drift_then_restores(tmp_path, base_ref):
    h = Harness(tmp_path, base_ref)
    for _ in range(3):
        assert h.monitor.handle(h.report()).drift_event is None
    verdicts = [h.monitor.handle(h.report(brightness=0.15)) for _ in range(3)]
    assert verdicts[-1].drift_event == "raised"
    assert h.events()[:3] == [("drift", "raised", "alert", "done"), ("drift", "raised", "sampling", "done"),
                              ("drift", "raised", "retrain", "done")]
    device, command = h.commands[0]
    assert device == "cam-1" and isinstance(command, SamplingConfigCommand)
    assert command.random_rate == h.policy.boost_random_rate and "cam-1" in h.retrains[0]
    alert = h.alerts()[0]
    assert alert.kind == AlertKind.DRIFT and alert.subject == "device:cam-1" and "brightness" in alert.message
    assert alert.details["metrics"]["brightness"] > h.policy.threshold.raise_above
    with h.sessions() as session:
        event = session.scalar(select(DriftEvent).where(DriftEvent.action == "retrain"))
        assert event.job_id == 7
    # The group ("fleet") sums its members' windows per round: it drifts one round later.
    h.monitor.handle(h.report(brightness=0.15))
    assert ("drift", "raised", "alert", "done") in h.events("group")

    for _ in range(3):
        h.monitor.handle(h.report())
    assert ("drift", "cleared", "sampling", "done") in h.events()
    assert h.commands[-1][1].random_rate == h.policy.normal_random_rate
    assert [a.severity for a in h.alerts() if a.subject == "device:cam-1"] == ["warning", "info"]


def test_monitor_is_idempotent_skips_unknown_devices_and_waits_for_a_reference(tmp_path, base_ref):
    h = Harness(tmp_path, base_ref)
    report = h.report()
    h.monitor.handle(report)
    assert h.monitor.handle(report) is None  # QoS 1 redelivery
    assert h.monitor.handle(h.report(device="ghost")) is None
    assert h.monitor.handle(h.report(version=9)) is None and h.refs.requested == [9]
    with h.sessions() as session:
        rows = session.scalars(select(DriftWindow).where(DriftWindow.scope == "device")).all()
    assert [(r.subject, r.status) for r in rows] == [("cam-1", "scored"), ("cam-1", "no_reference")]


def test_a_restarted_monitor_resumes_the_episode_instead_of_raising_again(tmp_path, base_ref):
    h = Harness(tmp_path, base_ref)
    for _ in range(3):
        h.monitor.handle(h.report(brightness=0.15))
    h.monitor = h.new_monitor()  # server restart: state comes back from the last window's row
    for _ in range(2):
        assert h.monitor.handle(h.report(brightness=0.15)).drift_event is None
    assert len([e for e in h.events() if e[2] == "alert"]) == 1


def test_decay_right_after_a_switch_rolls_the_device_back(tmp_path, base_ref):
    h = Harness(tmp_path, base_ref)
    for _ in range(2):
        h.monitor.handle(h.report(version=1, correction_rate=0.05, qa_frames=50))
    verdicts = [h.monitor.handle(h.report(version=2, correction_rate=0.6, qa_frames=50)) for _ in range(3)]
    assert verdicts[-1].decay_event == "raised"
    assert h.rollbacks and h.rollbacks[0][:2] == ("cam-1", 1) and "switching to 2" in h.rollbacks[0][2]
    assert ("decay", "raised", "rollback", "done") in h.events()
    assert not any(e[:3] == ("decay", "raised", "retrain") for e in h.events())  # rolled back, not retrained
    assert any(a.kind == AlertKind.PERFORMANCE_DECAY and a.severity == "critical" for a in h.alerts())


def test_decay_long_after_a_switch_asks_for_a_retrain(tmp_path, base_ref):
    h = Harness(tmp_path, base_ref, rollback_within_windows=2)
    for _ in range(3):
        h.monitor.handle(h.report(version=1, correction_rate=0.6, qa_frames=50))
    assert not h.rollbacks and ("decay", "raised", "retrain", "done") in h.events()


def test_a_retrain_waiting_for_labels_is_asked_again_while_drift_lasts(tmp_path, base_ref):
    h = Harness(tmp_path, base_ref, retrain_status="waiting")
    for _ in range(3):
        h.monitor.handle(h.report(brightness=0.15))
    assert ("drift", "raised", "retrain", "waiting") in h.events()
    h.retrain_status = "done"
    h.monitor.handle(h.report(brightness=0.15))
    retrains = [e for e in h.events() if e[2] == "retrain"]
    assert retrains[-1][3] == "done" and len(h.retrains) == 3  # device raise, device retry, group raise


class MemoryStore:
    """The object store's put/get interface, in memory."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    def put_bytes(self, key, data, content_type="application/octet-stream"):
        self.objects[key] = data

    def get_bytes(self, key, max_bytes=None):
        return self.objects[key]


def test_reference_service_stores_once_and_rebuilds_only_stale_or_forced(tmp_path, base_ref):
    from server.db.models import DriftReference as ReferenceRow
    from server.drift.reference import ReferenceService
    from server.settings import ServerSettings

    engine = make_engine(f"sqlite:///{tmp_path / 'refs.db'}")
    upgrade_schema(engine)
    sessions = make_session_factory(engine)
    store = MemoryStore()
    service = ReferenceService(sessions, store, ServerSettings(data_dir=tmp_path / "server"))
    key = service.save(3, reference_of(base_ref["base"]))
    assert key == "models/defect-detector/000003/drift_reference.json" and key in store.objects
    fresh = ReferenceService(sessions, store, ServerSettings(data_dir=tmp_path / "server"))  # no cache
    assert components_of(fresh.get(3))["base"].frames == base_ref["base"].frames
    assert fresh.request(3) is False  # computed once per version

    with sessions() as session:
        session.get(ReferenceRow, 3).stats_version = 0  # made by older statistics
        session.commit()
    fresh = ReferenceService(sessions, store, ServerSettings(data_dir=tmp_path / "server"))
    assert fresh.get(3) is None
    assert fresh.request(3) is True  # rebuilt; here it fails: version 3 has no stored weights
    fresh.wait_idle(60)
    assert fresh.status(3) == "failed" and fresh.request(3) is False and fresh.request(3, force=True) is True
    fresh.wait_idle(60)
    with sessions() as session:
        assert "no stored weights" in session.get(ReferenceRow, 3).error


def _window_rows(h: Harness) -> list[tuple]:
    with h.sessions() as session:
        return [(w.scope, w.subject, w.window, w.status, w.drifting, w.state) for w in session.scalars(
            select(DriftWindow).order_by(DriftWindow.id))]


def test_a_batch_of_windows_is_judged_as_one_by_one_in_one_commit(tmp_path, base_ref):
    """The dispatcher hands the monitor what its drift queue holds: the verdicts, stored windows
    and actions are those of handling each window alone, the lookups and commit are once a batch."""
    from sqlalchemy import event

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    # cam-1 drifts after three windows; cam-2's windows come between its.
    looks = [("cam-1", {})] * 3 + [("cam-2", {})] + [("cam-1", {"brightness": 0.15})] * 4 + [("cam-2", {})]
    alone, batched = Harness(tmp_path / "a", base_ref), Harness(tmp_path / "b", base_ref)
    one_by_one = [alone.monitor.handle(alone.report(device=d, **look)) for d, look in looks]
    reports = [batched.report(device=d, **look) for d, look in looks]
    commits, before_actions = [], []
    event.listen(batched.sessions.kw["bind"], "commit", lambda conn: commits.append(1))
    act = batched.monitor._act
    batched.monitor._act = lambda *a: (before_actions.append((len(commits), len(_window_rows(batched)))),
                                       act(*a))[1]
    together = batched.monitor.handle_many(reports + [reports[0]])  # and a redelivery inside the batch

    assert [v.drift_event for v in together[:-1]] == [v.drift_event for v in one_by_one]
    assert together[-1] is None and "raised" in [v.drift_event for v in together[:-1]]
    assert _window_rows(batched) == _window_rows(alone)
    assert batched.events() == alone.events() and batched.retrains and len(batched.retrains) == len(alone.retrains)
    # Every window in one commit, before the first action (alerts and events commit their own rows).
    assert before_actions and before_actions[0] == (1, len(_window_rows(alone)))


def test_a_window_that_fails_in_a_batch_costs_only_itself(tmp_path, base_ref, monkeypatch):
    h = Harness(tmp_path, base_ref)
    reports = [h.report(device=f"cam-{1 + i % 2}") for i in range(5)]
    poisoned = reports[2].msg_id
    real = h.monitor._judge

    def judge(session, scope, subject, version, window, components, *, msg_id=None, number=0):
        if msg_id == poisoned:
            raise RuntimeError("poisoned window")
        return real(session, scope, subject, version, window, components, msg_id=msg_id, number=number)

    monkeypatch.setattr(h.monitor, "_judge", judge)
    verdicts = h.monitor.handle_many(reports)
    assert [v is None for v in verdicts] == [False, False, True, False, False]
    assert [row[2] for row in _window_rows(h) if row[0] == "device"] == [
        r.window for r in reports if r.msg_id != poisoned]


def test_a_batch_asks_for_a_missing_reference_once(tmp_path, base_ref):
    h = Harness(tmp_path, base_ref)
    verdicts = h.monitor.handle_many([h.report(version=9) for _ in range(20)])
    assert verdicts == [None] * 20 and h.refs.requested == [9]
    assert {row[3] for row in _window_rows(h)} == {"no_reference"} and len(_window_rows(h)) == 20
