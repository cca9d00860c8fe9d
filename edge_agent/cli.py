"""The ``edgefleet`` command line.

The agent's own group (``edgefleet agent ...``) is built in; every other group (model, train, release,
trainer, ...) is a plugin registered under the ``edgefleet.commands`` entry-point group and loaded only
when named, so running the agent never imports the trainer.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING

from edge_agent import __version__
from edge_agent.errors import EdgeFleetError
from edge_agent.files import write_atomic

if TYPE_CHECKING:  # kept out of `edgefleet --help`'s imports
    from edge_agent.protocol import Prediction, TelemetryWindow, UpdateEvent

_GROUP = "edgefleet.commands"


def _plugin_names() -> dict[str, object]:
    return {ep.name: ep for ep in entry_points(group=_GROUP)}


def _register_agent(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("agent", help="run, benchmark or self-test the edge agent")
    asub = p.add_subparsers(dest="agent_cmd", required=True)

    r = asub.add_parser("run", help="run the agent (from a config file or flags)")
    r.add_argument("--config", help="agent YAML config (see firmware_configs/)")
    r.add_argument("--package", help="model package directory")
    r.add_argument(
        "--source", help="frame source URI: camera:N, rtsp://, http(s)://, file:PATH, dir:PATH, synthetic:"
    )
    r.add_argument("--broker", help="mqtt://host:port or mqtts://host:port")
    r.add_argument("--device-id", help="device id (topic segment)")
    r.add_argument("--fleet", help="fleet name (topic segment)")
    r.add_argument("--state-dir", help="where the agent keeps its spool, session counter and choices")
    r.add_argument("--artifact", help="force an artifact (e.g. tflite-int8) instead of timing them")
    r.add_argument("--window-seconds", type=float, help="telemetry window length in seconds")
    r.add_argument("--window-frames", type=int, help="close a window after this many frames")
    r.add_argument("--publish-predictions", action="store_true", help="publish every frame's result on pred")
    r.add_argument("--print", dest="print_messages", action="store_true", help="print what is published")
    r.set_defaults(func=_agent_run)

    b = asub.add_parser("bench", help="bare runtime loop vs the full agent pipeline, per artifact")
    b.add_argument("--package", required=True)
    b.add_argument("--json", dest="json_out", help="write results here")
    b.add_argument("--threads", type=int, default=1)
    b.add_argument("--seconds", type=float, default=5.0, help="measuring time per artifact and mode")
    b.add_argument("--artifacts", help="comma-separated subset")
    b.add_argument("--broker", help="broker for the agent-process measurements (default: none reachable)")
    b.set_defaults(func=_agent_bench)

    s = asub.add_parser("selftest", help="run a package's golden inputs through every runnable artifact")
    s.add_argument("--package", required=True)
    s.set_defaults(func=_agent_selftest)


def _agent_run(args: argparse.Namespace) -> int:
    from edge_agent.agent import run_agent_from_args

    return run_agent_from_args(args, observer=PrintObserver() if args.print_messages else None)


class PrintObserver:
    """``agent run --print``: one line on stdout per window, prediction and update event published."""

    def window(self, window: TelemetryWindow, labels: Sequence[str]) -> None:
        conf = window.histograms["confidence"]
        top = sorted(window.class_counts.items(), key=lambda kv: -kv[1])[:3]
        named = ", ".join(f"{labels[c] if c < len(labels) else c} x{n}" for c, n in top)
        latency = {k: v.p50 for k, v in window.latency_ms.items()}
        print(
            f"tele seq={window.seq} frames={window.frames.model_dump()} top=[{named}] "
            f"conf_hist={conf.counts} latency_ms={latency} events={window.events}",
            flush=True,
        )

    def prediction(self, message: Prediction) -> None:
        best = ", ".join(f"{lab} {p:.2f}" for lab, (_, p) in zip(message.labels, message.top))
        print(f"pred frame={message.frame} {best}", flush=True)

    def update(self, event: UpdateEvent) -> None:
        print(
            f"update {event.state} {event.reason or ''} {event.version or ''} {event.detail or ''}".rstrip(),
            flush=True,
        )


def _agent_bench(args: argparse.Namespace) -> int:
    from edge_agent.bench import main as bench_main

    return bench_main(args)


def _agent_selftest(args: argparse.Namespace) -> int:
    from edge_agent.package import load_package
    from edge_agent.selftest import runnable_artifacts, self_test

    pkg = load_package(args.package)
    ok = True
    runnable = runnable_artifacts(pkg)
    for key, art in pkg.manifest.artifacts.items():
        if key not in runnable:
            print(f"{key}: skipped ({art.runtime} not installed)")
            continue
        result = self_test(pkg, key)
        ok &= result.passed
        print(f"{key}: {'PASS' if result.passed else 'FAIL'} {result.summary()}")
    return 0 if ok else 1


def _register_protocol(sub: argparse._SubParsersAction) -> None:
    """``edgefleet protocol asyncapi|schemas``: the machine-readable MQTT contract."""
    p = sub.add_parser("protocol", help="the MQTT contract: AsyncAPI document and JSON Schemas")
    ps = p.add_subparsers(dest="protocol_cmd", required=True)
    a = ps.add_parser("asyncapi", help="the AsyncAPI 3.0 document of every topic and message")
    a.add_argument("--out", type=Path, help="write it here (default: standard output)")
    a.set_defaults(func=_protocol_asyncapi)
    s = ps.add_parser("schemas", help="one JSON Schema per message kind")
    s.add_argument("--out", type=Path, required=True, help="directory for <kind>.json")
    s.set_defaults(func=_protocol_schemas)


def _protocol_asyncapi(args: argparse.Namespace) -> int:
    from edge_agent.asyncapi import asyncapi_document, dumps

    text = dumps(asyncapi_document())
    if args.out:
        write_atomic(args.out, text.encode())
    else:
        sys.stdout.write(text)
    return 0


def _protocol_schemas(args: argparse.Namespace) -> int:
    from edge_agent.asyncapi import dumps, message_schemas

    args.out.mkdir(parents=True, exist_ok=True)
    for kind, schema in message_schemas().items():
        write_atomic(args.out / f"{kind}.json", dumps(schema).encode())
    return 0


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """A parser with the agent group and, when named in ``argv`` (or for help), the plugin groups."""
    parser = argparse.ArgumentParser(
        prog="edgefleet",
        description="EdgeFleet: edge inference runtime with fleet sync.",
    )
    parser.add_argument("--version", action="version", version=f"edgefleet {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="group", metavar="GROUP")
    sub.required = True
    _register_agent(sub)
    _register_protocol(sub)
    plugins = _plugin_names()
    first = next((a for a in argv if not a.startswith("-")), None)
    if first in ("agent", "protocol"):
        to_load: list[str] = []  # the agent path never touches trainer code
    elif first in plugins:
        to_load = [first]
    else:  # help or an unknown group: show every group
        to_load = list(plugins)
    for name in to_load:
        try:
            plugins[name].load()(sub)  # type: ignore[attr-defined]
        except ImportError as exc:
            sub.add_parser(name, help=f"unavailable here ({exc}); install edgefleet[trainer]")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args) or 0)
    except (EdgeFleetError, OSError) as exc:
        # bad input (a file, a flag, a URL) is one line naming it; -v adds the traceback
        if args.verbose:
            traceback.print_exc()
        print(f"edgefleet: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _one_line(exc: BaseException) -> str:
    """The error's message on one line (an OSError names its path; multi-line messages are joined)."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}"
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


if __name__ == "__main__":
    sys.exit(main())
