"""Server settings. Built in ``main()`` / ``create_app(settings)`` and passed down, never at import."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from server.pipeline.gate import GatePolicy
from server.rollouts.spec import GateConfig, WaveSpec, canary_then_fleet, check_waves, default_waves
from training.finetune import FINETUNE_DEFAULTS


class TrainingPolicy(BaseSettings):
    """How a retrain fine-tunes, evaluates and gates a candidate."""

    model_config = SettingsConfigDict(env_prefix="EDGELOOP_TRAIN_", extra="ignore")

    imgsz: int = Field(160, ge=32, le=1280)
    # The fine-tune recipe's defaults are training.finetune's measured ones (its docstring has
    # the figures); each can be overridden here, e.g. EDGELOOP_TRAIN_EPOCHS.
    epochs: int = Field(FINETUNE_DEFAULTS.epochs, ge=1, le=1000)
    batch: int = Field(FINETUNE_DEFAULTS.batch, ge=1, le=512)
    optimizer: str = FINETUNE_DEFAULTS.optimizer
    lr0: float = Field(FINETUNE_DEFAULTS.lr0, gt=0, le=1)
    warmup_epochs: float = Field(FINETUNE_DEFAULTS.warmup_epochs, ge=0, le=10)
    warmup_bias_lr: float = Field(FINETUNE_DEFAULTS.warmup_bias_lr, ge=0, le=1)
    seed: int = FINETUNE_DEFAULTS.seed
    # Share of new samples held out as the new-data validation split.
    val_fraction: float = Field(FINETUNE_DEFAULTS.val_fraction, ge=0.05, le=0.5)
    # Base-data images replayed beside the new samples, as a multiple of the new ones,
    # so that fine-tuning does not forget what the golden set measures.
    replay_ratio: float = Field(FINETUNE_DEFAULTS.replay_ratio, ge=0, le=10)
    # The training set is cumulative: a retrain also takes up to this many samples of the earlier
    # snapshots of its parent chain, an equal share per snapshot, chosen by a stable hash of the
    # sample id (server.pipeline.snapshot.select_history); 0 trains on the new snapshot alone.
    history_max_images: int = Field(2000, ge=0, le=1_000_000)
    # How far back along the parent chain history reaches (snapshots).
    history_max_snapshots: int = Field(20, ge=1, le=10_000)

    def finetune_params(self) -> dict:
        """The recipe as training.finetune.FineTuneParams fields, for the job spec."""
        return {"epochs": self.epochs, "batch": self.batch, "optimizer": self.optimizer, "lr0": self.lr0,
                "warmup_epochs": self.warmup_epochs, "warmup_bias_lr": self.warmup_bias_lr, "seed": self.seed,
                "val_fraction": self.val_fraction, "replay_ratio": self.replay_ratio}

    # Gate: candidate golden mAP50-95 must be >= production - tolerance (the margin: see GatePolicy).
    golden_tolerance: float = Field(GatePolicy.golden_tolerance, ge=0, le=1)
    # Gate: the candidate must beat production on the new-data split by at least this.
    min_new_data_gain: float = Field(0.0, ge=0, le=1)
    # Gate (bias check): no class's golden recall and no source device's new-data recall may drop more.
    max_recall_drop: float = Field(0.05, ge=0, le=1)
    min_slice_instances: int = Field(20, ge=1)
    # Gate: the exported ONNX artifact's mAP50-95 must match the .pt's within this.
    artifact_tolerance: float = Field(0.02, ge=0, le=1)
    # Approval of a passing candidate: "auto" promotes it, "manual" waits for an operator.
    approval: Literal["auto", "manual"] = "auto"
    timeout_seconds: int = Field(6 * 3600, ge=60)

    # Data contract, checked before training on every new batch.
    max_reject_fraction: float = Field(0.2, ge=0, le=1)
    near_duplicate_distance: int = Field(24, ge=0, le=256)  # of a 256-bit perceptual hash
    min_class_share: float = Field(0.05, ge=0, le=1)
    # Poisoning defense per source device.
    poison_max_contradiction_rate: float = Field(0.3, ge=0, le=1)
    poison_max_class_divergence: float = Field(0.5, ge=0, le=1)
    poison_min_samples: int = Field(20, ge=1)


class DriftThreshold(BaseModel):
    """When one metric counts as drifting: ``statistic`` over ``raise_above`` raises it, and it
    clears once under ``clear_below`` (hysteresis); see server/drift/scoring.py for the statistics."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    statistic: Literal["psi", "ks", "wasserstein"] = "psi"
    raise_above: float = Field(0.25, gt=0)
    clear_below: float = Field(0.1, ge=0)


