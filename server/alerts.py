"""Alerts: recorded in the database (the dashboard lists them), published on MQTT, POSTed to a webhook.

Delivery to MQTT and the webhook is best effort and never blocks or fails the caller (a
retrain job, the ingest loop): the database row is the record, and it says whether the
webhook accepted the alert.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import httpx
import structlog
from sqlalchemy.orm import Session, sessionmaker

from protocol.alerts import ALERT_QOS, Alert, AlertKind, Severity, alert_topic
from server import metrics
from server.db.models import AlertRecord

log = structlog.get_logger(__name__)


class AlertService:
    def __init__(self, sessions: sessionmaker[Session], *, webhook_url: str = "", webhook_timeout: float = 5.0,
                 publish: Callable[[str, bytes, int], None] | None = None,
                 http: httpx.Client | None = None) -> None:
        self._sessions = sessions
        self._webhook = webhook_url
        self._timeout = webhook_timeout
        self.publish = publish  # set once the MQTT bus exists
        self._http = http
        self._threads: list[threading.Thread] = []

    def raise_alert(self, kind: AlertKind, severity: Severity, message: str, *, subject: str = "",
                    details: dict | None = None, wait: bool = False) -> Alert:
        with self._sessions() as session:
            row = AlertRecord(kind=kind.value, severity=severity.value, subject=subject[:256], message=message,
                              details=details or {}, webhook_status="pending" if self._webhook else "")
            session.add(row)
            session.commit()
            alert = Alert(id=row.id, at=row.at, kind=kind, severity=severity, subject=row.subject,
                          message=message[:4000], details=row.details)
        metrics.ALERTS.labels(kind=kind.value).inc()
        log.warning("alert.raised", kind=kind.value, severity=severity.value, subject=subject, message=message)
        if self.publish is not None:
            try:
                self.publish(alert_topic(kind), alert.model_dump_json().encode(), ALERT_QOS)
            except Exception as exc:  # the broker being down must not lose the alert: it is in the DB
                log.warning("alert.mqtt_failed", error=str(exc))
        if self._webhook:
            thread = threading.Thread(target=self._post, args=(alert,), name="alert-webhook", daemon=True)
            thread.start()
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
            if wait:
                thread.join(self._timeout + 1)
        return alert

    def _post(self, alert: Alert) -> None:
        try:
            client = self._http or httpx.Client(timeout=self._timeout)
            response = client.post(self._webhook, content=alert.model_dump_json(),
                                   headers={"Content-Type": "application/json", "X-Edgeloop-Alert": alert.kind})
            status = f"http {response.status_code}"
        except httpx.HTTPError as exc:
            status = f"error: {type(exc).__name__}"[:64]
        with self._sessions() as session:
            session.get(AlertRecord, alert.id).webhook_status = status
            session.commit()
        log.info("alert.webhook", alert=alert.id, status=status)

    def flush(self, timeout: float = 10.0) -> None:
        for thread in self._threads:
            thread.join(timeout)
