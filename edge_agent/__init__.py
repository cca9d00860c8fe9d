"""EdgeFleet edge agent: camera frames -> int8 inference -> telemetry over MQTT.

The agent is deliberately light: it never imports torch or the trainer, and it loads only the
runtime of the artifact it runs.
"""

__version__ = "0.1.0"
