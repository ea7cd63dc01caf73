"""Replica settings: a stable client id per replica, and no ingest replica outside a shared group."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from server.settings import ServerSettings


def test_the_client_id_defaults_to_the_user_name_so_a_restart_resumes_its_session():
    assert ServerSettings(mqtt_username="_edgeloop-server-b").resolved_mqtt_client_id() == "_edgeloop-server-b"
    assert ServerSettings(mqtt_client_id="replica-7").resolved_mqtt_client_id() == "replica-7"


def test_an_ingest_replica_needs_a_shared_group():
    with pytest.raises(ValidationError, match="mqtt_shared_group"):
        ServerSettings(replica_role="ingest")
    assert ServerSettings(replica_role="ingest", mqtt_shared_group="edgeloop").replica_role == "ingest"


def test_a_group_name_that_would_change_the_topic_filter_is_refused():
    with pytest.raises(ValidationError):
        ServerSettings(mqtt_shared_group="a/#")
