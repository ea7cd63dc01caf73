"""Provisioning devices: the per-device path against bulk enrollment, per broker-account backend.

    .venv/bin/python benchmarks/provisioning.py [--baseline-n 200] [--n 10000] [--dynsec-n 10000] [--json PATH]

One process: the real server app (FastAPI TestClient, SQLite), a real Mosquitto and a real SeaweedFS
S3 gateway, all started here. Each run provisions fresh device ids, end to end through the API:

1. **baseline** (``per_device``): ``--baseline-n`` calls of ``POST /api/v1/devices``, one device each,
   as before bulk enrollment: every call runs ``mosquitto_passwd`` on the password file and reloads
   the broker (waiting until it logged the reload).
2. **bulk, password file** (``bulk_password_file``): one ``POST /api/v1/devices/bulk`` with a CSV
   of ``--n`` devices: one transaction, hashes computed in-process, one password-file write and
   one reload.
3. **bulk, dynamic security** (``bulk_dynamic_security``): the same call of ``--dynsec-n`` devices
   against a Mosquitto started with the dynamic-security plugin (``broker_accounts=dynamic_security``),
   accounts created with ``createClient`` commands over ``$CONTROL/dynamic-security/v1``.

Each figure is devices/s and its ratio to the baseline's rate (same run, same machine); the
seconds spent in the broker-account batch itself are given beside the total. After each run a few
of its devices connect with their credentials and publish on their own topic (a publish on another
device's topic must be refused), so a fast figure is never one of accounts that do not work.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ADMIN = "bench-admin-" + uuid.uuid4().hex


def _settings(broker, s3, tmp: Path, **overrides):
    from server.settings import ServerSettings

    values = dict(
        data_dir=tmp / "server", database_url=f"sqlite:///{tmp / 'bench.db'}",
        mqtt_host=broker.host, mqtt_port=broker.port,
        mqtt_username=broker.server_username, mqtt_password=broker.server_password,
        mqtt_password_file=broker.password_file, mqtt_broker_pid_file=broker.pid_file,
        mqtt_broker_log_file=broker.log_file,
        s3_endpoint=s3.endpoint, s3_access_key=s3.access_key, s3_secret_key=s3.secret_key,
        s3_bucket=f"bench-{uuid.uuid4().hex[:8]}", admin_token=ADMIN,
    )
    values.update(overrides)
    return ServerSettings(**values)


class _Timed:
    """Wraps the app's accounts object to time its calls."""

    def __init__(self, inner):
        self.inner, self.seconds, self.calls = inner, 0.0, 0

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if name not in ("add_user", "add_users", "remove_user", "remove_users"):
            return attr

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t
                self.calls += 1
        return timed


def _client(settings):
    from fastapi.testclient import TestClient

    from server.app import create_app

    client = TestClient(create_app(settings))
    client.headers["Authorization"] = f"Bearer {ADMIN}"
    return client


