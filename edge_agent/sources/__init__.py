"""Frame sources, each named by a URI: camera:N, rtsp://, http(s)://, file:PATH, dir:PATH, synthetic:."""

from edge_agent.sources.base import EndOfStream, Frame, FrameSource, SourceStats
from edge_agent.sources.registry import open_source

__all__ = ["EndOfStream", "Frame", "FrameSource", "SourceStats", "open_source"]