class DriftPolicy(BaseSettings):
    """How device drift windows are judged against the model's reference and what happens then
    (server/drift/). Env ``EDGELOOP_DRIFT_*``; maps as JSON, e.g. EDGELOOP_DRIFT_THRESHOLDS."""

    model_config = SettingsConfigDict(env_prefix="EDGELOOP_DRIFT_", extra="ignore")

    enabled: bool = True
    # Default threshold of every metric; per metric (exact name, or a prefix ending in "*" such
    # as "confidence/*") in thresholds.
    threshold: DriftThreshold = Field(default_factory=DriftThreshold)
    thresholds: dict[str, DriftThreshold] = Field(default_factory=dict)
    # Hysteresis: a signal rises after raise_after consecutive windows over its raise threshold and
    # clears after clear_after consecutive windows under its clear threshold.
    raise_after: int = Field(3, ge=1)
    clear_after: int = Field(3, ge=1)
    # A metric is scored only when the window has this many values of it (noise floor).
    min_count: int = Field(100, ge=1)
    # Performance decay: the line's QA corrects too many frames -- more than max_correction_rate, or
    # correction_increase more than the model's own rate over its first baseline_windows windows on
    # that device/group (how often QA corrects a frame depends on the model: the fast seed model
    # is corrected on ~1/3 of base frames) -- or the model's confidence or detection rate
    # collapses against its reference (ratios, as the agent's post-switch health check).
    max_correction_rate: float = Field(0.5, ge=0, le=1)
    clear_correction_rate: float = Field(0.4, ge=0, le=1)
    correction_increase: float = Field(0.2, ge=0, le=1)
    clear_correction_increase: float = Field(0.1, ge=0, le=1)
    baseline_windows: int = Field(3, ge=1)
    min_qa_frames: int = Field(50, ge=1)
    min_confidence_ratio: float = Field(0.7, ge=0, le=1)
    clear_confidence_ratio: float = Field(0.85, ge=0, le=1)
    min_detection_rate_ratio: float = Field(0.5, ge=0, le=1)
    clear_detection_rate_ratio: float = Field(0.7, ge=0, le=1)
    min_frames: int = Field(100, ge=1)
    # Actions. Sampling boost: random_rate sent to a drifting device, and restored on clear.
    alert: bool = True
    boost_sampling: bool = True
    boost_random_rate: float = Field(0.05, ge=0, le=1)
    normal_random_rate: float = Field(0.0, ge=0, le=1)
    retrain_on_drift: bool = True
    retrain_on_decay: bool = True
    # A retrain needs labeled samples to learn the new look from: until this many are pending, the
    # request waits (re-checked every window while the signal stays raised).
    retrain_min_samples: int = Field(1, ge=0)
    # A device whose model decays within this many windows of switching to it is rolled back
    # (signed rollback to the version it ran before) instead of waiting for a retrain.
    rollback_on_decay: bool = True
    rollback_within_windows: int = Field(10, ge=1)
    # Device groups scored on their summed windows: name -> device-id glob patterns.
    groups: dict[str, list[str]] = Field(default_factory=lambda: {"fleet": ["*"]})
    # Reference of a model version: up to this many images per source (its training data).
    reference_images: int = Field(1000, ge=10)

    def threshold_for(self, metric: str) -> DriftThreshold:
        if metric in self.thresholds:
            return self.thresholds[metric]
        for pattern, threshold in self.thresholds.items():
            if pattern.endswith("*") and metric.startswith(pattern[:-1]):
                return threshold
        return self.threshold


