"""The trainer's ``edgefleet`` command groups (entry-point plugins), one module per stage: parse, call the stage, print.

Heavy imports happen inside the handlers, so ``edgefleet --help`` stays fast."""

from trainer.cli.build import register_train
from trainer.cli.data import register_data
from trainer.cli.db import register_db
from trainer.cli.demo import register_demo
from trainer.cli.eval import register_eval
from trainer.cli.fleet import register_labels, register_rollout, register_trainer
from trainer.cli.ingest import register
from trainer.cli.model import register_model
from trainer.cli.pki import register_pki
from trainer.cli.release import register_release

__all__ = [
    "register",
    "register_data",
    "register_db",
    "register_demo",
    "register_eval",
    "register_labels",
    "register_model",
    "register_pki",
    "register_release",
    "register_rollout",
    "register_train",
    "register_trainer",
]
