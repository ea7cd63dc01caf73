"""Fleet benchmark: the real server against N simulated devices (``edgeloop simulate``).

This process runs the server (uvicorn in a thread, SQLite, its own Mosquitto and SeaweedFS), so its
CPU time and RSS are the server's; the devices run in one ``python -m edgeloop simulate`` subprocess
(one event loop). For each fleet size (a small baseline first, then N, same stack, same run) it
measures: provisioning rate (bulk enrollment), messages/s ingested per type and ingest lag p50/p99
(the server's own histogram, interpolated in its buckets) over a steady window, heartbeats sent vs
counted (lost), time to fan a direct deploy out to every device and to see every acknowledgement
(ACTIVE on the server), a whole rollout canary -> 100 % end to end, and server CPU and RSS.

    .venv/bin/python benchmarks/fleet.py --devices 1000 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "integration"))

ADMIN = "bench-admin-" + uuid.uuid4().hex


def _counter(metric, **labels) -> float:
    return metric.labels(**labels)._value.get()


def _hist(metric, kind: str) -> dict[float, float]:
    """Cumulative bucket counts (upper bound -> count) of one type."""
    return {float(s.labels["le"]): s.value for s in metric.collect()[0].samples
            if s.name.endswith("_bucket") and s.labels.get("type") == kind}


def _quantile(before: dict, after: dict, q: float) -> float | None:
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0
    if not total:
        return None
    target, lower, prev = q * total, 0.0, 0.0
    for bound, cum in zip(bounds, counts, strict=True):
        if cum >= target:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (target - prev) / max(cum - prev, 1e-9)
        lower, prev = bound, cum
    return lower


class _Monitor:
    """A progress line every ``every`` seconds while a fleet runs (stderr): what the server has
    counted, its queues and the time its network thread waited on them, its CPU, and the
    simulator's own last progress line. A stall shows where it is, not just that it happened."""

    KINDS = ("heartbeat", "status", "update", "shadow", "drift")

    def __init__(self, sim_log: Path, every: float = 10.0):
        import threading

        self.sim_log, self.every = sim_log, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-monitor", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        from server import metrics

        proc = psutil.Process()
        last = {k: _counter(metrics.MESSAGES_RECEIVED, type=k) for k in self.KINDS}
        passes = self._passes(metrics)
        cpu, t = proc.cpu_times(), time.monotonic()
        while not self._stop.wait(self.every):
            now = {k: _counter(metrics.MESSAGES_RECEIVED, type=k) for k in self.KINDS}
            cpu1, t1 = proc.cpu_times(), time.monotonic()
            wall = t1 - t
            rates = " ".join(f"{k}={(now[k] - last[k]) / wall:.0f}/s" for k in self.KINDS)
            depth = " ".join(f"{c}={metrics.INGEST_QUEUE_DEPTH.labels(**{'class': c})._value.get():.0f}"
                             for c in ("heartbeat", "event", "sample", "drift"))
            blocked = sum(s.value for s in metrics.INGEST_BLOCKED_SECONDS.collect()[0].samples
                          if s.name.endswith("_total"))
            server_cpu = 100 * ((cpu1.user + cpu1.system) - (cpu.user + cpu.system)) / wall
            passes1 = self._passes(metrics)
            n, took = passes1[0] - passes[0], passes1[1] - passes[1]
            controller = f"{n:.0f} passes, {took / n:.2f} s each" if n else "no pass"
            print(f"  [{time.strftime('%H:%M:%S')}] received {rates} | queued {depth} | network thread blocked "
                  f"{blocked:.1f} s in all | rollout controller {controller} | server CPU {server_cpu:.0f} % | "
                  f"simulator: {self._sim_line()}", file=sys.stderr, flush=True)
            last, cpu, t, passes = now, cpu1, t1, passes1

    @staticmethod
    def _passes(metrics) -> tuple[float, float]:
        """Rollout controller passes so far and the seconds they took (its histogram's count and sum)."""
        samples = {s.name: s.value for s in metrics.ROLLOUT_PASS_SECONDS.collect()[0].samples}
        return (next((v for k, v in samples.items() if k.endswith("_count")), 0.0),
                next((v for k, v in samples.items() if k.endswith("_sum")), 0.0))

    def _sim_line(self) -> str:
        try:
            lines = self.sim_log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "-"
        return lines[-1][:200] if lines else "-"


