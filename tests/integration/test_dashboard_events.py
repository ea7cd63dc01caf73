"""The dashboard over a real server (uvicorn on a port, real Mosquitto, SeaweedFS, SQLite): the live
stream sends every topic once and then only what changed, is shared by its viewers, needs a
person's token, ends on sign-out and revocation; the gallery's image endpoint; sign-in audit and
rate limit; the pages' Content-Security-Policy; static files."""

from __future__ import annotations

import io
import uuid
from datetime import UTC, datetime

import httpx
import pytest
from sqlalchemy import select

pytest.register_assert_rewrite("fleet_kit", "dashboard_kit")
from dashboard_kit import LiveServer, SseReader, seed_dashboard, wait_for  # noqa: E402
from fleet_kit import ADMIN, fresh_postgres_database, server_settings  # noqa: E402

from server.api import events as live_events  # noqa: E402
from server.api import live_views  # noqa: E402
from server.auth import Role  # noqa: E402
from server.db.models import ApiToken, AuditEntry, Device, Sample  # noqa: E402

pytestmark = pytest.mark.integration

TOPICS = {"fleet", "rollouts", "models", "data", "pipeline", "alerts", "drift", "trends"}
MAX_SAMPLE_BYTES = 64 * 1024


@pytest.fixture(scope="module")
def server(mqtt_broker, seaweedfs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dashboard")
    settings = server_settings(mqtt_broker, seaweedfs, tmp, f"sqlite:///{tmp / 'dashboard.db'}",
                               port=LiveServer.free_port(), max_sample_bytes=MAX_SAMPLE_BYTES,
                               enroll_failure_limit="3/minute")
    live = LiveServer(settings).start()
    yield live
    live.stop()


def _stream(server: LiveServer, token: str | None = None, **kwargs) -> SseReader:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return SseReader(f"{server.url}/api/v1/events", headers=headers, **kwargs)


def _initial(reader: SseReader, topics=TOPICS) -> dict:
    hello = reader.next()
    assert hello is not None and hello.event == "hello", hello
    got = {}
    while set(got) != set(topics):
        event = reader.next()
        assert event is not None, f"stream ended after {sorted(got)}"
        got[event.event] = event.json()
    return got


def _add_device(server: LiveServer, device_id: str, **fields) -> None:
    with server.ctx.sessions() as session:
        session.add(Device(id=device_id, **fields))
        session.commit()


def test_stream_sends_every_topic_once_then_only_the_topics_that_changed(server):
    viewer = server.token(Role.VIEWER, "vera")
    reader = _stream(server, viewer)
    try:
        assert reader.status == 200
        first = _initial(reader)
        assert first["data"]["threshold"] == server.ctx.settings.retrain_threshold
        assert first["rollouts"].keys() >= {"available", "items"}
        assert "devices" not in first["fleet"]  # aggregates only: the table pages the inventory API
        device_id = f"cam-{uuid.uuid4().hex[:6]}"
        _add_device(server, device_id, online=True, last_seen=datetime.now(UTC), agent_version="0.1.0",
                    last_heartbeat={"fps": 24.5, "latency_ms_p50": 4.1, "latency_ms_p99": 9.8, "spool_depth": 3})
        event, before = reader.until(lambda e: e.event == "fleet" and e.json()["total"] == first["fleet"]["total"] + 1)
        assert event.json()["by_state"]["online"] == first["fleet"]["by_state"]["online"] + 1
        page = httpx.get(f"{server.url}/api/v1/devices", params={"q": device_id.upper()},
                         headers={"Authorization": f"Bearer {viewer}"}).json()
        assert [d["id"] for d in page["items"]] == [device_id]  # the table's search, on the server
        hb = page["items"][0]["heartbeat"]
        assert (page["items"][0]["online"], hb["fps"], hb["latency_ms_p99"], hb["spool_depth"]) == (True, 24.5, 9.8, 3)
        # Nothing else changed: no other topic is sent again (trends carry the clock, so they may).
        later = reader.drain(live_views.TOPICS["models"][0] + 1.5)
        assert {e.event for e in before + later} <= {"fleet", "trends"}
    finally:
        reader.close()


def test_a_topic_subset_and_the_refusals(server):
    viewer = server.token(Role.VIEWER, "vic")
    reader = SseReader(f"{server.url}/api/v1/events?topics=data,models",
                       headers={"Authorization": f"Bearer {viewer}"})
    try:
        assert set(_initial(reader, {"data", "models"})) == {"data", "models"}
    finally:
        reader.close()
    anonymous = SseReader(f"{server.url}/api/v1/events")
    assert anonymous.status == 401 and "missing bearer token" in anonymous.body
    device = _stream(server, server.token(Role.DEVICE, "cam-x"))
    assert device.status == 403 and "viewer role" in device.body
    unknown = SseReader(f"{server.url}/api/v1/events?topics=fleet,secrets", headers={"Authorization": f"Bearer {viewer}"})
    assert unknown.status == 422 and "secrets" in unknown.body


def test_viewers_share_one_computation(server):
    calls = {"n": 0}
    every, build = live_views.TOPICS["fleet"]

    def counting(session, settings):
        calls["n"] += 1
        return build(session, settings)

    hub = live_events.LiveHub(server.ctx, topics={"fleet": (every, counting)})
    old = getattr(server.app.state, "live_hub", None)
    server.app.state.live_hub = hub
    token = server.token(Role.VIEWER, "wall-screen")
    readers = [_stream(server, token) for _ in range(5)]
    try:
        for reader in readers:
            _initial(reader, {"fleet", "trends"})
        start = calls["n"]
        wait_for("three more fleet computations", lambda: calls["n"] >= start + 3, timeout=every * 6)
        assert hub.streams == 5
        # Five viewers, one query set per interval (not five).
        assert calls["n"] - start <= 4
    finally:
        for reader in readers:
            reader.close()
        wait_for("the streams to end", lambda: hub.streams == 0)
        server.app.state.live_hub = old


def _sign_in(server: LiveServer, token: str) -> httpx.Client:
    client = httpx.Client(base_url=server.url, follow_redirects=False)
    response = client.post("/login", data={"token": token})
    assert response.status_code == 303, response.text
    return client


def test_sign_out_closes_the_stream_of_that_session(server):
    client = _sign_in(server, server.token(Role.OPERATOR, "olga"))
    other = _stream(server, server.token(Role.VIEWER, "stays"))
    reader = SseReader(f"{server.url}/api/v1/events", cookies=dict(client.cookies))
    try:
        assert reader.status == 200
        assert reader.next().json()["role"] == "operator"
        response = client.post("/logout")
        assert response.status_code == 303 and response.headers["location"] == "/login"
        closed, _ = reader.until(lambda e: e.event == "closed")
        assert closed.json()["reason"] == "signed out"
        assert reader.ended.wait(10)
        # Another person's stream is untouched.
        assert not other.ended.is_set()
    finally:
        reader.close()
        other.close()
        client.close()


def test_a_revoked_token_loses_its_stream(server, monkeypatch):
    monkeypatch.setattr(live_events, "REAUTH_S", 0.5)
    token = server.token(Role.VIEWER, "leaver")
    reader = _stream(server, token)
    try:
        _initial(reader)
        with server.ctx.sessions() as session:
            row = session.scalars(select(ApiToken).where(ApiToken.subject == "leaver")).one()
            row.revoked_at = datetime.now(UTC)
            session.commit()
        closed, _ = reader.until(lambda e: e.event == "closed", timeout=15)
        assert closed.json()["reason"] == "token revoked"
        assert reader.ended.wait(10)
    finally:
        reader.close()


def _png(size: int = 32) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _sample(server: LiveServer, key: str, data: bytes, content_type: str = "image/png") -> str:
    server.ctx.store.put_bytes(key, data, content_type)
    sample_id = uuid.uuid4().hex
    with server.ctx.sessions() as session:
        session.add(Sample(id=sample_id, device_id="cam-img", object_key=key, sha256="0" * 64, size_bytes=len(data),
                           width=32, height=32, reason="low_confidence", status="validated",
                           predictions=[{"cls": 0, "cx": 0.5, "cy": 0.5, "w": 0.2, "h": 0.2, "conf": 0.4}],
                           labels=[{"cls": 1, "cx": 0.4, "cy": 0.4, "w": 0.3, "h": 0.3}]))
        session.commit()
    return sample_id


def test_the_gallery_reads_sample_images_through_the_server(server):
    viewer = {"Authorization": f"Bearer {server.token(Role.VIEWER, 'gallery')}"}
    png = _png()
    good = _sample(server, f"images/cam-img/{uuid.uuid4().hex}.png", png)
    with httpx.Client(base_url=server.url, headers=viewer) as client:
        response = client.get(f"/api/v1/samples/{good}/image")
        assert response.status_code == 200 and response.content == png
        assert response.headers["content-type"] == "image/png"
        assert "sandbox" in response.headers["content-security-policy"]
        big = _sample(server, f"images/cam-img/{uuid.uuid4().hex}.png", png + b"\0" * MAX_SAMPLE_BYTES)
        response = client.get(f"/api/v1/samples/{big}/image")
        assert response.status_code == 413 and "allowed" in response.json()["detail"]
        html = _sample(server, f"images/cam-img/{uuid.uuid4().hex}.png", b"<script>alert(1)</script>", "text/html")
        response = client.get(f"/api/v1/samples/{html}/image")
        assert response.status_code == 404 and "not a JPEG or PNG" in response.json()["detail"]
        gone = _sample(server, f"images/cam-img/{uuid.uuid4().hex}.png", png)
        server.ctx.store.delete(_key_of(server, gone))
        assert client.get(f"/api/v1/samples/{gone}/image").status_code == 404
        assert client.get("/api/v1/samples/nope/image").json()["detail"] == "sample nope does not exist"
    assert httpx.get(f"{server.url}/api/v1/samples/{good}/image").status_code == 401
    # The gallery's view carries the frame's boxes.
    with server.ctx.sessions() as session:
        gallery = live_views.data_view(session, server.ctx.settings)["gallery"]
    item = next(g for g in gallery if g["id"] == good)
    assert item["predictions"][0]["conf"] == 0.4 and item["labels"][0]["cls"] == 1


def _key_of(server: LiveServer, sample_id: str) -> str:
    with server.ctx.sessions() as session:
        return session.get(Sample, sample_id).object_key


def _audit(server: LiveServer, action: str) -> list[AuditEntry]:
    with server.ctx.sessions() as session:
        return list(session.scalars(select(AuditEntry).where(AuditEntry.action == action)).all())


def test_sign_in_is_audited_and_refusals_are_limited(server):
    with httpx.Client(base_url=server.url, follow_redirects=False) as client:
        page = client.get("/login")
        assert page.status_code == 200
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
        refused = client.post("/login", data={"token": "elt_guess<script>"})
        assert refused.status_code == 401 and "not valid" in refused.text and "<script>" not in refused.text
        device = client.post("/login", data={"token": server.token(Role.DEVICE, "cam-9")})
        assert device.status_code == 401 and "Device tokens" in device.text
        failed = _audit(server, "dashboard.login_failed")
        assert len(failed) >= 2 and {f.actor for f in failed} >= {"anonymous", "cam-9"}
        assert all(f.source == "127.0.0.1" for f in failed)
        # The third failure inside the window (limit 3/minute here) is refused without checking.
        client.post("/login", data={"token": "elt_again"})
        limited = client.post("/login", data={"token": ADMIN})
        assert limited.status_code == 429 and "Too many failed sign-ins" in limited.text
    server.app.state.login_limiter = None  # other tests sign in from the same address
    with httpx.Client(base_url=server.url, follow_redirects=False) as client:
        ok = client.post("/login", data={"token": server.token(Role.ENGINEER, "erin")})
        assert ok.status_code == 303
        cookie = ok.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        assert any(e.actor == "erin" and e.detail == {"role": "engineer"} for e in _audit(server, "dashboard.login"))
        page = client.get("/")
        assert page.status_code == 200 and 'data-role="engineer"' in page.text
        assert page.headers["content-security-policy"] == csp and page.headers["x-frame-options"] == "DENY"
        assert "<script>" not in page.text.replace('<script src="/static/', "")  # no inline script


def test_static_files_are_served_and_confined(server):
    with httpx.Client(base_url=server.url) as client:
        js = client.get("/static/dashboard.js")
        assert js.status_code == 200 and "javascript" in js.headers["content-type"] and "EventSource" in js.text
        assert client.get("/static/vendor/uPlot.iife.min.js").status_code == 200
        assert client.get("/static/vendor/uPlot.LICENSE").text.startswith("The MIT License")
        assert client.get("/static/../dashboard.py").status_code == 404
        assert client.get("/static/%2e%2e/dashboard.py").status_code == 404


def test_every_view_builds_on_postgresql(postgres, s3_store, tmp_path):
    """The views' SQL (date buckets, grouped latest rows) on PostgreSQL too, over a seeded plant."""
    from types import SimpleNamespace

    from server.db.session import make_engine, make_session_factory, upgrade_schema
    from server.settings import ServerSettings

    engine = make_engine(fresh_postgres_database(postgres))
    try:
        upgrade_schema(engine)
        ctx = SimpleNamespace(sessions=make_session_factory(engine), store=s3_store)
        plant = seed_dashboard(ctx, devices=4, samples=6)
        settings = ServerSettings(data_dir=tmp_path, retrain_threshold=50)
        with ctx.sessions() as session:
            views = {topic: build(session, settings) for topic, (_, build) in live_views.TOPICS.items()}
        assert views["fleet"]["total"] == len(plant["devices"]) == 4
        assert sum(views["fleet"]["active_versions"].values()) == 4
        assert views["fleet"]["by_state"]["online"] == 3 and views["fleet"]["groups"] == ["line-a", "line-b"]
        assert views["models"]["aliases"] == {"production": 1, "candidate": 2}
        assert views["data"]["pending"] >= 1 and views["data"]["threshold"] == 50
        assert sum(sum(v for k, v in day.items() if k != "day") for day in views["data"]["per_day"]) == 6
        assert views["data"]["reject_reasons"][0]["reason"].startswith("label box outside")
        assert list(views["pipeline"]["jobs"][-1]["stages"])[:2] == ["validate", "snapshot"]  # run order kept
        assert views["rollouts"]["items"] == []
        if views["drift"]["subjects"]:
            assert views["drift"]["subjects"][0]["drifting_metrics"] == ["brightness"]
            assert views["drift"]["events"][-1]["alert"]["severity"] == "warning"
    finally:
        engine.dispose()
