"""Parse a source URI into a :class:`FrameSource`: one opener per scheme, looked up in a table."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from edge_agent.errors import SourceError
from edge_agent.sources.base import FrameSource, redact_credentials


@dataclass(frozen=True)
class SourceOptions:
    """The source settings of agent.yaml that apply to every scheme (each opener uses what fits)."""

    loop: bool = False
    realtime: bool | None = None
    width: int | None = None
    height: int | None = None
    fps: float | None = None
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0


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
    opener = _OPENERS.get(scheme.lower())
    if opener is None:
        raise SourceError(
            f"{redact_credentials(uri)}: unknown source scheme {scheme.lower()!r} (camera:N, rtsp://, http(s)://, file:, dir:, synthetic:)"
        )
    options = SourceOptions(loop, realtime, width, height, fps, reconnect_min_s, reconnect_max_s)
    return opener(uri, rest, options)


def _camera(uri: str, rest: str, o: SourceOptions) -> FrameSource:
    try:
        index = int(rest)
    except ValueError:
        raise SourceError(
            f"{redact_credentials(uri)}: camera index must be an integer, e.g. camera:0"
        ) from None
    from edge_agent.sources.video import VideoCaptureSource

    return VideoCaptureSource(
        uri,
        index,
        width=o.width,
        height=o.height,
        fps=o.fps,
        reconnect_min_s=o.reconnect_min_s,
        reconnect_max_s=o.reconnect_max_s,
    )


def _stream(uri: str, rest: str, o: SourceOptions) -> FrameSource:
    if not urlsplit(uri).hostname:
        raise SourceError(f"{redact_credentials(uri)}: stream URL has no host")
    from edge_agent.sources.video import VideoCaptureSource

    return VideoCaptureSource(
        uri, uri, fps=o.fps, reconnect_min_s=o.reconnect_min_s, reconnect_max_s=o.reconnect_max_s
    )


def _file(uri: str, rest: str, o: SourceOptions) -> FrameSource:
    path = Path(rest)
    if not path.is_file():
        raise SourceError(f"{redact_credentials(uri)}: video file {path} not found")
    from edge_agent.sources.video import VideoCaptureSource

    return VideoCaptureSource(
        uri,
        str(path),
        is_file=True,
        loop=o.loop,
        realtime=bool(o.realtime),
        fps=o.fps,
        reconnect_min_s=o.reconnect_min_s,
        reconnect_max_s=o.reconnect_max_s,
    )


def _directory(uri: str, rest: str, o: SourceOptions) -> FrameSource:
    from edge_agent.sources.directory import DirectorySource

    return DirectorySource(uri, Path(rest))


_SYNTHETIC_PARAMETERS = {"fps", "width", "height", "frames", "corrupt_every", "seed"}


def _synthetic(uri: str, rest: str, o: SourceOptions) -> FrameSource:
    from edge_agent.sources.synthetic import SyntheticSource

    query = dict(parse_qsl(rest.lstrip("?"), strict_parsing=False)) if rest else {}
    unknown = set(query) - _SYNTHETIC_PARAMETERS
    if unknown:
        raise SourceError(
            f"{redact_credentials(uri)}: unknown synthetic parameter(s) {sorted(unknown)} (known: {sorted(_SYNTHETIC_PARAMETERS)})"
        )
    try:
        return SyntheticSource(
            uri,
            fps=float(query.get("fps", o.fps if o.fps is not None else 30.0)),
            width=int(query.get("width", o.width or 640)),
            height=int(query.get("height", o.height or 480)),
            frames=int(query["frames"]) if "frames" in query else None,
            corrupt_every=int(query.get("corrupt_every", 0)),
            seed=int(query.get("seed", 0)),
        )
    except ValueError as exc:
        raise SourceError(f"{redact_credentials(uri)}: bad synthetic parameter ({exc})") from None


_OPENERS: dict[str, Callable[[str, str, SourceOptions], FrameSource]] = {
    "camera": _camera,
    "rtsp": _stream,
    "rtsps": _stream,
    "http": _stream,
    "https": _stream,
    "file": _file,
    "dir": _directory,
    "synthetic": _synthetic,
}