def _check(broker, creds: list[dict]) -> dict:
    """A few devices connect and publish on their own topic; another device's topic is refused (0x87)."""
    sys.path.insert(0, str(ROOT / "tests" / "integration"))
    from fleet_kit import NOT_AUTHORIZED, MqttClient

    from protocol import Channel, device_topic

    picks = [creds[0], creds[len(creds) // 2], creds[-1]]
    for mine, other in zip(picks, picks[1:] + picks[:1], strict=True):
        client = MqttClient(broker, mine["mqtt_username"], mine["mqtt_password"])
        try:
            if client.connect().is_failure:
                raise SystemExit(f"{mine['device_id']} cannot connect with its credentials")
            if client.publish(device_topic(mine["device_id"], Channel.HEARTBEAT), b"{}").is_failure:
                raise SystemExit(f"{mine['device_id']} cannot publish on its own topic")
            if client.publish(device_topic(other["device_id"], Channel.HEARTBEAT), b"{}").value != NOT_AUTHORIZED:
                raise SystemExit(f"{mine['device_id']} was allowed to publish on {other['device_id']}'s topic")
        finally:
            client.close()
    return {"devices_checked": len(picks), "own_topic": "accepted", "other_device_topic": "0x87 Not authorized"}


def _ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}-{i:05d}" for i in range(n)]


def run_per_device(settings, broker, n: int) -> dict:
    with _client(settings) as client:
        timed = client.app.state.ctx.accounts = _Timed(client.app.state.ctx.accounts)
        creds = []
        t = time.perf_counter()
        for device_id in _ids("base", n):
            response = client.post("/api/v1/devices", json={"device_id": device_id, "groups": ["line-1"]})
            if response.status_code != 201:
                raise SystemExit(f"POST /devices {device_id}: {response.status_code} {response.text}")
            creds.append(response.json())
        seconds = time.perf_counter() - t
        check = _check(broker, creds)
    return {"devices": n, "seconds": round(seconds, 2), "devices_per_s": round(n / seconds, 1),
            "broker_seconds": round(timed.seconds, 2), "broker_calls": timed.calls, "check": check}


def run_bulk(settings, broker, n: int, prefix: str) -> dict:
    from server.bulk_enroll import BulkDevice, to_csv

    body = to_csv(BulkDevice(d, (f"line-{i % 8}",), ("bench",)) for i, d in enumerate(_ids(prefix, n)))
    with _client(settings) as client:
        timed = client.app.state.ctx.accounts = _Timed(client.app.state.ctx.accounts)
        t = time.perf_counter()
        response = client.post("/api/v1/devices/bulk", content=body, headers={"Content-Type": "text/csv"})
        seconds = time.perf_counter() - t
        if response.status_code != 201:
            raise SystemExit(f"POST /devices/bulk: {response.status_code} {response.text[:500]}")
        creds = response.json()["items"]
        check = _check(broker, creds)
        total = client.get("/api/v1/devices", params={"limit": 1}).json()["total"]
    return {"devices": n, "seconds": round(seconds, 2), "devices_per_s": round(n / seconds, 1),
            "broker_seconds": round(timed.seconds, 2), "broker_calls": timed.calls,
            "rest_seconds": round(seconds - timed.seconds, 2), "devices_in_db": total,
            "body_bytes": len(body), "check": check}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline-n", type=int, default=200, help="devices provisioned one call each")
    parser.add_argument("--n", type=int, default=10_000, help="devices in the bulk call (password file)")
    parser.add_argument("--dynsec-n", type=int, default=10_000, help="devices in the bulk call (dynamic "
                        "security); 0 skips it")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    import structlog

    from server.stack.mosquitto import MosquittoBroker
    from server.stack.seaweedfs import SeaweedS3

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))  # errors only
    work = Path(tempfile.mkdtemp(prefix="edgeloop-bench-prov-"))
    os.chmod(work, 0o755)
    started = time.perf_counter()
    load_before = os.getloadavg()
    s3 = SeaweedS3(work / "s3")
    plain = MosquittoBroker(work / "mosquitto")
    dynsec = MosquittoBroker(work / "mosquitto-dynsec", dynamic_security=True)
    results: dict = {}
    try:
        s3.start()
        plain.start()
        print(f"baseline: {args.baseline_n} x POST /api/v1/devices (password file + reload each)", flush=True)
        results["per_device"] = run_per_device(_settings(plain, s3, work / "a"), plain, args.baseline_n)
        print(f"  {results['per_device']}", flush=True)
        print(f"bulk, password file: one POST /api/v1/devices/bulk of {args.n}", flush=True)
        results["bulk_password_file"] = run_bulk(_settings(plain, s3, work / "b"), plain, args.n, "pwf")
        print(f"  {results['bulk_password_file']}", flush=True)
        if args.dynsec_n:
            dynsec.start()
            settings = _settings(dynsec, s3, work / "c", broker_accounts="dynamic_security",
                                 mqtt_password_file=None, mqtt_broker_pid_file=None, mqtt_broker_log_file=None,
                                 mqtt_dynsec_username=dynsec.dynsec_username,
                                 mqtt_dynsec_password=dynsec.dynsec_password)
            print(f"bulk, dynamic security: one POST /api/v1/devices/bulk of {args.dynsec_n}", flush=True)
            results["bulk_dynamic_security"] = run_bulk(settings, dynsec, args.dynsec_n, "dyn")
            print(f"  {results['bulk_dynamic_security']}", flush=True)
    finally:
        dynsec.stop()
        plain.stop()
        s3.stop()
        shutil.rmtree(work, ignore_errors=True)
    base_rate = results["per_device"]["devices_per_s"]
    for key in ("bulk_password_file", "bulk_dynamic_security"):
        if key in results:
            results[key]["vs_per_device"] = round(results[key]["devices_per_s"] / base_rate, 1)
            results[key]["seconds_for_10000"] = round(10_000 / results[key]["devices_per_s"], 1)
    results["per_device"]["seconds_for_10000"] = round(10_000 / base_rate, 1)
    report = {
        "results": results,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_before": [round(x, 2) for x in load_before],
                    "load_after": [round(x, 2) for x in os.getloadavg()]},
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    print()
    print(f"{'run':<24}{'devices':>8}{'seconds':>9}{'dev/s':>9}{'broker s':>10}{'vs baseline':>13}")
    for key, r in results.items():
        print(f"{key:<24}{r['devices']:>8}{r['seconds']:>9}{r['devices_per_s']:>9}{r['broker_seconds']:>10}"
              f"{r.get('vs_per_device', 1.0):>12}x")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
