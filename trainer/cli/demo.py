"""``edgefleet demo``: the whole fleet loop on this machine (see :mod:`trainer.sim.demo`)."""

from __future__ import annotations

import argparse


def register_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole fleet loop on this machine, with measured numbers")
    p.add_argument("--fast", action="store_true", help="a smaller version (CI)")
    p.add_argument("--workdir", default=None)
    p.add_argument(
        "--embedded-broker", action="store_true", help="use the embedded amqtt broker, not mosquitto"
    )
    p.add_argument("--console", action="store_true", help="keep the console up after the demo until Ctrl-C")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from trainer.sim.demo import main

    argv = ["--fast"] if args.fast else []
    argv += ["--workdir", args.workdir] if args.workdir else []
    argv += ["--embedded-broker"] if args.embedded_broker else []
    argv += ["--console"] if args.console else []
    return main(argv)
