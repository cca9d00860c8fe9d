#!/bin/sh
# The broker container's entrypoint (deploy/containers/Dockerfile.broker): mosquitto with deploy/mosquitto's
# own configuration, mounted read-only, changed in one line only for the compose network, then started.
#
# * The services' listener: deploy/mosquitto/edgefleet.conf binds 8884 to loopback (the trainer shares the
#   broker's host there). In compose the trainer is another container, so 8884 listens on the container's
#   interfaces: the compose network is the trainer's private network, and compose.yaml never publishes 8884.
#   The line must be exactly as shipped; anything else stops the container (a changed file is never
#   half-applied).
# * Certificates: compose mounts secrets with their owner and mode from the host, and mosquitto reads them
#   only after dropping root to its own user. Run as root, this copies them to /etc/mosquitto/certs with the
#   key readable by that user only, so the key on the host may stay 0600 whoever owns it.
#
# Every path is a variable so tests/test_containers.py can run this very script outside a container.
set -eu

conf_in=${EDGEFLEET_BROKER_CONF:-/etc/mosquitto/edgefleet.conf}
conf_out=${EDGEFLEET_BROKER_CONF_OUT:-/mosquitto/config/edgefleet.conf}
secrets=${EDGEFLEET_BROKER_SECRETS:-/run/secrets}
certs=${EDGEFLEET_BROKER_CERTS:-/etc/mosquitto/certs}
data=${EDGEFLEET_BROKER_DATA:-/var/lib/mosquitto}
owner=${EDGEFLEET_BROKER_USER:-mosquitto}
mosquitto=${EDGEFLEET_BROKER_EXEC:-/usr/sbin/mosquitto}

shipped='listener 8884 127.0.0.1'
if [ "$(grep -cx "$shipped" "$conf_in")" != 1 ]; then
    echo "broker: $conf_in must contain the line '$shipped' once (deploy/mosquitto/edgefleet.conf as shipped)" >&2
    exit 1
fi
sed "s/^$shipped\$/listener 8884/" "$conf_in" > "$conf_out"

for name in ca.crt broker.crt broker.key; do
    if [ ! -r "$secrets/$name" ]; then
        echo "broker: no $secrets/$name: compose.yaml's secrets come from edgefleet pki (deploy/containers/README.md)" >&2
        exit 1
    fi
done
install -d -m 0755 "$certs"
install -m 0644 "$secrets/ca.crt" "$certs/ca.crt"
install -m 0644 "$secrets/broker.crt" "$certs/broker.crt"
install -m 0600 -o "$owner" -g "$owner" "$secrets/broker.key" "$certs/broker.key"
mkdir -p "$data"
chown "$owner:$owner" "$data"

exec "$mosquitto" -c "$conf_out"
