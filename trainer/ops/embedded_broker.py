"""An MQTT broker inside this process (amqtt), for the demo on machines without mosquitto.

amqtt speaks MQTT 3.1.1 with retained messages, last wills and QoS 1, which is all the agent and the
trainer need; it has no shared subscriptions, so the trainer runs one plain ingest subscription on
it (``EmbeddedBroker.shared_subscriptions`` is False). Production fleets use mosquitto
(deploy/mosquitto/): this is a convenience for trying EdgeFleet out.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from trainer.ops.broker import free_port


class EmbeddedBroker:
    """amqtt on 127.0.0.1 on a free (or given) port, run by an event loop on its own thread."""

    shared_subscriptions = False

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: Any = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> EmbeddedBroker:
        try:
            from amqtt.broker import Broker
        except ImportError as exc:  # the trainer extra installs it
            raise RuntimeError(
                "neither mosquitto nor amqtt is installed: apt-get install mosquitto, or "
                "pip install 'edgefleet[trainer]'"
            ) from exc
        logging.getLogger("amqtt").setLevel(logging.WARNING)
        config = {
            "listeners": {
                "default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}", "max_connections": 1000}
            },
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
        started = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                self._broker = Broker(config, loop=loop)
                loop.run_until_complete(self._broker.start())
            except BaseException as exc:  # noqa: BLE001 - reported to start()
                errors.append(exc)
                started.set()
                return
            started.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="amqtt-broker", daemon=True)
        self._thread.start()
        if not started.wait(timeout) or errors:
            raise RuntimeError(
                f"embedded MQTT broker did not start on port {self.port}: {errors[0] if errors else 'timeout'}"
            )
        return self

    def stop(self) -> None:
        loop, broker = self._loop, self._broker
        if loop is None or broker is None or not loop.is_running():
            return
        try:
            asyncio.run_coroutine_threadsafe(broker.shutdown(), loop).result(timeout=10)
        except Exception:  # noqa: BLE001 - stopping anyway
            logging.getLogger(__name__).warning("embedded broker did not shut down cleanly", exc_info=True)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread:
            self._thread.join(timeout=10)
