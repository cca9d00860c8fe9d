"""The ingest stage: device messages from the broker, routed and validated, written in batches, acknowledged once committed."""

from trainer.ingest.processes import run_worker, supervise
from trainer.ingest.routing import Accepted, classify, subscription
from trainer.ingest.worker import IngestConfig, IngestWorker

__all__ = ["Accepted", "classify", "IngestConfig", "IngestWorker", "run_worker", "subscription", "supervise"]
