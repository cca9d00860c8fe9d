"""Agent configuration: pydantic-validated YAML, with ``${ENV}`` substitution.

A bad file fails with one line naming the file, the field and the problem, e.g.
``agent.yaml: mqtt.url: must start with mqtt:// or mqtts:// (got 'tcp://x')``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from edge_agent.backends.base import BackendOptions
from edge_agent.config_files import StrictModel, load_yaml_model, validate_model
from edge_agent.protocol import DeviceId, Identifier
from edge_agent.sampling import SamplingSettings


class MqttSettings(StrictModel):
    """Broker connection. mqtts:// enables TLS; cert+key enable mutual TLS."""

    url: str = "mqtt://127.0.0.1:1883"
    fallback_urls: list[str] = Field(default_factory=list)
    """Other nodes of the same broker tier (a NATS cluster's MQTT listeners, deploy/nats), same scheme and
    TLS files: the agent's link tries the next one when it cannot connect to the current one, so a device
    whose node died reconnects to a survivor instead of spooling until that node is back."""
    client_id: str | None = None
    """Defaults to ``{fleet}-{device}``."""
    username: str | None = None
    password: str | None = None
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    keepalive: int = Field(default=30, ge=5, le=3600)
    reconnect_min_s: float = Field(default=0.5, gt=0)
    reconnect_max_s: float = Field(default=30.0, gt=0)
    max_inflight: int = Field(default=20, ge=1, le=1000)
    identity_check_s: float = Field(default=10.0, ge=0)
    """After connecting, spooled messages wait until the broker echoes this device's retained birth back
    (MQTT 3.1.1 brokers acknowledge publishes they drop, so the echo is the only proof the ACL accepts
    this device id); no echo within this time ends the connection and says why. 0 turns it off (brokers
    that do not keep retained messages)."""

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError(f"must look like mqtt://host:port or mqtts://host:port (got {v!r})")
        return v

    @field_validator("fallback_urls")
    @classmethod
    def _fallback_schemes(cls, v: list[str]) -> list[str]:
        for i, url in enumerate(v):
            try:
                cls._scheme(url)
            except ValueError as exc:
                raise ValueError(f"fallback_urls[{i}]: {exc}") from None
        return v

    @model_validator(mode="after")
    def _cert_pairs(self) -> MqttSettings:
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key must be given together")
        if (self.cert or self.ca) and not self.tls:
            raise ValueError("ca/cert/key need an mqtts:// url")
        other = [u for u in self.fallback_urls if urlsplit(u).scheme != urlsplit(self.url).scheme]
        if other:
            raise ValueError(
                f"fallback_urls must use the url's scheme ({urlsplit(self.url).scheme}): {other}"
            )
        return self

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        """(host, port) of ``url``, then of each fallback, in the order the link tries them."""
        default = 8883 if self.tls else 1883
        return [
            (p.hostname or "127.0.0.1", p.port or default)
            for p in map(urlsplit, [self.url, *self.fallback_urls])
        ]

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme == "mqtts"

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or (8883 if self.tls else 1883)


class SourceSettings(StrictModel):
    uri: str
    """camera:N, rtsp://..., http(s)://..., file:PATH, dir:PATH or synthetic:..."""
    loop: bool = False
    """Restart a file: video at its end."""
    realtime: bool | None = None
    """Pace a file: video at its own frame rate and drop frames like a live camera (default: no)."""
    reconnect_min_s: float = Field(default=0.5, gt=0)
    reconnect_max_s: float = Field(default=30.0, gt=0)
    width: int | None = Field(default=None, ge=16)
    height: int | None = Field(default=None, ge=16)
    fps: float | None = Field(default=None, gt=0)


class ModelSettings(StrictModel):
    package: Path
    artifact: str = "auto"
    """``auto`` times every runnable artifact on first start and keeps the fastest."""
    backend: BackendOptions = Field(default_factory=BackendOptions)


class TelemetrySettings(StrictModel):
    window_seconds: float | None = Field(default=60.0, gt=0)
    window_frames: int | None = Field(default=None, ge=1)
    stats_every: int = Field(default=1, ge=1)
    """Compute input statistics on every k-th frame (always on the model-input-sized frame)."""
    publish_predictions: bool = False
    top_k: int = Field(default=3, ge=1, le=20)

    @model_validator(mode="after")
    def _some_window(self) -> TelemetrySettings:
        if self.window_seconds is None and self.window_frames is None:
            raise ValueError("set window_seconds or window_frames")
        return self


