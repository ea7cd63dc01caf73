"""Device message ingest: the dispatcher (queues per class, batched heartbeats) against the old path.

    .venv/bin/python benchmarks/ingest.py [--rates 500 1000 2000] [--seconds 20] [--json PATH]

Real parts: its own Mosquitto and SeaweedFS, a SQLite file, and the server's own ingest in a
server process of its own (``server.app.build_context``: the MQTT bus, ``IngestService`` and, when
on, ``IngestDispatcher``; the HTTP API is not served, nothing else is started). The baseline,
measured in the same run, is the same server with ``ingest.dispatcher`` off: every message handled
on paho's network thread, one commit per heartbeat.

Each phase starts a fresh server process (so that one phase's backlog cannot slow the next) on
the same database, with its own broker user (so that no broker session carries over):

1. **Heartbeats** at each ``--rates`` value for ``--seconds``: the fleet is ``rate x 5`` enrolled
   devices at the agent's default 5 s heartbeat (2,000/s = 10,000 devices), each heartbeat stamped
   when it is published. The load comes from ``--clients`` paho clients in this process, paced by
   one thread; they log in as broker users with write access to every device's topics, so the
   broker sees a few connections, while the server's single connection receives exactly the
   stream 10,000 devices would send. Measured in the server process, after each commit: ingest lag
   (commit time minus the heartbeat's own ``ts``), heartbeats written during the offered window per
   second, and at the end of ``--grace`` seconds what was offered but never written (``lost``:
   dropped by the broker or still queued; counted drops and coalesced heartbeats reported apart).
2. **Samples while heartbeats flow**: ``--sample-rate`` sample events/s (QoS 1, real objects in
   SeaweedFS, each validated: stat, read, header check, decode) for ``--sample-seconds`` on top of
   ``--sample-hb-rate`` heartbeats/s. Reported: samples validated per second (first publish to last
   commit), and heartbeat lag meanwhile.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HEARTBEAT_SECONDS = 5.0  # the agent's default heartbeat interval
BASELINE = "dispatcher off (every message on paho's network thread, one commit per heartbeat)"
MODES = ("dispatcher", "baseline")


# ---------------------------------------------------------------- the server process


def serve(settings: dict, dispatcher: bool, conn) -> None:
    """A server's ingest (bus + IngestService [+ dispatcher]) with commit-time instrumentation."""
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    from server.app import build_context
    from server.settings import ServerSettings

    ctx = build_context(ServerSettings(**settings, ingest={"dispatcher": dispatcher}))
    ingest = ctx.ingest
    lock = threading.Lock()
    heartbeats: list[tuple[float, float]] = []  # (commit wall time, lag)
    samples: list[tuple[float, str]] = []  # (commit wall time, status)

    write_heartbeats, on_heartbeat, ingest_sample = ingest.write_heartbeats, ingest._on_heartbeat, ingest.ingest_sample

    def batched(batch):
        n = write_heartbeats(batch)
        now = time.time()
        with lock:
            heartbeats.extend((now, now - m.ts.timestamp()) for m, _ in batch)
        return n

    def one(message):
        on_heartbeat(message)
        now = time.time()
        with lock:
            heartbeats.append((now, now - message.ts.timestamp()))

    def sample(event):
        row = ingest_sample(event)
        with lock:
            samples.append((time.time(), row.status))
        return row

    store_samples = ingest.store_samples

    def stored(rows):
        written = store_samples(rows)
        now = time.time()
        with lock:
            samples.extend((now, row.status) for row in written)
        return written

    ingest.write_heartbeats, ingest._on_heartbeat, ingest.ingest_sample = batched, one, sample
    ingest.store_samples = stored  # the dispatcher's batched sample writes
    if ctx.ingest_dispatcher is not None:
        ctx.ingest_dispatcher.start()
    ctx.bus.start()
    conn.send("ready")
    while True:
        command = conn.recv()
        if command == "report":
            with lock:
                counts = dict(ctx.ingest_dispatcher.counts) if ctx.ingest_dispatcher is not None else {}
                conn.send({"heartbeats": list(heartbeats), "samples": list(samples), "counts": counts})
        elif command == "stop":
            break
    ctx.bus.stop()
    os._exit(0)  # the dispatcher's backlog (if any) is not drained: the phase is over