def _wait(what, check, timeout, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


def _versions(ctx, ids) -> dict:
    from sqlalchemy import func, select

    from server.db.models import Device

    with ctx.sessions() as session:
        return dict(session.execute(select(Device.active_version, func.count()).where(Device.id.in_(ids))
                                    .group_by(Device.active_version)).all())


def _online(ctx, ids) -> int:
    from sqlalchemy import func, select

    from server.db.models import Device

    with ctx.sessions() as session:
        return session.scalar(select(func.count()).select_from(Device).where(Device.id.in_(ids),
                                                                             Device.online.is_(True)))


def seed_versions(ctx, versions: int) -> None:
    from server import registry
    from server.db import models as db

    with ctx.sessions() as session:
        for version in range(1, versions + 1):
            session.add(db.ModelVersion(version=version, name="defects", status="production" if version == 1
                                        else "candidate", bundle_key=f"models/defects/{version}/bundle.tar",
                                        bundle_sha256="ab" * 32, bundle_size=8_000_000,
                                        class_names=["scratch", "dent", "stain"], metrics={}, gate={"passed": True}))
        session.flush()
        registry.set_alias(session, "production", 1)
        session.commit()


def run_size(server, broker, n: int, args, version: int, tmp: Path) -> dict:
    """One fleet of ``n`` devices: enroll, steady window, direct deploy of ``version``, rollout of
    ``version + 1``. Returns the figures."""
    from edgeloop.simulator.credentials import device_ids, enroll, save_credentials
    from server import metrics

    proc = psutil.Process()
    prefix = f"b{uuid.uuid4().hex[:4]}"
    t0 = time.monotonic()
    creds = enroll(server.url, ADMIN, device_ids(n, prefix))
    provision_s = time.monotonic() - t0
    ids = [c.device_id for c in creds]
    cred_file, out_file, sim_log = tmp / f"creds-{n}.json", tmp / f"sim-{n}.json", tmp / f"sim-{n}.log"
    save_credentials(cred_file, creds)

    kinds = ("heartbeat", "status", "update", "shadow", "drift")
    received0 = {k: _counter(metrics.MESSAGES_RECEIVED, type=k) for k in kinds}
    coalesced0 = metrics.INGEST_COALESCED._value.get()

    def counted_heartbeats() -> float:
        # Handled, or superseded by the same device's next one before the flush (the latest wins).
        return (_counter(metrics.MESSAGES_RECEIVED, type="heartbeat") - received0["heartbeat"]
                + metrics.INGEST_COALESCED._value.get() - coalesced0)
    # The simulator's output goes to a file, never an unread pipe: a full pipe would block its
    # event loop (every device at once) the first time it logs more than 64 KiB.
    sim_out = sim_log.open("w")
    sim = subprocess.Popen(
        [sys.executable, "-m", "edgeloop", "simulate", "--devices", str(n), "--credentials", str(cred_file),
         "--mqtt-host", broker.host, "--mqtt-port", str(broker.port), "--heartbeat-seconds",
         str(args.heartbeat_seconds), *(["--shadow-seconds", str(args.shadow_seconds)] if args.shadow_seconds else []),
         "--drift-seconds", str(args.drift_seconds),
         "--connects-per-second", "1000", "--json", str(out_file)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=sim_out, stderr=subprocess.STDOUT)
    sim_ps = psutil.Process(sim.pid)
    monitor = _Monitor(sim_log).__enter__()
    try:
        t0 = time.monotonic()
        _wait("every device online", lambda: _online(server.ctx, ids) == n, 120 + n / 50)
        online_s = time.monotonic() - t0
        time.sleep(2 * args.heartbeat_seconds)  # let the connection ramp settle

        # Steady window: ingest rate, lag, server CPU.
        lag0 = {k: _hist(metrics.INGEST_LAG, k) for k in ("heartbeat",)}
        rec0 = {k: _counter(metrics.MESSAGES_RECEIVED, type=k) for k in kinds}
        cpu0, sim_cpu0, w0 = proc.cpu_times(), sim_ps.cpu_times(), time.monotonic()
        time.sleep(args.window)
        wall = time.monotonic() - w0
        cpu1, sim_cpu1 = proc.cpu_times(), sim_ps.cpu_times()
        rates = {k: round((_counter(metrics.MESSAGES_RECEIVED, type=k) - rec0[k]) / wall, 1) for k in kinds}
        lag1 = _hist(metrics.INGEST_LAG, "heartbeat")
        steady = {
            "seconds": round(wall, 1), "ingested_per_s": rates,
            "heartbeat_lag_ms": {"p50": _ms(_quantile(lag0["heartbeat"], lag1, 0.5)),
                                 "p99": _ms(_quantile(lag0["heartbeat"], lag1, 0.99))},
            "server_cpu_percent": round(100 * ((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)) / wall, 1),
            "simulator_cpu_percent": round(100 * ((sim_cpu1.user + sim_cpu1.system)
                                                  - (sim_cpu0.user + sim_cpu0.system)) / wall, 1),
            "server_rss_mb": round(proc.memory_info().rss / 2**20, 1),
            "simulator_rss_mb": round(sim_ps.memory_info().rss / 2**20, 1),
        }
        print(f"  steady window: {json.dumps(steady)}", file=sys.stderr, flush=True)  # kept if a later phase fails

        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=120) as api:
            # Fan-out: one direct deploy to every device; every ACTIVE seen by the server.
            t_post = time.time()
            r = api.post("/api/v1/deployments", json={"version": version, "devices": ids, "mode": "direct"})
            r.raise_for_status()
            posted_s = time.time() - t_post
            _wait("every device on the deployed version", lambda: _versions(server.ctx, ids) == {version: n},
                  120 + n / 20)
            acks_s = time.time() - t_post
            print(f"  direct deploy to {n}: API {posted_s:.2f} s, every device on it {acks_s:.2f} s",
                  file=sys.stderr, flush=True)

            # A whole rollout canary -> 100 %.
            t_roll = time.monotonic()
            r = api.post("/api/v1/rollouts", json={
                "version": version + 1, "selector": {"devices": ids},
                "waves": [{"name": "canary", "count": max(1, n // 100)}, {"name": "fleet", "percent": 100}],
                "gates": {"min_frames": 100, "min_shadow_seconds": 1, "max_latency_ratio": 5.0},
                "reason": "benchmark"})
            if r.status_code == 422:  # no device selector in this build: the whole fleet
                r = api.post("/api/v1/rollouts", json={
                    "version": version + 1,
                    "waves": [{"name": "canary", "count": max(1, n // 100)}, {"name": "fleet", "percent": 100}],
                    "gates": {"min_frames": 100, "min_shadow_seconds": 1, "max_latency_ratio": 5.0},
                    "reason": "benchmark"})
            r.raise_for_status()
            rid = r.json()["id"]
            # Polled once a second without the per-device lists, as a dashboard's summary would.
            body = _wait("the rollout to finish", lambda: (lambda b: b if b["state"] in
                          {"succeeded", "paused", "aborted", "rolled_back"} else None)(
                api.get(f"/api/v1/rollouts/{rid}", params={"devices": "false"}).json()), 300 + n / 10, every=1.0)
            rollout_s = time.monotonic() - t_roll
        rss_peak = proc.memory_info().rss
    except BaseException:
        print(f"fleet of {n} failed; the simulator's last lines ({sim_log}):", file=sys.stderr)
        print("\n".join(sim_log.read_text(errors="replace").splitlines()[-20:]), file=sys.stderr)
        raise
    finally:
        monitor.__exit__(None, None, None)
        sim.send_signal(2)  # SIGINT: the simulator says goodbye and writes its counters
        try:
            sim.wait(60)
        except subprocess.TimeoutExpired:
            sim.kill()
        sim_out.close()
    counters = json.loads(out_file.read_text()) if out_file.exists() else {}
    sent_hb = counters.get("sent", {}).get("heartbeat", 0)
    with contextlib.suppress(RuntimeError):  # what is still missing then is reported as lost
        _wait("ingest to drain", lambda: counted_heartbeats() >= sent_hb, 30)
    counted_hb = counted_heartbeats()
    deploy_span = counters.get("command_times", {}).get(f"deploy:v{version}")  # the direct deploy's, not the rollout's
    return {
        "devices": n,
        "provisioning": {"seconds": round(provision_s, 2), "devices_per_s": round(n / provision_s, 1)},
        "all_online_seconds": round(online_s, 1),
        "steady": steady,
        "heartbeats": {"sent": sent_hb, "counted": int(counted_hb), "lost": int(sent_hb - counted_hb)},
        "simulator": {k: counters.get(k) for k in ("sent", "acked", "refused", "commands", "connect_failures",
                                                  "disconnects")},
        "deploy_fanout": {"api_seconds": round(posted_s, 2),
                          "all_received_seconds": round(deploy_span[1] - t_post, 2) if deploy_span else None,
                          "all_acknowledged_seconds": round(acks_s, 2)},
        "rollout": {"state": body["state"], "seconds": round(rollout_s, 1)},
        "server_rss_mb_end": round(rss_peak / 2**20, 1),
    }


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[1000])
    parser.add_argument("--baseline", type=int, default=100, help="fleet size measured first, same run (0: none)")
    parser.add_argument("--heartbeat-seconds", type=float, default=5.0)
    parser.add_argument("--drift-seconds", type=float, default=60.0)
    parser.add_argument("--shadow-seconds", type=float, default=None,
                        help="one shadow report this often per shadowing device (default: as an agent does, one "
                             "per window of the deploy's shadow_frames at the device's frame rate; the server "
                             "lengthens the windows of a large wave to its max_shadow_reports_per_second)")
    parser.add_argument("--window", type=float, default=20.0, help="steady-state window, seconds")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from dashboard_kit import LiveServer

    from server.logging import configure_logging
    from server.settings import RolloutPolicy, ServerSettings
    from server.stack.mosquitto import MosquittoBroker
    from server.stack.seaweedfs import SeaweedS3

    configure_logging()  # as `edgeloop server` does: info and up, structured
    root = Path(tempfile.mkdtemp(prefix="edgeloop-fleet-bench-"))
    os.chmod(root, 0o755)
    broker, s3 = MosquittoBroker(root / "mqtt"), SeaweedS3(root / "s3")
    sizes = ([args.baseline] if args.baseline else []) + args.devices
    results = []
    started = time.monotonic()
    try:
        (root / "mqtt").mkdir()
        broker.start()
        s3.start()
        settings = ServerSettings(
            data_dir=root / "server", database_url=f"sqlite:///{root / 'edgeloop.db'}", port=LiveServer.free_port(),
            mqtt_host=broker.host, mqtt_port=broker.port, mqtt_username=broker.server_username,
            mqtt_password=broker.server_password, mqtt_password_file=broker.password_file,
            mqtt_broker_pid_file=broker.pid_file, mqtt_broker_log_file=broker.log_file,
            s3_endpoint=s3.endpoint, s3_access_key=s3.access_key, s3_secret_key=s3.secret_key, s3_bucket="bench",
            admin_token=ADMIN, rollouts=RolloutPolicy(reconcile_seconds=0.5, resend_seconds=30,
                                                      device_timeout_seconds=600, lease_seconds=10))
        server = LiveServer(settings).start()
        try:
            seed_versions(server.ctx, 1 + 2 * len(sizes))
            for i, n in enumerate(sizes):
                print(f"fleet of {n} ...", flush=True)
                result = run_size(server, broker, n, args, version=2 + 2 * i, tmp=root)
                results.append(result)
                print(json.dumps(result), flush=True)
        finally:
            server.stop()
    finally:
        s3.stop()
        broker.stop()
        shutil.rmtree(root, ignore_errors=True)
    report = {"baseline_devices": args.baseline or None, "runs": results, "load_average": os.getloadavg(),
              "heartbeat_seconds": args.heartbeat_seconds, "shadow_seconds": args.shadow_seconds,
              "total_seconds": round(time.monotonic() - started, 1)}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
