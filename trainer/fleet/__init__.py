"""The fleet loop's running service: ingest, drift monitoring, labelling, retraining and staged rollout."""

from trainer.fleet.config import (
    ReleaseServerSettings,
    TrainerServiceConfig,
    TrainingSettings,
    load_service_config,
)
from trainer.fleet.drift_service import REBASING, DriftEvent, DriftService
from trainer.fleet.labelling import LabelImportError, audit_labels, export_queue, field_dataset, import_labels
from trainer.fleet.messaging import FleetPublisher
from trainer.fleet.retrain_job import RetrainSpec, read_result, start_job
from trainer.fleet.retrain_policy import DeviceHealth, RetrainPolicyConfig, decide_retrain
from trainer.fleet.rollout import ActiveRollout, RolloutManager
from trainer.fleet.rollout_policy import RolloutConfig, compare_canary
from trainer.fleet.service import Timeline, TrainerService

__all__ = [
    "ActiveRollout",
    "audit_labels",
    "compare_canary",
    "decide_retrain",
    "DeviceHealth",
    "DriftEvent",
    "DriftService",
    "export_queue",
    "field_dataset",
    "FleetPublisher",
    "import_labels",
    "LabelImportError",
    "load_service_config",
    "read_result",
    "REBASING",
    "ReleaseServerSettings",
    "RetrainPolicyConfig",
    "RetrainSpec",
    "RolloutConfig",
    "RolloutManager",
    "start_job",
    "Timeline",
    "TrainerService",
    "TrainerServiceConfig",
    "TrainingSettings",
]