# ---------------------------------------------------------------- load


class Load:
    """``n`` paho clients (broker users with write access to every device topic), one loop thread each."""

    def __init__(self, broker, n: int) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.clients = []
        for i in range(n):
            user, password = f"_bench-load-{i}", uuid.uuid4().hex
            broker.add_user(user, password, server=True)
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=user, protocol=mqtt.MQTTv5)
            client.username_pw_set(user, password)
            client.max_inflight_messages_set(2000)
            connected = threading.Event()
            client.on_connect = lambda *_a, e=connected: e.set()
            client.connect(broker.host, broker.port, keepalive=60)
            client.loop_start()
            if not connected.wait(10):
                raise RuntimeError(f"load client {user} did not connect")
            self.clients.append(client)

    def close(self) -> None:
        for client in self.clients:
            client.disconnect()
            client.loop_stop()


def heartbeat_payload(device_id: str, n: int) -> bytes:
    from protocol import encode_message
    from protocol.messages import Heartbeat

    return encode_message(Heartbeat(device_id=device_id, fps=24.0, latency_ms_p50=4.0, latency_ms_p99=9.0,
                                    frames_total=n, samples_sent=0, spool_depth=0, disk_free_bytes=1 << 30,
                                    active_version=1))


def offer(load: Load, devices: list[str], rate: float, seconds: float, extra=None) -> dict:
    """Publish ``rate`` heartbeats/s round-robin over ``devices`` for ``seconds``; ``extra(now)``
    publishes whatever else is due. Returns what was offered and when."""
    from protocol import Channel, device_topic

    topics = [device_topic(d, Channel.HEARTBEAT) for d in devices]
    total = int(rate * seconds) if devices else 0
    t0_wall, t0 = time.time(), time.monotonic()
    sent = 0
    clients = load.clients
    while sent < total or (extra is not None and not extra.done):
        now = time.monotonic() - t0
        due = min(total, int(now * rate) + 1)
        while sent < due:
            i = sent % len(devices)
            info = clients[sent % len(clients)].publish(topics[i], heartbeat_payload(devices[i], sent), qos=0)
            if info.rc != 0:
                raise RuntimeError(f"publish failed: {info.rc}")
            sent += 1
        if extra is not None:
            extra.step(now)
        time.sleep(0.002)
    return {"offered": sent, "start": t0_wall, "end": time.time(), "offer_seconds": time.monotonic() - t0}


class SampleLoad:
    """Sample events at ``rate``/s for ``seconds``, QoS 1, pointing at real objects."""

    def __init__(self, load: Load, objects: list[tuple[str, str, str, int]], rate: float, seconds: float) -> None:
        self.load, self.objects, self.rate = load, objects, rate
        self.total = int(rate * seconds)
        self.sent = 0
        self.first: float | None = None
        self.done = self.total == 0

    def step(self, now: float) -> None:
        from protocol import Channel, device_topic, encode_message
        from protocol.messages import Box, SampleEvent

        due = min(self.total, int(now * self.rate) + 1)
        while self.sent < due:
            device, key, sha, size = self.objects[self.sent % len(self.objects)]
            event = SampleEvent(device_id=device, sample_id=uuid.uuid4().hex, object_key=key, sha256=sha,
                                size_bytes=size, width=256, height=256, reason="correction",
                                labels=[Box(cls=0, cx=0.5, cy=0.5, w=0.2, h=0.2)])
            if self.first is None:
                self.first = time.time()
            self.load.clients[self.sent % len(self.load.clients)].publish(
                device_topic(device, Channel.SAMPLES), encode_message(event), qos=1)
            self.sent += 1
        self.done = self.sent >= self.total