class SpoolSettings(StrictModel):
    max_messages: int = Field(default=10_000, ge=1)
    max_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    flush_timeout_s: float = Field(default=10.0, ge=0)
    """On shutdown, how long to wait for the broker to acknowledge spooled messages."""


class UpdateSettings(StrictModel):
    """Over-the-air model updates (docs/updates.md); without this section the model never changes."""

    repository: str
    """Base URL of the release repository: metadata under ``/metadata/``, targets under ``/targets/``."""
    root: Path
    """The TUF root.json pinned at provisioning (``edgefleet release export-root``)."""
    channel: Identifier = "stable"
    """``stable``, ``canary``, or ``auto``: follow stable, and take a canary release when this device is in
    the release's signed canary cohort (a stable hash of the device id)."""
    model: str | None = None
    """Model name to follow (default: the provisioned package's)."""
    poll_seconds: float = Field(default=3600.0, ge=0)
    """Check the repository this often without a hint (0: only on hints)."""
    poll_on_start: bool = True
    health_windows: int = Field(default=3, ge=0)
    """Telemetry windows a new model must pass before it is committed."""
    latency_budget_ms: float | None = Field(default=1000.0, gt=0)
    """Median inference latency allowed in the self-test and the health window (None: unchecked)."""
    min_confidence_ratio: float = Field(default=0.5, ge=0, le=1)
    """Health fails when mean confidence drops below this times the model's reference mean confidence."""
    max_model_failures: int = Field(default=0, ge=0)
    """Frame failures caused by the model (errors, non-finite outputs) allowed per health window."""
    max_target_bytes: int = Field(default=256 * 1024 * 1024, ge=1024)
    max_trial_attempts: int = Field(default=2, ge=1)
    """Trials of one release interrupted by crashes or power cuts before it is given up."""
    hardware: list[str] | None = None
    """Hardware tags of this device (default: the machine architecture, e.g. aarch64)."""
    http_timeout_s: float = Field(default=30.0, gt=0)
    """Longest wait to connect, and for each read."""
    selftest_timeout_s: float = Field(default=120.0, gt=0)
    """A new model's self-test runs in a child process killed after this long (inference that never
    returns fails the self-test instead of hanging the updater)."""
    fetch_deadline_s: float = Field(default=600.0, gt=0)
    """Longest a whole metadata or package transfer may take (a partial download resumes next time)."""

    @field_validator("repository")
    @classmethod
    def _http(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"must look like http(s)://host:port (got {v!r})")
        return v


class MetricsSettings(StrictModel):
    """Prometheus metrics of the agent (edge_agent/metrics.py lists the series): a local ``/metrics``
    port, a node_exporter textfile-collector file rewritten after every window, or both."""

    port: int | None = Field(default=None, ge=1, le=65535)
    host: str = "127.0.0.1"
    textfile: Path | None = None
    """e.g. /var/lib/prometheus/node-exporter/edgefleet.prom (written atomically)."""

    @model_validator(mode="after")
    def _somewhere(self) -> MetricsSettings:
        if self.port is None and self.textfile is None:
            raise ValueError("metrics needs a port, a textfile, or both")
        return self


class AgentConfig(StrictModel):
    """The whole agent configuration (see firmware_configs/ for device profiles)."""

    device_id: DeviceId
    fleet: Identifier = "default"
    state_dir: Path = Path("/var/lib/edgefleet")
    """Spool, session counter, backend choice and (later) update slots live here."""
    source: SourceSettings
    model: ModelSettings
    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)
    spool: SpoolSettings = Field(default_factory=SpoolSettings)
    update: UpdateSettings | None = None
    sampling: SamplingSettings = Field(default_factory=SamplingSettings)
    """Opt-in privacy-filtered sample frames for labelling (off: no image ever leaves the device)."""
    metrics: MetricsSettings | None = None
    """Prometheus metrics (off unless configured)."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


def validate_config(data: Any, origin: str) -> AgentConfig:
    """Validate a parsed mapping; errors name ``origin``, the field path and the problem."""
    return validate_model(AgentConfig, data, origin)


def load_config(path: str | Path) -> AgentConfig:
    """Read, substitute ``${ENV}`` / ``${ENV:-default}``, parse and validate an agent YAML file.

    Relative paths (state_dir, model.package, mqtt.ca/cert/key, update.root) resolve against the file.
    """
    return load_yaml_model(path, AgentConfig)
