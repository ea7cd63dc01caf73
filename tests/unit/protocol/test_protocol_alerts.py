"""Alert wire format: one topic per kind, JSON round trip, strict fields."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from protocol.alerts import Alert, AlertKind, Severity, alert_subscription, alert_topic


def test_topic_per_kind_under_the_alert_root() -> None:
    assert alert_topic(AlertKind.MODEL_REJECTED) == "edgeloop/v1/alerts/model_rejected"
    assert alert_topic("device_quarantined") == "edgeloop/v1/alerts/device_quarantined"
    assert alert_subscription() == "edgeloop/v1/alerts/#"
    with pytest.raises(ValueError):
        alert_topic("../devices")


def test_alert_round_trips_and_refuses_unknown_fields() -> None:
    alert = Alert(kind=AlertKind.MODEL_REJECTED, severity=Severity.WARNING, subject="model 3",
                  message="golden mAP50-95 fell", details={"version": 3})
    again = Alert.model_validate_json(alert.model_dump_json())
    assert again == alert
    with pytest.raises(ValidationError):
        Alert.model_validate({**alert.model_dump(), "extra": 1})
    with pytest.raises(ValidationError):
        Alert(kind="nonsense", severity="warning", message="x")
