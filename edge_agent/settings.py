"""Agent settings (env prefix EDGELOOP_AGENT_), built in ``main()`` and passed down."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from edge_agent.drift import DriftSettings
from edge_agent.ota.health import HealthSettings


class AgentSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EDGELOOP_AGENT_", extra="ignore")

    device_id: str = ""
    # JSON written by `edgeloop devices add --out`: device_id, api_token, mqtt_username, mqtt_password.
    credentials_file: Path | None = None
    data_dir: Path = Path(".edgeloop/agent")
    api_url: str = "http://127.0.0.1:8000"
    api_token: SecretStr = SecretStr("")
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 1883
    mqtt_password: SecretStr = SecretStr("")
    # TLS: the broker is verified against this CA only (pinned; not the system store).
    mqtt_tls_ca: Path | None = None
    # Client certificate + key (PEM) for a broker that requires one; both or neither.
    mqtt_tls_cert: Path | None = None
    mqtt_tls_key: Path | None = None
    # Name the broker certificate must carry when it differs from mqtt_host (e.g. an IP).
    mqtt_tls_server_name: str | None = None
    # Reconnect backoff: starts at min, doubles per failed attempt, capped at max.
    mqtt_reconnect_min_s: float = Field(1.0, gt=0)
    mqtt_reconnect_max_s: float = Field(60.0, gt=0)
    # QoS 1 events waiting for the broker (data_dir/outbox.db): past either cap the oldest go (counted).
    mqtt_outbox_max_messages: int = Field(10_000, ge=1)
    mqtt_outbox_max_bytes: int = Field(64 * 1024 * 1024, ge=1024 * 1024)
    # Public key file, or a folder of *pub*.pem files, that bundles must be signed by.
    trusted_keys: Path | None = None

    # "folder:/path/to/images" (labels beside images stand in for QA corrections), a video
    # file, an rtsp:// or http(s):// stream, a camera index ("0", "usb:0"), or a plugin scheme
    # such as "synthetic:line_b?seed=1&labels=0.2" (see edge_agent.sources).
    source: str = ""
    loop_source: bool = True
    max_fps: float = Field(0.0, ge=0, description="0 = as fast as inference allows")
    max_frames: int = Field(0, ge=0, description="stop after this many frames; 0 = run forever")
    # Live streams and cameras: a stalled read gives up after read_timeout, a dropped stream is
    # reopened after a backoff that doubles per failure up to source_reconnect_max_s.
    source_open_timeout_s: float = Field(10.0, gt=0)
    source_read_timeout_s: float = Field(5.0, gt=0)
    source_reconnect_min_s: float = Field(0.5, gt=0)
    source_reconnect_max_s: float = Field(30.0, gt=0)

    detector: dict[str, Any] = Field(default_factory=lambda: {"type": "onnxruntime", "intra_op_threads": 1})
    # TensorRT engines (detector type "tensorrt"): precisions in order of preference; when the
    # bundle has no engine for this GPU + TensorRT version, build one from its ONNX (cached in
    # data_dir/engines) unless engine_build is off.
    engine_precision: tuple[Literal["fp16", "fp32", "int8"], ...] = ("fp16", "fp32")
    # ONNX-reading backends (onnxruntime, openvino) take the bundle's gated INT8 model first.
    onnx_precision: tuple[Literal["int8", "fp32"], ...] = ("int8", "fp32")
    engine_build: bool = True
    engine_build_workspace_mb: int = Field(1024, ge=64)

    # Sample collection.
    collect_corrections: bool = True
    low_confidence_band: tuple[float, float] = (0.25, 0.4)
    collect_low_confidence: bool = False
    random_rate: float = Field(0.0, ge=0, le=1)
    max_samples_per_hour: int = Field(5000, ge=0)
    jpeg_quality: int = Field(92, ge=50, le=100)
    spool_max_bytes: int = Field(512 * 1024 * 1024, ge=1024 * 1024)
    # Per reason: samples per rolling hour and per UTC day (the day's counts survive restarts,
    # data_dir/collector-quota.json); 0 = none of that reason. All under max_samples_per_hour.
    correction_max_per_hour: int = Field(5000, ge=0)
    correction_max_per_day: int = Field(50_000, ge=0)
    low_confidence_max_per_hour: int = Field(600, ge=0)
    low_confidence_max_per_day: int = Field(5000, ge=0)
    shadow_disagreement_max_per_hour: int = Field(600, ge=0)
    shadow_disagreement_max_per_day: int = Field(5000, ge=0)
    random_max_per_hour: int = Field(120, ge=0)
    random_max_per_day: int = Field(1000, ge=0)
    # Near-duplicates: a sample within this Hamming distance (of 256 pHash bits) of one of the
    # last dedup_window accepted samples is dropped; window 0 = off.
    dedup_max_distance: int = Field(24, ge=0, le=256)
    dedup_window: int = Field(256, ge=0)
    # A shadowed frame is collected when its agreement between the two models is below this.
    collect_shadow_disagreement: bool = True
    shadow_disagreement_below: float = Field(1.0, gt=0, le=1)
    # Line HMI correction endpoint (POST /v1/corrections); port 0 = off. Binding beyond
    # loopback requires hmi_token (sent as "Authorization: Bearer ...").
    hmi_host: str = "127.0.0.1"
    hmi_port: int = Field(0, ge=0, le=65535)
    hmi_token: SecretStr = SecretStr("")
    hmi_max_body_bytes: int = Field(64 * 1024, ge=1024, le=16 * 1024 * 1024)
    # Recent frames a correction can still refer to: count and memory caps (oldest go first).
    frame_buffer_frames: int = Field(256, ge=1)
    frame_buffer_max_bytes: int = Field(256 * 1024 * 1024, ge=1024 * 1024)

    # OTA.
    max_bundle_bytes: int = Field(512 * 1024 * 1024, ge=1024)
    keep_versions: int = Field(3, ge=1)
    shadow_queue: int = Field(8, ge=1)
    shadow_max_errors: int = Field(0, ge=0)
    # On frames with a QA correction the candidate may not be less accurate than this.
    shadow_accuracy_tolerance: float = Field(0.0, ge=0, le=1)
    # Shadow budget: share of live frames the candidate gets, and the most of the wall time it
    # may spend inferring over a sliding window (frames over budget are skipped and counted).
    # Default cap 0.1: measured live-path fps drop 7.6 % (ORT INT8: -1.4 %) against 54 % uncapped
    # on 2 cores (benchmarks/README.md); a 10-30 fps line still has every frame compared.
    shadow_share: float = Field(1.0, gt=0, le=1)
    shadow_max_busy_fraction: float = Field(0.1, gt=0, le=1)
    shadow_budget_window_s: float = Field(10.0, gt=0)
    # Post-switch health window (errors, confidence collapse) before an update is committed;
    # env as JSON, e.g. EDGELOOP_AGENT_HEALTH='{"window_frames": 100}'.
    health: HealthSettings = Field(default_factory=HealthSettings)
    # Drift statistics per window, published on the drift topic (edge_agent.drift); env as JSON,
    # e.g. EDGELOOP_AGENT_DRIFT='{"window_frames": 300, "window_seconds": 60}'.
    drift: DriftSettings = Field(default_factory=DriftSettings)

    heartbeat_seconds: float = Field(5.0, gt=0)

    @model_validator(mode="after")
    def _load_credentials(self) -> AgentSettings:
        if self.credentials_file is not None:
            creds = json.loads(Path(self.credentials_file).read_text())
            self.device_id = self.device_id or creds["device_id"]
            if not self.api_token.get_secret_value():
                self.api_token = SecretStr(creds["api_token"])
            if not self.mqtt_password.get_secret_value():
                self.mqtt_password = SecretStr(creds["mqtt_password"])
        if not self.device_id:
            raise ValueError("device_id is required (EDGELOOP_AGENT_DEVICE_ID or a credentials file)")
        return self
