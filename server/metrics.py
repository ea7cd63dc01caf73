"""Prometheus metrics the server exposes at /metrics.

Fleet gauges are set from the database on each scrape (``server.fleet.update_fleet_metrics``);
counters and histograms are updated where the events happen. The rollout metrics are set by
the rollout controller through :func:`set_wave_state` / :func:`set_gate`.
"""

from __future__ import annotations

import contextlib
import threading

from prometheus_client import Counter, Gauge, Histogram

MESSAGES_RECEIVED = Counter("edgeloop_mqtt_messages_total", "Device messages received", ["type"])
MESSAGES_REJECTED = Counter("edgeloop_mqtt_messages_rejected_total", "Device messages refused", ["reason"])
# Receive time minus the message's own ``ts``: network + broker + outbox delay (an agent that was
# offline replays its outbox, hence the long tail). Clock skew below zero is counted as 0.
INGEST_LAG = Histogram(
    "edgeloop_mqtt_ingest_lag_seconds", "Delay from a device message's timestamp to its ingest, by type",
    ["type"], buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 6 * 3600, 24 * 3600),
)
# The ingest dispatcher (server/ingest_queues.py): queues per message class (heartbeat, event, sample,
# drift) between the MQTT network thread and the handlers. Nothing leaves them uncounted.
INGEST_QUEUE_DEPTH = Gauge("edgeloop_ingest_queue_depth", "Device messages waiting per class (heartbeat: devices "
                                                          "with a heartbeat waiting for the next flush)", ["class"])
INGEST_PROCESSED = Counter("edgeloop_ingest_processed_total", "Device messages handled by the ingest workers, by "
                                                              "class and outcome (ok, failed)", ["class", "outcome"])
INGEST_COALESCED = Counter("edgeloop_ingest_coalesced_total", "Heartbeats superseded by a later one of the same "
                                                              "device before the flush (not lost: the latest wins)")
INGEST_DROPPED = Counter("edgeloop_ingest_dropped_total", "Device messages dropped (QoS 0 only, or a failed "
                                                          "heartbeat write), by class and reason", ["class", "reason"])
INGEST_REFUSED = Counter("edgeloop_ingest_refused_total", "QoS 1 messages refused unacknowledged (the broker "
                                                          "delivers them again), by class and reason",
                         ["class", "reason"])
INGEST_BLOCKED = Counter("edgeloop_ingest_blocked_total", "Times the MQTT network thread waited for room in a full "
                                                          "queue (back-pressure on the broker)", ["class"])
INGEST_BLOCKED_SECONDS = Counter("edgeloop_ingest_blocked_seconds_total", "Seconds the MQTT network thread waited "
                                                                          "for room in a full queue", ["class"])
INGEST_QUEUE_LAG = Histogram(
    "edgeloop_ingest_lag_seconds", "Delay from a device message's timestamp to the end of its handling "
                                   "(heartbeats: their batch committed), by class",
    ["class"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 10, 30, 60, 300, 3600),
)
INGEST_BATCH_SIZE = Histogram("edgeloop_ingest_heartbeat_batch_size", "Heartbeats written per transaction",
                              buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 50000))
INGEST_EVENT_BATCH_SIZE = Histogram("edgeloop_ingest_event_batch_size",
                                    "Status, update and shadow messages handled per transaction",
                                    buckets=(1, 2, 5, 10, 25, 50, 100, 200, 500))
SAMPLES = Counter("edgeloop_samples_ingested_total", "Samples ingested by outcome (validated, unlabeled, "
                                                     "rejected)", ["status"])
PENDING_SAMPLES = Gauge("edgeloop_samples_pending", "Validated labeled samples toward the retrain threshold")

DEVICES_ONLINE = Gauge("edgeloop_devices_online", "Enrolled devices online, per group (\"\" = in no group; "
                                                  "a device in several groups counts in each)", ["group"])
DEVICES = Gauge("edgeloop_devices", "Enrolled devices by state (online, offline, revoked)", ["state"])
ENROLLMENTS = Counter("edgeloop_enrollments_total", "Bootstrap-token enrollments by outcome (enrolled, "
                                                    "unknown_token, refused_token, conflict, rate_limited, error)",
                      ["outcome"])
# The broker's HTTP authentication/authorization calls (server/api/broker_hooks.py, EMQX): hook is
# authenticate or authorize; result allow, deny, unauthorized (wrong or missing hook token: the
# broker's configuration does not match EDGELOOP_BROKER_HOOK_TOKEN) or unconfigured (no token set).
BROKER_HOOKS = Counter("edgeloop_broker_hook_total", "Broker HTTP hook calls by hook (authenticate, authorize) "
                                                     "and result (allow, deny, unauthorized, unconfigured)",
                       ["hook", "result"])