class RolloutPolicy(BaseSettings):
    """Defaults of every rollout and how the controller runs them (server/rollouts/). Env
    ``EDGELOOP_ROLLOUT_*``; waves and gates as JSON, e.g. EDGELOOP_ROLLOUT_GATES='{"min_frames": 500}'."""

    model_config = SettingsConfigDict(env_prefix="EDGELOOP_ROLLOUT_", extra="ignore")

    waves: list[WaveSpec] = Field(default_factory=default_waves)
    gates: GateConfig = Field(default_factory=GateConfig)
    mode: Literal["shadow_then_switch", "direct"] = "shadow_then_switch"
    on_failure: Literal["pause", "abort"] = "pause"
    # A version that becomes production with auto_deploy on goes out as a rollout with these waves
    # (min_frames = shadow_frames); a rollout still running for an older version is aborted.
    auto_waves: list[WaveSpec] = Field(default_factory=canary_then_fleet)
    # Frames per shadow report: the agent reports a window this long, again and again, until promoted.
    shadow_window_frames: int = Field(100, ge=1, le=1_000_000)
    # What all devices of a wave may send in shadow windows together, per second: a wave large enough
    # to send more at the rollout's window size is asked for longer windows (plan.shadow_window_frames).
    max_shadow_reports_per_second: float = Field(400.0, gt=0)
    # A device that makes no progress (no state change, no shadow report) for this long counts as a
    # failed install, so one dead or slow device never holds a wave.
    device_timeout_seconds: float = Field(900.0, ge=5)
    # A command whose effect is not seen this long after it was sent is sent again (same command id:
    # devices ignore duplicates), at most max_sends times in all.
    resend_seconds: float = Field(30.0, ge=1)
    max_sends: int = Field(10, ge=1)
    reconcile_seconds: float = Field(2.0, gt=0, le=60)
    # After a pass that took t seconds the next one waits at least pass_spacing x t, however often
    # devices report: on SQLite (one writer at a time) ingest keeps the rest of the write lock.
    pass_spacing: float = Field(2.0, ge=0, le=20)
    # A running wave looks for devices that may join it (enrolled or back online since) at most this
    # often; at its start it always does.
    top_up_seconds: float = Field(5.0, ge=0, le=600)
    # Per-rollout lease: the one replica that acts on a rollout until the lease runs out unrenewed.
    lease_seconds: float = Field(30.0, ge=2)
    # A finished rollout's Prometheus series are dropped this long after it settled.
    metrics_retention_seconds: float = Field(600.0, ge=0)

    @field_validator("waves", "auto_waves")
    @classmethod
    def _waves(cls, value: list[WaveSpec]) -> list[WaveSpec]:
        return check_waves(value)


class IngestPolicy(BaseModel):
    """How device messages get from the MQTT network thread to the database (server/ingest_queues.py)."""

    # False: every message is handled on paho's network thread, as before (the benchmarks' baseline).
    dispatcher: bool = True
    flush_interval: float = Field(0.5, gt=0, le=60)  # heartbeats: one transaction per interval
    event_workers: int = Field(2, ge=1, le=64)  # status, update, shadow (a device always on the same one)
    event_batch: int = Field(200, ge=1, le=10_000)  # events per transaction, at most
    sample_workers: int = Field(4, ge=1, le=256)  # sample validation pool
    event_queue: int = Field(10_000, ge=1)
    sample_queue: int = Field(2_000, ge=1)
    drift_queue: int = Field(1_000, ge=1)
    max_pending_heartbeats: int = Field(100_000, ge=1)  # devices with a heartbeat waiting for the flush


