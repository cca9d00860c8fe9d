"""The one way to make a paho MQTT client: protocol, credentials and TLS from :class:`MqttSettings`.

The agent's link, the trainer's publisher, its ingest workers and the release hint all connect through
here, so a username, a password or a client certificate set once in a config file reaches every one.
"""

from __future__ import annotations

import ssl

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.config import MqttSettings


def new_client(
    settings: MqttSettings, client_id: str, *, clean_session: bool = True, manual_ack: bool = False
) -> mqtt.Client:
    """An MQTT 3.1.1 client (callback API v2) with the settings' credentials and TLS, not yet connected.

    TLS verifies the broker against ``settings.ca`` (or the system store) and presents ``cert``/``key``
    when both are set (mutual TLS).
    """
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv311,
        clean_session=clean_session,
        manual_ack=manual_ack,
    )
    if settings.username is not None:
        client.username_pw_set(settings.username, settings.password)
    if settings.tls:
        client.tls_set(
            ca_certs=str(settings.ca) if settings.ca else None,
            certfile=str(settings.cert) if settings.cert else None,
            keyfile=str(settings.key) if settings.key else None,
            cert_reqs=ssl.CERT_REQUIRED,
        )
    return client
