"""Prometheus metrics the server exposes at /metrics."""

from prometheus_client import Counter, Gauge, Histogram

MESSAGES_RECEIVED = Counter("edgeloop_mqtt_messages_total", "Device messages received", ["type"])
MESSAGES_REJECTED = Counter("edgeloop_mqtt_messages_rejected_total", "Device messages refused", ["reason"])
SAMPLES = Counter("edgeloop_samples_ingested_total", "Samples ingested by outcome", ["status"])
PENDING_SAMPLES = Gauge("edgeloop_samples_pending", "Validated labeled samples toward the retrain threshold")
DEVICES_ONLINE = Gauge("edgeloop_devices_online", "Devices whose retained status is online")
JOB_SECONDS = Histogram(
    "edgeloop_training_job_seconds", "Retrain job duration by outcome", ["outcome"],
    buckets=(30, 60, 120, 300, 600, 1200, 3600, 7200, 21600),
)
STAGE_SECONDS = Gauge("edgeloop_training_stage_seconds", "Duration of the last job's stages", ["stage"])
DEPLOY_COMMANDS = Counter("edgeloop_deploy_commands_total", "Deploy commands sent", ["mode"])
ALERTS = Counter("edgeloop_alerts_total", "Alerts raised", ["kind"])