JOB_SECONDS = Histogram(
    "edgeloop_training_job_seconds", "Retrain job duration by outcome", ["outcome"],
    buckets=(30, 60, 120, 300, 600, 1200, 3600, 7200, 21600),
)
STAGE_SECONDS = Gauge("edgeloop_training_stage_seconds", "Duration of the last job's stages", ["stage"])
DEPLOY_COMMANDS = Counter("edgeloop_deploy_commands_total", "Deploy commands sent", ["mode"])
ALERTS = Counter("edgeloop_alerts_total", "Alerts raised", ["kind"])
# Bundle pushes to the OCI registry (settings.oci_registry) when a version is registered: pushed or failed
# (the version is registered without an image; publish.oci_push_failed in the log has the error).
OCI_PUSHES = Counter("edgeloop_oci_push_total", "Bundle pushes to the OCI registry by outcome (pushed, failed)",
                     ["outcome"])

# Rollouts: one series per (rollout, wave, state) set to 1 for the wave's current state and 0 for
# the states it was in before, so `edgeloop_rollout_wave_state == 1` lists every wave's state.
ROLLOUT_PASS_SECONDS = Histogram("edgeloop_rollout_pass_seconds", "One rollout controller pass over every "
                                 "rollout with work left", buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
ROLLOUT_WAVE_STATE = Gauge("edgeloop_rollout_wave_state", "1 for a rollout wave's current state, else 0",
                           ["rollout", "wave", "state"])
ROLLOUT_GATE_VALUE = Gauge("edgeloop_rollout_gate_value", "Current value of a rollout wave's gate "
                                                          "(e.g. agreement, accuracy_delta, latency_ms_p99)",
                           ["rollout", "wave", "gate"])
ROLLOUT_GATE_THRESHOLD = Gauge("edgeloop_rollout_gate_threshold", "Threshold the gate's value is held to",
                               ["rollout", "wave", "gate"])
ROLLOUT_GATE_PASSING = Gauge("edgeloop_rollout_gate_passing", "1 while the gate passes, 0 while it fails",
                             ["rollout", "wave", "gate"])

_lock = threading.Lock()
_wave_states: dict[tuple[str, str], set[str]] = {}
_gates: set[tuple[str, str, str]] = set()


def set_fleet(by_state: dict[str, int], online_by_group: dict[str, int]) -> None:
    """Replace the fleet gauges (groups that disappeared are dropped, not left at their last value)."""
    with _lock:
        for state, count in by_state.items():
            DEVICES.labels(state=state).set(count)
        DEVICES_ONLINE.clear()
        for group, count in online_by_group.items():
            DEVICES_ONLINE.labels(group=group).set(count)


def set_wave_state(rollout: str | int, wave: str | int, state: str) -> None:
    """Mark ``state`` as the wave's current state (1) and every state it had before as 0."""
    key = (str(rollout), str(wave))
    with _lock:
        seen = _wave_states.setdefault(key, set())
        seen.add(state)
        for s in seen:
            ROLLOUT_WAVE_STATE.labels(rollout=key[0], wave=key[1], state=s).set(1 if s == state else 0)


def set_gate(rollout: str | int, wave: str | int, gate: str, value: float, threshold: float | None = None,
             passing: bool | None = None) -> None:
    labels = {"rollout": str(rollout), "wave": str(wave), "gate": gate}
    with _lock:
        _gates.add((labels["rollout"], labels["wave"], gate))
    ROLLOUT_GATE_VALUE.labels(**labels).set(value)
    if threshold is not None:
        ROLLOUT_GATE_THRESHOLD.labels(**labels).set(threshold)
    if passing is not None:
        ROLLOUT_GATE_PASSING.labels(**labels).set(1 if passing else 0)


def forget_rollout(rollout: str | int) -> None:
    """Drop a finished rollout's series so that /metrics does not grow with every rollout ever run."""
    rollout = str(rollout)
    with _lock:
        for key in [k for k in _wave_states if k[0] == rollout]:
            for state in _wave_states.pop(key):
                ROLLOUT_WAVE_STATE.remove(key[0], key[1], state)
        for key in [k for k in _gates if k[0] == rollout]:
            _gates.discard(key)
            for gauge in (ROLLOUT_GATE_VALUE, ROLLOUT_GATE_THRESHOLD, ROLLOUT_GATE_PASSING):
                with contextlib.suppress(KeyError):  # threshold/passing may never have been set
                    gauge.remove(*key)
