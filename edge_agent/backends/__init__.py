"""Inference runtimes behind one interface; one small module per runtime.

Runtime modules are imported lazily, so an agent running a LiteRT artifact never loads onnxruntime
(and vice versa): each costs tens of megabytes of resident memory on a small board.
"""

from edge_agent.backends.base import Backend, BackendOptions, available_runtimes, load_backend

__all__ = ["Backend", "BackendOptions", "available_runtimes", "load_backend"]