class KubernetesExecutorSettings(BaseSettings):
    """Where a retrain runs when ``EDGELOOP_EXECUTOR=kubernetes``: one Job per retrain
    (server/pipeline/k8s_executor.py renders it; deploy/k8s/ has the cluster side)."""

    model_config = SettingsConfigDict(env_prefix="EDGELOOP_K8S_", extra="ignore")

    namespace: str = "edgeloop"
    image: str = ""  # the edgeloop image with the training extra (deploy/Dockerfile); required
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    image_pull_secrets: list[str] = Field(default_factory=list)
    service_account: str = "edgeloop-training"
    gpu_count: int = Field(1, ge=0, le=16)  # 0: a CPU-only pod
    gpu_resource: str = "nvidia.com/gpu"
    cpu_request: str = "4"
    memory_request: str = "16Gi"
    memory_limit: str = "32Gi"
    scratch_size: str = "50Gi"  # emptyDir for the staged dataset, weights and outputs
    shm_size: str = "8Gi"  # PyTorch data-loader workers pass batches through /dev/shm
    node_selector: dict[str, str] = Field(default_factory=dict)
    # Kubernetes tolerations as JSON objects (key, operator, value, effect, tolerationSeconds);
    # the default matches the taint deploy/terraform puts on the GPU node pool.
    tolerations: list[dict[str, str | int]] = Field(
        default_factory=lambda: [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])
    priority_class: str = ""
    # Object-store credentials reach the pod from this Secret, never through the Job spec.
    s3_secret: str = "edgeloop-object-store"
    s3_access_key_field: str = "access-key"
    s3_secret_key_field: str = "secret-key"
    s3_endpoint: str = ""  # host:port pods reach the object store at; empty: EDGELOOP_S3_ENDPOINT
    run_as_user: int = Field(10001, ge=1)
    ttl_seconds_after_finished: int = Field(3600, ge=0)  # safety net when teardown could not run
    pod_start_timeout_seconds: int = Field(1800, ge=30)  # image pull + GPU node scale-up from zero
    log_idle_seconds: int = Field(300, ge=5)  # a silent log stream is re-opened after this long
    poll_seconds: float = Field(5.0, gt=0, le=300)
    kubeconfig: Path | None = None  # None: the in-cluster service account, else ~/.kube/config
    context: str | None = None


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EDGELOOP_", extra="ignore", env_nested_delimiter="__")

    data_dir: Path = Path(".edgeloop/server")
    database_url: str = ""  # empty: SQLite file in data_dir
    host: str = "127.0.0.1"
    port: int = 8000
    public_url: str = ""  # how agents reach the API; empty: http://host:port

    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 1883
    mqtt_username: str = "_edgeloop-server"
    mqtt_password: SecretStr = SecretStr("")
    mqtt_tls_ca: Path | None = None
    # The MQTT client id: the broker keeps this replica's session (its subscriptions, QoS 1 messages
    # not yet acknowledged) under it across restarts, so it must be stable and one per replica.
    # Empty: the user name (what Mosquitto's use_username_as_clientid forces anyway).
    mqtt_client_id: str = Field("", max_length=64)
    # Replicas: every replica subscribes in this MQTT v5 shared-subscription group ($share/<group>/...),
    # so the broker hands each device message to one of them. None: one server takes all traffic.
    mqtt_shared_group: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    # "primary" also runs what must run once per deployment: the retrain worker, fleet convergence
    # and drift monitoring (a device's drift windows and a group's rounds need one consumer, so only
    # the primary subscribes to that channel). "ingest" replicas serve the API, take their share of
    # the device traffic and run rollouts under the rollouts' leases. Exactly one primary.
    replica_role: Literal["primary", "ingest"] = "primary"
    # Where device broker credentials are written (enrollment) and which broker to reload.
    mqtt_password_file: Path | None = None
    mqtt_broker_pid_file: Path | None = None
    mqtt_broker_log_file: Path | None = None  # lets enrollment wait until the broker reloaded
    # Where device broker accounts live (server/broker_accounts.py): "password_file" (the paths
    # above; the embedded broker), "dynamic_security" (Mosquitto's plugin, administered over MQTT
    # as mqtt_dynsec_username, a user of its own with the plugin's admin role) or "http" (rows of
    # this server's database, which the broker asks about through the hook routes of
    # server/api/broker_hooks.py: EMQX's HTTP authenticator and authorizer, deploy/emqx/).
    broker_accounts: Literal["password_file", "dynamic_security", "http"] = "password_file"
    mqtt_dynsec_username: str = "_edgeloop-accounts"
    mqtt_dynsec_password: SecretStr | None = None
    # The secret the broker sends to the hook routes (header "Authorization: Bearer <token>"); unset,
    # the hook routes answer 503. A long random string, the same in the broker's configuration.
    broker_hook_token: SecretStr | None = None
    # Most devices one bulk enrollment call takes (POST /api/v1/devices/bulk).
    bulk_enroll_max: int = Field(10_000, ge=1, le=10_000)

    s3_endpoint: str = "127.0.0.1:9000"
    s3_access_key: str = ""
    s3_secret_key: SecretStr = SecretStr("")
    s3_secure: bool = False
    s3_region: str = "us-east-1"
    s3_bucket: str = "edgeloop"
    # Every registered version's signed bundle is also pushed as an OCI image to
    # <oci_registry>/<model_name>:<version> (HOST[:PORT]/NAMESPACE, e.g. registry.example.com:5000/edgeloop;
    # env EDGELOOP_OCI_REGISTRY; empty: off) and its digest reference recorded on the version. The object
    # store stays the first transport: a failed push keeps the version and is logged and counted
    # (edgeloop_oci_push_total{outcome="failed"}). Credentials: EDGELOOP_OCI_USERNAME / EDGELOOP_OCI_PASSWORD.
    oci_registry: str = Field("", pattern=r"^$|^[A-Za-z0-9.\[\]:-]+/[a-z0-9._/-]+$", max_length=255)
    # Plain HTTP to a non-loopback registry (env EDGELOOP_OCI_INSECURE); loopback hosts always use HTTP.
    oci_insecure: bool = False

    admin_token: SecretStr | None = None
    # Failed enrollments (unknown/expired/used-up bootstrap token) allowed per client address in a
    # moving window (a `limits` rate string); the storage URI makes it shared across replicas.
    enroll_failure_limit: str = "10/5minutes"
    rate_limit_storage: str = "memory://"
    signing_key: Path | None = None  # ed25519 private key PEM; generated in data_dir if unset
    class_names: list[str] = Field(default_factory=lambda: ["scratch", "dent", "stain"])
    model_name: str = "defect-detector"

    retrain_threshold: int = Field(1000, ge=1)
    max_sample_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    max_image_side: int = Field(4096, ge=32)
    # Width x height, read from the image header before decoding (a few-KB PNG can declare 20000x20000).
    max_image_pixels: int = Field(4096 * 4096, ge=1024)
    auto_deploy: bool = False
    # Keep every device that no rollout owns on production: one that enrolls, or comes online after
    # a rollout or a fleet rollback finished, is sent production (None: on when auto_deploy is).
    converge_to_production: bool | None = None
    shadow_frames: int = Field(50, ge=1)
    presign_seconds: int = Field(3600, ge=60, le=7 * 24 * 3600)

    # Named evaluation sets (name -> Ultralytics data.yaml); "golden" is the gate's fixed set.
    eval_sets: dict[str, Path] = Field(default_factory=dict)
    # Base training data replayed during fine-tuning (a data.yaml whose train split is used).
    replay_data: Path | None = None

    training: TrainingPolicy = Field(default_factory=TrainingPolicy)
    # Where retrain compute runs: a local subprocess, or one Kubernetes Job per retrain.
    executor: Literal["local", "kubernetes"] = "local"
    kubernetes: KubernetesExecutorSettings = Field(default_factory=KubernetesExecutorSettings)
    # Alerts (rejected candidates, quarantined devices, halted batches) are also POSTed here.
    alert_webhook_url: str = ""
    # Drift and performance-decay monitoring of the fleet (server/drift/).
    drift: DriftPolicy = Field(default_factory=DriftPolicy)
    # Rollouts: default waves and gates, and how the controller runs them (server/rollouts/).
    rollouts: RolloutPolicy = Field(default_factory=RolloutPolicy)
    # Device message ingest: queues per message class, workers, heartbeat batching.
    ingest: IngestPolicy = Field(default_factory=IngestPolicy)

    @model_validator(mode="after")
    def _replicas_share(self) -> ServerSettings:
        if self.replica_role == "ingest" and not self.mqtt_shared_group:
            # Without a shared group every replica would receive, and handle, every message.
            raise ValueError("replica_role 'ingest' needs mqtt_shared_group (the replicas' $share group)")
        return self

    @property
    def is_primary(self) -> bool:
        return self.replica_role == "primary"

    def resolved_mqtt_client_id(self) -> str:
        return self.mqtt_client_id or self.mqtt_username

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'edgeloop.db').resolve()}"

    def resolved_public_url(self) -> str:
        return self.public_url or f"http://{self.host}:{self.port}"
