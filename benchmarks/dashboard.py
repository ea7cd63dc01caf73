"""The dashboard's fleet view at fleet scale: live-topic size, inventory page, and Chromium render time.

    .venv/bin/python benchmarks/dashboard.py [--small 100] [--large 10000] [--json PATH]

One process: the real server app behind uvicorn (SQLite, no MQTT) and a real SeaweedFS S3
gateway, both started here, and Debian's Chromium driven by Playwright. For each fleet size the
database gets that many devices (20 groups, tags, heartbeats, versions); then:

- ``fleet_topic_bytes`` / ``fleet_topic_ms``: the live "fleet" topic every open dashboard receives
  when the fleet changes (its JSON size) and the time to compute it (median of 5);
- ``page_bytes`` / ``page_ms`` / ``filtered_page_ms``: one page of ``GET /api/v1/devices`` (100
  devices), unfiltered and filtered by group and id search (median of 5);
- ``first_table_ms``: Chromium, from navigating to the signed-in dashboard until the device table
  shows its first rows; ``filter_ms``: from choosing a group until the table shows that group.

The baseline is the small fleet, measured in the same run: each large-fleet figure is given as a
ratio to it, so a figure near 1 means the dashboard does not grow with the fleet.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "integration"))

from dashboard_kit import CHROMIUM, CHROMIUM_ARGS  # noqa: E402  (the browser test's Chromium)

ADMIN = "bench-admin-" + uuid.uuid4().hex
GROUPS = 20


def _median_ms(fn, n: int = 5) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def seed(sessions, n: int) -> None:
    from sqlalchemy import insert

    from server.db.models import Device, DeviceLabel

    now = datetime.now(UTC)
    devices, labels = [], []
    for i in range(n):
        device_id = f"cam-{i:05d}"
        devices.append({"id": device_id, "online": i % 10 != 0, "revoked": False, "agent_version": "0.1.0",
                        "last_seen": now - timedelta(seconds=i % 300), "active_version": 1 + (i % 3 == 0),
                        "candidate_version": None, "update_state": "ACTIVE",
                        "hardware": {"gpu": "cpu"}, "groups": [], "tags": [],
                        "last_heartbeat": {"fps": 20 + i % 7, "latency_ms_p50": 4.0, "latency_ms_p99": 9.0,
                                           "spool_depth": i % 5}})
        labels.append({"device_id": device_id, "kind": "group", "value": f"line-{i % GROUPS + 1:02d}"})
        labels.append({"device_id": device_id, "kind": "tag", "value": "camera" if i % 2 else "thermal"})
    with sessions() as session:
        for rows, model in ((devices, Device), (labels, DeviceLabel)):
            for start in range(0, len(rows), 2000):
                session.execute(insert(model), [{k: v for k, v in r.items() if k not in ("groups", "tags")}
                                                for r in rows[start:start + 2000]])
        session.commit()


def measure(n: int, s3, browser, workdir: Path) -> dict:
    import httpx
    import uvicorn

    from server.api import live_views
    from server.app import create_app
    from server.settings import ServerSettings
    from server.stack.ports import find_free_port

    port = find_free_port()
    settings = ServerSettings(data_dir=workdir / f"n{n}", database_url=f"sqlite:///{workdir / f'n{n}.db'}",
                              port=port, admin_token=ADMIN, s3_endpoint=s3.endpoint, s3_access_key=s3.access_key,
                              s3_secret_key=s3.secret_key, s3_bucket=f"dash-{uuid.uuid4().hex[:8]}")
    app = create_app(settings, connect_mqtt=False)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on",
                                           timeout_graceful_shutdown=3))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        ctx = app.state.ctx
        seed(ctx.sessions, n)
        out: dict = {"devices": n}
        with ctx.sessions() as session:
            view = live_views.fleet_view(session, settings)
            out["fleet_topic_bytes"] = len(json.dumps(view, default=str))
            out["fleet_topic_ms"] = _median_ms(lambda: live_views.fleet_view(session, settings))
        assert view["total"] == n, view["total"]
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60) as api:
            page = api.get("/api/v1/devices", params={"limit": 100})
            out["page_bytes"] = len(page.content)
            out["page_ms"] = _median_ms(lambda: api.get("/api/v1/devices", params={"limit": 100}).raise_for_status())
            out["filtered_page_ms"] = _median_ms(lambda: api.get(
                "/api/v1/devices", params={"limit": 100, "group": "line-03", "q": "7"}).raise_for_status())
        context = browser.new_context(viewport={"width": 1440, "height": 1000})
        p = context.new_page()
        errors: list[str] = []
        p.on("pageerror", lambda e: errors.append(str(e)))
        p.goto(url + "/login")
        p.fill("#token", ADMIN)
        p.click("button[type=submit]")
        p.wait_for_selector("#live.on", timeout=60_000)
        start = time.perf_counter()
        p.reload()
        p.wait_for_selector("#fleet-table tr[data-device]", timeout=60_000)
        out["first_table_ms"] = (time.perf_counter() - start) * 1000
        start = time.perf_counter()
        p.select_option("#f-group", "line-03")
        p.wait_for_function("""() => [...document.querySelectorAll('#fleet-table tr[data-device]')].length > 0 &&
            [...document.querySelectorAll('#fleet-table tr[data-device]')].every(r => r.textContent.includes('line-03'))""",
                            timeout=60_000)
        out["filter_ms"] = (time.perf_counter() - start) * 1000
        out["page_errors"] = errors
        context.close()
        return out
    finally:
        server.should_exit = True
        thread.join(30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", type=int, default=100, help="the baseline fleet size")
    parser.add_argument("--large", type=int, default=10_000)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    from server.stack.seaweedfs import SeaweedS3

    workdir = Path(tempfile.mkdtemp(prefix="edgeloop-bench-dashboard-"))
    s3 = SeaweedS3(workdir / "s3")
    s3.start()
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                runs = [measure(n, s3, browser, workdir) for n in (args.small, args.large)]
            finally:
                browser.close()
    finally:
        s3.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    small, large = runs
    ratios = {k: round(large[k] / small[k], 2) for k in small if isinstance(small[k], (int, float)) and k != "devices"
              and small[k]}
    result = {"benchmark": "dashboard", "machine": platform.processor() or platform.machine(), "small": small,
              "large": large, "large_over_small": ratios}
    for run in runs:
        print(f"{run['devices']:>6} devices: fleet topic {run['fleet_topic_bytes']:,} B in {run['fleet_topic_ms']:.1f} ms; "
              f"page {run['page_bytes']:,} B in {run['page_ms']:.1f} ms (filtered {run['filtered_page_ms']:.1f} ms); "
              f"Chromium: table {run['first_table_ms']:.0f} ms, filter {run['filter_ms']:.0f} ms"
              + (f"; page errors {run['page_errors']}" if run["page_errors"] else ""))
    print("large / small:", ", ".join(f"{k} {v}x" for k, v in ratios.items()))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if not any(r["page_errors"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
