"""``create_app(settings)``: the FastAPI application with its background services."""

from __future__ import annotations

from contextlib import asynccontextmanager

import structlog
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.context import ServerContext
from server.settings import ServerSettings

log = structlog.get_logger(__name__)


def build_context(settings: ServerSettings, *, connect_mqtt: bool = True) -> ServerContext:
    from server.alerts import AlertService
    from server.broker_accounts import make_broker_accounts
    from server.db.session import make_engine, make_session_factory, upgrade_schema
    from server.drift.service import make_drift_monitor
    from server.ingest import IngestService
    from server.mqtt_bus import MqttBus
    from server.objectstore import ObjectStore
    from server.pipeline.executor import make_executor
    from server.pipeline.runner import RetrainRunner
    from server.pipeline.trigger import RetrainScheduler
    from server.publish import ModelPublisher, ensure_signing_key
    from server.sample_validation import ImageLimits

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.resolved_database_url())
    upgrade_schema(engine)
    sessions = make_session_factory(engine)
    store = ObjectStore(
        settings.s3_endpoint, settings.s3_access_key, settings.s3_secret_key.get_secret_value(),
        secure=settings.s3_secure, region=settings.s3_region, bucket=settings.s3_bucket,
    )
    store.ensure_bucket()
    key = ensure_signing_key(settings.signing_key or settings.data_dir / "keys" / "signing-key.pem")
    publisher = ModelPublisher(sessions, store, key, settings.model_name, settings.class_names,
                               oci_registry=settings.oci_registry, oci_insecure=settings.oci_insecure)
    accounts = make_broker_accounts(settings, sessions=sessions)  # None: enrollment answers 503

    alerts = AlertService(sessions, webhook_url=settings.alert_webhook_url)
    ctx = ServerContext(settings=settings, engine=engine, sessions=sessions, store=store, bus=None,
                        accounts=accounts, publisher=publisher, scheduler=None, ingest=None, alerts=alerts)

    def on_approved(version: int) -> None:
        # With auto-deploy a rollout (canary first, gated on its shadow reports: RolloutPolicy.auto_waves)
        # takes it to the fleet, and its completion makes it production.
        if settings.auto_deploy:
            from server.rollouts.api import create_auto_rollout

            with sessions() as session:
                create_auto_rollout(session, version, settings, actor="auto-deploy")
            ctx.rollouts.nudge()

    ctx.on_approved = on_approved
    runner = RetrainRunner(settings, sessions, store, make_executor(settings, store), publisher, on_approved,
                           alerts=alerts)
    ctx.scheduler = RetrainScheduler(sessions, runner.run)
    ctx.ingest = IngestService(
        sessions, store, settings.class_names,
        ImageLimits(max_bytes=settings.max_sample_bytes, max_side=settings.max_image_side,
                    max_pixels=settings.max_image_pixels),
        settings.retrain_threshold,
        on_threshold=lambda n: ctx.scheduler.request("threshold", f"{n} validated samples", "ingest"),
    )
    from server.rollouts.controller import make_rollout_controller

    ctx.rollouts = make_rollout_controller(ctx, key)
    ctx.ingest.rollouts = ctx.rollouts
    ctx.drift = make_drift_monitor(ctx, key)
    ctx.signing_key = key
    converge = settings.auto_deploy if settings.converge_to_production is None else settings.converge_to_production
    if converge and settings.is_primary:
        from server.fleet_convergence import make_fleet_convergence

        ctx.convergence = make_fleet_convergence(ctx, key)
    ctx.ingest.on_drift = ctx.drift.handle_many
    if connect_mqtt and settings.ingest.dispatcher:
        from server.ingest_queues import DispatcherConfig, IngestDispatcher

        policy = settings.ingest
        ctx.ingest_dispatcher = IngestDispatcher(ctx.ingest, DispatcherConfig(
            flush_interval=policy.flush_interval, event_workers=policy.event_workers,
            event_batch=policy.event_batch, sample_workers=policy.sample_workers, event_queue=policy.event_queue, sample_queue=policy.sample_queue,
            drift_queue=policy.drift_queue, max_pending_heartbeats=policy.max_pending_heartbeats))
    if connect_mqtt:
        dispatcher = ctx.ingest_dispatcher
        ctx.bus = MqttBus(settings.mqtt_host, settings.mqtt_port, settings.mqtt_username,
                          settings.mqtt_password.get_secret_value(), settings.resolved_mqtt_client_id(),
                          ctx.ingest.handle, str(settings.mqtt_tls_ca) if settings.mqtt_tls_ca else None,
                          sink=dispatcher.submit if dispatcher is not None else None,
                          shared_group=settings.mqtt_shared_group, primary=settings.is_primary)
        alerts.publish = ctx.bus.publish
    return ctx


def create_app(settings: ServerSettings, *, connect_mqtt: bool = True) -> FastAPI:
    from server.api.broker_hooks import router as broker_hooks_router
    from server.api.drift_routes import router as drift_router
    from server.api.fleet_routes import router as fleet_router
    from server.api.input_guards import install_input_guards
    from server.api.openapi import document_api
    from server.api.registry_routes import router as registry_router
    from server.api.rollout_routes import router as rollout_router
    from server.api.routes import router
    from server.dashboard import router as dashboard_router

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        ctx = build_context(settings, connect_mqtt=connect_mqtt)
        app.state.ctx = ctx
        if ctx.ingest_dispatcher is not None:
            ctx.ingest_dispatcher.start()
        if ctx.bus is not None:
            ctx.bus.start()
        if settings.is_primary:  # an ingest replica queues retrains (API, thresholds); the primary's worker runs them
            ctx.scheduler.start()
        ctx.rollouts.start()  # every replica: each rollout is driven by the one holding its lease
        if ctx.convergence is not None:
            ctx.convergence.start()
        if settings.is_primary:
            ctx.ingest.start_rechecker()
        log.info("server.started", url=settings.resolved_public_url(), db=settings.resolved_database_url(),
                 role=settings.replica_role, shared_group=settings.mqtt_shared_group)
        yield
        if ctx.ingest_dispatcher is not None:
            # Drain while still connected, so that what the queues held is handled and acknowledged;
            # a QoS 1 message arriving from now on is left unacknowledged for the next session.
            ctx.ingest_dispatcher.stop()
        ctx.ingest.stop()
        if ctx.convergence is not None:
            ctx.convergence.stop()
        ctx.rollouts.stop()
        ctx.scheduler.stop()
        if ctx.bus is not None:
            ctx.bus.stop()
        ctx.engine.dispose()

    app = FastAPI(title="edgeloop", version="0.1.0", lifespan=lifespan,
                  description="Continuous delivery of object detectors to factory edge devices.")
    app.include_router(fleet_router)
    app.include_router(router)
    app.include_router(registry_router)
    app.include_router(rollout_router)
    app.include_router(drift_router)
    app.include_router(broker_hooks_router)
    app.include_router(dashboard_router)
    document_api(app)
    install_input_guards(app)  # NUL in the URL, values the database refuses: 422, not 500

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> PlainTextResponse:
        return PlainTextResponse("ok")

    @app.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        from server.fleet import update_fleet_metrics

        with app.state.ctx.sessions() as session:
            update_fleet_metrics(session)
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
