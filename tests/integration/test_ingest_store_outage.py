"""A sample event that arrives while the object store is down is kept unverified, never lost,
and validated once the store answers again (real SeaweedFS, stopped and restarted on its port)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import cv2
import pytest

from protocol.messages import SampleEvent
from server.db.models import Device, Sample
from server.db.session import make_engine, make_session_factory, upgrade_schema
from server.ingest import UNVERIFIED, IngestService
from server.sample_validation import ImageLimits
from server.stack.ports import find_free_port_pairs
from server.stack.seaweedfs import GRPC_OFFSET, SeaweedS3
from training.synth import render_frame

pytestmark = pytest.mark.integration


def test_events_during_a_store_outage_are_kept_and_validated_when_it_is_back(tmp_path):
    root = Path(tempfile.mkdtemp(prefix="edgeloop-outage-"))
    os.chmod(root, 0o755)
    s3 = SeaweedS3(root / "s3", s3_port=find_free_port_pairs(1, GRPC_OFFSET)[0])
    s3.start()
    try:
        store = s3.object_store("outage")
        store.ensure_bucket()
        engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
        upgrade_schema(engine)
        sessions = make_session_factory(engine)
        with sessions() as session:
            session.add(Device(id="cam-1"))
            session.commit()
        triggered: list[int] = []
        ingest = IngestService(sessions, store, ["a", "b", "c"], ImageLimits(8 << 20, 4096), threshold=3,
                               on_threshold=triggered.append)
        events = []
        for i in range(3):
            data = cv2.imencode(".jpg", render_frame("base", 1, i, 64)[0])[1].tobytes()
            key = f"images/cam-1/{uuid.uuid4().hex}.jpg"
            store.put_bytes(key, data, "image/jpeg")
            events.append(SampleEvent(device_id="cam-1", sample_id=uuid.uuid4().hex, object_key=key,
                                      sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data), width=64,
                                      height=64, reason="correction",
                                      labels=[{"cls": 0, "cx": .5, "cy": .5, "w": .2, "h": .2}]))
        s3.stop()
        for event in events:
            assert ingest.ingest_sample(event).status == UNVERIFIED
        assert ingest.recheck_unverified() == {}  # still down: nothing decided, nothing lost
        assert triggered == []
        with sessions() as session:
            row = session.get(Sample, events[0].sample_id)
            assert row.status == UNVERIFIED and "unreachable" in row.reject_reason

        s3.start()
        assert ingest.recheck_unverified() == {"validated": 3}
        assert triggered == [3]
        with sessions() as session:
            assert {s.status for s in session.query(Sample)} == {"validated"}
        engine.dispose()
    finally:
        s3.stop()
        shutil.rmtree(root, ignore_errors=True)
