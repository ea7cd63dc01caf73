"""Everything a request or background worker needs, built once by ``create_app(settings)``."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from server.settings import ServerSettings


@dataclass
class ServerContext:
    settings: ServerSettings
    engine: Engine
    sessions: sessionmaker[Session]
    store: object  # server.objectstore.ObjectStore
    bus: object | None  # server.mqtt_bus.MqttBus
    accounts: object | None  # server.broker_accounts.BrokerAccounts
    publisher: object  # server.publish.ModelPublisher
    scheduler: object  # server.pipeline.trigger.RetrainScheduler
    ingest: object  # server.ingest.IngestService
    alerts: object = None  # server.alerts.AlertService
    on_approved: object = None  # callable(version): what happens when a version is approved for release
    rollouts: object = None  # server.rollouts.controller.RolloutController
    drift: object = None  # server.drift.monitor.DriftMonitor
    convergence: object = None  # server.fleet_convergence.FleetConvergence, when devices follow production
    signing_key: object = None  # the bundle signing key, which also signs rollback commands
    ingest_dispatcher: object = None  # server.ingest_queues.IngestDispatcher between the bus and ingest
