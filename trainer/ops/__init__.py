"""Operations helpers every stage may use: the fleet's PKI, broker processes and progress reporting."""

from trainer.ops.broker import BrokerTLS, MosquittoBroker, die_with_parent, find_mosquitto, free_port
from trainer.ops.embedded_broker import EmbeddedBroker
from trainer.ops.progress import Steps

__all__ = [
    "BrokerTLS",
    "die_with_parent",
    "EmbeddedBroker",
    "find_mosquitto",
    "free_port",
    "MosquittoBroker",
    "Steps",
]
