"""The dashboard in a real headless Chromium (Debian's, driven by Playwright): an operator signs in
with a token, watches a rollout advance wave by wave without reloading, presses Pause and sees it
paused; a viewer sees the same page without any action button; an engineer also gets "Retrain now".

Real server (uvicorn on a port, this test's own Mosquitto and SeaweedFS, SQLite), the real rollout
controller, and four simulated devices over MQTT that answer its commands (tests/integration/
dashboard_kit.py). Set EDGELOOP_DASHBOARD_SCREENSHOT=docs/dashboard.png to refresh the README's
screenshot (else it goes to the test's tmp folder).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
pytest.register_assert_rewrite("dashboard_kit")
from dashboard_kit import CHROMIUM, CHROMIUM_ARGS, LiveServer, SimulatedDevice, seed_dashboard, wait_for  # noqa: E402

from server.auth import Role  # noqa: E402

pytestmark = pytest.mark.e2e

ADMIN = "dashboard-e2e-admin-token"
DEVICES = ["line1-cam1", "line1-cam2", "line2-cam1", "line2-cam2"]
WAVES = [{"name": "canary", "count": 1}, {"name": "half", "percent": 50}, {"name": "all", "percent": 100}]


@pytest.fixture(scope="module")
def stack():
    from server.stack.mosquitto import MosquittoBroker
    from server.stack.seaweedfs import SeaweedS3

    root = Path(tempfile.mkdtemp(prefix="edgeloop-dashboard-e2e-"))
    os.chmod(root, 0o711)  # Mosquitto runs as its own user and must reach its folder
    broker, s3 = MosquittoBroker(root / "mosquitto"), SeaweedS3(root / "seaweedfs")
    try:
        broker.start()
        s3.start()
        yield root, broker, s3
    finally:
        broker.stop()
        s3.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def plant(stack):
    """The server, seeded, with four simulated devices online on v1."""
    from server.settings import RolloutPolicy, ServerSettings

    root, broker, s3 = stack
    settings = ServerSettings(
        data_dir=root / "server", database_url=f"sqlite:///{root / 'edgeloop.db'}", port=LiveServer.free_port(),
        mqtt_host=broker.host, mqtt_port=broker.port, mqtt_username=broker.server_username,
        mqtt_password=broker.server_password, mqtt_password_file=broker.password_file,
        mqtt_broker_pid_file=broker.pid_file, mqtt_broker_log_file=broker.log_file,
        s3_endpoint=s3.endpoint, s3_access_key=s3.access_key, s3_secret_key=s3.secret_key, s3_bucket="dashboard",
        admin_token=ADMIN,
        rollouts=RolloutPolicy(reconcile_seconds=0.5, resend_seconds=5, device_timeout_seconds=120))
    server = LiveServer(settings).start()
    devices = []
    try:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {ADMIN}"}) as admin:
            for i, device_id in enumerate(DEVICES):
                response = admin.post("/api/v1/devices", json={"device_id": device_id, "groups": [f"line-{1 + i // 2}"],
                                                               "tags": ["dayshift"]})
                assert response.status_code == 201, response.text
                creds = response.json()
                devices.append(SimulatedDevice(broker, device_id, creds["mqtt_username"], creds["mqtt_password"]))
        seed_dashboard(server.ctx, devices=DEVICES)
        for device in devices:
            device.start()
        wait_for("every device online on v1", lambda: _fleet(server) == {d: (True, 1) for d in DEVICES}, 30)
        yield server
    finally:
        for device in devices:
            device.stop()
        server.stop()


def _fleet(server: LiveServer) -> dict:
    from server.db.models import Device

    with server.ctx.sessions() as session:
        return {d.id: (d.online, d.active_version) for d in session.query(Device).all()}


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: deploy/setup.sh installs Debian's chromium", pytrace=False)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


class Page:
    """A signed-in page that records script errors and CSP violations."""

    def __init__(self, browser, server: LiveServer, token: str) -> None:
        self.context = browser.new_context(viewport={"width": 1440, "height": 1000})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        self.page.on("console", lambda m: self.errors.append(f"console: {m.text}") if m.type == "error" else None)
        self.page.goto(server.url + "/login")
        self.page.fill("#token", token)
        self.page.click("button[type=submit]")
        self.page.wait_for_selector("#live.on", timeout=15_000)
        # A marker that a reload would lose: everything below must arrive live.
        self.page.evaluate("window.__noReload = true")

    def tab(self, name: str) -> None:
        self.page.click(f"nav.tabs button[data-tab={name}]")

    def still_same_page(self) -> bool:
        return self.page.evaluate("window.__noReload === true")

    def close(self) -> None:
        self.context.close()


def _wave_progress(page, rollout_id: int) -> list[tuple[str, float]]:
    """(state, progress value) of each wave of the rollout, as drawn."""
    return page.evaluate("""id => [...document.querySelectorAll(`.rollout[data-rollout="${id}"] .wave`)].map(w =>
        [w.querySelector('.chip').textContent, Number(w.querySelector('progress').value)])""", rollout_id)


def _api(server: LiveServer, token: str) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"})


def test_operator_watches_a_rollout_advance_and_pauses_it(plant, browser, tmp_path):
    operator = plant.token(Role.OPERATOR, "olga")
    ui = Page(browser, plant, operator)
    try:
        ui.tab("rollouts")
        ui.page.wait_for_selector("#rollouts .empty")  # nothing running yet
        with _api(plant, operator) as api:
            response = api.post("/api/v1/rollouts", json={
                "version": 2, "waves": WAVES, "gates": {"min_frames": 200, "min_shadow_seconds": 3},
                "reason": "v2: better on line 2's new lighting"})
            assert response.status_code == 201, response.text
            rollout_id = response.json()["id"]
        card = f'.rollout[data-rollout="{rollout_id}"]'
        ui.page.wait_for_selector(card, timeout=15_000)  # appeared without a reload

        # Watch the waves move: record every distinct drawing until the canary has passed and the
        # next wave is under way.
        seen: list[list[tuple[str, float]]] = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            waves = _wave_progress(ui.page, rollout_id)
            if not seen or waves != seen[-1]:
                seen.append(waves)
            if len(waves) == 3 and waves[0][0] == "passed" and waves[1][0] == "running":
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"the canary never passed on the page; drawn states: {seen}")
        canary = [w[0] for w in seen]
        assert canary[0][0] in ("pending", "running") and canary[0][1] < 1, seen  # it started from nothing
        assert any(0 < w[0][1] < 1 for w in seen), f"no partial canary progress was drawn: {seen}"
        assert len(seen) >= 3 and ui.still_same_page()
        gate = ui.page.locator(f'{card} .wave[data-wave="0"] .gate[data-gate="min_agreement"]')
        assert "0.960" in gate.inner_text() and "0.800" in gate.inner_text()

        # The picture for the README: the next wave shadowing, the agreement chart drawn (a few
        # seconds at most; the wave's min_shadow_seconds keeps it running meanwhile).
        with contextlib.suppress(PlaywrightTimeout):
            ui.page.wait_for_selector("#chart-agreement .uplot", timeout=4_000)
            ui.page.wait_for_function("""id => [...document.querySelectorAll(
                `.rollout[data-rollout="${id}"] .wave[data-wave="1"] tr[data-device] .chip`)].some(c =>
                c.textContent === 'shadowing')""", arg=rollout_id, timeout=4_000)
        shot = Path(os.environ.get("EDGELOOP_DASHBOARD_SCREENSHOT") or tmp_path / "dashboard.png")
        shot.parent.mkdir(parents=True, exist_ok=True)
        ui.page.screenshot(path=str(shot), full_page=False)

        # Pause, with a confirmation and a reason; the state changes on the page, live.
        ui.page.click(f'{card} button[data-action="rollout.pause"]')
        ui.page.wait_for_selector("dialog#confirm[open]")
        ui.page.fill("#confirm-reason", "line 2 is changing shifts")
        ui.page.click("#confirm-ok")
        ui.page.wait_for_selector(f'{card}[data-state="paused"] .rollout-state .chip.paused', timeout=15_000)
        assert ui.page.locator(f'{card} button[data-action="rollout.resume"]').count() == 1
        assert ui.page.locator(f'{card} button[data-action="rollout.pause"]').count() == 0
        assert ui.still_same_page()
        with _api(plant, operator) as api:
            assert api.get(f"/api/v1/rollouts/{rollout_id}").json()["state"] == "paused"
            pause = api.get("/api/v1/audit", params={"action": "rollout.pause"}).json()["items"][0]
            assert (pause["actor"], pause["detail"]["reason"]) == ("olga", "line 2 is changing shifts")

        assert ui.errors == [], ui.errors

        # A refused action shows the API's reason: approving a paused rollout is a 409.
        ui.page.evaluate("""id => { const b = document.createElement('button'); b.dataset.action = 'rollout.approve';
            b.dataset.id = id; b.id = 'forced'; document.body.appendChild(b); }""", rollout_id)
        ui.page.click("#forced")
        ui.page.click("#confirm-ok")
        toast = ui.page.wait_for_selector(".toast.error")
        assert "409" in toast.inner_text() and "paused" in toast.inner_text()
    finally:
        ui.close()


def test_buttons_follow_the_role(plant, browser):
    viewer = Page(browser, plant, plant.token(Role.VIEWER, "vera"))
    try:
        for tab in ("rollouts", "models", "data", "pipeline"):
            viewer.tab(tab)
            viewer.page.wait_for_timeout(300)
        viewer.page.wait_for_selector("#models-table tr[data-model]", state="attached")
        viewer.page.wait_for_selector("#rollouts .card", state="attached")
        viewer.page.wait_for_selector("#jobs .card")
        assert viewer.page.locator("button[data-action]").count() == 0
        assert viewer.errors == [], viewer.errors
    finally:
        viewer.close()
    operator = Page(browser, plant, plant.token(Role.OPERATOR, "otto"))
    try:
        operator.tab("models")
        operator.page.wait_for_selector('button[data-action="model.approve"]')
        operator.tab("pipeline")
        operator.page.wait_for_selector("#jobs .card")
        assert operator.page.locator('button[data-action="retrain"]').count() == 0
        operator.tab("data")
        operator.page.wait_for_selector("#data-quarantine table")
        assert operator.page.locator('button[data-action="quarantine.release"]').count() == 0
    finally:
        operator.close()
    engineer = Page(browser, plant, plant.token(Role.ENGINEER, "erin"))
    try:
        engineer.tab("pipeline")
        engineer.page.wait_for_selector('button[data-action="retrain"]')
        engineer.tab("data")
        engineer.page.wait_for_selector('button[data-action="quarantine.release"]')
    finally:
        engineer.close()


def test_every_tab_draws_without_script_errors(plant, browser):
    ui = Page(browser, plant, plant.token(Role.ADMIN, "root"))
    try:
        ui.tab("fleet")
        ui.page.wait_for_selector(f'#fleet-table tr[data-device="{DEVICES[0]}"]')
        ui.page.select_option("#f-group", "line-2")
        # Filtered on the server: the page comes back with the group's two devices.
        ui.page.wait_for_function("""() => document.querySelectorAll('#fleet-table tr[data-device]').length === 2
            && document.querySelector('#fleet-shown').textContent.startsWith('1–2 of 2')""")
        ui.tab("data")
        ui.page.wait_for_selector("#data-gallery figure canvas")
        ui.page.wait_for_function("""() => { const c = document.querySelector('#data-gallery canvas');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            return d.some(v => v !== 0 && v !== 255); }""")  # the frame and its boxes were drawn
        ui.page.wait_for_selector("#chart-samples .uplot")
        # The samples-per-day axis is the last 14 days (it once spanned 2027 to 2029 for one day).
        span_days = ui.page.evaluate("""() => { const x = window.edgeloopDashboard.state.charts.samples.u.scales.x;
            return (x.max - x.min) / 86400; }""")
        assert 13 <= span_days <= 15, span_days
        ui.tab("drift")
        ui.page.wait_for_selector("#drift-charts .uplot")
        ui.page.wait_for_selector("#drift-events td")
        ui.tab("models")
        ui.page.click("#models-table tr[data-model='2']")
        ui.page.wait_for_selector("#model-detail .lineage")
        ui.tab("pipeline")
        ui.page.wait_for_selector("#jobs .card")
        ui.tab("alerts")
        ui.page.wait_for_selector("#alerts-table td")
        assert ui.errors == [], ui.errors
    finally:
        ui.close()


def test_an_operator_rolls_the_fleet_back_from_the_models_tab(plant, browser):
    """Last in this module: it ends the first test's paused rollout of v2 for good."""
    from server.db.models import Device

    operator = plant.token(Role.OPERATOR, "olga")
    with _api(plant, operator) as api:
        rollout = next(r for r in api.get("/api/v1/rollouts").json()["items"] if r["version"] == 2)
        assert rollout["state"] == "paused"
    with plant.ctx.sessions() as session:  # the canary runs v2 (it passed before the pause)
        on_v2 = sorted(d.id for d in session.query(Device).filter(Device.active_version == 2))
    assert on_v2, "the first test's canary should run v2"
    ui = Page(browser, plant, operator)
    try:
        ui.tab("models")
        button = ui.page.wait_for_selector('#model-actions button[data-action="model.rollback"]')
        assert "Stop v2: the fleet back to v1" in button.inner_text()
        button.click()
        ui.page.wait_for_selector("dialog#confirm[open]")
        ui.page.fill("#confirm-reason", "v2 misses dents on line 2")
        ui.page.click("#confirm-ok")
        ui.page.wait_for_selector(".toast.ok", timeout=15_000)
        wait_for("the canary back on v1", lambda: all(_fleet(plant)[d] == (True, 1) for d in on_v2), 60)
        with _api(plant, operator) as api:
            assert api.get(f"/api/v1/rollouts/{rollout['id']}").json()["state"] == "rolled_back"
            models = {m["version"]: m for m in api.get("/api/v1/models").json()["items"]}
            assert models[1]["aliases"] == ["production"] and models[2]["status"] == "rolled_back"
            entry = api.get("/api/v1/audit", params={"action": "fleet.rollback"}).json()["items"][0]
            assert (entry["actor"], entry["detail"]["reason"]) == ("olga", "v2 misses dents on line 2")
            assert entry["detail"]["rollout"] == rollout["id"]
        assert ui.errors == [], ui.errors
    finally:
        ui.close()
