"""Parse a source URI into a :class:`FrameSource`."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from edge_agent.errors import SourceError
from edge_agent.sources.base import FrameSource


def open_source(
    uri: str,
    *,
    loop: bool = False,
    realtime: bool | None = None,
    width: int | None = None,
    height: int | None = None,
    fps: float | None = None,
    reconnect_min_s: float = 0.5,
    reconnect_max_s: float = 30.0,
) -> FrameSource:
    """Create (not start) the source named by ``uri``; raises :class:`SourceError` for bad URIs."""
    scheme, _, rest = uri.partition(":")
    scheme = scheme.lower()
    if scheme == "camera":
        try:
            index = int(rest)
        except ValueError:
            raise SourceError(f"{uri}: camera index must be an integer, e.g. camera:0") from None
        from edge_agent.sources.video import VideoCaptureSource

        return VideoCaptureSource(
            uri,
            index,
            width=width,
            height=height,
            fps=fps,
            reconnect_min_s=reconnect_min_s,
            reconnect_max_s=reconnect_max_s,
        )
    if scheme in ("rtsp", "rtsps", "http", "https"):
        if not urlsplit(uri).hostname:
            raise SourceError(f"{uri}: stream URL has no host")
        from edge_agent.sources.video import VideoCaptureSource

        return VideoCaptureSource(
            uri, uri, fps=fps, reconnect_min_s=reconnect_min_s, reconnect_max_s=reconnect_max_s
        )
    if scheme == "file":
        path = Path(rest)
        if not path.is_file():
            raise SourceError(f"{uri}: video file {path} not found")
        from edge_agent.sources.video import VideoCaptureSource

        return VideoCaptureSource(
            uri,
            str(path),
            is_file=True,
            loop=loop,
            realtime=bool(realtime),
            fps=fps,
            reconnect_min_s=reconnect_min_s,
            reconnect_max_s=reconnect_max_s,
        )
    if scheme == "dir":
        from edge_agent.sources.directory import DirectorySource

        return DirectorySource(uri, Path(rest))
    if scheme == "synthetic":
        from edge_agent.sources.synthetic import SyntheticSource

        query = dict(parse_qsl(rest.lstrip("?"), strict_parsing=False)) if rest else {}
        known = {"fps", "width", "height", "frames", "corrupt_every", "seed"}
        unknown = set(query) - known
        if unknown:
            raise SourceError(
                f"{uri}: unknown synthetic parameter(s) {sorted(unknown)} (known: {sorted(known)})"
            )
        try:
            return SyntheticSource(
                uri,
                fps=float(query.get("fps", fps if fps is not None else 30.0)),
                width=int(query.get("width", width or 640)),
                height=int(query.get("height", height or 480)),
                frames=int(query["frames"]) if "frames" in query else None,
                corrupt_every=int(query.get("corrupt_every", 0)),
                seed=int(query.get("seed", 0)),
            )
        except ValueError as exc:
            raise SourceError(f"{uri}: bad synthetic parameter ({exc})") from None
    raise SourceError(
        f"{uri}: unknown source scheme {scheme!r} (camera:N, rtsp://, http(s)://, file:, dir:, synthetic:)"
    )