# ---------------------------------------------------------------- one phase


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def run_phase(broker, settings: dict, dispatcher: bool, load: Load, devices: list[str], rate: float,
              seconds: float, grace: float, samples: SampleLoad | None = None) -> dict:
    user, password = f"_bench-srv-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    broker.add_user(user, password, server=True)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=serve, args=({**settings, "mqtt_username": user, "mqtt_password": password},
                                           dispatcher, child), daemon=True)
    proc.start()
    try:
        if not parent.poll(120) or parent.recv() != "ready":
            raise RuntimeError("the server process did not start")
        time.sleep(0.5)
        sent = offer(load, devices, rate, seconds, extra=samples)
        # Grace: wait until everything offered is in, or nothing new came for 3 s, or the grace is over.
        deadline, last, last_change = time.monotonic() + grace, -1, time.monotonic()
        while time.monotonic() < deadline:
            parent.send("report")
            report = parent.recv()
            got = len(report["heartbeats"]) + report["counts"].get("coalesced", 0)
            done_samples = samples is None or len(report["samples"]) >= samples.sent
            if got >= sent["offered"] and done_samples:
                break
            got += len(report["samples"])  # progress of either
            if got != last:
                last, last_change = got, time.monotonic()
            elif time.monotonic() - last_change > 3:
                break
            time.sleep(0.5)
        parent.send("report")
        report = parent.recv()
        parent.send("stop")
    finally:
        proc.join(15)
        if proc.is_alive():
            proc.terminate()
            proc.join(5)
    hb = report["heartbeats"]
    counts = report["counts"]
    lags = [lag for _, lag in hb]
    in_window = [lag for t, lag in hb if t <= sent["end"]]
    tail = [lag for t, lag in hb if sent["end"] - 1.0 <= t <= sent["end"]]
    coalesced, dropped = counts.get("coalesced", 0), counts.get("dropped", 0)
    result = {
        "offered": sent["offered"],
        "offered_per_s": round(sent["offered"] / sent["offer_seconds"], 1),
        "devices": len(devices),
        "ingested": len(hb),
        "ingested_per_s": round(len(in_window) / sent["offer_seconds"], 1),
        "coalesced": coalesced,
        "dropped_counted": dropped,
        "lost": sent["offered"] - len(hb) - coalesced,
        "lag_p50_s": _r(percentile(lags, 50)),
        "lag_p99_s": _r(percentile(lags, 99)),
        "lag_max_s": _r(max(lags) if lags else None),
        "lag_mean_last_second_s": _r(statistics.fmean(tail) if tail else None),
    }
    if counts:
        result["dispatcher_counts"] = counts
    if samples is not None:
        rows = report["samples"]
        statuses: dict[str, int] = {}
        for _, status in rows:
            statuses[status] = statuses.get(status, 0) + 1
        span = (max(t for t, _ in rows) - samples.first) if rows and samples.first else None
        result["samples"] = {
            "offered": samples.sent, "ingested": len(rows), "by_status": statuses,
            "per_s": round(len(rows) / span, 1) if span else None, "seconds": _r(span),
        }
    return result


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


# ---------------------------------------------------------------- setup


