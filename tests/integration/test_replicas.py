"""Two server replicas share the device traffic: two ``edgeloop server`` processes (one primary,
one ingest replica) against one Mosquitto (own broker, per-device credentials) and one PostgreSQL,
subscribed in one MQTT v5 shared-subscription group, with simulated devices publishing real
heartbeats and sample events behind real presigned uploads to SeaweedFS.

- exactly once: every message the devices sent is handled by exactly one replica (the replicas'
  own Prometheus counters add up to what was sent, each has a share) and every sample is stored
  once;
- a replica killed mid-load (SIGKILL) and restarted under the same broker user loses nothing:
  the QoS 1 messages queued for it, or in flight to it, are delivered when it comes back
  (redeliveries are recognised by sample id) and every sample the broker acknowledged is stored
  exactly once;
- a replica that leaves cleanly ends its session, and the other one then takes all the traffic.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

pytest.register_assert_rewrite("fleet_kit")
from fleet_kit import ADMIN, fresh_postgres_database, running_broker, wait_for  # noqa: E402

from edgeloop.simulator.credentials import device_ids, enroll  # noqa: E402
from edgeloop.simulator.fleet import Fleet, FleetConfig  # noqa: E402
from server.stack._proc import random_secret  # noqa: E402
from server.stack.ports import find_free_port  # noqa: E402

pytestmark = [pytest.mark.integration]

DEVICES = 40
GROUP = "edgeloop"


class Replica:
    """One ``edgeloop server`` process, its log in a file."""

    def __init__(self, name: str, env: dict[str, str], workdir: Path) -> None:
        self.name, self.env, self.port = name, env, int(env["EDGELOOP_PORT"])
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Replica:
        log = self.log_path.open("a")
        self.proc = subprocess.Popen([sys.executable, "-m", "edgeloop.cli", "server"], env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        wait_for(f"replica {self.name} to serve", self._ready, 90)
        return self

    def _ready(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, \
            f"replica {self.name} exited:\n{self.log_path.read_text()[-3000:]}"
        try:
            return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200 and "mqtt.connected" in \
                self.log_path.read_text()
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)

    def received(self, kind: str) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        match = re.search(rf'^edgeloop_mqtt_messages_total{{type="{kind}"}} (\S+)$', text, re.M)
        return float(match.group(1)) if match else 0.0


@pytest.fixture
def replicas(postgres, seaweedfs, tmp_path):
    database_url = fresh_postgres_database(postgres)
    with running_broker(prefix="edgeloop-replicas-") as broker:
        common = {
            **os.environ, "EDGELOOP_DATABASE_URL": database_url, "EDGELOOP_ADMIN_TOKEN": ADMIN,
            "EDGELOOP_MQTT_HOST": broker.host, "EDGELOOP_MQTT_PORT": str(broker.port),
            "EDGELOOP_MQTT_PASSWORD_FILE": str(broker.password_file),
            "EDGELOOP_MQTT_BROKER_PID_FILE": str(broker.pid_file),
            "EDGELOOP_MQTT_BROKER_LOG_FILE": str(broker.log_file),
            "EDGELOOP_MQTT_SHARED_GROUP": GROUP,
            "EDGELOOP_S3_ENDPOINT": seaweedfs.endpoint, "EDGELOOP_S3_ACCESS_KEY": seaweedfs.access_key,
            "EDGELOOP_S3_SECRET_KEY": seaweedfs.secret_key, "EDGELOOP_S3_BUCKET": f"replicas-{uuid.uuid4().hex[:8]}",
            # One signing key for the deployment: either replica may sign a command.
            "EDGELOOP_SIGNING_KEY": str(tmp_path / "signing-key.pem"),
        }
        made = []
        for role, letter in (("primary", "a"), ("ingest", "b")):
            user, password = f"_edgeloop-server-{letter}", random_secret()
            broker.add_user(user, password, server=True)
            env = {**common, "EDGELOOP_REPLICA_ROLE": role, "EDGELOOP_MQTT_USERNAME": user,
                   "EDGELOOP_MQTT_PASSWORD": password, "EDGELOOP_PORT": str(find_free_port()),
                   "EDGELOOP_DATA_DIR": str(tmp_path / letter)}
            # The primary first: it migrates the shared database before the replica connects.
            made.append(Replica(letter, env, tmp_path).start())
        try:
            yield made
        finally:
            for replica in made:
                replica.stop()


def _stored_samples(replica: Replica) -> int:
    with httpx.Client(base_url=replica.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30) as api:
        return api.get("/api/v1/samples", params={"limit": 1}).json()["total"]


def _fleet(creds, primary: Replica, broker_port: int) -> Fleet:
    return Fleet(creds, FleetConfig(host="127.0.0.1", port=broker_port, heartbeat_seconds=1.0, drift_seconds=0.0,
                                    api_url=primary.url, samples_per_minute=12.0, connects_per_second=200))


def test_two_replicas_share_the_traffic_exactly_once_and_a_killed_one_loses_nothing(replicas):
    a, b = replicas
    port = int(a.env["EDGELOOP_MQTT_PORT"])
    creds = enroll(a.url, ADMIN, device_ids(DEVICES, f"rep{uuid.uuid4().hex[:4]}"))
    assert len(creds) == DEVICES

    # 1. Steady load: each message handled by one replica, both replicas take a share.
    fleet = _fleet(creds, a, port).start_in_thread()
    wait_for("the fleet to connect", lambda: fleet.counters.connected == DEVICES, 60)
    time.sleep(8)
    fleet.join(60)
    sent = fleet.counters
    assert sent.upload_failures == 0, dict(sent.upload_errors)
    heartbeats, samples = sent.sent["heartbeat"], sent.sent["sample"]
    assert heartbeats >= DEVICES * 5 and samples >= 10, dict(sent.sent)
    assert sent.acked["sample"] == samples
    wait_for("every heartbeat counted by one replica or the other",
             lambda: a.received("heartbeat") + b.received("heartbeat") >= heartbeats, 30)
    wait_for("every sample stored", lambda: _stored_samples(a) >= samples, 30)
    time.sleep(1.0)  # a duplicate would arrive within this
    shares = {"a": a.received("heartbeat"), "b": b.received("heartbeat")}
    assert shares["a"] + shares["b"] == heartbeats, (shares, heartbeats)
    assert min(shares.values()) >= heartbeats * 0.2, shares  # round robin: both replicas take a share
    assert a.received("sample") + b.received("sample") == samples
    assert _stored_samples(a) == samples

    # 2. Replica b killed mid-load, restarted under the same broker user: nothing acknowledged is lost.
    fleet = _fleet(creds, a, port).start_in_thread()
    wait_for("the fleet to connect again", lambda: fleet.counters.connected == DEVICES, 60)
    time.sleep(4)
    b.kill()
    time.sleep(3)  # its share of the traffic is queued for its session meanwhile
    b.start()
    time.sleep(4)
    fleet.join(60)
    second = fleet.counters
    assert second.upload_failures == 0, dict(second.upload_errors)
    assert second.acked["sample"] == second.sent["sample"] >= 10
    total = samples + second.sent["sample"]
    wait_for("every sample acknowledged by the broker stored, the killed replica's share included",
             lambda: _stored_samples(a) >= total, 60)
    time.sleep(1.0)
    assert _stored_samples(a) == total  # each exactly once: a redelivery is recognised by its sample id
    assert b.received("sample") > 0  # the restarted replica was handed its queued share

    # 3. b leaves cleanly: its session ends, and a takes all the traffic from then on.
    b.stop()
    before = a.received("heartbeat")
    fleet = _fleet(creds, a, port).start_in_thread()
    wait_for("the fleet to connect a third time", lambda: fleet.counters.connected == DEVICES, 60)
    time.sleep(3)
    fleet.join(60)
    third = fleet.counters.sent["heartbeat"]
    wait_for("replica a to count every heartbeat alone", lambda: a.received("heartbeat") - before >= third, 30)
    assert a.received("heartbeat") - before == third
