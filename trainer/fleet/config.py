"""Trainer service configuration (``edgefleet trainer serve --config trainer.yaml``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from edge_agent.config import MqttSettings
from edge_agent.config_files import StrictModel, load_yaml_model
from edge_agent.protocol import Identifier
from trainer.drift.detector import DriftConfig
from trainer.fleet.homeassistant import HomeAssistantSettings
from trainer.fleet.retrain_policy import RetrainPolicyConfig
from trainer.fleet.rollout_policy import RolloutConfig
from trainer.fleet.webhooks import WebhookSettings
from trainer.ingest.nats_source import NatsSettings


class ReleaseServerSettings(StrictModel):
    repo: Path
    """The TUF repository directory (created with ``edgefleet release init`` if missing)."""
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    public_url: str | None = None
    """The URL devices use (default: http://host:port)."""


class TrainingSettings(StrictModel):
    base_data: str
    """The original training data: an ImageFolder directory or ``builtin:NAME``."""
    model: str = Field(default="shapes", min_length=1, max_length=64)
    min_field_gain: float = Field(default=3.0, ge=0)
    """Points a retrained candidate must gain over the champion on the field slice."""
    train: dict[str, Any] = Field(default_factory=dict)
    """Overrides of the training config (epochs, formats, robustness, gate rules...)."""
    work_dir: Path = Path("build/trainer")

    @field_validator("train")
    @classmethod
    def _valid_training_config(cls, v: dict[str, Any]) -> dict[str, Any]:
        """A typo here would otherwise surface hours later, when drift first triggers a retraining."""
        from trainer.build import TrainConfig

        TrainConfig.model_validate(v)
        return v


DEFAULT_METRICS_PORT = 9464


class MetricsSettings(StrictModel):
    """Where the service serves Prometheus ``/metrics`` (trainer/fleet/metrics.py lists the series): in
    the console's app when ``trainer serve`` runs a console, else on a port of its own."""

    host: str = "127.0.0.1"
    """The address of the port of its own."""
    port: int | None = Field(default=None, ge=1, le=65535)
    """A port of its own: unset, 9464 when no console runs and none when the console serves /metrics."""
    console_auth: Literal["token", "none"] = "token"
    """The console's /metrics: ``token`` asks for ``Authorization: Bearer <console API token>`` (any
    role: ``edgefleet console token add USER --name prometheus``), ``none`` serves anyone who reaches
    the console."""

    def own_port(self, console: bool) -> int | None:
        """The port of its own to open, given whether a console serves /metrics too."""
        if self.port is not None:
            return self.port
        return None if console else DEFAULT_METRICS_PORT


class ConsoleSettings(StrictModel):
    """The fleet manager console (``edgefleet console``; ``trainer serve`` starts it when configured)."""

    host: str = "127.0.0.1"
    port: int = Field(default=8090, ge=0, le=65535)
    tls_cert: Path | None = None
    """Serve HTTPS with this certificate chain (and ``tls_key``); session cookies are then Secure."""
    tls_key: Path | None = None
    session_hours: float = Field(default=12.0, gt=0, le=24 * 30)
    login_attempts: int = Field(default=5, ge=1)
    """Failed logins allowed per client address and per user name in 5 minutes."""
    refresh_s: float = Field(default=5.0, ge=1)
    """How often open pages refresh themselves."""


class RetentionSettings(StrictModel):
    """Hour and day roll-ups of telemetry, and how long raw windows are kept (trainer/store/rollups.py)."""

    keep_raw_days: float = Field(default=14.0, gt=0)
    """Raw windows are deleted this many days after they ended, once they are in the hour roll-ups."""
    rollup_every_s: float = Field(default=300.0, gt=0)
    """How often the service rolls up complete hours and days and purges old raw windows."""


class TrainerServiceConfig(StrictModel):
    fleet: Identifier
    mqtt: MqttSettings
    db_url: str = "sqlite:///build/trainer/fleet.db"
    ingest_workers: int = Field(default=1, ge=1, le=16)
    shared_subscription: bool = True
    """Ingest through an MQTT shared subscription (mosquitto, EMQX, HiveMQ); False for brokers without
    them (the demo's embedded amqtt), which allows one ingest worker only."""
    nats: NatsSettings | None = None
    """The broker tier is a NATS JetStream cluster (deploy/nats, docs/scale-out.md): ingest pulls from
    its durable consumer ``ingest`` (created at startup) instead of the MQTT shared subscription; the
    ``mqtt:`` section is then one node's MQTT listener, for the service's hints, commands and alerts."""
    release: ReleaseServerSettings
    training: TrainingSettings
    drift: DriftConfig = Field(default_factory=DriftConfig)
    slot_s: float = Field(default=60.0, gt=0)
    """Drift steps assess windows by slots of this length (match the devices' window length)."""
    grace_s: float = Field(default=15.0, ge=0)
    """How long after a slot ends its windows are assessed (publish + ingest latency)."""
    retrain: RetrainPolicyConfig = Field(default_factory=RetrainPolicyConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    labeller: Literal["human", "oracle"] = "human"
    """``oracle`` labels samples with the fleet simulator's ground truth (simulation only)."""
    sample_minutes: float = Field(default=30.0, gt=0)
    """How long a drifting device samples frames uniformly (the ``sample`` command)."""
    tick_s: float = Field(default=2.0, gt=0)
    metrics: MetricsSettings | None = None
    """Serve Prometheus metrics (off unless configured): at the console's /metrics when it runs, else (or
    also, with ``metrics.port``) on a port of their own."""
    homeassistant: HomeAssistantSettings | None = None
    """Home Assistant MQTT discovery of every device (off unless configured)."""
    console: ConsoleSettings | None = None
    """Serve the fleet manager console from the service's process (off unless configured)."""
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    """Telemetry roll-ups (what 30-day charts read) and raw-window retention."""
    webhooks: list[WebhookSettings] = Field(default_factory=list)
    """Alert receivers: each alert of the chosen kinds is POSTed, signed, retried, kept until delivered."""


def load_service_config(path: str | Path) -> TrainerServiceConfig:
    """Read ``trainer.yaml`` the way the agent reads its config: ``${ENV}`` defaults, one-line errors,
    relative paths (release.repo, training.work_dir, mqtt.ca/cert/key) resolved against the file."""
    return load_yaml_model(path, TrainerServiceConfig)