def prepare(work: Path, n_devices: int, n_sample_devices: int):
    import cv2

    from server.db.models import Device
    from server.db.session import make_engine, make_session_factory, upgrade_schema
    from server.stack.mosquitto import MosquittoBroker
    from server.stack.seaweedfs import SeaweedS3
    from training.synth import render_frame

    broker_dir = Path(tempfile.mkdtemp(prefix="edgeloop-bench-mosquitto-"))
    broker = MosquittoBroker(broker_dir)
    broker.start()
    s3 = SeaweedS3(work / "s3")
    s3.start()
    bucket = "bench-ingest"
    store = s3.object_store(bucket)
    store.ensure_bucket()
    db_url = f"sqlite:///{work / 'ingest.db'}"
    engine = make_engine(db_url)
    upgrade_schema(engine)
    devices = [f"dev-{i:05d}" for i in range(n_devices)]
    sample_devices = [f"cam-{i:03d}" for i in range(n_sample_devices)]
    sessions = make_session_factory(engine)
    with sessions() as session:
        session.add_all([Device(id=d, online=False) for d in devices + sample_devices])
        session.commit()
    engine.dispose()
    objects = []
    for i, device in enumerate(sample_devices):
        data = cv2.imencode(".jpg", render_frame("base", 7, i, 256)[0])[1].tobytes()
        sha = hashlib.sha256(data).hexdigest()
        key = f"images/{device}/{sha[:2]}/{sha}.jpg"
        store.put_bytes(key, data, "image/jpeg")
        objects.append((device, key, sha, len(data)))
    settings = dict(
        data_dir=str(work / "server"), database_url=db_url, mqtt_host=broker.host, mqtt_port=broker.port,
        s3_endpoint=s3.endpoint, s3_access_key=s3.access_key, s3_secret_key=s3.secret_key, s3_bucket=bucket,
        retrain_threshold=10**9,
    )
    return broker, broker_dir, s3, settings, devices, objects


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rates", type=float, nargs="*", default=[500, 1000, 2000], help="heartbeats/s offered")
    parser.add_argument("--seconds", type=float, default=20.0, help="per heartbeat phase")
    parser.add_argument("--grace", type=float, default=10.0, help="after offering, to let the backlog in")
    parser.add_argument("--clients", type=int, default=8, help="paho load clients")
    parser.add_argument("--sample-rate", type=float, default=400.0, help="sample events/s in the sample phase")
    parser.add_argument("--sample-seconds", type=float, default=10.0)
    parser.add_argument("--sample-hb-rate", type=float, default=2000.0, help="heartbeats/s during the sample phase")
    parser.add_argument("--sample-devices", type=int, default=50)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--keep", action="store_true", help="keep the broker's and the server's folders")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    n_devices = int(max(args.rates + [args.sample_hb_rate]) * HEARTBEAT_SECONDS)  # --rates may be empty
    work = Path(tempfile.mkdtemp(prefix="edgeloop-bench-ingest-"))
    os.chmod(work, 0o755)
    started = time.monotonic()
    load1 = os.getloadavg()[0]
    broker, broker_dir, s3, settings, devices, objects = prepare(work, n_devices, args.sample_devices)
    load = Load(broker, args.clients)
    results: dict[str, dict] = {mode: {"heartbeats": {}} for mode in args.modes}
    try:
        for rate in args.rates:
            fleet = devices[: int(rate * HEARTBEAT_SECONDS)]
            for mode in args.modes:
                r = run_phase(broker, settings, mode == "dispatcher", load, fleet, rate, args.seconds, args.grace)
                results[mode]["heartbeats"][str(int(rate))] = r
                print(f"{mode:10s} {int(rate):5d}/s offered {r['offered_per_s']:7.1f}/s ingested "
                      f"{r['ingested_per_s']:7.1f}/s lag p50 {r['lag_p50_s']} p99 {r['lag_p99_s']} "
                      f"lost {r['lost']} dropped {r['dropped_counted']} coalesced {r['coalesced']}", flush=True)
        if args.sample_rate > 0:
            fleet = devices[: int(args.sample_hb_rate * HEARTBEAT_SECONDS)]
            for mode in args.modes:
                samples = SampleLoad(load, objects, args.sample_rate, args.sample_seconds)
                r = run_phase(broker, settings, mode == "dispatcher", load, fleet, args.sample_hb_rate,
                              args.sample_seconds, max(args.grace, 30.0), samples=samples)
                results[mode]["samples_with_heartbeats"] = r
                s = r["samples"]
                print(f"{mode:10s} samples {s['ingested']}/{s['offered']} at {s['per_s']}/s "
                      f"({s['by_status']}) with {int(args.sample_hb_rate)} heartbeats/s: lag p50 "
                      f"{r['lag_p50_s']} p99 {r['lag_p99_s']} lost {r['lost']}", flush=True)
    finally:
        load.close()
        broker.stop()
        s3.stop()
        if args.keep:
            print(f"kept {broker_dir} and {work}", flush=True)
        else:
            shutil.rmtree(broker_dir, ignore_errors=True)
            shutil.rmtree(work, ignore_errors=True)
    report = {
        "benchmark": "ingest",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_start": round(load1, 2), "load_average_end": round(os.getloadavg()[0], 2)},
        "baseline": BASELINE,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "heartbeat_seconds": HEARTBEAT_SECONDS,
        "results": results,
        "total_seconds": round(time.monotonic() - started, 1),
    }
    text = json.dumps(report, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
